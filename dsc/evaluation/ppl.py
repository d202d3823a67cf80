"""``dsc eval ppl``: perplexity on the evaluation essays (never the calibration ones).

The evaluation text is tokenized once and cut into consecutive, non-overlapping windows of ``context`` tokens;
perplexity is ``exp(mean NLL)`` over every predicted token of every window.
"""
from __future__ import annotations

import math


def add_arguments(p):
    p.add_argument("--model", default=None, help="local HF model folder (default: embedded SmolLM2-135M)")
    p.add_argument("--context", type=int, default=1024, help="window length in tokens")
    p.add_argument("--windows", type=int, default=4, help="number of windows to evaluate (0 = all)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the result as JSON")


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


def perplexity(model, windows, forward=None, progress: bool = True) -> dict:
    """Mean next-token NLL over ``windows`` ``[n, L]``, one forward per window; returns ppl, nll, tokens."""
    import torch
    from tqdm import tqdm

    forward = forward or model
    total, count = 0.0, 0
    with torch.no_grad():
        for w in tqdm(windows, desc="perplexity", unit="win", disable=not progress):
            logits = forward(input_ids=w[None], use_cache=False).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum")
            total += nll.item()
            count += w.numel() - 1
    return {"ppl": math.exp(total / count), "nll": total / count, "tokens": count, "windows": len(windows)}


def run(args) -> int:
    from dsc.assets import check_context, load_model
    from dsc.bench.common import write_json

    model, tok = load_model(args.model, dtype=args.dtype)
    check_context(model, args.context, "--context")
    if args.windows < 0:
        raise ValueError(f"--windows must be >= 0, got {args.windows}")
    res = perplexity(model, eval_windows(tok, args.context, args.windows))
    res.update(context=args.context, policy="dense")
    print(f"perplexity {res['ppl']:.3f}  (nll {res['nll']:.4f}, {res['tokens']} tokens, "
          f"{res['windows']} windows of {args.context}, evaluation essays, dense)")
    write_json(args.json, res)
    return 0
