"""Argument validation shared by every implementation of the ``dsc::`` ops.

Each check raises ``ValueError`` naming the offending argument and saying how to fix it. Checks that would need the
tensor's *values* (channel ids, positions in range) run only on CPU tensors: on a GPU they would force a host
synchronisation, which the decode path must never do.
"""
from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import is_fake

BITS = (4, 8, 16)


def _fail(name: str, msg: str) -> None:
    raise ValueError(f"{name}: {msg}")


def _rank(name: str, t: torch.Tensor, rank: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(name, f"expected a tensor {layout}, got {type(t).__name__}")
    if t.dim() != rank:
        _fail(name, f"expected rank {rank} {layout}, got shape {tuple(t.shape)}")


def _has_values(t: torch.Tensor) -> bool:
    """True when reading ``t``'s values is free: a real CPU tensor (not fake, not on an accelerator)."""
    return t.device.type == "cpu" and t.numel() > 0 and not is_fake(t)


def value_range(t: torch.Tensor) -> tuple[int, int]:
    """``(min, max)`` of an integer CPU tensor with values. Checks run on every decode step, so the read is lean:
    one ``tolist`` for a few values, one ``aminmax`` otherwise; and it is remembered on ``t`` until ``t`` is
    modified in place (its version counter moves, views included): channel ids, read by two ops per layer and step,
    are read once. Inference tensors have no version counter and are read every time."""
    version = None if t.is_inference() else t._version
    seen = getattr(t, "_dsc_value_range", None)
    if seen is not None and version is not None and seen[0] == version:
        return seen[1]
    if t.numel() <= 16:
        values = t.flatten().tolist()
        lo_hi = (min(values), max(values))
    else:
        lo_hi = tuple(int(x) for x in torch.aminmax(t))
    if version is not None:
        t._dsc_value_range = (version, lo_hi)
    return lo_hi


def _same_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            _fail(name, f"is on {t.device} but {ref_name} is on {ref.device}; move both to one device")


def label_width(r: int, bits: int) -> int:
    """Last dimension of the label ``data`` tensor for ``r`` channels at ``bits`` bits (4-bit packs two per byte)."""
    return (r + 1) // 2 if bits == 4 else r


def check_bits(bits: int) -> None:
    if bits not in BITS:
        _fail("bits", f"must be one of {BITS} (16 = native key dtype, 8/4 = quantized), got {bits!r}")


def check_channels(channels: torch.Tensor, hkv: int, d: int) -> int:
    """Validate ``channels [Hkv, r]`` (int64 ids in ``[0, D)``); return ``r``."""
    _rank("channels", channels, 2, "[Hkv, r] of int64 channel ids")
    if channels.dtype != torch.int64:
        _fail("channels", f"must be int64, got {channels.dtype}; use channels.long()")
    if channels.shape[0] != hkv:
        _fail("channels", f"has {channels.shape[0]} rows for {hkv} KV heads; need one row per KV head")
    r = channels.shape[1]
    if r < 1 or r > d:
        _fail("channels", f"selects {r} channels per head; need 1 <= r <= head_dim ({d})")
    if _has_values(channels):
        lo, hi = value_range(channels)
        if lo < 0 or hi >= d:
            _fail("channels", f"ids must lie in [0, {d}) (head_dim {d}); got range [{lo}, {hi}]")
    return r


def check_labels(data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                 b: int, hkv: int, r: int) -> int:
    """Validate the label cache against ``B``, ``Hkv``, ``r``; return its length ``S``."""
    check_bits(bits)
    _rank("data", data, 4, "[B, Hkv, S, r] label cache")
    width = label_width(r, bits)
    if data.shape[0] != b or data.shape[1] != hkv or data.shape[3] != width:
        _fail("data", f"has shape {tuple(data.shape)}; expected [{b}, {hkv}, S, {width}] for r={r} at {bits} bits")
    s = data.shape[2]
    if bits == 16:
        if not data.dtype.is_floating_point:
            _fail("data", f"16-bit (native) labels must be a float dtype, got {data.dtype}")
    else:
        if data.dtype != torch.uint8:
            _fail("data", f"{bits}-bit labels must be uint8 codes, got {data.dtype}")
        for name, t in (("scale", scale), ("zero", zero)):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (b, hkv, s) or t.dtype != torch.float32:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else t
                _fail(name, f"quantized labels need a float32 [{b}, {hkv}, {s}] tensor, got "
                            f"{shape} {getattr(t, 'dtype', '')}")
    _same_device("data", data, scale=scale, zero=zero)
    return s


def check_positions(positions: torch.Tensor, b: int, t: int, s: int) -> None:
    if not isinstance(positions, torch.Tensor) or positions.dtype != torch.int64:
        _fail("positions", "must be an int64 tensor [T] or [B, T]")
    if tuple(positions.shape) not in ((t,), (b, t)):
        _fail("positions", f"has shape {tuple(positions.shape)}; expected [{t}] or [{b}, {t}] (T = keys.shape[2])")
    if _has_values(positions):
        lo, hi = value_range(positions)
        if lo < 0 or hi >= s:
            _fail("positions", f"must lie in [0, {s}) (the label cache length); got [{lo}, {hi}]")


def _check_keys_labels(name: str, keys, layout: str, channels, data, scale, zero, bits) -> tuple:
    """``(b, hkv, t, d, s)``: ``keys`` float ``[B, Hkv, T, D]``, its channels, and labels of ``s`` positions."""
    _rank(name, keys, 4, layout)
    if not keys.dtype.is_floating_point:
        _fail(name, f"must be a float tensor, got {keys.dtype}")
    b, hkv, t, d = keys.shape
    r = check_channels(channels, hkv, d)
    return b, hkv, t, d, check_labels(data, scale, zero, bits, b, hkv, r)


def check_label_write(keys, channels, positions, data, scale, zero, bits) -> None:
    b, _, t, _, s = _check_keys_labels("keys", keys, "[B, Hkv, T, D]", channels, data, scale, zero, bits)
    check_positions(positions, b, t, s)
    _same_device("keys", keys, channels=channels, positions=positions, data=data)


def check_label_sync(k, channels, positions, data, scale, zero, bits, state) -> None:
    """``dsc::label_sync``: the static buffer ``k`` ``[B, Hkv, S, D]`` already holds this step's rows at
    ``positions`` (int64 [T], T >= 1, inside ``k``); its labels ``data`` cover it; ``state`` int64 ``[B, Hkv, 2]``."""
    b, hkv, s, _, n = _check_keys_labels("k", k, "[B, Hkv, S, D]", channels, data, scale, zero, bits)
    if s > n:
        _fail("k", f"has {s} positions but its labels only {n}: the labels must cover the static buffer")
    if not isinstance(positions, torch.Tensor) or positions.dim() != 1 or positions.shape[0] == 0:
        _fail("positions", f"must be one position vector [T] with T >= 1, got {getattr(positions, 'shape', None)}")
    check_positions(positions, b, positions.shape[0], s)
    if not isinstance(state, torch.Tensor) or state.dtype != torch.int64 or tuple(state.shape) != (b, hkv, 2):
        _fail("state", f"must be an int64 tensor [B, Hkv, 2] = [{b}, {hkv}, 2], got "
                       f"{getattr(state, 'dtype', type(state).__name__)} {tuple(getattr(state, 'shape', ()))}")
    _same_device("k", k, channels=channels, positions=positions, data=data, state=state)


def check_mask(name: str, m: torch.Tensor | None, shape: tuple, dtype_kind: str) -> None:
    if m is None:
        return
    if not isinstance(m, torch.Tensor):
        _fail(name, f"must be a tensor or None, got {type(m).__name__}")
    if dtype_kind == "bool" and m.dtype != torch.bool:
        _fail(name, f"must be a bool mask (True = may attend), got {m.dtype}")
    if dtype_kind == "float" and not m.dtype.is_floating_point:
        _fail(name, f"must be a float additive mask, got {m.dtype}")
    # broadcasts to ``shape`` exactly: each dim 1 or equal (a plain loop: torch.broadcast_shapes costs ~0.1 ms)
    ok = m.dim() <= 4 and all(x == 1 or x == y for x, y in zip(m.shape, shape[len(shape) - m.dim():]))
    if not ok:
        _fail(name, f"shape {tuple(m.shape)} does not broadcast to [B, Hq, Lq, S] = {list(shape)}")


def check_lengths(lengths: torch.Tensor | None, b: int) -> None:
    if lengths is None:
        return
    if not isinstance(lengths, torch.Tensor) or lengths.dtype != torch.int64 or tuple(lengths.shape) != (b,):
        _fail("lengths", f"must be an int64 tensor [B] = [{b}] (valid positions per sequence), got "
                         f"{getattr(lengths, 'dtype', type(lengths).__name__)} {tuple(getattr(lengths, 'shape', ()))}")


def check_query(q: torch.Tensor, hkv: int, d: int | None = None) -> tuple[int, int, int, int]:
    _rank("q", q, 4, "[B, Hq, Lq, D]")
    if not q.dtype.is_floating_point:
        _fail("q", f"must be a float tensor, got {q.dtype}")
    b, hq, lq, dq = q.shape
    if d is not None and dq != d:
        _fail("q", f"head_dim {dq} differs from the keys' head_dim {d}")
    if hkv < 1 or hq % hkv:
        _fail("q", f"has {hq} heads, not a multiple of the {hkv} KV heads (GQA needs Hq = G * Hkv)")
    return b, hq, lq, dq


def check_label_scores(q, channels, data, scale, zero, bits, valid, lengths) -> tuple[int, int]:
    """Return ``(Hkv, S)``."""
    _rank("channels", channels, 2, "[Hkv, r] of int64 channel ids")
    _rank("data", data, 4, "[B, Hkv, S, r] label cache")
    hkv = data.shape[1]
    b, hq, lq, d = check_query(q, hkv)
    r = check_channels(channels, hkv, d)
    s = check_labels(data, scale, zero, bits, b, hkv, r)
    check_mask("valid", valid, (b, hq, lq, s), "bool")
    check_lengths(lengths, b)
    _same_device("q", q, channels=channels, data=data, valid=valid, lengths=lengths)
    return hkv, s


def topk_width(s: int, budget: int, frac: float):
    """Slots per row: ``min(budget, S)`` when ``frac == 0``, else ``min(S, max(budget, ceil(frac * S)))`` (with a
    fraction, ``budget`` is its floor)."""
    if frac == 0:
        return torch.sym_min(budget, s) if not isinstance(s, int) else min(budget, s)
    if isinstance(s, int):
        return min(s, max(budget, math.ceil(frac * s)))
    return torch.sym_min(s, torch.sym_max(budget, math.ceil(frac * s)))


def keep_count(nvalid: torch.Tensor, width, budget: int, frac: float) -> torch.Tensor:
    """Slots each row keeps, from its valid count: ``min(n, budget)``, or ``min(n, max(budget, ceil(frac * n)))``
    for a fraction (never more than the row's ``width`` slots)."""
    if frac == 0:
        return nvalid.clamp(max=width)
    share = torch.ceil(nvalid.double() * frac).long().clamp(min=budget)
    return torch.minimum(share, nvalid).clamp(max=width)


def check_select(scores, budget, frac, sink, recent) -> None:
    _rank("scores", scores, 4, "[B, Hsel, Lq, S]")
    if not scores.dtype.is_floating_point:
        _fail("scores", f"must be float scores, got {scores.dtype}")
    check_budget(budget, frac, sink, recent)


def check_budget(budget, frac, sink, recent) -> None:
    if isinstance(frac, bool) or not (isinstance(frac, (int, float)) and 0.0 <= frac <= 1.0):
        _fail("frac", f"must be a fraction in [0, 1] (0 = use the absolute budget), got {frac!r}")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        _fail("budget", f"must be a positive number of tokens (with frac > 0: the fraction's floor), got {budget!r}")
    if not isinstance(sink, int) or sink < 0:
        _fail("sink", f"must be an int >= 0 (forced first tokens), got {sink!r}")
    if not isinstance(recent, int) or recent < 0:
        _fail("recent", f"must be an int >= 0 (forced last tokens), got {recent!r}")


def check_kv(q, k, v) -> tuple[int, int]:
    """Validate ``k, v [B, Hkv, S, D]`` against ``q``; return ``(Hkv, S)``."""
    _rank("k", k, 4, "[B, Hkv, S, D] (HF layout, not repeated to Hq heads)")
    _rank("v", v, 4, "[B, Hkv, S, D] (HF layout, not repeated to Hq heads)")
    if k.shape != v.shape:
        _fail("v", f"shape {tuple(v.shape)} differs from k's {tuple(k.shape)}")
    b, hkv, s, d = k.shape
    bq, hq, lq, dq = check_query(q, hkv, d)
    if bq != b:
        _fail("k", f"batch {b} differs from q's batch {bq}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        _fail("k", f"dtypes k={k.dtype}, v={v.dtype} must match q={q.dtype}")
    _same_device("q", q, k=k, v=v)
    return hkv, s


def check_dense_attention(q, k, v, attn_mask) -> None:
    """``k, v [B, Hkv, S, D]`` KV-native against ``q``; ``attn_mask`` bool or float, broadcastable to
    ``[B, Hq, Lq, S]``."""
    hkv, s = check_kv(q, k, v)
    b, hq, lq, _ = q.shape
    if attn_mask is not None:
        check_mask("attn_mask", attn_mask, (b, hq, lq, s), "bool" if attn_mask.dtype == torch.bool else "float")


def check_selection(idx, b: int, hq: int, hkv: int, lq: int) -> None:
    """``idx [B, Hsel, Lq, K]`` int64 selected positions, ``Hsel`` = Hkv (per KV group) or Hq (per query head)."""
    _rank("idx", idx, 4, "[B, Hsel, Lq, K] int64 positions (-1 = unused slot)")
    if idx.dtype != torch.int64:
        _fail("idx", f"must be int64, got {idx.dtype}")
    if idx.shape[0] != b or idx.shape[1] not in (hkv, hq) or idx.shape[2] != lq:
        _fail("idx", f"has shape {tuple(idx.shape)}; expected [{b}, Hsel, {lq}, K] with Hsel = {hkv} (per KV "
                     f"group) or {hq} (per query head)")


def check_sm_scale(sm_scale) -> None:
    if not isinstance(sm_scale, (int, float)) or not sm_scale > 0:
        _fail("sm_scale", f"must be a positive float (usually 1/sqrt(head_dim)), got {sm_scale!r}")


def check_sparse_attention(q, k, v, idx, sm_scale, bias) -> None:
    hkv, s = check_kv(q, k, v)
    b, hq, lq, _ = q.shape
    check_selection(idx, b, hq, hkv, lq)
    if _has_values(idx) and (int(idx.min()) < -1 or int(idx.max()) >= s):
        _fail("idx", f"positions must lie in [-1, {s}) (-1 marks an unused slot)")
    check_sm_scale(sm_scale)
    check_mask("bias", bias, (b, hq, lq, s), "float")
    _same_device("q", q, idx=idx, bias=bias)


def check_host_kv(q, k, v, idx, sm_scale, bias) -> None:
    """:func:`check_sparse_attention` for ``k``/``v`` held in host memory: pinned when ``q`` is on a GPU (the
    zero-copy kernel reads them over the bus), any host tensor otherwise (the reference moves the rows)."""
    for name, t in (("k", k), ("v", v)):
        _rank(name, t, 4, "[B, Hkv, S, D] in host memory")
        if t.device.type != "cpu":
            _fail(name, f"must be a host tensor (pinned for a GPU query), got one on {t.device}")
        if q.device.type == "cuda" and not is_fake(t) and not t.is_pinned():
            _fail(name, "must be a pinned host tensor for zero-copy attention from a GPU query (got pinned=False); "
                        "allocate it with pin_memory=True")
    _rank("q", q, 4, "[B, Hq, Lq, D]")
    _same_device("q", q, idx=idx, bias=bias)
    if q.device == k.device:
        check_sparse_attention(q, k, v, idx, sm_scale, bias)
        return
    meta = [None if t is None else t.to("meta") for t in (q, k, v, idx, bias)]  # shapes and dtypes only
    check_sparse_attention(*meta[:4], sm_scale, meta[4])


def check_write_rows(src, positions, dst) -> None:
    _rank("src", src, 4, "[B, Hkv, T, D]")
    _rank("dst", dst, 4, "[B, Hkv, capacity, D]")
    b, hkv, t, d = src.shape
    if dst.shape[0] != b or dst.shape[1] != hkv or dst.shape[3] != d or dst.dtype != src.dtype:
        _fail("dst", f"is {tuple(dst.shape)} {dst.dtype}; expected [{b}, {hkv}, capacity, {d}] {src.dtype}")
    check_positions(positions, b, t, dst.shape[2])
    if dst.device != src.device and not (dst.device.type == "cpu" and (is_fake(dst) or dst.is_pinned())):
        _fail("dst", f"is on {dst.device} but src is on {src.device}; use the same device or pinned host memory")
    _same_device("src", src, positions=positions)


def check_ds_decode(q, k, v, channels, data, scale, zero, bits, valid, bias, lengths, budget, frac, sink, recent,
                    sm_scale) -> None:
    check_kv(q, k, v)
    hkv, s = check_label_scores(q, channels, data, scale, zero, bits, valid, lengths)
    if s != k.shape[2]:
        _fail("data", f"label cache length {s} differs from the K/V cache length {k.shape[2]}")
    b, hq, lq, _ = q.shape
    check_mask("bias", bias, (b, hq, lq, s), "float")
    _same_device("q", q, bias=bias)
    check_budget(budget, frac, sink, recent)
    check_sm_scale(sm_scale)
