"""``torch.library.custom_op`` registrations of the ``dsc::`` ops, with fake (meta) kernels for torch.compile.

Device dispatch: CPU tensors -> :mod:`dsc.kernels.cpu` (reads only labels and selected rows), CUDA tensors ->
the Triton launchers, anything else -> the plain-torch reference. Real outputs are contiguous and the fake kernels
return the same (contiguous) strides, as ``torch.library.opcheck`` requires.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import checks, reference


def _impl(t: Tensor):
    """The implementation module for tensors on ``t``'s device."""
    if t.device.type == "cpu":
        from . import cpu

        return cpu
    if t.device.type == "cuda":
        from . import triton_ops

        return triton_ops
    return reference


@torch.library.custom_op("dsc::label_write", mutates_args=("data", "scale", "zero"))
def label_write(keys: Tensor, channels: Tensor, positions: Tensor, data: Tensor, scale: Tensor, zero: Tensor,
                bits: int) -> None:
    """Write the labels of ``keys [B,Hkv,T,D]`` at ``positions`` ([T] or [B,T]) into ``data/scale/zero``."""
    _impl(keys).label_write(keys, channels, positions, data, scale, zero, bits)


@label_write.register_fake
def _(keys, channels, positions, data, scale, zero, bits):
    checks.check_label_write(keys, channels, positions, data, scale, zero, bits)
    return None


@torch.library.custom_op("dsc::label_scores", mutates_args=())
def label_scores(q: Tensor, channels: Tensor, data: Tensor, scale: Tensor, zero: Tensor, bits: int,
                 valid: Optional[Tensor] = None, lengths: Optional[Tensor] = None, group: bool = True) -> Tensor:
    """fp32 label scores ``[B, Hsel, Lq, S]`` (Hsel = Hkv if ``group`` else Hq); invalid positions ``-inf``."""
    return _impl(q).label_scores(q, channels, data, scale, zero, bits, valid, lengths, group)


@label_scores.register_fake
def _(q, channels, data, scale, zero, bits, valid=None, lengths=None, group=True):
    hkv, s = checks.check_label_scores(q, channels, data, scale, zero, bits, valid, lengths)
    b, hq, lq, _ = q.shape
    return q.new_empty((b, hkv if group else hq, lq, s), dtype=torch.float32)


@torch.library.custom_op("dsc::select_topk", mutates_args=())
def select_topk(scores: Tensor, budget: int, frac: float = 0.0, sink: int = 0, recent: int = 0) -> Tensor:
    """int64 ``[B, Hsel, Lq, K]`` selected positions (``-1`` = unused slot), sink/recent forced in."""
    return _impl(scores).select_topk(scores, budget, frac, sink, recent)


@select_topk.register_fake
def _(scores, budget, frac=0.0, sink=0, recent=0):
    checks.check_select(scores, budget, frac, sink, recent)
    b, h, lq, s = scores.shape
    return scores.new_empty((b, h, lq, checks.topk_width(s, budget, frac)), dtype=torch.int64)


@torch.library.custom_op("dsc::sparse_attention", mutates_args=())
def sparse_attention(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, sm_scale: float,
                     bias: Optional[Tensor] = None) -> Tensor:
    """Attention of ``q`` over the rows ``idx`` of ``k``/``v`` (HF layout, Hkv heads); output in q's dtype."""
    return _impl(q).sparse_attention(q, k, v, idx, sm_scale, bias)


@sparse_attention.register_fake
def _(q, k, v, idx, sm_scale, bias=None):
    checks.check_sparse_attention(q, k, v, idx, sm_scale, bias)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("dsc::ds_decode", mutates_args=())
def ds_decode(q: Tensor, k: Tensor, v: Tensor, channels: Tensor, data: Tensor, scale: Tensor, zero: Tensor,
              bits: int, valid: Optional[Tensor] = None, bias: Optional[Tensor] = None,
              lengths: Optional[Tensor] = None, budget: int = 64, frac: float = 0.0, sink: int = 0,
              recent: int = 0, group: bool = True, sm_scale: Optional[float] = None) -> Tensor:
    """Double Sparsity decode attention: label scores -> top-k -> sparse attention, no host synchronisation."""
    return _impl(q).ds_decode(q, k, v, channels, data, scale, zero, bits, valid, bias, lengths, budget, frac,
                              sink, recent, group, sm_scale)


@ds_decode.register_fake
def _(q, k, v, channels, data, scale, zero, bits, valid=None, bias=None, lengths=None, budget=64, frac=0.0,
      sink=0, recent=0, group=True, sm_scale=None):
    checks.check_ds_decode(q, k, v, channels, data, scale, zero, bits, valid, bias, lengths, budget, frac, sink,
                           recent, 1.0 if sm_scale is None else sm_scale)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------------------------- paged KV cache
def _paged_impl(t: Tensor):
    """Paged sparse attention for tensors on ``t``'s device: CPU path, Triton on CUDA, else the reference."""
    from . import paged

    if t.device.type == "cpu":
        return paged.cpu
    if t.device.type == "cuda":
        from .triton_paged import paged_sparse_attention as triton_paged

        return triton_paged
    return paged.reference


@torch.library.custom_op("dsc::paged_sparse_attention", mutates_args=())
def paged_sparse_attention(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, lengths: Tensor,
                           idx: Tensor, sm_scale: float) -> Tensor:
    """Attention of ``q [B,Hq,Lq,D]`` over the logical positions ``idx [B,Hsel,Lq,K]`` of a paged KV cache
    (``k_pages``/``v_pages`` ``[num_pages, page_size, Hkv, D]``, ``block_table [B, max_pages]``, ``lengths [B]``);
    slots ``-1`` or ``>= lengths[b]`` are skipped. Layout and semantics: :mod:`dsc.kernels.paged`."""
    return _paged_impl(q)(q, k_pages, v_pages, block_table, lengths, idx, sm_scale)


@paged_sparse_attention.register_fake
def _(q, k_pages, v_pages, block_table, lengths, idx, sm_scale):
    from .paged import check_paged_attention

    check_paged_attention(q, k_pages, v_pages, block_table, lengths, idx, sm_scale)
    return torch.empty_like(q, memory_format=torch.contiguous_format)
