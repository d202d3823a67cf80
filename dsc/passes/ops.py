"""``dsc::site_attention``: the op the rewrite puts in place of a decoder's SDPA.

One opaque op per attention site does both halves of Double Sparsity at run time: it keeps the site's label
cache in sync with the KV cache (:mod:`dsc.passes.store`) and then attends, sparsely (``dsc::ds_decode``) or
densely (SDPA) by host-side shape facts only: ``Lq > 1`` under the dense prefill policy, or a cache shorter than
``min_length``. One op rather than a separate label write keeps ordering explicit (it consumes the post-write
cache value, so inductor can keep the cache update in place) and cannot be dead-code eliminated (its output is
the attention output), while prefill attention, which inductor lowers to the same aten SDPA kernel anyway, costs
nothing extra.

Sites are registered by the rewrite in :data:`SITES` (an int id baked into the graph -> :class:`SiteSpec`).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import dsc.kernels  # noqa: F401  (registers torch.ops.dsc.*)

from . import offload, store


@dataclass(frozen=True)
class SiteSpec:
    """What a rewritten site does at run time."""

    label: store.LabelSpec
    layer: int
    budget: int
    frac: float
    sink: int
    recent: int
    group: bool
    dense_prefill: bool
    min_length: int
    offload: bool = False


SITES: dict[int, SiteSpec] = {}
_SITE_LOCK = threading.Lock()
_SPEC_INTERN: dict[tuple, tuple] = {}  # key -> (LabelSpec, the config it came from, kept alive for id())


def label_spec(channels_cfg, layer: int, r: int, bits: int) -> store.LabelSpec:
    """One LabelSpec per (config object, layer, r, bits): prefill and decode graphs of a model share it, hence
    share the label caches."""
    key = (id(channels_cfg), layer, r, bits)
    with _SITE_LOCK:
        hit = _SPEC_INTERN.get(key)
        if hit is None:
            ch = channels_cfg.channels(layer, r)
            hit = _SPEC_INTERN[key] = (store.LabelSpec(channels=ch.contiguous(), bits=bits), channels_cfg)
        return hit[0]


def register_site(spec: SiteSpec) -> int:
    with _SITE_LOCK:
        site = len(SITES)
        SITES[site] = spec
        return site


def _valid_from_mask(attn_mask: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """(valid bool, additive bias) from an SDPA ``attn_mask``: bool masks select; float masks are added to the
    logits and their ``-inf``/dtype-min entries are excluded from selection."""
    if attn_mask is None:
        return None, None
    if attn_mask.dtype == torch.bool:
        return attn_mask, None
    return attn_mask > torch.finfo(attn_mask.dtype).min / 2, attn_mask


def _causal_valid(lq: int, s: int, device) -> Tensor:
    # torch SDPA's is_causal is top-left aligned: query i sees keys j <= i.
    return torch.ones(lq, s, dtype=torch.bool, device=device).tril()


def _ds_decode(*args):
    """The sparse kernel (a module-level hook so tests can observe the selection)."""
    return torch.ops.dsc.ds_decode(*args)


def _select(idx: Tensor) -> Tensor:
    """The offload path's selection (a module-level hook so tests can observe it)."""
    return idx


@torch.library.custom_op("dsc::site_attention", mutates_args=())
def site_attention(site: int, q: Tensor, k: Tensor, v: Tensor, past_k: Optional[Tensor], new_k: Tensor,
                   positions: Optional[Tensor], attn_mask: Optional[Tensor], is_causal: bool, scale: float,
                   cache: str, prefetched: Optional[Tensor] = None, new_v: Optional[Tensor] = None) -> Tensor:
    """Keep the site's labels in sync with the K cache, then attend (sparse at decode, dense otherwise).

    ``k``/``v``: KV-native ``[B, Hkv, S, D]`` as SDPA would read them; ``cache == "static"``: ``k`` is (a prefix
    view of) a fixed buffer that already holds ``new_k`` at ``positions``; ``"dynamic"``: ``k = cat(past_k,
    new_k)`` along positions (``past_k`` may be empty at the first step). ``prefetched``: the ticket of this site's
    ``dsc::site_predict`` (offload with next-layer prediction), else None. ``new_v`` (offloaded caches whose
    device tensors the rewrite made placeholders: :func:`kv_placeholder`, :func:`kv_buffer_placeholder`): ``k``/``v``
    carry the shape only; this step's rows are ``new_k``/``new_v`` and every other row lives in the host store.
    """
    spec = SITES[site]
    placeholder = new_v is not None
    if cache == "dynamic" and not placeholder and store.should_stay_dense(spec, past_k):  # rebuilt each step
        store.STATS["dense_calls"] += 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1]).contiguous()
    if placeholder and cache == "static":
        _check_in_bounds(positions, k.shape[2])
    if cache == "static":
        entry = store.labels_static(spec.label, k, new_k, positions, rebuild=not placeholder)
        new_positions = positions
    else:
        entry = store.labels_dynamic(spec.label, k, past_k, new_k, rebuild=not placeholder)
        new_positions = None
    host = None
    fresh = spec.offload and entry.host is None  # the host store starts with this call's rows
    if spec.offload:  # the rows this call wrote, for the host store
        if new_positions is None:
            new_positions = torch.arange(k.shape[2] - new_k.shape[2], k.shape[2], device=k.device)
        host = offload.host_kv(entry, k, v, new_positions, (new_k, new_v) if placeholder else None)
    predicted = offload.take_prediction(site) if prefetched is not None else None
    b, hq, lq, _ = q.shape
    s = k.shape[2]
    hkv = k.shape[1]
    if placeholder and (lq > 1 or s < spec.min_length):  # a step that attends densely: over real rows
        k, v = host.device_rows(s, new_positions, new_k, new_v, q.device, fresh)
    if (lq > 1 and spec.dense_prefill) or s < spec.min_length or s == 0:
        store.STATS["dense_calls"] += 1
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                             enable_gqa=hq != hkv)
        return out.contiguous()
    valid, bias = _valid_from_mask(attn_mask)
    if is_causal:
        valid = _causal_valid(lq, s, q.device)
    group = _group(spec, valid)
    data, sc, zero = entry.view(s, spec.label.bits)
    store.STATS["sparse_calls"] += 1
    channels = spec.label.on(q.device)
    if host is not None and lq == 1:
        use_prediction = predicted is not None and new_positions.dim() == 1
        own = None
        if not use_prediction or offload.MEASURE_OVERLAP:
            scores = torch.ops.dsc.label_scores(q, channels, data, sc, zero, spec.label.bits, valid, None, group)
            own = _select(torch.ops.dsc.select_topk(scores, spec.budget, spec.frac, spec.sink, spec.recent))
            if use_prediction:
                offload.count_overlap(predicted[0], own, new_positions)
        rows_now = (new_k, new_v) if placeholder else None
        if use_prediction:
            return offload.attend(host, q, k, v, None, new_positions, scale, bias, predicted, rows_now).contiguous()
        return offload.attend(host, q, k, v, own, new_positions, scale, bias, new_rows=rows_now).contiguous()
    out = _ds_decode(q, k, v, channels, data, sc, zero, spec.label.bits, valid, bias, None,
                     spec.budget, spec.frac, spec.sink, spec.recent, group, scale)
    return out.contiguous()


def _check_in_bounds(positions: Tensor, capacity: int) -> None:
    """The bounds check of the static cache write the rewrite dropped (offload placeholders): writing past
    ``max_cache_len`` is an error, as in the plain model. Free on the CPU; on a GPU a device-side assert."""
    if positions.device.type == "cpu":
        if positions.numel() and int(positions.max()) >= capacity:
            raise IndexError(f"dsparse offload: writing position {int(positions.max())} into a static KV cache of "
                             f"{capacity} positions (max_cache_len): the sequence outgrew its cache; allocate a "
                             "longer static cache")
    else:
        torch._assert_async((positions < capacity).all())


def _group(spec: SiteSpec, valid: Optional[Tensor]) -> bool:
    """Group selection drops a position unless every head of the group may see it; with a per-head mask that
    would not be exact, so such calls select per query head."""
    return spec.group and (valid is None or valid.dim() < 3 or valid.shape[-3] == 1)


@site_attention.register_fake
def _(site, q, k, v, past_k, new_k, positions, attn_mask, is_causal, scale, cache, prefetched=None, new_v=None):
    b, hq, lq, _ = q.shape
    return q.new_empty((b, hq, lq, v.shape[-1]))


def _kv_placeholder(past: Optional[Tensor], new: Tensor) -> Tensor:
    """What an offloaded dynamic cache holds on the device instead of ``cat([past, new], dim=-2)``: a tensor of that
    shape whose every element is one stored NaN (stride 0), so HF's bookkeeping (lengths, masks) sees the right
    shape while the rows live in the host store. Its values are never read."""
    p = past.shape[2] if past is not None and past.dim() == 4 else 0
    b, h, t, d = new.shape
    return _one_element((b, h, p + t, d), new.dtype, new.device)


def _kv_buffer_placeholder(size: list[int], dtype: Optional[torch.dtype], device: Optional[torch.device]) -> Tensor:
    """What an offloaded static cache holds instead of its ``zeros(size)`` buffer: that shape, one stored NaN."""
    return _one_element(size, dtype, device)


def _one_element(size, dtype, device) -> Tensor:
    """A tensor of ``size`` whose elements are all one stored NaN (stride 0): the shape, without the memory. NaN,
    not zero: a cache handed back to the user and read by the plain model yields NaN, never plausible garbage."""
    return torch.full((1, 1, 1, 1), float("nan"), dtype=dtype, device=device).expand(size)


# The real and the fake kernels are the same function: it allocates one element.
kv_placeholder = torch.library.custom_op("dsc::kv_placeholder", _kv_placeholder, mutates_args=())
kv_placeholder.register_fake(_kv_placeholder)
kv_buffer_placeholder = torch.library.custom_op("dsc::kv_buffer_placeholder", _kv_buffer_placeholder,
                                                mutates_args=())
kv_buffer_placeholder.register_fake(_kv_buffer_placeholder)


@torch.library.custom_op("dsc::site_predict", mutates_args=())
def site_predict(site: int, q_pred: Tensor, label_key: Tensor, attn_mask: Optional[Tensor], cache: str) -> Tensor:
    """Select a later site's rows from a predicted query and start fetching them (offload with prediction).

    ``label_key``: the tensor the site's label entry is filed under (the static buffer, or the dynamic cache's
    past K). Only decode steps predict; the current token is left out (its label is written by the site itself,
    which attends it from the device). Returns a ticket (an empty tensor) the site op consumes, which orders the
    two ops; the selection and the fetched rows wait in :func:`dsc.passes.offload.take_prediction`.
    """
    spec = SITES[site]
    if q_pred.shape[2] == 1:
        entry = store.lookup(spec.label, label_key)
        if entry is not None and entry.host is not None and entry.length:
            n = entry.length if cache == "dynamic" else label_key.shape[2]
            if cache == "static":
                store.ensure_capacity(spec.label, entry, label_key, n)  # a longer view of a placeholder buffer
            valid, _ = _valid_from_mask(attn_mask)
            if valid is not None or cache == "dynamic":
                valid = offload.previous_tokens(valid, n, current_is_last=cache == "static")
                data, sc, zero = entry.view(n, spec.label.bits)
                channels = spec.label.on(q_pred.device)
                scores = torch.ops.dsc.label_scores(q_pred, channels, data, sc, zero, spec.label.bits, valid, None,
                                                    _group(spec, valid))
                idx = torch.ops.dsc.select_topk(scores, spec.budget, spec.frac, spec.sink, spec.recent)
                offload.prefetch(site, entry.host, idx, q_pred.device)
    return q_pred.new_empty((0,), dtype=torch.int64)


@site_predict.register_fake
def _(site, q_pred, label_key, attn_mask, cache):
    return q_pred.new_empty((0,), dtype=torch.int64)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
