"""``dsc eval ppl``: perplexity on the evaluation essays (never the calibration ones), dense or under a policy.

The evaluation text is tokenized once and cut into consecutive, non-overlapping windows of ``context`` tokens;
perplexity is ``exp(mean NLL)`` over every predicted token of every window.

Under a sparse policy each window is one forward inside :func:`dsc.evaluation.policies.apply_policy`: every query
position takes the top-k of its own causal prefix, exactly as it would at a decode step, so the logits equal
token-by-token sparse decoding (tests/test_evaluation_ppl.py checks this against step-by-step decoding).
Positions ``< --prefill`` attend densely (a dense prefill), as do prefixes shorter than ``--min-length`` and
prefixes within the budget.
"""
from __future__ import annotations

import math


def add_arguments(p):
    from dsc.config import DSConfig

    p.add_argument("--model", default=None, help="local HF model folder (default: embedded SmolLM2-135M)")
    p.add_argument("--context", type=int, default=1024, help="window length in tokens")
    p.add_argument("--windows", type=int, default=4, help="number of windows to evaluate (0 = all)")
    p.add_argument("--dtype", default="float32")
    add_policy_arguments(p)
    p.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON")
    p.add_argument("--offload", action="store_true",
                   help="also decode each dsparse policy token by token through the compiled backend with offload "
                        "(slow; should equal the chunked result: a check of the offload path on real text)")
    p.add_argument("--predict", action="store_true",
                   help="as --offload, with next-layer prediction (reports the selection overlap)")
    p.add_argument("--sync-layers", default=",".join(map(str, DSConfig.sync_layers)),
                   help="with --predict: layers that select with their own query")


def add_policy_arguments(p, many: bool = True):
    """The policy knobs shared by ``eval ppl``, ``eval retrieval`` and ``eval sweep``."""
    from dsc.config import DEFAULT_GQA, GQA_MODES, LABEL_BITS, DSConfig as D
    from dsc.evaluation.policies import POLICIES

    p.add_argument("--policy", default="dense",
                   help=f"comma-separated policies among {', '.join(POLICIES)} (dense is always measured too)")
    p.add_argument("--budget", default="1/16",
                   help="comma-separated budgets: tokens (128; rows with <= 128 keys are exact) or fractions of "
                        "each row's own valid tokens (1/16, as DSConfig.budget)")
    p.add_argument("--channels", type=int, default=D.r, metavar="R",
                   help="r: label channels per KV head (dsparse) or top-|q| channels (sparq); default head_dim / 4")
    p.add_argument("--label-bits", type=int, default=D.label_bits, choices=LABEL_BITS,
                   help="dsparse label precision")
    p.add_argument("--gqa", default=DEFAULT_GQA, choices=GQA_MODES,
                   help="one selection per KV group (fewest bytes) or per query head")
    p.add_argument("--sink", type=int, default=D.sink, help="first valid tokens always selected (inside the budget)")
    p.add_argument("--recent", type=int, default=D.recent, help="last valid tokens always selected (inside the budget)")
    p.add_argument("--dense-layers", default=",".join(map(str, D.dense_layers)), help="comma-separated layers kept dense ('' = none)")
    p.add_argument("--min-length", type=int, default=D.min_length, help="prefixes shorter than this attend densely (default: derived from the budget, as DSConfig)")
    p.add_argument("--page", type=int, default=16, help="quest page size in tokens")
    p.add_argument("--prefill", type=int, default=0,
                   help="ppl: positions before this attend densely (a dense prefill of that many tokens)")
    p.add_argument("--calibration", default=None, metavar="PATH",
                   help="channel config JSON for dsparse (default: the cached default calibration on the "
                        "calibration essays)")
    p.add_argument("--calib-tokens", type=int, default=None, metavar="N",
                   help="calibration tokens of the default calibration (default: dsc.calibration's default)")
    p.add_argument("--chunk", type=int, default=256, help="query rows per attention chunk (memory bound)")


def parse_layers(text: str) -> tuple[int, ...]:
    text = (text or "").strip()
    if not text:
        return ()
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--dense-layers must be comma-separated layer numbers, got {text!r}") from None


def policies_from_args(args, model, tokenizer) -> list:
    """One :class:`Policy` per (policy, budget) named on the command line (dense first, once)."""
    from dsc.config import parse_budget
    from dsc.evaluation.policies import POLICIES, Policy

    names = [n.strip() for n in str(args.policy).split(",") if n.strip()]
    bad = [n for n in names if n not in POLICIES]
    if bad or not names:
        raise ValueError(f"--policy must list policies among {POLICIES}, got {args.policy!r}")
    budgets = [parse_budget(b) for b in str(args.budget).split(",") if b.strip()]
    if not budgets:
        raise ValueError(f"--budget must list at least one budget, got {args.budget!r}")
    chans = load_channels(args, model, tokenizer) if "dsparse" in names else None
    common = dict(r=args.channels, label_bits=args.label_bits, gqa=args.gqa, sink=args.sink, recent=args.recent,
                  dense_layers=parse_layers(args.dense_layers), min_length=args.min_length, page=args.page)
    out = [Policy("dense")]
    for n in names:
        if n == "dense":
            continue
        out += [Policy(n, budget=b, channels=chans, **common) for b in budgets]
    return out


def load_channels(args, model, tokenizer):
    """The channel config named by ``--calibration``, else the cached default calibration (calibration essays)."""
    from dsc.calibration import ChannelConfig, default_config
    from dsc.evaluation.policies import check_model

    if getattr(args, "calibration", None):
        cfg = ChannelConfig.load(args.calibration)
    else:
        from dsc.calibration.default import DEFAULT_TOKENS

        cfg = default_config(model=model, tokenizer=tokenizer, tokens=getattr(args, "calib_tokens", None)
                             or DEFAULT_TOKENS)
    nl, hq, hkv, d = check_model(model)
    cfg.check_shapes(num_layers=nl, num_heads=hq, num_kv_heads=hkv, head_dim=d)
    return cfg


def eval_windows(tokenizer, context: int, windows: int) -> "torch.Tensor":
    """``[n, context]`` consecutive windows of the evaluation essays."""
    from dsc.assets import essay_text

    ids = tokenizer(essay_text("evaluation"), return_tensors="pt").input_ids[0]
    n = ids.numel() // context
    if n == 0:
        raise ValueError(f"context {context} is longer than the evaluation text ({ids.numel()} tokens)")
    if windows > 0:
        n = min(n, windows)
    return ids[: n * context].view(n, context)


def perplexity(model, windows, forward=None, progress: bool = True, policy=None, prefill: int = 0,
               chunk: int = 256, desc: str = "perplexity") -> dict:
    """Mean next-token NLL over ``windows`` ``[n, L]``, one forward per window; returns ppl, nll, tokens.

    With ``policy`` (a :class:`~dsc.evaluation.policies.Policy`) attention follows it; the result also holds
    ``fetched_frac`` (mean share of each sparse row's valid K/V rows fetched, union over a KV group) and
    ``bytes_frac`` (bytes read per token and KV head relative to dense, with a 16-bit cache)."""
    import contextlib

    import torch
    from tqdm import tqdm

    from dsc.bytes import kv_bytes
    from dsc.evaluation.policies import ELEM_BYTES

    from dsc.evaluation.policies import apply_policy, check_model

    forward = forward or model
    total, count = 0.0, 0
    after, after_count = 0.0, 0  # NLL of the tokens predicted after the prefill (the decode-like figure)
    fetched = valid = kept = 0.0
    kept_rows = 0
    with torch.no_grad():
        for w in tqdm(windows, desc=desc, unit="win", disable=not progress):
            ctx = apply_policy(model, policy, prefill=prefill, chunk=chunk) if policy is not None \
                else contextlib.nullcontext()
            with ctx as mode:
                logits = forward(input_ids=w[None], use_cache=False).logits[0, :-1].float()
            if mode is not None:
                fetched += mode.stats.fetched
                valid += mode.stats.valid
                kept += mode.stats.kept
                kept_rows += mode.stats.kept_rows
            nll = torch.nn.functional.cross_entropy(logits, w[1:], reduction="none")
            total += nll.sum().item()
            count += w.numel() - 1
            after += nll[max(prefill - 1, 0):].sum().item()  # logits row p predicts token p + 1
            after_count += nll[max(prefill - 1, 0):].numel()
    res = {"ppl": math.exp(total / count), "nll": total / count, "tokens": count, "windows": len(windows),
           "ppl_after_prefill": math.exp(after / after_count) if after_count else float("nan"),
           "kept_frac": kept / kept_rows if kept_rows else 1.0}
    if policy is not None:
        _, hq, hkv, d = check_model(model)
        frac = fetched / valid if valid else 1.0
        res.update(policy=policy.name, label=policy.label(), budget=policy.budget, r=policy.r,
                   label_bits=policy.label_bits, gqa=policy.gqa, sink=policy.sink, recent=policy.recent,
                   dense_layers=list(policy.dense_layers), min_length=policy.min_length, prefill=prefill,
                   fetched_frac=frac, bytes_frac=policy.score_bytes(d, hq // hkv) / kv_bytes(d, ELEM_BYTES) + frac
                   if policy.name != "dense" else 1.0)
    return res


def perplexity_compiled(model, windows, policy, progress: bool = True, **options) -> dict:
    """Mean next-token NLL of ``windows`` decoded token by token (teacher-forced, static cache) through
    ``torch.compile(model.forward, backend="dsparse")`` with ``policy``'s knobs and ``options`` (e.g.
    ``offload=True, predict=True``): what the backend itself does, including offload and next-layer prediction,
    which the chunked evaluation does not model. Slow (one forward per token). With ``predict`` the result holds
    ``overlap``: the share of each predicted site's own selection that the prediction also chose."""
    import torch
    from tqdm import tqdm

    from dsc.backend import sparse_backend
    from dsc.generation import make_cache

    backend = sparse_backend(**policy.backend_options(inner="eager", measure_overlap=bool(options.get("predict")),
                                                      **options))
    torch._dynamo.reset()
    forward = torch.compile(model.forward, backend=backend, dynamic=False)
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for w in windows:
                cache = make_cache(model, "static", w.numel())
                for t in tqdm(range(w.numel() - 1), desc=policy.label(), unit="tok", disable=not progress,
                              leave=False):
                    lg = forward(input_ids=w[None, t:t + 1], cache=cache, use_cache=True,
                                 cache_position=torch.tensor([t])).logits[0, -1].float()
                    total += torch.nn.functional.cross_entropy(lg, w[t + 1]).item()
                    count += 1
    finally:
        torch._dynamo.reset()
    stats = backend.runtime.stats
    res = {"ppl": math.exp(total / count), "nll": total / count, "tokens": count, "windows": len(windows),
           "policy": policy.name, "label": policy.label() + "".join(f" {k}" for k, v in options.items() if v is True),
           "budget": policy.budget, "fetched_frac": float("nan"), "bytes_frac": float("nan"),
           "h2d_bytes": stats["h2d_bytes"], "predictions": stats["predictions"]}
    if stats["overlap_total"]:
        res["overlap"] = stats["overlap_hits"] / stats["overlap_total"]
    return res


def run(args) -> int:
    from dsc.assets import check_context, load_model
    from dsc.bench.common import write_json

    model, tok = load_model(args.model, dtype=args.dtype)
    check_context(model, args.context, "--context")
    if args.windows < 0:
        raise ValueError(f"--windows must be >= 0, got {args.windows}")
    if args.chunk <= 0:
        raise ValueError(f"--chunk must be positive, got {args.chunk}")
    if args.prefill < 0:
        raise ValueError(f"--prefill must be >= 0, got {args.prefill}")
    if (args.offload or args.predict) and args.prefill:
        raise ValueError("--offload/--predict decode every token through the compiled backend: use --prefill 0")
    pols = policies_from_args(args, model, tok)
    wins = eval_windows(tok, args.context, args.windows)
    results = []
    for pol in pols:
        res = perplexity(model, wins, policy=pol, prefill=args.prefill, chunk=args.chunk, desc=pol.label())
        res.update(context=args.context)
        results.append(res)
        if pol.name == "dsparse" and (args.offload or args.predict):
            res = perplexity_compiled(model, wins, pol, offload=True, predict=args.predict,
                                      sync_layers=parse_layers(args.sync_layers))
            res.update(context=args.context)
            results.append(res)
    dense = results[0]["ppl"]
    dense_after = results[0].get("ppl_after_prefill", float("nan"))
    print(f"evaluation essays: {results[0]['windows']} windows of {args.context} tokens, prefill {args.prefill}; "
          f"'all': every position scored (the paper's convention); 'decode': only the tokens after the prefill; "
          f"'kept': mean share of each decoding row's valid tokens attended")
    print(f"{'policy':<60} {'ppl all':>9} {'vs dense':>9} {'decode':>9} {'vs dense':>9} {'kept':>7} "
          f"{'fetched':>8} {'bytes':>7}")
    for res in results:
        res["rel"] = res["ppl"] / dense - 1
        res["rel_after_prefill"] = res.get("ppl_after_prefill", float("nan")) / dense_after - 1
        extra = f"  prediction overlap {res['overlap']:.3f}" if "overlap" in res else ""
        print(f"{res['label']:<60} {res['ppl']:9.3f} {100 * res['rel']:+8.2f}% "
              f"{res.get('ppl_after_prefill', float('nan')):9.3f} {100 * res['rel_after_prefill']:+8.2f}% "
              f"{res.get('kept_frac', float('nan')):7.4f} {res['fetched_frac']:8.4f} {res['bytes_frac']:7.4f}{extra}")
    write_json(args.json, results if len(results) > 1 else results[0])
    return 0
