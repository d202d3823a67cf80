"""``ChannelConfig``: the calibrated channel ranking of every (layer, KV head), plus the metadata needed to refuse
applying it to the wrong model. This is the contract between calibration and the backend (DESIGN.md).

Rankings are per **KV head** because labels are stored per KV head: ``rankings[layer]`` is an int64 tensor
``[num_kv_heads, head_dim]`` holding every channel id once, most important first. Channel ids are in the layout
of the q/k tensors that reach ``scaled_dot_product_attention`` (post-RoPE), which is what the kernels read.

When ``pair_aware`` is set the ranking orders whole RoPE rotation pairs: positions ``2i`` and ``2i+1`` of each
row are partners (``j`` and ``j + D/2`` for ``rope_layout="rotate_half"``, ``2j`` and ``2j+1`` for
``"interleaved"``), so any even ``r`` selects whole pairs.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import operator
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

FORMAT = "dsc.channel_config"
FORMAT_VERSION = 1
ROPE_LAYOUTS = ("rotate_half", "interleaved")
METHODS = ("qk", "q", "k", "imported")
_META_KEYS = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "rope_layout", "method", "tokens",
              "fingerprint", "dsc_version", "pair_aware")
_SHAPE_KEYS = ("num_layers", "num_heads", "num_kv_heads", "head_dim")
# The fingerprint's scheme, its prefix: fingerprints of different schemes cannot be compared ("sha256": dsc before
# quantization-invariant fingerprints, which hashed every weight's values).
FINGERPRINT_SCHEME = "sha256-v2"
CALIBRATE_COMMAND = "`dsc calibrate --model PATH --out cfg.json` (or `dsc.calibrate(model, texts, tokenizer=tok)`)"


def _dsc_version() -> str:
    from dsc import __version__

    return __version__


def rope_partner(channel: int, head_dim: int, layout: str) -> int:
    """The channel that ``channel`` is rotated with by RoPE in ``layout``."""
    if layout == "rotate_half":
        half = head_dim // 2
        return channel + half if channel < half else channel - half
    if layout == "interleaved":
        return channel ^ 1
    raise ValueError(f"rope_layout must be one of {ROPE_LAYOUTS}, got {layout!r}")


def rope_pairs(head_dim: int, layout: str) -> torch.Tensor:
    """int64 ``[head_dim // 2, 2]``: the RoPE rotation pairs of ``layout`` (lower id first), in order."""
    if head_dim % 2:
        raise ValueError(f"RoPE pairs need an even head_dim, got {head_dim}")
    lo = [j for j in range(head_dim) if rope_partner(j, head_dim, layout) > j]
    return torch.tensor([[j, rope_partner(j, head_dim, layout)] for j in lo], dtype=torch.int64)


@dataclass
class ChannelConfig:
    """Channel rankings per calibrated layer (int64 ``[num_kv_heads, head_dim]``, most important first) + metadata.

    Construct with :meth:`from_rankings` (validates and fills metadata), :meth:`random` (tests, random models),
    :func:`dsc.calibrate` (real calibration) or :meth:`load`. Every constructor validates: a config that exists
    is consistent.
    """

    rankings: dict[int, torch.Tensor]
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_layout: str | None = "rotate_half"
    method: str = "qk"
    tokens: int = 0
    fingerprint: str | None = None
    dsc_version: str = field(default_factory=_dsc_version)
    pair_aware: bool = False

    # --------------------------------------------------------------------------------------------- validation
    def __post_init__(self) -> None:
        for key in _SHAPE_KEYS:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ChannelConfig.{key} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ChannelConfig.num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.rope_layout is not None and self.rope_layout not in ROPE_LAYOUTS:
            raise ValueError(f"ChannelConfig.rope_layout must be one of {ROPE_LAYOUTS} or None (unknown), "
                             f"got {self.rope_layout!r}")
        if self.method not in METHODS:
            raise ValueError(f"ChannelConfig.method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 0:
            raise ValueError(f"ChannelConfig.tokens must be a non-negative int, got {self.tokens!r}")
        if self.fingerprint is not None and not isinstance(self.fingerprint, str):
            raise ValueError(f"ChannelConfig.fingerprint must be a str or None, got {self.fingerprint!r}")
        if not isinstance(self.dsc_version, str):
            raise ValueError(f"ChannelConfig.dsc_version must be a str, got {self.dsc_version!r}")
        if not isinstance(self.pair_aware, bool):
            raise ValueError(f"ChannelConfig.pair_aware must be a bool, got {self.pair_aware!r}")
        if self.pair_aware and self.rope_layout is None:
            raise ValueError("a pair_aware ChannelConfig needs a known rope_layout ('rotate_half' or 'interleaved')")
        if self.pair_aware and self.head_dim % 2:
            raise ValueError(f"a pair_aware ChannelConfig needs an even head_dim, got {self.head_dim}")
        if not isinstance(self.rankings, Mapping):
            raise ValueError(f"ChannelConfig.rankings must be a dict layer -> [num_kv_heads, head_dim] tensor, "
                             f"got {type(self.rankings).__name__}")
        if not self.rankings:
            raise ValueError("ChannelConfig.rankings is empty: a channel config needs at least one layer")
        checked, keys = {}, {}
        for key, ranking in self.rankings.items():
            layer = self._check_layer_key(key)
            if layer in checked:
                raise ValueError(f"ChannelConfig.rankings names layer {layer} twice (keys {keys[layer]!r} and "
                                 f"{key!r}); keep one ranking per layer")
            keys[layer] = key
            checked[layer] = self._check_ranking(layer, ranking)
        self.rankings = dict(sorted(checked.items()))

    def _check_layer_key(self, layer: Any) -> int:
        if isinstance(layer, str) and layer.strip().isdigit():
            layer = int(layer)
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(f"ChannelConfig.rankings keys must be int layer numbers, got {layer!r}")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"ChannelConfig.rankings has layer {layer}, outside 0..{self.num_layers - 1} "
                             f"(num_layers={self.num_layers})")
        return layer

    def _check_ranking(self, layer: int, ranking: Any) -> torch.Tensor:
        where = f"ChannelConfig.rankings[{layer}]"
        if not isinstance(ranking, torch.Tensor):
            try:
                ranking = torch.as_tensor(ranking)
            except (TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"{where} is not a rectangular array of channel ids: {e}") from e
        if ranking.dtype.is_floating_point or ranking.dtype.is_complex or ranking.dtype == torch.bool:
            raise ValueError(f"{where} must hold integer channel ids, got dtype {ranking.dtype}")
        want = (self.num_kv_heads, self.head_dim)
        if tuple(ranking.shape) != want:
            raise ValueError(f"{where} has shape {tuple(ranking.shape)}, but the config says "
                             f"[num_kv_heads, head_dim] = {list(want)}")
        ranking = ranking.detach().to(device="cpu", dtype=torch.int64).contiguous()
        ids = torch.arange(self.head_dim, dtype=torch.int64)
        for h in range(self.num_kv_heads):
            if not torch.equal(torch.sort(ranking[h]).values, ids):
                raise ValueError(f"{where}[{h}] is not a permutation of the channels 0..{self.head_dim - 1} "
                                 "(each channel must appear exactly once)")
        if self.pair_aware:
            partner = torch.tensor([rope_partner(int(c), self.head_dim, self.rope_layout)
                                    for c in ranking.flatten()]).view_as(ranking)
            if not torch.equal(partner[:, 0::2], ranking[:, 1::2]):
                raise ValueError(f"{where} is marked pair_aware but positions 2i and 2i+1 are not "
                                 f"{self.rope_layout} RoPE partners; re-rank with pair_aware=True")
        return ranking

    # ------------------------------------------------------------------------------------------ constructors
    @classmethod
    def from_rankings(cls, rankings: Mapping[int, Any], *, num_layers: int | None = None,
                      num_heads: int | None = None, **metadata: Any) -> "ChannelConfig":
        """A config from ``{layer: [num_kv_heads, head_dim] channel ids}``; ``num_kv_heads`` and ``head_dim`` come
        from the arrays, ``num_layers`` defaults to the highest layer + 1 and ``num_heads`` to ``num_kv_heads``
        (pass the model's values, or use :meth:`for_model`)."""
        if not isinstance(rankings, Mapping) or not rankings:
            raise ValueError("rankings must be a non-empty dict layer -> [num_kv_heads, head_dim] channel ids")
        first = torch.as_tensor(next(iter(rankings.values())))
        if first.dim() != 2:
            raise ValueError(f"each ranking must be 2-D [num_kv_heads, head_dim], got shape {tuple(first.shape)}")
        hkv, d = first.shape
        layers = [int(k) for k in rankings]
        unknown = set(metadata) - set(_META_KEYS)
        if unknown:
            raise ValueError(f"unknown ChannelConfig fields {sorted(unknown)}; known: {list(_META_KEYS)}")
        metadata.setdefault("num_kv_heads", int(hkv))
        metadata.setdefault("head_dim", int(d))
        return cls(rankings=dict(rankings), num_layers=num_layers if num_layers is not None else max(layers) + 1,
                   num_heads=num_heads if num_heads is not None else int(hkv), **metadata)

    @classmethod
    def from_scores(cls, scores: Mapping[int, torch.Tensor], *, pair_aware: bool = False,
                    rope_layout: str | None = "rotate_half", **metadata: Any) -> "ChannelConfig":
        """A config ranking each row of ``{layer: [num_kv_heads, head_dim] importance}`` (higher = more important;
        ties -> lower channel id first). ``pair_aware`` ranks whole RoPE pairs by the sum of their two scores."""
        rankings = {int(layer): rank_channels(s, pair_aware=pair_aware, rope_layout=rope_layout)
                    for layer, s in scores.items()}
        return cls.from_rankings(rankings, pair_aware=pair_aware, rope_layout=rope_layout, **metadata)

    @classmethod
    def for_model(cls, model_or_config: Any, rankings: Mapping[int, Any], **metadata: Any) -> "ChannelConfig":
        """:meth:`from_rankings` with the shape metadata (and fingerprint, for a model) taken from the model."""
        shapes = model_shapes(model_or_config)
        if isinstance(model_or_config, torch.nn.Module):
            metadata.setdefault("fingerprint", model_fingerprint(model_or_config))
        return cls.from_rankings(rankings, **shapes, **metadata)

    @classmethod
    def random(cls, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int, *, seed: int = 0,
               layers: list[int] | None = None, pair_aware: bool = False,
               rope_layout: str | None = "rotate_half") -> "ChannelConfig":
        """Random rankings (seeded, for tests and randomly initialised models); all layers unless ``layers``."""
        gen = torch.Generator().manual_seed(seed)
        scores = {layer: torch.rand(num_kv_heads, head_dim, generator=gen, dtype=torch.float64)
                  for layer in (range(num_layers) if layers is None else layers)}
        return cls.from_scores(scores, pair_aware=pair_aware, rope_layout=rope_layout, num_layers=num_layers,
                               num_heads=num_heads, method="qk", tokens=0)

    # ---------------------------------------------------------------------------------------------- queries
    @property
    def layers(self) -> list[int]:
        """The calibrated layer numbers, ascending."""
        return list(self.rankings)

    def has_layer(self, layer: int) -> bool:
        return int(layer) in self.rankings

    def shard(self, rank: int, world: int) -> "ChannelConfig":
        """The rankings of the KV heads tensor-parallel rank ``rank`` of ``world`` holds: HF's (and Megatron's)
        column-wise attention sharding gives each rank a contiguous block of ``num_kv_heads / world`` KV heads
        with their query heads. Selection is per KV head, so a shard selects exactly what the whole model would
        on those heads. Cached: every graph of a rank shares one shard (and so its label caches)."""
        if self.num_kv_heads % world or self.num_heads % world or not 0 <= rank < world:
            raise ValueError(f"cannot shard a channel config with {self.num_heads} query / {self.num_kv_heads} KV "
                             f"heads over {world} tensor-parallel ranks (rank {rank}): heads must divide evenly")
        cache = self.__dict__.setdefault("_shards", {})
        if (rank, world) not in cache:
            n = self.num_kv_heads // world
            rows = {layer: r[rank * n:(rank + 1) * n].clone() for layer, r in self.rankings.items()}
            cache[(rank, world)] = dataclasses.replace(self, rankings=rows, num_heads=self.num_heads // world,
                                                       num_kv_heads=n)
        return cache[(rank, world)]

    def channels(self, layer: int, r: int) -> torch.Tensor:
        """int64 ``[num_kv_heads, r]``: the top-``r`` channels of each KV head of ``layer``, sorted ascending
        (order does not change ``q . label``; ascending ids make the label gather read forward). With
        ``pair_aware`` the set is whole RoPE pairs, so ``r`` must be even."""
        if not self.has_layer(layer):
            raise ValueError(f"layer {layer} is not in this channel config (calibrated layers: "
                             f"{_span(self.layers)}); keep it dense or calibrate it")
        if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= self.head_dim:
            raise ValueError(f"r (label channels per head) must be an int in 1..head_dim={self.head_dim}, got {r!r}")
        if self.pair_aware and r % 2:
            raise ValueError(f"r={r} is odd but this channel config is pair_aware (whole RoPE pairs); use an even r "
                             "or a config calibrated with pair_aware=False")
        return torch.sort(self.rankings[int(layer)][:, :r], dim=1).values

    # ------------------------------------------------------------------------------------------------ checks
    def check_shapes(self, *, num_layers: int | None = None, num_heads: int | None = None,
                     num_kv_heads: int | None = None, head_dim: int | None = None, what: str = "the model") -> None:
        """Raise ValueError naming both sides if any *given* dimension differs from this config's (a partial
        check; :meth:`check_match` checks every dimension and the weights)."""
        given = {"num_layers": num_layers, "num_heads": num_heads, "num_kv_heads": num_kv_heads,
                 "head_dim": head_dim}
        bad = [f"{k}: config {getattr(self, k)} vs {what} {v}" for k, v in given.items()
               if v is not None and int(v) != getattr(self, k)]
        if bad:
            raise ValueError(f"channel config does not match {what} ({'; '.join(bad)}); calibrate this model with "
                             "`dsc calibrate --model ...` or load the config made for it")

    def check_match(self, *, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
                    fingerprint: str | None = None, what: str = "this model", skip_hint: str | None = None) -> None:
        """Refuse to apply this config to a model it was not calibrated for: ValueError unless all four sizes equal
        this config's and, when ``fingerprint`` (:func:`model_fingerprint` of the model) is given and this config
        records one, the two fingerprints are equal.

        Opting out of the weight check: pass ``fingerprint=None`` (shapes are still checked). Configs without a
        fingerprint (imported reference configs) are checked on shapes only. ``skip_hint`` tells the user how to
        opt out at their level (e.g. a backend option); the default names this argument. Fingerprints do not depend
        on dtype or weight quantization (see :func:`model_fingerprint`), so a config calibrated on the full
        model passes for its bf16 or int8-quantized copy.
        """
        sizes = {"num_layers": num_layers, "num_heads": num_heads, "num_kv_heads": num_kv_heads,
                 "head_dim": head_dim}
        for k, v in sizes.items():
            try:
                sizes[k] = operator.index(v)
            except TypeError:
                raise ValueError(f"check_match: {k} must be an int, got {v!r}") from None
        bad = [k for k, v in sizes.items() if v != getattr(self, k)]
        if bad:
            ours = ", ".join(f"{k}={getattr(self, k)}" for k in bad)
            theirs = ", ".join(f"{k}={sizes[k]}" for k in bad)
            raise ValueError(f"channel config was calibrated for a model with {ours}; {what} has {theirs}. "
                             f"Calibrate this model: {CALIBRATE_COMMAND}")
        if fingerprint is not None and self.fingerprint is not None and fingerprint != self.fingerprint:
            if _scheme(fingerprint) != _scheme(self.fingerprint):
                warnings.warn(f"channel config's weight fingerprint {self.fingerprint} was computed by another dsc "
                              f"version than {what}'s ({fingerprint}); weights not checked (shapes were). "
                              f"Recalibrate to record a current fingerprint: {CALIBRATE_COMMAND}", stacklevel=2)
                return
            skip = skip_hint or "check_match(..., fingerprint=None)"
            raise ValueError(f"channel config was calibrated on other weights (fingerprint {self.fingerprint}); "
                             f"{what} has fingerprint {fingerprint} (same shapes: another checkpoint or a "
                             f"fine-tune). Calibrate this model: {CALIBRATE_COMMAND}; or, if you know these "
                             f"rankings fit these weights, skip the weight check with {skip}")

    def check_model(self, model_or_config: Any, *, fingerprint: bool = True) -> None:
        """:meth:`check_match` against a model (``nn.Module`` with ``.config``), an HF config or a dict of its
        fields. The weight fingerprint is compared for a module when ``fingerprint`` (the default); pass
        ``fingerprint=False`` to check shapes only."""
        theirs = None
        if fingerprint and self.fingerprint and isinstance(model_or_config, torch.nn.Module):
            theirs = model_fingerprint(getattr(model_or_config, "_orig_mod", model_or_config))
        self.check_match(**model_shapes(model_or_config), fingerprint=theirs,
                         skip_hint="check_model(..., fingerprint=False)")

    # ------------------------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        out = {"format": FORMAT, "format_version": FORMAT_VERSION}
        out.update({k: getattr(self, k) for k in _META_KEYS})
        out["rankings"] = {str(layer): r.tolist() for layer, r in self.rankings.items()}
        return out

    @classmethod
    def from_dict(cls, obj: Any, source: str = "channel config") -> "ChannelConfig":
        """Strict inverse of :meth:`to_dict`: unknown, missing or mistyped fields raise ValueError."""
        if not isinstance(obj, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(obj).__name__}")
        if obj.get("format") != FORMAT:
            hint = (" (this looks like a reference/SGLang config: use dsc.calibration.interchange.import_reference)"
                    if any(".self_attn." in str(k) for k in obj) else "")
            raise ValueError(f"{source}: not a dsc channel config (format {obj.get('format')!r}, "
                             f"expected {FORMAT!r}){hint}")
        if obj.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{source}: format_version {obj.get('format_version')!r} is not supported "
                             f"(this dsc reads {FORMAT_VERSION})")
        expected = {"format", "format_version", "rankings", *_META_KEYS}
        missing, unknown = expected - set(obj), set(obj) - expected
        if missing or unknown:
            raise ValueError(f"{source}: " + "; ".join(
                p for p in (f"missing fields {sorted(missing)}" if missing else "",
                            f"unknown fields {sorted(unknown)}" if unknown else "") if p))
        rankings = obj["rankings"]
        if not isinstance(rankings, dict):
            raise ValueError(f"{source}: 'rankings' must be an object layer -> rows, got {type(rankings).__name__}")
        for layer, rows in rankings.items():
            if not (isinstance(rows, list) and all(isinstance(row, list) and all(
                    isinstance(c, int) and not isinstance(c, bool) for c in row) for row in rows)):
                raise ValueError(f"{source}: rankings[{layer!r}] must be a list of lists of int channel ids")
        try:
            return cls(rankings=dict(rankings), **{k: obj[k] for k in _META_KEYS})
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from e

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (one line per ranking row, so diffs stay readable)."""
        path = Path(path)
        d = self.to_dict()
        rankings = d.pop("rankings")
        lines = [f"  {json.dumps(k)}: {json.dumps(v)}," for k, v in d.items()]
        body = []
        for layer, rows in rankings.items():
            inner = ",\n".join(f"    {json.dumps(row, separators=(',', ':'))}" for row in rows)
            body.append(f"   {json.dumps(layer)}: [\n{inner}\n   ]")
        text = "{\n" + "\n".join(lines) + '\n  "rankings": {\n' + ",\n".join(body) + "\n  }\n}\n"
        return write_text_atomic(path, text)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ChannelConfig":
        """Read and strictly validate a config written by :meth:`save`."""
        path = Path(path)
        what = f"channel config {str(path)!r}"
        check_json_file(path, what, "pass the JSON file written by `dsc calibrate --out cfg.json`")
        obj = parse_json(path.read_text(encoding="utf-8"), what, "regenerate it with `dsc calibrate`")
        return cls.from_dict(obj, source=what)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ChannelConfig):
            return NotImplemented
        return (all(getattr(self, k) == getattr(other, k) for k in _META_KEYS)
                and self.rankings.keys() == other.rankings.keys()
                and all(torch.equal(self.rankings[k], other.rankings[k]) for k in self.rankings))

    def __hash__(self) -> int:  # by content, consistent with __eq__ (options dicts holding a config can hash)
        return hash((tuple(getattr(self, k) for k in _META_KEYS),
                     tuple((k, r.numpy().tobytes()) for k, r in self.rankings.items())))

    def __repr__(self) -> str:
        return (f"ChannelConfig(layers={_span(self.layers)}, num_layers={self.num_layers}, num_heads={self.num_heads},"
                f" num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, method={self.method!r}, "
                f"tokens={self.tokens}, pair_aware={self.pair_aware}, rope_layout={self.rope_layout!r})")


# ------------------------------------------------------------------------------------------------------ helpers
def rank_channels(scores: torch.Tensor, *, pair_aware: bool = False,
                  rope_layout: str | None = "rotate_half") -> torch.Tensor:
    """Rank each row of ``scores`` ``[H, D]`` descending (ties -> lower id first) as int64 ``[H, D]``. With
    ``pair_aware``, whole RoPE pairs are ranked by the sum of their scores, each pair's better channel first."""
    scores = torch.as_tensor(scores).detach().to("cpu", torch.float64)
    if scores.dim() != 2:
        raise ValueError(f"scores must be [heads, head_dim], got shape {tuple(scores.shape)}")
    if not torch.isfinite(scores).all():
        raise ValueError("scores contain NaN or inf; the calibration statistic overflowed or the model produced NaN")
    if not pair_aware:
        return torch.sort(-scores, dim=1, stable=True).indices
    if rope_layout is None:
        raise ValueError("pair_aware ranking needs a known rope_layout ('rotate_half' or 'interleaved')")
    pairs = rope_pairs(scores.shape[1], rope_layout)  # [D/2, 2]
    pair_scores = scores[:, pairs].sum(-1)  # [H, D/2]
    order = torch.sort(-pair_scores, dim=1, stable=True).indices  # [H, D/2]
    chosen = pairs[order]  # [H, D/2, 2]
    a, b = chosen[..., 0], chosen[..., 1]
    swap = scores.gather(1, b) > scores.gather(1, a)
    first, second = torch.where(swap, b, a), torch.where(swap, a, b)
    return torch.stack([first, second], dim=-1).reshape(scores.shape)


def model_shapes(model_or_config: Any) -> dict[str, int]:
    """``num_layers, num_heads, num_kv_heads, head_dim`` of an HF model, HF config or dict (HF field names)."""
    cfg = getattr(model_or_config, "config", model_or_config)
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    get = (cfg.get if isinstance(cfg, Mapping) else lambda k, d=None: getattr(cfg, k, d))
    layers, heads = get("num_hidden_layers"), get("num_attention_heads")
    if layers is None or heads is None:
        raise ValueError(f"cannot read num_hidden_layers/num_attention_heads from {type(model_or_config).__name__}; "
                         "pass an HF model or config, or call check_shapes(...) with explicit sizes")
    kv = get("num_key_value_heads") or heads
    head_dim = get("head_dim") or get("hidden_size") // heads
    return {"num_layers": int(layers), "num_heads": int(heads), "num_kv_heads": int(kv), "head_dim": int(head_dim)}


def model_fingerprint(model: torch.nn.Module, sample: int = 256) -> str:
    """A cheap identity of a model's checkpoint that weight quantization and dtype do not change.

    Hashed: the model type; every parameter's name and logical shape (tied names included); and a sample of the
    values (rounded to bf16, so fp32 and bf16 loads agree) of the parameters that weight quantizers leave in full
    precision: embedding tables and 1-D tensors (norms, biases). The weights of linear layers contribute their
    names and shapes only: int8/int4 weight-only quantization (torchao ``quantize_``, which swaps them for tensor
    subclasses that cannot even be reshaped) changes their values, yet the channel rankings calibrated on the full
    model are the ones to use on its quantized copy, so both must give one fingerprint (and one cached default
    calibration). Random or different checkpoints differ in their embeddings; a fine-tune that changes only
    linear weights (a merged LoRA, say) keeps its base model's fingerprint. Quantized embeddings or norms are read
    dequantized: then the fingerprint differs from the full model's (a clear mismatch, never a crash).
    """
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    h.update(str(getattr(cfg, "model_type", type(model).__name__)).encode())
    tables = {f"{name}.weight" if name else "weight" for name, m in model.named_modules(remove_duplicate=False)
              if isinstance(m, torch.nn.Embedding)}
    for name, p in sorted(model.named_parameters(remove_duplicate=False), key=lambda kv: kv[0]):
        h.update(f"{name}:{tuple(p.shape)};".encode())
        if name in tables or p.dim() <= 1:
            h.update(_sampled_values(p, sample))
    return f"{FINGERPRINT_SCHEME}:" + h.hexdigest()[:32]


def _scheme(fingerprint: str) -> str:
    return fingerprint.rsplit(":", 1)[0] if ":" in fingerprint else ""


def dense_values(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of ``t``'s values: ``t`` itself, or its dequantized values for a quantized tensor subclass
    (torchao), which supports few ops."""
    t = t.detach()
    if type(t) in (torch.Tensor, torch.nn.Parameter):
        return t
    if hasattr(t, "dequantize"):
        return t.dequantize()
    raise ValueError(f"cannot read the values of a {type(t).__name__} tensor (no dequantize())")


def _sampled_values(p: torch.Tensor, sample: int) -> bytes:
    flat = dense_values(p).reshape(-1)
    n = flat.numel()
    if n == 0:
        return b""
    m = min(sample, n)
    idx = torch.arange(m, dtype=torch.int64) * (n - 1) // max(m - 1, 1)
    return flat[idx.to(flat.device)].to(torch.bfloat16).to(torch.float32).cpu().numpy().tobytes()


# --------------------------------------------------------------------------------------------------- files
def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically: a temp file in the same folder, then ``os.replace``; readers see the
    old file or the new one, never a partial one. The file gets ordinary permissions (``0666 & ~umask``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a config is an ordinary shareable file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_json_file(path: Path, what: str, hint: str) -> None:
    """FileNotFoundError with a message saying what is there instead (a directory) and what to pass. (One exception
    type for both, so callers and the CLI that handle a missing file handle a directory too.)"""
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.json"))[:3]
        inside = f" holding {', '.join(found)}" if found else ""
        raise FileNotFoundError(f"{what} is a directory{inside}, not a file; {hint}")
    if not path.is_file():
        raise FileNotFoundError(f"{what} does not exist; make one with `dsc calibrate`")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(ValueError):
    pass


def parse_json(text: str, what: str, hint: str) -> Any:
    """``json.loads`` with clear ValueErrors: invalid JSON, a key repeated within one object (JSON would keep the
    last silently), nesting too deep for the parser (instead of a RecursionError)."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except _DuplicateKey as e:
        raise ValueError(f"{what} repeats the key {e.args[0]!r} within one object; keep one entry per key") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}; truncated or "
                         f"edited?); {hint}") from e
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply to be a channel config (a config is an object of "
                         f"layer -> rows of channel ids); {hint}") from None


def _span(layers: list[int]) -> str:
    if not layers:
        return "none"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}..{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ",".join(map(str, layers))


def topk_overlap(a: "ChannelConfig", b: "ChannelConfig", r: int) -> float:
    """Mean over shared (layer, KV head) of |top-r(a) & top-r(b)| / r: how much two calibrations agree."""
    shared = [layer for layer in a.layers if b.has_layer(layer)]
    if not shared:
        raise ValueError("the two channel configs share no layer")
    a.check_shapes(num_kv_heads=b.num_kv_heads, head_dim=b.head_dim, what="the other config")
    total = 0.0
    for layer in shared:
        for x, y in zip(a.rankings[layer][:, :r].tolist(), b.rankings[layer][:, :r].tolist()):
            total += len(set(x) & set(y)) / r
    return total / (len(shared) * a.num_kv_heads)


def pair_share(cfg: "ChannelConfig", r: int, rope_layout: str | None = None) -> float:
    """Share of top-``r`` channels whose RoPE partner is also in the top-``r`` (over all layers and KV heads)."""
    layout = rope_layout or cfg.rope_layout
    if layout is None:
        raise ValueError("pair_share needs a rope_layout; the config does not know its model's layout")
    hits = total = 0
    for layer in cfg.layers:
        for row in cfg.rankings[layer][:, :r].tolist():
            s = set(row)
            hits += sum(rope_partner(c, cfg.head_dim, layout) in s for c in row)
            total += len(row)
    return hits / total if total else math.nan
