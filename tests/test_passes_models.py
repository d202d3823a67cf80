"""The dsparse rewrite on randomly initialised tiny HF decoders (and an encoder), compiled with the ``eager``
inner compiler so each model costs seconds: every site found and rewritten, exact at full budget, dense where it
must be, padding never selected, the label store's life cycle, bounded recompilation, explain()."""
from __future__ import annotations

import gc
import warnings

import pytest
import torch
import transformers as T

import dsc
from dsc.calibration.config import ChannelConfig
from dsc.passes import site_op
from helpers import assert_same, generate
from helpers import ARCHS, CHANNELS, HKV, HQ, LAYERS, D, left_pad, sites_of, tiny
from helpers import compiled_tiny as compiled

pytestmark = pytest.mark.usefixtures("clean_dynamo")

# ------------------------------------------------------------------------------------------ architectures
@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_site_rewritten_and_exact_at_full_budget(arch, cache):
    model = tiny(arch)
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(2))
    ref = generate(model, ids, 4, cache)
    with compiled(model, budget=256) as rt:
        out = generate(model, ids, 4, cache)
    assert_same(ref, out)
    graphs = rt.reports
    assert graphs, "the backend never ran"
    for sites in graphs:
        assert len(sites) == LAYERS
        assert sum(s.action == "sparse" for s in sites) == LAYERS - 1, [s.reason for s in sites]
        assert sites[0].action == "dense" and "configured dense layer" in sites[0].reason
        assert sites[0].becomes == "dsc.dense_attention (KV-native)"  # the dense layer reads K/V without repeat_kv
    # 3 decode steps x 2 sparse layers went through the sparse kernel.
    assert rt.stats["sparse_calls"] == 3 * (LAYERS - 1)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_exact_through_aot_autograd(cache):
    """The rewritten graph survives functionalization (aot_eager) exactly. Without inductor's reinplacing the
    static cache update is functional (a copy at a new address each step): labels are then rebuilt each step,
    which stays correct and says so with a warning; the dynamic chain is found again as usual."""
    model = tiny("llama")
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(12))
    ref = generate(model, ids, 5, cache)
    with compiled(model, budget=256, inner="aot_eager") as rt, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = generate(model, ids, 5, cache)
    assert_same(ref, out)
    assert rt.stats["label_rebuilds"] == 0
    assert rt.stats["sparse_calls"] == 4 * (LAYERS - 1)
    copied = [w for w in caught if "rebuilt each time" in str(w.message)]
    if cache == "static":  # a first sight of a new buffer at every step (prefill + 4 decode steps), per sparse layer
        assert rt.stats["label_builds"] == 5 * (LAYERS - 1) and copied
    else:  # the chain is never broken: no build at all (the prefill starts each chain from an empty past)
        assert rt.stats["label_builds"] == 0 and not copied


def test_sparse_budget_changes_attention_and_runs_kernel():
    """A small budget really selects (outputs differ from dense) and the kernel runs once per site and step."""
    model = tiny("llama")
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(3))
    ref = generate(model, ids, 3, "static")
    with compiled(model, budget=4, sink=0, recent=0, dense_layers=()) as rt:
        out = generate(model, ids, 3, "static")
    assert rt.stats["sparse_calls"] == 2 * LAYERS and rt.stats["dense_calls"] == LAYERS  # 2 decode steps, 1 prefill
    assert not torch.allclose(out.logits[1], ref.logits[1], atol=1e-3)
    torch.testing.assert_close(out.logits[0], ref.logits[0])  # prefill stays dense


# ------------------------------------------------------------------------------------- stays dense
def test_encoder_stays_dense_and_exact():
    cfg = T.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    bert = T.BertModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        ref = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        opts = {"channels": CHANNELS, "inner": "eager", "dense_layers": ()}
        fn = torch.compile(bert, backend="dsparse", options=opts)
        out = fn(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, ref)
    rt = dsc.runtime_of(opts)  # the runtime of a plain torch.compile(backend="dsparse"), found by its options
    sites = sites_of(rt)
    assert rt.stats["sparse_calls"] == 0 and not rt.labels.entries
    assert len(sites) == 2 and all(s.action == "dense" for s in sites)
    assert all("no KV-cache write" in s.reason for s in sites)
    text = str(dsc.explain(bert, {"input_ids": ids, "attention_mask": mask}, {"channels": CHANNELS}))
    print(text)
    assert "2 site(s), 0 rewritten, 2 kept dense" in text


def test_training_with_dropout_stays_dense_and_exact():
    model = tiny("llama", attention_dropout=0.5).train()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    ref = model(input_ids=ids, use_cache=False).logits
    backend = dsc.sparse_backend(channels=CHANNELS, inner="eager", dense_layers=())
    fn = torch.compile(model, backend=backend)
    torch.manual_seed(5)
    out = fn(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(out, ref)
    out.sum().backward()  # gradients flow: nothing opaque on the autograd path
    assert model.model.layers[1].self_attn.q_proj.weight.grad is not None
    sites = sites_of(dsc.runtime_of(backend))
    assert len(sites) == LAYERS and all(s.action == "dense" for s in sites)
    assert all("autograd" in s.reason or "dropout" in s.reason for s in sites)
    with torch.no_grad():  # without autograd, dropout alone keeps it dense
        text = str(dsc.explain(model, {"input_ids": ids}, {"channels": CHANNELS, "dense_layers": ()}))
    print(text)
    assert "dropout_p=0.5" in text and "0 rewritten" in text


# ------------------------------------------------------------------------------------------- padding
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_left_padded_batch_never_selects_padding_and_matches_single_rows(cache, monkeypatch):
    model = tiny("llama")
    gen = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, 128, (n,), generator=gen) for n in (30, 21)]
    ids, mask = left_pad(prompts)
    width = ids.shape[1]

    seen = []
    real = site_op._ds_decode

    def spy(q, k, v, channels, data, scale, zero, bits, valid, bias, lengths, budget, frac, sink, recent, group,
            sm_scale, planned=None, check_row=-1):
        scores = torch.ops.dsc.label_scores(q, channels, data, scale, zero, bits, valid, lengths, group)
        idx = torch.ops.dsc.select_topk(scores, budget, frac, sink, recent)
        if valid is not None:
            b, hq, lq, s = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
            ok = valid.expand(b, hq, lq, s)
            if group:
                ok = ok.view(b, k.shape[1], hq // k.shape[1], lq, s).all(dim=2)
            picked = torch.gather(ok, 3, idx.clamp(min=0))[idx >= 0]
            seen.append((int((~ok).sum()), bool(picked.all())))
        return real(q, k, v, channels, data, scale, zero, bits, valid, bias, lengths, budget, frac, sink, recent,
                    group, sm_scale, planned, check_row)

    monkeypatch.setattr(site_op, "_ds_decode", spy)
    opts = dict(budget=6, sink=1, recent=2)
    with compiled(model, **opts):
        batch = generate(model, ids, 4, cache, attention_mask=mask)
        singles = [generate(model, p[None], 4, cache) for p in prompts]
    assert seen and all(picked_ok for _, picked_ok in seen), "a masked (padding) position was selected"
    assert any(n_masked > 0 for n_masked, _ in seen), "the padding mask never reached the sparse kernel"
    for i, single in enumerate(singles):
        assert batch.sequences[i, width:].tolist() == single.sequences[0, len(prompts[i]):].tolist()
        for a, b in zip(batch.logits, single.logits):
            torch.testing.assert_close(a[i], b[0], atol=2e-4, rtol=1e-3)


# -------------------------------------------------------------------------------------- label store
def test_static_caches_interleaved_reused_and_freed():
    """Two static caches used alternately, a new sequence in a reused cache, a batch-size change: each run equals
    its own dense run at a sparse budget; labels go away with their caches."""
    model = tiny("llama")
    gen = torch.Generator().manual_seed(7)
    a, b = torch.randint(3, 128, (1, 24), generator=gen), torch.randint(3, 128, (2, 24), generator=gen)
    opts = dict(budget=5, sink=1, recent=1)

    def run(ids, cache_obj):
        return generate(model, ids, 3, "given", cache=cache_obj)

    def fresh(batch):
        return T.StaticCache(config=model.config, max_cache_len=40)

    with compiled(model, **opts) as rt:
        ca, cb = fresh(1), fresh(2)
        ref_a, ref_b = run(a, ca), run(b, cb)
        assert len(rt.labels.entries) == 2 * (LAYERS - 1)  # one per cache and sparse layer
        ca.reset()
        cb.reset()
        again_b, again_a = run(b, cb), run(a, ca)  # other order, reused caches (new sequences)
        assert_same(ref_a, again_a)
        assert_same(ref_b, again_b)
        ref_c = run(a, fresh(1))  # a third, new cache: same answer as the first
        assert_same(ref_a, ref_c)
        assert len(rt.labels.entries) == 3 * (LAYERS - 1)  # the third cache's were added; reuse added none
        assert rt.stats["label_rebuilds"] == 0
    del ca, cb, ref_a, ref_b, again_a, again_b, ref_c  # outputs hold their caches too
    gc.collect()
    assert not rt.labels.entries and rt.stats["entries_freed"] == 3 * (LAYERS - 1)  # gone with their caches


def test_dynamic_cache_out_of_sync_is_rebuilt_not_wrong():
    """Prefill run eagerly (the compiled graph never saw those keys): the decode step notices and rebuilds the
    labels from the cache, giving the same tokens as a fully compiled run; in steady state nothing is rebuilt."""
    model = tiny("llama")
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(8))
    opts = dict(budget=5, sink=1, recent=1)
    with compiled(model, **opts) as rt:
        full = generate(model, ids, 4)
    assert rt.stats["label_rebuilds"] == 0 and rt.stats["sparse_calls"] == 3 * (LAYERS - 1)
    with torch.no_grad():
        cache = T.DynamicCache(config=model.config)
        first = model(input_ids=ids, cache=cache, use_cache=True)  # eager prefill
        nxt = first.logits[:, -1].argmax(-1, keepdim=True)
    with compiled(model, **opts) as rt, torch.no_grad():
        step = model(input_ids=nxt, cache=cache, use_cache=True)
    assert rt.stats["label_rebuilds"] == LAYERS - 1 and rt.stats["sparse_calls"] == LAYERS - 1
    torch.testing.assert_close(step.logits[:, -1], full.logits[1], atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------ recompilation
@pytest.mark.parametrize("cache,limit", [("static", 2), ("dynamic", 3)])
def test_recompilations_bounded_over_64_decode_steps(cache, limit):
    model = tiny("llama")
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(9))
    frames0 = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with compiled(model, budget=1 / 8, min_length=0) as rt:  # sparse from the first step (below 1/8's dense_below)
        generate(model, ids, 65, cache)
    compiles = len(rt.reports)
    assert 1 <= compiles <= limit
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - frames0 <= limit
    assert rt.stats["sparse_calls"] == 64 * (LAYERS - 1)
    assert len(rt.sites) == LAYERS - 1  # recompiled graphs reuse their sites: the table does not grow per step


# ------------------------------------------------------------------------------------------ explain
def test_explain_reports_prefill_and_decode_sites():
    model = tiny("llama")
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(10))
    ex = dsc.explain(model, {"input_ids": ids}, {"channels": CHANNELS, "dense_layers": (0,)}, max_new_tokens=2,
                     cache_implementation="static")
    text = str(ex)
    print(text)
    assert len(ex.graphs) == 2
    assert ex.counts() == {"sites": 2 * LAYERS, "sparse": 2 * (LAYERS - 1), "dense": 2}
    assert "labels + dense prefill" in text and "sparse decode" in text and "repeat_kv x2 seen through" in text
    assert "layer 0 is a configured dense layer" in text and "dsc.dense_attention (KV-native)" in text
    assert "forward" not in model.__dict__  # explain leaves the model as it was
    partial = ChannelConfig.random(LAYERS, HQ, HKV, D, layers=[0, 1])
    text = str(dsc.explain(model, {"input_ids": ids}, {"channels": partial, "dense_layers": ()}))
    assert "layer 2 is not in the channel config" in text


def test_explain_cli(tmp_path, tokenizer, capsys):
    from dsc.cli import main

    tiny("llama").save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert main(["explain", "--model", str(tmp_path), "--prompt-tokens", "8", "--dense-layers", "0"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "sparse decode" in out and "total: 6 site(s), 4 rewritten, 2 kept dense" in out
    assert "no channel config given" in out
    assert main(["explain", "--model", str(tmp_path), "--prompt-tokens", "0"]) == 2
    assert "--prompt-tokens must be positive" in capsys.readouterr().err
