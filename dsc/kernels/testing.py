"""Helpers for testing the ``dsc::`` ops: random cases, dense SDPA oracle, and a tie-robust check that an index set is
a correct top-k selection (the contract, not one particular tie order)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import reference as R


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    channels: torch.Tensor
    data: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    valid: torch.Tensor | None
    bias: torch.Tensor | None
    lengths: torch.Tensor | None

    @property
    def labels(self):
        return self.channels, self.data, self.scale, self.zero, self.bits


def make_case(seed: int, b: int, hkv: int, g: int, lq: int, s: int, d: int, r: int, bits: int,
              dtype=torch.float32, valid: str = "none", bias: bool = False, lengths: bool = False) -> Case:
    """Random inputs; labels written by the reference. ``valid``: "none", "shared" ([B,1,Lq,S]) or "per_head"."""
    gen = torch.Generator().manual_seed(seed)
    hq = hkv * g
    q = torch.randn(b, hq, lq, d, generator=gen).to(dtype)
    k = torch.randn(b, hkv, s, d, generator=gen).to(dtype)
    v = torch.randn(b, hkv, s, d, generator=gen).to(dtype)
    channels = torch.stack([torch.randperm(d, generator=gen)[:r] for _ in range(hkv)])
    data, sc, zp = R.alloc_labels(b, hkv, s, r, bits, dtype)
    R.label_write(k, channels, torch.arange(s), data, sc, zp, bits)
    vm = None
    if valid != "none":
        vm = torch.rand(b, hq if valid == "per_head" else 1, lq, s, generator=gen) > 0.3
        vm[..., 0] = True  # every row keeps a valid position, so dense SDPA is defined
    bm = torch.randn(b, 1, lq, s, generator=gen) if bias else None
    ln = torch.randint(1, s + 1, (b,), generator=gen) if lengths else None
    return Case(q, k, v, channels, data, sc, zp, bits, vm, bm, ln)


def dense_attention(q, k, v, valid=None, lengths=None, bias=None, sm_scale=None):
    """Masked dense SDPA (enable_gqa, no repeated KV): the exact answer when the budget covers every valid row."""
    b, hq, lq, d = q.shape
    s = k.shape[2]
    m = R.valid_mask(valid, lengths, b, hq, lq, s, q.device)
    mask = torch.zeros(b, hq, lq, s, dtype=torch.float32).masked_fill(~m, float("-inf"))
    if bias is not None:
        mask = mask + bias.float()
    out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True,
                                         scale=sm_scale)
    return out.to(q.dtype)


def assert_valid_selection(scores: torch.Tensor, idx: torch.Tensor, budget: int, frac: float = 0.0,
                           sink: int = 0, recent: int = 0) -> None:
    """``idx`` obeys the select_topk contract for ``scores`` (any tie order), checked row by row from the rule as
    DESIGN.md states it: slot counts (a fraction's ``budget`` is its floor), no invalid or repeated position, the
    ``recent`` newest valid positions and then the ``sink`` oldest present, and every chosen unforced score >=
    every unchosen valid score (NaN is valid and ranks above everything)."""
    b, h, lq, s = scores.shape
    kk = min(budget, s) if frac == 0 else min(s, max(budget, math.ceil(frac * s)))
    assert idx.shape == (b, h, lq, kk), (idx.shape, kk)
    assert idx.dtype == torch.int64
    for row in range(b * h * lq):
        sc = scores.reshape(-1, s)[row]
        ix = idx.reshape(-1, kk)[row]
        vpos = [p for p in range(s) if not float(sc[p]) == float("-inf")]
        nv = len(vpos)
        keep = min(budget, nv) if frac == 0 else min(nv, max(budget, math.ceil(nv * frac)))
        chosen = ix[ix >= 0]
        assert chosen.numel() == keep, (row, chosen.numel(), keep)
        assert (ix[ix < 0] == -1).all()
        assert chosen.unique().numel() == keep, "repeated position"
        assert set(chosen.tolist()) <= set(vpos), "an invalid position was selected"
        n_recent = min(recent, keep)
        n_sink = min(sink, keep - n_recent)
        forced = set(vpos[:n_sink]) | set(vpos[nv - n_recent:])
        cs = set(chosen.tolist())
        assert forced <= cs, "a forced recent/sink position is missing"
        if recent and keep:
            assert vpos[-1] in cs, "the newest valid position (the current token) is missing"

        def rank(p):  # NaN first, then by score
            v = float(sc[p])
            return math.inf if math.isnan(v) else v

        free = [p for p in cs if p not in forced]
        rest = [p for p in vpos if p not in cs]
        if free and rest:
            assert min(map(rank, free)) >= max(map(rank, rest)), "a better-scoring position was left out"


def ambiguous_rows(scores: torch.Tensor, idx: torch.Tensor, eps: float) -> torch.Tensor:
    """Bool ``[B, Hsel, Lq]``: rows of a selection ``idx`` (made from ``scores``) where a chosen position and an
    unchosen valid one score within ``eps`` of each other, so a rounding difference in the scores of another
    implementation could legitimately swap them (a near-tie at the selection boundary)."""
    s = scores.shape[-1]
    flat = scores.reshape(-1, s).float()
    ix = idx.reshape(-1, idx.shape[-1])
    out = torch.zeros(flat.shape[0], dtype=torch.bool)
    for row in range(flat.shape[0]):
        sc = flat[row]
        chosen = torch.zeros(s, dtype=torch.bool)
        chosen[ix[row][ix[row] >= 0]] = True
        rest = ~chosen & ~torch.isneginf(sc)
        if chosen.any() and rest.any():
            gap = (sc[chosen][:, None] - sc[rest][None, :]).abs().min()
            out[row] = bool(gap <= eps)
    return out.view(scores.shape[:-1])


def assert_ds_decode_matches_oracle(out: torch.Tensor, c: Case, budget: int, frac: float, sink: int, recent: int,
                                    group: bool, sm_scale: float | None, tol: float) -> int:
    """``out`` (some implementation's ``ds_decode`` of case ``c``) equals the definition computed by the plain-torch
    oracle: reference label scores -> reference top-k -> exact attention over those rows. Rows whose reference
    selection has a near-tie at its boundary (:func:`ambiguous_rows`: another implementation's score rounding may
    pick the other position) are left out. Returns the number of output rows compared."""
    sm = c.q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    sc = R.label_scores(c.q, *c.labels, c.valid, c.lengths, group)
    idx = R.select_topk(sc, budget, frac, sink, recent)
    want = R.sparse_attention(c.q, c.k, c.v, idx, sm, c.bias)
    eps = 1e-4 * (1 + float(sc[torch.isfinite(sc)].abs().max())) if torch.isfinite(sc).any() else 0.0
    amb = ambiguous_rows(sc, idx, 2 * eps)
    b, hq, lq, _ = c.q.shape
    if amb.shape[1] != hq:  # one selection per KV group: each of its G query heads
        amb = amb.repeat_interleave(hq // amb.shape[1], 1)
    ok = ~amb
    assert out.shape == c.q.shape and out.dtype == c.q.dtype
    assert torch.allclose(out[ok].float(), want[ok].float(), atol=tol, rtol=tol), \
        float((out[ok].float() - want[ok].float()).abs().max())
    return int(ok.sum())
