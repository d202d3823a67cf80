"""``DecodePlan``: ``dsc::ds_decode`` planned once for a set of K/V and label buffers, run once per decode step.

FlashInfer's plan/run split: the arguments are validated when planning (``checks.check_ds_decode``, what the op
checks on every call); a run checks only that the query is the planned one and how many positions to attend, then
calls the kernel. On the CPU a run is the native kernel's call and little more: cold (other layers ran in between)
an op call costs about 0.5 ms beyond the kernel on the 2-core VM (dispatch, checks, packing the kernel's arguments,
allocating the output), as much as the kernel itself at 9x3x64, batch 1, 16K; a run 0.12-0.22 ms (DESIGN.md, the
``DecodePlan`` entry). Elsewhere (CUDA, or a call the native kernel does not take) a run is the op over the planned
buffers' first ``length`` positions.

The plan holds its buffers (they live as long as it does); their contents may change between runs (a static cache
filling up, labels written with ``dsc::label_write``), their storage must not: plan again after reallocating one.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import checks, native
from .reference import label_prefix


class DecodePlan:
    """Double Sparsity decode attention of queries shaped like ``q`` over ``k``/``v`` ``[B, Hkv, S, D]`` and their
    label cache ``data``/``scale``/``zero``, with the op's selection arguments (``torch.ops.dsc.ds_decode``, no mask,
    bias or per-sequence lengths: positions ``[0, length)`` valid in every row). Inference only, as the op: no
    gradient flows through a run.

    >>> plan = DecodePlan(q, k, v, channels, *labels, bits=8, budget=64, frac=1 / 16)
    >>> out = plan.run(q)              # == torch.ops.dsc.ds_decode(q, k, v, channels, *labels, 8, budget=64, ...)
    >>> out = plan.run(q, length=n)    # over the first n positions of the buffers
    """

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, channels: Tensor, data: Tensor, scale: Tensor, zero: Tensor,
                 bits: int, budget: int = 64, frac: float = 0.0, sink: int = 0, recent: int = 0, group: bool = True,
                 sm_scale: Optional[float] = None):
        sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
        checks.check_ds_decode(q, k, v, channels, data, scale, zero, bits, None, None, None, budget, frac, sink,
                               recent, sm_scale)
        self.query = (q.shape, q.dtype, q.device)
        self.capacity = k.shape[2]
        self.selection = (budget, frac, sink, recent, group, float(sm_scale))
        self.buffers = (k, v, channels, data, scale, zero, bits)
        self.native = (native.Decode(q, k, v, channels, data, scale, zero, bits, None, budget, frac, sink, recent,
                                     group, float(sm_scale))
                       if native.covers(q, k, v, data, scale, zero, bits, None, None) else None)

    def run(self, q: Tensor, length: Optional[int] = None, check_row: int = -1) -> Optional[Tensor]:
        """The attention output ``[B, Hq, 1, Dv]`` of ``q`` (the planned shape, dtype and device) over the first
        ``length`` positions (default: all of them). ``check_row >= 0`` (the native kernel only, :attr:`native` not
        None): None, without decoding, when the labels of that row no longer describe ``k``'s row."""
        if (q.shape, q.dtype, q.device) != self.query:
            raise ValueError(f"q: {tuple(q.shape)} {q.dtype} on {q.device} is not the planned query "
                             f"{tuple(self.query[0])} {self.query[1]} on {self.query[2]}; plan again for it")
        n = self.capacity if length is None else length
        if not (isinstance(n, int) and 0 <= n <= self.capacity):
            raise ValueError(f"length: must be an int in [0, {self.capacity}] (the planned buffers' positions), "
                             f"got {length!r}")
        budget, frac = self.selection[:2]
        if self.native is not None:
            return self.native.run(q, n, checks.topk_width(n, budget, frac), check_row)
        if check_row >= 0:
            raise ValueError("check_row: only the native CPU kernel checks a row's labels (plan.native is None)")
        k, v, channels, data, scale, zero, bits = self.buffers
        return torch.ops.dsc.ds_decode(q, k[:, :, :n], v[:, :, :n], channels, *label_prefix(data, scale, zero, bits, n),
                                       bits, None, None, None, *self.selection)
