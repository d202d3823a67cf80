"""``dsc demo``: the main job on the embedded model, with a short report.

Loads the model, decodes a prompt greedily with the dense model, and prints what it said and how fast.
"""
from __future__ import annotations

import time

PROMPT = "The capital of France is"


def add_arguments(p):
    p.add_argument("--model", default=None, help="local HF model folder (default: embedded SmolLM2-135M)")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--dtype", default="float32")


def run(args) -> int:
    import torch

    from dsc.assets import load_model
    from dsc.bench.common import machine_info
    from dsc.generation import greedy_decode

    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    ids = tok(args.prompt, return_tensors="pt").input_ids
    res = greedy_decode(model, ids, args.max_new_tokens, cache="static")
    text = tok.decode(res.tokens[0], skip_special_tokens=True)
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    print("dsc demo")
    print(f"  model      {cfg.model_type}, {n_params / 1e6:.0f}M params, {cfg.num_hidden_layers} layers, "
          f"{cfg.num_attention_heads} q heads / {cfg.num_key_value_heads} kv heads, {args.dtype} "
          f"(loaded in {load_s:.1f} s)")
    print(f"  prompt     {args.prompt!r}")
    print(f"  dense      {text!r}")
    print(f"  speed      {1 / res.median_step_s:.1f} tok/s median per step (eager, static cache, "
          f"{torch.get_num_threads()} threads, {machine_info()['cpu']})")
    return 0
