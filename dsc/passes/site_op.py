"""``dsc::site_attention``: the op the rewrite puts in place of a decoder's SDPA, and its run-time strategies.

One opaque op per attention site does both halves of Double Sparsity at run time: it keeps the site's label
cache in sync with the KV cache (the runtime's :class:`dsc.passes.store.LabelStore`) and then attends with one
strategy, chosen by host-side shape facts only:

- :func:`attend_dense`: SDPA over the cache (a prefill under the dense-prefill policy, a cache shorter than
  ``min_length``, a site whose labels keep being rebuilt);
- :func:`attend_device_sparse`: ``dsc::ds_decode`` (label scores -> top-k -> sparse attention) on the device;
  on the CPU, a static-cache decode step that continues its sequence takes :func:`planned_decode` instead (the
  same kernels, the arguments checked once per signature);
- :func:`attend_offload_sync`: select with the site's own query, fetch the rows from the host store;
- :func:`attend_offload_predicted`: attend over the rows ``dsc::site_predict`` fetched during the layer before.

One op rather than a separate label write keeps ordering explicit (it consumes the post-write cache value, so
inductor can keep the cache update in place) and cannot be dead-code eliminated (its output is the attention
output). Its arguments are built and read through :class:`SiteCall` (no positional arithmetic); the first two
are the runtime's key and the site's index in the runtime's table (:mod:`dsc.passes.runtime`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Optional

import torch
from torch import Tensor

import dsc.kernels  # noqa: F401  (registers torch.ops.dsc.*)
from dsc.attention_mask import causal_valid, valid_from_mask
from dsc.kernels import checks, native
from dsc.kernels.ops import define_op, register_fake

from . import offload
from .runtime import Runtime, SiteSpec, lookup
from .store import Entry


@dataclass
class SiteCall:
    """The arguments of ``dsc::site_attention``, by name: graph nodes in the rewrite, tensors at run time.

    ``k``/``v``: KV-native ``[B, Hkv, S, D]`` as SDPA would read them; ``cache == "static"``: ``k`` is (a prefix
    view of) a fixed buffer that already holds ``new_k`` at ``positions``; ``"dynamic"``: ``k = cat(past_k,
    new_k)`` along positions (``past_k`` may be empty at the first step). ``prefetched``: the ticket of this site's
    ``dsc::site_predict`` (offload with next-layer prediction), else None. ``new_v`` (offloaded caches whose
    device tensors the rewrite made placeholders): ``k``/``v`` carry the shape only; this step's rows are
    ``new_k``/``new_v`` and every other row lives in the host store."""

    runtime: int
    site_index: int
    q: Any
    k: Any
    v: Any
    past_k: Any
    new_k: Any
    positions: Any
    attn_mask: Any
    is_causal: bool
    scale: float
    cache: str
    prefetched: Any = None
    new_v: Any = None

    def args(self) -> tuple:
        """The op's positional arguments."""
        return tuple(getattr(self, f.name) for f in fields(self))

    @classmethod
    def of(cls, node) -> "SiteCall":
        """The call a ``dsc::site_attention`` graph node makes."""
        return cls(*node.args)

    def put(self, node) -> None:
        """Make ``node`` call the op with these arguments."""
        node.args = self.args()

    @property
    def placeholder(self) -> bool:
        """``k``/``v`` are offload placeholders (shape only; the rows are in the host store and ``new_k/new_v``)."""
        return self.new_v is not None


@dataclass
class Step:
    """What label sync hands the strategies: the label entry, the host store (offload), this step's positions."""

    entry: Entry
    host: Optional[offload.HostKV]
    new_positions: Optional[Tensor]
    fresh: bool  # the host store began with this step's rows


def site_attention_body(runtime: int, site_index: int, q: Tensor, k: Tensor, v: Tensor, past_k: Optional[Tensor],
                        new_k: Tensor, positions: Optional[Tensor], attn_mask: Optional[Tensor], is_causal: bool,
                        scale: float, cache: str, prefetched: Optional[Tensor] = None,
                        new_v: Optional[Tensor] = None) -> Tensor:
    """Keep the site's labels in sync with the K cache, then attend (sparse at decode, dense otherwise). The
    arguments are :class:`SiteCall`'s."""
    call = SiteCall(runtime, site_index, q, k, v, past_k, new_k, positions, attn_mask, is_causal, scale, cache,
                    prefetched, new_v)
    rt = lookup(runtime)
    spec = rt.sites[site_index]
    if q.is_cuda and torch.cuda.is_current_stream_capturing():
        _check_graph_safe(spec, call)
    if call.cache == "static" and not spec.offload and not rt.labels.device_sync:
        out = planned_decode(rt, site_index, spec, call)
        if out is not None:
            return out
    if call.cache == "dynamic" and not call.placeholder and rt.labels.should_stay_dense(spec.label, past_k,
                                                                                        spec.layer):
        return attend_dense(rt, call, k, v)
    step = sync_labels(rt, spec, call)
    predicted = rt.predictions.pop(site_index, None) if prefetched is not None else None
    lq, s = q.shape[2], k.shape[2]
    if lq > 1 or s < spec.min_length:
        if call.placeholder:  # a step that attends densely, or a sparse prefill, over real rows
            k, v = step.host.device_rows(s, step.new_positions, new_k, call.new_v, q.device, step.fresh)
        if (lq > 1 and spec.dense_prefill) or s < spec.min_length:
            return attend_dense(rt, call, k, v)
    if s == 0:
        return attend_dense(rt, call, k, v)
    rt.stats["sparse_calls"] += 1
    if step.host is None or lq > 1:
        return attend_device_sparse(spec, call, step.entry, k, v, host_reads=not rt.labels.device_sync)
    if predicted is not None and step.new_positions.dim() == 1:
        return attend_offload_predicted(rt, spec, call, step, predicted)
    return attend_offload_sync(spec, call, step)


# The op; its body stays reachable by name (tests/test_graph_replay.py runs it as a CUDA graph recording would:
# the host code once, the ops it launches recorded).
site_attention = define_op("site_attention")(site_attention_body)


@register_fake("site_attention")
def _(runtime, site_index, q, k, v, past_k, new_k, positions, attn_mask, is_causal, scale, cache, prefetched=None,
      new_v=None):
    b, hq, lq, _ = q.shape
    return q.new_empty((b, hq, lq, v.shape[-1]))


def sync_labels(rt: Runtime, spec: SiteSpec, call: SiteCall) -> Step:
    """Bring the site's labels (and, with offload, its host store) up to date with this step's K/V."""
    if call.cache == "static":
        if call.placeholder:
            _check_in_bounds(call.positions, call.k.shape[2])
        entry = rt.labels.static(spec.label, call.k, call.new_k, call.positions, rebuild=not call.placeholder)
        new_positions = call.positions
    else:
        entry = rt.labels.dynamic(spec.label, call.k, call.past_k, call.new_k, rebuild=not call.placeholder)
        new_positions = None
    if not spec.offload:
        return Step(entry, None, new_positions, False)
    if new_positions is None:  # the rows this call wrote, for the host store
        s = call.k.shape[2]
        new_positions = torch.arange(s - call.new_k.shape[2], s, device=call.k.device)
    fresh = entry.host is None
    new_rows = (call.new_k, call.new_v) if call.placeholder else None
    host = offload.host_kv(entry, call.k, call.v, new_positions, new_rows, rt.stats, rt.zero_copy)
    return Step(entry, host, new_positions, fresh)


def attend_dense(rt: Runtime, call: SiteCall, k: Tensor, v: Tensor) -> Tensor:
    """Exact attention over ``k``/``v`` (KV-native), as the model would have computed it."""
    rt.stats["dense_calls"] += 1
    return torch.ops.dsc.dense_attention(call.q, k, v, call.attn_mask, call.is_causal, call.scale)


def _selection_inputs(spec: SiteSpec, call: SiteCall, s: int):
    """``(valid, bias, group)`` for the selection ops: the mask as validity + additive bias, and whether the
    selection may be per KV group (group selection drops a position unless every head of the group may see it;
    with a per-head mask that would not be exact, so such calls select per query head)."""
    valid, bias = valid_from_mask(call.attn_mask)
    if call.is_causal:
        valid = causal_valid(call.q.shape[2], s, call.q.device)
    return valid, bias, _selects_per_group(spec, valid)


def _selects_per_group(spec: SiteSpec, valid: Optional[Tensor]) -> bool:
    """Per KV group when configured and the mask is the same for every head (else per query head: exact)."""
    return spec.group and (valid is None or valid.dim() < 3 or valid.shape[-3] == 1)


def attend_device_sparse(spec: SiteSpec, call: SiteCall, entry: Entry, k: Tensor, v: Tensor,
                         host_reads: bool = True) -> Tensor:
    """Double Sparsity on the device: label scores -> top-k -> attention over the selected rows, one op. With
    ``host_reads`` a CPU mask that is a valid prefix trims the scan (:func:`_valid_prefix`)."""
    valid, bias, group = _selection_inputs(spec, call, k.shape[2])
    s = k.shape[2]
    if host_reads:
        s, valid, bias = _valid_prefix(valid, bias, s)
    return _ds_decode(*_decode_args(spec, call, entry, k, v, s, valid, bias, group)).contiguous()


def _decode_args(spec: SiteSpec, call: SiteCall, entry: Entry, k: Tensor, v: Tensor, n: int, valid, bias,
                 group: bool) -> tuple:
    """``dsc::ds_decode``'s arguments over the first ``n`` positions of ``k``/``v`` and of the site's labels."""
    bits, sel = spec.label.bits, spec.selection
    data, sc, zero = entry.view(n, bits)
    return (call.q, k[:, :, :n], v[:, :, :n], spec.label.on(call.q.device), data, sc, zero, bits, valid, bias, None,
            sel.budget_tokens, sel.budget_frac, sel.sink, sel.recent, group, call.scale)


def planned_decode(rt: Runtime, site_index: int, spec: SiteSpec, call: SiteCall) -> Optional[Tensor]:
    """The CPU decode step of a static cache that continues its sequence, planned: what :func:`sync_labels` and
    :func:`attend_device_sparse` do for it, with the native label write and decode kernel called directly, the ops'
    checks having passed once for the step's signature (the site's plan, kept in ``rt.plans``). None for any other
    step (a first sight, a rewind, a mask that is not a prefix, several query positions, another device), which
    takes the general path.

    Why: between two kernels that evict the interpreter's working set, the general path's Python (the ops'
    dispatch and checks, the mask and position reads, the store's bookkeeping) cost about as much as the kernel
    itself at short contexts (DESIGN.md, "CPU decode")."""
    q, k, positions = call.q, call.k, call.positions
    if (q.shape[2] != 1 or q.device.type != "cpu" or call.is_causal or positions is None
            or positions.shape != (1,) or positions.device.type != "cpu" or k.shape[2] < spec.min_length):
        return None
    p = int(positions)
    entry = rt.labels.continuing(spec.label, k, p)
    if entry is None:
        return None
    n, valid, bias = _valid_prefix(*valid_from_mask(call.attn_mask), k.shape[2])
    if n != p + 1 or valid is not None or bias is not None:
        return None
    args = _decode_args(spec, call, entry, k, call.v, n, None, None, spec.group)
    # what the plan checked and packed: the buffers' addresses (alive: this call's, the entry's, the channels the
    # plan holds), layouts and the selection's values
    signature = (q.shape, q.stride(), q.dtype, k.data_ptr(), k.shape, k.stride(), k.dtype, call.v.data_ptr(),
                 call.v.shape, call.v.stride(), call.new_k.shape, call.new_k.stride(), entry.data.data_ptr(),
                 entry.scale.data_ptr(), entry.zero.data_ptr(), args[3].data_ptr(), args[7], args[10:])
    plan = rt.plans.get(site_index)
    if plan is None or plan[0] != signature:
        plan = rt.plans[site_index] = (signature, _plan(call, entry, args))
    if plan[1] is None:
        return None
    rt.labels.append_planned(spec.label, entry, call.new_k, positions, k.shape[2])
    out = _ds_decode(*args, planned=plan[1], check_row=p - 1)
    if out is not None:
        rt.stats["sparse_calls"] += 1
    return out  # None: the row before p no longer holds what was labelled; the general path rebuilds


def _plan(call: SiteCall, entry: Entry, args: tuple) -> Optional[native.Decode]:
    """Validate a planned decode step's label write and ``args`` (:func:`_decode_args`) as the ops would (raising
    what they raise); the native kernel's call over the whole buffers (a step passes its length), or None when the
    native kernels do not take such steps."""
    q, k, v, channels, data, sc, zero, bits, valid, bias, lengths, budget, frac, sink, recent, group, scale = args
    checks.check_label_write(call.new_k, channels, call.positions, entry.data, entry.scale, entry.zero, bits)
    checks.check_ds_decode(q, k, v, channels, data, sc, zero, bits, valid, bias, lengths, budget, frac, sink, recent,
                           scale)
    if not (native.writes(call.new_k, call.positions, entry.data, entry.scale, entry.zero, bits)
            and native.covers(q, k, v, data, sc, zero, bits, valid, bias)):
        return None
    return native.Decode(q, call.k, call.v, channels, *entry.view(call.k.shape[2], bits), bits, None, budget, frac,
                         sink, recent, group, scale)


def _valid_prefix(valid: Optional[Tensor], bias: Optional[Tensor], s: int):
    """``(n, valid, bias)``: when every row may see exactly the positions ``[0, n)`` under a mask shared by the
    heads and query rows (a decode step over a static cache: the buffer past the current token is masked), the
    first ``n`` positions with no mask (a zero bias dropped too): the same selection and attention, without a
    scan of the unused buffer or a mask pass. Read on the host only for CPU masks (free there); else unchanged."""
    if valid is None or valid.device.type != "cpu" or valid.dim() != 4 or valid.shape[1:3] != (1, 1):
        return s, valid, bias
    rows = valid.numpy()[:1 if valid.stride(0) == 0 else None, 0, 0]  # [B or 1, S]; numpy: us, where torch: ~40
    n = int(rows[0].sum())
    if n == 0 or not rows[:, :n].all() or rows[:, n:].any():
        return s, valid, bias
    if bias is not None:
        bias = bias[..., :n]
        bias = None if bool((bias == 0).all()) else bias
    return n, None, bias


def _select(spec: SiteSpec, q: Tensor, entry: Entry, n: int, valid, group: bool) -> Tensor:
    """The top-k positions ``[B, Hsel, Lq, K]`` of ``q`` over the first ``n`` labels of ``entry``."""
    data, sc, zero = entry.view(n, spec.label.bits)
    sel = spec.selection
    scores = torch.ops.dsc.label_scores(q, spec.label.on(q.device), data, sc, zero, spec.label.bits, valid, None,
                                        group)
    return torch.ops.dsc.select_topk(scores, sel.budget_tokens, sel.budget_frac, sel.sink, sel.recent)


def attend_offload_sync(spec: SiteSpec, call: SiteCall, step: Step) -> Tensor:
    """Offload, selecting with the site's own query: the selected rows come from the host store (this step's
    rows from the device)."""
    valid, bias, group = _selection_inputs(spec, call, call.k.shape[2])
    idx = _select(spec, call.q, step.entry, call.k.shape[2], valid, group)
    new_rows = (call.new_k, call.new_v) if call.placeholder else None
    return offload.attend(step.host, call.q, call.k, call.v, idx, step.new_positions, call.scale, bias,
                          new_rows=new_rows).contiguous()


def attend_offload_predicted(rt: Runtime, spec: SiteSpec, call: SiteCall, step: Step, predicted: tuple) -> Tensor:
    """Offload over the rows fetched ahead from a predicted query, plus this step's rows from the device. With
    ``measure_overlap``, also select with the site's own query and count how much of it the prediction held."""
    valid, bias, group = _selection_inputs(spec, call, call.k.shape[2])
    if rt.measure_overlap:
        own = _select(spec, call.q, step.entry, call.k.shape[2], valid, group)
        offload.count_overlap(rt.stats, predicted[0], own, step.new_positions)
    new_rows = (call.new_k, call.new_v) if call.placeholder else None
    return offload.attend(step.host, call.q, call.k, call.v, None, step.new_positions, call.scale, bias, predicted,
                          new_rows).contiguous()


def _ds_decode(q, k, v, channels, data, scale, zero, bits, valid, bias, lengths, budget, frac, sink, recent, group,
               sm_scale, planned: Optional[native.Decode] = None, check_row: int = -1):
    """The sparse kernel (a plain function so tests can observe the selection by patching it): the op, or
    ``planned`` (the native call a site's plan packed for these arguments' buffers, :func:`planned_decode`) over
    the first ``k.shape[2]`` positions, which first checks the labels of ``check_row`` (None when they are stale)."""
    if planned is not None:
        return planned.run(q, k.shape[2], checks.topk_width(k.shape[2], budget, frac), check_row)
    return torch.ops.dsc.ds_decode(q, k, v, channels, data, scale, zero, bits, valid, bias, lengths, budget, frac,
                                   sink, recent, group, sm_scale)


def _check_graph_safe(spec: SiteSpec, call: SiteCall) -> None:
    """Refuse, during CUDA graph capture, a step whose label bookkeeping is host-side (a replay would skip it and
    decode with stale labels): dynamic caches (labels follow the ``cat`` chain by address), offload (host stores,
    fetches), and static writes at per-sequence ``[B, T]`` positions."""
    why = ("a dynamic KV cache (use a static cache: cache_implementation='static')" if call.cache == "dynamic" else
           "offload" if spec.offload else
           "per-sequence cache positions [B, T]" if call.positions is not None and call.positions.dim() != 1 else None)
    if why:
        raise RuntimeError(f"dsparse: a CUDA graph is being recorded over a step with {why}, whose label bookkeeping "
                           "runs on the host and would be skipped by every replay; compile without "
                           "mode='reduce-overhead' for it")


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


# ------------------------------------------------------------------------------------- next-layer prediction
@define_op("site_predict")
def site_predict(runtime: int, site_index: int, q_pred: Tensor, label_key: Tensor, attn_mask: Optional[Tensor],
                 cache: str) -> Tensor:
    """Select a later site's rows from a predicted query and start fetching them (offload with prediction).

    ``label_key``: the tensor the site's label entry is filed under (the static buffer, or the dynamic cache's
    past K). Only decode steps predict; the current token is left out (its label is written by the site itself,
    which attends it from the device). Returns a ticket (an empty tensor) the site op consumes, which orders the
    two ops; the selection and the fetched rows wait in the runtime's ``predictions``.
    """
    rt = lookup(runtime)
    spec = rt.sites[site_index]
    entry = rt.labels.lookup(spec.label, label_key) if q_pred.shape[2] == 1 else None
    valid, _ = valid_from_mask(attn_mask)
    if entry is not None and entry.host is not None and entry.length and (valid is not None or cache == "dynamic"):
        n = entry.length if cache == "dynamic" else label_key.shape[2]
        if cache == "static":
            rt.labels.ensure_capacity(spec.label, entry, label_key, n)  # a longer view of a placeholder buffer
        valid = offload.previous_tokens(valid, n, current_is_last=cache == "static")
        idx = _select(spec, q_pred, entry, n, valid, _selects_per_group(spec, valid))
        rt.predictions[site_index] = offload.prefetch(entry.host, idx, q_pred.device)
    return q_pred.new_empty((0,), dtype=torch.int64)


@register_fake("site_predict")
def _(runtime, site_index, q_pred, label_key, attn_mask, cache):
    return q_pred.new_empty((0,), dtype=torch.int64)


# ------------------------------------------------------------------------------------- offload placeholders
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
for _name, _fn in (("kv_placeholder", _kv_placeholder), ("kv_buffer_placeholder", _kv_buffer_placeholder)):
    define_op(_name)(_fn)
    register_fake(_name)(_fn)
del _name, _fn


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
