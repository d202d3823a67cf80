"""dsparse composed with inductor on a tiny Llama with a static cache: exact at full budget, the labels made at
prefill are found again at decode (the cache buffer created inside the prefill graph keeps its identity), and
the generated decode code reads the cache buffers in place (no step copies the whole cache); 8- and 4-bit labels
hold the quantized codes of the cache's keys; ``inductor_options`` reach inductor; at a budget that drops tokens
every decode step selects by the top-k rule and attends exactly over its selection. Each test compiles one tiny
model with inductor (tens of seconds on 2 cores)."""
from __future__ import annotations

import re
import uuid

import pytest
import torch
import transformers as T
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import run_and_get_code

import dsc
from dsc.kernels import reference as R
from dsc.kernels.testing import assert_valid_selection
from dsc.passes import site_op
from helpers import CHANNELS, LAYERS, assert_same, generate, tiny
from helpers import compiled_tiny as compiled

pytestmark = pytest.mark.usefixtures("clean_dynamo")

PROMPT, NEW = 12, 4


def _ids(seed):
    return torch.randint(3, 128, (1, PROMPT), generator=torch.Generator().manual_seed(seed))


def test_inductor_static_cache_exact_and_in_place():
    model = tiny("llama")
    ids = _ids(11)
    ref = generate(model, ids, NEW, "static")
    with compiled(model, inner="inductor", budget=256) as rt:
        out, codes = run_and_get_code(generate, model, ids, NEW, "static")
    assert_same(ref, out, atol=1e-4)
    assert rt.stats["sparse_calls"] == (NEW - 1) * (LAYERS - 1)
    assert rt.stats["label_builds"] == LAYERS - 1  # once per cache, at prefill; decode finds them
    assert rt.stats["label_rebuilds"] == 0
    decode = [c for c in codes if "'static'" in c and "site_attention" in c and "False, " in c]
    assert decode, "no decode graph with a sparse site was generated"
    # The op's first two arguments are this runtime's key and the site's index; k and v go to it as the graph's own
    # input buffers (argN_1): no clone/copy of the cache in between.
    calls = re.findall(r"torch\.ops\.dsc\.site_attention\.default\((\d+), (\d+), \w+, (\w+), (\w+),", decode[0])
    assert len(calls) == LAYERS - 1
    assert {int(key) for key, *_ in calls} == {rt.key}
    assert sorted(int(site) for _, site, _, _ in calls) == list(range(LAYERS - 1))
    assert all(re.fullmatch(r"arg\d+_1", k) and re.fullmatch(r"arg\d+_1", v) for *_, k, v in calls), calls


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_labels_under_inductor_hold_the_codes_of_the_cache(bits):
    """8- and 4-bit labels with a static cache through inductor: at full budget the tokens equal the plain model's,
    and each sparse layer's label entry holds uint8 codes (two per byte at 4 bits) equal to the reference
    quantization of the channels of that layer's cached keys, for every position written."""
    model = tiny("llama")
    ids = _ids(21)
    ref = generate(model, ids, NEW, "static")
    cache = T.StaticCache(config=model.config, max_cache_len=PROMPT + NEW)
    with compiled(model, inner="inductor", budget=256, label_bits=bits) as rt:
        out = generate(model, ids, NEW, "given", cache=cache)
    assert_same(ref, out, atol=1e-4)
    assert rt.stats["sparse_calls"] == (NEW - 1) * (LAYERS - 1)
    assert rt.stats["label_builds"] == LAYERS - 1 and rt.stats["label_rebuilds"] == 0
    written = PROMPT + NEW - 1  # the last token generated never went through the model
    by_key = {ptr: (spec, entry) for (spec, ptr), entry in rt.labels.entries.items()}
    assert len(by_key) == LAYERS - 1
    for layer in range(1, LAYERS):
        keys = cache.layers[layer].keys
        spec, entry = by_key[keys.data_ptr()]  # filed under the cache buffer inductor updated in place
        assert spec.bits == bits and torch.equal(spec.channels, CHANNELS.channels(layer, 8))
        r = spec.channels.shape[1]
        assert entry.data.dtype == torch.uint8 and entry.data.shape[-1] == (r if bits == 8 else (r + 1) // 2)
        b, hkv = keys.shape[:2]
        lab = keys[:, :, :written].gather(-1, spec.channels[None, :, None, :].expand(b, hkv, written, r))
        codes, scale, zero = R.quantize(lab, bits)
        assert torch.equal(entry.data[:, :, :written], codes), layer
        torch.testing.assert_close(entry.scale[:, :, :written], scale)
        torch.testing.assert_close(entry.zero[:, :, :written], zero)


class _Recorder(CustomGraphPass):
    """A post-grad pass that records the ops of each graph inductor lowers (a fresh uuid: never a cache hit)."""

    def __init__(self):
        self.graphs = []
        self._uuid = uuid.uuid4().hex

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.graphs.append([str(n.target) for n in graph.nodes if n.op == "call_function"])

    def uuid(self):
        return self._uuid


def test_inductor_options_reach_inductor():
    """``inductor_options`` are inductor config patches for the inner compile: a post-grad custom pass given there
    runs on the rewritten graph (it sees the site ops), and the model still computes what it did."""
    model = tiny("llama")
    ids = _ids(31)

    def prefill():
        cache = T.StaticCache(config=model.config, max_cache_len=PROMPT)
        return model(input_ids=ids, cache=cache, cache_position=torch.arange(PROMPT)).logits

    with torch.no_grad():
        ref = prefill()
    recorder = _Recorder()
    with compiled(model, inner="inductor", budget=256, inductor_options={"post_grad_custom_post_pass": recorder}), \
            torch.no_grad():
        out = prefill()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert len(recorder.graphs) == 1, "the pass did not run (or ran for more than the one prefill graph)"
    assert sum("dsc.site_attention" in t for t in recorder.graphs[0]) == LAYERS - 1, recorder.graphs[0]


# ------------------------------------------------------------------------------------- binding budget vs oracle
def _definition_scores(q, k, channels, valid, group):
    """``q . k`` over each KV head's label channels, from the keys themselves (fp32 ``[B, Hsel, Lq, S]``, -inf where
    invalid). Per KV group (valid where all its query heads may see the position): for each position, the largest
    over the group's heads of its score minus that head's best score in the row."""
    b, hq, lq, _ = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    sc = torch.stack([q[:, h][..., channels[h // g]] @ k[:, h // g][..., channels[h // g]].transpose(-1, -2)
                      for h in range(hq)], 1)
    ok = torch.ones(b, hq, lq, s, dtype=torch.bool) if valid is None else valid.expand(b, hq, lq, s)
    if not group:
        return sc.masked_fill(~ok, float("-inf"))
    sc = sc.view(b, hkv, g, lq, s).masked_fill(~ok.view(b, hkv, g, lq, s).all(2, keepdim=True), float("-inf"))
    return (sc - sc.amax(-1, keepdim=True)).amax(2)


def _definition_attention(q, k, v, idx, sm_scale, bias):
    """softmax(q . k^T * scale + bias) @ v over each query's selected positions only, one query at a time."""
    b, hq, lq, _ = q.shape
    g = hq // k.shape[1]
    out = torch.zeros(b, hq, lq, v.shape[-1])
    for i in range(b):
        for h in range(hq):
            for j in range(lq):
                rows = idx[i, h if idx.shape[1] == hq else h // g, j]
                rows = rows[rows >= 0]
                logits = k[i, h // g, rows] @ q[i, h, j] * sm_scale
                if bias is not None:
                    logits = logits + bias.expand(b, hq, lq, k.shape[2])[i, h, j, rows]
                out[i, h, j] = torch.softmax(logits, -1) @ v[i, h // g, rows]
    return out


def test_binding_budget_under_inductor_selects_and_attends_by_the_definition(monkeypatch):
    """Budget 6 of 13-15 tokens through inductor (static cache): every sparse step's labels are the channels of the
    cached keys, its selection obeys the top-k rule (the oracle ``assert_valid_selection``) and drops tokens, and
    the op's output equals attention computed from the definition over that selection. The whole generation
    equals the eager inner compiler's at the same budget."""
    opts = dict(budget=6, sink=1, recent=2, gqa="group")  # one selection per KV group (the default)
    model = tiny("llama")
    ids = _ids(41)
    with compiled(model, **opts):
        want = generate(model, ids, NEW, "static")
    torch._dynamo.reset()

    seen, real = [], site_op._ds_decode

    def spy(*args, **kw):
        out = real(*args, **kw)
        seen.append(([a.clone() if isinstance(a, torch.Tensor) else a for a in args], out.clone()))
        return out

    monkeypatch.setattr(site_op, "_ds_decode", spy)
    with compiled(model, inner="inductor", **opts) as rt:
        got = generate(model, ids, NEW, "static")
    assert_same(want, got, atol=1e-4)
    assert len(seen) == rt.stats["sparse_calls"] == (NEW - 1) * (LAYERS - 1)
    dropped = 0
    for args, out in seen:
        q, k, v, channels, data, scale, zero, bits, valid, bias, lengths, budget, frac, sink, recent, group, sm = args
        assert (bits, budget, frac, sink, recent, group, lengths) == (16, 6, 0.0, 1, 2, True, None)
        n = k.shape[2] if valid is None else int(valid[0, 0, -1].sum())  # positions written so far
        assert torch.equal(data[:, :, :n], k[:, :, :n].gather(-1, channels[None, :, None, :].expand(
            *k.shape[:2], n, channels.shape[1])))  # the labels are the cache's keys' channels
        scores = torch.ops.dsc.label_scores(q, channels, data, scale, zero, bits, valid, lengths, group)
        torch.testing.assert_close(scores, _definition_scores(q, k, channels, valid, group), atol=1e-5, rtol=1e-5)
        idx = torch.ops.dsc.select_topk(scores, budget, frac, sink, recent)
        assert_valid_selection(scores, idx, budget, frac, sink, recent)
        dropped += int(((scores > float("-inf")).sum(-1) - (idx >= 0).sum(-1)).sum())
        torch.testing.assert_close(out, _definition_attention(q, k, v, idx, sm, bias), atol=1e-5, rtol=1e-5)
    assert dropped > 0, "the budget never dropped a token"
