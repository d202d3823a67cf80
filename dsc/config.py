"""``DSConfig``: the options of the ``dsparse`` backend, validated once so a typo never silently means "dense".

Built from ``torch.compile(..., options={...})`` (a dict of these field names, or ``{"config": DSConfig(...)}``
plus overrides) by :meth:`DSConfig.from_options`; unknown names are errors.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

CALIBRATE_HINT = ("calibrate the model first, e.g. `cfg = dsc.calibrate(model, texts, tokenizer=tok)` or "
                  "`dsc calibrate --out cfg.json`, then pass options={'channels': cfg} (a ChannelConfig or the "
                  "path of its JSON file)")
GQA_MODES = ("group", "head")
PREFILL_POLICIES = ("dense", "sparse")
INNER_COMPILERS = ("inductor", "aot_eager", "eager")
LABEL_BITS = (16, 8, 4)


class BudgetView:
    """The ``budget`` field (int tokens or a fraction) split the way the kernels take it."""

    budget: float

    @property
    def budget_tokens(self) -> int:
        """The absolute budget (0 when the budget is a fraction)."""
        return self.budget if isinstance(self.budget, int) else 0

    @property
    def budget_frac(self) -> float:
        """The fractional budget (0.0 when the budget is absolute)."""
        return 0.0 if isinstance(self.budget, int) else float(self.budget)


DEFAULT_GQA = "head"  # selection per query head: the accuracy default (see DSConfig.gqa)
OFFLOAD_GQA = "group"  # per KV group with offload: each selected row crosses the bus once


@dataclass(frozen=True)
class DSConfig(BudgetView):
    """Options of the ``dsparse`` backend.

    - ``channels``: the calibrated :class:`~dsc.calibration.config.ChannelConfig` (or a path to its JSON).
    - ``budget``: tokens attended per decode step: an int ``k >= 1``, or a fraction in ``(0, 1)`` of each row's
      valid tokens (``1/16`` = the paper's 1/16 token sparsity).
    - ``r``: label channels per KV head; ``label_bits``: 16 (key dtype), 8 or 4 (quantized labels).
    - ``dense_layers``: layers kept dense (the reference kept 0-1); ``min_length``: caches shorter than this
      attend densely (a host-side shape check; with an absolute budget any row with ``<= budget`` valid tokens is
      exact anyway).
    - ``gqa``: ``"head"`` (one selection per query head; the default on the device: on SmolLM2 at 2K context and
      1/16 budget it costs +1.5% perplexity vs +3.9% for ``"group"``) or ``"group"`` (one per KV head, fewest bytes
      read; the default with ``offload``, where bytes over the bus are the cost: per-head selection moves up to G
      times the rows, measured 0.106 vs 0.058 of whole-layer offload's bytes, 3.5x vs 12.5x its speed on an H200).
      ``None`` (the default) picks between the two by ``offload``.
    - ``sink``/``recent``: first/last valid tokens always selected (inside the budget).
    - ``prefill``: ``"dense"`` (default; labels are still written) or ``"sparse"`` for ``Lq > 1`` steps.
    - ``inner``: the compiler the rewritten graph is handed to (``"eager"``/``"aot_eager"`` for debugging;
      ``aot_eager`` copies static caches each step, so labels are rebuilt each step there: correct but slow).
    - ``inductor_options``: ``torch._inductor.config`` patches for the inner inductor compile.
    - ``offload``: keep the K/V of sparse layers in host memory (pinned on a GPU) and fetch only the selected rows
      per decode step (:mod:`dsc.passes.offload`; the model's cache then holds shape-only placeholders for those
      layers, so their device memory is returned; a static cache only if its first forward runs compiled).
    - ``predict`` (offload only): select layer ``l+1``'s rows during layer ``l`` from a predicted query (layer
      ``l+1``'s query path run on layer ``l``'s input hidden state) and fetch them ahead (:mod:`dsc.passes.predict`);
      ``sync_layers``: layers that always select with their own query.
    """

    channels: Any = None
    budget: float = 1 / 16
    r: int = 16
    label_bits: int = 16
    dense_layers: tuple[int, ...] = (0, 1)
    min_length: int = 0
    gqa: Optional[str] = None
    sink: int = 4
    recent: int = 16
    prefill: str = "dense"
    inner: str = "inductor"
    inductor_options: dict = field(default_factory=dict)
    offload: bool = False
    predict: bool = False
    sync_layers: tuple[int, ...] = (0, 1, 2)

    def __post_init__(self) -> None:
        chans = self.channels
        if isinstance(chans, (str, os.PathLike)):
            from dsc.calibration.config import ChannelConfig

            object.__setattr__(self, "channels", ChannelConfig.load(chans))
        elif chans is not None and not all(hasattr(chans, a) for a in ("channels", "has_layer", "check_shapes")):
            raise ValueError(f"DSConfig.channels must be a ChannelConfig or the path of its JSON file, got "
                             f"{type(chans).__name__}; {CALIBRATE_HINT}")
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0:
            raise ValueError(f"DSConfig.budget must be an int >= 1 (tokens) or a fraction in (0, 1), got {b!r}")
        if isinstance(b, float) and b >= 1:
            if b != int(b):
                raise ValueError(f"DSConfig.budget {b!r} is a float >= 1: pass an int token count or a fraction < 1")
            object.__setattr__(self, "budget", int(b))
        for name in ("r", "min_length", "sink", "recent"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "r" else 0):
                raise ValueError(f"DSConfig.{name} must be an int >= {1 if name == 'r' else 0}, got {v!r}")
        if self.label_bits not in LABEL_BITS:
            raise ValueError(f"DSConfig.label_bits must be one of {LABEL_BITS}, got {self.label_bits!r}")
        try:
            dense = tuple(sorted({int(x) for x in self.dense_layers}))
        except (TypeError, ValueError) as e:
            raise ValueError(f"DSConfig.dense_layers must be a sequence of layer numbers, got "
                             f"{self.dense_layers!r}") from e
        object.__setattr__(self, "dense_layers", dense)
        if self.gqa is None:
            object.__setattr__(self, "gqa", OFFLOAD_GQA if self.offload is True else DEFAULT_GQA)
        for name, allowed in (("gqa", GQA_MODES), ("prefill", PREFILL_POLICIES), ("inner", INNER_COMPILERS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"DSConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("offload", "predict"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DSConfig.{name} must be True or False, got {getattr(self, name)!r}")
        if self.predict and not self.offload:
            raise ValueError("DSConfig.predict=True needs offload=True (prediction decides which host rows to fetch "
                             "ahead; without offload nothing is fetched)")
        try:
            object.__setattr__(self, "sync_layers", tuple(sorted({int(x) for x in self.sync_layers})))
        except (TypeError, ValueError) as e:
            raise ValueError(f"DSConfig.sync_layers must be a sequence of layer numbers, got "
                             f"{self.sync_layers!r}") from e
        if not isinstance(self.inductor_options, dict):
            raise ValueError("DSConfig.inductor_options must be a dict of torch._inductor.config patches")

    def budget_text(self) -> str:
        return f"{self.budget} tokens" if isinstance(self.budget, int) else f"{self.budget:.4g} of valid tokens"

    def require_channels(self) -> None:
        if self.channels is None:
            what = "offload (options['offload']=True) needs" if self.offload else "the dsparse backend needs"
            raise ValueError(f"{what} a channel config (options['channels']); {CALIBRATE_HINT}")

    # -------------------------------------------------------------------------------------------- building
    @classmethod
    def from_options(cls, options: Any = None) -> "DSConfig":
        """A config from ``options``: None, a DSConfig, or a dict of field names (``"config"`` = a base
        DSConfig). Unknown names raise ValueError listing the known ones."""
        if options is None:
            return cls()
        if isinstance(options, DSConfig):
            return options
        if not isinstance(options, dict):
            raise ValueError(f"dsparse options must be a dict or a DSConfig, got {type(options).__name__}")
        opts = dict(options)
        base = opts.pop("config", None)
        if base is not None and not isinstance(base, DSConfig):
            raise ValueError(f"options['config'] must be a DSConfig, got {type(base).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(opts) - known)
        if unknown:
            raise ValueError(f"unknown dsparse option(s) {unknown}; known options: {sorted(known | {'config'})}")
        return replace(base, **opts) if base is not None else cls(**opts)
