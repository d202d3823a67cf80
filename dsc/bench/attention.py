"""``dsc bench attention``: one decode-attention step, the fastest dense attention vs the Double Sparsity op, in the
same run.

Dense is the fastest of several exact implementations on the HF-layout cache K/V ``[B, Hkv, S, D]``, each timed
side by side (``dense_candidates``; the winner is named in the table, every time is in the JSON):

* ``sdpa-gqa``: ``F.scaled_dot_product_attention(q, k, v, enable_gqa=True)`` (the reference for the others);
* ``packed-gqa``: the G query heads of a KV group packed into the query-length dim, ``q -> [B, Hkv, G*Lq, D]``,
  plain SDPA against the KV-native K/V, reshaped back (exact at decode, Lq = 1: no causal mask);
* ``matmul-softmax``: the packed layout with two matmuls and a softmax in fp32;
* ``repeat-kv``: SDPA over K/V expanded to Hq heads (HF's ``repeat_kv``; the copy is timed too);
* on CUDA, also ``sdpa-gqa`` forced onto each SDPA backend (flash, efficient, cudnn, math).

A candidate that raises is skipped; every other one must match ``sdpa-gqa`` within the dtype's tolerance before
anything is timed. Double Sparsity is ``torch.ops.dsc.ds_decode`` (label scores -> top-k -> sparse attention; CPU
path on CPU, Triton on CUDA), timed twice: per op call ("op ms": dispatch and argument checks every call), and as
:class:`dsc.kernels.plan.DecodePlan` runs ("plan ms": checked once when planned, the call a model's decode step
makes; the speedup columns use it). Each row prints the speedup over the best dense time beside the byte-count limit of
ALGORITHM.md sec. 1 (:mod:`dsc.bytes`): per (token, KV head) dense reads ``2*D*e`` bytes and Double Sparsity
``ceil(r*b/8) + (k/S)*2*D*e`` (+ 8 bytes of fp32 scale/zero when the labels are quantized).
"""
from __future__ import annotations

import argparse
import math

from dsc.bytes import byte_limit

FORMATS = {"16": 16, "native": 16, "8": 8, "int8": 8, "4": 4, "int4": 4}
FORMAT_NAME = {16: "native", 8: "int8", 4: "int4"}
CANDIDATES = ["sdpa-gqa (enable_gqa=True)", "packed-gqa (G query heads in the length dim)",
              "matmul-softmax (packed, fp32 softmax)", "repeat-kv (K/V expanded to Hq, copy timed)",
              "on CUDA sdpa-gqa on each SDPA backend"]
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 2e-2}  # atol = rtol vs sdpa-gqa


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("decode attention op: the fastest dense attention on the device vs Double Sparsity. Dense "
                     "candidates, timed side by side after checking they agree: " + ", ".join(CANDIDATES)
                     + "; 'dense ms' is the winner's time, 'best dense' its name, 'gqa ms' the enable_gqa SDPA time.")
    p.add_argument("--lengths", default="4K,16K,32K,64K", help="cache lengths S (K = 1024), comma-separated")
    p.add_argument("--batch", default="1,4", help="batch sizes, comma-separated")
    p.add_argument("--shapes", default="9x3x64,32x32x128,32x8x128",
                   help="head shapes HqxHkvxD: SmolLM2 (9x3x64), Llama-7B MHA (32x32x128), 4:1 GQA (32x8x128)")
    p.add_argument("--budgets", default="1/8,1/16", help="token budgets as fractions of S (k = S * budget)")
    p.add_argument("--formats", default="native,int8,int4", help="label formats: native (key dtype), int8, int4")
    p.add_argument("--label-channels", default="D/4",
                   help="label channels r per KV head: an int, or D/n (default D/4: 1/16 of key bytes at int4)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="K/V/q dtype (default float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--per-head", action="store_true", help="select per query head instead of per KV group")
    p.add_argument("--repeats", type=int, default=10, help="timed repeats per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                   help="wall: elapsed time; cpu: process CPU time (steadier on a shared machine; use --threads 1)")
    p.add_argument("--flush-mb", type=float, default=None,
                   help="write this many MB before each timed call so K/V start cold, as in a real decode step "
                        "where other layers ran in between (default on CPU: twice the last-level cache, at least "
                        "64; 0 on CUDA)")
    p.add_argument("--max-gb", type=float, default=6.0, help="skip configurations whose K/V cache exceeds this")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def label_channels(spec: str, d: int) -> int:
    """``"D/4"`` or ``"16"`` -> r for head_dim ``d`` (at least 1, at most D)."""
    spec = spec.strip().upper()
    try:
        r = d // int(spec[2:]) if spec.startswith("D/") else int(spec)
    except ValueError:
        raise ValueError(f"--label-channels: cannot read {spec!r}; use an int or D/n") from None
    if not 1 <= r <= d:
        raise ValueError(f"--label-channels: {spec} gives r={r} for head_dim {d}; need 1 <= r <= D")
    return r


def dense_candidates(q, k, v, scale: float, expand: bool = True) -> list:
    """``[(name, fn)]``: exact dense decode attention of ``q [B, Hq, Lq, D]`` over KV-native ``k, v
    [B, Hkv, S, D]``; the first, ``sdpa-gqa``, is the reference. ``expand=False`` leaves out ``repeat-kv``
    (it copies K/V G times)."""
    import torch
    import torch.nn.functional as F

    b, hq, lq, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    packed_q = q.reshape(b, hkv, g * lq, d)  # query head h = j*G + i reads KV head j (HF's repeat_kv order)

    def sdpa_gqa():
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, scale=scale)

    def packed_gqa():
        return F.scaled_dot_product_attention(packed_q, k, v, scale=scale).reshape(b, hq, lq, d)

    def matmul_softmax():
        probs = (torch.matmul(packed_q, k.transpose(-1, -2)).float() * scale).softmax(-1).to(v.dtype)
        return torch.matmul(probs, v).reshape(b, hq, lq, d)

    def repeat_kv():
        rk = k[:, :, None].expand(b, hkv, g, s, d).reshape(b, hq, s, d)
        rv = v[:, :, None].expand(b, hkv, g, s, d).reshape(b, hq, s, d)
        return F.scaled_dot_product_attention(q, rk, rv, scale=scale)

    out = [("sdpa-gqa", sdpa_gqa), ("packed-gqa", packed_gqa), ("matmul-softmax", matmul_softmax)]
    if expand:
        out.append(("repeat-kv", repeat_kv))
    if q.device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def on(backend):
            def fn():
                with sdpa_kernel(backend):
                    return sdpa_gqa()
            return fn

        for name, attr in (("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"),
                           ("cudnn", "CUDNN_ATTENTION"), ("math", "MATH")):
            backend = getattr(SDPBackend, attr, None)
            if backend is not None:
                out.append((f"sdpa-gqa-{name}", on(backend)))
    return out


def best_dense(candidates: list, timer, repeats: int, warmup: int) -> tuple[str, dict]:
    """Drop the candidates that raise, check the rest against the first (the reference), time each;
    ``(winner's name, {name: ms})``."""
    import torch

    ref = candidates[0][1]()
    tol = TOLERANCE.get(str(ref.dtype).removeprefix("torch."), 1e-2)
    working = []
    for name, fn in candidates:
        try:
            out = fn()
        except RuntimeError:  # e.g. an SDPA backend that does not take this shape or dtype
            continue
        err = (out.float() - ref.float()).abs().max().item()
        if not torch.allclose(out.float(), ref.float(), atol=tol, rtol=tol):
            raise RuntimeError(f"dense candidate {name} differs from sdpa-gqa by {err:.3g} (> {tol:g})")
        working.append((name, fn))
    times = {name: timer(fn, repeats, warmup) for name, fn in working}
    return min(times, key=times.get), times


def run(args) -> int:
    import torch
    from tqdm import tqdm

    import dsc.kernels  # noqa: F401  (registers torch.ops.dsc)
    from dsc.bench.common import (cpu_flush_mb, format_table, machine_info, median_timer, parse_list, parse_shapes,
                                  write_json)
    from dsc.bytes import cache_bytes
    from dsc.kernels import alloc_labels
    from dsc.kernels.plan import DecodePlan

    lengths = parse_list(args.lengths, int, "length")
    batches = parse_list(args.batch, int, "batch size")
    budgets = parse_list(args.budgets, float, "budget")
    shapes = parse_shapes(args.shapes, "--shapes")
    formats = []
    for f in args.formats.split(","):
        if f.strip().lower() not in FORMATS:
            raise ValueError(f"--formats: unknown label format {f!r}; use native, int8 or int4")
        formats.append(FORMATS[f.strip().lower()])
    for f in budgets:
        if not 0 < f <= 1:
            raise ValueError(f"--budgets: {f} is not a fraction in (0, 1]")
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError("--repeats must be >= 1 and --warmup >= 0")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if args.threads:
        torch.set_num_threads(args.threads)
    e = torch.finfo(dtype).bits // 8
    flush = args.flush_mb if args.flush_mb is not None else (cpu_flush_mb() if device.type == "cpu" else 0.0)
    timer = median_timer(device, args.clock, flush)
    group = not args.per_head

    configs = [(sh, b, s) for sh in shapes for b in batches for s in lengths]
    total = len(configs) * (1 + len(formats) * len(budgets))
    bar = tqdm(total=total, disable=args.no_progress, desc="bench attention", unit="run")
    rows, skipped = [], []
    for (hq, hkv, d), b, s in configs:
        kv_gb = cache_bytes(s, hkv, d, e, batch=b) / 2**30
        if kv_gb > args.max_gb:
            skipped.append(f"{hq}x{hkv}x{d} B{b} S{s} ({kv_gb:.1f} GB K/V > --max-gb {args.max_gb})")
            bar.update(1 + len(formats) * len(budgets))
            continue
        r = label_channels(args.label_channels, d)
        gen = torch.Generator(device=device).manual_seed(0)  # drawn where they live: no host-side fill of GBs
        q = torch.randn(b, hq, 1, d, generator=gen, device=device).to(dtype)
        k = torch.randn(b, hkv, s, d, generator=gen, device=device).to(dtype)
        v = torch.randn(b, hkv, s, d, generator=gen, device=device).to(dtype)
        sm = d ** -0.5
        with torch.no_grad():
            best, dense = best_dense(dense_candidates(q, k, v, sm, expand=hq // hkv * kv_gb <= args.max_gb),
                                     timer, args.repeats, args.warmup)
        dense_ms = dense[best]
        bar.update(1)
        channels = torch.stack([torch.randperm(d, generator=gen, device=device)[:r] for _ in range(hkv)])
        for bits in formats:
            labels = alloc_labels(b, hkv, s, r, bits, dtype, device)
            torch.ops.dsc.label_write(k, channels, torch.arange(s, device=device), *labels, bits)
            for frac in budgets:
                budget = max(1, math.ceil(frac * s))
                plan = DecodePlan(q, k, v, channels, *labels, bits, budget=budget, group=group, sm_scale=sm)
                with torch.no_grad():
                    def op():
                        return torch.ops.dsc.ds_decode(q, k, v, channels, *labels, bits, None, None, None, budget,
                                                       0.0, 0, 0, group, sm)

                    tol = TOLERANCE.get(str(dtype).removeprefix("torch."), 1e-2)
                    if not torch.allclose(plan.run(q).float(), op().float(), atol=tol, rtol=tol):
                        raise RuntimeError(f"DecodePlan.run differs from the op ({hq}x{hkv}x{d}, B{b}, S{s})")
                    op_ms = timer(op, args.repeats, args.warmup)
                    ds_ms = timer(lambda: plan.run(q), args.repeats, args.warmup)
                _, _, limit = byte_limit(d, e, r, bits, budget / s)
                speedup = dense_ms / ds_ms
                rows.append({"shape": f"{hq}x{hkv}x{d}", "batch": b, "length": s, "labels": FORMAT_NAME[bits],
                             "r": r, "budget": f"1/{round(1 / frac)}" if frac < 1 else "1", "k": budget,
                             "dense_ms": dense_ms, "best_dense": best, "gqa_ms": dense["sdpa-gqa"],
                             "dense": dense, "op_ms": op_ms, "ds_ms": ds_ms, "op_speedup": dense_ms / op_ms,
                             "speedup": speedup, "limit": limit, "of_limit": speedup / limit})
                bar.update(1)
            del labels
        del q, k, v
    bar.close()

    info = machine_info()
    print(f"\ndecode attention, one step (Lq = 1), {dtype} on {device} ({info['cpu'] if device.type == 'cpu' else info['gpu']}"
          f", {torch.get_num_threads()} threads); {args.clock} clock, median of {args.repeats} after {args.warmup} "
          f"warm-up, {flush:g} MB cache flush before each call; "
          f"{'group' if group else 'per-head'} selection; r = {args.label_channels} label channels; "
          + (f"huge pages {info['huge_pages']}; " if device.type == "cpu" else "") +
          f"dense ms = fastest of the dense candidates (best dense), gqa ms = SDPA enable_gqa=True; op ms = "
          f"torch.ops.dsc.ds_decode per call (dispatch, checks), plan ms = DecodePlan.run (checked once: what a "
          f"model's decode step runs), speedup and of limit from plan ms")
    cols = [("shape", "HqxHkvxD"), ("batch", "B"), ("length", "S"), ("labels", "labels"), ("r", "r"),
            ("budget", "budget"), ("k", "k"), ("gqa_ms", "gqa ms"), ("dense_ms", "dense ms"),
            ("best_dense", "best dense"), ("op_ms", "op ms"), ("op_speedup", "op speedup"), ("ds_ms", "plan ms"),
            ("speedup", "speedup"), ("limit", "byte limit"), ("of_limit", "of limit")]
    shown = [{**row, "of_limit": f"{100 * row['of_limit']:.0f}%"} for row in rows]
    print(format_table(shown, cols))
    for line in skipped:
        print(f"skipped: {line}")
    write_json(args.json, {"machine": info, "device": str(device), "dtype": str(dtype), "group": group,
                           "repeats": args.repeats, "clock": args.clock, "flush_mb": flush,
                           "label_channels": args.label_channels, "rows": rows, "skipped": skipped})
    return 0
