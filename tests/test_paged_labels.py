"""A label cache paged like K (``paged.alloc_label_pool``), written through ``dsc::label_write`` on its flat view
with an engine's slot mapping, and one whole Double Sparsity decode step over a paged cache (label scores ->
top-k -> ``dsc::paged_sparse_attention``) against the contiguous oracles."""
import os

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import dsc.kernels  # noqa: F401  (registers torch.ops.dsc)
from dsc.kernels import paged as P
from dsc.kernels import reference as R
from dsc.kernels.testing import dense_attention
from kernel_helpers import TOL
from paged_helpers import DTYPES, make_paged

triton_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def _write_and_check(write, seed, bits, page, t, r, dtype):
    """Write ``t`` new tokens at random distinct slots of a pool; every slot's row must be the definition's labels
    of its token (channels gathered, quantized by ``reference.quantize``), every other slot untouched (zero)."""
    gen = torch.Generator().manual_seed(seed)
    n_pages, hkv, d = 5, 2, 32
    keys = torch.randn(t, hkv, d, generator=gen).to(dtype)  # an engine's new K rows [T, Hkv, D]
    ch = torch.stack([torch.randperm(d, generator=gen)[:r] for _ in range(hkv)])
    slots = torch.randperm(n_pages * page, generator=gen)[:t]
    pool = P.alloc_label_pool(n_pages, page, hkv, r, bits, dtype)
    write(keys.transpose(0, 1)[None], ch, slots, *P.flat_label_view(*pool), bits)
    data, scale, zero = pool
    written = torch.zeros(n_pages, page, dtype=torch.bool)
    for i in range(t):
        pg, off = divmod(int(slots[i]), page)
        written[pg, off] = True
        for h in range(hkv):
            lab = keys[i, h, ch[h]]
            if bits == 16:
                assert torch.equal(data[pg, off, h], lab)
            else:
                codes, sc, zp = R.quantize(lab[None], bits)
                assert torch.equal(data[pg, off, h], codes[0])
                assert torch.equal(scale[pg, off, h], sc[0]) and torch.equal(zero[pg, off, h], zp[0])
    assert (data[~written] == 0).all()
    if bits != 16:
        assert (scale[~written] == 0).all() and (zero[~written] == 0).all()


@given(st.integers(0, 10**6), st.sampled_from([16, 8, 4]), st.sampled_from([1, 16, 6]), st.integers(1, 5),
       st.integers(1, 9), st.sampled_from(list(DTYPES)))
@example(1, 16, 1, 1, 8, "bf16")
@example(2, 8, 16, 5, 9, "fp32")
@example(3, 4, 6, 3, 7, "fp16")
@example(4, 4, 16, 1, 1, "bf16")
def test_label_write_through_flat_view(seed, bits, page, t, r, dtype):
    _write_and_check(torch.ops.dsc.label_write, seed, bits, page, t, r, DTYPES[dtype])


@triton_only
@given(st.integers(0, 10**6), st.sampled_from([16, 8, 4]), st.sampled_from([1, 16, 6]), st.integers(1, 5),
       st.integers(1, 9), st.sampled_from(list(DTYPES)))
@example(1, 16, 1, 1, 8, "bf16")
@example(2, 8, 16, 5, 9, "fp32")
@example(3, 4, 6, 3, 7, "fp16")
def test_triton_label_write_through_flat_view(seed, bits, page, t, r, dtype):
    from dsc.kernels import triton_ops as T

    _write_and_check(T.label_write, seed, bits, page, t, r, DTYPES[dtype])


def _step_case(p, bits, r):
    """A paged cache (``make_paged``) plus its label pool, written token by token's slot through the flat view, and
    the contiguous labels of the same K written by the reference."""
    c = make_paged(p, garbage="big")
    n_pages, page = c.kp.shape[:2]
    hkv = p["hkv"]
    ch = torch.stack([torch.randperm(p["d"], generator=torch.Generator().manual_seed(p["seed"]))[:r]
                      for _ in range(hkv)])
    pool = P.alloc_label_pool(n_pages, page, hkv, r, bits, c.q.dtype)
    slots = [int(c.bt[i, pos // page]) * page + pos % page for i, n in enumerate(p["lengths"]) for pos in range(n)]
    rows = [c.kp.view(-1, hkv, p["d"])[s] for s in slots]
    if rows:
        keys = torch.stack(rows).transpose(0, 1)[None]
        torch.ops.dsc.label_write(keys, ch, torch.tensor(slots), *P.flat_label_view(*pool), bits)
    s = c.kc.shape[2]
    ref_labels = R.alloc_labels(len(p["lengths"]), hkv, s, r, bits, c.q.dtype)
    R.label_write(c.kc, ch, torch.arange(s), *ref_labels, bits)
    return c, ch, pool, ref_labels


STEP = [
    dict(seed=1, page=16, hkv=2, g=2, d=64, lq=1, lengths=[40, 7], extra_pages=1, slots=1, per_head=False,
         dtype="fp32", share=True, bt32=True, len32=False),
    dict(seed=2, page=6, hkv=1, g=4, d=80, lq=2, lengths=[25, 0, 13], extra_pages=0, slots=1, per_head=True,
         dtype="bf16", share=False, bt32=False, len32=True),
    dict(seed=3, page=1, hkv=2, g=1, d=32, lq=1, lengths=[9], extra_pages=2, slots=1, per_head=False,
         dtype="fp16", share=False, bt32=True, len32=False),
]


@pytest.mark.parametrize("p", STEP, ids=["page16-g2", "page6-g4-lq2", "page1-g1"])
@pytest.mark.parametrize("bits", [16, 8, 4])
def test_paged_decode_step_matches_contiguous(p, bits):
    """Gathered paged labels score like the contiguous ones; top-k over them then paged attention equals the
    contiguous sparse attention over the same slots, and with a budget covering every token, dense SDPA."""
    c, ch, pool, ref_labels = _step_case(p, bits, 12)
    s = c.kc.shape[2]
    lengths = c.lengths.long()
    group = not p["per_head"]
    labels = P.gather_labels(*pool, c.bt, s)
    got_sc = torch.ops.dsc.label_scores(c.q, ch, *labels, bits, None, lengths, group)
    ref_sc = R.label_scores(c.q, ch, *ref_labels, bits, None, lengths, group)
    assert torch.equal(torch.isinf(got_sc), torch.isinf(ref_sc))
    fin = torch.isfinite(ref_sc)
    if fin.any():
        assert torch.allclose(got_sc[fin], ref_sc[fin], rtol=1e-4, atol=1e-4 * (1 + ref_sc[fin].abs().max().item()))
    tol = TOL[c.q.dtype]
    for budget in (5, s):
        idx = torch.ops.dsc.select_topk(got_sc, budget, 0.0, 1, 2)
        out = torch.ops.dsc.paged_sparse_attention(c.q, c.kp, c.vp, c.bt, c.lengths, idx, 0.125)
        want = R.sparse_attention(c.q, c.kc, c.vc, idx, 0.125)
        assert torch.allclose(out.float(), want.float(), atol=tol, rtol=tol), budget
    dense = dense_attention(c.q, c.kc, c.vc, lengths=lengths, sm_scale=0.125)
    live = lengths > 0
    assert torch.allclose(out[live].float(), dense[live].float(), atol=tol, rtol=tol)
    assert (out[~live] == 0).all()
