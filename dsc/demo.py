"""``dsc demo``: the main job on the embedded model, with a short report.

1. load the model; 2. take the cached channel calibration (calibrating once on the calibration essays if there
is none); 3. quality: decode a long essay prompt greedily (batch 1) with the dense model and with the ``dsparse``
backend, through the same loop and static cache, and report both continuations and their agreement; 4. speed: a
sweep over a few context lengths at one batch size, per-step decode latency of the fastest dense model in the run
against ``dsparse`` (:func:`dsc.bench.decode.bench_one`), beside the byte-count limits of each configuration, with
the crossover context (the first swept one where ``dsparse`` is faster) and, with ``--plot``, a chart.
"""
from __future__ import annotations

import os
import time


def add_arguments(p):
    p.add_argument("--model", default=None, help="local HF model folder (default: embedded SmolLM2-135M)")
    p.add_argument("--context", type=int, default=1024, help="prompt length: tokens of an evaluation essay")
    p.add_argument("--prompt", default=None, help="use this text as the prompt instead of essay text")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--budget", default="1/8", help="token budget: a fraction (1/8) or a token count")
    p.add_argument("--min-length", type=int, default=None,
                   help="caches shorter than this attend densely (default: derived from the budget, as DSConfig)")
    p.add_argument("--compile", choices=("eager", "inductor"), default="eager",
                   help="eager: dense runs eagerly and the rewritten graph without inductor (starts in seconds); "
                        "inductor: both compiled (minutes of compilation on a small CPU)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default); 1 is steadier on a loaded machine")
    g = p.add_argument_group("speed sweep (dense vs dsparse per decode step, after the quality part)")
    g.add_argument("--sweep-contexts", default="1K,2K,4K", help="cache lengths to time, e.g. 1K,2K,4K (K = 1024)")
    g.add_argument("--sweep-batch", type=int, default=4, help="sequences per decode step in the sweep")
    g.add_argument("--steps", type=int, default=8, help="timed decode steps per sweep point (the median is shown)")
    g.add_argument("--warmup", type=int, default=2,
                   help="untimed decode steps before the timed ones (dsparse compiles its decode graph in the first)")
    g.add_argument("--no-sweep", action="store_true", help="skip the speed sweep (quality part only)")
    g.add_argument("--plot", default=None, metavar="PATH.png",
                   help="draw the sweep's ms/step vs context, dense and dsparse (needs matplotlib, the plot extra)")


def crossover(rows: list[dict]) -> str:
    """Where ``dsparse`` starts to beat the baseline in a sweep (rows with ``context`` and ``speedup`` = baseline
    ms / dsparse ms), in words: the first swept context with speedup > 1, or that there is none."""
    rows = sorted(rows, key=lambda r: r["context"])
    contexts = ", ".join(str(r["context"]) for r in rows)
    faster = [r for r in rows if r["speedup"] > 1]
    if not faster:
        best = max(rows, key=lambda r: r["speedup"])
        return (f"not reached within the sweep ({contexts}): dsparse is slower at every context "
                f"(closest {best['speedup']:.2f}x at {best['context']})")
    first = faster[0]
    if first is rows[0]:
        text = (f"at or below {first['context']} tokens: dsparse is already faster at the smallest swept context "
                f"({first['speedup']:.2f}x)")
    else:
        before = rows[rows.index(first) - 1]
        text = (f"{first['context']} tokens: the first swept context where dsparse is faster "
                f"({first['speedup']:.2f}x; {before['speedup']:.2f}x at {before['context']})")
    slower = [str(r["context"]) for r in rows if r["context"] > first["context"] and r["speedup"] <= 1]
    if slower:
        text += f"; but slower again at {', '.join(slower)} (noise, or no stable crossover)"
    return text


def speed_sweep(model, tok, args, opts: dict, contexts: list[int]) -> list[dict]:
    """Per context: median ms/step of dense (eager; with ``--compile inductor`` also inductor, the faster is the
    baseline) and of ``dsparse`` at ``args.sweep_batch``, each through :func:`dsc.bench.decode.bench_one`."""
    import torch
    from tqdm import tqdm

    from dsc.bench.decode import bench_one, shared_prefill

    dense_compilers = ["eager"] if args.compile == "eager" else ["eager", "inductor"]
    runs = [(c, "dense", x) for c in contexts for x in dense_compilers] + [(c, "dsparse", args.compile)
                                                                          for c in contexts]
    runs.sort(key=lambda run: run[0])
    times, prefilled = {}, {}
    bar = tqdm(runs, desc="speed sweep", unit="run")
    for ctx, policy, compiler in bar:
        bar.set_postfix_str(f"ctx={ctx} b={args.sweep_batch} {policy} {compiler}")
        torch._dynamo.reset()
        if ctx not in prefilled:  # one prefill per context, shared by its runs (the previous one is dropped)
            prefilled = {ctx: shared_prefill(model, tok, ctx, args.sweep_batch, args.steps, args.warmup)}
        times[ctx, policy, compiler] = bench_one(model, tok, ctx, args.sweep_batch, compiler, args.steps,
                                                 args.warmup, policy, opts if policy == "dsparse" else None,
                                                 prefilled[ctx])
    rows = []
    for ctx in contexts:
        row = {"context": ctx, "batch": args.sweep_batch}
        for x in dense_compilers:
            row[f"dense_{x}_ms"] = times[ctx, "dense", x]["ms_per_step"]
        row["best_dense"] = min(dense_compilers, key=lambda x: row[f"dense_{x}_ms"])
        row["dense_ms"] = row[f"dense_{row['best_dense']}_ms"]
        row["dsparse_ms"] = times[ctx, "dsparse", args.compile]["ms_per_step"]
        row["speedup"] = row["dense_ms"] / row["dsparse_ms"]
        rows.append(row)
    return rows


def run(args) -> int:
    import torch

    from dsc.assets import check_context, essay_text, load_model
    from dsc.bench.common import check_plot_path, cpu_busy_seconds, machine_info, parse_list
    from dsc.bench.decode import compiled_forward
    from dsc.bytes import attention_bytes, weight_bytes
    from dsc.calibration.default import default_config
    from dsc.config import DSConfig, parse_budget
    from dsc.backend import runtime_of
    from dsc.generation import greedy_decode

    t_start = time.perf_counter()
    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    budget = parse_budget(args.budget)
    contexts = []
    if not args.no_sweep:
        contexts = sorted(set(parse_list(args.sweep_contexts, int, "--sweep-contexts length")))
        if args.sweep_batch <= 0 or args.steps <= 0 or args.warmup < 0:
            raise ValueError(f"--sweep-batch and --steps must be positive and --warmup non-negative, got "
                             f"{args.sweep_batch}, {args.steps}, {args.warmup}")
        n_sweep = args.steps + args.warmup + 1
        if contexts[0] <= n_sweep:
            raise ValueError(f"--sweep-contexts: {contexts[0]} must exceed the decode steps of a sweep point "
                             f"({args.steps} + {args.warmup} warm-up + 1)")
        check_plot_path(args.plot)  # before the long run, not after it
    elif args.plot:
        raise ValueError("--plot draws the speed sweep: it cannot go with --no-sweep")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    channels = default_config(args.model, model=model, tokenizer=tok)
    calib_s = time.perf_counter() - t0
    opts = {"channels": channels, "budget": budget, "min_length": args.min_length}
    ds = DSConfig(**opts)
    for ctx in contexts:
        check_context(model, ctx, "--sweep-contexts length")

    if args.prompt is not None:
        ids = tok(args.prompt, return_tensors="pt").input_ids
    else:
        check_context(model, args.context + args.max_new_tokens, "--context + --max-new-tokens")
        ids = tok(essay_text("evaluation"), return_tensors="pt").input_ids[:, : args.context]
    n = args.max_new_tokens

    runs = {}
    t0_quality = time.perf_counter()
    for policy in ("dense", "dsparse"):
        torch._dynamo.reset()
        forward = compiled_forward(model, args.compile, policy, opts)
        t0 = time.perf_counter()
        res = greedy_decode(model, ids, n, forward=forward, cache="static", progress=True)
        res.wall_s = time.perf_counter() - t0
        rt = runtime_of(forward)
        res.sparse_calls = rt.stats["sparse_calls"] if rt is not None else 0
        runs[policy] = res

    dense, sparse = runs["dense"], runs["dsparse"]
    same_prefix = int((dense.tokens[0] == sparse.tokens[0]).long().cumprod(0).sum())
    same = int((dense.tokens[0] == sparse.tokens[0]).sum())
    quality_s = time.perf_counter() - t0_quality
    item = next(model.parameters()).element_size()
    weights = weight_bytes(model)
    dense_b, ds_b = attention_bytes(channels, model.config, ds, 1, ids.shape[1], item)
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    nt = torch.get_num_threads()
    info = machine_info()
    threads = f"{nt} thread{'s' if nt != 1 else ''}, {info['cpu']}, huge pages {info['huge_pages'].split()[0]}"
    print("\ndsc demo: Double Sparsity decoding on one CPU model")
    print(f"  model      {cfg.model_type}, {n_params / 1e6:.0f}M params, {cfg.num_hidden_layers} layers, "
          f"{cfg.num_attention_heads} q / {cfg.num_key_value_heads} kv heads, {args.dtype} (loaded in {load_s:.1f} s)")
    print(f"  channels   {channels.method!r} calibration on {channels.tokens} tokens of calibration essays "
          f"({calib_s:.1f} s, cached)")
    print(f"  policy     budget {ds.budget_text()}, r={ds.r} label channels, {ds.label_bits}-bit labels, "
          f"dense layers {list(ds.dense_layers)}, sink {ds.sink} + recent {ds.recent}, gqa={ds.gqa}")
    print(f"  prompt     {ids.shape[1]} tokens; {n} new tokens, greedy, static cache, {args.compile}")
    print(f"  dense      {tok.decode(dense.tokens[0], skip_special_tokens=True)!r}")
    print(f"  dsparse    {tok.decode(sparse.tokens[0], skip_special_tokens=True)!r}")
    print(f"  agreement  {same}/{n} tokens equal to dense; identical prefix {same_prefix}/{n}")
    print(f"  sparse op  {sparse.sparse_calls} calls of the Double Sparsity decode op")
    print(f"  speed      this prompt, batch 1: dense {dense.median_step_s * 1e3:.0f} ms/step "
          f"({1 / dense.median_step_s:.1f} tok/s), dsparse {sparse.median_step_s * 1e3:.0f} ms/step "
          f"({1 / sparse.median_step_s:.1f} tok/s) (median step of the two runs above, one after the other; "
          f"{threads}" + ("; the sweep below times them side by side" if contexts else "") + ")")
    print(f"  bytes      per step, all layers: K/V dense {dense_b / 1e6:.2f} MB, dsparse {ds_b / 1e6:.2f} MB "
          f"(limit {dense_b / ds_b:.2f}x at this length); weights {weights / 1e6:.0f} MB, read by both: the K/V "
          f"cache is {100 * dense_b / (dense_b + weights):.0f}% of a dense step's bytes here"
          + (", more at longer contexts and larger batches (sweep below)" if contexts else ""))
    sweep_s = 0.0
    if contexts:
        t0, cpu0, busy0 = time.perf_counter(), time.process_time(), cpu_busy_seconds()
        rows = speed_sweep(model, tok, args, opts, contexts)
        sweep_s = time.perf_counter() - t0
        print_sweep(rows, args, ds, channels, model, weights, threads)
        busy1 = cpu_busy_seconds()
        if busy0 is not None and busy1 is not None:
            other = max(0.0, (busy1 - busy0) - (time.process_time() - cpu0)) / (sweep_s * (os.cpu_count() or 1))
            busy = ": the times are slower and noisier than on an idle machine" + (
                ", dsparse's (many small ops) most with more than one thread; --threads 1 is steadier"
                if torch.get_num_threads() > 1 else "")
            print(f"  machine    other processes kept {100 * other:.0f}% of the {os.cpu_count()} cores busy during "
                  f"the sweep" + (busy if other >= 0.1 else ""))
    print(f"  time       {time.perf_counter() - t_start:.0f} s in all: load {load_s:.0f} s, calibration "
          f"{calib_s:.0f} s, quality {quality_s:.0f} s" + (f", speed sweep {sweep_s:.0f} s" if contexts else ""))
    return 0


def print_sweep(rows, args, ds, channels, model, weights: int, threads: str) -> None:
    """The sweep's table, baseline, limits, crossover and (``--plot``) chart."""
    from dsc.bench.common import format_table, plot_ms_per_step
    from dsc.bytes import attention_bytes

    item = next(model.parameters()).element_size()
    for r in rows:
        kv_dense, kv_ds = attention_bytes(channels, model.config, ds, r["batch"], r["context"], item)
        r["kv_limit"] = kv_dense / kv_ds
        r["step_limit"] = (weights + kv_dense) / (weights + kv_ds)
        r["kv_share"] = f"{100 * kv_dense / (weights + kv_dense):.0f}%"
    inductor = args.compile == "inductor"
    cols = [("context", "context")]
    if inductor:
        cols += [("dense_eager_ms", "dense eager ms"), ("dense_inductor_ms", "dense inductor ms"),
                 ("best_dense", "baseline")]
    cols += [("dense_ms", "dense ms/step"), ("dsparse_ms", "dsparse ms/step"), ("speedup", "speedup"),
             ("kv_limit", "K/V limit"), ("step_limit", "step limit"), ("kv_share", "K/V share")]
    sparse_layers = sum(1 for i in range(model.config.num_hidden_layers)
                        if i not in ds.dense_layers and channels.has_layer(i))
    print(f"  sweep      batch {args.sweep_batch}, {args.dtype}, the policy above, {args.compile}; median of "
          f"{args.steps} decode steps after {args.warmup} warm-up per point, each from a prefilled cache of the "
          f"context ({threads})")
    print("\n".join("    " + line for line in format_table(rows, cols).splitlines()))
    if inductor:
        won = {x: [str(r["context"]) for r in rows if r["best_dense"] == x] for x in ("eager", "inductor")}
        print("  baseline   the faster dense model at each context, dense eager or dense inductor (both timed): "
              + "; ".join(f"{x} at {', '.join(c)}" for x, c in won.items() if c))
    else:
        print("  baseline   dense eager: the model as loaded, run eagerly (the only dense run with --compile eager; "
              "--compile inductor also times dense inductor and takes the faster)")
    print("  speedup    baseline ms / dsparse ms (> 1: dsparse is faster)")
    print(f"  limits     byte-count limits of the speedup (dsc.bytes): K/V = the attention K/V bytes one step reads, "
          f"dense / dsparse (every token's labels plus the selected rows in the {sparse_layers} sparse layers, all of "
          f"K/V in the others); step = the same with the {weights / 1e6:.0f} MB of weights that every step also "
          f"reads added to both sides; K/V share = K/V bytes / all bytes of a dense step")
    print(f"  crossover  {crossover(rows)}")
    if args.plot:
        pts = [{"context": r["context"], "ms_per_step": r[f"dense_{x}_ms"], "policy": "dense", "compile": x}
               for r in rows for x in (("eager", "inductor") if inductor else ("eager",))]
        pts += [{"context": r["context"], "ms_per_step": r["dsparse_ms"], "policy": "dsparse", "compile": args.compile}
                for r in rows]
        plot_ms_per_step(args.plot, pts, ("policy", "compile"),
                         f"dsc demo: {model.config.model_type}, batch {args.sweep_batch}, {args.dtype}, "
                         f"budget {args.budget}")
        print(f"  plot       wrote {args.plot} (ms/step vs context, dense and dsparse)")
