"""``dsc::paged_sparse_attention``: sparse attention over a paged KV cache (NHD pages, block table, lengths).

Oracles are built here from the definition, independently of the code under test: the request's contiguous
K/V ``[B, Hkv, S, D]`` is assembled token by token through the block table (a Python loop), then compared with
(a) ``reference.sparse_attention`` (the contiguous op's oracle) over the same slots with positions past each
request's length dropped, and (b) masked dense SDPA when the slots cover every token. Rows that no request holds
(spare pages, page tails past a length) and block-table padding are filled with NaN or garbage: they must never
matter. Triton runs under the interpreter (TRITON_INTERPRET=1, from conftest) on small shapes.
"""
import os

import pytest
import torch
from hypothesis import given, settings

import dsc.kernels  # noqa: F401  (registers torch.ops.dsc)
from dsc.kernels import paged as P
from dsc.kernels import reference as R
from dsc.kernels.testing import dense_attention
from kernel_helpers import TOL
from paged_helpers import DTYPES, example_params, make_paged, params, with_examples

triton_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def _impls():
    return {"reference": P.reference, "cpu": P.cpu, "op": torch.ops.dsc.paged_sparse_attention}


# ----------------------------------------------------------------------------------------------- CPU + reference
@given(params())
@with_examples
def test_paged_equals_contiguous_sparse_attention(p):
    c = make_paged(p)
    sm = p["d"] ** -0.5
    want = R.sparse_attention(c.q, c.kc, c.vc, c.live_idx, sm)
    tol = TOL[DTYPES[p["dtype"]]]
    for name, f in _impls().items():
        got = f(*c.args, sm)
        assert got.shape == c.q.shape and got.dtype == c.q.dtype and got.is_contiguous(), name
        assert torch.isfinite(got).all(), name  # NaN rows outside every request were never read
        assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol), name


@given(params())
@with_examples
def test_paged_selecting_every_token_equals_dense_sdpa(p):
    c = make_paged(dict(p, slots=max(p["slots"], max(p["lengths"]) + 3)), all_tokens=True)  # every token fits
    dense = dense_attention(c.q, c.kc, c.vc, lengths=c.lengths.long(), sm_scale=0.37)
    empty = c.lengths == 0  # no token: 0 by contract (dense SDPA has no answer)
    tol = TOL[DTYPES[p["dtype"]]]
    for name, f in _impls().items():
        got = f(*c.args, 0.37)
        assert torch.allclose(got[~empty].float(), dense[~empty].float(), atol=tol, rtol=tol), name
        assert (got[empty] == 0).all(), name


@given(params())
@with_examples
def test_rows_past_lengths_and_table_padding_never_matter(p):
    a = make_paged(p, garbage="nan", pad="minus1")
    b = make_paged(p, garbage="big", pad="big")
    assert torch.equal(a.q, b.q) and torch.equal(a.idx, b.idx) and torch.equal(a.kc, b.kc)
    for name, f in _impls().items():
        assert torch.equal(f(*a.args, 0.2), f(*b.args, 0.2)), name


def test_hnd_pool_view_and_no_slots():
    """An HND pool passed as ``transpose(1, 2)`` (non-contiguous) gives the NHD answer; K = 0 slots gives 0."""
    c = make_paged(example_params(11, 6, 2, 2, "fp32", True, [14, 30], 10))
    hnd_k = c.kp.transpose(1, 2).contiguous().transpose(1, 2)
    hnd_v = c.vp.transpose(1, 2).contiguous().transpose(1, 2)
    want = R.sparse_attention(c.q, c.kc, c.vc, c.live_idx, 0.1)
    for name, f in _impls().items():
        got = f(c.q, hnd_k, hnd_v, c.bt, c.lengths, c.idx, 0.1)
        assert torch.allclose(got, want, atol=2e-5, rtol=2e-5), name
        none = f(c.q, c.kp, c.vp, c.bt, c.lengths, c.idx[..., :0], 0.1)
        assert torch.equal(none, torch.zeros_like(c.q)), name


def test_paged_op_opcheck_and_fake():
    c = make_paged(example_params(12, 16, 2, 2, "fp32", False, [20, 3], 8))
    torch.library.opcheck(torch.ops.dsc.paged_sparse_attention.default, (*c.args, 0.125))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in c.args]
        out = torch.ops.dsc.paged_sparse_attention(*fake, 0.125)
    assert out.shape == c.q.shape and out.stride() == c.q.contiguous().stride() and out.dtype == c.q.dtype


@pytest.mark.parametrize("change, message", [
    (lambda c: dict(bt=c.bt.float()), "block_table: must be int32 or int64"),
    (lambda c: dict(bt=c.bt[:1]), "block_table: has shape"),
    (lambda c: dict(lengths=c.lengths + 10_000), "lengths: must lie in"),
    (lambda c: dict(lengths=c.lengths[:1]), "lengths: must be an int32/int64 tensor"),
    (lambda c: dict(idx=c.idx.int()), "idx: must be int64"),
    (lambda c: dict(idx=c.idx[:, :, :, :].repeat(1, 3, 1, 1)), "idx: has shape"),
    (lambda c: dict(idx=c.idx - 5), "idx: positions must be >= -1"),
    (lambda c: dict(kp=c.kp.half()), "k_pages: dtypes"),
    (lambda c: dict(vp=c.vp[:, :, :1]), "v_pages: shape"),
    (lambda c: dict(bt=torch.where(c.bt >= 0, c.bt + 1000, c.bt)), "block_table: pages holding"),
])
def test_paged_bad_arguments_are_clear_errors(change, message):
    c = make_paged(example_params(13, 6, 2, 1, "fp32", False, [14, 9], 8), pad="minus1")
    kw = dict(q=c.q, kp=c.kp, vp=c.vp, bt=c.bt, lengths=c.lengths, idx=c.idx)
    kw.update(change(c))
    for name, f in _impls().items():
        with pytest.raises(ValueError, match=message):
            f(kw["q"], kw["kp"], kw["vp"], kw["bt"], kw["lengths"], kw["idx"], 0.1)


# ----------------------------------------------------------------------------------------------- Triton (interpreter)
@triton_only
@settings(max_examples=3)
@given(params(max_len=40))
@with_examples
def test_triton_paged_equals_contiguous_and_ignores_garbage(p):
    from dsc.kernels import triton_paged as TP

    a = make_paged(p, garbage="nan", pad="minus1")
    sm = p["d"] ** -0.5
    want = R.sparse_attention(a.q, a.kc, a.vc, a.live_idx, sm)
    got = TP.paged_sparse_attention(*a.args, sm)
    tol = TOL[DTYPES[p["dtype"]]]
    assert got.shape == a.q.shape and got.dtype == a.q.dtype
    assert torch.isfinite(got).all()
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
    b = make_paged(p, garbage="big", pad="big")
    assert torch.equal(TP.paged_sparse_attention(*b.args, sm), got)


@triton_only
@settings(max_examples=2)
@given(params(max_len=40))
@with_examples
def test_triton_paged_selecting_every_token_equals_dense_sdpa(p):
    from dsc.kernels import triton_paged as TP

    c = make_paged(dict(p, slots=max(p["slots"], max(p["lengths"]) + 3)), all_tokens=True)
    dense = dense_attention(c.q, c.kc, c.vc, lengths=c.lengths.long(), sm_scale=0.37)
    got = TP.paged_sparse_attention(*c.args, 0.37)
    empty = c.lengths == 0
    tol = TOL[DTYPES[p["dtype"]]]
    assert torch.allclose(got[~empty].float(), dense[~empty].float(), atol=tol, rtol=tol)
    assert (got[empty] == 0).all()


@triton_only
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_triton_paged_many_splits_hnd_view_and_no_slots(dtype):
    """Many splits of a few slots (some splits all unused) merge to the oracle; an HND pool view works."""
    from dsc.kernels import triton_paged as TP

    c = make_paged(example_params(21, 6, 4, 2, dtype, False, [70, 41], 75, d=80))
    want = R.sparse_attention(c.q, c.kc, c.vc, c.live_idx, 0.1)
    tol = TOL[DTYPES[dtype]]
    for nsplit in (3, 7):
        got = TP.paged_sparse_attention(*c.args, 0.1, block_n=16, nsplit=nsplit)
        assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol), nsplit
    hnd_k = c.kp.transpose(1, 2).contiguous().transpose(1, 2)
    hnd_v = c.vp.transpose(1, 2).contiguous().transpose(1, 2)
    got = TP.paged_sparse_attention(c.q, hnd_k, hnd_v, c.bt, c.lengths, c.idx, 0.1)
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
    none = TP.paged_sparse_attention(c.q, c.kp, c.vp, c.bt, c.lengths, c.idx[..., :0], 0.1)
    assert torch.equal(none, torch.zeros_like(c.q))
