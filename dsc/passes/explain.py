"""``dsc.explain`` and ``dsc explain``: every SDPA site of a model's compiled graphs, what the ``dsparse`` backend
makes of it, and why. Runs Dynamo with an analysis-only backend (the model runs unchanged, eagerly), so it is
cheap and never leaves the model compiled."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_DYNAMO_PREFIX = re.compile(r"^L\['[^']*'\](\[\d+\])?\.?")


@dataclass
class SiteRow:
    graph: int
    index: int
    layer: int | None
    module: str
    lq: Any
    s: Any
    heads: tuple
    mask: str
    cache: str | None
    becomes: str
    why: str
    bounded: bool = False  # a sliding-window site (dense by policy: already bounded)

    @property
    def sparse(self) -> bool:
        return self.becomes.startswith("dsc.site_attention")


def _phase(rows: list[SiteRow]) -> str:
    """"decode, Lq=1" (every site has Lq == 1), "prefill, Lq=N" (Lq > 1), or the Lq values seen."""
    lqs = [r.lq for r in rows]  # ints or SymInts (unhashable)
    shown = "/".join(sorted({str(x) for x in lqs})) or "-"
    if lqs and all(isinstance(x, int) and x == 1 for x in lqs):
        return "decode, Lq=1"
    if lqs and all(isinstance(x, int) and x > 1 for x in lqs):
        return "prefill, Lq=" + shown
    return "Lq=" + shown


class Explanation:
    """The sites of each graph Dynamo produced; ``str()`` is a table."""

    def __init__(self, graphs: list[list[SiteRow]], notes: list[str]):
        self.graphs, self.notes = graphs, notes

    @property
    def rows(self) -> list[SiteRow]:
        return [r for g in self.graphs for r in g]

    def counts(self) -> dict[str, int]:
        rows = self.rows
        return {"sites": len(rows), "sparse": sum(r.sparse for r in rows),
                "dense": sum(not r.sparse for r in rows)}

    def __str__(self) -> str:
        out = []
        head = ("#", "layer", "module", "Lq", "S", "Hq/Hkv", "mask", "cache", "becomes", "why")
        for gi, rows in enumerate(self.graphs):
            out.append(f"graph {gi} ({_phase(rows)}): {sum(r.sparse for r in rows)} of {len(rows)} sites sparse")
            if not rows:
                continue
            table = [head] + [(str(r.index), "-" if r.layer is None else str(r.layer), r.module, str(r.lq),
                               str(r.s), "/".join(map(str, r.heads)) or "-", r.mask, r.cache or "-", r.becomes,
                               r.why) for r in rows]
            widths = [max(len(t[i]) for t in table) for i in range(len(head) - 1)]
            for t in table:
                out.append("  " + "  ".join(c.ljust(w) for c, w in zip(t, widths)) + "  " + t[-1])
        c = self.counts()
        out.append(f"total: {c['sites']} site(s), {c['sparse']} rewritten, {c['dense']} kept dense")
        out.extend(f"note: {n}" for n in self.notes)
        return "\n".join(out)

    __repr__ = __str__


def _clean(path: str | None) -> str:
    return _DYNAMO_PREFIX.sub("", path or "-")


def _rows(gm, cfg, graph_index: int) -> list[SiteRow]:
    from .rewrite import _site_channels, analyze_module

    rows = []
    sites = analyze_module(gm, cfg)
    if cfg.offload and cfg.predict:
        from .predict import plan

        plan(gm.graph, sites, set(cfg.sync_layers))
    for site in sites:
        becomes, why = site.becomes, site.reason
        if site.action == "sparse" and cfg.channels is not None:
            try:
                _site_channels(site, cfg)
            except ValueError as e:
                becomes, why = "error", str(e)
        if "predict" in site.extra:
            why += "; " + site.extra["predict"]
        rows.append(SiteRow(graph_index, site.index, site.layer, _clean(site.module_path), site.lq, site.s,
                            site.heads, site.mask, site.cache, becomes, why, "window" in site.extra))
    return rows


def explain(model, example_inputs=None, options=None, *, max_new_tokens: int = 0, grad: bool = False,
            **generate_kwargs) -> Explanation:
    """Trace ``model`` on ``example_inputs`` (a dict of keyword arguments, a tuple of positional ones, or one
    tensor) and report each SDPA site. ``max_new_tokens > 0`` runs ``model.generate`` instead, so the decode
    graphs appear too (``max_new_tokens`` forward steps: ``min_new_tokens`` defaults to it, so an early
    end-of-sequence token cannot hide them; ``generate_kwargs`` go to ``generate``, e.g.
    ``cache_implementation="static"``). ``options`` are
    the backend's; without a channel config every decoder layer is assumed calibrated. Runs under
    ``torch.no_grad()`` unless ``grad``."""
    import contextlib

    import torch

    from dsc.config import DSConfig

    cfg = DSConfig.from_options(options)
    graphs: list[list[SiteRow]] = []
    notes = []
    if cfg.channels is None:
        notes.append("no channel config given: every decoder layer is assumed calibrated "
                      "(calibrate with `dsc calibrate` and pass --config to check the real one)")

    def capture(gm, example, **_):
        graphs.append(_rows(gm, cfg, len(graphs)))
        return gm.forward

    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    elif example_inputs is None:
        args, kwargs = (), {}
    else:
        args, kwargs = (example_inputs,), {}
    ctx = contextlib.nullcontext() if grad else torch.no_grad()
    with ctx:
        if max_new_tokens > 0:
            if not hasattr(model, "generate"):
                raise ValueError("max_new_tokens > 0 needs a model with .generate (an HF causal LM)")
            saved = model.__dict__.get("forward")
            model.forward = torch.compile(model.forward, backend=capture)
            try:
                generate_kwargs.setdefault("min_new_tokens", max_new_tokens)
                model.generate(*args, **kwargs, max_new_tokens=max_new_tokens, do_sample=False, **generate_kwargs)
            finally:
                if saved is None:
                    del model.forward
                else:
                    model.forward = saved
        else:
            torch.compile(model, backend=capture)(*args, **kwargs)
    if cfg.offload:
        n = sum(r.sparse for g in graphs for r in g)
        how = ("each site's selection is predicted during the layer before where the table says so, else "
               "selected with its own query" if cfg.predict else "each decode step fetches only the rows its own "
               "query selects (synchronous selection; predict=True fetches the next layer's rows ahead)")
        sel = ("one selection per KV group, so each selected row crosses the bus once" if cfg.gqa == "group" else
               "one selection per query head (gqa='head'): a group's heads may move up to G times the rows")
        gather = "on a GPU the attention kernel reads the selected rows from pinned host memory itself (zero-copy)"
        if cfg.predict:
            gather = f"predicted rows are gathered on the host and copied ahead; elsewhere {gather}"
        memory = ("the model's cache holds shape-only placeholders at those layers (their device memory is "
                  "returned) where only the attention and the cache update read it; a static cache's buffers only "
                  "if HF allocates them inside the compiled first forward (its default), else they stay")
        how = f"{how}; {sel}; {gather}; {memory}"
        notes.append(f"offload: the K/V of the {n} sparse site(s) live in host memory; {how}" if n else
                     "offload=True but no site is sparse: compiling with these options raises (nothing to offload)")
    bounded = [r for g in graphs for r in g if r.bounded]
    if bounded:
        layers = sorted({r.layer for r in bounded if r.layer is not None})
        named = f" (layer{'s' if len(layers) > 1 else ''} {', '.join(map(str, layers))})" if layers else ""
        notes.append(f"{len(bounded)} site(s) in sliding-window layers{named} stay dense: the window already bounds "
                     "what each step reads, and their caches drop old rows, so labels could not follow them; Double "
                     "Sparsity goes to the global layers")
    if max_new_tokens > 1 and graphs and not any(g and _phase(g).startswith("decode") for g in graphs):
        notes.append("no decode graph (Lq=1) was traced: did generation stop early?")
    if not graphs:
        notes.append("Dynamo produced no graph (was the model already compiled, or did every frame fall back?)")
    return Explanation(graphs, notes)


# ---------------------------------------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    p.add_argument("--model", default=None, help="local HF model folder (default: embedded SmolLM2-135M)")
    p.add_argument("--config", default=None, help="channel config JSON (from `dsc calibrate`); default: assume "
                                                  "every layer calibrated")
    p.add_argument("--cache", choices=("static", "dynamic"), default="static", help="KV cache kind (default static)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=3,
                   help="tokens generated (default 3: the prefill graph, the first decode step's graph and the one "
                        "Dynamo recompiles once the length varies, which serves the rest of the decode)")
    p.add_argument("--budget", default=None, help="token budget: a fraction (1/16) or a token count")
    p.add_argument("--dense-layers", default=None, help="comma-separated layers kept dense (default 0,1)")
    p.add_argument("--prefill", choices=("dense", "sparse"), default=None)


def run(args) -> int:
    import torch

    from dsc.assets import load_model
    from dsc.config import parse_budget

    if args.prompt_tokens <= 0:
        raise ValueError(f"--prompt-tokens must be positive, got {args.prompt_tokens}")
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    options: dict = {}
    if args.config:
        options["channels"] = args.config
    if args.budget is not None:
        options["budget"] = parse_budget(args.budget)
    if args.dense_layers is not None:
        try:
            options["dense_layers"] = tuple(int(x) for x in args.dense_layers.split(",") if x.strip())
        except ValueError as e:
            raise ValueError(f"--dense-layers must be comma-separated ints, got {args.dense_layers!r}") from e
    if args.prefill:
        options["prefill"] = args.prefill
    model, _ = load_model(args.model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt_tokens), generator=gen)
    extra = {"cache_implementation": "static"} if args.cache == "static" else {}
    print(explain(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, options,
                  max_new_tokens=args.max_new_tokens, **extra))
    return 0
