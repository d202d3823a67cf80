"""Launchers of the Triton kernels, one per ``dsc::`` op (used for CUDA tensors; tests run them on CPU tensors
under ``TRITON_INTERPRET=1``).

Launch geometry depends only on shapes, never on tensor values, so the decode path has no host synchronisation.
Block sizes default to GPU-friendly values; the interpreter (slow per program) gets bigger blocks.
"""
from __future__ import annotations

import os

import torch
import triton

from . import checks
from . import topk
from . import triton_kernels as tk

NUM_SMS_DEFAULT = 132  # H100 SXM; only sizes the split count (more programs than SMs keeps the GPU busy)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2(n: int, least: int = 1) -> int:
    return max(least, triton.next_power_of_2(max(1, int(n))))


def _strides4(t: torch.Tensor | None, shape) -> tuple[int, int, int, int]:
    """Strides of ``t`` broadcast to ``shape`` (0 on broadcast dims), or zeros when absent."""
    if t is None:
        return (0, 0, 0, 0)
    return tuple(t.expand(shape).stride())


def _label_geometry(scale, r: int, bits: int) -> tuple[tuple[int, int, int], int]:
    """``(scale/zero strides, C_PAD)`` of a label cache for the kernels: strides 0 at 16 bits (no scale), and the
    padded width of one label row in the kernels' channel loop (4-bit: a byte holds two channels)."""
    strides = scale.stride() if bits != 16 else (0, 0, 0)
    return strides, _pow2(checks.label_width(r, bits) if bits == 4 else r)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return NUM_SMS_DEFAULT


# ----------------------------------------------------------------------------------------------- label write
def label_write(keys, channels, positions, data, scale, zero, bits: int, block_t: int | None = None) -> None:
    checks.check_label_write(keys, channels, positions, data, scale, zero, bits)
    b, hkv, t, _ = keys.shape
    r = channels.shape[1]
    ch = channels.contiguous()
    sp0, sp1 = (0, positions.stride(0)) if positions.dim() == 1 else positions.stride()
    block_t = block_t or (_pow2(t) if _interpreting() else min(64, _pow2(t)))
    ss, cpad = _label_geometry(scale, r, bits)
    grid = (b * hkv, triton.cdiv(t, block_t))
    tk.label_write_kernel[grid](keys, ch, positions, data, scale, zero, t, r, hkv, *keys.stride(), sp0, sp1,
                                *data.stride(), *ss, BITS=bits, BLOCK_T=block_t, C_PAD=cpad)


def label_sync(k, channels, positions, data, scale, zero, bits: int, state, block_t: int | None = None) -> None:
    """``dsc::label_sync`` on the GPU: one program per (batch, KV head) checks, rebuilds if needed, writes and
    updates ``state`` (:func:`dsc.kernels.triton_kernels.label_sync_kernel`); the launch depends on shapes only."""
    checks.check_label_sync(k, channels, positions, data, scale, zero, bits, state)
    b, hkv = k.shape[:2]
    r = channels.shape[1]
    ss, cpad = _label_geometry(scale, r, bits)
    tk.label_sync_kernel[(b * hkv,)](k, channels.contiguous(), positions, data, scale, zero, state, positions.shape[0],
                                     r, hkv, *k.stride(), positions.stride(0), *data.stride(), *ss, *state.stride(),
                                     BITS=bits, BLOCK_T=block_t or (16 if _interpreting() else 64), C_PAD=cpad)


# ----------------------------------------------------------------------------------------------- row write
def write_rows(src, positions, dst, block_t: int | None = None) -> None:
    """``dst[:, :, positions] = src`` (``positions`` ``[T]`` or ``[B, T]``) for a CUDA ``src``; ``dst`` on the same
    GPU or in pinned host memory (stream-ordered: later kernels on the stream see the rows)."""
    checks.check_write_rows(src, positions, dst)
    b, hkv, t, d = src.shape
    if t == 0:
        return
    sp0, sp1 = (0, positions.stride(0)) if positions.dim() == 1 else positions.stride()
    block_t = block_t or (_pow2(t) if _interpreting() else min(32, _pow2(t)))
    grid = (b * hkv, triton.cdiv(t, block_t))
    tk.rows_write_kernel[grid](src, positions, dst, t, d, hkv, *src.stride(), sp0, sp1, *dst.stride(),
                               BLOCK_T=block_t, D_PAD=_pow2(d, 16))


# ----------------------------------------------------------------------------------------------- scores
def label_scores(q, channels, data, scale, zero, bits: int, valid=None, lengths=None, group: bool = True,
                 block_s: int | None = None):
    checks.check_label_scores(q, channels, data, scale, zero, bits, valid, lengths)
    return _label_scores(q, channels, data, scale, zero, bits, valid, lengths, group, block_s)


def _label_scores(q, channels, data, scale, zero, bits, valid, lengths, group, block_s=None):
    """:func:`label_scores` without the argument check (callers have validated). A group's score
    (:func:`dsc.kernels.reference.group_scores`) takes two launches over the labels, each decoding a block of them
    once for all the group's heads: each head's best score per block, then (after a reduction of those few maxima)
    the group score of every position; no per-head score tensor is written."""
    b, hq, lq, _ = q.shape
    hkv, s = data.shape[1], data.shape[2]
    g = hq // hkv
    rows = hkv if group else hq
    out = torch.empty(b, rows, lq, s, dtype=torch.float32, device=q.device)
    if s == 0:
        return out
    r = channels.shape[1]
    ch = channels.contiguous()
    vmask = valid.expand(b, hq, lq, s).view(torch.uint8) if valid is not None else None
    block_s = block_s or (min(_pow2(s), 1024) if _interpreting() else 128)
    blocks = triton.cdiv(s, block_s)
    ss, cpad = _label_geometry(scale, r, bits)

    def launch(mode: int, top: torch.Tensor) -> None:
        tk.label_scores_kernel[(b * rows * lq, blocks)](
            q, ch, data, scale, zero, vmask if vmask is not None else out, lengths if lengths is not None else out,
            top, out, rows, lq, s, r, g, g if group else 1, *q.stride(), *data.stride(), *ss,
            *_strides4(vmask, (b, hq, lq, s)), *out.stride(), BITS=bits, HAS_VALID=valid is not None,
            HAS_LEN=lengths is not None, MODE=mode, BLOCK_S=block_s, C_PAD=cpad)

    if not group:
        launch(0, out)
        return out
    block_best = torch.empty(b, hq, lq, blocks, dtype=torch.float32, device=q.device)
    launch(1, block_best)
    launch(2, block_best.amax(-1))  # each head's best in the row (NaN if a block held one)
    return out


# ----------------------------------------------------------------------------------------------- top-k
# The fused select (one program per row, six passes over it) has never run on a GPU: a long row on one SM may cost
# more than torch.topk's parallel one, so it is opt-in (DSC_TRITON_SELECT=1) until scripts/gpu_breakdown.py has
# compared the two there.
FUSED_SELECT_ENV = "DSC_TRITON_SELECT"


def select_topk(scores, budget: int, frac: float = 0.0, sink: int = 0, recent: int = 0):
    """``dsc::select_topk`` on the GPU: ``torch.topk`` with the budget rule's passes (:mod:`.topk`), or the fused
    radix select (:func:`select`) with ``DSC_TRITON_SELECT=1``."""
    if not fused_select():
        return topk.select_topk(scores, budget, frac, sink, recent)
    checks.check_select(scores, budget, frac, sink, recent)
    return select(scores.float().contiguous(), budget, frac, sink, recent)


def fused_select() -> bool:
    return os.environ.get(FUSED_SELECT_ENV) == "1"


def _select_owned(sc, budget: int, frac: float, sink: int, recent: int):
    """:func:`select_topk` of a contiguous fp32 score buffer the caller owns (the torch path overwrites it)."""
    return (select if fused_select() else topk.select_owned)(sc, budget, frac, sink, recent)


def select(sc, budget: int, frac: float, sink: int, recent: int, block: int | None = None):
    """The selection of contiguous fp32 scores ``sc`` ``[B, Hsel, Lq, S]`` (``-inf`` = invalid): int64 positions
    ``[B, Hsel, Lq, K]``, each row's kept ones first (in position order), ``-1`` after; one kernel, one program per
    row (:func:`dsc.kernels.triton_kernels.select_kernel`), the scores read in place."""
    b, h, lq, s = sc.shape
    kk = checks.topk_width(s, budget, frac)
    idx = torch.empty(b, h, lq, kk, dtype=torch.int64, device=sc.device)
    if idx.numel():
        block = block or (min(_pow2(s), 1024) if _interpreting() else 1024)
        tk.select_kernel[(b * h * lq,)](sc, idx, s, kk, budget, sink, recent, FRAC=float(frac), BLOCK=block)
    return idx


# ----------------------------------------------------------------------------------------------- attention
def _splits(rows: int, kk: int, block_n: int, device) -> int:
    """Split count: enough programs for ~4 waves of the GPU, but at least one block of slots per split."""
    if _interpreting():
        return min(2, triton.cdiv(kk, block_n))
    return max(1, min(triton.cdiv(kk, block_n), triton.cdiv(4 * _num_sms(device), rows)))


def sparse_attention(q, k, v, idx, sm_scale: float, bias=None, block_n: int | None = None,
                     nsplit: int | None = None):
    checks.check_sparse_attention(q, k, v, idx, sm_scale, bias)
    return _sparse_attention(q, k, v, idx, sm_scale, bias, block_n, nsplit)


def sparse_attention_host(q, k, v, idx, sm_scale: float, bias=None):
    """:func:`sparse_attention` with ``k``/``v`` in pinned host memory: the kernel gathers the selected rows over
    the bus itself (zero-copy), so only those rows cross it and no staging copy or host wait is needed."""
    checks.check_host_kv(q, k, v, idx, sm_scale, bias)
    return _sparse_attention(q, k, v, idx, sm_scale, bias)


def _sparse_attention(q, k, v, idx, sm_scale, bias, block_n=None, nsplit=None):
    b, hq, lq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    hsel, kk = idx.shape[1], idx.shape[3]
    group = hsel == hkv and g > 1
    if hsel == hkv and g == 1:
        group = False
    out = torch.empty(b, hq, lq, d, dtype=q.dtype, device=q.device)
    block_n = block_n or (_pow2(min(kk, 256), 16) if _interpreting() else 64)
    nsplit = nsplit or _splits(b * hsel * lq, kk, block_n, q.device)
    chunk = triton.cdiv(triton.cdiv(max(kk, 1), nsplit), block_n) * block_n
    o_part = torch.empty(b, hq, lq, nsplit, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, lq, nsplit, dtype=torch.float32, device=q.device)
    native = q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and not _interpreting()
    tk.sparse_attn_split_kernel[(b * hsel * lq, nsplit)](
        q, k, v, idx, bias if bias is not None else q, o_part, lse,
        hq, hsel, lq, kk, d, g, nsplit, chunk, float(sm_scale),
        *q.stride(), *k.stride(), *v.stride(), *idx.stride(), *_strides4(bias, (b, hq, lq, s)),
        GROUP=group, HAS_BIAS=bias is not None, NATIVE_DOT=native,
        Q_PAD=_pow2(g if group else 1, 16), D_PAD=_pow2(d, 16), BLOCK_N=block_n)
    tk.merge_kernel[(b * hq * lq,)](o_part, lse, out, hq, lq, nsplit, d, *out.stride(),
                                   S_PAD=_pow2(nsplit), D_PAD=_pow2(d, 16))
    return out


def ds_decode(q, k, v, channels, data, scale, zero, bits: int, valid=None, bias=None, lengths=None,
              budget: int = 64, frac: float = 0.0, sink: int = 0, recent: int = 0, group: bool = True,
              sm_scale: float | None = None):
    """Label scores -> top-k -> sparse attention; the arguments are checked once, here (the steps run unchecked)."""
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    checks.check_ds_decode(q, k, v, channels, data, scale, zero, bits, valid, bias, lengths, budget, frac, sink,
                           recent, sm_scale)
    sc = _label_scores(q, channels, data, scale, zero, bits, valid, lengths, group)
    return _sparse_attention(q, k, v, _select_owned(sc.contiguous(), budget, frac, sink, recent), sm_scale,
                             bias)
