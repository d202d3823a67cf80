"""The ``dsparse`` torch.compile backend (registered under the ``torch_dynamo_backends`` entry point).

``torch.compile(model, backend="dsparse", options={"channels": cfg, "budget": 1/16})``: every SDPA site of the
Dynamo graph that decodes from a KV cache is rewritten into calibrated Double Sparsity attention
(:mod:`dsc.passes`), and the rewritten graph is handed to inductor (or ``aot_eager``/``eager`` when
``inner`` says so): the pass composes with inductor, it does not replace it.
"""
from __future__ import annotations

import logging
import warnings

from dsc.config import DSConfig

# The site reports of every compile in this process (newest last), for explain, tests and debugging. Never
# trimmed: callers count new compiles by length, and a report is small (the graph itself is not kept).
REPORTS: list = []


def dsparse(gm, example_inputs, mode=None, options=None):
    """Rewrite ``gm``'s SDPA sites into Double Sparsity, then compile it with the inner compiler."""
    from dsc.passes.rewrite import rewrite

    cfg = DSConfig.from_options(options)
    cfg.require_channels()
    _watch_recompile_limit()
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


def compile(model, *, check_fingerprint: bool = True, **options):
    """Compile ``model`` (in place, like ``model.compile``) with the ``dsparse`` backend and ``options``.

    Over ``model.compile(backend="dsparse", options=...)`` it adds two things: the channel config is checked
    against the model itself (its sizes and, unless ``check_fingerprint=False``, its weight fingerprint) before
    anything is traced; and the model's compiled code keeps its own recompile budget (``isolate_recompiles``):
    HF models of one class share one forward code object, so with plain ``torch.compile`` every model compiled
    in a process counts against Dynamo's one limit of 8 and, past it, later models silently run uncompiled (dense).
    Returns the model."""
    from dsc.calibration.config import model_fingerprint, model_shapes

    cfg = DSConfig.from_options(options)
    cfg.require_channels()
    chans = cfg.channels
    theirs = model_fingerprint(model) if check_fingerprint and chans.fingerprint else None
    chans.check_match(**model_shapes(model), fingerprint=theirs, what="this model",
                      skip_hint="dsc.compile(..., check_fingerprint=False)")
    model.compile(backend="dsparse", options=options, isolate_recompiles=True)
    return model


class _RecompileLimitAlarm(logging.Filter):
    """Turns Dynamo's one log line about its recompile limit into a warning the user sees: past the limit a
    function runs without its backend, so a dsparse model would silently decode densely."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "recompile_limit" in str(record.msg) or "recompile_limit" in str(record.args):
            warnings.warn(
                "dsparse: torch.compile hit Dynamo's recompile limit (" + (record.getMessage().splitlines() or [""])[0]
                + "): the function named in that log line now runs WITHOUT the dsparse backend, i.e. densely. HF "
                "models of one class share one forward, so each model compiled in a process uses up the limit; "
                "compile with dsc.compile(model, **options) (its own recompile budget per model), or pass "
                "isolate_recompiles=True to torch.compile.", RuntimeWarning, stacklevel=2)
        return True


def _watch_recompile_limit() -> None:
    logger = logging.getLogger("torch._dynamo.convert_frame")
    if not any(isinstance(f, _RecompileLimitAlarm) for f in logger.filters):
        logger.addFilter(_RecompileLimitAlarm())
