"""Plain-torch oracles of the ``dsc::`` ops, written for clarity, not speed (they repeat K/V and read everything).

They define the semantics of DESIGN.md "Label cache" / "Ops"; the CPU and Triton paths are tested against them.
Quantisation rounds half up (``floor(x + 0.5)``) so every implementation can reproduce it bit for bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import checks


# ----------------------------------------------------------------------------------------------- label cache
def quantize(lab: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 labels ``[..., r]`` -> (uint8 codes ``[..., width]``, scale ``[...]``, zero ``[...]``)."""
    levels = (1 << bits) - 1
    lab = lab.float()
    lo = lab.amin(-1)
    hi = lab.amax(-1)
    scale = (hi - lo) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.floor((lab - lo[..., None]) / safe[..., None] + 0.5).clamp_(0, levels)
    codes = torch.where(scale[..., None] > 0, codes, torch.zeros_like(codes)).to(torch.uint8)
    if bits == 4:
        codes = pack4(codes)
    return codes, scale, lo


def pack4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes ``[..., r]`` (< 16) -> ``[..., ceil(r/2)]``: channel 2j in the low nibble, 2j+1 in the high."""
    if codes.shape[-1] % 2:
        codes = torch.cat([codes, torch.zeros_like(codes[..., :1])], -1)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack4(data: torch.Tensor, r: int) -> torch.Tensor:
    """Inverse of :func:`pack4`, keeping the first ``r`` channels."""
    both = torch.stack([data & 15, data >> 4], -1)
    return both.flatten(-2)[..., :r]


def codes_of(data: torch.Tensor, bits: int, r: int) -> torch.Tensor:
    """Unpacked integer codes ``[..., r]`` of quantized labels."""
    return unpack4(data, r) if bits == 4 else data


def dequantize(data, scale, zero, bits: int, r: int) -> torch.Tensor:
    """Label cache -> fp32 labels ``[B, Hkv, S, r]``."""
    if bits == 16:
        return data.float()
    return codes_of(data, bits, r).float() * scale[..., None] + zero[..., None]


def label_write(keys, channels, positions, data, scale, zero, bits: int) -> None:
    """Gather each KV head's ``r`` channels of ``keys`` and store them (quantized if ``bits < 16``) at ``positions``."""
    checks.check_label_write(keys, channels, positions, data, scale, zero, bits)
    b, hkv, t, d = keys.shape
    r = channels.shape[1]
    lab = keys.gather(-1, channels[None, :, None, :].expand(b, hkv, t, r))  # [B, Hkv, T, r]
    pos = positions.expand(b, t) if positions.dim() == 1 else positions
    bi = torch.arange(b, device=keys.device)[:, None, None]
    hi = torch.arange(hkv, device=keys.device)[None, :, None]
    pi = pos[:, None, :]
    if bits == 16:
        data[bi, hi, pi] = lab.to(data.dtype)
        return
    codes, sc, zp = quantize(lab, bits)
    data[bi, hi, pi] = codes
    scale[bi, hi, pi] = sc
    zero[bi, hi, pi] = zp


def label_sync(k, channels, positions, data, scale, zero, bits: int, state) -> None:
    """A static cache's label step, with every decision taken from the cache itself (what a GPU, or a CUDA graph
    replay, can do without reading anything back). ``k`` already holds this step's rows at ``positions``. For each
    (batch b, KV head h), with ``p0 = positions[0]``, the labels of rows ``[0, p0)`` are trusted when ``p0 == 0``,
    or when ``p0 <= state[b, h, 0]`` (no row past the last one written is assumed) and the label of ``k``'s row
    ``p0 - 1`` computed now equals the stored one (as values, NaN equal to NaN); otherwise those rows are
    relabelled from ``k`` and ``state[b, h, 1]`` counts the rebuild. Then the rows at ``positions`` are labelled
    from ``k`` and ``state[b, h, 0] = positions[-1] + 1``."""
    checks.check_label_sync(k, channels, positions, data, scale, zero, bits, state)
    p0 = int(positions[0])
    for b in range(k.shape[0]):
        for h in range(k.shape[1]):
            if p0 == 0 or (p0 <= int(state[b, h, 0]) and _row_matches(k, channels, data, scale, zero, bits, b, h,
                                                                       p0 - 1)):
                continue
            sc, zp = (scale, zero) if bits == 16 else (scale[b:b + 1, h:h + 1], zero[b:b + 1, h:h + 1])
            label_write(k[b:b + 1, h:h + 1, :p0], channels[h:h + 1], torch.arange(p0, device=k.device),
                        data[b:b + 1, h:h + 1], sc, zp, bits)
            state[b, h, 1] += 1
    label_write(k[:, :, positions], channels, positions, data, scale, zero, bits)
    state[:, :, 0] = positions[-1] + 1


def _row_matches(k, channels, data, scale, zero, bits: int, b: int, h: int, p: int) -> bool:
    """Whether the stored label of row ``p`` (batch ``b``, KV head ``h``) is the label of ``k``'s row ``p``."""
    def same(x, y):
        return bool(((x == y) | (x.isnan() & y.isnan())).all()) if x.is_floating_point() else torch.equal(x, y)

    lab = k[b, h, p, channels[h]]
    if bits == 16:
        return same(lab.to(data.dtype), data[b, h, p])
    codes, sc, zp = quantize(lab, bits)
    return same(codes, data[b, h, p]) and same(sc, scale[b, h, p]) and same(zp, zero[b, h, p])


# ----------------------------------------------------------------------------------------------- masks
def valid_mask(valid, lengths, b: int, hq: int, lq: int, s: int, device) -> torch.Tensor:
    """Bool ``[B, Hq, Lq, S]``: ``valid`` (broadcast) and position < ``lengths[b]``."""
    m = torch.ones(b, hq, lq, s, dtype=torch.bool, device=device)
    if valid is not None:
        m = m & valid
    if lengths is not None:
        m = m & (torch.arange(s, device=device) < lengths[:, None, None, None])
    return m


# ----------------------------------------------------------------------------------------------- ops
def label_scores(q, channels, data, scale, zero, bits: int, valid=None, lengths=None, group: bool = True):
    """Approximate ``q . k`` from the labels, fp32 ``[B, Hsel, Lq, S]``; invalid positions ``-inf``."""
    checks.check_label_scores(q, channels, data, scale, zero, bits, valid, lengths)
    return _label_scores(q, channels, data, scale, zero, bits, valid, lengths, group)


def _label_scores(q, channels, data, scale, zero, bits, valid, lengths, group):
    b, hq, lq, _ = q.shape
    hkv, s = data.shape[1], data.shape[2]
    g = hq // hkv
    r = channels.shape[1]
    ch = channels.repeat_interleave(g, 0)  # [Hq, r]
    qc = q.float().gather(-1, ch[None, :, None, :].expand(b, hq, lq, r))
    lab = dequantize(data, scale, zero, bits, r).repeat_interleave(g, 1)  # [B, Hq, S, r]
    sc = qc @ lab.transpose(-1, -2)  # [B, Hq, Lq, S]
    m = valid_mask(valid, lengths, b, hq, lq, s, q.device)
    if group:
        m = m.view(b, hkv, g, lq, s).all(2)
        return group_scores(sc.view(b, hkv, g, lq, s).masked_fill(~m[:, :, None], float("-inf")))
    return sc.masked_fill(~m, float("-inf")).contiguous()


def group_valid(valid, b: int, hkv: int, g: int, lq: int, s: int):
    """A per-query-head ``valid`` ``[.., Hq, Lq, S]`` as group selection reads it, still ``[B, Hq, Lq, S]``: a
    position only where every head of its group may see it (a mask shared by the heads is returned as is)."""
    if valid is None or valid.dim() < 3 or valid.shape[-3] == 1:
        return valid
    per_group = valid.expand(b, hkv * g, lq, s).view(b, hkv, g, lq, s).all(2, keepdim=True)
    return per_group.expand(b, hkv, g, lq, s).reshape(b, hkv * g, lq, s)


def group_scores(per_head: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """One score per KV group from its query heads' label scores ``[B, Hkv, G, Lq, S]`` (invalid ``-inf``): for
    each position, the largest over the group's heads of its score minus that head's best score in the row. Each
    head's picks then count on one scale (a position a head ranks near its top ranks high for the group), where
    summing raw scores let one head's large logits drown the others' picks. Measured on SmolLM2 at 2K context
    (``dsc eval ppl --context 2048 --windows 2``): k=128 +1.79% perplexity (raw sum +3.85%; each head's
    log-softmax instead of its max +1.74%, at ~5x this reduction's cost on the CPU; selecting per head +1.53%);
    1/16: +4.23% (sum +6.06%, log-softmax +3.99%, per head +3.10%). NaN scores stay NaN (valid, ranked first; a
    head whose row holds a NaN is not normalized), invalid stay ``-inf``. The definition: the CPU torch path
    calls it on its per-head scores (``inplace``: ``per_head`` is a scratch buffer the caller lets this overwrite,
    sparing a buffer of its size); the native and Triton kernels compute it fused and are tested against it."""
    top = per_head.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a NaN row, or nothing valid
    shifted = per_head.sub_(top) if inplace else per_head - top
    return shifted.amax(2).contiguous()


def select_topk(scores, budget: int, frac: float = 0.0, sink: int = 0, recent: int = 0):
    """Top-k positions per row (``-inf`` = invalid; NaN counts as valid and ranks first) with forced recent/sink
    positions; unused slots ``-1``.

    A row with ``n`` valid positions keeps ``min(n, budget)`` slots, or ``min(n, max(budget, ceil(frac * n)))``
    when ``frac > 0`` (``budget`` is then the fraction's floor). Forced positions fit inside that: first the
    ``min(recent, keep)`` last valid positions (the current token is the last), then ``min(sink, keep - n_recent)``
    first ones; the remaining slots go to the best-scored other positions.
    """
    checks.check_select(scores, budget, frac, sink, recent)
    return _select_topk(scores, budget, frac, sink, recent)


def _select_topk(scores, budget, frac, sink, recent):
    s = scores.shape[-1]
    kk = checks.topk_width(s, budget, frac)
    ok = ~(scores == float("-inf"))
    nvalid = ok.sum(-1)
    if frac == 0:
        keep = torch.clamp(nvalid, max=budget)
    else:
        keep = torch.minimum(nvalid, torch.clamp(torch.ceil(nvalid.double() * frac).long(), min=budget))
    n_recent = torch.clamp(keep, max=recent)
    n_sink = torch.clamp(keep - n_recent, max=sink)
    rank_first = ok.cumsum(-1)  # 1-based rank of a valid position from the start
    rank_last = ok.flip(-1).cumsum(-1).flip(-1)  # ... and from the end
    forced = ok & ((rank_first <= n_sink[..., None]) | (rank_last <= n_recent[..., None]))
    key = scores.float().masked_fill(forced, float("inf"))
    idx = key.topk(kk, dim=-1).indices
    slot = torch.arange(kk, device=scores.device)
    return torch.where(slot < keep[..., None], idx, torch.full_like(idx, -1)).contiguous()


def sparse_attention(q, k, v, idx, sm_scale: float, bias=None):
    """Exact attention of each query over its selected rows only (fp32 softmax); rows with no slot give 0."""
    checks.check_sparse_attention(q, k, v, idx, sm_scale, bias)
    return _sparse_attention(q, k, v, idx, sm_scale, bias)


def _sparse_attention(q, k, v, idx, sm_scale, bias):
    b, hq, lq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    if idx.shape[1] != hq:
        idx = idx.repeat_interleave(g, 1)
    kk = idx.shape[-1]
    used = idx >= 0
    ii = idx.clamp(min=0)
    kf = k.float().repeat_interleave(g, 1)  # oracle only: the fast paths never repeat K/V
    vf = v.float().repeat_interleave(g, 1)
    gather = ii.reshape(b, hq, lq * kk, 1).expand(b, hq, lq * kk, d)
    kg = kf.gather(2, gather).view(b, hq, lq, kk, d)
    vg = vf.gather(2, gather).view(b, hq, lq, kk, d)
    bias_sel = None if bias is None else bias.float().expand(b, hq, lq, s).gather(-1, ii)
    return attend_rows(q, kg, vg, used, sm_scale, bias_sel)


def attend_rows(q, rows_k, rows_v, used, sm_scale: float, bias=None):
    """Exact fp32 attention of ``q [B, Hq, Lq, D]`` over its gathered rows ``[B, Hq, Lq, K, D]``: slots with
    ``used`` False are skipped (``bias``, per slot, added to the logits); a row with no slot gives 0."""
    logits = torch.einsum("bhld,bhlkd->bhlk", q.float(), rows_k) * sm_scale
    if bias is not None:
        logits = logits + bias
    logits = logits.masked_fill(~used, float("-inf"))
    m = logits.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(logits - m)
    den = p.sum(-1, keepdim=True)
    out = torch.einsum("bhlk,bhlkd->bhld", p, rows_v) / torch.where(den > 0, den, torch.ones_like(den))
    return out.to(q.dtype).contiguous()


def ds_decode(q, k, v, channels, data, scale, zero, bits: int, valid=None, bias=None, lengths=None,
              budget: int = 64, frac: float = 0.0, sink: int = 0, recent: int = 0, group: bool = True,
              sm_scale: float | None = None):
    """Label scores -> top-k -> exact attention over the selected rows (arguments checked once, here)."""
    if sm_scale is None:
        sm_scale = q.shape[-1] ** -0.5
    checks.check_ds_decode(q, k, v, channels, data, scale, zero, bits, valid, bias, lengths, budget, frac, sink,
                           recent, sm_scale)
    sc = _label_scores(q, channels, data, scale, zero, bits, valid, lengths, group)
    idx = _select_topk(sc, budget, frac, sink, recent)
    return _sparse_attention(q, k, v, idx, sm_scale, bias)


def dense_attention(q, k, v, attn_mask=None, is_causal: bool = False, scale: float | None = None):
    """Exact attention of ``q [B, Hq, Lq, D]`` over KV-native ``k``/``v`` ``[B, Hkv, S, D]``: by definition, SDPA with
    ``enable_gqa`` (query head ``h`` reads KV head ``h // G``, HF's ``repeat_kv`` order)."""
    checks.check_dense_attention(q, k, v, attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1]).contiguous()


# ----------------------------------------------------------------------------------------------- offload helpers
def write_rows(src, positions, dst) -> None:
    """``dst[b, :, positions] = src[b]`` for ``src [B, Hkv, T, D]``, ``positions`` ``[T]`` or ``[B, T]``
    (``dst [B, Hkv, capacity, D]``, on src's device or in host memory)."""
    checks.check_write_rows(src, positions, dst)
    b, _, t, _ = src.shape
    pos = positions.expand(b, t) if positions.dim() == 1 else positions
    for i in range(b):
        dst[i].index_copy_(1, pos[i].to(dst.device), src[i].to(dst.device))


def sparse_attention_host(q, k, v, idx, sm_scale: float, bias=None):
    """:func:`sparse_attention` with ``k``/``v`` in host memory (``q`` on any device): the host rows are moved to
    q's device, then the contiguous oracle runs."""
    checks.check_host_kv(q, k, v, idx, sm_scale, bias)
    return _sparse_attention(q, k.to(q.device), v.to(q.device), idx, sm_scale, bias)


def alloc_labels(b: int, hkv: int, s: int, r: int, bits: int, dtype=torch.float32, device="cpu"):
    """An empty label cache ``(data, scale, zero)`` for ``r`` channels at ``bits`` bits (``dtype`` if 16)."""
    checks.check_bits(bits)
    if bits == 16:
        empty = torch.empty(0, dtype=torch.float32, device=device)
        return torch.zeros(b, hkv, s, r, dtype=dtype, device=device), empty, empty.clone()
    data = torch.zeros(b, hkv, s, checks.label_width(r, bits), dtype=torch.uint8, device=device)
    return (data, torch.zeros(b, hkv, s, dtype=torch.float32, device=device),
            torch.zeros(b, hkv, s, dtype=torch.float32, device=device))


def label_prefix(data, scale, zero, bits: int, s: int):
    """The first ``s`` positions of a label cache ``(data, scale, zero)``, as views (16-bit labels have no
    scale/zero: those stay as they are)."""
    if bits == 16:
        return data[:, :, :s], scale, zero
    return data[:, :, :s], scale[:, :, :s], zero[:, :, :s]
