"""dsparse composed with inductor on a tiny Llama with a static cache: exact at full budget, the labels made at
prefill are found again at decode (the cache buffer created inside the prefill graph keeps its identity), and
the generated decode code reads the cache buffers in place (no step copies the whole cache)."""
from __future__ import annotations

import re

import torch
from torch._inductor.utils import run_and_get_code

from dsc.passes import store

from test_passes_models import CHANNELS, LAYERS, assert_same, generate, tiny


def test_inductor_static_cache_exact_and_in_place():
    torch._dynamo.reset()
    model = tiny("llama")
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(11))
    ref = generate(model, ids, 4, "static")
    builds0, calls0 = store.STATS["label_builds"], store.STATS["sparse_calls"]
    model.forward = torch.compile(model.forward, backend="dsparse",
                                  options={"channels": CHANNELS, "inner": "inductor", "budget": 256,
                                           "dense_layers": (0,), "r": 8})
    try:
        out, codes = run_and_get_code(generate, model, ids, 4, "static")
    finally:
        del model.forward
        torch._dynamo.reset()
    assert_same(ref, out, atol=1e-4)
    assert store.STATS["sparse_calls"] - calls0 == 3 * (LAYERS - 1)
    assert store.STATS["label_builds"] - builds0 == LAYERS - 1  # once per cache, at prefill; decode finds them
    decode = [c for c in codes if "'static'" in c and "site_attention" in c and "False, " in c]
    assert decode, "no decode graph with a sparse site was generated"
    # k and v go to the op as the graph's own input buffers (argN_1): no clone/copy of the cache in between.
    calls = re.findall(r"torch\.ops\.dsc\.site_attention\.default\(\d+, \w+, (\w+), (\w+),", decode[0])
    assert len(calls) == LAYERS - 1
    assert all(re.fullmatch(r"arg\d+_1", k) and re.fullmatch(r"arg\d+_1", v) for k, v in calls), calls
