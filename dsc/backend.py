"""The ``dsparse`` torch.compile backend (registered under the ``torch_dynamo_backends`` entry point).

``torch.compile(model, backend="dsparse", options={"channels": cfg, "budget": 1/16})``: every SDPA site of the
Dynamo graph that decodes from a KV cache is rewritten into calibrated Double Sparsity attention
(:mod:`dsc.passes`), and the rewritten graph is handed to inductor (or ``aot_eager``/``eager`` when
``inner`` says so): the pass composes with inductor, it does not replace it.
"""
from __future__ import annotations

from dsc.config import DSConfig

# The site reports of every compile in this process (newest last), for explain, tests and debugging. Never
# trimmed: callers count new compiles by length, and a report is small (the graph itself is not kept).
REPORTS: list = []


def dsparse(gm, example_inputs, mode=None, options=None):
    """Rewrite ``gm``'s SDPA sites into Double Sparsity, then compile it with the inner compiler."""
    from dsc.passes.rewrite import rewrite

    cfg = DSConfig.from_options(options)
    cfg.require_channels()
    sites = rewrite(gm, cfg)
    for site in sites:  # keep the decisions, not the graph
        site.node = site.q = site.k = site.v = site.past_k = site.new_k = site.positions = site.attn_mask = None
    REPORTS.append(sites)
    return _inner(cfg, gm, example_inputs, mode)


def _inner(cfg: DSConfig, gm, example_inputs, mode):
    if cfg.inner == "eager":
        return gm.forward
    if cfg.inner == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager

        return aot_eager(gm, example_inputs)
    import torch
    from torch._inductor.compile_fx import compile_fx

    patches = dict(torch._inductor.list_mode_options(mode)) if mode else {}
    patches.update(cfg.inductor_options)
    return compile_fx(gm, example_inputs, config_patches=patches or None)
