"""Top-k selection shared by the CPU and GPU paths (``torch.topk``; shape-static, no host synchronisation)."""
from __future__ import annotations

import torch

from . import checks

NEG_INF = float("-inf")


def topk_inplace(sc, budget: int, frac: float, sink: int, recent: int):
    """Top-k of an owned score buffer (mutated: forced positions -> +inf). Returns ``(idx, used)``."""
    s = sc.shape[-1]
    kk = checks.topk_width(s, budget, frac)
    if sink or recent or frac:
        ok = sc > NEG_INF
        nvalid = ok.sum(-1)
        if frac:
            keep = torch.ceil(nvalid.double() * frac).long().clamp(max=kk)
        else:
            keep = nvalid.clamp(max=kk)
        if sink or recent:
            n_sink = keep.clamp(max=sink)
            n_recent = (keep - n_sink).clamp(max=recent)
            upto = ok.cumsum(-1, dtype=torch.int32)
            forced = (upto <= n_sink[..., None]) if sink else torch.zeros_like(ok)
            if recent:
                after = nvalid[..., None] - upto + ok.int()
                forced |= after <= n_recent[..., None]
            sc.masked_fill_(forced & ok, float("inf"))
        idx = sc.topk(kk, dim=-1, sorted=True).indices
        used = torch.arange(kk, device=sc.device) < keep[..., None]
        return idx, used
    vals, idx = sc.topk(kk, dim=-1, sorted=False)
    return idx, vals > NEG_INF
