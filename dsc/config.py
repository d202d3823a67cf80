"""``DSConfig``: the options of the ``dsparse`` backend, validated once so a typo never silently means "dense".

Built from ``torch.compile(..., options={...})`` (a dict of these field names, or ``{"config": DSConfig(...)}``
plus overrides) by :meth:`DSConfig.from_options`; unknown names are errors.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields, replace
from fractions import Fraction
from typing import Any, Optional

CALIBRATE_HINT = ("calibrate the model first, e.g. `cfg = dsc.calibrate(model, texts, tokenizer=tok)` or "
                  "`dsc calibrate --out cfg.json`, then pass options={'channels': cfg} (a ChannelConfig or the "
                  "path of its JSON file)")
GQA_MODES = ("group", "head")
PREFILL_POLICIES = ("dense", "sparse")
INNER_COMPILERS = ("inductor", "aot_eager", "eager")
LABEL_BITS = (16, 8, 4)


MIN_SCORED = 16  # a fractional budget keeps at least sink + recent + this many tokens: labels always choose some


def parse_budget(value: Any) -> int | float:
    """The one budget parser: an int ``k >= 1`` (tokens), or a fraction in ``(0, 1]`` of each row's valid tokens
    (``1.0`` = every token). Accepts numbers and text (``"128"``, ``"1/16"``, ``"0.0625"``); a float ``>= 1``
    must be whole (``2.0`` -> 2 tokens; ``1.5`` is refused, never truncated)."""
    if isinstance(value, bool):
        raise ValueError(f"budget must be a token count or a fraction, got {value!r}")
    if isinstance(value, (int, float)):
        number = value
    elif str(value).strip().isdigit():
        number = int(str(value).strip())
    else:
        try:
            number = Fraction(str(value).strip())
        except (ValueError, ZeroDivisionError) as e:
            raise ValueError(f"budget {value!r} is not a number: pass tokens (e.g. 128) or a fraction "
                             "(e.g. 1/16 or 0.0625)") from e
        number = float(number)
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"budget must be an int >= 1 (tokens) or a fraction in (0, 1], got {value!r}")
    if isinstance(number, int):
        return number
    if number > 1:
        if number != int(number):
            raise ValueError(f"budget {value!r} is above 1 but not a whole number of tokens: pass an int token "
                             "count or a fraction in (0, 1]")
        return int(number)
    return float(number)


class BudgetView:
    """The selection knobs shared by :class:`DSConfig` and the evaluation ``Policy``, as the kernels take them.

    The rule (one place): an int budget ``k`` keeps ``min(k, n)`` of a row's ``n`` valid tokens; a fraction ``f``
    keeps ``min(n, max(ceil(f * n), floor))`` with ``floor = sink + recent + MIN_SCORED``, so a short row is never
    left to its forced tokens alone. Of the kept slots, the ``recent`` newest valid tokens (the current token
    first) are forced in before the ``sink`` oldest ones. Caches shorter than ``dense_below`` attend densely."""

    budget: float
    sink: int
    recent: int
    min_length: Optional[int]

    @property
    def budget_tokens(self) -> int:
        """The kernels' ``budget``: the absolute budget, or the floor of a fractional one."""
        return self.budget if isinstance(self.budget, int) else self.sink + self.recent + MIN_SCORED

    @property
    def budget_frac(self) -> float:
        """The fractional budget (0.0 when the budget is absolute)."""
        return 0.0 if isinstance(self.budget, int) else float(self.budget)

    @property
    def dense_below(self) -> int:
        """Cache length below which attention stays dense: ``min_length`` when set, else, for a fraction ``f``,
        where it starts to bind (``floor / f``: below it the floor keeps more than ``f`` of the row); 0 for an int
        budget (a row with ``<= k`` valid tokens keeps them all: exact either way)."""
        if self.min_length is not None:
            return self.min_length
        if isinstance(self.budget, int):
            return 0
        return math.ceil(self.budget_tokens / self.budget)

    def tokens_kept(self, n: int) -> int:
        """Tokens a row with ``n`` valid ones attends at a sparse step (dense below ``dense_below``: all ``n``)."""
        if n < self.dense_below:
            return n
        if isinstance(self.budget, int):
            return min(n, self.budget)
        return min(n, max(self.budget_tokens, math.ceil(self.budget * n)))

    def budget_text(self) -> str:
        if isinstance(self.budget, int):
            return f"{self.budget} tokens"
        return f"{self.budget:.4g} of valid tokens (at least {self.budget_tokens})"


DEFAULT_GQA = "head"  # selection per query head: the accuracy default (see DSConfig.gqa)
OFFLOAD_GQA = "group"  # per KV group with offload: each selected row crosses the bus once


_INT_FIELDS = (("sink", 0), ("recent", 0))
DEFAULT_R = 16  # label channels when no channel config tells head_dim (head_dim 64, e.g. SmolLM2: 64 / 4)


def default_r(head_dim: int) -> int:
    """Label channels per KV head by default: a quarter of head_dim (16 at head_dim 64, 32 at 128, 64 at 256), so a
    label sees the same share of each key whatever the head size; 16-bit labels then cost 1/4 of K's bytes."""
    return max(1, head_dim // 4)


def _check_int(name: str, value: Any, least: int) -> None:
    if type(value) is not int or value < least:
        raise ValueError(f"DSConfig.{name} must be an int >= {least}, got {value!r}")


def _layer_numbers(name: str, value: Any) -> tuple[int, ...]:
    """A sorted tuple of layer numbers (ints >= 0) from any sequence of them."""
    try:
        layers = tuple(sorted({int(x) for x in value}))
    except (TypeError, ValueError) as e:
        raise ValueError(f"DSConfig.{name} must be a sequence of layer numbers, got {value!r}") from e
    if layers and layers[0] < 0:
        raise ValueError(f"DSConfig.{name} holds a negative layer number: {layers[0]}")
    return layers


@dataclass(frozen=True)
class DSConfig(BudgetView):
    """Options of the ``dsparse`` backend.

    - ``channels``: the calibrated :class:`~dsc.calibration.config.ChannelConfig` (or a path to its JSON).
    - ``budget``: tokens attended per decode step: an int ``k >= 1``, or a fraction in ``(0, 1]`` of each row's
      valid tokens (``1/16`` = the paper's 1/16 token sparsity; ``1.0`` = all). A fraction never keeps fewer than
      ``sink + recent + 16`` tokens (see :class:`BudgetView` for the whole rule).
    - ``r``: label channels per KV head (default ``head_dim / 4`` of the channel config: 16 at head_dim 64, 32 at
      128; a fixed 16 would see only 1/16 of a 256-wide key); ``label_bits``: 16 (key dtype), 8 or 4 (quantized).
    - ``dense_layers``: layers kept dense (the reference kept 0-1); ``min_length``: caches shorter than this
      attend densely (a host-side shape check). ``None`` (default) derives it from the budget: ``(sink + recent +
      16) / f`` for a fraction ``f`` (576 tokens at 1/16 with the default sink/recent), 0 for an int budget.
    - ``gqa``: ``"head"`` (one selection per query head; the default on the device: on SmolLM2 at 2K context and
      1/16 budget it costs +1.5% perplexity vs +3.9% for ``"group"``) or ``"group"`` (one per KV head, fewest bytes
      read; the default with ``offload``, where bytes over the bus are the cost: per-head selection moves up to G
      times the rows, measured 0.106 vs 0.058 of whole-layer offload's bytes, 3.5x vs 12.5x its speed on an H200).
      ``None`` (the default) picks between the two by ``offload``.
    - ``sink``/``recent``: first/last valid tokens always selected (inside the budget; when the budget cannot
      hold both, the recent ones, the current token first, win).
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
    r: Optional[int] = None
    label_bits: int = 16
    dense_layers: tuple[int, ...] = (0, 1)
    min_length: Optional[int] = None
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
        try:
            object.__setattr__(self, "budget", parse_budget(self.budget))
        except ValueError as e:
            raise ValueError(f"DSConfig.{e}") from None
        if self.r is None:
            object.__setattr__(self, "r", default_r(self.channels.head_dim) if self.channels is not None else DEFAULT_R)
        for name, least in (("r", 1),) + _INT_FIELDS:
            _check_int(name, getattr(self, name), least)
        if self.min_length is not None:
            _check_int("min_length", self.min_length, 0)
        if type(self.label_bits) is not int or self.label_bits not in LABEL_BITS:
            raise ValueError(f"DSConfig.label_bits must be one of the ints {LABEL_BITS}, got {self.label_bits!r}")
        for name in ("dense_layers", "sync_layers"):
            object.__setattr__(self, name, _layer_numbers(name, getattr(self, name)))
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
        if not isinstance(self.inductor_options, dict):
            raise ValueError("DSConfig.inductor_options must be a dict of torch._inductor.config patches")
        if self.channels is not None:
            self._check_against_channels()

    def _check_against_channels(self) -> None:
        """What the channel config already tells: head_dim bounds ``r``, num_layers bounds the layer lists."""
        chans = self.channels
        if self.r > chans.head_dim:
            raise ValueError(f"DSConfig.r={self.r} label channels exceed the model's head_dim {chans.head_dim}: "
                             f"pick r <= {chans.head_dim} (head_dim / 4 = {max(1, chans.head_dim // 4)} is a "
                             f"sensible choice)")
        for name in ("dense_layers", "sync_layers"):
            if getattr(self, name) == _FIELD_DEFAULTS[name] or (name == "sync_layers" and not self.predict):
                continue  # the defaults fit any depth; sync_layers only matter with predict
            bad = [x for x in getattr(self, name) if x >= chans.num_layers]
            if bad:
                raise ValueError(f"DSConfig.{name} {bad} out of range: the channel config's model has "
                                 f"{chans.num_layers} layers (0..{chans.num_layers - 1})")

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


_FIELD_DEFAULTS = {f.name: f.default for f in fields(DSConfig)}
