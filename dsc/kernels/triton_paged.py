"""Triton kernel + launcher of ``dsc::paged_sparse_attention``: flash-decoding over the selected slots of a paged
KV cache (layout and semantics in :mod:`.paged`).

Same structure as the contiguous sparse-attention kernel: one program per (batch * selection head * query
position, split of the K slots); each selected slot's row address is computed through the block table
(``page = block_table[b, pos // page_size]``, row ``(page, pos % page_size, kv_head)``), loaded once and used by
every query head of the group; each split writes its normalised output and log-sum-exp, and the shared merge kernel
combines them. Slots that are ``-1`` or at/past ``lengths[b]`` are masked before the block table is read, so
padding entries of the table and rows past a request's length are never touched. Launch geometry depends only on
shapes (no host synchronisation; CUDA-graph safe).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_kernels as tk
from .paged import check_paged_attention
from .triton_ops import _interpreting, _pow2, _splits


@triton.jit
def paged_sparse_attn_split_kernel(q, k, v, bt, lengths, idx, o_part, lse_part,
                                   HQ, HSEL, LQ, KK, D, G, PAGE, NSPLIT, CHUNK, sm_scale,
                                   sq0, sq1, sq2, sq3, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3,
                                   sbt0, sbt1, si0, si1, si2, si3,
                                   GROUP: tl.constexpr, NATIVE_DOT: tl.constexpr,
                                   Q_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // (HSEL * LQ)).to(tl.int64)
    hs = (pid // LQ) % HSEL
    lq = pid % LQ
    if GROUP:
        kvh = hs
        h0 = hs * G
        nrows = G
    else:
        kvh = hs // G
        h0 = hs
        nrows = 1
    rows = tl.arange(0, Q_PAD)
    rm = rows < nrows
    heads = h0 + rows
    d = tl.arange(0, D_PAD)
    dm = d < D
    qb = tl.load(q + b * sq0 + heads[:, None] * sq1 + lq * sq2 + d[None, :] * sq3,
                 mask=rm[:, None] & dm[None, :], other=0.0).to(tl.float32)
    n_tok = tl.load(lengths + b).to(tl.int64)
    m_i = tl.full([Q_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([Q_PAD], dtype=tl.float32)
    acc = tl.zeros([Q_PAD, D_PAD], dtype=tl.float32)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, KK)
    irow = idx + b * si0 + hs * si1 + lq * si2
    for off in range(start, end, BLOCK_N):
        n = off + tl.arange(0, BLOCK_N)
        pos = tl.load(irow + n * si3, mask=n < end, other=-1)
        ok = (pos >= 0) & (pos < n_tok)
        pos = tl.where(ok, pos, 0)
        page = tl.load(bt + b * sbt0 + (pos // PAGE) * sbt1, mask=ok, other=0).to(tl.int64)
        slot = pos % PAGE
        m2 = ok[:, None] & dm[None, :]
        kb = tl.load(k + page[:, None] * sk0 + slot[:, None] * sk1 + kvh * sk2 + d[None, :] * sk3, mask=m2, other=0.0)
        vb = tl.load(v + page[:, None] * sv0 + slot[:, None] * sv1 + kvh * sv2 + d[None, :] * sv3, mask=m2, other=0.0)
        if NATIVE_DOT:  # GPU with fp16/bf16 inputs: tensor-core dot, fp32 accumulation
            s = tl.dot(qb.to(kb.dtype), tl.trans(kb))
        else:
            s = tl.dot(qb, tl.trans(kb.to(tl.float32)), input_precision="ieee")
        s = s * sm_scale
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        if NATIVE_DOT:
            pv = tl.dot(p.to(vb.dtype), vb)
        else:
            pv = tl.dot(p, vb.to(tl.float32), input_precision="ieee")
        acc = acc * alpha[:, None] + pv
        l_i = l_i * alpha + tl.sum(p, axis=1)
        m_i = m_new
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
    prow = ((b * HQ + heads) * LQ + lq) * NSPLIT + split  # partials [B, Hq, Lq, NSPLIT, (D)], contiguous
    tl.store(o_part + prow[:, None] * D + d[None, :], o, mask=rm[:, None] & dm[None, :])
    tl.store(lse_part + prow, lse, mask=rm)


def paged_sparse_attention(q, k_pages, v_pages, block_table, lengths, idx, sm_scale: float,
                           block_n: int | None = None, nsplit: int | None = None):
    """Launch the split kernel and the merge; output ``[B, Hq, Lq, D]`` contiguous, in q's dtype."""
    check_paged_attention(q, k_pages, v_pages, block_table, lengths, idx, sm_scale)
    b, hq, lq, d = q.shape
    page_size, hkv = k_pages.shape[1], k_pages.shape[2]
    g = hq // hkv
    hsel, kk = idx.shape[1], idx.shape[3]
    group = hsel == hkv and g > 1
    out = torch.empty(b, hq, lq, d, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    block_n = block_n or (_pow2(min(kk, 256), 16) if _interpreting() else 64)
    nsplit = nsplit or max(1, _splits(b * hsel * lq, kk, block_n, q.device))
    chunk = triton.cdiv(triton.cdiv(max(kk, 1), nsplit), block_n) * block_n
    o_part = torch.empty(b, hq, lq, nsplit, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, lq, nsplit, dtype=torch.float32, device=q.device)
    native = q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and not _interpreting()
    paged_sparse_attn_split_kernel[(b * hsel * lq, nsplit)](
        q, k_pages, v_pages, block_table, lengths, idx, o_part, lse,
        hq, hsel, lq, kk, d, g, page_size, nsplit, chunk, float(sm_scale),
        *q.stride(), *k_pages.stride(), *v_pages.stride(), *block_table.stride(), *idx.stride(),
        GROUP=group, NATIVE_DOT=native, Q_PAD=_pow2(g if group else 1, 16), D_PAD=_pow2(d, 16), BLOCK_N=block_n)
    tk.merge_kernel[(b * hq * lq,)](o_part, lse, out, hq, lq, nsplit, d, *out.stride(),
                                   S_PAD=_pow2(nsplit), D_PAD=_pow2(d, 16))
    return out
