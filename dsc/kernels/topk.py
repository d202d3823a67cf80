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
            _force(sc, ok, nvalid, keep, sink, recent)
        # rows keeping fewer than kk slots need the best first; when every row keeps all kk (read on the host only
        # on CPU, where it is free) any order will do
        every_slot = sc.device.type == "cpu" and bool((keep == kk).all())
        idx = sc.topk(kk, dim=-1, sorted=not every_slot).indices
        used = torch.arange(kk, device=sc.device) < keep[..., None]
        return idx, used
    vals, idx = sc.topk(kk, dim=-1, sorted=False)
    return idx, vals != NEG_INF


def _force(sc, ok, nvalid, keep, sink: int, recent: int) -> None:
    """Set ``sc`` to ``+inf`` at each row's forced positions: its ``min(keep, recent)`` newest valid positions and
    then up to ``sink`` oldest ones within ``keep``."""
    n_recent = keep.clamp(max=recent)
    n_sink = (keep - n_recent).clamp(max=sink)
    s = sc.shape[-1]
    if sc.device.type == "cpu" and _valid_on_prefixes(ok, nvalid):  # read on the host: free there, a GPU wait
        slot = torch.arange(max(sink, recent), device=sc.device)
        _fill_inf(sc, (nvalid[..., None] - 1 - slot[:recent]).clamp(min=0), slot[:recent] < n_recent[..., None])
        _fill_inf(sc, slot[:sink].clamp(max=s - 1).expand(*sc.shape[:-1], -1), slot[:sink] < n_sink[..., None])
        return
    upto = ok.cumsum(-1, dtype=torch.int32)  # valid positions at or before p
    forced = upto <= n_sink[..., None]
    if recent:
        after = nvalid[..., None] - upto + ok.int()  # valid positions at or after p
        forced |= after <= n_recent[..., None]
    sc.masked_fill_(forced & ok, float("inf"))


def _valid_on_prefixes(ok, nvalid) -> bool:
    """Whether every row's valid positions are ``[0, n)``: all valid (a trimmed or unmasked row, no extra pass),
    else the first invalid position is the valid count."""
    if bool((nvalid == ok.shape[-1]).all()):
        return True
    return bool((ok.byte().argmin(-1) == nvalid).all())


def _fill_inf(sc, positions, where) -> None:
    """``sc[..., positions] = +inf`` where ``where`` (same shape as ``positions``), a gather/scatter of a few slots."""
    sc.scatter_(-1, positions, sc.gather(-1, positions).masked_fill_(where, float("inf")))


def select_topk(scores, budget: int, frac: float = 0.0, sink: int = 0, recent: int = 0):
    """``dsc::select_topk`` on any device (CPU path and GPU): int64 ``[B, Hsel, Lq, K]``, unused slots ``-1``."""
    checks.check_select(scores, budget, frac, sink, recent)
    return select_owned(scores.float().clone(), budget, frac, sink, recent).contiguous()


def select_owned(sc, budget: int, frac: float, sink: int, recent: int):
    """:func:`select_topk` of an fp32 score buffer the caller owns (overwritten: forced positions -> +inf)."""
    idx, used = topk_inplace(sc, budget, frac, sink, recent)
    return torch.where(used, idx, -1)
