"""The ``dsc::`` ops: schemas, default bodies and fake (meta) kernels for torch.compile, kernels per device.

Device dispatch is the dispatcher's: each op's default body is the plain-torch oracle (:mod:`.reference`, used on
any device without a kernel of its own), and device kernels are registered per dispatch key: ``CPU`` ->
:mod:`.cpu` (reads only labels and selected rows), ``CUDA`` -> the Triton launchers (:mod:`.triton_ops`,
:mod:`.triton_paged`, imported on the first CUDA call, so importing this module never imports Triton). An op given
tensors on several devices (a CUDA query over pinned host K/V) dispatches to the CUDA kernel. Real outputs are
contiguous and the fake kernels return the same (contiguous) strides, as ``torch.library.opcheck`` requires.

The ops are plain ``torch.library.Library`` definitions (:func:`define_op`; the schema inferred from the Python
signature, as ``torch.library.custom_op`` infers it) rather than ``custom_op`` objects: a call then goes straight
from the dispatcher to the kernel. ``custom_op``'s wrapper layers (autograd function, in-place view tracking,
alias checks) cost 35-90 us per call on this CPU, several times per layer and decode step, for ops that are
inference-only: no autograd formula (backpropagating through one makes torch warn that ``dsc::<op>`` has no
autograd kernel, and no gradient flows through it; the backend leaves sites whose inputs require grad dense).

Every kernel validates its arguments once (:mod:`.checks`); composite ops (``ds_decode``) check once and run their
steps unchecked.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import checks, cpu, paged, reference, topk

_LIB = torch.library.Library("dsc", "FRAGMENT")
_KEYS = {"cpu": "CPU", "cuda": "CUDA"}


def define_op(name: str, mutates_args: tuple = ()):
    """Decorator: define ``dsc::<name>`` with the function's signature as its schema and the function as its
    default body (any device without a kernel of its own); returns the op (``torch.ops.dsc.<name>``). Kernels run
    with Dynamo disabled (never traced into), as ``custom_op`` runs them."""
    def define(fn):
        _LIB.define(name + torch.library.infer_schema(fn, mutates_args=mutates_args))
        _LIB.impl(name, torch._disable_dynamo(fn), "CompositeExplicitAutograd")
        return getattr(torch.ops.dsc, name)
    return define


def register_fake(name: str):
    """Decorator: the fake (meta) kernel of ``dsc::<name>``, for torch.compile's tracing."""
    return torch.library.register_fake(f"dsc::{name}", lib=_LIB)


def register_kernel(name: str, devices: tuple, fn) -> None:
    """``fn`` as the kernel of ``dsc::<name>`` on each device type of ``devices`` (``"cpu"``, ``"cuda"``)."""
    for device in devices:
        _LIB.impl(name, torch._disable_dynamo(fn), _KEYS[device])


def _triton(module: str, name: str):
    """A CUDA kernel that imports ``dsc.kernels.<module>`` (hence Triton) on its first call, not at import time."""
    fn = None

    def kernel(*args, **kwargs):
        nonlocal fn
        if fn is None:
            import importlib

            fn = getattr(importlib.import_module(f"{__package__}.{module}"), name)
        return fn(*args, **kwargs)

    kernel.__name__ = kernel.__qualname__ = f"{module}.{name}"
    return kernel


def _register(name: str, cpu_fn, module: str = "triton_ops") -> None:
    register_kernel(name, ("cpu",), cpu_fn)
    register_kernel(name, ("cuda",), _triton(module, name))


def _check_fake_lengths(lengths: Optional[Tensor], b) -> None:
    if lengths is not None:
        torch._check(lengths.shape[0] == b, lambda: f"lengths: has {lengths.shape[0]} entries for batch {b}")


# ----------------------------------------------------------------------------------------------- label cache
@define_op("label_write", mutates_args=("data", "scale", "zero"))
def label_write(keys: Tensor, channels: Tensor, positions: Tensor, data: Tensor, scale: Tensor, zero: Tensor,
                bits: int) -> None:
    """Write the labels of ``keys [B,Hkv,T,D]`` at ``positions`` ([T] or [B,T]) into ``data/scale/zero``."""
    reference.label_write(keys, channels, positions, data, scale, zero, bits)


@register_fake("label_write")
def _(keys, channels, positions, data, scale, zero, bits):
    checks.check_label_write(keys, channels, positions, data, scale, zero, bits)
    return None


_register("label_write", cpu.label_write)


@define_op("label_sync", mutates_args=("data", "scale", "zero", "state"))
def label_sync(k: Tensor, channels: Tensor, positions: Tensor, data: Tensor, scale: Tensor, zero: Tensor, bits: int,
               state: Tensor) -> None:
    """A static cache's label step decided on the device (no host reads: CUDA-graph safe): relabel rows
    ``[0, positions[0])`` of ``k`` if they were written elsewhere (checked on the row before), then label the rows at
    ``positions`` (already in ``k``); ``state`` int64 ``[B, Hkv, 2]`` (rows labelled, rebuilds)."""
    reference.label_sync(k, channels, positions, data, scale, zero, bits, state)


@register_fake("label_sync")
def _(k, channels, positions, data, scale, zero, bits, state):
    checks.check_label_sync(k, channels, positions, data, scale, zero, bits, state)
    return None


register_kernel("label_sync", ("cuda",), _triton("triton_ops", "label_sync"))  # CPU: the reference (tests only)


# ----------------------------------------------------------------------------------------------- scores
@define_op("label_scores")
def label_scores(q: Tensor, channels: Tensor, data: Tensor, scale: Tensor, zero: Tensor, bits: int,
                 valid: Optional[Tensor] = None, lengths: Optional[Tensor] = None, group: bool = True) -> Tensor:
    """fp32 label scores ``[B, Hsel, Lq, S]`` (Hsel = Hkv if ``group`` else Hq); invalid positions ``-inf``."""
    return reference.label_scores(q, channels, data, scale, zero, bits, valid, lengths, group)


@register_fake("label_scores")
def _(q, channels, data, scale, zero, bits, valid=None, lengths=None, group=True):
    hkv, s = checks.check_label_scores(q, channels, data, scale, zero, bits, valid, lengths)
    b, hq, lq, _ = q.shape
    _check_fake_lengths(lengths, b)
    return q.new_empty((b, hkv if group else hq, lq, s), dtype=torch.float32)


_register("label_scores", cpu.label_scores)


# ----------------------------------------------------------------------------------------------- top-k
@define_op("select_topk")
def select_topk(scores: Tensor, budget: int, frac: float = 0.0, sink: int = 0, recent: int = 0) -> Tensor:
    """int64 ``[B, Hsel, Lq, K]`` selected positions (``-1`` = unused slot), sink/recent forced in."""
    return reference.select_topk(scores, budget, frac, sink, recent)


@register_fake("select_topk")
def _(scores, budget, frac=0.0, sink=0, recent=0):
    checks.check_select(scores, budget, frac, sink, recent)
    b, h, lq, s = scores.shape
    return scores.new_empty((b, h, lq, checks.topk_width(s, budget, frac)), dtype=torch.int64)


# CPU: torch.topk (dsc.kernels.topk; the decode step itself selects inside the native kernel); CUDA: the same, or
# the fused radix select with DSC_TRITON_SELECT=1 (triton_ops.select_topk)
_register("select_topk", topk.select_topk)


# ----------------------------------------------------------------------------------------------- attention
@define_op("sparse_attention")
def sparse_attention(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, sm_scale: float,
                     bias: Optional[Tensor] = None) -> Tensor:
    """Attention of ``q`` over the rows ``idx`` of ``k``/``v`` (HF layout, Hkv heads); output in q's dtype."""
    return reference.sparse_attention(q, k, v, idx, sm_scale, bias)


@register_fake("sparse_attention")
def _(q, k, v, idx, sm_scale, bias=None):
    checks.check_sparse_attention(q, k, v, idx, sm_scale, bias)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


_register("sparse_attention", cpu.sparse_attention)


@define_op("ds_decode")
def ds_decode(q: Tensor, k: Tensor, v: Tensor, channels: Tensor, data: Tensor, scale: Tensor, zero: Tensor,
              bits: int, valid: Optional[Tensor] = None, bias: Optional[Tensor] = None,
              lengths: Optional[Tensor] = None, budget: int = 64, frac: float = 0.0, sink: int = 0,
              recent: int = 0, group: bool = True, sm_scale: Optional[float] = None) -> Tensor:
    """Double Sparsity decode attention: label scores -> top-k -> sparse attention, no host synchronisation."""
    return reference.ds_decode(q, k, v, channels, data, scale, zero, bits, valid, bias, lengths, budget, frac,
                               sink, recent, group, sm_scale)


@register_fake("ds_decode")
def _(q, k, v, channels, data, scale, zero, bits, valid=None, bias=None, lengths=None, budget=64, frac=0.0,
      sink=0, recent=0, group=True, sm_scale=None):
    checks.check_ds_decode(q, k, v, channels, data, scale, zero, bits, valid, bias, lengths, budget, frac, sink,
                           recent, 1.0 if sm_scale is None else sm_scale)
    torch._check(data.shape[2] == k.shape[2], lambda: "data: label cache length differs from the K/V cache length")
    _check_fake_lengths(lengths, q.shape[0])
    return torch.empty_like(q, memory_format=torch.contiguous_format)


_register("ds_decode", cpu.ds_decode)


# ----------------------------------------------------------------------------------------------- dense attention
@define_op("dense_attention")
def dense_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                    scale: Optional[float] = None) -> Tensor:
    """Exact attention of ``q [B,Hq,Lq,D]`` over KV-native ``k``/``v`` ``[B,Hkv,S,D]`` (never repeated to Hq heads):
    what the rewrite puts at the sites it leaves dense, and what a sparse site runs when it attends densely."""
    return reference.dense_attention(q, k, v, attn_mask, is_causal, scale)


@register_fake("dense_attention")
def _(q, k, v, attn_mask=None, is_causal=False, scale=None):
    checks.check_dense_attention(q, k, v, attn_mask)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


register_kernel("dense_attention", ("cpu",), cpu.dense_attention)  # CUDA: the default body (SDPA's GQA-aware kernels)


# ----------------------------------------------------------------------------------------------- offload
@define_op("write_rows", mutates_args=("dst",))
def write_rows(src: Tensor, positions: Tensor, dst: Tensor) -> None:
    """``dst[b, :, positions] = src[b]`` (``src [B,Hkv,T,D]``, ``positions`` int64 ``[T]`` or ``[B,T]``,
    ``dst [B,Hkv,capacity,D]``). ``dst`` may be pinned host memory while ``src`` is on a GPU: the CUDA kernel then
    writes the rows over the bus in stream order (later kernels on the stream see them, no host wait)."""
    reference.write_rows(src, positions, dst)


@register_fake("write_rows")
def _(src, positions, dst):
    checks.check_write_rows(src, positions, dst)
    return None


register_kernel("write_rows", ("cuda",), _triton("triton_ops", "write_rows"))


@define_op("sparse_attention_host")
def sparse_attention_host(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, sm_scale: float,
                          bias: Optional[Tensor] = None) -> Tensor:
    """:func:`sparse_attention` with ``k``/``v`` ``[B,Hkv,S,D]`` in host memory. With a CUDA ``q`` (``k``/``v``
    pinned) the Triton kernel reads only the selected rows over the bus (zero-copy); elsewhere the reference."""
    return reference.sparse_attention_host(q, k, v, idx, sm_scale, bias)


@register_fake("sparse_attention_host")
def _(q, k, v, idx, sm_scale, bias=None):
    checks.check_host_kv(q, k, v, idx, sm_scale, bias)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


register_kernel("sparse_attention_host", ("cuda",), _triton("triton_ops", "sparse_attention_host"))


# ----------------------------------------------------------------------------------------------- paged KV cache
@define_op("paged_sparse_attention")
def paged_sparse_attention(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, lengths: Tensor,
                           idx: Tensor, sm_scale: float) -> Tensor:
    """Attention of ``q [B,Hq,Lq,D]`` over the logical positions ``idx [B,Hsel,Lq,K]`` of a paged KV cache
    (``k_pages``/``v_pages`` ``[num_pages, page_size, Hkv, D]``, ``block_table [B, max_pages]``, ``lengths [B]``);
    slots ``-1`` or ``>= lengths[b]`` are skipped. Layout and semantics: :mod:`dsc.kernels.paged`."""
    return paged.reference(q, k_pages, v_pages, block_table, lengths, idx, sm_scale)


@register_fake("paged_sparse_attention")
def _(q, k_pages, v_pages, block_table, lengths, idx, sm_scale):
    paged.check_paged_attention(q, k_pages, v_pages, block_table, lengths, idx, sm_scale)
    torch._check(block_table.shape[0] == q.shape[0], lambda: "block_table: one row per request")
    return torch.empty_like(q, memory_format=torch.contiguous_format)


_register("paged_sparse_attention", paged.cpu, module="triton_paged")
