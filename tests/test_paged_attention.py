"""``dsc::paged_sparse_attention``: sparse attention over a paged KV cache (NHD pages, block table, lengths).

Oracles are built here from the definition, independently of the code under test: the request's contiguous
K/V ``[B, Hkv, S, D]`` is assembled token by token through the block table (a Python loop), then compared with
(a) ``reference.sparse_attention`` (the contiguous op's oracle) over the same slots with positions past each
request's length dropped, and (b) masked dense SDPA when the slots cover every token. Rows that no request holds
(spare pages, page tails past a length) and block-table padding are filled with NaN or garbage: they must never
matter. Triton runs under the interpreter (TRITON_INTERPRET=1, from conftest) on small shapes.
"""
import math
import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import dsc.kernels  # noqa: F401  (registers torch.ops.dsc)
from dsc.kernels import paged as P
from dsc.kernels import reference as R
from dsc.kernels.testing import dense_attention
from test_kernels import TOL

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
triton_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


@dataclass
class Paged:
    q: torch.Tensor
    kp: torch.Tensor
    vp: torch.Tensor
    bt: torch.Tensor
    lengths: torch.Tensor
    idx: torch.Tensor
    kc: torch.Tensor  # contiguous oracle K [B, Hkv, S, D] (zeros past each length)
    vc: torch.Tensor

    @property
    def args(self):
        return self.q, self.kp, self.vp, self.bt, self.lengths, self.idx

    @property
    def live_idx(self):
        """``idx`` with positions at or past each request's length turned into unused slots (-1)."""
        return torch.where(self.idx < self.lengths.long()[:, None, None, None], self.idx, -1)


def make_paged(p: dict, garbage: str = "nan", pad: str = "minus1", all_tokens: bool = False) -> Paged:
    """A random paged cache from the parameters ``p`` (see :func:`params`).

    Pages come from one shuffled pool shared by every request; with ``share`` request 1's first page is request
    0's (prefix sharing). ``garbage`` fills rows no request holds ("nan" or "big" random values); ``pad`` fills
    block-table entries past a request's pages ("minus1" or "big", an out-of-range page id). ``all_tokens``:
    every row's slots are a permutation of the request's tokens, then extra slots (-1 or past the length).
    """
    gen = torch.Generator().manual_seed(p["seed"])
    dtype = DTYPES[p["dtype"]]
    page, hkv, g, d, lq = p["page"], p["hkv"], p["g"], p["d"], p["lq"]
    lengths = list(p["lengths"])
    b = len(lengths)
    need = [math.ceil(n / page) for n in lengths]
    max_pages = max(1, max(need) + p["extra_pages"])
    n_pages = sum(need) + 2
    perm = torch.randperm(n_pages, generator=gen).tolist()
    pad_value = -1 if pad == "minus1" else n_pages + 1000
    bt = torch.full((b, max_pages), pad_value, dtype=torch.int32 if p["bt32"] else torch.int64)
    nxt = 0
    for i in range(b):
        for j in range(need[i]):
            bt[i, j] = perm[nxt]
            nxt += 1
    if p["share"] and b >= 2 and need[0] >= 1 and need[1] >= 1:
        bt[1, 0] = bt[0, 0]
    kp = torch.randn(n_pages, page, hkv, d, generator=gen).to(dtype)
    vp = torch.randn(n_pages, page, hkv, d, generator=gen).to(dtype)
    s = max_pages * page
    kc = torch.zeros(b, hkv, s, d, dtype=dtype)
    vc = torch.zeros(b, hkv, s, d, dtype=dtype)
    live = torch.zeros(n_pages, page, dtype=torch.bool)
    for i in range(b):
        for pos in range(lengths[i]):
            pg, off = int(bt[i, pos // page]), pos % page
            kc[i, :, pos] = kp[pg, off]
            vc[i, :, pos] = vp[pg, off]
            live[pg, off] = True
    junk = torch.full((n_pages, page, hkv, d), float("nan")) if garbage == "nan" else \
        1e3 * torch.randn(n_pages, page, hkv, d, generator=torch.Generator().manual_seed(p["seed"] + 1))
    kp[~live] = junk[~live].to(dtype)
    vp[~live] = junk[~live].to(dtype)
    hsel = hkv * g if p["per_head"] else hkv
    kk = p["slots"]
    idx = torch.full((b, hsel, lq, kk), -1, dtype=torch.int64)
    for row in range(b * hsel * lq):
        i = row // (hsel * lq)
        if all_tokens:
            pick = torch.randperm(lengths[i], generator=gen)
            extra = torch.arange(lengths[i], s + 3)[torch.randperm(s + 3 - lengths[i], generator=gen)]
            pick = torch.cat([pick, extra[: max(0, kk - lengths[i]) // 2]])[:kk]
        else:
            pick = torch.randperm(s + 3, generator=gen)[:kk]  # positions past the length (and the table) too
            pick = torch.where(torch.rand(pick.shape, generator=gen) < 0.2, -1, pick)
        idx.view(-1, kk)[row, : pick.numel()] = pick
    q = torch.randn(b, hkv * g, lq, d, generator=gen).to(dtype)
    return Paged(q, kp, vp, bt, torch.tensor(lengths, dtype=torch.int32 if p["len32"] else torch.int64), idx,
                 kc, vc)


@st.composite
def params(draw, max_len=60):
    page = draw(st.sampled_from([1, 16, 6]))
    g = draw(st.sampled_from([1, 2, 4]))
    b = draw(st.integers(1, 3))
    lengths = draw(st.lists(st.integers(0, max_len), min_size=b, max_size=b))
    return dict(seed=draw(st.integers(0, 2**31 - 1)), page=page, hkv=draw(st.integers(1, 2)), g=g,
                d=draw(st.sampled_from([16, 64, 80])), lq=draw(st.integers(1, 3)), lengths=lengths,
                extra_pages=draw(st.integers(0, 2)), slots=draw(st.integers(1, max(lengths) + 8)),
                per_head=draw(st.booleans()), dtype=draw(st.sampled_from(list(DTYPES))), share=draw(st.booleans()),
                bt32=draw(st.booleans()), len32=draw(st.booleans()))


def _ex(seed, page, g, lq, dtype, per_head, lengths, slots, *, hkv=2, d=64, extra=1, share=False, bt32=True,
        len32=False):
    return dict(seed=seed, page=page, hkv=hkv, g=g, d=d, lq=lq, lengths=lengths, extra_pages=extra, slots=slots,
                per_head=per_head, dtype=dtype, share=share, bt32=bt32, len32=len32)


# Every shape class at least once: page sizes 1 / 16 / 6, groups 1 / 2 / 4, Lq 1 and > 1, fp32 / fp16 / bf16,
# per-group and per-head selection, int32 and int64 tables/lengths, shared pages, empty and page-aligned requests,
# more slots than tokens and fewer, head_dim not a power of two.
EXAMPLES = [
    _ex(1, 1, 1, 1, "fp32", False, [5, 9], 12, hkv=1),
    _ex(2, 16, 2, 3, "fp16", True, [33, 16, 0], 20, share=True, bt32=False),
    _ex(3, 6, 4, 2, "bf16", False, [12, 25], 30, share=True, len32=True),
    _ex(4, 16, 4, 1, "bf16", True, [48], 50, d=80, extra=0),
    _ex(5, 6, 2, 1, "fp32", True, [7, 1, 18], 9, hkv=1, bt32=False, len32=True),
    _ex(6, 1, 4, 2, "fp16", False, [0, 13], 4, d=16, share=True),
    _ex(7, 16, 1, 3, "fp32", False, [60, 17], 68, d=80, extra=2),
]


def with_examples(fn):
    for e in reversed(EXAMPLES):
        fn = example(e)(fn)
    return fn


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
    c = make_paged(_ex(11, 6, 2, 2, "fp32", True, [14, 30], 10))
    hnd_k = c.kp.transpose(1, 2).contiguous().transpose(1, 2)
    hnd_v = c.vp.transpose(1, 2).contiguous().transpose(1, 2)
    want = R.sparse_attention(c.q, c.kc, c.vc, c.live_idx, 0.1)
    for name, f in _impls().items():
        got = f(c.q, hnd_k, hnd_v, c.bt, c.lengths, c.idx, 0.1)
        assert torch.allclose(got, want, atol=2e-5, rtol=2e-5), name
        none = f(c.q, c.kp, c.vp, c.bt, c.lengths, c.idx[..., :0], 0.1)
        assert torch.equal(none, torch.zeros_like(c.q)), name


def test_paged_op_opcheck_and_fake():
    c = make_paged(_ex(12, 16, 2, 2, "fp32", False, [20, 3], 8))
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
    c = make_paged(_ex(13, 6, 2, 1, "fp32", False, [14, 9], 8), pad="minus1")
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

    c = make_paged(_ex(21, 6, 4, 2, dtype, False, [70, 41], 75, d=80))
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
