"""``dsc demo``: the main job on the embedded model, with a short report.

1. load the model; 2. take the cached channel calibration (calibrating once on the calibration essays if there
is none); 3. decode a long essay prompt greedily with the dense model and with the ``dsparse`` backend, through
the same loop and static cache; 4. report both continuations, their agreement, the speed of each, and the
attention bytes each step reads.
"""
from __future__ import annotations

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


def attention_bytes(cfg, model_cfg, ds, batch: int, length: int) -> tuple[float, float]:
    """K/V bytes one decode step reads in all attention layers: dense vs Double Sparsity (ALGORITHM.md sec. 1,
    :mod:`dsc.bytes`)."""
    from dsc.bytes import ds_bytes, kv_bytes

    d = getattr(model_cfg, "head_dim", None) or model_cfg.hidden_size // model_cfg.num_attention_heads
    hkv, layers = model_cfg.num_key_value_heads, model_cfg.num_hidden_layers
    k = ds.tokens_kept(length)
    if ds.gqa == "head":  # each query head of a group may pick its own rows
        k *= model_cfg.num_attention_heads // hkv
    dense_t = kv_bytes(d, 4)  # fp32 cache
    ds_t = ds_bytes(d, 4, ds.r, ds.label_bits, min(k, length) / length)
    sparse_layers = sum(1 for i in range(layers) if i not in ds.dense_layers and cfg.has_layer(i))
    per_layer = length * hkv * batch
    return layers * per_layer * dense_t, per_layer * ((layers - sparse_layers) * dense_t + sparse_layers * ds_t)


def run(args) -> int:
    import torch

    from dsc.assets import check_context, essay_text, load_model
    from dsc.bench.common import machine_info
    from dsc.bench.decode import compiled_forward
    from dsc.calibration.default import default_config
    from dsc.config import DSConfig, parse_budget
    from dsc.backend import runtime_of
    from dsc.generation import greedy_decode

    if args.max_new_tokens <= 0:
        raise ValueError(f"--max-new-tokens must be positive, got {args.max_new_tokens}")
    budget = parse_budget(args.budget)

    t0 = time.perf_counter()
    model, tok = load_model(args.model, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    channels = default_config(args.model, model=model, tokenizer=tok)
    calib_s = time.perf_counter() - t0
    opts = {"channels": channels, "budget": budget, "min_length": args.min_length}
    ds = DSConfig(**opts)

    if args.prompt is not None:
        ids = tok(args.prompt, return_tensors="pt").input_ids
    else:
        check_context(model, args.context + args.max_new_tokens, "--context + --max-new-tokens")
        ids = tok(essay_text("evaluation"), return_tensors="pt").input_ids[:, : args.context]
    n = args.max_new_tokens

    runs = {}
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
    dense_b, ds_b = attention_bytes(channels, model.config, ds, 1, ids.shape[1])
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
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
    print(f"  speed      dense {1 / dense.median_step_s:.1f} tok/s, dsparse {1 / sparse.median_step_s:.1f} tok/s "
          f"(median step; {torch.get_num_threads()} threads, {machine_info()['cpu']})")
    print(f"  KV bytes   per step, all layers: dense {dense_b / 1e6:.2f} MB, dsparse {ds_b / 1e6:.2f} MB "
          f"(limit {dense_b / ds_b:.2f}x at this length; grows with context)")
    return 0
