"""Quickstart: Double Sparsity decoding of the embedded SmolLM2-135M with ``backend="dsparse"``.

1. calibrate the channel config on calibration essays (cached under ``$DSC_CACHE/configs``),
2. generate greedily with the dense model,
3. compile with ``model.compile(backend="dsparse", options={...})`` and generate again,
4. compare the two continuations.

    python examples/quickstart.py                      # 1K-token prompt, 1/8 budget, inductor
    python examples/quickstart.py --prompt-tokens 640 --max-new-tokens 4 --inner eager   # a quick smoke run
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length in tokens (default 1024)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--budget", default="1/8", help="a fraction (1/8) or a token count (default 1/8)")
    p.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens (default 16384)")
    p.add_argument("--cache", choices=("static", "dynamic"), default="static")
    p.add_argument("--inner", choices=("inductor", "aot_eager", "eager"), default="inductor",
                   help="compiler behind the rewrite (eager = quick, for a smoke run)")
    args = p.parse_args(argv)

    import torch

    import dsc
    import dsc.config
    from dsc.assets import cache_dir, calibration_essays, essay_text, load_model

    model, tok = load_model()

    # 1. channel config: calibrate once, then reuse the saved JSON.
    path = cache_dir() / "configs" / f"smollm2-qk-{args.calib_tokens}.json"
    if path.exists():
        cfg = dsc.ChannelConfig.load(path)
    else:
        t0 = time.perf_counter()
        cfg = dsc.calibrate(model, calibration_essays(), tokenizer=tok, tokens=args.calib_tokens, progress=False)
        path.parent.mkdir(parents=True, exist_ok=True)
        cfg.save(path)
        print(f"calibrated on {args.calib_tokens} tokens in {time.perf_counter() - t0:.1f} s -> {path}")

    ids = tok(essay_text("evaluation"), return_tensors="pt").input_ids[:, : args.prompt_tokens]
    gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False, attention_mask=torch.ones_like(ids),
               pad_token_id=tok.eos_token_id)
    if args.cache == "static":
        gen["cache_implementation"] = "static"

    # 2. dense reference
    with torch.no_grad():
        t0 = time.perf_counter()
        dense = model.generate(ids, **gen)[0, ids.shape[1]:]
        dense_s = time.perf_counter() - t0

    # 3. Double Sparsity: compile with the dsparse backend, then generate as usual.
    budget = dsc.config.parse_budget(args.budget)
    dsc.compile(model, channels=cfg, budget=budget, inner=args.inner)  # model.compile(backend="dsparse", ...) + checks
    with torch.no_grad():
        t0 = time.perf_counter()
        sparse = model.generate(ids, **gen)[0, ids.shape[1]:]
        sparse_s = time.perf_counter() - t0  # includes compilation

    same = int((dense == sparse).long().cumprod(0).sum())
    print(f"prompt: {ids.shape[1]} tokens, budget {budget}, {args.cache} cache, inner {args.inner}")
    print(f"dense : {tok.decode(dense)!r}  ({dense_s:.1f} s)")
    print(f"sparse: {tok.decode(sparse)!r}  ({sparse_s:.1f} s incl. compile)")
    print(f"first {same} of {len(dense)} tokens identical; sparse attention calls: "
          f"{dsc.runtime_of(model).stats['sparse_calls']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
