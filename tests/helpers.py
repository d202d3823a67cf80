"""Shared test helpers (plain functions, no fixtures): randomly initialised tiny HF decoders, greedy generation
that returns tokens and logits, and a comparison of two generations. Test modules import from here, never from
each other."""
from __future__ import annotations

import contextlib

import torch
import transformers as T

import dsc
from dsc.calibration.config import ChannelConfig
from dsc.kernels.testing import assert_valid_selection
from dsc.passes import site_op

HQ, HKV, HIDDEN = 4, 2, 64
D = HIDDEN // HQ


def tiny_decoder(config_cls, model_cls, layers: int, **overrides):
    """A tiny ``model_cls`` (eval mode, SDPA attention, seeded weights): 4 query / 2 KV heads of 16 channels."""
    cfg = config_cls(vocab_size=128, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=layers,
                     num_attention_heads=HQ, num_key_value_heads=HKV, max_position_embeddings=256,
                     bos_token_id=1, eos_token_id=2, **overrides)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return model_cls(cfg).eval()


def config_only(folder, vocab: int = 49152):
    """A folder holding only a small Llama's config.json (no checkpoint, no tokenizer), for ``--random-weights``."""
    T.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=1024).save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    return folder


def generate(model, ids, n: int, kind: str = "dynamic", **kw):
    """Exactly ``n`` greedy tokens with their logits; ``kind="static"`` asks HF for a static cache."""
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, return_dict_in_generate=True, output_logits=True,
              pad_token_id=0, **kw)
    if kind == "static":
        kw.setdefault("cache_implementation", "static")
    with torch.no_grad():
        return model.generate(ids, **kw)


def assert_same(ref, out, atol: float = 1e-4) -> None:
    """Same tokens, and logits equal within ``atol``."""
    assert ref.sequences.tolist() == out.sequences.tolist()
    assert len(ref.logits) == len(out.logits)
    for a, b in zip(ref.logits, out.logits):
        torch.testing.assert_close(b, a, atol=atol, rtol=1e-4)


@contextlib.contextmanager
def compiled(model, options: dict):
    """``model.forward`` compiled with the dsparse backend and ``options`` for the duration; restored after. Yields
    the compile's runtime (:class:`dsc.passes.runtime.Runtime`: its counters ``.stats``, site reports ``.reports``),
    which starts empty: nothing in it comes from another compile."""
    backend = dsc.sparse_backend(**options)
    model.forward = torch.compile(model.forward, backend=backend)
    try:
        yield backend.runtime
    finally:
        del model.forward


GEMMA3 = (T.Gemma3TextConfig, T.Gemma3ForCausalLM)
MISTRAL = (T.MistralConfig, T.MistralForCausalLM)
QWEN2 = (T.Qwen2Config, T.Qwen2ForCausalLM)


# ------------------------------------------------------------------------ tiny decoders of every architecture
LAYERS = 3  # tiny(): decoder layers
ARCHS = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, {}),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, {"sliding_window": None}),  # sliding: tests/test_hybrid.py
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, {}),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {"head_dim": D}),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM, {"head_dim": D, "layer_types": ["full_attention"] * LAYERS}),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, {"pad_token_id": 0}),
}


def tiny(arch: str = "llama", **overrides):
    cfg_cls, model_cls, extra = ARCHS[arch]
    cfg = cfg_cls(vocab_size=128, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                  num_attention_heads=HQ, num_key_value_heads=HKV, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, **{**extra, **overrides})
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return model_cls(cfg).eval()


CHANNELS = ChannelConfig.random(LAYERS, HQ, HKV, D, seed=1)


@contextlib.contextmanager
def compiled_tiny(model, **options):
    """``model.forward`` compiled with dsparse (eager inner unless given) for the duration; restored after. Yields
    the compile's runtime (its counters ``.stats``, its site reports ``.reports``)."""
    backend = dsc.sparse_backend(**{"channels": CHANNELS, "inner": "eager", "dense_layers": (0,), "r": 8, **options})
    model.forward = torch.compile(model.forward, backend=backend)
    try:
        yield backend.runtime
    finally:
        del model.forward


def left_pad(prompts):
    """``(ids, attention_mask)`` of 1-D prompts left-padded to the longest (pad id 0)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    return ids, mask


def sites_of(rt):
    """Every site decision of every graph the runtime ``rt`` compiled."""
    return [s for rep in rt.reports for s in rep]


# ------------------------------------------------------------------------ offload vs on-device decode
OFFLOAD_OPTS = dict(budget=6, sink=1, recent=2)


def padded_batch():
    gen = torch.Generator().manual_seed(11)
    return left_pad([torch.randint(3, 128, (n,), generator=gen) for n in (40, 27)])


def _oracle_scores(spec, q, entry, n, valid, group):
    """Label scores from the definition, in plain torch (16-bit labels): each query head's ``r`` calibrated channels
    dotted with the stored labels of its KV head; invalid positions ``-inf``. Per group: a position valid for every
    head of the group scores the largest over the heads of (its score - that head's best valid score)."""
    b, hq, lq, _ = q.shape
    chans = spec.label.channels.to(q.device)  # [Hkv, r]
    hkv = chans.shape[0]
    labels = entry.data[:, :, :n].float()  # [B, Hkv, n, r]
    g = hq // hkv
    scores = torch.stack([q[:, h].float()[..., chans[h // g]] @ labels[:, h // g].transpose(-1, -2)
                          for h in range(hq)], 1)  # [B, Hq, Lq, n]
    v = valid.expand(b, hq, lq, n) if valid is not None else torch.ones(b, hq, lq, n, dtype=torch.bool,
                                                                         device=q.device)
    if not group:
        return scores.masked_fill(~v, float("-inf"))
    v = v.reshape(b, hkv, g, lq, n).all(2, keepdim=True)  # [B, Hkv, 1, Lq, n]
    per = scores.view(b, hkv, g, lq, n).masked_fill(~v, float("-inf"))
    best = per.amax(-1, keepdim=True)
    best = torch.where(torch.isfinite(best), best, torch.zeros_like(best))
    return (per - best).amax(2)


def _record_selections(monkeypatch):
    """Selections of both paths: the offload path's own (each checked against scores computed from the definition
    by the independent oracle ``assert_valid_selection``), and the on-device kernel's (recomputed from its inputs)."""
    seen = []
    real_select, real_decode = site_op._select, site_op._ds_decode

    def select(spec, q, entry, n, valid, group):
        idx = real_select(spec, q, entry, n, valid, group)
        sel = spec.selection
        assert_valid_selection(_oracle_scores(spec, q, entry, n, valid, group).cpu(), idx.cpu(), sel.budget_tokens,
                               sel.budget_frac, sel.sink, sel.recent)
        seen.append(idx.clone())
        return idx

    def decode(q, k, v, channels, data, scale, zero, bits, valid, bias, lengths, budget, frac, sink, recent, group,
               sm_scale, planned=None, check_row=-1):
        out = real_decode(q, k, v, channels, data, scale, zero, bits, valid, bias, lengths, budget, frac, sink,
                          recent, group, sm_scale, planned, check_row)
        if out is not None:  # None: a planned step found stale labels; the general path decodes it
            scores = torch.ops.dsc.label_scores(q, channels, data, scale, zero, bits, valid, lengths, group)
            seen.append(torch.ops.dsc.select_topk(scores, budget, frac, sink, recent))
        return out

    monkeypatch.setattr(site_op, "_select", select)
    monkeypatch.setattr(site_op, "_ds_decode", decode)
    return seen


def decode_both_ways(model, ids, mask, cache, gqa, monkeypatch, atol=1e-5, options=None, **gen_kw):
    """Decode with and without offload (same ``OFFLOAD_OPTS`` + ``options`` otherwise) and assert the same tokens,
    logits and selections; returns (offload selections, on-device traffic, offload traffic)."""
    seen = _record_selections(monkeypatch)
    runs = []
    for off in (False, True):
        seen.clear()
        with compiled_tiny(model, offload=off, gqa=gqa, **OFFLOAD_OPTS, **(options or {})) as rt:
            out = generate(model, ids, 5, cache, attention_mask=mask, **gen_kw)
        runs.append((out, [t.cpu().clone() for t in seen], dict(rt.stats)))
        torch._dynamo.reset()
    (ref, ref_sel, ref_stats), (got, got_sel, got_stats) = runs
    assert got.sequences.tolist() == ref.sequences.tolist()
    for a, b in zip(ref.logits, got.logits):
        torch.testing.assert_close(b, a, atol=atol, rtol=atol)
    assert len(got_sel) == len(ref_sel) > 0
    for a, b in zip(ref_sel, got_sel):
        assert torch.equal(a, b)
    return got_sel, ref_stats, got_stats
