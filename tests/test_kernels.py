"""Double Sparsity ops: the reference and the fast CPU path against their contracts (DESIGN.md "Ops")."""
import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import dsc.kernels  # noqa: F401  (registers torch.ops.dsc)
from dsc.kernels import cpu as C
from dsc.kernels import reference as R
from dsc.kernels.testing import assert_ds_decode_matches_oracle, assert_valid_selection, dense_attention, make_case
from kernel_helpers import ONCE, TOL, cases, count_checks, with_formats

# ----------------------------------------------------------------------------------------------- label cache
@given(st.integers(0, 10**6), st.sampled_from([8, 4]), st.integers(1, 40), st.sampled_from([torch.float32,
                                                                                           torch.bfloat16]))
def test_quantized_labels_within_half_step(seed, bits, r, dtype):
    c = make_case(seed, 2, 2, 1, 1, 37, 64, min(r, 64), bits, dtype)
    exact = c.k.float().gather(-1, c.channels[None, :, None, :].expand(2, 2, 37, c.channels.shape[1]))
    back = R.dequantize(c.data, c.scale, c.zero, bits, c.channels.shape[1])
    step = c.scale[..., None]
    assert ((back - exact).abs() <= step / 2 + 1e-5 * exact.abs().amax()).all()
    assert torch.equal(c.zero, exact.amin(-1))
    assert torch.allclose(c.scale * ((1 << bits) - 1), exact.amax(-1) - exact.amin(-1), rtol=1e-6, atol=1e-6)


def test_constant_labels_have_zero_scale_and_codes():
    k = torch.ones(1, 1, 3, 8)
    ch = torch.tensor([[0, 2, 5]])
    for bits in (8, 4):
        data, sc, zp = R.alloc_labels(1, 1, 3, 3, bits)
        torch.ops.dsc.label_write(k, ch, torch.arange(3), data, sc, zp, bits)
        assert (sc == 0).all() and (zp == 1).all() and (data == 0).all()


def test_pack4_layout():
    codes = torch.tensor([[1, 2, 3, 4, 5]], dtype=torch.uint8)
    assert R.pack4(codes).tolist() == [[0x21, 0x43, 0x05]]
    assert torch.equal(R.unpack4(R.pack4(codes), 5), codes)


@given(st.integers(0, 10**6), st.sampled_from([16, 8, 4]), st.booleans())
def test_cpu_label_write_matches_reference_at_positions(seed, bits, batched_positions):
    gen = torch.Generator().manual_seed(seed)
    b, hkv, s, d, r, t = 2, 3, 29, 32, 9, 1 + seed % 5
    keys = torch.randn(b, hkv, t, d, generator=gen)
    ch = torch.stack([torch.randperm(d, generator=gen)[:r] for _ in range(hkv)])
    if batched_positions:
        pos = torch.stack([torch.randperm(s, generator=gen)[:t] for _ in range(b)])
    else:
        pos = torch.randperm(s, generator=gen)[:t]
    ref = R.alloc_labels(b, hkv, s, r, bits)
    got = R.alloc_labels(b, hkv, s, r, bits)
    R.label_write(keys, ch, pos, *ref, bits)
    torch.ops.dsc.label_write(keys, ch, pos, *got, bits)
    for x, y in zip(ref, got):
        assert torch.equal(x, y)


# ----------------------------------------------------------------------------------------------- properties
@given(cases())
@with_formats(s=61)
def test_cpu_path_matches_reference(case):
    p, sel = case
    c = make_case(**p)
    tol = TOL[p["dtype"]]
    group = sel["group"]
    ref_sc = R.label_scores(c.q, *c.labels, c.valid, c.lengths, group)
    got_sc = C.label_scores(c.q, *c.labels, c.valid, c.lengths, group)
    assert torch.equal(torch.isinf(ref_sc), torch.isinf(got_sc))
    fin = torch.isfinite(ref_sc)
    assert torch.allclose(ref_sc[fin], got_sc[fin], rtol=1e-4, atol=1e-4 * (1 + ref_sc[fin].abs().max().item()))
    args = (sel["budget"], sel["frac"], sel["sink"], sel["recent"])
    idx = C.select_topk(ref_sc, *args)
    assert_valid_selection(ref_sc, idx, *args)
    ref_o = R.sparse_attention(c.q, c.k, c.v, idx, p["d"] ** -0.5, c.bias)
    got_o = C.sparse_attention(c.q, c.k, c.v, idx, p["d"] ** -0.5, c.bias)
    assert got_o.dtype == c.q.dtype and got_o.shape == c.q.shape
    assert torch.allclose(ref_o.float(), got_o.float(), atol=tol, rtol=tol)
    # the composed op == the definition, from the oracle's own scores and selection (near-tie rows left out)
    for out in (C.ds_decode(c.q, c.k, c.v, *c.labels, c.valid, c.bias, c.lengths, *args, group, None),
                torch.ops.dsc.ds_decode(c.q, c.k, c.v, *c.labels, c.valid, c.bias, c.lengths, *args, group, None)):
        assert_ds_decode_matches_oracle(out, c, *args, group, None, tol)


@given(cases(max_s=600))
@with_formats(s=45)
def test_budget_covering_all_valid_rows_equals_dense_sdpa(case):
    p, sel = case
    if sel["group"] and p["valid"] == "per_head":
        p["valid"] = "shared"  # group mode selects a group's common valid set; per-head masks need per-head mode
    c = make_case(**p)
    budget = p["s"] + sel["budget"]
    dense = dense_attention(c.q, c.k, c.v, c.valid, c.lengths, c.bias)
    tol = TOL[p["dtype"]]
    for impl in (R, C):
        out = impl.ds_decode(c.q, c.k, c.v, *c.labels, c.valid, c.bias, c.lengths, budget, 0.0, sel["sink"],
                             sel["recent"], sel["group"], None)
        assert torch.allclose(out.float(), dense.float(), atol=tol, rtol=tol), impl.__name__


@given(cases(max_s=300, dtypes=(torch.float32,)))
def test_selected_indices_are_never_masked(case):
    p, sel = case
    c = make_case(**p)
    args = (sel["budget"], sel["frac"], sel["sink"], sel["recent"])
    group = sel["group"]
    sc = torch.ops.dsc.label_scores(c.q, *c.labels, c.valid, c.lengths, group)
    idx = torch.ops.dsc.select_topk(sc, *args)
    assert_valid_selection(sc, idx, *args)
    b, hq, lq, s = c.q.shape[0], c.q.shape[1], c.q.shape[2], c.k.shape[2]
    m = R.valid_mask(c.valid, c.lengths, b, hq, lq, s, c.q.device)
    if group:
        m = m.view(b, sc.shape[1], -1, lq, s).all(2)
    used = idx >= 0
    assert m.gather(-1, idx.clamp(min=0))[used].all()


@given(cases(max_s=500, dtypes=(torch.float32,)))
def test_quantized_score_error_within_step_bound(case):
    p, sel = case
    if p["bits"] == 16:
        p["bits"] = 4
    c = make_case(**p)
    exact_c = make_case(**{**p, "bits": 16})
    group = sel["group"]
    got = C.label_scores(c.q, *c.labels, None, None, group)
    exact = R.label_scores(exact_c.q, *exact_c.labels, None, None, group)
    b, hq, lq, d = c.q.shape
    hkv, r = c.channels.shape
    qc = c.q.view(b, hkv, hq // hkv, lq, d).gather(-1, c.channels[None, :, None, None, :].expand(
        b, hkv, hq // hkv, lq, r)).abs().sum(-1)  # [B, Hkv, G, Lq]: sum_c |q_c|
    if group:  # max over heads of (score - the head's best): each head's error at j plus its error at its best
        per_head = qc[..., None] * c.scale[:, :, None, None, :] / 2  # [B, Hkv, G, Lq, S]
        bound = (per_head + per_head.amax(-1, keepdim=True)).amax(2)
    else:
        bound = (qc[..., None] * c.scale[:, :, None, None, :] / 2).reshape(b, hq, lq, -1)
    assert ((got - exact).abs() <= bound * (1 + 1e-4) + 1e-4).all()


@pytest.mark.parametrize("group", [True, False])
def test_sink_and_recent_forced_inside_budget(group):
    c = make_case(3, 1, 2, 2, 1, 50, 32, 8, 16, lengths=True)
    c.lengths[:] = 40
    sc = C.label_scores(c.q, *c.labels, None, c.lengths, group)
    idx = C.select_topk(sc, 10, 0.0, 4, 3)
    for row in idx.reshape(-1, 10).tolist():
        assert {0, 1, 2, 3, 37, 38, 39} <= set(row) and max(row) < 40
    idx = C.select_topk(sc, 5, 0.0, 4, 3)  # recent tokens (the current one first) win when forced ones overflow
    assert all(set(row) == {0, 1, 37, 38, 39} for row in idx.reshape(-1, 5).tolist())
    idx = C.select_topk(sc, 2, 0.0, 4, 3)
    assert all(set(row) == {38, 39} for row in idx.reshape(-1, 2).tolist())


def test_frac_budget_counts_valid_positions():
    sc = torch.randn(1, 1, 1, 100)
    sc[..., 30:] = float("-inf")
    idx = torch.ops.dsc.select_topk(sc, 1, 0.1, 0, 0)
    assert idx.shape[-1] == 10 and int((idx >= 0).sum()) == 3


def test_frac_budget_has_a_floor():
    """A fraction never keeps fewer than its floor (the kernels' ``budget``): a short row is not left to its forced
    sink/recent tokens alone (1/16 of 64 tokens would be 4 slots, all sinks, without the current token)."""
    sc = torch.randn(1, 1, 1, 64)
    for impl in (R, C):
        idx = impl.select_topk(sc.clone(), 36, 1 / 16, 4, 16)
        chosen = set(idx[idx >= 0].tolist())
        assert len(chosen) == 36 and 63 in chosen and set(range(48, 64)) <= chosen and set(range(4)) <= chosen
        idx = impl.select_topk(sc.clone(), 36, 1 / 16, 4, 16)
        assert idx.shape[-1] == 36


@given(s=st.integers(1, 300), budget=st.integers(1, 40), frac=st.sampled_from([0.0, 1 / 16, 1 / 8, 1.0]),
       sink=st.integers(0, 8), recent=st.integers(1, 20), seed=st.integers(0, 2**16))
@example(s=40, budget=36, frac=1 / 16, sink=4, recent=16, seed=0)   # the README's defaults on a short prompt
@example(s=5, budget=2, frac=0.0, sink=4, recent=3, seed=1)         # forced tokens overflow the budget
@example(s=300, budget=1, frac=1 / 16, sink=8, recent=1, seed=2)    # sinks would fill every slot before
def test_current_token_always_selected(s, budget, frac, sink, recent, seed):
    """With ``recent >= 1`` the newest valid position (the current token at a causal decode step) is always kept,
    whatever the budget and sinks, in every implementation."""
    gen = torch.Generator().manual_seed(seed)
    sc = torch.randn(2, 2, 1, s, generator=gen)
    sc[0, :, :, s // 2 + 1:] = float("-inf")  # row 0: the newest valid position is in the middle
    for impl in (R, C):
        idx = impl.select_topk(sc.clone(), budget, frac, sink, recent)
        assert_valid_selection(sc, idx, budget, frac, sink, recent)
        for row, last in ((0, s // 2), (1, s - 1)):
            assert (idx[row] == last).any(-1).all()


def test_nan_propagates_like_dense():
    """A NaN query gives NaN attention, as dense SDPA does; it is never turned into a finite answer."""
    c = make_case(2, 1, 2, 2, 1, 64, 32, 8, 16)
    q = c.q.clone()
    q[:, 0] = float("nan")
    dense = dense_attention(q, c.k, c.v)
    assert dense[:, 0].isnan().all() and not dense[:, 1:].isnan().any()
    for impl in (R, C):
        for group in (True, False):
            out = impl.ds_decode(q, c.k, c.v, *c.labels, None, None, None, 8, 0.0, 1, 2, group, None)
            assert out[:, 0].isnan().all(), (impl.__name__, group)
            if not group:  # per-head selection: the other heads are unaffected
                assert not out[:, 1:].isnan().any()


def test_empty_rows_give_zero_output():
    c = make_case(1, 1, 1, 2, 1, 20, 32, 4, 16)
    idx = torch.full((1, 1, 1, 5), -1)
    for impl in (R, C):
        assert torch.equal(impl.sparse_attention(c.q, c.k, c.v, idx, 0.2), torch.zeros_like(c.q))


def test_hf_layout_strides():
    """HF hands SDPA a transposed (non-contiguous) q and may hand sliced K/V; results must not depend on strides."""
    c = make_case(8, 2, 2, 3, 2, 90, 64, 16, 4, valid="shared", lengths=True)
    q = c.q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, Hq, Lq, D] view of a [B, Lq, Hq, D] buffer
    big_k = torch.zeros(2, 2, 120, 64)
    big_v = torch.zeros(2, 2, 120, 64)
    big_k[:, :, :90] = c.k
    big_v[:, :, :90] = c.v
    k, v = big_k[:, :, :90], big_v[:, :, :90]  # a static cache's prefix: not contiguous
    assert not q.is_contiguous() and not k.is_contiguous()
    for group in (True, False):
        args = (c.channels, c.data, c.scale, c.zero, 4, c.valid, None, c.lengths, 12, 0.0, 1, 2, group, None)
        assert torch.allclose(torch.ops.dsc.ds_decode(q, k, v, *args), R.ds_decode(c.q, c.k, c.v, *args),
                              atol=1e-5)


def test_cpu_gather_does_not_repeat_or_copy_the_cache():
    """The CPU path gathers rows by index: an element of K/V outside the selection can be NaN without effect."""
    c = make_case(5, 1, 2, 4, 1, 300, 64, 16, 8)
    idx = torch.ops.dsc.select_topk(C.label_scores(c.q, *c.labels, None, None, True), 20)
    k, v = c.k.clone(), c.v.clone()
    chosen = torch.zeros(1, 2, 300, dtype=torch.bool).scatter_(-1, idx[:, :, 0], True)
    k[~chosen] = float("nan")
    v[~chosen] = float("nan")
    out = torch.ops.dsc.ds_decode(c.q, k, v, *c.labels, None, None, None, 20, 0.0, 0, 0, True, None)
    assert torch.isfinite(out).all()
    assert torch.allclose(out, R.sparse_attention(c.q, c.k, c.v, idx, 64 ** -0.5), atol=1e-5)


# ----------------------------------------------------------------------------------------------- chunked scoring
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_chunked_cpu_scores_match_reference(bits):
    c = make_case(0, 2, 2, 3, 2, 1000, 64, 13, bits, torch.bfloat16, lengths=True)
    assert C._chunk_tokens(2 * 2, 13, 1) == 256  # 256-token chunks: several full ones and a partial last one
    for group in (True, False):
        ref = R.label_scores(c.q, *c.labels, None, c.lengths, group)
        got = C._masked_scores(c.q, *c.labels, None, c.lengths, group, chunk_elements=1)
        assert torch.equal(torch.isinf(ref), torch.isinf(got))
        fin = torch.isfinite(ref)
        assert torch.allclose(ref[fin], got[fin], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------- op plumbing
def _op_samples():
    c = make_case(7, 2, 2, 2, 2, 33, 32, 5, 4, valid="shared", bias=True, lengths=True)
    sc = R.label_scores(c.q, *c.labels, c.valid, c.lengths, True)
    idx = R.select_topk(sc, 6, 0.0, 1, 1)
    keys = torch.randn(2, 2, 3, 32)
    fresh = R.alloc_labels(2, 2, 33, 5, 4)
    rows = torch.randn(2, 2, 3, 32)
    return {
        "write_rows": (rows, torch.tensor([[4, 9, 30], [0, 1, 2]]), torch.zeros(2, 2, 33, 32)),
        "sparse_attention_host": (c.q, c.k, c.v, idx, 0.17, c.bias),
        "label_write": (keys, c.channels, torch.tensor([4, 9, 30]), *fresh, 4),
        "label_scores": (c.q, *c.labels, c.valid, c.lengths, False),
        "select_topk": (sc, 6, 0.0, 1, 1),
        "sparse_attention": (c.q, c.k, c.v, idx, 0.17, c.bias),
        "ds_decode": (c.q, c.k, c.v, *c.labels, c.valid, c.bias, c.lengths, 6, 0.0, 1, 1, True, 0.17),
        "dense_attention": (torch.randn(2, 4, 1, 32), c.k, c.v, torch.randn(2, 1, 1, 33), False, 0.17),
    }


def _attention_by_definition(q, k, v, mask, is_causal, scale):
    """softmax(q k^T * scale + mask) v in fp64, query head h reading KV head h // G (K/V repeated explicitly)."""
    g = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    logits = q.double() @ kk.transpose(-1, -2) * scale
    if is_causal:
        lq, s = logits.shape[-2:]
        logits = logits.masked_fill(torch.ones(lq, s, dtype=torch.bool).tril().logical_not(), float("-inf"))
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.double()
    return logits.softmax(-1) @ vv


@pytest.mark.parametrize("mask", ["none", "bool shared", "float per head", "float per batch"])
@pytest.mark.parametrize("lq,is_causal", [(1, False), (5, False), (5, True)])
@pytest.mark.parametrize("hq,hkv", [(9, 3), (4, 4)])
def test_dense_attention_matches_definition(mask, lq, is_causal, hq, hkv):
    """``dsc::dense_attention`` over KV-native K/V (the CPU kernel packs a group's query heads at decode) equals
    attention computed from its definition, for every mask layout a decoder passes."""
    gen = torch.Generator().manual_seed(hq * 10 + lq)
    b, s, d = 2, 37, 16
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for h, n in ((hq, lq), (hkv, s), (hkv, s)))
    m = {"none": None,
         "bool shared": torch.rand(b, 1, lq, s, generator=gen) > 0.3,
         "float per head": torch.randn(b, hq, lq, s, generator=gen),
         "float per batch": torch.randn(b, 1, 1, s, generator=gen)}[mask]
    if m is not None and m.dtype == torch.bool:
        m[..., 0] = True  # no fully masked row (SDPA gives NaN there, the definition too)
    out = torch.ops.dsc.dense_attention(q, k, v, m, is_causal, 0.3)
    torch.testing.assert_close(out.double(), _attention_by_definition(q, k, v, m, is_causal, 0.3), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("name", ["label_write", "label_scores", "select_topk", "sparse_attention", "ds_decode",
                                  "dense_attention", "write_rows", "sparse_attention_host"])
def test_opcheck(name):
    torch.library.opcheck(getattr(torch.ops.dsc, name).default, _op_samples()[name])


def test_cpu_tensors_dispatch_to_the_cpu_kernels(monkeypatch):
    """On CPU tensors the dispatcher runs the CPU path (registered per device), never the reference (the default
    body, for devices without a kernel of their own); the offload ops have no CPU kernel and run the reference."""
    samples = _op_samples()
    want = {name: R.__dict__[name](*(a.clone() if isinstance(a, torch.Tensor) else a for a in args))
            for name, args in samples.items() if name not in ("label_write", "write_rows")}

    def boom(*a, **k):
        raise AssertionError("the reference ran")

    for name in ("label_write", "label_scores", "select_topk", "sparse_attention", "ds_decode", "dense_attention"):
        monkeypatch.setattr(R, name, boom)
    for name, args in samples.items():
        out = getattr(torch.ops.dsc, name)(*args)
        if name == "select_topk":  # the contract fixes the selected set, not the slot order
            out, want[name] = out.sort(-1).values, want[name].sort(-1).values
        if name in want:
            torch.testing.assert_close(out, want[name], atol=1e-5, rtol=1e-5)
    monkeypatch.setattr(R, "write_rows", boom)
    with pytest.raises(AssertionError, match="reference ran"):
        torch.ops.dsc.write_rows(*samples["write_rows"])




@pytest.mark.parametrize("impl", ["reference", "cpu", "op"])
def test_ds_decode_validates_its_arguments_once(impl, monkeypatch):
    c = make_case(3, 1, 2, 2, 1, 40, 32, 8, 8, lengths=True)
    fn = {"reference": R.ds_decode, "cpu": C.ds_decode, "op": torch.ops.dsc.ds_decode}[impl]
    calls = count_checks(monkeypatch)
    fn(c.q, c.k, c.v, *c.labels, None, None, c.lengths, 8, 0.0, 1, 1, True, None)
    assert calls == ONCE


def test_importing_the_ops_does_not_import_triton():
    """The modules ``import dsc.kernels`` loads import no Triton at module level (a machine without a GPU or
    a working Triton can register and run the ops); the CUDA kernels import it on their first call."""
    import ast
    import sys
    from pathlib import Path

    from dsc.kernels import ops

    loaded = {m for m in sys.modules if m.startswith("dsc.kernels.") and m not in ("dsc.kernels.triton_ops",
                                                                                  "dsc.kernels.triton_kernels",
                                                                                  "dsc.kernels.triton_paged")}
    assert {"dsc.kernels.ops", "dsc.kernels.cpu", "dsc.kernels.reference", "dsc.kernels.paged"} <= loaded
    for name in loaded:
        tree = ast.parse(Path(sys.modules[name].__file__).read_text())
        for node in tree.body:  # module level only
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any("triton" in n for n in names), (name, ast.unparse(node))
    lazy = ops._triton("no_such_module", "f")  # resolved on the first call, not when registered
    with pytest.raises(ModuleNotFoundError):
        lazy()


def test_ops_under_torch_compile_fullgraph():
    c = make_case(11, 1, 3, 3, 1, 64, 64, 16, 4, lengths=True)
    data, sc, zp = R.alloc_labels(1, 3, 64, 16, 4)

    def step(k_new, pos, q, k, v, data, sc, zp):
        torch.ops.dsc.label_write(k_new, c.channels, pos, data, sc, zp, 4)
        return torch.ops.dsc.ds_decode(q, k, v, c.channels, data, sc, zp, 4, None, None, c.lengths, 8, 0.0, 1, 2,
                                       True, None)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    out = compiled(c.k, torch.arange(64), c.q, c.k, c.v, data, sc, zp)
    assert torch.equal(data, c.data) and torch.equal(sc, c.scale)
    assert torch.allclose(out, step(c.k, torch.arange(64), c.q, c.k, c.v, *R.alloc_labels(1, 3, 64, 16, 4)),
                          atol=1e-6)


# ----------------------------------------------------------------------------------------------- bad input
def _bad_inputs():
    c = make_case(2, 1, 2, 2, 1, 16, 32, 4, 8)
    q, k, v = c.q, c.k, c.v
    lab = c.labels
    ch_bad = c.channels.clone()
    ch_bad[0, 0] = 32
    yield "q", lambda: torch.ops.dsc.label_scores(q[0], *lab, None, None, True)
    yield "q", lambda: C.ds_decode(torch.randn(1, 3, 1, 32), k, v, *lab)
    yield "channels", lambda: C.label_scores(q, ch_bad, *lab[1:])
    yield "channels", lambda: C.label_scores(q, c.channels[:1], *lab[1:])
    yield "budget", lambda: torch.ops.dsc.ds_decode(q, k, v, *lab, None, None, None, 0)
    yield "budget", lambda: C.select_topk(torch.zeros(1, 1, 1, 4), -3)
    yield "frac", lambda: C.select_topk(torch.zeros(1, 1, 1, 4), 2, 1.5)
    yield "k", lambda: C.ds_decode(q, k.to("meta"), v, *lab)
    yield "v", lambda: C.sparse_attention(q, k, v[:, :1], torch.zeros(1, 2, 1, 3, dtype=torch.long), 0.1)
    yield "bits", lambda: C.label_scores(q, *lab[:-1], 5)
    yield "data", lambda: C.label_scores(q, c.channels, c.data[:, :, :, :2], c.scale, c.zero, 8)
    yield "scale", lambda: C.label_scores(q, c.channels, c.data, c.scale[:, :1], c.zero, 8)
    yield "valid", lambda: C.label_scores(q, *lab, torch.ones(1, 1, 1, 5, dtype=torch.bool))
    yield "lengths", lambda: C.label_scores(q, *lab, None, torch.tensor([3, 4]))
    yield "idx", lambda: C.sparse_attention(q, k, v, torch.full((1, 2, 1, 3), 16), 0.1)
    yield "positions", lambda: C.label_write(k, c.channels, torch.arange(16) + 1, *R.alloc_labels(1, 2, 16, 4, 8),
                                             8)
    yield "sm_scale", lambda: C.sparse_attention(q, k, v, torch.zeros(1, 2, 1, 3, dtype=torch.long), -1.0)


@pytest.mark.parametrize("name,call", list(_bad_inputs()), ids=[n for n, _ in _bad_inputs()])
def test_bad_input_raises_value_error_naming_argument(name, call):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        call()


def test_alloc_labels_shapes():
    d, s, z = dsc.kernels.alloc_labels(2, 3, 10, 7, 4, torch.bfloat16, "cpu")
    assert d.shape == (2, 3, 10, 4) and d.dtype == torch.uint8 and s.shape == (2, 3, 10)
    d, s, z = dsc.kernels.alloc_labels(2, 3, 10, 7, 16, torch.bfloat16, "cpu")
    assert d.shape == (2, 3, 10, 7) and d.dtype == torch.bfloat16 and s.shape == (0,) and z.shape == (0,)


# ----------------------------------------------------------------------------------------------- bench command
def test_byte_limit_formula():
    from dsc.bench.attention import label_channels
    from dsc.bytes import byte_limit, ds_bytes, kv_bytes, label_bytes

    assert byte_limit(64, 2, 16, 4, 1 / 16) == (256, 32.0, 8.0)  # 8 B codes + 8 B scale/zero + 16 B of rows
    assert byte_limit(128, 2, 8, 16, 1 / 16)[2] == 512 / (16 + 32)  # native bf16 labels: r * e bytes
    assert [label_bytes(7, bits, 2) for bits in (16, 8, 4)] == [14, 7 + 8, 4 + 8]  # odd r at 4 bits: a padded byte
    assert kv_bytes(80, 4) == 640 and ds_bytes(80, 4, 20, 8, 0.25) == 28 + 160
    with pytest.raises(ValueError, match="bits"):
        label_bytes(8, 2, 2)
    assert label_channels("D/4", 128) == 32 and label_channels("12", 64) == 12
    with pytest.raises(ValueError, match="--label-channels"):
        label_channels("D/0x", 64)


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_label_bytes_are_the_label_cache_bytes(bits):
    """The byte model counts what the label cache really holds per (token, KV head)."""
    from dsc.bytes import label_bytes

    for r, dtype in ((7, torch.bfloat16), (16, torch.float32)):
        data, scale, zero = R.alloc_labels(1, 1, 1, r, bits, dtype)
        held = sum(t.numel() * t.element_size() for t in (data, scale, zero))
        assert label_bytes(r, bits, torch.finfo(dtype).bits // 8) == held


def test_offload_device_bytes():
    from dsc.bytes import offload_device_bytes

    rep = offload_device_bytes(layers=4, sparse_layers=3, batch=2, kv_heads=2, sel_heads=6, length=100, head_dim=8,
                               itemsize=2, r=4, label_bits=4, budget_tokens=10)
    row = 2 * 8 * 2  # K + V of one (token, KV head)
    assert rep["full"] == 4 * 2 * 100 * 2 * row and rep["dense_layers"] == 1 * 2 * 100 * 2 * row
    assert rep["labels"] == 3 * 2 * 100 * 2 * (2 + 8) and rep["staging"] == 2 * 6 * 10 * row
    assert rep["offload"] == rep["dense_layers"] + rep["labels"] + rep["staging"] == rep["full"] - rep["saved"]
    assert rep["per_sequence_full"] * 2 == rep["full"]


def test_bench_attention_dense_candidates_agree():
    import torch

    from dsc.bench.attention import best_dense, dense_candidates

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 6, 1, 16, generator=gen), torch.randn(2, 2, 50, 16, generator=gen),
               torch.randn(2, 2, 50, 16, generator=gen))
    cands = dense_candidates(q, k, v, 0.25)
    expected = torch.repeat_interleave(k, 3, 1), torch.repeat_interleave(v, 3, 1)
    expected = torch.softmax(q @ expected[0].transpose(-1, -2) * 0.25, -1) @ expected[1]
    for name, fn in cands:
        torch.testing.assert_close(fn(), expected, atol=1e-5, rtol=1e-5, msg=name)
    best, times = best_dense(cands + [("broken", lambda: torch.ones(2).view(3))],
                             lambda fn, repeats, warmup: 1.0 if fn is cands[1][1] else 2.0, 1, 0)
    assert best == "packed-gqa" and set(times) == {n for n, _ in cands}  # the candidate that raised is skipped
    with pytest.raises(RuntimeError, match="wrong differs"):
        best_dense(cands + [("wrong", lambda: q)], lambda *a: 1.0, 1, 0)


def test_cpu_flush_covers_twice_the_last_level_cache(tmp_path, monkeypatch):
    from dsc.bench import common

    for index, size in (("index0", "48K"), ("index2", "2048K"), ("index3", "260M")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    assert common.last_level_cache_mb(tmp_path) == 260.0
    assert common.last_level_cache_mb(tmp_path / "none") is None
    monkeypatch.setattr(common, "last_level_cache_mb", lambda: 260.0)
    assert common.cpu_flush_mb() == 520.0
    monkeypatch.setattr(common, "last_level_cache_mb", lambda: 8.0)
    assert common.cpu_flush_mb() == 64.0  # small caches: at least 64 MB
    monkeypatch.setattr(common, "last_level_cache_mb", lambda: None)
    assert common.cpu_flush_mb() == 64.0


def test_bench_attention_command_runs(tmp_path):
    import json

    from dsc.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "attention", "--lengths", "300", "--batch", "1", "--shapes", "4x2x32", "--budgets",
                 "1/4", "--formats", "int4,native", "--repeats", "1", "--warmup", "0", "--no-progress",
                 "--flush-mb", "0", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["labels"] for r in rows] == ["int4", "native"]
    assert all(r["k"] == 75 and r["r"] == 8 and r["dense_ms"] > 0 and r["ds_ms"] > 0 and r["op_ms"] > 0
               for r in rows)
    names = {"sdpa-gqa", "packed-gqa", "matmul-softmax", "repeat-kv"}
    assert all(set(r["dense"]) == names and r["dense_ms"] == min(r["dense"].values()) == r["dense"][r["best_dense"]]
               and r["gqa_ms"] == r["dense"]["sdpa-gqa"] for r in rows)
    assert main(["bench", "attention", "--shapes", "4x3x32", "--repeats", "1"]) == 2  # Hq not a multiple of Hkv


def test_group_score_is_the_largest_head_score_below_its_best():
    """The group score from its definition, element by element: for each position, the largest over the group's
    heads of (its score - that head's best valid score in the row); invalid positions stay -inf, a NaN score stays
    NaN (valid, ranked first), a row with no valid position stays all -inf."""
    from dsc.kernels.reference import group_scores

    inf, nan = float("inf"), float("nan")
    per = torch.tensor([[[[[1.0, 2.0, -inf, 0.5]], [[4.0, -1.0, -inf, 0.0]]],
                         [[[nan, 1.0, 0.0, 2.0]], [[-inf] * 4]]]])  # [B=1, Hkv=2, G=2, Lq=1, S=4]
    got = group_scores(per)
    assert got.shape == (1, 2, 1, 4)
    for kv in range(2):
        for j in range(4):
            cands = []
            for h in range(2):
                row = per[0, kv, h, 0].tolist()
                if math.isnan(row[j]):
                    cands.append(nan)
                    continue
                finite = [x for x in row if not math.isnan(x) and x != -inf]
                if finite and not any(math.isnan(x) for x in row):
                    cands.append(row[j] - max(finite))
                elif finite:  # a row holding a NaN is left unnormalized
                    cands.append(row[j])
                else:
                    cands.append(-inf)
            want = nan if any(math.isnan(c) for c in cands) else max(cands)
            have = float(got[0, kv, 0, j])
            assert (math.isnan(want) and math.isnan(have)) or want == have, (kv, j, want, have)
