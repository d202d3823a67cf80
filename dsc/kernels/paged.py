"""Sparse attention over a paged KV cache (the layout serving engines use), for ``dsc::paged_sparse_attention``.

Layout (vLLM / FlashInfer "NHD" pages):

- ``k_pages``, ``v_pages``: ``[num_pages, page_size, Hkv, D]``, one shared pool for every request. A token's K (or
  V) for all KV heads is one contiguous ``Hkv * D`` block, so an engine writes a new token with one copy at
  ``(page, offset)``, and each selected (token, head) row is ``D`` contiguous elements: the same gather granularity
  as the HF layout. Any strides are accepted, so an ``HND`` pool ``[num_pages, Hkv, page_size, D]`` can be passed
  as ``pool.transpose(1, 2)``.
- ``block_table``: int32 or int64 ``[B, max_pages]``; request ``b``'s logical position ``p`` lives in page
  ``block_table[b, p // page_size]`` at offset ``p % page_size``. Entries past a request's last page are never
  read (engines pad with anything, e.g. -1).
- ``lengths``: int32 or int64 ``[B]``, tokens held by each request (``<= max_pages * page_size``).
- ``idx``: int64 ``[B, Hsel, Lq, K]`` logical positions (as from ``dsc::select_topk``); ``Hsel = Hkv`` (one
  selection per KV group) or ``Hq`` (per query head). A slot is used iff ``0 <= idx < lengths[b]``: ``-1`` and
  positions at or past the request's length are skipped, and their pages are never read.

Output: ``[B, Hq, Lq, D]`` in q's dtype, exact fp32 softmax over the used slots; a row with no used slot gives 0.

This module holds the argument check, the plain-torch :func:`reference` (the test oracle) and the fast CPU path
:func:`cpu` (one vectorised gather of the selected rows, GQA-native, then CPU SDPA). The Triton kernel is in
:mod:`.triton_paged`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import checks
from .checks import _fail, _has_values, _rank, _same_device
from .reference import attend_rows

INDEX_DTYPES = (torch.int32, torch.int64)


def check_paged_attention(q, k_pages, v_pages, block_table, lengths, idx, sm_scale) -> None:
    """Validate the arguments of ``dsc::paged_sparse_attention`` (value checks only on CPU tensors)."""
    _rank("k_pages", k_pages, 4, "[num_pages, page_size, Hkv, D] (NHD pages)")
    _rank("v_pages", v_pages, 4, "[num_pages, page_size, Hkv, D] (NHD pages)")
    if k_pages.shape != v_pages.shape:
        _fail("v_pages", f"shape {tuple(v_pages.shape)} differs from k_pages' {tuple(k_pages.shape)}")
    n_pages, page_size, hkv, d = k_pages.shape
    if n_pages < 1 or page_size < 1:
        _fail("k_pages", f"needs at least one page of at least one token, got shape {tuple(k_pages.shape)}")
    b, hq, lq, _ = checks.check_query(q, hkv, d)
    if k_pages.dtype != q.dtype or v_pages.dtype != q.dtype:
        _fail("k_pages", f"dtypes k_pages={k_pages.dtype}, v_pages={v_pages.dtype} must match q={q.dtype}")
    _rank("block_table", block_table, 2, "[B, max_pages] of int32/int64 page ids")
    if block_table.dtype not in INDEX_DTYPES:
        _fail("block_table", f"must be int32 or int64, got {block_table.dtype}")
    if block_table.shape[0] != b or block_table.shape[1] < 1:
        _fail("block_table", f"has shape {tuple(block_table.shape)}; expected [{b}, max_pages >= 1]")
    max_pages = block_table.shape[1]
    if not isinstance(lengths, torch.Tensor) or lengths.dtype not in INDEX_DTYPES or tuple(lengths.shape) != (b,):
        _fail("lengths", f"must be an int32/int64 tensor [B] = [{b}] (tokens per request), got "
                         f"{getattr(lengths, 'dtype', type(lengths).__name__)} {tuple(getattr(lengths, 'shape', ()))}")
    checks.check_selection(idx, b, hq, hkv, lq)
    checks.check_sm_scale(sm_scale)
    _same_device("q", q, k_pages=k_pages, v_pages=v_pages, block_table=block_table, lengths=lengths, idx=idx)
    cap = max_pages * page_size
    if _has_values(lengths) and (int(lengths.min()) < 0 or int(lengths.max()) > cap):
        _fail("lengths", f"must lie in [0, {cap}] (max_pages {max_pages} x page_size {page_size}); got "
                         f"[{int(lengths.min())}, {int(lengths.max())}]")
    if _has_values(idx) and int(idx.min()) < -1:
        _fail("idx", "positions must be >= -1 (-1 marks an unused slot)")
    if _has_values(block_table) and _has_values(lengths):
        live = torch.arange(max_pages) < (lengths.long()[:, None] + page_size - 1) // page_size
        pages = block_table[live]
        if pages.numel() and (int(pages.min()) < 0 or int(pages.max()) >= n_pages):
            _fail("block_table", f"pages holding a request's tokens must lie in [0, {n_pages}); got "
                                 f"[{int(pages.min())}, {int(pages.max())}]")


def _slots(idx, block_table, lengths, page_size: int):
    """``(used, page, offset)`` of every slot, shaped like ``idx``; unused slots point at page 0, offset 0."""
    lens = lengths.long().view(-1, *([1] * (idx.dim() - 1)))
    used = (idx >= 0) & (idx < lens)
    pos = torch.where(used, idx, torch.zeros_like(idx))
    b = idx.shape[0]
    logical = (pos // page_size).reshape(b, -1)
    page = block_table.long().gather(1, logical).view(idx.shape)
    page = torch.where(used, page, torch.zeros_like(page))
    return used, page, pos % page_size


# ----------------------------------------------------------------------------------------------- reference
def reference(q, k_pages, v_pages, block_table, lengths, idx, sm_scale: float):
    """Plain-torch oracle, from the definition: each slot's logical position -> (page, offset) through the block
    table, the K/V row of the query head's KV head there, exact fp32 softmax over the used slots."""
    check_paged_attention(q, k_pages, v_pages, block_table, lengths, idx, sm_scale)
    b, hq, lq, d = q.shape
    page_size, hkv = k_pages.shape[1], k_pages.shape[2]
    g = hq // hkv
    if idx.shape[-1] == 0:  # no slot at all: every row attends to nothing -> 0
        return torch.zeros(b, hq, lq, d, dtype=q.dtype, device=q.device)
    if idx.shape[1] != hq:
        idx = idx.repeat_interleave(g, 1)  # [B, Hq, Lq, K]: query head h reads its group's selection
    used, page, off = _slots(idx, block_table, lengths, page_size)
    head = (torch.arange(hq, device=q.device) // g).view(1, hq, 1, 1).expand_as(idx)
    kr = k_pages[page, off, head].float()  # [B, Hq, Lq, K, D]
    vr = v_pages[page, off, head].float()
    kr = torch.where(used[..., None], kr, torch.zeros_like(kr))  # rows never read: whatever they hold is ignored
    vr = torch.where(used[..., None], vr, torch.zeros_like(vr))
    return attend_rows(q, kr, vr, used, sm_scale)


# ----------------------------------------------------------------------------------------------- CPU path
def _gather(pages, page, off, head):
    """Rows ``pages[page, off, head]`` (index tensors of one shape) -> ``[..., D]``, without copying the pool."""
    n, p, hkv, d = pages.shape
    if pages.is_contiguous():
        flat = ((page * p + off) * hkv + head).reshape(-1)
        return pages.view(-1, d).index_select(0, flat).view(*page.shape, d)
    return pages[page, off, head]


def cpu(q, k_pages, v_pages, block_table, lengths, idx, sm_scale: float):
    """Fast CPU path: one gather of the selected rows (shared by a group's G heads when ``Hsel = Hkv``; never a
    repeated-KV copy, never a whole page), then CPU SDPA (fp32 accumulation) over them."""
    check_paged_attention(q, k_pages, v_pages, block_table, lengths, idx, sm_scale)
    b, hq, lq, d = q.shape
    page_size, hkv = k_pages.shape[1], k_pages.shape[2]
    g = hq // hkv
    hsel, kk = idx.shape[1], idx.shape[3]
    if kk == 0:
        return torch.zeros(b, hq, lq, d, dtype=q.dtype, device=q.device)
    used, page, off = _slots(idx, block_table, lengths, page_size)
    head = (torch.arange(hsel, device=q.device) // (1 if hsel == hkv else g)).view(1, hsel, 1, 1).expand_as(idx)
    kg = _gather(k_pages, page, off, head)  # [B, Hsel, Lq, K, D]
    vg = _gather(v_pages, page, off, head)
    unused = ~used[..., None]
    kg.masked_fill_(unused, 0)  # unused slots read page 0 offset 0, which may hold anything (NaN included)
    vg.masked_fill_(unused, 0)
    if hsel == hkv:  # one row set per (KV head, query position), shared by the G heads of the group
        kg = kg.view(b, hkv * lq, kk, d)
        vg = vg.view(b, hkv * lq, kk, d)
        qq = q.reshape(b, hkv, g, lq, d).transpose(2, 3).reshape(b, hkv * lq, g, d)
        mask = used.view(b, hkv * lq, 1, kk)
    else:  # per query head: head h reads KV head h // G with its own rows
        kg = kg.view(b, hq * lq, kk, d)
        vg = vg.view(b, hq * lq, kk, d)
        qq = q.reshape(b, hq * lq, 1, d)
        mask = used.view(b, hq * lq, 1, kk)
    dead = ~mask.any(-1, keepdim=True)  # no used slot: 0 by contract (SDPA would give NaN)
    out = F.scaled_dot_product_attention(qq, kg, vg, attn_mask=mask, scale=float(sm_scale)).masked_fill(dead, 0)
    if hsel == hkv:
        out = out.view(b, hkv, lq, g, d).transpose(2, 3).reshape(b, hq, lq, d)
    else:
        out = out.view(b, hq, lq, d)
    return out.contiguous()


# ----------------------------------------------------------------------------------------------- paged labels
def alloc_label_pool(num_pages: int, page_size: int, hkv: int, r: int, bits: int, dtype=torch.float32,
                     device="cpu"):
    """A label cache paged like K: ``data [num_pages, page_size, Hkv, width]`` (``dtype`` at 16 bits, else uint8
    codes), ``scale``/``zero`` fp32 ``[num_pages, page_size, Hkv]`` (empty at 16 bits). A token's labels live at
    the same ``(page, offset)`` as its K row, so the engine's page allocation covers them."""
    checks.check_bits(bits)
    width = checks.label_width(r, bits)
    if bits == 16:
        empty = torch.empty(0, dtype=torch.float32, device=device)
        return torch.zeros(num_pages, page_size, hkv, width, dtype=dtype, device=device), empty, empty.clone()
    return (torch.zeros(num_pages, page_size, hkv, width, dtype=torch.uint8, device=device),
            torch.zeros(num_pages, page_size, hkv, dtype=torch.float32, device=device),
            torch.zeros(num_pages, page_size, hkv, dtype=torch.float32, device=device))


def flat_label_view(data, scale, zero):
    """Views of a label pool as one "sequence" of ``num_pages * page_size`` slots, ``[1, Hkv, slots, width]`` and
    ``[1, Hkv, slots]``: ``dsc::label_write(keys, channels, slots, *view, bits)`` then writes the labels of the
    new tokens ``keys [1, Hkv, T, D]`` (an engine's ``[T, Hkv, D]`` as ``.transpose(0, 1)[None]``) at their flat
    slots ``page * page_size + offset`` (vLLM's slot mapping), for every request of the step in one call."""
    n, p, hkv, w = data.shape
    dv = data.view(n * p, hkv, w).transpose(0, 1)[None]
    if scale.numel() == 0:
        return dv, scale, zero
    return dv, scale.view(n * p, hkv).t()[None], zero.view(n * p, hkv).t()[None]


def gather_labels(data, scale, zero, block_table, s: int):
    """Each request's label rows in logical order, contiguous ``[B, Hkv, s, width]`` / ``[B, Hkv, s]``: the input
    of ``dsc::label_scores`` (with ``lengths``: positions past a request's length, which map to arbitrary rows
    here, score ``-inf``). A stop-gap until a paged label-scores kernel exists: it copies ``r`` of each ``D``."""
    page_size = data.shape[1]
    pos = torch.arange(s, device=data.device)
    logical = (pos // page_size).clamp(max=block_table.shape[1] - 1)
    pages = block_table.long()[:, logical].clamp(0, data.shape[0] - 1)  # [B, s]; padding entries -> any page
    off = (pos % page_size).expand_as(pages)
    out = data[pages, off].permute(0, 2, 1, 3).contiguous()
    if scale.numel() == 0:
        return out, scale, zero
    return out, scale[pages, off].transpose(1, 2).contiguous(), zero[pages, off].transpose(1, 2).contiguous()
