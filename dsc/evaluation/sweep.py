"""``dsc eval sweep``: perplexity vs budget per policy (equal tokens and equal bytes read), retrieval vs context
length; writes a PNG plus CSV and JSON.

Equal tokens: every policy gets the same fraction of each row's valid tokens. Equal bytes: every policy gets the
token fraction that makes (scoring bytes + fetched K/V bytes) per token equal to the target share of dense
(:meth:`dsc.evaluation.policies.Policy.for_bytes`, 16-bit cache); policies whose scoring alone costs more are
left out at that target (oracle always: it reads all of K). Equal-bytes runs use group selection (one fetched row
per selected token and KV head), where that byte model is exact; per-query-head selection fetches up to G times
more rows, which the measured ``bytes_frac`` column shows.
"""
from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

SELECTORS = ("dsparse", "oracle", "streaming", "quest", "sparq")


def add_arguments(p):
    from dsc.evaluation.ppl import add_policy_arguments

    p.add_argument("--model", default=None, help="local HF model folder (default: embedded SmolLM2-135M)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--plot", required=True, metavar="PNG", help="write the plot here (CSV/JSON next to it)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="run nothing: merge the JSON results of earlier sweeps (e.g. policies split across "
                        "processes) into one plot, CSV and JSON; they must share the dense perplexity")
    p.add_argument("--csv", default=None, help="CSV path (default: the plot path with .csv)")
    p.add_argument("--json", default=None, help="JSON path (default: the plot path with .json)")
    p.add_argument("--context", type=int, default=1024, help="perplexity window length")
    p.add_argument("--windows", type=int, default=2, help="perplexity windows")
    p.add_argument("--budgets", default="1/2,1/4,1/8,1/16,1/32", help="token budgets (equal tokens)")
    p.add_argument("--budget-mode", default="context", choices=("context", "row"),
                   help="context: a budget fraction f means k = f * context tokens for every row (rows with <= k "
                        "keys are exact), as in the paper's perplexity runs; row: f of each row's own keys")
    p.add_argument("--bytes", default="1/4,1/8,1/16", help="shares of dense bytes read (equal bytes; '' = skip)")
    p.add_argument("--task", default="passkey,lines", help="retrieval tasks ('' = skip retrieval)")
    p.add_argument("--lengths", default="512,1024,2048", help="retrieval context lengths")
    p.add_argument("--depths", default="0.1,0.5,0.9", help="retrieval needle depths")
    p.add_argument("--samples", type=int, default=1, help="retrieval cases per (task, length, depth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new", type=int, default=8)
    p.add_argument("--retrieval-budget", default="1/16", help="token budget of the retrieval runs")
    add_policy_arguments(p)
    p.set_defaults(policy=",".join(SELECTORS))


def _need_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("`dsc eval sweep --plot` needs matplotlib (the `plot` extra); install it with: "
                         ".venv/bin/pip install -c constraints.txt matplotlib   (or pip install 'dsc[plot]')") \
            from None
    return plt


def plot(path, ppl_rows, ret_summary, dense_ppl, budget_mode: str = "context"):
    plt = _need_matplotlib()
    panels = 3 if ret_summary else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.2))
    for mode, ax in zip(("tokens", "bytes"), axes):
        for name in SELECTORS:
            pts = sorted((r["x"], r["ppl"]) for r in ppl_rows if r["policy"] == name and r["mode"] == mode)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.axhline(dense_ppl, color="k", ls="--", lw=1, label="dense")
        ax.set_xscale("log", base=2)
        ax.set_xlabel(("token budget k / context" if budget_mode == "context" else "token budget (share of each "
                       "row's keys)") if mode == "tokens"
                      else "bytes read per step (share of dense, 16-bit cache)")
        ax.set_ylabel("perplexity (evaluation essays)")
        ax.set_title(f"perplexity at equal {mode}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if ret_summary:
        ax = axes[2]
        order = ("dense",) + SELECTORS
        labels = sorted({s["policy"] for s in ret_summary}, key=order.index)
        for name in labels:
            pts = sorted((s["length"], s["accuracy"], s["agree"]) for s in ret_summary if s["policy"] == name)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{name} accuracy")
            ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="x", ls=":", label=f"{name} agree w/ dense")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("share of cases / tokens")
        ax.set_title("retrieval (passkey + lines)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    from dsc.assets import check_context, load_model
    from dsc.bench.common import parse_list
    from dsc.evaluation import retrieval
    from dsc.config import parse_budget
    from dsc.evaluation.policies import Policy, check_model
    from dsc.evaluation.ppl import eval_windows, load_channels, parse_layers, perplexity

    _need_matplotlib()  # fail before the long run, not after it
    if args.merge:
        return merge(args)
    names = [n.strip() for n in str(args.policy).split(",") if n.strip()]
    if not names or any(n not in SELECTORS for n in names):
        raise ValueError(f"--policy must list policies among {SELECTORS}, got {args.policy!r}")
    budgets = [parse_budget(b) for b in args.budgets.split(",") if b.strip()]
    if not budgets or any(not isinstance(b, float) for b in budgets):
        raise ValueError(f"--budgets must be fractions such as 1/16, got {args.budgets!r}")
    byte_targets = [float(parse_budget(b)) for b in args.bytes.split(",") if b.strip()]
    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    model, tok = load_model(args.model, dtype=args.dtype)
    check_context(model, args.context, "--context")
    _, hq, hkv, d = check_model(model)
    chans = load_channels(args, model, tok) if "dsparse" in names else None
    common = dict(r=args.channels, label_bits=args.label_bits, gqa=args.gqa, sink=args.sink, recent=args.recent,
                  dense_layers=parse_layers(args.dense_layers), min_length=args.min_length, page=args.page)
    wins = eval_windows(tok, args.context, args.windows)
    dense = perplexity(model, wins, policy=Policy("dense"), chunk=args.chunk, prefill=args.prefill, desc="dense")
    rows = []

    def tokens(pol):
        if args.budget_mode == "context" and isinstance(pol.budget, float):
            return replace(pol, budget=max(1, round(pol.budget * args.context)))
        return pol

    def measure(pol, mode, x):
        pol = tokens(pol)
        res = perplexity(model, wins, policy=pol, chunk=args.chunk, prefill=args.prefill,
                         desc=f"{mode} {pol.label()}")
        res.update(mode=mode, x=x, context=args.context, rel=res["ppl"] / dense["ppl"] - 1)
        rows.append(res)
        print(f"{mode:<6} x={x:<8.4g} {res['label']:<58} ppl {res['ppl']:.3f} ({100 * res['rel']:+.2f}%) "
              f"bytes {res['bytes_frac']:.4f}", flush=True)

    for name in names:
        base = Policy(name, budget=budgets[0], channels=chans, **common)
        for b in budgets:
            measure(replace(base, budget=b), "tokens", b)
        for target in byte_targets:
            pol = replace(base, gqa="group").for_bytes(target, d, hq // hkv)
            if pol is not None:
                measure(pol, "bytes", target)
    ret_rows, ret_summary = [], []
    if tasks:
        lengths = parse_list(args.lengths, int, "--lengths")
        depths = parse_list(args.depths, float, "--depths")
        for n in lengths:
            check_context(model, n + 64, "--lengths")
        rb = parse_budget(args.retrieval_budget)
        pols = [Policy("dense")] + [Policy(n, budget=rb, channels=chans, **common) for n in names]
        ret_rows, _ = retrieval.evaluate(model, tok, pols, tasks, lengths, depths, args.samples, args.seed,
                                         args.max_new, args.chunk)
        ret_summary = retrieval.summarize(ret_rows, by=("policy", "length"))
    write_outputs(args, dense, rows, ret_summary, ret_rows)
    return 0


def write_outputs(args, dense: dict, rows: list, ret_summary: list, ret_rows: list) -> None:
    """The plot, the CSV (perplexity rows, then the retrieval summary) and the JSON of one sweep."""
    stem = Path(args.plot).with_suffix("")
    csv_path = Path(args.csv) if args.csv else stem.with_suffix(".csv")
    json_path = Path(args.json) if args.json else stem.with_suffix(".json")
    fields = ["mode", "x", "policy", "label", "budget", "r", "label_bits", "gqa", "sink", "recent", "ppl", "rel",
              "nll", "fetched_frac", "bytes_frac", "tokens", "context"]
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerow({**dense, "mode": "dense", "x": 1.0, "rel": 0.0, "context": rows[0]["context"] if rows else ""})
        w.writerows(rows)
        if ret_summary:
            f.write("\n")
            rw = csv.DictWriter(f, fieldnames=list(ret_summary[0]))
            rw.writeheader()
            rw.writerows(ret_summary)
    json_path.write_text(json.dumps({"dense": dense, "ppl": rows, "retrieval": ret_summary,
                                     "retrieval_cases": ret_rows, "args": {k: v for k, v in vars(args).items()
                                                                           if not k.startswith("_")}},
                                    indent=2, default=str))
    plot(args.plot, rows, ret_summary, dense["ppl"], getattr(args, "budget_mode", "context"))
    print(f"wrote {args.plot}, {csv_path}, {json_path}")


def merge(args) -> int:
    """``--merge``: one plot/CSV/JSON from several sweeps' JSON files."""
    parts = []
    for path in args.merge:
        try:
            parts.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as e:
            raise ValueError(f"--merge: cannot read sweep results {path}: {e}") from None
        if not {"dense", "ppl", "retrieval"} <= set(parts[-1]):
            raise ValueError(f"--merge: {path} is not the JSON of a `dsc eval sweep`")
    dense = parts[0]["dense"]
    for path, part in zip(args.merge[1:], parts[1:]):
        if abs(part["dense"]["ppl"] - dense["ppl"]) > 1e-6 * dense["ppl"]:
            raise ValueError(f"--merge: {path} has dense perplexity {part['dense']['ppl']:.4f}, not "
                             f"{dense['ppl']:.4f} (another context, window count or model): not comparable")
    rows = [r for part in parts for r in part["ppl"]]
    ret_summary = [s for part in parts for s in part["retrieval"]]
    ret_rows = [c for part in parts for c in part.get("retrieval_cases", [])]
    write_outputs(args, dense, rows, ret_summary, ret_rows)
    return 0
