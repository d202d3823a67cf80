"""``dsc calibrate``: rank each head's channels on calibration text and write a channel config."""
from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="local HF model folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--data", nargs="+", default=None, metavar="FILE",
                        help="UTF-8 text files to calibrate on (default: the embedded calibration essays)")
    parser.add_argument("--tokens", type=int, default=65536, help="calibration tokens in total (default 65536)")
    parser.add_argument("--method", choices=("qk", "q", "k"), default="qk",
                        help="statistic: mean |q_c k_c| (qk, default), mean |q_c| (q) or mean |k_c| (k)")
    parser.add_argument("--block-size", type=int, default=512, help="tokens per forward pass (default 512)")
    parser.add_argument("--pair-aware", action="store_true", help="rank whole RoPE rotation pairs")
    parser.add_argument("--rope-layout", choices=("auto", "rotate_half", "interleaved"), default="auto",
                        help="RoPE pairing of channels (default: detected from the model)")
    parser.add_argument("--dtype", default="float32", help="model dtype for calibration (default float32)")
    parser.add_argument("--format", choices=("dsc", "reference"), default="dsc",
                        help="output format: dsc channel config (default) or the reference/SGLang JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--out", required=True, help="where to write the config JSON (a .json file path)")


def check_output(path: str, flag: str = "--out") -> Path:
    """Validate an output file path before any long work: not a directory, a ``.json`` name, and a location that
    can be created and written (the nearest existing ancestor is a writable directory)."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ValueError(f"{flag} {path!r} is a directory; pass the file to write, e.g. {str(p / 'cfg.json')!r}")
    if p.suffix.lower() != ".json":
        raise ValueError(f"{flag} {path!r} must name a .json file (the config is JSON), e.g. "
                         f"{str(p.with_suffix('.json'))!r}")
    ancestor = p.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"{flag} {path!r} cannot be created: {str(ancestor)!r} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path!r} cannot be written: no write permission in {str(ancestor)!r}")
    return p


def run(args: argparse.Namespace) -> int:
    import time

    from dsc.assets import calibration_essays, load_model, resolve_model_path, torch_dtype
    from dsc.calibration.config import pair_share
    from dsc.calibration.interchange import save_reference
    from dsc.calibration.stats import calibrate

    # Every argument is checked before the model is loaded: calibration takes minutes (about 45 at 65536 tokens
    # on 2 CPU cores), a mistake must not surface only when the result is written.
    out_path = check_output(args.out)
    dtype = torch_dtype(args.dtype, flag="--dtype")
    if args.tokens < 1:
        raise ValueError(f"--tokens must be positive, got {args.tokens}")
    if args.block_size < 2:
        raise ValueError(f"--block-size must be at least 2 tokens, got {args.block_size}")
    if args.model is not None:
        resolve_model_path(args.model)  # a clear error for a wrong folder (the default model converts on load)
    if args.data:
        texts = []
        for name in args.data:
            p = Path(name)
            if not p.is_file():
                raise FileNotFoundError(f"--data file {name!r} does not exist")
            texts.append(p.read_text(encoding="utf-8", errors="replace"))
    else:
        texts = calibration_essays()
    model, tok = load_model(args.model, dtype=dtype)
    start = time.perf_counter()
    cfg = calibrate(model, texts, method=args.method, tokens=args.tokens, block_size=args.block_size,
                    tokenizer=tok, pair_aware=args.pair_aware, progress=not args.no_progress,
                    rope_layout=args.rope_layout)
    seconds = time.perf_counter() - start
    out = cfg.save(out_path) if args.format == "dsc" else save_reference(cfg, out_path)
    share = (f", top-8 channels with their RoPE partner {pair_share(cfg, 8):.0%}"
             if cfg.rope_layout and cfg.head_dim >= 8 else "")
    print(f"calibrated {len(cfg.layers)} layers x {cfg.num_kv_heads} KV heads x {cfg.head_dim} channels on "
          f"{cfg.tokens} tokens ({args.method}) in {seconds:.1f} s; rope_layout={cfg.rope_layout}{share}")
    print(f"wrote {out}")
    return 0
