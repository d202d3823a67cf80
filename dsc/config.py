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
    """The budget rule, one place, for every holder of the selection knobs (:class:`Selection`, :class:`DSConfig`,
    the evaluation ``Policy``).

    An int budget ``k`` keeps ``min(k, n)`` of a row's ``n`` valid tokens; a fraction ``f`` keeps ``min(n,
    max(ceil(f * n), floor))`` with ``floor = sink + recent + MIN_SCORED``, so a short row is never left to its
    forced tokens alone. Of the kept slots, the ``recent`` newest valid tokens (the current token first) are forced
    in before the ``sink`` oldest ones. Caches shorter than ``dense_below`` attend densely."""

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


DEFAULT_GQA = "group"  # one selection per KV group, with or without offload (see DSConfig.gqa for the measurements)
DEFAULT_R = 16  # label channels when no channel config tells head_dim (head_dim 64, e.g. SmolLM2: 64 / 4)


def default_r(head_dim: int) -> int:
    """Label channels per KV head by default: a quarter of head_dim (16 at head_dim 64, 32 at 128, 64 at 256), so a
    label sees the same share of each key whatever the head size; 16-bit labels then cost 1/4 of K's bytes."""
    return max(1, head_dim // 4)


# ------------------------------------------------------------------------------------------------ validation
# One table for every knob any holder (Selection, DSConfig, Policy) has: field -> (kind, argument).
#   "budget": parse_budget; "int": an int >= argument; "int?": None or an int >= argument; "int in": one of the
#   ints in argument; "in": one of argument; "bool": True or False; "layers": a sequence of layer numbers >= 0
#   (normalized to a sorted tuple); "dict": a dict.
RULES: dict[str, tuple[str, Any]] = {
    "budget": ("budget", None),
    "r": ("int", 1),
    "label_bits": ("int in", LABEL_BITS),
    "sink": ("int", 0),
    "recent": ("int", 0),
    "gqa": ("in", GQA_MODES),
    "min_length": ("int?", 0),
    "page": ("int", 1),
    "dense_layers": ("layers", None),
    "sync_layers": ("layers", None),
    "prefill": ("in", PREFILL_POLICIES),
    "inner": ("in", INNER_COMPILERS),
    "offload": ("bool", None),
    "predict": ("bool", None),
    "zero_copy": ("bool", None),
    "measure_overlap": ("bool", None),
    "cuda_graphs": ("bool", None),
    "device_sync": ("bool", None),
    "inductor_options": ("dict", None),
}


def check_value(owner: str, name: str, value: Any) -> Any:
    """``value`` of knob ``name`` checked against :data:`RULES` (normalized: a parsed budget, a sorted layer
    tuple); a ValueError names ``owner.name`` otherwise."""
    kind, arg = RULES[name]
    where = f"{owner}.{name}"
    if kind == "budget":
        try:
            return parse_budget(value)
        except ValueError as e:
            raise ValueError(f"{owner}.{e}") from None
    if kind == "int?" and value is None:
        return value
    if kind in ("int", "int?"):
        if type(value) is not int or value < arg:
            raise ValueError(f"{where} must be an int >= {arg}, got {value!r}")
    elif kind == "int in":
        if type(value) is not int or value not in arg:
            raise ValueError(f"{where} must be one of the ints {arg}, got {value!r}")
    elif kind == "in":
        if value not in arg:
            raise ValueError(f"{where} must be one of {arg}, got {value!r}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be True or False, got {value!r}")
    elif kind == "layers":
        try:
            layers = tuple(sorted({int(x) for x in value}))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where} must be a sequence of layer numbers, got {value!r}") from e
        if layers and layers[0] < 0:
            raise ValueError(f"{where} holds a negative layer number: {layers[0]}")
        return layers
    elif kind == "dict":
        if not isinstance(value, dict):
            raise ValueError(f"{where} must be a dict of torch._inductor.config patches")
    return value


def check_fields(obj: Any, owner: str, names: Any) -> None:
    """Check (and normalize in place, frozen dataclasses included) the knobs ``names`` of ``obj``."""
    for name in names:
        value = getattr(obj, name)
        checked = check_value(owner, name, value)
        if checked is not value:
            object.__setattr__(obj, name, checked)


def resolve_r(r: Optional[int], channels: Any) -> int:
    """``r`` as given, else the default for the channel config's head_dim (:data:`DEFAULT_R` without one)."""
    if r is not None:
        return r
    return default_r(channels.head_dim) if channels is not None else DEFAULT_R


@dataclass(frozen=True)
class Selection(BudgetView):
    """The token-selection knobs, validated: what the selection ops (``label_write``/``label_scores``/
    ``select_topk``) take, shared by the backend (:attr:`DSConfig.selection`) and the evaluation ``Policy``.

    ``budget`` (int tokens or a fraction, see :func:`parse_budget` and :class:`BudgetView` for the rule), ``r``
    (label channels per KV head), ``label_bits`` (16, 8 or 4), ``sink``/``recent`` (forced oldest/newest tokens),
    ``gqa`` (``"head"``: a selection per query head, ``"group"``: one per KV head), ``min_length`` (caches shorter
    than this attend densely; None derives it from the budget)."""

    budget: int | float = 1 / 16
    r: int = DEFAULT_R
    label_bits: int = 16
    sink: int = 4
    recent: int = 16
    gqa: str = DEFAULT_GQA
    min_length: Optional[int] = None

    def __post_init__(self) -> None:
        check_fields(self, type(self).__name__, SELECTION_FIELDS)


SELECTION_FIELDS = tuple(f.name for f in fields(Selection))


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
    - ``gqa``: ``"group"`` (the default: one selection per KV head, scored by the group score of
      :func:`dsc.kernels.reference.group_scores`; each selected row is read once for the G query heads) or
      ``"head"`` (one selection per query head: a little more accurate, up to G times the rows read). Measured on
      SmolLM2 at 2K context: perplexity +1.79% (group) vs +1.53% (head) at k=128, +4.23% vs +3.10% at 1/16; the
      decode attention op on a 2-core CPU at 16K and 1/16 (batch 1 and 4, 9x3x64 and 32x8x128 heads, 16/8/4-bit
      labels): group 1.3-3.1x the fastest dense attention, head 0.8-1.1x (no faster than dense), so the default is
      ``"group"``. With offload, per-head selection moved 0.106 vs 0.058 of
      whole-layer offload's bytes (3.5x vs 12.5x its speed, H200). ``None`` means ``"group"``.
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

    - ``cuda_graphs`` (default False, experimental): accept modes that run CUDA graphs (``mode="reduce-overhead"``,
      HF's default compile config) on a GPU, which are refused otherwise. The static-cache decode step is built to
      replay (its label bookkeeping decided on the device, ``dsc::label_sync``; label buffers outside the graphs'
      memory pool; fixed shapes) and a CPU emulation of replays gives the non-graph tokens
      (``tests/test_graph_replay.py``), but no GPU has run it yet. Dynamic caches and offload are refused under
      capture. Replays skip the host counters (``runtime.stats``).

    Debug switches (``zero_copy`` and ``measure_overlap`` only matter with ``offload``):

    - ``zero_copy`` (default True): on a GPU, the attention kernels read the selected rows straight from pinned
      host memory; False stages them into a device buffer first (to compare the two paths).
    - ``measure_overlap`` (default False; with ``predict``): also select with each site's own query and count the
      overlap between that selection and the predicted one (costs a second selection per layer and step).
    - ``device_sync`` (default False): on the CPU, run a static cache's decode step as a GPU runs it (label
      bookkeeping in ``dsc::label_sync``, no host reads of positions or masks, no planned native step): what
      ``tests/test_graph_replay.py`` replays. On a GPU it is always so.

    :attr:`selection` gives the selection knobs as a :class:`Selection`.
    """

    channels: Any = None
    budget: float = Selection.budget  # the selection knobs' defaults are Selection's (one definition)
    r: Optional[int] = None  # None: resolve_r (head_dim / 4 of the channel config)
    label_bits: int = Selection.label_bits
    dense_layers: tuple[int, ...] = (0, 1)
    min_length: Optional[int] = Selection.min_length
    gqa: Optional[str] = None  # None: DEFAULT_GQA
    sink: int = Selection.sink
    recent: int = Selection.recent
    prefill: str = "dense"
    inner: str = "inductor"
    inductor_options: dict = field(default_factory=dict)
    offload: bool = False
    predict: bool = False
    sync_layers: tuple[int, ...] = (0, 1, 2)
    zero_copy: bool = True
    measure_overlap: bool = False
    cuda_graphs: bool = False
    device_sync: bool = False

    def __post_init__(self) -> None:
        chans = self.channels
        if isinstance(chans, (str, os.PathLike)):
            from dsc.calibration.config import ChannelConfig

            object.__setattr__(self, "channels", ChannelConfig.load(chans))
        elif chans is not None and not all(hasattr(chans, a) for a in ("channels", "has_layer", "check_shapes")):
            raise ValueError(f"DSConfig.channels must be a ChannelConfig or the path of its JSON file, got "
                             f"{type(chans).__name__}; {CALIBRATE_HINT}")
        check_fields(self, "DSConfig", ("budget", "offload"))  # reported before any other field's error
        object.__setattr__(self, "r", resolve_r(self.r, self.channels))
        if self.gqa is None:
            object.__setattr__(self, "gqa", DEFAULT_GQA)
        check_fields(self, "DSConfig", [f.name for f in fields(self) if f.name in RULES])
        if self.predict and not self.offload:
            raise ValueError("DSConfig.predict=True needs offload=True (prediction decides which host rows to fetch "
                             "ahead; without offload nothing is fetched)")
        if self.channels is not None:
            self._check_against_channels()

    @property
    def selection(self) -> Selection:
        """The selection knobs (budget, r, label_bits, sink, recent, gqa, min_length) as a :class:`Selection`."""
        return Selection(**{name: getattr(self, name) for name in SELECTION_FIELDS})

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
