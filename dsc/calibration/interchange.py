"""Import and export of the reference/SGLang channel-config JSON, so published configs can be reused.

That format is a dict ``"model.layers.{i}.self_attn.{kind}_proj" -> rows of channel ids, most important first``
with ``kind`` in ``q``, ``k``, ``qk``: ``q``/``qk`` files hold one row per **query** head, ``k`` files one row
per **KV** head. Rows may be full rankings (``head_dim`` ids) or only the top ids; a file may hold several kinds.

Mapping to dsc's per-KV-head rankings:
- export: a ``q``/``qk`` row for query head ``h`` is the ranking of its KV head ``h // G`` (repeated G times);
  a ``k`` row is the KV head's ranking;
- import of ``q``/``qk`` rows: the G rows of a group are merged by **Borda count**: channel ``c`` gets the sum over
  the group's rows of its position in each row, and the KV head's ranking orders channels by that sum (ties:
  best single position, then lower id). G identical rows give that row back, so export -> import is exact.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from dsc.calibration.config import ChannelConfig, check_json_file, model_shapes, parse_json, write_text_atomic

KINDS = ("qk", "q", "k")
_KEY = re.compile(r"^(?P<prefix>.*?)layers\.(?P<layer>\d+)\.self_attn\.(?P<kind>qk|q|k)_proj$")


def export_reference(cfg: ChannelConfig, kind: str | None = None,
                     key_format: str = "model.layers.{layer}.self_attn.{kind}_proj") -> dict[str, list[list[int]]]:
    """The reference/SGLang dict for ``cfg`` (``kind`` defaults to the config's method; ``imported`` -> ``qk``)."""
    kind = kind or (cfg.method if cfg.method in KINDS else "qk")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    g = cfg.num_heads // cfg.num_kv_heads
    out = {}
    for layer, ranking in cfg.rankings.items():
        rows = ranking.tolist()
        if kind != "k":
            rows = [rows[h // g] for h in range(cfg.num_heads)]
        out[key_format.format(layer=layer, kind=kind)] = rows
    return out


def save_reference(cfg: ChannelConfig, path: str | os.PathLike, kind: str | None = None) -> Path:
    """Write :func:`export_reference` JSON atomically (a temp file in the same folder, then ``os.replace``)."""
    return write_text_atomic(path, json.dumps(export_reference(cfg, kind)) + "\n")


def borda_merge(rows: torch.Tensor) -> torch.Tensor:
    """One ranking ``[D]`` from ``G`` full rankings ``[G, D]`` by Borda count (see the module docstring)."""
    g, d = rows.shape
    pos = torch.empty_like(rows)
    pos.scatter_(1, rows, torch.arange(d, dtype=rows.dtype).expand(g, d))  # pos[i, c] = place of c in row i
    key = (pos.sum(0) * d + pos.min(0).values) * d + torch.arange(d, dtype=rows.dtype)
    return torch.argsort(key)


def import_reference(source: str | os.PathLike | Mapping[str, Any], *, model: Any = None,
                     num_layers: int | None = None, num_heads: int | None = None,
                     num_kv_heads: int | None = None, head_dim: int | None = None, kind: str | None = None,
                     allow_partial: bool = False, rope_layout: str | None = "rotate_half") -> ChannelConfig:
    """A :class:`ChannelConfig` from a reference/SGLang JSON file or dict.

    Sizes come from ``model`` (an HF model or config) or the explicit arguments; ``num_kv_heads`` is required
    for ``q``/``qk`` rows on GQA models (the file cannot tell how query heads group). ``kind`` picks one kind when
    the file holds several (default: ``qk``, else the only one present). Partial rows (top ids only) are refused
    unless ``allow_partial``, which completes each row with the missing channels in ascending id order.
    """
    where = "reference channel config"
    if not isinstance(source, Mapping):
        path = Path(source)
        where = f"reference channel config {str(path)!r}"
        check_json_file(path, where, "pass the reference JSON file itself")
        source = parse_json(path.read_text(encoding="utf-8"), where, "check the file")
        if not isinstance(source, dict):
            raise ValueError(f"{where}: expected a JSON object of 'model.layers.N.self_attn.KIND_proj' keys")
    by_kind: dict[str, dict[int, Any]] = {}
    for key, rows in source.items():
        m = _KEY.match(str(key))
        if not m:
            raise ValueError(f"{where}: key {key!r} is not of the form 'model.layers.N.self_attn.(q|k|qk)_proj'")
        same = by_kind.setdefault(m["kind"], {})
        layer = int(m["layer"])
        if layer in same:
            raise ValueError(f"{where}: names layer {layer}'s {m['kind']} rows twice (key {key!r} and an earlier "
                             "one with the same layer number); keep one entry per layer")
        same[layer] = rows
    if not by_kind:
        raise ValueError(f"{where}: holds no layer")
    if kind is None:
        kind = "qk" if "qk" in by_kind else (next(iter(by_kind)) if len(by_kind) == 1 else None)
        if kind is None:
            raise ValueError(f"{where}: holds kinds {sorted(by_kind)}; pick one with kind=...")
    if kind not in by_kind:
        raise ValueError(f"{where}: has no {kind!r} rows (it has {sorted(by_kind)})")
    layers = by_kind[kind]

    sizes = {"num_layers": num_layers, "num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim}
    if model is not None:
        for k, v in model_shapes(model).items():
            if sizes[k] is not None and sizes[k] != v:
                raise ValueError(f"{k}={sizes[k]} contradicts the model's {k}={v}")
            sizes[k] = v
    tensors = {}
    for layer, rows in sorted(layers.items()):
        if not (isinstance(rows, list) and rows and all(isinstance(r, list) and r and all(
                isinstance(c, int) and not isinstance(c, bool) for c in r) for r in rows)):
            raise ValueError(f"{where}: layer {layer} must be a non-empty list of non-empty lists of int channel ids")
        if len({len(r) for r in rows}) != 1:
            raise ValueError(f"{where}: layer {layer} has rows of different lengths")
        tensors[layer] = torch.tensor(rows, dtype=torch.int64)
    n_rows = {t.shape[0] for t in tensors.values()}
    if len(n_rows) != 1:
        raise ValueError(f"{where}: layers have different numbers of head rows {sorted(n_rows)}")
    rows_per_layer = n_rows.pop()
    row_len = max(t.shape[1] for t in tensors.values())
    hq, hkv, d = sizes["num_heads"], sizes["num_kv_heads"], sizes["head_dim"]
    if kind == "k":
        hkv = _agree(where, "num_kv_heads", hkv, rows_per_layer, "k rows (one per KV head)")
        hq = hq or hkv
    else:
        hq = _agree(where, "num_heads", hq, rows_per_layer, f"{kind} rows (one per query head)")
        if hkv is None:
            raise ValueError(f"{where}: {kind} rows are per query head; pass num_kv_heads= (or model=) so the "
                             "query heads can be grouped per KV head")
        if hq % hkv:
            raise ValueError(f"{where}: {hq} query-head rows are not a multiple of num_kv_heads={hkv}")
    if d is None:
        if allow_partial:
            raise ValueError(f"{where}: with allow_partial, pass head_dim= (or model=): partial rows cannot tell it")
        d = row_len
    rankings = {}
    for layer, t in tensors.items():
        if t.shape[1] > d or int(t.min()) < 0 or int(t.max()) >= d:
            raise ValueError(f"{where}: layer {layer} has channel ids outside 0..{d - 1} or rows longer than "
                             f"head_dim={d}")
        if t.shape[1] < d:
            if not allow_partial:
                raise ValueError(f"{where}: layer {layer} rows rank {t.shape[1]} of head_dim={d} channels; pass "
                                 "allow_partial=True to complete them with the rest in ascending id order")
            t = torch.stack([_complete(row, d, where, layer) for row in t])
        for i, row in enumerate(t):
            if torch.unique(row).numel() != d:
                raise ValueError(f"{where}: layer {layer} row {i} repeats a channel id")
        if kind != "k":
            g = hq // hkv
            t = torch.stack([borda_merge(t[j * g:(j + 1) * g]) for j in range(hkv)])
        rankings[layer] = t
    n_layers = sizes["num_layers"] if sizes["num_layers"] is not None else max(rankings) + 1
    try:
        return ChannelConfig(rankings=rankings, num_layers=n_layers, num_heads=hq, num_kv_heads=hkv, head_dim=d,
                             rope_layout=rope_layout, method="imported", tokens=0, fingerprint=None)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


def _agree(where: str, name: str, given: int | None, found: int, what: str) -> int:
    if given is not None and given != found:
        raise ValueError(f"{where}: has {found} {what}, but the model has {name}={given}")
    return found


def _complete(row: torch.Tensor, d: int, where: str, layer: int) -> torch.Tensor:
    if torch.unique(row).numel() != row.numel():
        raise ValueError(f"{where}: layer {layer} has a row that repeats a channel id")
    rest = torch.tensor([c for c in range(d) if c not in set(row.tolist())], dtype=torch.int64)
    return torch.cat([row, rest])
