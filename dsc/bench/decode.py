"""``dsc bench decode``: end-to-end decode throughput and per-step latency, static cache.

Every configuration is prefilled with real essay text at the given context length, then decoded greedily; the
figure is the median per-step latency over the timed steps (after warm-up steps), and tokens/s = batch / latency.
Eager and compiled runs happen in the same process, one after the other, so their ratio is meaningful; absolute
numbers on a shared 2-core CPU are noisy.
"""
from __future__ import annotations

import time

from dsc.bench.common import format_table, machine_info, parse_list, write_json

COMPILERS = ("eager", "inductor")


def add_arguments(p):
    p.add_argument("--model", default=None, help="local HF model folder (default: embedded SmolLM2-135M)")
    p.add_argument("--contexts", default="512,2048,8192", help="prompt lengths, e.g. 512,2K,8K")
    p.add_argument("--batch", default="1,4", help="batch sizes, e.g. 1,4")
    p.add_argument("--dtype", default="float32", help="model dtypes, e.g. float32,bfloat16")
    p.add_argument("--compile", default="eager,inductor", help=f"compilers among {','.join(COMPILERS)}")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps before timing")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")


def bench_one(model, tok, context: int, batch: int, compiler: str, steps: int, warmup: int) -> dict:
    import torch

    from dsc.generation import greedy_decode, text_ids

    ids = text_ids(tok, context).expand(batch, -1).contiguous()
    forward = model.forward
    if compiler == "inductor":
        forward = torch.compile(model.forward, backend="inductor", dynamic=False)
    t0 = time.perf_counter()
    r = greedy_decode(model, ids, steps + warmup + 1, forward=forward, cache="static")
    wall = time.perf_counter() - t0
    timed = r.step_s[warmup:]
    lat = sorted(timed)[len(timed) // 2]
    return {"context": context, "batch": batch, "compile": compiler, "ms_per_step": lat * 1e3,
            "tok_per_s": batch / lat, "prefill_s": r.prefill_s, "wall_s": wall,
            "steps": len(timed)}


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from dsc.assets import check_context, load_model

    contexts = parse_list(args.contexts, int, "context length")
    batches = parse_list(args.batch, int, "batch size")
    dtypes = parse_list(args.dtype, str, "dtype")
    compilers = parse_list(args.compile, str, "compiler")
    for b in batches:
        if b <= 0:
            raise ValueError(f"--batch values must be positive, got {b}")
    for c in compilers:
        if c not in COMPILERS:
            raise ValueError(f"--compile values must be among {COMPILERS}, got {c!r}")
    if args.steps <= 0 or args.warmup < 0:
        raise ValueError("--steps must be positive and --warmup non-negative")

    rows = []
    configs = [(d, c, b, x) for d in dtypes for c in contexts for b in batches for x in compilers]
    bar = tqdm(configs, desc="bench decode", unit="cfg")
    model = None
    for dtype, ctx, batch, compiler in bar:
        if model is None or model.dtype != getattr(torch, dtype):
            model, tok = load_model(args.model, dtype=dtype)
        check_context(model, ctx + args.steps + args.warmup + 1, "context + decode steps")
        bar.set_postfix_str(f"{dtype} ctx={ctx} b={batch} {compiler}")
        torch._dynamo.reset()
        row = bench_one(model, tok, ctx, batch, compiler, args.steps, args.warmup)
        row["dtype"] = dtype
        rows.append(row)
        tqdm.write(format_table([row], _COLUMNS).splitlines()[-1])
    print(format_table(rows, _COLUMNS))
    info = machine_info()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    write_json(args.json, {"machine": info, "results": rows, "steps": args.steps, "warmup": args.warmup})
    return 0


_COLUMNS = [("dtype", "dtype"), ("context", "context"), ("batch", "batch"), ("compile", "compile"),
            ("tok_per_s", "tok/s"), ("ms_per_step", "ms/step"), ("prefill_s", "prefill s")]
