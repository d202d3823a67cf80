"""Regressions of issue 12: inputs that once gave wrong output with no error. Each case is now exact, refused
with a message saying what to do, or dense with a reason."""
from __future__ import annotations

import pytest
import torch
import transformers as T

from dsc.passes import store
from test_passes_models import _dynamo  # noqa: F401  (the autouse fixture: a clean Dynamo per test)
from test_passes_models import CHANNELS, compiled, generate, tiny

BINDING = dict(budget=6, sink=1, recent=2)  # 6 of 12+ tokens: selection matters


def test_offload_static_cache_with_beam_search_is_refused():
    """Case 2: beam search reorders a static cache outside the model, materialising the offload placeholders as
    zeros; attending them would be silently wrong, so it is refused with what to do instead."""
    model = tiny("llama")
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(8))
    with compiled(model, offload=True, budget=512, sink=1, recent=2):
        with pytest.raises(ValueError, match="beam search"):
            generate(model, ids, 4, "static", num_beams=2)


def test_offload_static_cache_past_max_cache_len_is_an_error():
    """Case 3: the offloaded static cache's dropped write was the plain model's bounds check; it is kept."""
    model = tiny("llama")
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(9))
    with compiled(model, offload=True, dense_layers=(), **BINDING):
        cache = T.StaticCache(config=model.config, max_cache_len=14)
        with pytest.raises(IndexError, match="max_cache_len"):
            generate(model, ids, 6, "dynamic", past_key_values=cache)


def _greedy(forward, ids, cache, start, n):
    """Greedy tokens from a prefill of ``ids`` at ``start`` (None: no prefill here) and ``n`` decode steps."""
    out = []
    with torch.no_grad():
        logits = forward(input_ids=ids, past_key_values=cache,
                         cache_position=torch.arange(start, start + ids.shape[1])).logits
        pos = start + ids.shape[1]
        for _ in range(n):
            tok = logits[:, -1:].argmax(-1)
            out.append(int(tok))
            logits = forward(input_ids=tok, past_key_values=cache, cache_position=torch.tensor([pos])).logits
            pos += 1
    return out, logits


def test_static_cache_written_outside_the_compiled_model_relabels():
    """Case 4: a reused static cache prefilled eagerly (outside the compiled graph, as after a Dynamo fallback)
    must not decode with the previous sequence's labels: the step that does not continue the last one is checked
    against the cache and the labels are rebuilt."""
    model = tiny("llama")
    gen = torch.Generator().manual_seed(12)
    seq_a, seq_b = torch.randint(3, 128, (1, 30), generator=gen), torch.randint(3, 128, (1, 12), generator=gen)
    eager = model.forward
    with compiled(model, **BINDING):
        fresh = T.StaticCache(config=model.config, max_cache_len=64)
        want_tokens, want_logits = _greedy(model.forward, seq_b, fresh, 0, 5)

        cache = T.StaticCache(config=model.config, max_cache_len=64)
        _greedy(model.forward, seq_a, cache, 0, 5)  # sequence A through the compiled model: labels of A
        cache.reset()
        with torch.no_grad():  # sequence B's prefill outside the compiled model: the labels never see it
            first = eager(input_ids=seq_b, past_key_values=cache, cache_position=torch.arange(12)).logits
        rebuilds = store.STATS["label_rebuilds"]
        tokens, logits = _greedy(model.forward, first[:, -1:].argmax(-1), cache, 12, 4)
    assert store.STATS["label_rebuilds"] > rebuilds
    assert tokens == want_tokens[1:]
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
