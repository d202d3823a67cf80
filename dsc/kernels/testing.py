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
