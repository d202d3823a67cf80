"""Triton kernels of Double Sparsity decoding (launchers in :mod:`.triton_ops`).

Every load is upcast to fp32 at once (the interpreter's bf16 arithmetic is wrong, and fp32 accumulation is the
contract anyway). Grids are (rows, blocks-of-S) or (rows, splits): no power-of-two length limits, all lengths are
masked, nothing reads a value back to the host.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _labels(krow, tm, ch, h, R, sk3, BITS: tl.constexpr, BLOCK_T: tl.constexpr, C_PAD: tl.constexpr):
    """The labels of a block of key rows (``krow``: row pointers ``[BLOCK_T, 1]``; rows ``tm``): ``(values
    [BLOCK_T, C_PAD], stored columns [C_PAD], scale, zero)``; the values are the r channels in fp32 (16 bits) or the
    packed codes (8/4 bits; scale and zero as :func:`dsc.kernels.reference.quantize`)."""
    j = tl.arange(0, C_PAD)
    if BITS == 16:
        wm = j < R
        c = tl.load(ch + h * R + j, mask=wm, other=0)
        vals = tl.load(krow + c[None, :] * sk3, mask=tm[:, None] & wm[None, :], other=0.0).to(tl.float32)
        sc = tl.zeros((BLOCK_T,), dtype=tl.float32)  # unused at 16 bits
        lo = sc
    else:
        levels = (1 << BITS) - 1
        if BITS == 8:
            ce = j
        else:
            ce = 2 * j
        me = ce < R
        c = tl.load(ch + h * R + ce, mask=me, other=0)
        xe = tl.load(krow + c[None, :] * sk3, mask=tm[:, None] & me[None, :], other=0.0).to(tl.float32)
        lo = tl.min(tl.where(me[None, :], xe, float("inf")), axis=1)
        hi = tl.max(tl.where(me[None, :], xe, float("-inf")), axis=1)
        if BITS == 4:
            co = 2 * j + 1
            mo = co < R
            c2 = tl.load(ch + h * R + co, mask=mo, other=0)
            xo = tl.load(krow + c2[None, :] * sk3, mask=tm[:, None] & mo[None, :], other=0.0).to(tl.float32)
            lo = tl.minimum(lo, tl.min(tl.where(mo[None, :], xo, float("inf")), axis=1))
            hi = tl.maximum(hi, tl.max(tl.where(mo[None, :], xo, float("-inf")), axis=1))
        sc = (hi - lo) / levels
        pos_sc = sc > 0
        safe = tl.where(pos_sc, sc, 1.0)
        qe = tl.floor((xe - lo[:, None]) / safe[:, None] + 0.5)
        qe = tl.where(pos_sc[:, None], tl.minimum(tl.maximum(qe, 0.0), levels), 0.0).to(tl.int32)
        if BITS == 4:
            qo = tl.floor((xo - lo[:, None]) / safe[:, None] + 0.5)
            qo = tl.where(pos_sc[:, None] & mo[None, :], tl.minimum(tl.maximum(qo, 0.0), levels), 0.0)
            vals = qe | (qo.to(tl.int32) << 4)
            wm = j < (R + 1) // 2
        else:
            vals = qe
            wm = me
    return vals, wm, sc, lo


@triton.jit
def _store_labels(drow, srow, tm, vals, wm, sc, lo, data, scale, zero, sd3,
                  BITS: tl.constexpr, C_PAD: tl.constexpr):
    """Store :func:`_labels`' output at the label rows ``drow`` (``[BLOCK_T, 1]`` pointers into ``data``) and the
    scale/zero offsets ``srow``."""
    j = tl.arange(0, C_PAD)
    tl.store(drow + j[None, :] * sd3, vals.to(data.dtype.element_ty), mask=tm[:, None] & wm[None, :])
    if BITS != 16:
        tl.store(scale + srow, sc, mask=tm)
        tl.store(zero + srow, lo, mask=tm)


@triton.jit
def label_write_kernel(keys, ch, pos, data, scale, zero,
                       T, R, HKV,
                       sk0, sk1, sk2, sk3, sp0, sp1, sd0, sd1, sd2, sd3, ss0, ss1, ss2,
                       BITS: tl.constexpr, BLOCK_T: tl.constexpr, C_PAD: tl.constexpr):
    """One program per (batch * KV head, block of T new tokens): gather r channels, quantize, pack, store."""
    pid = tl.program_id(0)
    b = (pid // HKV).to(tl.int64)  # int64 offsets: batch strides of long caches overflow int32
    h = pid % HKV
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < T
    p = tl.load(pos + b * sp0 + t * sp1, mask=tm, other=0)
    vals, wm, sc, lo = _labels(keys + b * sk0 + h * sk1 + t[:, None] * sk2, tm, ch, h, R, sk3, BITS, BLOCK_T, C_PAD)
    _store_labels(data + b * sd0 + h * sd1 + p[:, None] * sd2, b * ss0 + h * ss1 + p * ss2, tm, vals, wm, sc, lo,
                  data, scale, zero, sd3, BITS, C_PAD)


@triton.jit
def _same(a, b):
    """Equal as values, NaN equal to NaN."""
    return (a == b) | ((a != a) & (b != b))


@triton.jit
def label_sync_kernel(k, ch, pos, data, scale, zero, state,
                      T, R, HKV,
                      sk0, sk1, sk2, sk3, sp, sd0, sd1, sd2, sd3, ss0, ss1, ss2, st0, st1, st2,
                      BITS: tl.constexpr, BLOCK_T: tl.constexpr, C_PAD: tl.constexpr):
    """One program per (batch, KV head) of a static cache's decode step (:func:`dsc.kernels.reference.label_sync`):
    the labels of rows ``[0, p0)`` are trusted when ``p0 == 0``, or ``p0 <= state[0]`` and the row ``p0 - 1``
    relabelled from ``k`` equals its stored label; otherwise they are rebuilt from ``k`` (a loop whose trip count
    is read here, on the device) and ``state[1]`` counts it. Then the rows at ``pos`` (this step's, already in
    ``k``) are labelled and ``state[0]`` becomes ``pos[T-1] + 1``. Everything it decides, it decides on the device:
    no host reads, a launch that depends on shapes only."""
    pid = tl.program_id(0)
    b = (pid // HKV).to(tl.int64)
    h = pid % HKV
    t = tl.arange(0, BLOCK_T)
    j = tl.arange(0, C_PAD)
    p0 = tl.load(pos)
    st = state + b * st0 + h * st1
    seen = tl.load(st)
    kb = k + b * sk0 + h * sk1
    db = data + b * sd0 + h * sd1
    sb = b * ss0 + h * ss1
    # the row before this step, relabelled and compared (first lane only)
    last = p0 - 1 + t
    lm = (t == 0) & (p0 > 0) & (p0 <= seen)
    vals, wm, sc, lo = _labels(kb + last[:, None] * sk2, lm, ch, h, R, sk3, BITS, BLOCK_T, C_PAD)
    m2 = lm[:, None] & wm[None, :]
    have = tl.load(db + last[:, None] * sd2 + j[None, :] * sd3, mask=m2, other=0)
    differ = tl.sum(tl.where(m2 & ~_same(vals.to(data.dtype.element_ty), have), 1, 0))
    if BITS != 16:
        differ += tl.sum(tl.where(lm & ~_same(sc, tl.load(scale + sb + last * ss2, mask=lm, other=0.0)), 1, 0))
        differ += tl.sum(tl.where(lm & ~_same(lo, tl.load(zero + sb + last * ss2, mask=lm, other=0.0)), 1, 0))
    trusted = (p0 == 0) | ((p0 <= seen) & (differ == 0))
    stale_rows = tl.where(trusted, 0, p0)
    for start in range(0, stale_rows, BLOCK_T):
        rows = start + t
        rm = rows < stale_rows
        vals, wm, sc, lo = _labels(kb + rows[:, None] * sk2, rm, ch, h, R, sk3, BITS, BLOCK_T, C_PAD)
        _store_labels(db + rows[:, None] * sd2, sb + rows * ss2, rm, vals, wm, sc, lo, data, scale, zero, sd3,
                      BITS, C_PAD)
    for start in range(0, T, BLOCK_T):
        tt = start + t
        tm = tt < T
        p = tl.load(pos + tt * sp, mask=tm, other=0)
        vals, wm, sc, lo = _labels(kb + p[:, None] * sk2, tm, ch, h, R, sk3, BITS, BLOCK_T, C_PAD)
        _store_labels(db + p[:, None] * sd2, sb + p * ss2, tm, vals, wm, sc, lo, data, scale, zero, sd3, BITS, C_PAD)
    tl.store(st, tl.load(pos + (T - 1) * sp) + 1)
    tl.store(st + st2, tl.load(st + st2) + tl.where(trusted, 0, 1))


@triton.jit
def label_scores_kernel(q, ch, data, scale, zero, valid, lengths, top, out,
                        HSEL, LQ, S, R, G, NH,
                        sq0, sq1, sq2, sq3, sd0, sd1, sd2, sd3, ss0, ss1, ss2,
                        sv0, sv1, sv2, sv3, so0, so1, so2, so3,
                        BITS: tl.constexpr, HAS_VALID: tl.constexpr, HAS_LEN: tl.constexpr, MODE: tl.constexpr,
                        BLOCK_S: tl.constexpr, C_PAD: tl.constexpr):
    """One program per (batch * row * query position, block of S), a row being one query head (``NH = 1``) or one
    KV group (``NH = G`` heads, its labels decoded once for all of them). fp32 label scores, a position valid where
    every head of the row may see it. ``MODE`` 0: the head's scores to ``out``; 1: each head's largest score in the
    block to ``top`` (``[B, Hq, Lq, blocks]``; NaN if the block holds one); 2: the group score to ``out``, the
    largest over the heads of score minus the head's best in the row (``top`` ``[B, Hq, Lq]``, the largest of the
    block maxima; not finite: no shift), as :func:`dsc.kernels.reference.group_scores` defines it."""
    pid = tl.program_id(0)
    b = (pid // (HSEL * LQ)).to(tl.int64)
    hs = (pid // LQ) % HSEL
    lq = pid % LQ
    head0 = hs * NH  # the row's first query head
    kvh = head0 // G
    blk = tl.program_id(1)
    s = blk * BLOCK_S + tl.arange(0, BLOCK_S)
    sm = s < S
    j = tl.arange(0, C_PAD)
    if BITS == 4:
        ce = 2 * j
    else:
        ce = j
    me = ce < R
    c = tl.load(ch + kvh * R + ce, mask=me, other=0)
    if BITS == 4:
        co = 2 * j + 1
        mo = co < R
        c2 = tl.load(ch + kvh * R + co, mask=mo, other=0)
    ok = sm
    if HAS_LEN:
        ok = ok & (s < tl.load(lengths + b))
    if HAS_VALID:
        for i in range(NH):
            vv = tl.load(valid + b * sv0 + (head0 + i) * sv1 + lq * sv2 + s * sv3, mask=sm, other=0)
            ok = ok & (vv != 0)
    drow = data + b * sd0 + kvh * sd1 + s[:, None] * sd2
    if BITS == 16:
        lab = tl.load(drow + j[None, :] * sd3, mask=sm[:, None] & me[None, :], other=0.0).to(tl.float32)
    elif BITS == 8:
        lab = tl.load(drow + j[None, :] * sd3, mask=sm[:, None] & me[None, :], other=0).to(tl.float32)
    else:
        wm = j < (R + 1) // 2
        byte = tl.load(drow + j[None, :] * sd3, mask=sm[:, None] & wm[None, :], other=0).to(tl.int32)
        lab = (byte & 15).to(tl.float32)
        lab_hi = ((byte >> 4) & 15).to(tl.float32)
    if BITS != 16:
        srow = b * ss0 + kvh * ss1 + s * ss2
        sc = tl.load(scale + srow, mask=sm, other=0.0)
        zp = tl.load(zero + srow, mask=sm, other=0.0)
    best = tl.full([BLOCK_S], float("-inf"), tl.float32)
    nan = s < 0  # no NaN yet
    for i in range(NH):
        qrow = q + b * sq0 + (head0 + i) * sq1 + lq * sq2
        qe = tl.load(qrow + c * sq3, mask=me, other=0.0).to(tl.float32)
        score = tl.sum(lab * qe[None, :], axis=1)
        if BITS != 16:
            qsum = tl.sum(qe, axis=0)
            if BITS == 4:
                qo = tl.load(qrow + c2 * sq3, mask=mo, other=0.0).to(tl.float32)
                score += tl.sum(lab_hi * qo[None, :], axis=1)
                qsum += tl.sum(qo, axis=0)
            score = sc * score + zp * qsum
        row = (b * HSEL * NH + head0 + i) * LQ + lq  # this head's row of top ([B, Hq, Lq, ...])
        if MODE == 0:
            tl.store(out + b * so0 + hs * so1 + lq * so2 + s * so3, tl.where(ok, score, float("-inf")), mask=sm)
        elif MODE == 1:
            seen = ok & (score == score)
            m = tl.max(tl.where(seen, score, float("-inf")), axis=0)
            has_nan = tl.sum((ok & (score != score)).to(tl.int32), axis=0) > 0
            tl.store(top + row * tl.num_programs(1) + blk, tl.where(has_nan, float("nan"), m))
        else:
            t = tl.load(top + row)
            shifted = score - tl.where((t == t) & (tl.abs(t) != float("inf")), t, 0.0)  # NaN or no valid: no shift
            nan = nan | (shifted != shifted)
            best = tl.maximum(best, tl.where(shifted == shifted, shifted, float("-inf")))
    if MODE == 2:
        group = tl.where(nan, float("nan"), best)
        tl.store(out + b * so0 + hs * so1 + lq * so2 + s * so3, tl.where(ok, group, float("-inf")), mask=sm)


@triton.jit
def sparse_attn_split_kernel(q, k, v, idx, bias, o_part, lse_part,
                             HQ, HSEL, LQ, KK, D, G, NSPLIT, CHUNK, sm_scale,
                             sq0, sq1, sq2, sq3, sk0, sk1, sk2, sk3, sv0, sv1, sv2, sv3,
                             si0, si1, si2, si3, sb0, sb1, sb2, sb3,
                             GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, NATIVE_DOT: tl.constexpr,
                             Q_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """Flash-decoding split: one program per (batch * selection head * query position, split of the K slots).

    The query rows of a program are the G heads of a KV group (group mode) or one head; each selected K/V row is
    gathered once by index and used for all of them. Writes the split's normalised output and log-sum-exp.
    """
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
    m_i = tl.full([Q_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([Q_PAD], dtype=tl.float32)
    acc = tl.zeros([Q_PAD, D_PAD], dtype=tl.float32)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, KK)
    irow = idx + b * si0 + hs * si1 + lq * si2
    for off in range(start, end, BLOCK_N):
        n = off + tl.arange(0, BLOCK_N)
        ix = tl.load(irow + n * si3, mask=n < end, other=-1)
        ok = ix >= 0
        ixs = tl.where(ok, ix, 0)
        m2 = ok[:, None] & dm[None, :]
        kb = tl.load(k + b * sk0 + kvh * sk1 + ixs[:, None] * sk2 + d[None, :] * sk3, mask=m2, other=0.0)
        vb = tl.load(v + b * sv0 + kvh * sv1 + ixs[:, None] * sv2 + d[None, :] * sv3, mask=m2, other=0.0)
        if NATIVE_DOT:  # GPU with fp16/bf16 inputs: tensor-core dot, fp32 accumulation
            s = tl.dot(qb.to(kb.dtype), tl.trans(kb))
        else:
            s = tl.dot(qb, tl.trans(kb.to(tl.float32)), input_precision="ieee")
        s = s * sm_scale
        if HAS_BIAS:
            s += tl.load(bias + b * sb0 + heads[:, None] * sb1 + lq * sb2 + ixs[None, :] * sb3,
                         mask=rm[:, None] & ok[None, :], other=0.0).to(tl.float32)
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
    # partials laid out [B, Hq, Lq, NSPLIT, D] / [B, Hq, Lq, NSPLIT] (contiguous), by real query head
    prow = ((b * HQ + heads) * LQ + lq) * NSPLIT + split
    tl.store(o_part + prow[:, None] * D + d[None, :], o, mask=rm[:, None] & dm[None, :])
    tl.store(lse_part + prow, lse, mask=rm)


@triton.jit
def merge_kernel(o_part, lse_part, out, HQ, LQ, NSPLIT, D,
                 so0, so1, so2, so3,
                 S_PAD: tl.constexpr, D_PAD: tl.constexpr):
    """Combine the splits of one (batch, query head, position) by their log-sum-exp; no slot at all -> 0."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // (HQ * LQ)
    h = (pid // LQ) % HQ
    lq = pid % LQ
    sp = tl.arange(0, S_PAD)
    spm = sp < NSPLIT
    d = tl.arange(0, D_PAD)
    dm = d < D
    lse = tl.load(lse_part + pid * NSPLIT + sp, mask=spm, other=float("-inf"))
    mx = tl.max(lse, axis=0)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp(lse - mx)
    o = tl.load(o_part + (pid * NSPLIT + sp[:, None]) * D + d[None, :], mask=spm[:, None] & dm[None, :], other=0.0)
    tot = tl.sum(w, axis=0)
    res = tl.sum(o * w[:, None], axis=0) / tl.where(tot > 0, tot, 1.0)
    tl.store(out + b * so0 + h * so1 + lq * so2 + d * so3, res.to(out.dtype.element_ty), mask=dm)


@triton.jit
def rows_write_kernel(src, pos, dst, T, D, HKV,
                      ss0, ss1, ss2, ss3, sp0, sp1, sd0, sd1, sd2, sd3,
                      BLOCK_T: tl.constexpr, D_PAD: tl.constexpr):
    """One program per (batch * KV head, block of T rows): ``dst[b, h, pos[t]] = src[b, h, t]``.

    ``dst`` may be pinned host memory (the offload store): the GPU writes it over the bus in stream order, so a
    later kernel on the same stream reads the row, with no host-side wait."""
    pid = tl.program_id(0)
    b = (pid // HKV).to(tl.int64)
    h = pid % HKV
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < T
    p = tl.load(pos + b * sp0 + t * sp1, mask=tm, other=0)
    d = tl.arange(0, D_PAD)
    m2 = tm[:, None] & (d < D)[None, :]
    x = tl.load(src + b * ss0 + h * ss1 + t[:, None] * ss2 + d[None, :] * ss3, mask=m2, other=0.0)
    tl.store(dst + b * sd0 + h * sd1 + p[:, None] * sd2 + d[None, :] * sd3, x, mask=m2)


@triton.jit
def _order_keys(x, forced):
    """int32 keys that order like the selection ranks them: forced (sink/recent) > NaN > +inf > ... > finite, as
    signed integers (a float's bits, magnitude bits flipped when negative)."""
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    key = tl.where(x != x, 0x7FFFFFFE, key)
    return tl.where(forced, 0x7FFFFFFF, key)


@triton.jit
def _row_block(row, start, S, nvalid, n_sink, n_recent, upto0, BLOCK: tl.constexpr):
    """One block of a row's scores: positions, validity (score > -inf), the order keys, and the valid count
    carried past the block (the running count tells sink and recent positions apart)."""
    pos = start + tl.arange(0, BLOCK)
    x = tl.load(row + pos, mask=pos < S, other=float("-inf"))
    ok = x != float("-inf")
    upto = upto0 + tl.cumsum(ok.to(tl.int32), 0)  # valid positions at or before pos
    forced = ok & ((upto <= n_sink) | (nvalid - upto < n_recent))
    return pos, ok, _order_keys(x, forced), upto0 + tl.sum(ok.to(tl.int32), 0)


@triton.jit
def select_kernel(sc, idx, S, KK, budget, sink, recent, FRAC: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row of scores ``[rows, S]``: its ``keep`` best valid positions (sink and recent forced in)
    into ``idx[row, :keep]`` in position order, ``-1`` after. A radix select on the order keys, a byte per pass
    from the top, finds the keep-th best key T; a last pass writes the positions above T and the first ties at T.
    No sort, no score copy, no pass outside the kernel; the counts stay on the device."""
    pid = tl.program_id(0).to(tl.int64)
    row = sc + pid * S
    out = idx + pid * KK
    zero = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), 0)
    nvalid = zero
    for start in range(0, S, BLOCK):
        pos = start + tl.arange(0, BLOCK)
        x = tl.load(row + pos, mask=pos < S, other=float("-inf"))
        nvalid += tl.sum((x != float("-inf")).to(tl.int32), 0)
    if FRAC == 0.0:
        keep = tl.minimum(nvalid, KK)
    else:  # ceil(n * frac) in fp64, as the budget rule (checks.keep_count) states it; the budget is its floor
        share = tl.maximum(tl.ceil(nvalid.to(tl.float64) * FRAC).to(tl.int32), budget)
        keep = tl.minimum(tl.minimum(share, nvalid), KK)
    n_recent = tl.minimum(keep, recent)
    n_sink = tl.minimum(keep - n_recent, sink)
    remaining = keep  # how many of the keys matching the prefix found so far are still to take
    prefix = zero
    bins = tl.arange(0, 256)
    for p in tl.static_range(4):
        shift = 24 - 8 * p
        mask_above = -(1 << (32 - 8 * p)) if p > 0 else 0  # the bytes already fixed
        hist = tl.zeros([256], dtype=tl.int32)
        upto = zero
        for start in range(0, S, BLOCK):
            pos, ok, key, upto = _row_block(row, start, S, nvalid, n_sink, n_recent, upto, BLOCK)
            digit = (key >> shift) & 255
            if p == 0:
                digit = digit ^ 128  # the sign byte: negative keys below positive ones
            hist += tl.histogram(digit, 256, mask=ok & ((key & mask_above) == prefix))
        at_least = tl.sum(hist, 0) - tl.cumsum(hist, 0) + hist  # keys with this byte or a higher one
        d = tl.sum((at_least >= remaining).to(tl.int32), 0) - 1
        remaining -= tl.sum(tl.where(bins > d, hist, 0), 0)
        if p == 0:
            d = d ^ 128
        prefix = prefix | (d << shift)
    taken = zero
    ties = zero
    upto = zero
    for start in range(0, S, BLOCK):
        pos, ok, key, upto = _row_block(row, start, S, nvalid, n_sink, n_recent, upto, BLOCK)
        tie = ok & (key == prefix)
        sel = (ok & (key > prefix)) | (tie & (ties + tl.cumsum(tie.to(tl.int32), 0) <= remaining))
        ties += tl.sum(tie.to(tl.int32), 0)
        tl.store(out + taken + tl.cumsum(sel.to(tl.int32), 0) - 1, pos.to(tl.int64), mask=sel)
        taken += tl.sum(sel.to(tl.int32), 0)
    for start in range(0, KK, BLOCK):
        slot = start + tl.arange(0, BLOCK)
        tl.store(out + slot, tl.full([BLOCK], -1, tl.int64), mask=(slot >= keep) & (slot < KK))
