"""Top-k selection shared by the CPU and GPU paths (``torch.topk``; shape-static, no host synchronisation).

The budget rule lives in :func:`dsc.kernels.checks.keep_count` (slots per row) and here (which slots are forced):
of a row's kept slots the ``recent`` newest valid positions are forced in first (the current token is the newest),
then the ``sink`` oldest. A NaN score counts as valid (``topk`` ranks NaN first), so a NaN query or key yields
NaN attention, as dense attention does, instead of silently dropping the position.
"""
from __future__ import annotations

import torch

from . import checks

NEG_INF = float("-inf")


def topk_inplace(sc, budget: int, frac: float, sink: int, recent: int):
    """Top-k of an owned score buffer (mutated: forced positions -> +inf). Returns ``(idx, used)``."""
    s = sc.shape[-1]
    kk = checks.topk_width(s, budget, frac)
    if sink or recent or frac:
        ok = sc != NEG_INF
        nvalid = ok.sum(-1)
        keep = checks.keep_count(nvalid, kk, budget, frac)
        if sink or recent:
            n_recent = keep.clamp(max=recent)
            n_sink = (keep - n_recent).clamp(max=sink)
            upto = ok.cumsum(-1, dtype=torch.int32)  # valid positions at or before p
            forced = upto <= n_sink[..., None]
            if recent:
                after = nvalid[..., None] - upto + ok.int()  # valid positions at or after p
                forced |= after <= n_recent[..., None]
            sc.masked_fill_(forced & ok, float("inf"))
        idx = sc.topk(kk, dim=-1, sorted=True).indices
        used = torch.arange(kk, device=sc.device) < keep[..., None]
        return idx, used
    vals, idx = sc.topk(kk, dim=-1, sorted=False)
    return idx, vals != NEG_INF


def select_topk(scores, budget: int, frac: float = 0.0, sink: int = 0, recent: int = 0):
    """``dsc::select_topk`` on any device (CPU path and GPU): int64 ``[B, Hsel, Lq, K]``, unused slots ``-1``."""
    checks.check_select(scores, budget, frac, sink, recent)
    idx, used = topk_inplace(scores.float().clone(), budget, frac, sink, recent)
    return torch.where(used, idx, -1).contiguous()
