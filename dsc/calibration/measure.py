"""Closing-note measurements of calibration on a model (default: the embedded one) and the calibration essays:
wall time to reach 4K/16K/64K tokens, top-r overlap of rankings from fewer tokens with the largest count, and
the share of top-r channels that come with their RoPE partner.

    python -m dsc.calibration.measure [--model PATH] [--checkpoints 4096 16384 65536] [--block-size 512]

One pass over the largest count; the ranking at each checkpoint is exactly what ``calibrate(tokens=N)`` gives,
since ``tokens=N`` takes the first N tokens of the same stream, in the same blocks.
"""
from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dsc.calibration.measure", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--checkpoints", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)

    import torch

    from dsc.assets import calibration_essays, load_model
    from dsc.calibration.config import pair_share, topk_overlap
    from dsc.calibration.stats import collect_stats, config_from_stats, token_blocks

    model, tok = load_model(args.model)
    marks = sorted(args.checkpoints)
    blocks = token_blocks(calibration_essays(), args.block_size, marks[-1], tok)
    total = sum(b.numel() for b in blocks)
    print(f"threads={torch.get_num_threads()} blocks={len(blocks)} tokens={total}", flush=True)
    stats, done, seen, start = None, {}, 0, time.perf_counter()
    pending = [m for m in marks if m <= total] or [total]
    for b in blocks:
        part = collect_stats(model, b, tokens=None, block_size=args.block_size, progress=False)
        stats = part if stats is None else stats.merge(part)
        seen += b.numel()
        while pending and seen >= pending[0]:
            mark = pending.pop(0)
            done[mark] = (time.perf_counter() - start, config_from_stats(stats, rope_layout=stats.rope_layout))
            print(f"{mark} tokens: {done[mark][0]:.1f} s cumulative", flush=True)
    results = {"threads": torch.get_num_threads(), "times_s": {m: round(t, 1) for m, (t, _) in done.items()}}
    ref_mark = max(done)
    ref = done[ref_mark][1]
    for m, (_, cfg) in done.items():
        for r in args.ranks:
            if m != ref_mark:
                results[f"overlap_{m}_vs_{ref_mark}_r{r}"] = round(topk_overlap(cfg, ref, r), 4)
            if cfg.rope_layout:
                results[f"pair_share_{m}_r{r}"] = round(pair_share(cfg, r), 4)
    print(json.dumps(results, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
