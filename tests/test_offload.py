"""Offload (``options={"offload": True}``): decode served from the host K/V store equals on-device decode exactly
(same selections, same tokens) on static and dynamic caches, padded GQA batches; only the selected rows move;
bad requests fail loudly."""
from __future__ import annotations

import pytest
import torch

from collections import Counter

from dsc.passes import offload
from helpers import HKV, LAYERS, OFFLOAD_OPTS as OPTS, D, decode_both_ways, generate, padded_batch, tiny
from helpers import compiled_tiny as compiled

pytestmark = pytest.mark.usefixtures("clean_dynamo")
OPTS_NO_BUDGET = dict(sink=1, recent=2)


@pytest.mark.parametrize("gqa", ["head", "group"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_offload_equals_on_device_decode(cache, gqa, monkeypatch):
    model = tiny("llama")  # GQA: 4 query heads on 2 KV heads
    ids, mask = padded_batch()
    got_sel, ref_stats, got_stats = decode_both_ways(model, ids, mask, cache, gqa, monkeypatch)
    sparse_layers = LAYERS - 1
    assert got_stats["offload_fetches"] == got_stats["sparse_calls"] == ref_stats["sparse_calls"] > 0
    assert got_stats["offload_fetches"] == 4 * sparse_layers  # decode steps after the first token
    assert ref_stats.get("offload_fetches", 0) == 0 and ref_stats.get("h2d_bytes", 0) == 0
    # each fetch moves each selected KV row once (the union of a group's selections) and nothing else, fp32
    rows = 0
    for t in got_sel:
        per_kv = t[:, :, 0].reshape(t.shape[0], HKV, -1)
        u = max(len(set(row.tolist())) for row in per_kv.reshape(-1, per_kv.shape[-1]))
        rows += t.shape[0] * HKV * u
    assert got_stats["h2d_bytes"] == rows * 2 * D * 4


def test_offload_moves_a_budget_sized_share_of_whole_layer_offload():
    """At 1/16 of a 252-token cache (floor 1 + 2 + 16 = 19 tokens; sparse from the first step), bytes moved host ->
    device per step are <= 1/10 of moving every layer's K/V."""
    model = tiny("llama")
    ids = torch.randint(3, 128, (1, 250), generator=torch.Generator().manual_seed(3))
    with compiled(model, offload=True, budget=1 / 16, gqa="group", dense_layers=(), min_length=0,
                  **OPTS_NO_BUDGET) as rt:
        generate(model, ids, 3, "static")
    s = 252  # cache length at the last fetch (prompt + 2 generated tokens fed back)
    whole_layer = LAYERS * 2 * HKV * s * D * 4
    per_step = rt.stats["h2d_bytes"] / 2
    kept = 19  # the fraction's floor: sink 1 + recent 2 + 16 (1/16 of 252 is 16)
    # per layer and KV head, a union of at most G * kept rows (group: exactly kept) of K and V, fp32
    assert LAYERS * HKV * kept * 2 * D * 4 <= per_step <= whole_layer / 10, (per_step, whole_layer)
    assert per_step == LAYERS * HKV * kept * 2 * D * 4  # gqa="group": one selection per KV head


def test_host_store_grows_with_a_dynamic_cache_and_is_rebuilt_when_out_of_sync():
    model = tiny("llama")
    ids = torch.randint(3, 128, (1, 20), generator=torch.Generator().manual_seed(4))
    with compiled(model, offload=True, **OPTS):
        ref = generate(model, ids, 70, "dynamic")  # grows past the initial capacity (64)
        out = generate(model, ids, 70, "dynamic")
    assert out.sequences.tolist() == ref.sequences.tolist()
    with compiled(model, gqa="group", **OPTS):  # offload's default selection, on the device
        dev = generate(model, ids, 70, "dynamic")
    assert dev.sequences.tolist() == ref.sequences.tolist()


def test_fetch_moves_each_row_once_per_kv_head():
    k = torch.randn(2, 2, 10, 4)
    v = torch.randn(2, 2, 10, 4)
    host = offload.HostKV(k, v, 16, Counter())
    host.write(torch.arange(10), k, v)
    idx = torch.tensor([[[3, 0, -1], [9, 9, 1], [2, 4, 6], [-1, -1, 5]]] * 2)  # [B=2, Hsel=4 (G=2), K=3]
    host.stats.clear()
    ks, vs, rows = host.fetch(idx, torch.device("cpu"))
    assert rows[0].tolist() == [[-1, 0, 1, 3, 9], [-1, 2, 4, 5, 6]]  # the union of each group's selections
    assert host.stats["h2d_bytes"] == 2 * 2 * 5 * 4 * 4 * 2
    slots = offload.block_slots(idx[:, :, None], rows)[:, :, 0]
    for b in range(2):
        for h in range(4):
            for j in range(3):
                pos = int(idx[b, h, j])
                assert (int(slots[b, h, j]) == -1) == (pos == -1)
                if pos >= 0:
                    s = int(slots[b, h, j])
                    assert torch.equal(ks[b, h // 2, s], k[b, h // 2, pos])
                    assert torch.equal(vs[b, h // 2, s], v[b, h // 2, pos])


@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_offloaded_cache_holds_placeholders_not_rows(kind):
    """The device memory of offloaded layers is returned: their cache entries are one stored element with the
    cache's shape; dense layers keep their rows. A multi-token step over that cache reads the host rows."""
    import transformers as T

    model = tiny("llama")
    ids, mask = padded_batch()
    more = torch.randint(3, 128, (2, 3), generator=torch.Generator().manual_seed(6))
    runs = []
    for off in (False, True):
        with compiled(model, offload=off, gqa="group", **OPTS):
            cache = (T.DynamicCache(config=model.config) if kind == "dynamic" else
                     T.StaticCache(config=model.config, max_cache_len=64))
            out = generate(model, ids, 4, "dynamic", attention_mask=mask, past_key_values=cache)
            n = cache.get_seq_length()
            mask2 = torch.cat([mask, torch.ones(2, n - ids.shape[1] + 3, dtype=mask.dtype)], 1)
            with torch.no_grad():  # three tokens at once on top of the cache (Lq = 3: dense over all rows)
                step = model(input_ids=more, attention_mask=mask2, past_key_values=cache,
                             cache_position=torch.arange(n, n + 3))
        runs.append((out, step.logits, cache))
        torch._dynamo.reset()
    (ref, ref_step, dev_cache), (got, got_step, off_cache) = runs
    assert got.sequences.tolist() == ref.sequences.tolist()
    torch.testing.assert_close(got_step, ref_step, atol=1e-5, rtol=1e-5)
    for i, (a, b) in enumerate(zip(dev_cache.layers, off_cache.layers)):
        assert a.keys.shape == b.keys.shape and a.values.shape == b.values.shape
        if i == 0:  # the configured dense layer
            assert torch.equal(a.keys, b.keys)
        else:
            assert b.keys.untyped_storage().nbytes() == b.values.untyped_storage().nbytes() == 4  # one fp32
            assert a.keys.untyped_storage().nbytes() >= a.keys.numel() * 4


def test_static_buffers_allocated_before_compiling_stay_and_say_why():
    import transformers as T

    model = tiny("llama")
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(10))
    ref = generate(model, ids, 3, "static")
    cache = T.StaticCache(config=model.config, max_cache_len=32)
    cache.early_initialization(batch_size=1, num_heads=HKV, head_dim=D, dtype=torch.float32, device="cpu")
    with compiled(model, offload=True, budget=512, **OPTS_NO_BUDGET) as rt:
        out = generate(model, ids, 3, "dynamic", past_key_values=cache)
    assert out.sequences.tolist() == ref.sequences.tolist()
    assert all(layer.keys.untyped_storage().nbytes() == layer.keys.numel() * 4 for layer in cache.layers)
    reasons = {s.extra.get("device_cache") for rep in rt.reports for s in rep} - {None}
    assert reasons and all("existed before this graph ran" in r for r in reasons), reasons


def test_offloaded_dynamic_cache_changed_outside_the_model_is_refused():
    import transformers as T

    model = tiny("llama")
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(8))
    with compiled(model, offload=True, **OPTS):
        cache = T.DynamicCache(config=model.config)
        generate(model, ids, 3, "dynamic", past_key_values=cache)
        n = cache.get_seq_length()
        cache.layers[1].keys = cache.layers[1].keys.clone()  # e.g. a reorder: the chain to the host rows is lost
        cache.layers[1].values = cache.layers[1].values.clone()
        with pytest.raises(Exception, match="changed outside the compiled model"):
            with torch.no_grad():
                model(input_ids=ids[:, :1], past_key_values=cache, cache_position=torch.arange(n, n + 1))


def test_offload_selects_per_kv_group_unless_told_otherwise():
    from dsc.config import DSConfig

    assert DSConfig(offload=True).gqa == "group" and DSConfig().gqa == "group"
    assert DSConfig(offload=True, gqa="head").gqa == "head"


def test_offload_needs_a_channel_config_and_a_sparse_site():
    model = tiny("llama")
    ids = torch.randint(3, 128, (1, 8))
    with pytest.raises(Exception, match=r"offload .* needs a channel config"):
        with compiled(model, channels=None, offload=True):
            generate(model, ids, 2, "dynamic")
    torch._dynamo.reset()
    with pytest.raises(Exception, match=r"offload=True, but no attention site .* can be made sparse.*configured dense"):
        with compiled(model, offload=True, dense_layers=tuple(range(LAYERS))):
            generate(model, ids, 2, "dynamic")


@pytest.mark.parametrize("hsel", [2, 4])
def test_attend_equals_sparse_attention_with_an_additive_mask(hsel):
    gen = torch.Generator().manual_seed(5)
    b, s = 2, 12
    q, k, v = torch.randn(b, 4, 1, 8, generator=gen), torch.randn(b, 2, s, 8, generator=gen), torch.randn(
        b, 2, s, 8, generator=gen)
    idx = torch.stack([torch.randperm(s, generator=gen)[:5] for _ in range(b * hsel)]).view(b, hsel, 1, 5)
    idx[0, 0, 0, -1] = -1
    bias = torch.randn(b, 1, 1, s, generator=gen)
    host = offload.HostKV(k, v, s, Counter())
    host.write(torch.arange(s), k, v)
    got = offload.attend(host, q, k, v, idx, None, 0.3, bias)
    want = torch.ops.dsc.sparse_attention(q, k, v, idx, 0.3, bias)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_rows_written_this_step_are_taken_from_the_device_tensors():
    """On a GPU the host copy of this step's rows may still be in flight: they are overlaid from the device."""
    k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    stale_k, stale_v = torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)
    rows = torch.tensor([[[-1, 0, 5], [1, 2, 5]]])
    ks, vs = offload._overlay_new_rows(stale_k, stale_v, rows, torch.tensor([5]), k, v)
    for h in range(2):
        for j in range(3):
            fresh = int(rows[0, h, j]) == 5
            assert torch.equal(ks[0, h, j], k[0, h, 5] if fresh else stale_k[0, h, j])
            assert torch.equal(vs[0, h, j], v[0, h, 5] if fresh else stale_v[0, h, j])


def test_explain_says_what_is_offloaded():
    import dsc

    model = tiny("llama")
    ids = torch.randint(3, 128, (1, 8))
    rep = dsc.explain(model, {"input_ids": ids}, {"channels": None, "offload": True, "dense_layers": (0,)},
                      max_new_tokens=2)
    assert any("offload: the K/V of the" in n and "synchronous selection" in n for n in rep.notes), rep.notes
    rep = dsc.explain(model, {"input_ids": ids}, {"channels": None, "offload": True, "predict": True,
                                                  "dense_layers": (0,), "sync_layers": ()}, max_new_tokens=2)
    decode = [r for r in rep.graphs[-1] if r.sparse]
    assert [r.layer for r in decode] == [1, 2]
    assert "synchronous: the query path of layer 0 reads 0 hidden states" in decode[0].why  # layer 0 reads embeddings
    assert "predicted during layer 1" in decode[1].why


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_prediction_is_exact_at_full_budget_and_reports_overlap(cache):
    """With a budget above the length the predicted selection holds every earlier token and the current one comes
    from the device: decode equals dense; the prediction ran for the predictable layer only."""
    model = tiny("llama")
    ids, mask = padded_batch()
    ref = generate(model, ids, 4, cache, attention_mask=mask)
    with compiled(model, offload=True, predict=True, sync_layers=(), budget=512, measure_overlap=True) as rt:
        out = generate(model, ids, 4, cache, attention_mask=mask)
    assert out.sequences.tolist() == ref.sequences.tolist()
    for a, b in zip(ref.logits, out.logits):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    assert rt.stats["predictions"] == 3  # layer 2, each decode step after the first token
    assert rt.stats["overlap_hits"] == rt.stats["overlap_total"] > 0


def test_prediction_at_a_sparse_budget_and_sync_layers():
    model = tiny("llama")
    ids = torch.randint(3, 128, (1, 40), generator=torch.Generator().manual_seed(9))
    for sync, expect in (((), 5), ((2,), 0)):
        torch._dynamo.reset()
        with compiled(model, offload=True, predict=True, sync_layers=sync, measure_overlap=True, **OPTS) as rt:
            generate(model, ids, 6, "static")
        assert rt.stats["predictions"] == expect
        assert rt.stats["overlap_total"] == expect * len(ids) * HKV * (OPTS["budget"] - 1)  # own picks, current aside
        if expect:  # a binding budget (6 of 40+ tokens): the prediction misses some of the site's own picks
            assert 0 < rt.stats["overlap_hits"] < rt.stats["overlap_total"]


def test_predict_needs_offload():
    from dsc.config import DSConfig

    with pytest.raises(ValueError, match="predict=True needs offload=True"):
        DSConfig(predict=True)
