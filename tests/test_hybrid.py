"""Hybrid attention models (issue 16): HF's default sliding-window + global layer patterns (tiny Gemma 3 with its
default ``layer_types``, Mistral and Qwen2 with a window smaller than the generated length). Sliding-window sites
stay dense with their window in the reason (both cache kinds), global layers get Double Sparsity, decoding is
exact at full budget and no label is rebuilt in steady decode. Also: a dynamic site whose labels are rebuilt on
consecutive steps falls back to dense attention with one warning, and ``dsc explain`` shows a decode graph by
default with a per-graph "N of M sites sparse"."""
from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch
import transformers as T
from helpers import D, GEMMA3, HKV, HQ, MISTRAL, QWEN2, assert_same, compiled, generate, tiny_decoder

import dsc
from dsc.calibration.config import ChannelConfig
from dsc.passes import store

WINDOW = 8
DEFAULT_DENSE = (0, 1)  # DSConfig's default dense_layers
MODELS = {  # name -> (classes, layers, config overrides)
    "gemma3": (GEMMA3, 6, {"head_dim": D, "sliding_window": WINDOW}),  # default layer_types: 5 sliding, 1 global
    "mistral": (MISTRAL, 3, {"sliding_window": WINDOW}),  # every layer slides
    "qwen2": (QWEN2, 4, {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 3}),
}


@pytest.fixture(autouse=True)
def _dynamo():
    """HF forwards share decorated code objects, so Dynamo's recompile limit is shared by every model in the
    process: start each test from a clean Dynamo state with room to spare."""
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=64):
        yield
    torch._dynamo.reset()


def make(arch: str):
    (cfg_cls, model_cls), layers, overrides = MODELS[arch]
    return tiny_decoder(cfg_cls, model_cls, layers, **overrides)


def sliding_layers(model) -> set[int]:
    """The sliding-window layers by the HF config (what the backend must find from the graph alone)."""
    cfg = model.config
    types_ = getattr(cfg, "layer_types", None)
    if types_ is None:  # Mistral: a window applies to every layer
        return set(range(cfg.num_hidden_layers)) if cfg.sliding_window else set()
    return {i for i, t in enumerate(types_) if t == "sliding_attention"}


def options(model) -> dict:
    n = model.config.num_hidden_layers
    return {"channels": ChannelConfig.random(n, HQ, HKV, D, seed=1), "budget": 1024, "inner": "eager"}


def prompt(n: int, seed: int = 2):
    return torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def test_default_patterns_are_hybrid():
    """The fixtures really are what the issue is about: HF's default hybrid patterns, windows that bind."""
    assert sliding_layers(make("gemma3")) == {0, 1, 2, 3, 4}
    assert sliding_layers(make("mistral")) == {0, 1, 2}
    assert sliding_layers(make("qwen2")) == {3}


# ------------------------------------------------------------------------------------------ decode
@pytest.mark.parametrize("prompt_len,new", [(12, 6), (4, 10)], ids=["prompt-past-window", "window-fills-in-decode"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("arch", list(MODELS))
def test_sliding_dense_global_sparse_exact_no_rebuilds(arch, cache, prompt_len, new):
    model = make(arch)
    layers, sliding = model.config.num_hidden_layers, sliding_layers(model)
    sparse_layers = [i for i in range(layers) if i not in sliding and i not in DEFAULT_DENSE]
    ids = prompt(prompt_len)
    assert prompt_len + new > WINDOW + 1
    ref = generate(model, ids, new, cache)
    with compiled(model, options(model)) as rt:
        out = generate(model, ids, new, cache)
    assert_same(ref, out)
    graphs = rt.reports
    decode = [g for g in graphs if g and all(s.lq == 1 for s in g)]
    assert decode, "no decode graph was compiled"
    for sites in decode:
        assert sorted(s.layer for s in sites) == list(range(layers))
        for s in sites:
            if s.layer in sliding:
                assert s.action == "dense", (s.layer, s.reason)
                assert s.reason.startswith("sliding window") and "already bounded" in s.reason, s.reason
                if prompt_len > WINDOW:  # the window is full from the first step: its size is in the graph
                    assert s.reason.startswith(f"sliding window of {WINDOW}: already bounded"), s.reason
            elif s.layer in sparse_layers:
                assert s.action == "sparse", (s.layer, s.reason)
            else:
                assert "configured dense layer" in s.reason
    # Steady decode: each global sparse layer went through the sparse kernel at every step, and no label cache
    # was ever rebuilt (the sliding layers' caches, which drop rows, have none).
    assert rt.stats["label_rebuilds"] == 0
    assert rt.stats["sparse_calls"] == (new - 1) * len(sparse_layers)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_prefill_past_the_window_is_recognised(cache):
    """A prompt longer than the window: the prefill's sliding sites say so too (the cache keeps only the window's
    rows), so no label is written for a layer that will never use it."""
    model = make("gemma3")
    with compiled(model, options(model)) as rt:
        generate(model, prompt(12), 2, cache)
    prefill = [g for g in rt.reports if g and all(isinstance(s.lq, int) and s.lq > 1 for s in g)]
    assert len(prefill) == 1
    by_layer = {s.layer: s for s in prefill[0]}
    for layer in range(5):
        assert by_layer[layer].action == "dense"
        assert by_layer[layer].reason.startswith(f"sliding window of {WINDOW}: already bounded"), by_layer[layer].reason
        assert by_layer[layer].extra["window"] == WINDOW
    assert by_layer[5].action == "sparse"


def test_window_larger_than_the_context_is_still_dense_and_exact():
    """HF's default Gemma 3 window (4096) never fills here; the dynamic cache still trims to it, and the layer stays
    dense by policy (W bounds its cost), with the window named."""
    model = tiny_decoder(*GEMMA3, 6, head_dim=D)
    ids = prompt(10)
    ref = generate(model, ids, 4)
    with compiled(model, options(model)) as rt:
        out = generate(model, ids, 4)
    assert_same(ref, out)
    sites = [s for g in rt.reports for s in g]
    window = model.config.sliding_window
    assert {s.layer for s in sites if s.reason.startswith(f"sliding window of {window}")} == {0, 1, 2, 3, 4}
    assert all(s.action == "sparse" for s in sites if s.layer == 5)


# ------------------------------------------------------------------------- rebuilt labels fall back to dense
def _step(labels, spec, past):
    new = torch.randn(1, HKV, 1, D)
    k = torch.cat([past, new], dim=2)
    labels.dynamic(spec, k, past, new)
    return k


def test_consecutive_rebuilds_make_a_site_dense_with_one_warning():
    stats = Counter()
    labels = store.LabelStore(stats)
    spec = store.LabelSpec(channels=torch.tensor([[0, 3], [5, 7]]), bits=16)
    other = store.LabelSpec(channels=torch.tensor([[1, 2], [4, 6]]), bits=16)
    k = torch.randn(1, HKV, 6, D)
    assert not labels.should_stay_dense(spec, None, 7)
    labels.dynamic(spec, k, None, k)  # prefill: a new chain
    k = _step(labels, spec, k.clone())  # out of sync once (e.g. an eager edit): rebuilt
    assert stats["label_rebuilds"] == 1 and not labels.should_stay_dense(spec, k, 7)
    k = _step(labels, spec, k)  # in sync again: the count starts over
    k = _step(labels, spec, k.clone())
    assert stats["label_rebuilds"] == 2 and not labels.should_stay_dense(spec, k, 7)
    k = _step(labels, spec, k.clone())  # second rebuild in a row
    assert stats["label_rebuilds"] == 3 and stats["rebuild_fallbacks"] == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert labels.should_stay_dense(spec, k, 7)
        assert labels.should_stay_dense(spec, k, 7)  # for the rest of the sequence, and warned once
        assert not labels.should_stay_dense(other, k, 8)  # another layer's labels are not affected
        assert not store.LabelStore(Counter()).should_stay_dense(spec, k, 7)  # nor another runtime's store
        # a new sequence (no past) gets labels again; falling back again later does not warn again
        assert not labels.should_stay_dense(spec, None, 7)
        k = torch.randn(1, HKV, 6, D)
        labels.dynamic(spec, k, None, k)
        k = _step(labels, spec, k)
        assert not labels.should_stay_dense(spec, k, 7)
        for _ in range(store.REBUILD_LIMIT):
            k = _step(labels, spec, k.clone())
        assert labels.should_stay_dense(spec, k, 7)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "layer 7" in msgs[0] and "densely" in msgs[0], msgs
    assert stats["rebuild_fallbacks"] == 2 and stats["label_rebuilds"] == 3 + store.REBUILD_LIMIT


def test_rebuilt_every_step_site_attends_densely_end_to_end():
    """A dynamic cache replaced between steps (here copied outside the model) rebuilds labels at every step; after
    two such steps each sparse layer warns once and attends densely: output exact, rebuilds stop. A second
    sequence starts with labels again, falls back again, and does not warn again."""
    model = tiny_decoder(T.LlamaConfig, T.LlamaForCausalLM, 3)
    ids = prompt(10, seed=5)

    def decode(steps):
        cache = T.DynamicCache(config=model.config)
        with torch.no_grad():
            out = model(input_ids=ids, cache=cache, use_cache=True)
            logits = [out.logits[:, -1]]
            for _ in range(steps):
                for layer in cache.layers:  # a copy, as beam search's reorder makes
                    layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
                out = model(input_ids=logits[-1].argmax(-1, keepdim=True), cache=cache, use_cache=True)
                logits.append(out.logits[:, -1])
        return logits

    ref = decode(6)
    opts = {**options(model), "dense_layers": (0,)}
    with compiled(model, opts) as rt, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = decode(6)
        again = decode(6)
    for a, b, c in zip(ref, out, again):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(c, a, atol=1e-4, rtol=1e-4)
    msgs = [str(w.message) for w in caught if "attends densely" in str(w.message)]
    assert len(msgs) == 2 and any("layer 1" in m for m in msgs) and any("layer 2" in m for m in msgs), msgs
    # per sequence and sparse layer: REBUILD_LIMIT sparse steps (each after a rebuild), then dense, with no rebuild,
    # for the other 6 - REBUILD_LIMIT steps (and the prefill, dense by policy)
    assert rt.stats["label_rebuilds"] == 2 * store.REBUILD_LIMIT * 2
    assert rt.stats["sparse_calls"] == 2 * store.REBUILD_LIMIT * 2
    assert rt.stats["dense_calls"] == 2 * (1 + 6 - store.REBUILD_LIMIT) * 2
    assert rt.stats["rebuild_fallbacks"] == 2 * 2


# ------------------------------------------------------------------------------------------ explain
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_explain_hybrid_shows_decode_and_counts(cache):
    model = make("gemma3")
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    ex = dsc.explain(model, {"input_ids": prompt(12)}, options(model), max_new_tokens=3, **extra)
    text = str(ex)
    print(text)
    decode = [g for g in ex.graphs if g and all(r.lq == 1 for r in g)]
    assert decode and len(ex.graphs) >= 2
    assert f"(decode, Lq=1): 1 of 6 sites sparse" in text
    assert "(prefill, Lq=12): 1 of 6 sites sparse" in text
    assert all(r.bounded and "sliding window of 8: already bounded" in r.why for g in ex.graphs for r in g
               if r.layer != 5)
    assert "sliding-window layers (layers 0, 1, 2, 3, 4) stay dense" in text
    assert "forward" not in model.__dict__


def _save_with_tokenizer(model, folder) -> None:
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(model.config.vocab_size)}
    tok = T.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                    unk_token="t0", eos_token="t2", bos_token="t1")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_explain_cli_defaults_trace_decode(tmp_path, capsys, cache):
    from dsc.cli import main

    _save_with_tokenizer(make("gemma3"), tmp_path)
    assert main(["explain", "--model", str(tmp_path), "--cache", cache]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "(prefill, Lq=16): 1 of 6 sites sparse" in out
    assert out.count("(decode, Lq=1): 1 of 6 sites sparse") == (2 if cache == "dynamic" else 1)
    assert f"sliding window of {WINDOW}: already bounded" in out
