"""``dsc bench decode``: end-to-end decode throughput and per-step latency, static cache, per policy.

Policies: ``dense`` (the model as it is) and ``dsparse`` (the ``dsparse`` backend with a calibrated channel config;
with ``--compile eager`` its rewritten graph runs without inductor). ``--quant int8`` applies torchao int8
weight-only quantization first: smaller weights make the KV cache a larger share of the bytes read.
``--offload`` adds ``dsparse+offload`` rows (K/V of sparse layers in host memory, only the selected rows fetched,
:mod:`dsc.passes.offload`) with the host -> device bytes counted per decode step, beside what whole-layer offload
(every layer's full K/V moved each step) would move in the same run, and the device memory per sequence with and
without offload.

Every configuration decodes greedily from a prompt of real essay text so that the cache ends at the given context
length (prompt = context - decode steps); the figure is the median per-step latency over the timed steps (after
warm-up steps), and tokens/s = batch / latency. The prompt is prefilled once per shape (dtype, quantization,
context, batch; identical rows run as one), eagerly and densely, which is what every policy's prefill computes,
and each configuration decodes from that cache ("prefill s" is that shared run); offload rows prefill their own
(their host store must see it).
Eager and compiled runs happen in the same process, one after the other, so their ratio is meaningful; absolute
numbers on a shared 2-core CPU are noisy. ``--plot PATH`` draws ms/step vs context, one line per (policy, compile,
batch, dtype, quant, label bits) measured (:func:`dsc.bench.common.plot_ms_per_step`, which ``dsc demo --plot``
uses too). ``--label-bits 16,8`` adds one dsparse row per label format (column "label bits").

On a GPU (``--device cuda``; every clock read waits for the device) ``--compile cudagraphs`` adds dense rows under
CUDA graphs (inductor's ``reduce-overhead`` mode, what HF's compiled generate uses): the dense baseline to beat there;
dsparse rows under it run the backend with ``cuda_graphs=True`` (experimental). ``--random-weights`` builds
the model from a folder's config.json alone (seeded, on the device), for speed at shapes whose checkpoint is not at
hand: ``--model examples/llama-3-8b-shape`` is Llama-3.1-8B's shape (16 GB of bf16 weights).
"""
from __future__ import annotations

import time
import warnings

from dsc.bench.common import check_plot_path, format_table, machine_info, parse_list, plot_ms_per_step, write_json

COMPILERS = ("eager", "inductor", "cudagraphs")  # cudagraphs: inductor with mode="reduce-overhead" (CUDA only)
DEVICES = ("cpu", "cuda")


def add_arguments(p):
    p.add_argument("--model", default=None, help="local HF model folder (default: embedded SmolLM2-135M)")
    p.add_argument("--random-weights", action="store_true",
                   help="build the --model folder's config.json with random weights on the device (speed only; "
                        "e.g. --model examples/llama-3-8b-shape); the folder needs no checkpoint or tokenizer")
    p.add_argument("--device", default="cpu", choices=DEVICES, help="where the model runs")
    p.add_argument("--contexts", default="512,2048,8192", help="prompt lengths, e.g. 512,2K,8K")
    p.add_argument("--batch", default="1,4", help="batch sizes, e.g. 1,4")
    p.add_argument("--dtype", default="float32", help="model dtypes, e.g. float32,bfloat16")
    p.add_argument("--compile", default="eager,inductor",
                   help=f"compilers among {','.join(COMPILERS)} (cudagraphs: inductor's reduce-overhead mode, CUDA "
                        "only; dsparse rows with the backend's experimental cuda_graphs=True, none for offload)")
    p.add_argument("--policy", default="dense", help="attention policies among dense,dsparse")
    p.add_argument("--budget", default="1/16", help="dsparse token budget: a fraction (1/16) or a token count")
    p.add_argument("--label-bits", default=None, metavar="BITS",
                   help="dsparse label formats, comma-separated among 16 (key dtype), 8, 4: one dsparse row per "
                        "format (default: the backend's)")
    p.add_argument("--gqa", default=None, choices=("head", "group"),
                   help="dsparse selection per query head or per KV group (default: the backend's)")
    p.add_argument("--channels", default=None, metavar="CFG.json",
                   help="dsparse channel config (default: the cached calibration of the embedded model)")
    p.add_argument("--offload", action="store_true",
                   help="add dsparse+offload runs: host -> device bytes per step vs whole-layer offload, memory")
    p.add_argument("--quant", default="none", help="weight quantization among none,int8 (torchao)")
    p.add_argument("--steps", type=int, default=16, help="timed decode steps per configuration")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps before timing")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (0 = torch's default); 1 is steadier on a loaded machine")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor-parallel ranks: relaunch under torchrun with N processes, load the model with HF's "
                        "tp_plan='auto' (gloo on CPU); each rank reports its own tok/s and KV cache MB "
                        "(--json PATH writes PATH.rank<r>.json, --plot PATH writes PATH.rank<r>.png)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--plot", default=None, metavar="PATH.png",
                   help="also draw ms/step vs context, one line per (policy, label bits, compile, batch, dtype, quant) "
                        "measured (needs matplotlib, the plot extra)")


def relaunch_tensor_parallel(args) -> int:
    """Run this same command under ``torch.distributed.run`` with ``args.tp`` processes (the ranks see
    ``WORLD_SIZE`` and load the model sharded)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.tp), "-m", "dsc",
           *args.argv]
    return subprocess.run(cmd).returncode


def compiled_forward(model, compiler: str, policy: str = "dense", ds_options: dict | None = None):
    """``model.forward`` as the benchmark runs it: eager, inductor, or the dsparse backend (whose runtime, with its
    counters, ``dsc.runtime_of(forward)`` returns)."""
    import torch

    from dsc.backend import sparse_backend

    graphs = compiler == "cudagraphs"
    mode = "reduce-overhead" if graphs else None
    if policy in ("dsparse", "dsparse+offload"):
        backend = sparse_backend(**dict(ds_options or {}, inner="eager" if compiler == "eager" else "inductor",
                                        offload=policy == "dsparse+offload", cuda_graphs=graphs))
        compiled = torch.compile(model.forward, backend=backend, dynamic=False, mode=mode)
    elif compiler == "eager":
        return model.forward
    else:
        compiled = torch.compile(model.forward, backend="inductor", dynamic=False, mode=mode)
    forward = compiled
    if graphs:
        def forward(**inputs):
            torch.compiler.cudagraph_mark_step_begin()  # each call is a new step: earlier outputs may be overwritten
            return compiled(**inputs)
    if policy != "dense":
        forward.dsparse_runtime = backend.runtime
    return forward


def quantize_int8(model):
    """torchao int8 weight-only quantization of every Linear, in place."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise ValueError("--quant int8 needs torchao: pip install -c constraints.txt -e '.[quant]'") from None
    quantize_(model, Int8WeightOnlyConfig())
    return model


def prompt_ids(tok, context: int, batch: int, steps: int, warmup: int):
    """The benchmark's prompt: ``batch`` identical rows of essay text, ending ``steps + warmup + 1`` tokens before
    ``context`` (the decode fills the rest)."""
    from dsc.generation import text_ids

    return text_ids(tok, context - (steps + warmup + 1)).expand(batch, -1).contiguous()


def shared_prefill(model, tok, context: int, batch: int, steps: int, warmup: int):
    """The prompt prefilled once (eager, dense: what every policy's prefill computes) for the runs of one shape, or
    None where the cache cannot be rewound (sliding-window layers: each run then prefills for itself)."""
    from dsc.generation import prefill

    done = prefill(model, prompt_ids(tok, context, batch, steps, warmup), steps + warmup + 1)
    return done if done.rewindable else None


def bench_one(model, tok, context: int, batch: int, compiler: str, steps: int, warmup: int,
              policy: str = "dense", ds_options: dict | None = None, prefilled=None) -> dict:
    """One configuration's decode: median ms/step of ``steps`` after ``warmup``. ``prefilled``
    (:func:`shared_prefill`, not for offload, whose host store must see the prefill) skips its prefill; the
    dsparse runtime then labels the cache at its first step (a warm-up step)."""
    from dsc.backend import runtime_of
    from dsc.generation import greedy_decode

    n = steps + warmup + 1
    ids = prompt_ids(tok, context, batch, steps, warmup)
    forward = compiled_forward(model, compiler, policy, ds_options)
    skips = _cudagraph_skips()
    t0 = time.perf_counter()
    r = greedy_decode(model, ids, n, forward=forward, cache="static", prefilled=prefilled)
    wall = time.perf_counter() - t0
    if compiler == "cudagraphs" and _cudagraph_skips() > skips:
        warnings.warn(f"{policy} cudagraphs row (context {context}, batch {batch}): inductor skipped CUDA graphs "
                      "(see TORCH_LOGS=perf_hints), so this row is plain inductor", stacklevel=2)
    timed = r.step_s[warmup:]
    lat = sorted(timed)[len(timed) // 2]
    row = {"policy": policy, "context": context, "batch": batch, "compile": compiler, "ms_per_step": lat * 1e3,
           "tok_per_s": batch / lat, "prefill_s": r.prefill_s, "wall_s": wall, "steps": len(timed),
           "kv_cache_mb": r.cache_bytes / 2**20}
    if policy == "dsparse+offload":
        row.update(transfer_counts(model, ids.shape[1], batch, len(r.step_s), dict(runtime_of(forward).stats)))
    return row


def _cudagraph_skips() -> int:
    """How many graphs inductor has compiled without CUDA graphs (for a reason it logs) in this process."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def _kv_shape(model) -> tuple[int, int, int, int, int]:
    """``(layers, Hq, Hkv, head_dim, bytes per element)`` of the model's KV cache (whole model, all ranks)."""
    from dsc.evaluation.policies import check_model

    return (*check_model(model), next(model.parameters()).element_size())


def transfer_counts(model, prompt: int, batch: int, decode_steps: int, stats: dict) -> dict:
    """Host -> device MB per decode step: counted by the offload op vs whole-layer offload (every layer's K/V at
    its valid length moved once per step), over the same decode steps."""
    from dsc.bytes import cache_bytes

    layers, _, hkv, d, item = _kv_shape(model)
    lengths = [prompt + i + 1 for i in range(decode_steps)]  # valid cache length at each decode step
    whole = sum(cache_bytes(s, hkv, d, item, layers, batch) for s in lengths) / decode_steps
    moved = stats.get("h2d_bytes", 0) / decode_steps
    return {"h2d_mb_per_step": moved / 2**20, "whole_layer_mb_per_step": whole / 2**20,
            "h2d_share": moved / whole}


def run(args) -> int:
    import torch
    from tqdm import tqdm

    import os

    from dsc.assets import check_context, load_model
    from dsc.bytes import step_limit
    from dsc.config import LABEL_BITS, DSConfig

    if args.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {args.tp}")
    rank = None
    if args.tp > 1:
        if args.offload or args.quant != "none" or args.random_weights or args.device != "cpu":
            raise ValueError("--tp runs dense and dsparse policies on the CPU, without --offload, --quant or "
                             "--random-weights (not supported together yet)")
        if "WORLD_SIZE" not in os.environ:
            return relaunch_tensor_parallel(args)
        rank = int(os.environ["RANK"])
        if args.json:
            args.json = f"{args.json}.rank{rank}.json"
        if args.plot:
            args.plot = f"{args.plot}.rank{rank}.png"
    contexts = parse_list(args.contexts, int, "context length")
    batches = parse_list(args.batch, int, "batch size")
    dtypes = parse_list(args.dtype, str, "dtype")
    compilers = parse_list(args.compile, str, "compiler")
    policies = parse_list(args.policy, str, "policy")
    if args.offload and "dsparse+offload" not in policies:
        policies.append("dsparse+offload")
    quants = parse_list(args.quant, str, "quantization")
    label_bits = parse_list(args.label_bits, int, "label format") if args.label_bits else [None]
    if any(b not in (None, *LABEL_BITS) for b in label_bits):
        raise ValueError(f"--label-bits values must be among {LABEL_BITS}, got {label_bits}")
    for name, values, allowed in (("--policy", policies, POLICIES), ("--quant", quants, QUANTS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            raise ValueError(f"{name} values must be among {allowed}, got {bad}")
    for b in batches:
        if b <= 0:
            raise ValueError(f"--batch values must be positive, got {b}")
    for c in compilers:
        if c not in COMPILERS:
            raise ValueError(f"--compile values must be among {COMPILERS}, got {c!r}")
    check_device(args.device, compilers)
    if args.steps <= 0 or args.warmup < 0:
        raise ValueError("--steps must be positive and --warmup non-negative")
    if args.threads < 0:
        raise ValueError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    check_plot_path(args.plot)  # before the long run, not after it

    rows = []
    configs = [(d, q, c, b, x, p, bits) for d in dtypes for q in quants for c in contexts for b in batches
               for x in compilers for p in policies for bits in (label_bits if p.startswith("dsparse") else [None])
               if not (x == "cudagraphs" and p == "dsparse+offload")]
    if "cudagraphs" in compilers and "dsparse" in policies:
        print("note: dsparse under cudagraphs runs the backend's experimental cuda_graphs=True (replays checked in a "
              "CPU emulation, not yet on a GPU); dsparse+offload has no cudagraphs rows (refused under capture)")
    bar = tqdm(configs, desc="bench decode", unit="cfg")
    loaded = None
    ds_options = None
    prefilled = None  # (shape, Prefilled): one prefill serves every configuration of a shape
    for dtype, quant, ctx, batch, compiler, policy, bits in bar:
        if loaded != (dtype, quant):
            model = prefilled = None  # free the previous model and its cache before building the next
            model, tok = load_model(args.model, dtype=dtype, tp_plan="auto" if rank is not None else None,
                                    device=args.device, random_weights=args.random_weights)
            if quant == "int8":
                quantize_int8(model)
            loaded = (dtype, quant)
            if any(p != "dsparse+offload" for p in policies):  # offload rows keep their K/V off the device
                check_memory(model, args.device, max(contexts), max(batches))
        if policy.startswith("dsparse") and ds_options is None:
            ds_options = dsparse_options(args, model, tok)
        check_context(model, ctx, "context")
        if ctx <= args.steps + args.warmup + 1:
            raise ValueError(f"context {ctx} must exceed the decode steps ({args.steps} + {args.warmup} warm-up + 1)")
        options = None  # the backend options of a dsparse row: the command's, with this row's label format
        if policy.startswith("dsparse"):
            options = ds_options if bits is None else dict(ds_options, label_bits=bits)
        bar.set_postfix_str(f"{dtype} {quant} ctx={ctx} b={batch} {compiler} {policy}")
        torch._dynamo.reset()
        shape = (dtype, quant, ctx, batch)
        if policy != "dsparse+offload" and (prefilled is None or prefilled[0] != shape):
            prefilled = (shape, shared_prefill(model, tok, ctx, batch, args.steps, args.warmup))
        try:
            row = bench_one(model, tok, ctx, batch, compiler, args.steps, args.warmup, policy, options,
                            None if policy == "dsparse+offload" else prefilled[1])
        except Exception as e:
            if (compiler, policy) != ("cudagraphs", "dsparse"):
                raise
            warnings.warn(f"the experimental dsparse cudagraphs row (context {ctx}, batch {batch}) failed, the "
                          f"other rows go on: {type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
            continue
        row.update(dtype=dtype, quant=quant, labels="")
        if options is not None:
            ds = DSConfig.from_options(options)
            row.update(labels=ds.label_bits, byte_limit=step_limit(model, options["channels"], ds, batch, ctx))
        rows.append(row)
        tqdm.write(format_table([row], _COLUMNS).splitlines()[-1])
    add_speedups(rows)
    if rank is not None:
        print(f"tensor-parallel rank {rank} of {args.tp}: this rank's tok/s and the KV cache its own heads hold")
    print(format_table(rows, _COLUMNS + [("speedup", "vs dense"), ("speedup_best", "vs fastest dense"),
                                         ("best_dense", "fastest dense"), ("byte_limit", "byte limit")]))
    print("vs fastest dense: the fastest dense row of the same shape (its compiler: 'fastest dense') / this row; "
          "byte limit: the bytes a dense step reads (weights, K/V) / a dsparse step's (weights, labels, selected "
          "K/V), dsc.bytes")
    moved = [r for r in rows if "h2d_mb_per_step" in r]
    if moved:
        print("\nhost -> device traffic per decode step (counted) vs whole-layer offload (computed, same run):")
        print(format_table(moved, _COLUMNS[:7] + _TRAFFIC))
        print("\n" + memory_report(model, contexts, batches, ds_options))
    info = machine_info()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    write_json(args.json, {"machine": info, "results": rows, "steps": args.steps, "warmup": args.warmup})
    if args.plot:
        plot_ms_per_step(args.plot, rows, PLOT_KEYS, f"decode step latency, median of {args.steps} steps")
        print(f"wrote plot {args.plot} (ms/step vs context, one line per {', '.join(PLOT_KEYS)} measured)")
    return 0


def check_memory(model, device: str, context: int, batch: int) -> None:
    """Refuse, before the first prefill, a run whose largest K/V cache cannot fit in the device's free memory (the
    cache alone, a lower bound: a run that fits is never refused; one that does not would fail minutes later)."""
    from dsc.bytes import cache_bytes

    layers, _, hkv, d, item = _kv_shape(model)
    need = cache_bytes(context, hkv, d, item, layers, batch)
    free = free_bytes(device)
    if free is not None and need > free:
        raise ValueError(f"the K/V cache of context {context} at batch {batch} needs {need / 2**30:.1f} GiB; the "
                         f"{device} has {free / 2**30:.1f} GiB free beside the model: lower --contexts or --batch")


def free_bytes(device: str) -> int | None:
    """Free memory of ``device``: the GPU's (CUDA's own count) or the host's available memory (Linux
    ``/proc/meminfo``; None where unreadable)."""
    import torch

    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_device(device: str, compilers: list[str]) -> None:
    """Refuse, before any work, a device this torch cannot use and CUDA graphs without CUDA."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda: torch {torch.__version__} sees no CUDA device; run on a machine with a "
                         "GPU and a CUDA build of torch, or use --device cpu")
    if "cudagraphs" in compilers and device != "cuda":
        raise ValueError("--compile cudagraphs records CUDA graphs and needs --device cuda; on the CPU compare "
                         "eager and inductor")


def add_speedups(rows: list[dict]) -> None:
    """``speedup`` = dense ms/step / this row's ms/step, for rows whose dense twin (same compiler) ran in the same
    process; ``speedup_best`` = the fastest dense run of the same model (dtype, quantization, shape) over every
    compiler measured / this row's ms/step: the honest comparison when one compiler suits the dense model better
    (int8 weights, say, run much faster through inductor than eagerly); ``best_dense`` = that run's compiler."""
    def key(r):
        return (r["dtype"], r["quant"], r["context"], r["batch"], r["compile"])

    dense = {key(r): r["ms_per_step"] for r in rows if r["policy"] == "dense"}
    best: dict[tuple, tuple[float, str]] = {}
    for k, ms in dense.items():
        best[k[:4]] = min((ms, k[4]), best.get(k[:4], (ms, k[4])))
    for r in rows:
        if key(r) in dense:
            r["speedup"] = dense[key(r)] / r["ms_per_step"]
        if key(r)[:4] in best:
            ms, r["best_dense"] = best[key(r)[:4]]
            r["speedup_best"] = ms / r["ms_per_step"]


def dsparse_options(args, model, tok) -> dict:
    """Backend options for ``--policy dsparse``: the channel config and the budget from the command line."""
    from dsc.calibration.config import ChannelConfig
    from dsc.config import parse_budget

    if args.channels:
        cfg = ChannelConfig.load(args.channels)
    else:
        from dsc.calibration.default import default_config

        cfg = default_config(args.model, model=model, tokenizer=tok)
    opts = {"channels": cfg, "budget": parse_budget(args.budget)}
    if getattr(args, "gqa", None):
        opts["gqa"] = args.gqa
    return opts


def memory_report(model, contexts, batches, ds_options) -> str:
    """Device bytes of the KV state per sequence, full cache vs offload (:func:`dsc.bytes.offload_device_bytes`)."""
    from dsc.bytes import offload_device_bytes
    from dsc.config import DSConfig

    cfg = DSConfig.from_options(dict(ds_options, offload=True))
    layers, hq, hkv, d, item = _kv_shape(model)
    sparse = layers - len([x for x in cfg.dense_layers if x < layers])
    rows = []
    for ctx in contexts:
        for b in batches:
            k = cfg.tokens_kept(ctx)
            rep = offload_device_bytes(layers=layers, sparse_layers=sparse, batch=b, kv_heads=hkv,
                               sel_heads=hq if cfg.gqa == "head" else hkv, length=ctx, head_dim=d, itemsize=item,
                               r=cfg.r, label_bits=cfg.label_bits, budget_tokens=k)
            rows.append({"context": ctx, "batch": b, "full": rep["per_sequence_full"] / 2**20,
                         "offload": rep["per_sequence_offload"] / 2**20,
                         "share": rep["offload"] / rep["full"]})
    cols = [("context", "context"), ("batch", "batch"), ("full", "full cache MB/seq"),
            ("offload", "offload MB/seq"), ("share", "share")]
    return ("device KV memory per sequence (computed; the 'KV cache MB' column above is what the model's cache "
            "tensors held, measured; offloaded layers hold placeholders, see dsc/passes/offload.py):\n"
            + format_table(rows, cols))


POLICIES = ("dense", "dsparse", "dsparse+offload")
PLOT_KEYS = ("policy", "labels", "compile", "batch", "dtype", "quant")  # one line per combination in --plot
QUANTS = ("none", "int8")
_COLUMNS = [("policy", "policy"), ("labels", "label bits"), ("quant", "quant"), ("dtype", "dtype"),
            ("context", "context"), ("batch", "batch"), ("compile", "compile"), ("tok_per_s", "tok/s"),
            ("ms_per_step", "ms/step"), ("prefill_s", "prefill s"), ("kv_cache_mb", "KV cache MB")]
_TRAFFIC = [("h2d_mb_per_step", "moved MB/step"), ("whole_layer_mb_per_step", "whole-layer MB/step"),
            ("h2d_share", "share")]
