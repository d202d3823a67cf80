"""Fast CPU path of the ``dsc::`` ops.

The decode step the backend runs (one query position, rows valid on a prefix, no bias) goes to the fused native
kernel (:mod:`.native`); what follows is the torch path, for every other call (masks, biases, Lq > 1, the separate
ops) and for machines without a C++ compiler.

What it reads: the label cache (``r`` channels per token, maybe 8/4-bit codes) and, after top-k, only the selected
K/V rows (gathered by index from the HF-layout cache; never a repeated-KV copy, never the whole cache).

- Scores use the identity ``q . label = scale * (q . code) + zero * sum(q)``; in group mode the G query heads are
  summed *before* the dot product (``sum_g q_g . l = (sum_g q_g) . l``), so group scoring costs one query per KV
  head. Codes are converted to fp32 one cache-sized chunk of tokens at a time (no fp32 copy of the label cache).
- Top-k is ``torch.topk``; forced recent/sink positions are boosted to ``+inf`` in the (owned) score buffer.
- Attention over the selected rows is CPU SDPA (flash kernel, fp32 accumulation) over the gathered rows.
"""
from __future__ import annotations

import os
import threading

import torch
import torch.nn.functional as F

from . import checks, native
from . import topk as _topk
from .reference import group_scores, group_valid

# fp32 elements of converted label codes per scoring chunk (16 MB: about half an L3; fewer, larger chunks also
# mean fewer OpenMP regions, which matters on an oversubscribed machine). Read once; never reassigned: a caller
# wanting other chunks (tests) passes ``chunk_elements`` to :func:`_masked_scores`.
CHUNK_ELEMENTS = int(os.environ.get("DSC_CPU_CHUNK", 1 << 22))
NEG_INF = float("-inf")
_local = threading.local()


def _scratch(name: str, shape, dtype, device) -> torch.Tensor:
    """A reused per-thread buffer for a decode-step temporary (gathered rows, scores).

    Fresh multi-MB allocations are mmapped and page-faulted on every call (glibc serves blocks > 32 MB only by
    mmap), which cost more than the gather itself; reusing the buffer keeps the step allocation-free.
    """
    store = _local.__dict__.setdefault("buffers", {})
    n = 1
    for x in shape:
        n *= x
    buf = store.get(name)
    if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
        buf = torch.empty(max(n, 1), dtype=dtype, device=device)
        store[name] = buf
    return buf[:n].view(shape)


# ----------------------------------------------------------------------------------------------- label write
def label_write(keys, channels, positions, data, scale, zero, bits: int) -> None:
    """Gather + quantize the new keys' channels (T new tokens only) and scatter them into the cache.

    One gather of the ``r`` channels of all T tokens, one quantization pass (in place on the gathered labels), then
    a copy along the position dimension: a narrow slice for the decode step (T = 1, shared positions), one
    ``index_copy_`` for shared positions ``[T]``, one per sequence for positions ``[B, T]``. Codes are bit-equal
    to the reference (same fp32 operations in the same order: ``floor((x - min) / scale + 0.5)``). Positions
    shared by the batch go to the native kernel (:func:`.native.label_write`, the same codes) when it is built."""
    checks.check_label_write(keys, channels, positions, data, scale, zero, bits)
    if native.label_write(keys, channels, positions, data, scale, zero, bits):
        return
    b, hkv, t, _ = keys.shape
    r = channels.shape[1]
    lab = keys.gather(-1, channels[None, :, None, :].expand(b, hkv, t, r))  # [B, Hkv, T, r], a fresh tensor
    if bits == 16:
        pairs = ((data, lab if lab.dtype == data.dtype else lab.to(data.dtype)),)
    else:
        levels = (1 << bits) - 1
        lab = lab if lab.dtype == torch.float32 else lab.float()
        lo = lab.amin(-1, keepdim=True)
        sc = (lab.amax(-1, keepdim=True) - lo) / levels
        flat = ~(sc > 0)  # constant labels (and a NaN range): scale 0, every code 0
        codes = lab.sub_(lo).div_(sc.masked_fill(flat, 1.0)).add_(0.5).floor_().clamp_(0, levels)
        codes = codes.masked_fill_(flat, 0).to(torch.uint8)
        if bits == 4:  # channel 2j in the low nibble of byte j, 2j + 1 in the high nibble
            packed = codes[..., 0::2].clone()
            packed[..., : r // 2] |= codes[..., 1::2] << 4
            codes = packed
        pairs = ((data, codes), (scale, sc.squeeze(-1)), (zero, lo.squeeze(-1)))
    if positions.dim() == 1 and t == 1:  # the decode step: a narrow slice write, no index tensor
        p = int(positions[0])  # a CPU tensor: reading it costs nothing
        for dst, src in pairs:
            dst.select(2, p).copy_(src.select(2, 0))
    elif positions.dim() == 1:
        for dst, src in pairs:
            dst.index_copy_(2, positions, src)
    else:
        for i in range(b):
            for dst, src in pairs:
                dst[i].index_copy_(1, positions[i], src[i])


# ----------------------------------------------------------------------------------------------- scores
def _query_channels(q, channels):
    """Queries' label channels as fp32 ``[B, Hkv, G * Lq, r]`` (each KV head's G query heads, one row each)."""
    b, hq, lq, d = q.shape
    hkv, r = channels.shape
    g = hq // hkv
    qc = q.reshape(b, hkv, g, lq, d).gather(-1, channels[None, :, None, None, :].expand(b, hkv, g, lq, r)).float()
    return qc.reshape(b, hkv, g * lq, r)


def _chunk_tokens(rows: int, r: int, chunk_elements: int) -> int:
    """Tokens per scoring chunk: keeps the chunk's fp32 codes (rows * tokens * r) near ``chunk_elements``
    (at least 256 tokens)."""
    return max(256, chunk_elements // max(1, rows * r))


def _scores(qc, data, scale, zero, bits: int, chunk_elements: int = CHUNK_ELEMENTS, out=None):
    """``[B, Hkv, M, S]`` fp32 = q . label, by the score identity ``scale * (q . code) + zero * sum(q)``, into
    ``out`` when given (a scratch buffer: a fresh multi-MB result costs more in page faults than the product).

    Codes are converted to fp32 one cache-sized chunk of tokens at a time (never a full fp32 copy of the labels);
    4-bit codes are split into low/high nibbles and dotted with the even/odd query channels, so nothing is
    re-interleaved.
    """
    b, hkv, m, r = qc.shape
    s = data.shape[2]
    if bits == 16 and data.dtype == torch.float32:
        return torch.matmul(qc, data.transpose(-1, -2), out=out)
    if bits == 4:  # low nibbles hold the even channels, high nibbles the odd ones
        qe, qo = qc[..., 0::2], qc[..., 1::2]
        if qo.shape[-1] < qe.shape[-1]:  # odd r: the last high nibble is padding (0)
            qo = torch.cat([qo, qo.new_zeros(b, hkv, m, 1)], -1)
    if bits != 16:
        qsum = qc.sum(-1, keepdim=True)  # [B, Hkv, M, 1]
    step = _chunk_tokens(b * hkv, r, chunk_elements)
    if out is None:
        out = torch.empty(b, hkv, m, s, dtype=torch.float32)
    for s0 in range(0, s, step):
        s1 = min(s, s0 + step)
        chunk = data[:, :, s0:s1]
        dot = out[..., s0:s1]
        if bits == 4:
            torch.matmul(qe, _as_float(torch.bitwise_and(chunk, 15), "lo").transpose(-1, -2), out=dot)
            dot.add_(qo @ _as_float(torch.bitwise_right_shift(chunk, 4), "hi").transpose(-1, -2))
        else:
            torch.matmul(qc, _as_float(chunk, "codes").transpose(-1, -2), out=dot)
        if bits != 16:
            dot.mul_(scale[:, :, None, s0:s1]).addcmul_(zero[:, :, None, s0:s1], qsum)
    return out


def _as_float(codes, name: str):
    """``codes`` as fp32 in this thread's scratch buffer ``name`` (reused: no fresh chunk-sized allocation)."""
    return _scratch(name, codes.shape, torch.float32, codes.device).copy_(codes)


def _masked_scores(q, channels, data, scale, zero, bits, valid, lengths, group: bool,
                   chunk_elements: int = CHUNK_ELEMENTS, scratch: bool = False):
    """Scores ``[B, Hsel, Lq, S]`` with invalid positions at ``-inf``: a fresh buffer the caller owns, or with
    ``scratch`` (per-head scores only) this thread's reused buffer, valid until the next call. The label codes
    are converted ``chunk_elements`` fp32 values at a time (unchecked: callers have validated)."""
    b, hq, lq, _ = q.shape
    hkv, r = channels.shape
    g = hq // hkv
    s = data.shape[2]
    qc = _query_channels(q, channels)
    owned = group or scratch  # the per-head buffer is ours (group scores are a fresh reduction of it)
    out = _scratch("scores", (b, hkv, g * lq, s), torch.float32, q.device) if owned else None
    sc = _scores(qc, data, scale, zero, bits, chunk_elements, out)
    if lengths is not None:
        sc.masked_fill_(torch.arange(s) >= lengths[:, None, None, None], NEG_INF)
    sc = sc.view(b, hq, lq, s)  # [B, Hkv, G*Lq, S] is already [B, Hq, Lq, S] in memory
    if valid is not None:
        sc.masked_fill_(~(group_valid(valid, b, hkv, g, lq, s) if group else valid), NEG_INF)
    if group:
        return group_scores(sc.view(b, hkv, g, lq, s), inplace=True)
    return sc


def label_scores(q, channels, data, scale, zero, bits: int, valid=None, lengths=None, group: bool = True):
    checks.check_label_scores(q, channels, data, scale, zero, bits, valid, lengths)
    return _masked_scores(q, channels, data, scale, zero, bits, valid, lengths, group).contiguous()


# ----------------------------------------------------------------------------------------------- top-k
select_topk = _topk.select_topk  # torch.topk: the one implementation shared with the GPU path


# ----------------------------------------------------------------------------------------------- attention
def _gather_rows(x, idx, scratch: str | None = None):
    """Rows ``x[b, h, idx[b, h, ...]]`` of ``x [B, Hkv, S, D]`` for ``idx [B, Hkv, N]`` -> ``[B, Hkv, N, D]``."""
    b, hkv, s, d = x.shape
    n = idx.shape[-1]
    if x.is_contiguous():
        base = (torch.arange(b * hkv, device=x.device) * s).view(b, hkv, 1)
        flat = (idx + base).view(-1)
        if scratch is None:
            return x.view(-1, d).index_select(0, flat).view(b, hkv, n, d)
        out = _scratch(scratch, (b * hkv * n, d), x.dtype, x.device)
        return torch.index_select(x.view(-1, d), 0, flat, out=out).view(b, hkv, n, d)
    bi = torch.arange(b, device=x.device).view(b, 1, 1)
    hi = torch.arange(hkv, device=x.device).view(1, hkv, 1)
    return x[bi, hi, idx]


def _attend(q, k, v, idx, used, sm_scale: float, bias):
    """Attention over the selected rows; ``idx``/``used`` ``[B, Hsel, Lq, K]`` (``used`` False = skip slot)."""
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    hsel, kk = idx.shape[1], idx.shape[-1]
    ii = idx.clamp(min=0)
    if hsel == hkv:  # one row set per (KV head, query position), shared by the G heads of the group
        rows = ii.reshape(b, hkv, lq * kk)
        kg = _gather_rows(k, rows, "k").view(b, hkv * lq, kk, d)
        vg = _gather_rows(v, rows, "v").view(b, hkv * lq, kk, d)
        qq = q.reshape(b, hkv, g, lq, d).transpose(2, 3).reshape(b, hkv * lq, g, d)
        mask = used.view(b, hkv * lq, 1, kk)
        if bias is not None:
            bsel = bias.expand(b, hq, lq, bias.shape[-1]).view(b, hkv, g, lq, -1).gather(
                -1, ii[:, :, None].expand(b, hkv, g, lq, kk))
            mask = bsel.transpose(2, 3).reshape(b, hkv * lq, g, kk).float().masked_fill(~mask, NEG_INF)
    else:  # per query head: head h reads KV head h // G with its own rows
        rows = ii.reshape(b, hkv, g * lq * kk)
        kg = _gather_rows(k, rows, "k").view(b, hq * lq, kk, d)
        vg = _gather_rows(v, rows, "v").view(b, hq * lq, kk, d)
        qq = q.reshape(b, hq * lq, 1, d)
        mask = used.view(b, hq * lq, 1, kk)
        if bias is not None:
            bsel = bias.expand(b, hq, lq, bias.shape[-1]).gather(-1, ii)
            mask = bsel.reshape(b, hq * lq, 1, kk).float().masked_fill(~mask, NEG_INF)
    # Rows with nothing to attend (no slot, or every slot's bias -inf) give 0 by contract (SDPA would give NaN);
    # a NaN from the data itself still propagates.
    dead = ~mask.any(-1, keepdim=True) if mask.dtype == torch.bool else (mask == NEG_INF).all(-1, keepdim=True)
    if mask.dtype != torch.bool:
        mask = mask.to(q.dtype) if q.dtype != torch.float32 else mask
    out = F.scaled_dot_product_attention(qq, kg, vg, attn_mask=mask, scale=sm_scale).masked_fill(dead, 0)
    if hsel == hkv:
        out = out.view(b, hkv, lq, g, d).transpose(2, 3).reshape(b, hq, lq, d)
    else:
        out = out.view(b, hq, lq, d)
    return out.contiguous()


def sparse_attention(q, k, v, idx, sm_scale: float, bias=None):
    checks.check_sparse_attention(q, k, v, idx, sm_scale, bias)
    return _attend(q, k, v, idx, idx >= 0, float(sm_scale), bias)


def dense_attention(q, k, v, attn_mask=None, is_causal: bool = False, scale: float | None = None):
    """Exact dense attention over KV-native K/V, the fastest way on this CPU: at decode (one query per head, no
    causal flag) the G query heads of a KV group are packed into the query-length dim, ``[B, Hkv, G, D]``, so each
    K/V row is read once for the group (SDPA with ``enable_gqa`` reads it once per query head, up to 3.6x slower
    at long context: ``dsc bench attention``); otherwise SDPA with ``enable_gqa``."""
    checks.check_dense_attention(q, k, v, attn_mask)
    b, hq, lq, d = q.shape
    hkv = k.shape[1]
    if hq == hkv or lq != 1 or is_causal:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=hq != hkv).contiguous()
    g = hq // hkv
    mask = attn_mask
    if mask is not None:  # [.., Hq or 1, 1, S] -> [B or 1, Hkv or 1, G, S] (a view: Lq = 1)
        mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        mask = mask.reshape(mask.shape[0], hkv, g, -1) if mask.shape[1] == hq else mask
    out = F.scaled_dot_product_attention(q.view(b, hkv, g, d), k, v, attn_mask=mask, scale=scale)
    return out.view(b, hq, 1, v.shape[-1])


def ds_decode(q, k, v, channels, data, scale, zero, bits: int, valid=None, bias=None, lengths=None,
              budget: int = 64, frac: float = 0.0, sink: int = 0, recent: int = 0, group: bool = True,
              sm_scale: float | None = None):
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    checks.check_ds_decode(q, k, v, channels, data, scale, zero, bits, valid, bias, lengths, budget, frac, sink,
                           recent, sm_scale)
    if native.covers(q, k, v, data, scale, zero, bits, valid, bias):  # the decode step: one fused native pass
        kk = checks.topk_width(k.shape[2], budget, frac)
        return native.ds_decode(q, k, v, channels, data, scale, zero, bits, lengths, budget, frac, sink, recent,
                                group, float(sm_scale), kk)
    sc = _masked_scores(q, channels, data, scale, zero, bits, valid, lengths, group, scratch=True)
    idx, used = _topk.topk_inplace(sc, budget, frac, sink, recent)
    return _attend(q, k, v, idx, used, float(sm_scale), bias)
