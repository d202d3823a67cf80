"""``dsc bench offload``: one decode step's attention over K/V held in host memory, for every layer of a model.

Per context length, ``--layers`` layers each hold their full K/V in (pinned) host memory and their labels on the
compute device; one decode step is timed across all of them, side by side in one run:

- ``whole-layer``: every layer's full K/V copied host -> device, then dense SDPA (the offload baseline);
- ``ds zero-copy``: labels -> top-k on the device, then the sparse-attention kernel reads only the selected rows from
  pinned host memory itself (``torch.ops.dsc.sparse_attention_host``, the Triton kernel; GPU only);
- ``ds staged``: the same selection, indices to the host, the selected rows gathered there and copied in one
  transfer per K/V (:meth:`dsc.passes.offload.HostKV.fetch`), sparse attention over the block;
- ``ds on-device`` / ``dense on-device``: the same step with K/V resident on the device (compute floor); dense is
  the fastest exact dense attention available there (:func:`dsc.bench.attention.dense_candidates`: enable_gqa
  SDPA, packed-GQA SDPA, matmul + softmax, repeat_kv SDPA, and on CUDA each SDPA backend), checked against
  enable_gqa SDPA and timed side by side; the winner is printed and ``x best dense`` is every row against it.

Bytes over the bus per step are counted from the shapes (selected slots, K and V); the bus rate is measured once
with a large pinned host -> device copy, so ``bus floor`` = bytes / rate is the time no implementation can beat.
"""
from __future__ import annotations

import math

from dsc.bench.attention import best_dense, dense_candidates
from dsc.bench.common import format_table, machine_info, median_timer, parse_list, parse_shapes, write_json
from dsc.bytes import cache_bytes


def add_arguments(p):
    p.add_argument("--contexts", default="64K,256K,1024K", help="cache lengths per sequence, e.g. 64K,256K")
    p.add_argument("--batch", type=int, default=1, help="sequences per step")
    p.add_argument("--shape", default="32x8x128", help="HqxHkvxD (default: Llama-3-8B's 32 query / 8 KV heads)")
    p.add_argument("--layers", type=int, default=4, help="layers per step, each with its own host K/V")
    p.add_argument("--budget", default="1/16", help="token budget as a fraction of the context")
    p.add_argument("--r", type=int, default=16, help="label channels per KV head (16-bit labels)")
    p.add_argument("--gqa", default="group", choices=("group", "head"), help="selection per KV group or query head")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--max-host-gb", type=float, default=64.0, help="skip contexts whose host K/V exceed this")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")


EXPAND_MAX_GB = 8.0  # the repeat-kv dense candidate copies one layer's K/V G times: only while that stays small


def _per_layer(fn, layers: int):
    """``fn`` run once per layer (the same K/V: the dense floor of a step), returning the last output."""
    def run():
        for _ in range(layers):
            out = fn()
        return out
    return run


def bus_rate(device, mb: int = 1024) -> float:
    """Host -> device bytes per second of one large copy from pinned memory (the bus ceiling)."""
    import torch

    if device.type != "cuda":
        return float("nan")
    src = torch.empty(mb << 20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device=device)
    ms = median_timer(device)(lambda: dst.copy_(src, non_blocking=True), 5, 2)
    return src.numel() / (ms / 1e3)


def _layer(b, hkv, s, d, r, dtype, device, gen, pinned):
    """One layer: host K/V (filled on the device in chunks, then copied), channels and 16-bit labels on device."""
    import torch

    from dsc.kernels import alloc_labels

    hk = torch.empty(b, hkv, s, d, dtype=dtype, pin_memory=pinned)
    hv = torch.empty(hk.shape, dtype=dtype, pin_memory=pinned)
    channels = torch.stack([torch.randperm(d, generator=gen, device=device)[:r] for _ in range(hkv)])
    labels = alloc_labels(b, hkv, s, r, 16, dtype, device)
    step = max(1, (1 << 27) // (b * hkv * d))  # ~256 MB of fp16 per chunk
    for lo in range(0, s, step):
        hi = min(s, lo + step)
        k = torch.randn(b, hkv, hi - lo, d, generator=gen, device=device).to(dtype)
        torch.ops.dsc.label_write(k, channels, torch.arange(lo, hi, device=device), *labels, 16)
        hk[:, :, lo:hi].copy_(k)
        hv[:, :, lo:hi].copy_(torch.randn(b, hkv, hi - lo, d, generator=gen, device=device).to(dtype))
    return hk, hv, (channels, *labels, 16)


def run(args) -> int:
    import torch
    import torch.nn.functional as F

    import dsc.kernels  # noqa: F401  (registers torch.ops.dsc)
    from dsc.passes.offload import HostKV, block_slots

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    (hq, hkv, d), = parse_shapes(args.shape)
    if not 1 <= args.r <= d:
        raise ValueError(f"--r: need 1 <= r <= D = {d}, got {args.r}")
    (frac,) = parse_list(args.budget, float, "budget")
    cuda = device.type == "cuda"
    e = torch.finfo(dtype).bits // 8
    group = args.gqa == "group"
    hsel = hkv if group else hq
    sm = d ** -0.5
    timer = median_timer(device)
    rate = bus_rate(device)
    rows, checks, winners = [], [], []
    for s in parse_list(args.contexts, int, "context"):
        host_gb = cache_bytes(s, hkv, d, e, args.layers, args.batch) / 2**30
        if host_gb > args.max_host_gb:
            print(f"skipped S={s}: {host_gb:.1f} GB of host K/V > --max-host-gb {args.max_host_gb}")
            continue
        gen = torch.Generator(device=device).manual_seed(s)
        layers = [_layer(args.batch, hkv, s, d, args.r, dtype, device, gen, cuda) for _ in range(args.layers)]
        q = torch.randn(args.batch, hq, 1, d, generator=gen, device=device).to(dtype)
        kk = max(1, math.ceil(frac * s))
        kd = torch.empty(args.batch, hkv, s, d, dtype=dtype, device=device)  # whole-layer staging (one layer)
        vd = torch.empty_like(kd)

        def select(lab):
            sc = torch.ops.dsc.label_scores(q, *lab, None, None, group)
            return torch.ops.dsc.select_topk(sc, kk, 0.0, 0, 0)

        def whole_layer():
            for hk, hv, _ in layers:
                kd.copy_(hk, non_blocking=True)
                vd.copy_(hv, non_blocking=True)
                F.scaled_dot_product_attention(q, kd, vd, enable_gqa=True, scale=sm)

        stores = [HostKV.over(hk, hv) for hk, hv, _ in layers]

        def staged():
            for st, (_, _, lab) in zip(stores, layers):
                idx = select(lab)
                ks, vs, got = st.fetch(idx[:, :, 0], device)
                torch.ops.dsc.sparse_attention(q, ks, vs, block_slots(idx, got.to(device)), sm, None)

        def zero_copy():
            for hk, hv, lab in layers:
                torch.ops.dsc.sparse_attention_host(q, hk, hv, select(lab), sm, None)

        k0 = layers[0][0].to(device)
        v0 = layers[0][1].to(device)

        def on_device_ds():
            for _, _, lab in layers:
                torch.ops.dsc.sparse_attention(q, k0, v0, select(lab), sm, None)

        # the fastest exact dense attention on the device (dsc.bench.attention.dense_candidates), each candidate
        # run once per layer as the other policies are; repeat-kv (a G-times copy of K/V) only while it is small
        expand = hq // hkv * cache_bytes(s, hkv, d, e, 1, args.batch) <= EXPAND_MAX_GB * 2**30
        dense_fns = [(name, _per_layer(fn, len(layers))) for name, fn in dense_candidates(q, k0, v0, sm, expand)]

        whole_bytes = cache_bytes(s, hkv, d, e, args.layers, args.batch)
        ds_bytes = cache_bytes(kk, hsel, d, e, args.layers, args.batch)  # slots; per-head selection may repeat rows
        policies = [("whole-layer", whole_layer, whole_bytes), ("ds staged", staged, None)]
        if cuda:  # correctness on real data: zero-copy and staged equal the on-device kernel for one selection
            idx = select(layers[0][2])
            ref = torch.ops.dsc.sparse_attention(q, k0, v0, idx, sm, None).float()
            ks, vs, got = stores[0].fetch(idx[:, :, 0], device)
            sg = torch.ops.dsc.sparse_attention(q, ks, vs, block_slots(idx, got.to(device)), sm, None).float()
            check = {"length": s, "staged_max_err": float((sg - ref).abs().max())}
            try:
                zc = torch.ops.dsc.sparse_attention_host(q, layers[0][0], layers[0][1], idx, sm, None).float()
                check["zero_copy_max_err"] = float((zc - ref).abs().max())
                policies.insert(1, ("ds zero-copy", zero_copy, ds_bytes))
            except Exception as e:  # noqa: BLE001  (reported, and the other policies still run)
                check["zero_copy_error"] = f"{type(e).__name__}: {e}"
            checks.append(check)
        policies += [("ds on-device", on_device_ds, 0)]
        with torch.no_grad():
            times = {name: timer(fn, args.repeats, args.warmup) for name, fn, _ in policies}
            best, dense_times = best_dense(dense_fns, timer, args.repeats, args.warmup)
        policies.append(("dense on-device", None, 0))
        times["dense on-device"] = dense_times[best]
        winners.append({"length": s, "best_dense": best, "dense": dense_times})
        for name, _, nbytes in policies:
            if nbytes is None:  # staged: the per-KV-head union actually moved, counted by the stores
                for host in stores:
                    host.stats.clear()
                staged()
                nbytes = sum(host.stats["h2d_bytes"] for host in stores)
            rows.append({"length": s, "policy": name, "ms": times[name], "MB": nbytes / 1e6,
                         "bus_floor_ms": nbytes / rate * 1e3 if nbytes and rate == rate else float("nan"),
                         "GBps": nbytes / (times[name] / 1e3) / 1e9 if nbytes else float("nan"),
                         "vs_whole": times["whole-layer"] / times[name],
                         "vs_dense": times["dense on-device"] / times[name]})
        rows[-1]["best_dense"] = best  # the dense on-device row (the last one) names its winner
        del layers, stores, kd, vd, k0, v0, dense_fns
        if cuda:
            torch.cuda.empty_cache()

    info = machine_info()
    print(f"\noffloaded decode attention, one step over {args.layers} layers, batch {args.batch}, {args.shape} "
          f"{args.dtype}, budget {args.budget}, {args.gqa} selection, r={args.r}; {device} "
          f"({info['gpu'] or info['cpu']}); median of {args.repeats}; bus {rate / 1e9:.1f} GB/s (pinned copy)")
    cols = [("length", "S"), ("policy", "policy"), ("ms", "step ms"), ("MB", "MB over bus"),
            ("bus_floor_ms", "bus floor ms"), ("GBps", "GB/s"), ("vs_whole", "x whole-layer"),
            ("vs_dense", "x best dense")]
    print(format_table(rows, cols))
    for w in winners:
        others = ", ".join(f"{name} {ms:.3g}" for name, ms in sorted(w["dense"].items(), key=lambda x: x[1]))
        print(f"best dense S={w['length']}: {w['best_dense']} (the 'dense on-device' row; ms over "
              f"{args.layers} layers: {others})")
    for c in checks:
        zc = (f"{c['zero_copy_max_err']:.2e}" if "zero_copy_max_err" in c else c["zero_copy_error"])
        print(f"check S={c['length']}: max |zero-copy - on-device| = {zc}, "
              f"max |staged - on-device| = {c['staged_max_err']:.2e}")
    write_json(args.json, {"machine": info, "device": str(device), "bus_bytes_per_s": rate, "args": vars(args) | {
        "_run": None}, "rows": rows, "checks": checks,
                           "dense_candidates": winners})
    return 0
