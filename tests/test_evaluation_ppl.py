"""The chunked policy evaluation attends exactly as token-by-token sparse decoding does.

The token-by-token reference here is independent of :mod:`dsc.evaluation.policies`' chunking: an eager decode
loop (HF DynamicCache) whose SDPA calls at decode steps go through the ``dsc::ds_decode`` op with a label cache
written one token at a time by ``dsc::label_write`` -- what the dsparse backend does at run time.
"""
from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dsc.calibration.config import ChannelConfig
from dsc.evaluation.policies import POLICIES, Policy, apply_policy, check_model, parse_budget
from dsc.generation import make_cache, text_ids
from dsc.sites import is_sdpa, layer_index, module_stack


@pytest.fixture(scope="module")
def cfg(model):
    nl, hq, hkv, d = check_model(model)
    return ChannelConfig.random(nl, hq, hkv, d, seed=1)


@pytest.fixture(scope="module")
def model64(model):
    """The model in float64: a full-sequence forward and a token-by-token one round differently (different matmul
    shapes, and BLAS blocking that depends on the thread count), and in fp32 that is enough to flip a near-tie in a
    top-k somewhere in 30 layers; in fp64 the two agree to ~1e-13, so a mismatch is a real difference."""
    import copy

    return copy.deepcopy(model).double()


@pytest.fixture(scope="module")
def ids(tokenizer):
    return text_ids(tokenizer, 48)[None]


class _StepwiseDS(TorchFunctionMode):
    """Dense prefill (writing labels), then every Lq == 1 SDPA call through ``dsc::ds_decode``."""

    def __init__(self, policy: Policy, stack: list[str]):
        super().__init__()
        self.p, self.stack, self.labels = policy, stack, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not is_sdpa(func):
            return func(*args, **kwargs)
        layer = layer_index(self.stack[-1])
        q, k, v = args[:3]
        if layer in self.p.dense_layers:
            return func(*args, **kwargs)
        b, hkv, s, d = k.shape
        p = self.p
        ch = p.channels.channels(layer, p.r)
        if layer not in self.labels:
            self.labels[layer] = _alloc(b, hkv, 512, p.r, p.label_bits, k.dtype)
        data, scale, zero = self.labels[layer]
        new = torch.arange(s - q.shape[2], s)
        torch.ops.dsc.label_write(k[:, :, new].contiguous(), ch, new, data, scale, zero, p.label_bits)
        if q.shape[2] > 1:  # prefill: dense
            return func(*args, **kwargs)
        sl = (lambda t: t[:, :, :s]) if p.label_bits != 16 else (lambda t: t)
        return torch.ops.dsc.ds_decode(
            q, k, v, ch, data[:, :, :s].contiguous(), sl(scale).contiguous(), sl(zero).contiguous(), p.label_bits,
            None, None, None, p.budget_tokens, p.budget_frac, p.sink, p.recent, p.gqa == "group", d ** -0.5)


def _alloc(b, hkv, s, r, bits, dtype):
    from dsc.kernels import alloc_labels

    return alloc_labels(b, hkv, s, r, bits, dtype=dtype)


@torch.no_grad()
def _teacher_forced(model, ids, prefill: int, step_ctx):
    """Logits of positions ``prefill-1 .. L-2`` from a prefill then one forward per token (DynamicCache)."""
    cache = make_cache(model, "dynamic", ids.shape[1])
    out = []
    with step_ctx:
        lg = model(input_ids=ids[:, :prefill], cache=cache, use_cache=True,
                   cache_position=torch.arange(prefill)).logits[:, -1]
        out.append(lg)
        for t in range(prefill, ids.shape[1] - 1):
            lg = model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True,
                       cache_position=torch.tensor([t])).logits[:, -1]
            out.append(lg)
    return torch.stack(out, 1)


@torch.no_grad()
def _dense(model, ids, prefill):
    return model(input_ids=ids, use_cache=False).logits[:, prefill - 1:-1]


@torch.no_grad()
def _chunked(model, ids, policy, prefill, chunk):
    with apply_policy(model, policy, prefill=prefill, chunk=chunk):
        return model(input_ids=ids, use_cache=False).logits[:, prefill - 1:-1]


@pytest.mark.parametrize("budget,bits,gqa,sink,recent", [(12, 16, "group", 0, 0), ("1/4", 4, "head", 2, 4)])
def test_chunked_equals_stepwise_ds_decode(model64, ids, cfg, budget, bits, gqa, sink, recent):
    model = model64
    p = Policy("dsparse", budget=budget, r=16, label_bits=bits, gqa=gqa, sink=sink, recent=recent,
               dense_layers=(0, 1), channels=cfg, min_length=0)  # sparse from the prefill on, as the oracle is
    prefill = 24
    chunked = _chunked(model, ids, p, prefill, chunk=10)
    with module_stack(model, keep=lambda name: layer_index(name) is not None) as stack:
        step = _teacher_forced(model, ids, prefill, _StepwiseDS(p, stack))
    assert (_dense(model, ids, prefill) - step).abs().max() > 1e-2  # the budget binds: sparse != dense
    torch.testing.assert_close(chunked, step, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", [n for n in POLICIES if n not in ("dense", "dsparse")])
def test_chunked_equals_own_stepwise(model, ids, cfg, name):
    """Each baseline: one full-window forward == prefill + decode steps through the same policy (Lq == 1 rows)."""
    p = Policy(name, budget=16, r=8, gqa="head" if name == "quest" else "group", sink=2, recent=4,
               dense_layers=(0,), page=4, channels=cfg)
    prefill = 20
    chunked = _chunked(model, ids, p, prefill, chunk=16)

    @contextmanager
    def policy_ctx():
        with apply_policy(model, p, prefill=prefill):
            yield

    step = _teacher_forced(model, ids, prefill, policy_ctx())
    assert (_dense(model, ids, prefill) - step).abs().max() > 1e-2
    torch.testing.assert_close(chunked, step, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("name", POLICIES)
def test_budget_covering_prefix_is_dense(model, ids, cfg, name):
    """With a budget >= every prefix, every policy is exact dense attention."""
    with torch.no_grad():
        ref = model(input_ids=ids[:, :40], use_cache=False).logits
        with apply_policy(model, Policy(name, budget=40, channels=cfg, dense_layers=()), chunk=16) as mode:
            out = model(input_ids=ids[:, :40], use_cache=False).logits
    # fp32 sums over the same rows in another order (the CPU top-k leaves the slot order free): 30 layers deep,
    # logits differ by up to ~1.4e-4
    torch.testing.assert_close(out, ref, atol=3e-4, rtol=1e-4)
    if name != "dense":
        assert mode.stats.fetched_frac() == 1.0 and mode.stats.rows == 30 * 40


def test_selection_never_reads_the_future(model, ids, cfg):
    """Changing later tokens never changes earlier logits under a sparse policy (causal prefix only)."""
    p = Policy("dsparse", budget="1/4", channels=cfg, label_bits=4)
    a = ids[:, :48].clone()
    b = a.clone()
    b[:, 30:] = torch.flip(b[:, 30:], [1])
    with torch.no_grad(), apply_policy(model, p, chunk=13):
        la = model(input_ids=a, use_cache=False).logits
        lb = model(input_ids=b, use_cache=False).logits
    torch.testing.assert_close(la[:, :30], lb[:, :30], atol=1e-4, rtol=1e-4)


def test_quest_takes_whole_pages():
    """Quest selects whole pages in score order; the page being filled counts with its tokens so far."""
    from dsc.evaluation.policies import LayerScorer

    torch.manual_seed(0)
    k = torch.randn(1, 1, 40, 8)
    q = torch.randn(1, 1, 1, 8)
    p = Policy("quest", budget=8, page=4, gqa="head", sink=0, recent=0)
    valid = torch.ones(1, 1, 1, 38, dtype=torch.bool)
    sc = LayerScorer(p, 0, k).scores(q, valid)
    idx = torch.ops.dsc.select_topk(sc, 8, 0.0, 0, 0)[0, 0, 0].sort().values
    pages = (idx // 4).unique()
    assert len(pages) == 2 and torch.equal(idx, torch.cat([torch.arange(4) + 4 * pg for pg in pages]))
    # expected page scores, by brute force over min/max
    want = []
    for pg in range(10):
        kk = k[0, 0, 4 * pg:min(4 * pg + 4, 38)]
        want.append(torch.maximum(q[0, 0, 0] * kk.min(0).values, q[0, 0, 0] * kk.max(0).values).sum())
    best = torch.stack(want).topk(2).indices.sort().values
    assert torch.equal(pages, best)


def test_parse_budget_and_errors():
    assert parse_budget("1/16") == 1 / 16 and parse_budget("128") == 128 and parse_budget(0.25) == 0.25
    for bad in ("0", "-3", "1.5", "abc"):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad)
    with pytest.raises(ValueError, match="policy"):
        Policy("h2o")
    with pytest.raises(ValueError, match="channel config"):
        Policy("dsparse")


def test_equal_bytes_budgets():
    d, g = 64, 3
    assert Policy("streaming", budget=8).for_bytes(1 / 8, d, g).budget == pytest.approx(1 / 8)
    assert Policy("oracle", budget=8).for_bytes(1 / 8, d, g) is None  # reading all of K costs 1/2
    q = Policy("quest", budget=8).for_bytes(1 / 8, d, g)
    assert q.budget == pytest.approx(1 / 8 - 1 / 16)


def test_cli_eval_ppl_policies(tmp_path, cfg):
    from dsc.cli import main

    path, cal = tmp_path / "p.json", tmp_path / "cfg.json"
    cfg.save(cal)
    assert main(["eval", "ppl", "--context", "96", "--windows", "1", "--policy", "dsparse,streaming",
                 "--budget", "16", "--calibration", str(cal), "--label-bits", "4", "--json", str(path)]) == 0
    res = json.loads(path.read_text())
    assert [r["policy"] for r in res] == ["dense", "dsparse", "streaming"]
    assert all(r["tokens"] == 95 for r in res)
    assert res[1]["ppl"] != res[0]["ppl"] and res[1]["fetched_frac"] < 1.0
    assert main(["eval", "ppl", "--policy", "h2o"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["dynamic"])
def test_chunked_equals_compiled_dsparse_backend(model, ids, cfg, cache):
    """The chunked evaluation == token-by-token decoding through ``torch.compile(backend="dsparse")``."""
    p = Policy("dsparse", budget=12, r=16, label_bits=4, gqa="group", sink=2, recent=3, dense_layers=(0, 1),
               channels=cfg)
    prefill = 24
    chunked = _chunked(model, ids, p, prefill, chunk=32)
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="dsparse", options=p.backend_options(inner="eager"))
    try:
        with torch._dynamo.config.patch(recompile_limit=64):
            step = _teacher_forced(model, ids, prefill, torch.no_grad())
    finally:
        del model.forward
        torch._dynamo.reset()
    assert (_dense(model, ids, prefill) - step).abs().max() > 1e-2
    torch.testing.assert_close(chunked, step, atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("masking", ["float", "bool"])
def test_mode_with_explicit_mask_matches_kernels(masking):
    """SDPA called with an explicit mask (padding + causal, as HF passes with a cache): the selection never takes
    a masked key, and the result equals select_topk + sparse_attention of dsc.kernels (float bias applied)."""
    from dsc.evaluation.policies import SparseSDPA
    from dsc.kernels import reference

    g = torch.Generator().manual_seed(0)
    b, hq, hkv, lq, s, d = 2, 4, 2, 5, 30, 8
    q, k, v = (torch.randn(b, h, n, d, generator=g) for h, n in ((hq, lq), (hkv, s), (hkv, s)))
    valid = torch.ones(b, 1, lq, s, dtype=torch.bool).tril(s - lq)
    valid[1, :, :, :3] = False  # left padding of the second sequence
    bias = torch.randn(b, 1, lq, s, generator=g) * 0.1
    mask = valid if masking == "bool" else torch.where(valid, bias, float("-inf"))
    p = Policy("oracle", budget=6, gqa="head", sink=1, recent=2, dense_layers=())
    with SparseSDPA(p, ["model.layers.3.self_attn"], num_kv_heads=hkv):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    sc = torch.einsum("bhld,bhsd->bhls", q, k.repeat_interleave(hq // hkv, 1)).masked_fill(~valid, float("-inf"))
    idx = reference.select_topk(sc, 6, 0.0, 1, 2)
    want = reference.sparse_attention(q, k, v, idx, d ** -0.5, None if masking == "bool" else
                                      bias.expand(b, hq, lq, s).contiguous())
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    with SparseSDPA(replace_budget(p, 64), ["model.layers.3.self_attn"], num_kv_heads=hkv):
        full = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(full, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                               atol=1e-5, rtol=1e-5)


def replace_budget(p, budget):
    from dataclasses import replace

    return replace(p, budget=budget)


# ---------------------------------------------------------------------------------- baselines vs their definition
def _attend_picked(q, k, v, pick):
    """Exact softmax attention of each (batch, query head, row) over the key positions ``pick(b, h, i)``."""
    b, hq, lq, d = q.shape
    g = hq // k.shape[1]
    out = torch.zeros_like(q)
    for bi in range(b):
        for h in range(hq):
            for i in range(lq):
                sel = torch.tensor(sorted(pick(bi, h, i)))
                kk, vv = k[bi, h // g, sel], v[bi, h // g, sel]
                out[bi, h, i] = torch.softmax(kk @ q[bi, h, i] * d ** -0.5, -1) @ vv
    return out


def _run_mode(p, q, k, v, chunk):
    from dsc.evaluation.policies import SparseSDPA

    with SparseSDPA(p, ["model.layers.3.self_attn"], chunk=chunk, num_kv_heads=k.shape[1]) as mode:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return out, mode


def _qkv(seed, b=2, hq=4, hkv=2, s=23, d=8):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g) * 2 for h in (hq, hkv, hkv)]


@pytest.mark.parametrize("gqa", ["head", "group"])
def test_streaming_llm_equals_its_definition(gqa):
    """StreamingLLM: row i (keys 0..i) attends the first ``sink`` tokens and the newest ``budget - sink`` ones
    (every token while i + 1 <= budget), written out here without the policy machinery."""
    q, k, v = _qkv(0)
    budget, sink = 7, 2
    p = Policy("streaming", budget=budget, sink=sink, recent=3, gqa=gqa, dense_layers=())
    out, _ = _run_mode(p, q, k, v, chunk=5)

    def pick(bi, h, i):
        n = i + 1
        return range(n) if n <= budget else [*range(sink), *range(n - (budget - sink), n)]

    torch.testing.assert_close(out, _attend_picked(q, k, v, pick), atol=1e-5, rtol=1e-5)
    assert (out - F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)).abs().max() > 1e-2


@pytest.mark.parametrize("gqa", ["head", "group"])
def test_sparq_equals_its_definition(gqa):
    """SparQ (no mean-value reallocation): per query (``group``: the KV group's summed query), the top-r channels
    by |q|; approximate scores from those channels of the full K; the top-k keys (after the forced sink oldest and
    recent newest); exact attention over them. Written out here without the policy machinery."""
    q, k, v = _qkv(1)
    budget, r, sink, recent = 8, 3, 1, 2
    p = Policy("sparq", budget=budget, r=r, sink=sink, recent=recent, gqa=gqa, dense_layers=())
    out, _ = _run_mode(p, q, k, v, chunk=6)
    g = q.shape[1] // k.shape[1]

    def pick(bi, h, i):
        n = i + 1
        if n <= budget:
            return range(n)
        kv = h // g
        qv = q[bi, kv * g:(kv + 1) * g, i].sum(0) if gqa == "group" else q[bi, h, i]
        ch = qv.abs().topk(r).indices
        approx = k[bi, kv, :n][:, ch] @ qv[ch]
        forced = {*range(sink), *range(n - recent, n)}
        rest = [j for j in approx.argsort(descending=True).tolist() if j not in forced]
        return [*forced, *rest[:budget - len(forced)]]

    torch.testing.assert_close(out, _attend_picked(q, k, v, pick), atol=1e-5, rtol=1e-5)
    assert (out - F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)).abs().max() > 1e-2


# ------------------------------------------------------------------------------------ the evaluation == the backend
def _tiny_llama(layers=4, hq=4, hkv=2, d=16, vocab=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hq * d, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=hq, num_key_value_heads=hkv, head_dim=d, max_position_embeddings=128,
                      rope_theta=1000.0, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # sharper attention than the random init's near-uniform one, so selection matters
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    return model


@pytest.mark.parametrize("cache,gqa,bits", [("static", "head", 16), ("dynamic", "group", 4)])
def test_dsparse_policy_equals_the_compiled_backend_on_a_tiny_model(cache, gqa, bits):
    """One Double Sparsity: the chunked dsparse evaluation (one forward per window) gives the logits of
    token-by-token decoding through ``torch.compile(backend="dsparse", options=policy.backend_options(...))``
    at a budget that binds."""
    model = _tiny_llama()
    nl, hq, hkv, d = check_model(model)
    chans = ChannelConfig.random(nl, hq, hkv, d, seed=3)
    p = Policy("dsparse", budget=6, r=4, label_bits=bits, gqa=gqa, sink=1, recent=2, dense_layers=(0,),
               channels=chans)
    ids = torch.randint(0, 64, (1, 36), generator=torch.Generator().manual_seed(0))
    chunked = _chunked(model, ids, p, 1, chunk=8)  # rows 0..L-2, each over its own causal prefix
    torch._dynamo.reset()
    forward = torch.compile(model.forward, backend="dsparse", options=p.backend_options(inner="eager"))
    steps = []
    try:
        with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=64):
            kv = make_cache(model, cache, ids.shape[1])
            for t in range(ids.shape[1] - 1):
                steps.append(forward(input_ids=ids[:, t:t + 1], cache=kv, use_cache=True,
                                     cache_position=torch.tensor([t])).logits[:, -1])
    finally:
        torch._dynamo.reset()
    step = torch.stack(steps, 1)
    assert (_dense(model, ids, 1) - step).abs().max() > 1e-2  # the budget binds: sparse != dense
    torch.testing.assert_close(chunked, step, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("gqa", ["head", "group"])
def test_kept_share_counts_every_row_alike(gqa):
    """Stats.kept_frac: the mean over rows (and selection heads) of the share of the row's tokens attended,
    dense rows (below dense_below) included at share 1, whichever chunk they fall in."""
    q, k, v = _qkv(2, b=1)
    p = Policy("streaming", budget="1/4", sink=1, recent=2, min_length=10, gqa=gqa, dense_layers=())
    _, mode = _run_mode(p, q, k, v, chunk=8)  # chunk 0: all dense; chunk 1: mixed; chunk 2: sparse
    n = torch.arange(1, q.shape[2] + 1)
    want = sum(p.tokens_kept(int(i)) / int(i) for i in n) / len(n)
    assert p.tokens_kept(23) < 23 and mode.stats.kept_frac() == pytest.approx(want)
