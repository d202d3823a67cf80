"""The ``dsparse`` torch.compile backend (registered under the ``torch_dynamo_backends`` entry point).

``torch.compile(model, backend="dsparse", options={"channels": cfg, "budget": 1/16})``: every SDPA site of the
Dynamo graph that decodes from a KV cache is rewritten into calibrated Double Sparsity attention
(:mod:`dsc.passes`), and the rewritten graph is handed to inductor (or ``aot_eager``/``eager`` when
``inner`` says so): the pass composes with inductor, it does not replace it.
"""
from __future__ import annotations

import logging
import warnings
import weakref

from dsc.config import DSConfig


def dsparse(gm, example_inputs, mode=None, options=None):
    """The ``"dsparse"`` entry point: rewrite ``gm``'s SDPA sites into Double Sparsity, then compile it with the
    inner compiler. Graphs compiled with one ``options`` object (one ``torch.compile`` call) share one
    :class:`SparseBackend`, hence one runtime: the prefill and decode graphs of a model share its label caches."""
    return _backend_for(options).compile_graph(gm, example_inputs, mode)


# id(options) -> the SparseBackend of that options object (weak: it lives as long as a graph it compiled; the
# backend holds the options object, so its id is not reused meanwhile).
_BY_OPTIONS: "weakref.WeakValueDictionary[int, SparseBackend]" = weakref.WeakValueDictionary()


def _backend_for(options) -> "SparseBackend":
    backend = _BY_OPTIONS.get(id(options))
    if backend is None or backend.options is not options:
        backend = SparseBackend(_options=options)
        _BY_OPTIONS[id(options)] = backend
    return backend


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


# Reasons a site stays dense by design (the configuration, or attention that has no growing cache to select from).
_DELIBERATE = ("configured dense layer", "not in the channel config", "cross-attention", "sliding window",
               "non-causal (encoder)", "reads but never writes", "autograd", "dropout_p=")
SDPA_HINT = ("load the model with attn_implementation='sdpa' (or call model.set_attn_implementation('sdpa')), or "
             "compile with dsc.compile(model, ...), which switches it")


def _warn_if_silently_dense(gm, sites) -> None:
    """Never silently dense: a graph with attention but no sparse site, for a reason other than the configuration,
    gets a warning with the reason and the fix (``dsc.explain`` shows every site)."""
    if any(s.action == "sparse" for s in sites):
        return
    if not sites:
        kind = _non_sdpa_attention(gm.graph)
        if kind:
            warnings.warn(f"dsparse: this graph computes attention without scaled_dot_product_attention ({kind}), "
                          f"so it stays dense: {SDPA_HINT}", RuntimeWarning, stacklevel=2)
        return
    decoding = [s for s in sites if not (isinstance(s.lq, int) and s.lq > 1)]  # a prefill is dense by default
    odd = sorted({s.reason for s in decoding if not any(d in s.reason for d in _DELIBERATE)})
    if odd:
        warnings.warn(f"dsparse: none of this graph's {len(sites)} attention sites became sparse: " + "; ".join(odd)
                      + ". dsc.explain(model, inputs) shows each site.", RuntimeWarning, stacklevel=2)


def _non_sdpa_attention(graph) -> str | None:
    """What computes attention in a graph without SDPA nodes: flex attention, or eager matmul + softmax."""
    for node in graph.nodes:
        name = str(getattr(node.target, "__name__", node.target))
        if "flex_attention" in name:
            return "flex_attention"
        if "softmax" in name:
            ev = node.meta.get("example_value")
            if ev is not None and getattr(ev, "dim", lambda: 0)() == 4:
                return "eager attention: matmul + softmax"
    return None


def _refuse_cuda_graphs(mode, example_inputs, allowed: bool) -> None:
    """A mode that runs CUDA graphs (HF's default ``reduce-overhead``) replays the recorded kernels without the
    site op's host code. Refused on CUDA unless ``cuda_graphs=True`` (experimental: the static-cache step is built
    to replay and its replays are checked in a CPU emulation, but not yet on a GPU); on the CPU the mode changes
    nothing (inductor's CUDA graphs only apply to CUDA tensors)."""
    if not mode:
        return
    import torch
    from torch._inductor import list_mode_options

    cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in example_inputs)
    if not (cuda and list_mode_options(mode).get("triton.cudagraphs")):
        return
    if not allowed:
        raise ValueError(f"dsparse: mode={mode!r} runs CUDA graphs, which this backend accepts only with "
                         "cuda_graphs=True (experimental, not yet run on a GPU); otherwise compile with mode=None "
                         "or 'default' (HF: CompileConfig(backend=dsc.sparse_backend(...), mode='default')).")
    warnings.warn(f"dsparse: mode={mode!r} with cuda_graphs=True is experimental: replays of the sparse decode step "
                  "are checked in a CPU emulation only (static caches; dynamic caches and offload are refused "
                  "during capture), and runtime.stats does not count replayed steps", RuntimeWarning, stacklevel=3)


class SparseBackend:
    """The ``dsparse`` backend with its options bound, and the owner of their run-time state: one
    :class:`dsc.passes.runtime.Runtime` for every graph it compiles (label caches, host stores, counters, site
    reports). ``torch.compile(m, backend=dsc.sparse_backend(channels=cfg), mode=...)`` or HF's
    ``CompileConfig(backend=dsc.sparse_backend(...))`` (for callers that cannot pass ``options`` with a ``mode``).
    Options are validated here, before anything is traced. Its compiled graphs keep it alive; it lives no longer."""

    def __init__(self, _options=None, **options):
        from dsc.passes.runtime import Runtime

        self.options = _options if _options is not None else options
        self.config = DSConfig.from_options(self.options)
        self.config.require_channels()
        self.runtime = Runtime(self.config)

    def __call__(self, gm, example_inputs, mode=None, options=None):
        if options:
            raise ValueError("this dsparse backend has its options bound (dsc.sparse_backend(...)); pass them there, "
                             f"not to torch.compile (got {sorted(options)})")
        return self.compile_graph(gm, example_inputs, mode)

    def compile_graph(self, gm, example_inputs, mode=None):
        """Rewrite ``gm`` (its sites join this backend's runtime), then hand it to the inner compiler. The compiled
        callable holds this backend, so the runtime lives exactly as long as some graph that uses it."""
        from dsc.passes.rewrite import rewrite

        _refuse_cuda_graphs(mode, example_inputs, self.config.cuda_graphs)
        _watch_recompile_limit()
        sites = rewrite(gm, self.config, self.runtime)
        _warn_if_silently_dense(gm, sites)
        for site in sites:  # keep the decisions, not the graph
            site.node = site.q = site.k = site.v = site.past_k = site.new_k = site.positions = site.attn_mask = None
        self.runtime.reports.append(sites)
        compiled = _inner(self.config, gm, example_inputs, mode)

        def run(*args):
            return compiled(*args)

        run.dsparse_backend = self  # the owner: freed with the last compiled graph that uses it
        return run

    def __repr__(self) -> str:
        return f"dsc.sparse_backend(budget={self.config.budget_text()!r}, r={self.config.r})"

    def __copy__(self) -> "SparseBackend":
        return self

    def __deepcopy__(self, memo) -> "SparseBackend":
        """Itself: a backend owns run-time state (label caches, counters) that a copy must not split; HF's
        ``CompileConfig.to_dict()`` deep-copies its ``backend``."""
        return self


def sparse_backend(**options) -> SparseBackend:
    """A ``dsparse`` backend callable with ``options`` bound (see :class:`SparseBackend`)."""
    return SparseBackend(**options)


def compile(model, *, check_fingerprint: bool = True, **options):
    """Compile ``model`` (in place, like ``model.compile``) with the ``dsparse`` backend and ``options``.

    Over ``model.compile(backend="dsparse", options=...)`` it adds three things: the channel config is checked
    against the model itself (its sizes and, unless ``check_fingerprint=False``, its weight fingerprint) before
    anything is traced; an eager/flex attention model is switched to SDPA (with a warning); and the model's
    compiled code keeps its own recompile budget (``isolate_recompiles``):
    HF models of one class share one forward code object, so with plain ``torch.compile`` every model compiled
    in a process counts against Dynamo's one limit of 8 and, past it, later models silently run uncompiled (dense).
    A model with accelerate hooks (``cpu_offload``, ``dispatch_model``) breaks the graph at every hooked module, so
    its limit grows with their number. Returns the model."""
    from dsc.calibration.config import model_fingerprint, model_shapes

    cfg = DSConfig.from_options(options)
    cfg.require_channels()
    chans = cfg.channels
    theirs = model_fingerprint(model) if check_fingerprint and chans.fingerprint else None
    chans.check_match(**model_shapes(model), fingerprint=theirs, what="this model",
                      skip_hint="dsc.compile(..., check_fingerprint=False)")
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl not in (None, "sdpa") and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("sdpa")  # the same attention, in the form the rewrite recognises
        warnings.warn(f"dsc.compile: switched the model from attn_implementation={impl!r} to 'sdpa' (the same "
                      "attention; Double Sparsity rewrites SDPA calls)", RuntimeWarning, stacklevel=2)
    hooked = sum(1 for m in model.modules() if hasattr(m, "_hf_hook"))  # accelerate: a graph break per hooked module
    backend = SparseBackend(**options)
    model.compile(backend=backend, isolate_recompiles=True, recompile_limit=max(8, 8 + 4 * hooked))
    model.dsparse_runtime = backend.runtime
    return model


def runtime_of(obj):
    """The :class:`dsc.passes.runtime.Runtime` (label caches, counters ``.stats``, site reports ``.reports``) of a
    model compiled by :func:`compile`, a :class:`SparseBackend`, or the ``options`` object passed to
    ``torch.compile(..., backend="dsparse", options=...)`` (None before its first graph compiled)."""
    if isinstance(obj, SparseBackend):
        return obj.runtime
    rt = getattr(obj, "dsparse_runtime", None)
    if rt is not None:
        return rt
    backend = _BY_OPTIONS.get(id(obj))
    return backend.runtime if backend is not None and backend.options is obj else None


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
