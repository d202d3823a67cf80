"""Triton kernels (launched directly on CPU tensors under TRITON_INTERPRET=1) against the plain-torch reference.

The interpreter is slow, so these use fewer examples and shorter caches than the CPU tests. Coverage does not rest on
the (derandomized) draws: explicit examples (``kernel_helpers.format_grid``, tiny shapes) run every label format
(16 / 8 / 4 bits) x GQA group (1, 2, 4+) x head_dim class (64, 80, 16), rotating dtypes (bf16 included: catches
missing fp32 upcasts), mask kinds, Lq, selection modes and budget rules.
"""
import os

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from dsc.kernels import reference as R
from dsc.kernels import triton_ops as T
from dsc.kernels.testing import (assert_ds_decode_matches_oracle, assert_valid_selection, dense_attention,
                                 make_case)
from kernel_helpers import ONCE, TOL, cases, count_checks, scaled, with_formats

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


@scaled(4)
@given(st.integers(0, 10**6), st.sampled_from([16, 8, 4]), st.integers(1, 33),
       st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), st.booleans())
@example(1, 16, 9, torch.bfloat16, False)
@example(2, 8, 12, torch.float32, True)
@example(3, 4, 7, torch.float16, True)
@example(4, 4, 32, torch.float32, False)
def test_triton_label_write_matches_reference(seed, bits, r, dtype, batched):
    gen = torch.Generator().manual_seed(seed)
    b, hkv, s, d, t = 2, 2, 40, 64, 1 + seed % 7
    keys = torch.randn(b, hkv, t, d, generator=gen).to(dtype)
    ch = torch.stack([torch.randperm(d, generator=gen)[:r] for _ in range(hkv)])
    pos = (torch.stack([torch.randperm(s, generator=gen)[:t] for _ in range(b)]) if batched
           else torch.randperm(s, generator=gen)[:t])
    ref = R.alloc_labels(b, hkv, s, r, bits, dtype)
    got = R.alloc_labels(b, hkv, s, r, bits, dtype)
    R.label_write(keys, ch, pos, *ref, bits)
    T.label_write(keys, ch, pos, *got, bits)
    for x, y in zip(ref, got):
        assert torch.equal(x, y)


@scaled(3)
@given(cases(max_s=700))
@with_formats(s=21, small=True)
def test_triton_matches_reference(case):
    p, sel = case
    c = make_case(**p)
    tol = TOL[p["dtype"]]
    args = (sel["budget"], sel["frac"], sel["sink"], sel["recent"])
    ref_sc = R.label_scores(c.q, *c.labels, c.valid, c.lengths, sel["group"])
    got_sc = T.label_scores(c.q, *c.labels, c.valid, c.lengths, sel["group"])
    assert torch.equal(torch.isinf(ref_sc), torch.isinf(got_sc))
    fin = torch.isfinite(ref_sc)
    assert torch.allclose(ref_sc[fin], got_sc[fin], rtol=1e-4, atol=1e-4 * (1 + ref_sc[fin].abs().max().item()))
    idx = T.select_topk(got_sc, *args)
    assert_valid_selection(got_sc, idx, *args)
    ref_o = R.sparse_attention(c.q, c.k, c.v, idx, p["d"] ** -0.5, c.bias)
    got_o = T.sparse_attention(c.q, c.k, c.v, idx, p["d"] ** -0.5, c.bias)
    assert got_o.dtype == c.q.dtype and got_o.shape == c.q.shape
    assert torch.allclose(ref_o.float(), got_o.float(), atol=tol, rtol=tol)
    out = T.ds_decode(c.q, c.k, c.v, *c.labels, c.valid, c.bias, c.lengths, *args, sel["group"], None)
    assert_ds_decode_matches_oracle(out, c, *args, sel["group"], None, tol)


@scaled(3)
@given(cases(max_s=400))
@with_formats(s=21, small=True)
def test_triton_budget_covering_all_valid_rows_equals_dense_sdpa(case):
    p, sel = case
    if sel["group"] and p["valid"] == "per_head":
        p["valid"] = "shared"
    c = make_case(**p)
    out = T.ds_decode(c.q, c.k, c.v, *c.labels, c.valid, c.bias, c.lengths, p["s"], 0.0, sel["sink"],
                      sel["recent"], sel["group"], 0.3)
    dense = dense_attention(c.q, c.k, c.v, c.valid, c.lengths, c.bias, sm_scale=0.3)
    tol = TOL[p["dtype"]]
    assert torch.allclose(out.float(), dense.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_split_k_merge(dtype):
    """Many splits of a few rows each (some splits empty, some slots -1) merge to the reference answer."""
    c = make_case(9, 2, 2, 4, 2, 333, 96, 24, 8, dtype, valid="shared", lengths=True)
    sc = R.label_scores(c.q, *c.labels, c.valid, c.lengths, True)
    idx = R.select_topk(sc, 150, 0.0, 2, 5)
    ref = R.sparse_attention(c.q, c.k, c.v, idx, 0.1)
    for nsplit, block_n in ((3, 16), (12, 16)):
        got = T.sparse_attention(c.q, c.k, c.v, idx, 0.1, None, block_n=block_n, nsplit=nsplit)
        assert torch.allclose(ref.float(), got.float(), atol=TOL[dtype], rtol=TOL[dtype])


SPECIALS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "-0": -0.0, "0": 0.0}


@scaled(3)
@given(s=st.integers(1, 700), budget=st.integers(1, 64), frac=st.sampled_from([0.0, 1 / 16, 0.1, 1.0]),
       sink=st.integers(0, 6), recent=st.integers(0, 20), seed=st.integers(0, 2**16),
       special=st.sampled_from(sorted(SPECIALS)), ties=st.booleans(), block=st.sampled_from([16, 64, 1024]))
@example(s=40, budget=36, frac=1 / 16, sink=4, recent=16, seed=0, special="nan", ties=False, block=16)  # defaults
@example(s=5, budget=2, frac=0.0, sink=4, recent=3, seed=1, special="-inf", ties=True, block=16)  # forced overflow
@example(s=700, budget=3, frac=0.1, sink=2, recent=1, seed=2, special="-0", ties=True, block=64)  # ties, +-0
@example(s=333, budget=64, frac=0.0, sink=0, recent=0, seed=3, special="inf", ties=False, block=1024)
def test_triton_select_is_a_valid_selection_in_position_order(s, budget, frac, sink, recent, seed, special, ties,
                                                                block):
    """The fused radix select (one program per row, blocks of ``block`` positions) against the selection rule:
    rows with invalid stretches, NaN / inf / signed zeros, heavy ties, fewer valid positions than the budget, and
    none at all; kept positions come first, in position order, then -1."""
    gen = torch.Generator().manual_seed(seed)
    sc = torch.randn(3, 2, 1, s, generator=gen) * 4
    if ties:
        sc = sc.round()  # few distinct values: the threshold byte holds many keys
    sc[0, 0, 0, s // 3:] = float("-inf")  # a padded row
    sc[0, 1, 0, ::2] = float("-inf")  # a sparse valid set (per-head masks)
    sc[1, 0, 0, :] = float("-inf")  # nothing valid
    where = torch.randint(0, s, (3,), generator=gen)
    sc[2, :, 0, where] = SPECIALS[special]
    idx = T.select(sc.contiguous(), budget, frac, sink, recent, block=block)
    assert_valid_selection(sc, idx, budget, frac, sink, recent)
    for row in idx.reshape(-1, idx.shape[-1]):
        kept = row[row >= 0]
        assert (kept[1:] > kept[:-1]).all() and (row[kept.numel():] == -1).all()


@pytest.mark.parametrize("bits, group, valid, budget", [(16, True, "shared", (36, 1 / 16, 4, 16)),
                                                        (8, False, "per_head", (12, 0.0, 2, 3)),
                                                        (4, True, "none", (500, 0.0, 0, 0))])
def test_triton_decode_with_the_fused_select_matches_the_definition(bits, group, valid, budget, monkeypatch):
    """``DSC_TRITON_SELECT=1``: ``ds_decode`` and ``select_topk`` on the opt-in select kernel (the model's budget
    rule, a plain budget, one covering every row) against the oracle."""
    monkeypatch.setenv(T.FUSED_SELECT_ENV, "1")
    calls = []
    kernel = T.select
    monkeypatch.setattr(T, "select", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    c = make_case(7, 2, 2, 3, 1, 400, 32, 8, bits, valid=valid, lengths=True)
    sc = R.label_scores(c.q, *c.labels, c.valid, c.lengths, group)
    assert_valid_selection(sc, T.select_topk(sc, *budget), *budget)
    out = T.ds_decode(c.q, c.k, c.v, *c.labels, c.valid, c.bias, c.lengths, *budget, group, None)
    assert_ds_decode_matches_oracle(out, c, *budget, group, None, TOL[torch.float32])
    assert len(calls) == 2  # both went through the select kernel


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_triton_group_scores_over_blocks_nan_and_empty_rows_as_defined(bits):
    """The two-launch group score (block maxima, then the group reduction) on many blocks: a head whose query is NaN
    makes its group's scores NaN (not normalized), a row with nothing valid stays -inf, per-head masks combine."""
    c = make_case(5, 2, 2, 3, 1, 300, 32, 8, bits, valid="per_head", lengths=True)
    q = c.q.clone()
    q[0, 1] = float("nan")  # batch 0, group 0
    c.lengths[:] = torch.tensor([300, 0])  # batch 1: nothing valid
    p = int(c.valid.expand(2, 6, 1, 300).view(2, 2, 3, 300).all(2)[0, 1].nonzero()[0])
    if bits == 16:  # batch 0, group 1: one NaN label, so its heads' best scores are NaN (then: no shift)
        c.data[0, 1, p, 0] = float("nan")
    else:
        c.scale[0, 1, p] = float("nan")
    ref = R.label_scores(q, *c.labels, c.valid, c.lengths, True)
    got = T.label_scores(q, *c.labels, c.valid, c.lengths, True, block_s=32)
    assert torch.equal(ref.isnan(), got.isnan()) and torch.equal(torch.isneginf(ref), torch.isneginf(got))
    assert ref[0, 0].isnan().any() and int(ref[0, 1].isnan().sum()) == 1 and torch.isneginf(ref[1]).all()
    fin = torch.isfinite(ref)
    assert torch.allclose(ref[fin], got[fin], rtol=1e-4, atol=1e-4 * (1 + ref[fin].abs().max().item()))


def test_triton_scores_many_blocks_and_empty_rows():
    c = make_case(4, 1, 1, 3, 1, 1000, 32, 8, 4, lengths=True)
    c.lengths[:] = 0
    got = T.label_scores(c.q, *c.labels, None, c.lengths, False, block_s=128)
    assert torch.isneginf(got).all()
    idx = T.select_topk(got, 10)
    assert (idx == -1).all()
    assert torch.equal(T.sparse_attention(c.q, c.k, c.v, idx, 0.1), torch.zeros_like(c.q))


def test_triton_hf_layout_strides():
    c = make_case(8, 1, 2, 3, 2, 90, 64, 16, 8, valid="shared", lengths=True)
    q = c.q.transpose(1, 2).contiguous().transpose(1, 2)
    big = torch.zeros(2, 1, 2, 120, 64)
    big[0, :, :, :90], big[1, :, :, :90] = c.k, c.v
    k, v = big[0, :, :, :90], big[1, :, :, :90]
    args = (c.channels, c.data, c.scale, c.zero, 8, c.valid, None, c.lengths, 12, 0.0, 1, 2, False, None)
    assert torch.allclose(T.ds_decode(q, k, v, *args), R.ds_decode(c.q, c.k, c.v, *args), atol=1e-5)


@pytest.mark.parametrize("batched", [False, True])
def test_triton_write_rows_matches_index_copy(batched):
    gen = torch.Generator().manual_seed(4)
    b, hkv, cap, d, t = 2, 3, 20, 40, 5
    src = torch.randn(b, hkv, t, d, generator=gen)
    pos = (torch.stack([torch.randperm(cap, generator=gen)[:t] for _ in range(b)]) if batched
           else torch.randperm(cap, generator=gen)[:t])
    dst = torch.randn(b, hkv, cap, d, generator=gen)
    want = dst.clone()
    for i in range(b):
        want[i].index_copy_(1, pos[i] if batched else pos, src[i])
    op_dst = dst.clone()
    T.write_rows(src, pos, dst)
    assert torch.equal(dst, want)
    torch.ops.dsc.write_rows(src, pos, op_dst)  # CPU tensors: the op's plain-torch body
    assert torch.equal(op_dst, want)
    with pytest.raises(ValueError, match="positions"):
        T.write_rows(src, pos + cap, dst)


def test_triton_sparse_attention_host_matches_reference():
    """The zero-copy launcher's kernel over host K/V (here a CPU query too: the interpreter reads host memory)."""
    c = make_case(6, 2, 2, 2, 1, 70, 80, 8, 8, torch.bfloat16, bias=True)
    idx = R.select_topk(R.label_scores(c.q, *c.labels, None, None, False), 9, 0.0, 1, 1)
    want = R.sparse_attention(c.q, c.k, c.v, idx, 0.2, c.bias)
    for got in (T.sparse_attention_host(c.q, c.k, c.v, idx, 0.2, c.bias),
                torch.ops.dsc.sparse_attention_host(c.q, c.k, c.v, idx, 0.2, c.bias)):
        assert torch.allclose(got.float(), want.float(), atol=TOL[torch.bfloat16], rtol=TOL[torch.bfloat16])


def test_triton_ds_decode_validates_its_arguments_once(monkeypatch):
    """One check per op call: the scores / top-k / attention steps of the composite run unchecked."""
    c = make_case(3, 1, 2, 2, 1, 40, 32, 8, 8, lengths=True)
    calls = count_checks(monkeypatch)
    T.ds_decode(c.q, c.k, c.v, *c.labels, None, None, c.lengths, 8, 0.0, 1, 1, True, None)
    assert calls == ONCE
