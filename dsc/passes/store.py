"""The label store: label caches that live beside the KV cache, outside the compiled graph.

Why a side store: a pre-grad pass cannot add buffers to a Dynamo graph (AOTAutograd rejects them), so the labels
are owned by the opaque ``dsc::site_attention`` op (see :mod:`dsc.passes.ops`) and looked up at run time by the
identity of the K tensor the op receives:

- static caches (``index_copy_`` into a fixed buffer): keyed by the buffer's address, valid while its storage
  lives (a weakref finalizer drops the labels with the cache). Prefill and decode graphs, and any number of
  models, caches and batch sizes, find their own entry; a new sequence in a reused cache overwrites positions.
- dynamic caches (``torch.cat(past, new)`` each step): the entry follows the chain: it is found under the
  previous step's K (``past``), checked (same address, length and batch), extended with the new tokens and
  re-keyed under the new K. Anything out of sync (a cache touched outside the compiled graph, cropped, reordered
  by beam search, copied, or a sliding window) misses, and the labels are rebuilt from ``past`` itself, so a
  wrong label is never used; :data:`STATS` counts rebuilds so steady-state tests can assert there are none.

All bookkeeping is host-side metadata (addresses, shapes): no device synchronisation.
"""
from __future__ import annotations

import threading
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass

import torch

# label_writes (kernel calls), label_builds (whole caches labelled: first sight or rebuild), label_rebuilds
# (out of sync), sparse_calls, dense_calls (inside rewritten sites), entries_freed
STATS: Counter = Counter()
_LOCK = threading.RLock()  # re-entrant: a finalizer may fire while the lock is held


@dataclass(frozen=True)
class LabelSpec:
    """What a label is: the channels of one layer under one config, and its format."""

    channels: torch.Tensor  # int64 [Hkv, r] (CPU master copy)
    bits: int

    def on(self, device: torch.device) -> torch.Tensor:
        return _channels_on(self, device)


_CHANNELS_CACHE: dict[tuple[int, str], torch.Tensor] = {}


def _channels_on(spec: LabelSpec, device) -> torch.Tensor:
    key = (id(spec), str(device))
    t = _CHANNELS_CACHE.get(key)
    if t is None:
        t = _CHANNELS_CACHE[key] = spec.channels.to(device)
    return t


class Entry:
    """One label cache: ``data``/``scale``/``zero`` with ``capacity`` positions, ``length`` of them written;
    ``host``: the layer's K/V rows in host memory when the site offloads (:mod:`dsc.passes.offload`)."""

    __slots__ = ("data", "scale", "zero", "capacity", "length", "batch", "key", "host", "next", "__weakref__")

    def __init__(self, spec: LabelSpec, like: torch.Tensor, capacity: int):
        from dsc.kernels import alloc_labels

        b, hkv = like.shape[0], like.shape[1]
        r = spec.channels.shape[1]
        self.data, self.scale, self.zero = alloc_labels(b, hkv, capacity, r, spec.bits, dtype=like.dtype,
                                                        device=like.device)
        self.capacity, self.length, self.batch, self.key, self.host = capacity, 0, b, None, None
        self.next = None  # static caches: the position a continuing step writes next (None: not known)

    def view(self, s: int, bits: int):
        """The first ``s`` positions, as the kernels want them (``scale``/``zero`` stay ``[0]`` at 16 bits)."""
        if bits == 16:
            return self.data[:, :, :s], self.scale, self.zero
        return self.data[:, :, :s], self.scale[:, :, :s], self.zero[:, :, :s]

    def grow(self, spec: LabelSpec, like: torch.Tensor, capacity: int) -> None:
        old = (self.data, self.scale, self.zero)
        fresh = Entry(spec, like, capacity)
        n = self.length
        fresh.data[:, :, :n].copy_(old[0][:, :, :n])
        if spec.bits != 16:
            fresh.scale[:, :, :n].copy_(old[1][:, :, :n])
            fresh.zero[:, :, :n].copy_(old[2][:, :, :n])
        self.data, self.scale, self.zero, self.capacity = fresh.data, fresh.scale, fresh.zero, capacity


# (id(spec), address of K's first element) -> Entry
_ENTRIES: dict[tuple[int, int], Entry] = {}


def _key(spec: LabelSpec, t: torch.Tensor) -> tuple[int, int]:
    return (id(spec), t.data_ptr())


def _bind(spec: LabelSpec, t: torch.Tensor, entry: Entry) -> None:
    """File ``entry`` under ``t``'s address; it is dropped when ``t``'s storage is freed."""
    key = _key(spec, t)
    entry.key = key
    _ENTRIES[key] = entry
    ref = weakref.ref(entry)
    weakref.finalize(t.untyped_storage(), _drop, key, ref)


def _drop(key, ref) -> None:
    with _LOCK:
        if _ENTRIES.get(key) is not None and _ENTRIES.get(key) is ref():
            del _ENTRIES[key]
            STATS["entries_freed"] += 1


def _write(spec: LabelSpec, entry: Entry, keys: torch.Tensor, positions: torch.Tensor) -> None:
    torch.ops.dsc.label_write(keys, spec.on(keys.device), positions, entry.data, entry.scale, entry.zero, spec.bits)
    STATS["label_writes"] += 1


def _build(spec: LabelSpec, keys: torch.Tensor, capacity: int) -> Entry:
    """A fresh entry holding the labels of every position of ``keys`` (a rebuild / first sight)."""
    entry = Entry(spec, keys, capacity)
    STATS["label_builds"] += 1
    s = keys.shape[2]
    if s:
        _write(spec, entry, keys, torch.arange(s, device=keys.device))
    entry.length = s
    return entry


def _static_capacity(k: torch.Tensor) -> int:
    """The full extent of the static buffer ``k`` is a prefix view of (from its strides), else its length."""
    s, d = k.shape[2], k.shape[3]
    if k.stride(3) == 1 and k.stride(2) == d and k.shape[1] > 0 and k.stride(1) % d == 0:
        return max(s, k.stride(1) // d)
    return s


_MISSES: dict[int, int] = {}  # id(spec) -> consecutive first-sight builds of a static cache
_MISS_WARN = 4


def _note_static_miss(spec: LabelSpec) -> None:
    n = _MISSES[id(spec)] = _MISSES.get(id(spec), 0) + 1
    if n == _MISS_WARN:
        warnings.warn(
            "dsparse: a static KV cache reaches the attention op as a new tensor on every step, so its labels are "
            "rebuilt each time (correct, but slow): the cache is replaced between steps, e.g. beam search reorders "
            "it (index_select makes a copy) or the 'aot_eager' inner compiler copies it (inductor updates it in "
            "place). Use a dynamic cache for beam search.", RuntimeWarning, stacklevel=3)


_PLACEHOLDER_HINT = (", and the device holds only a placeholder. Start from a fresh cache, or compile without "
                     "offload for such use.")


def ensure_capacity(spec: LabelSpec, entry: Entry, like: torch.Tensor, n: int) -> None:
    """Grow ``entry`` to hold ``n`` positions. A placeholder buffer (stride 0) does not reveal its full length, so
    its labels start at the length first seen and grow when a longer view of it arrives."""
    with _LOCK:
        if entry.capacity < n:
            entry.grow(spec, like, max(n, 2 * entry.capacity))


def labels_static(spec: LabelSpec, k: torch.Tensor, new_k: torch.Tensor, positions: torch.Tensor,
                  rebuild: bool = True) -> Entry:
    """Labels of a static cache ``k`` (already holding ``new_k`` at ``positions``): write only the new tokens;
    on first sight of the buffer (or a changed shape) label all of ``k``. ``rebuild=False`` (``k`` is an offload
    placeholder): a first sight must be the buffer's first write (from position 0), labelled from ``new_k``.

    A step that neither starts a sequence (position 0) nor continues the last one is checked against the cache:
    rows written outside the compiled model (an eager prefill into a reused cache) make the labels stale, and they
    are rebuilt from ``k`` (or, over a placeholder, refused)."""
    with _LOCK:
        entry = _ENTRIES.get(_key(spec, k))
        if not rebuild and entry is not None and entry.batch == k.shape[0]:
            ensure_capacity(spec, entry, k, k.shape[2])  # a longer prefix view of a placeholder buffer
        if entry is None or entry.batch != k.shape[0] or entry.capacity < k.shape[2]:
            if entry is not None:
                STATS["label_rebuilds"] += 1
            _note_static_miss(spec)
            if rebuild:
                entry = _build(spec, k, _static_capacity(k))
            else:
                if int(positions.min()) != 0:  # once per sequence: the only host wait of a first sight
                    raise ValueError("dsparse offload: this static KV cache holds rows the compiled model never "
                                     "saw (it was filled elsewhere or by another model)" + _PLACEHOLDER_HINT)
                entry = Entry(spec, k, _static_capacity(k))
                STATS["label_builds"] += 1
                _write(spec, entry, new_k, positions)
                entry.length = k.shape[2]
            _bind(spec, k, entry)
            entry.next = _next_position(positions)
            return entry
        _MISSES[id(spec)] = 0
        if not _continues(spec, entry, k, positions):
            if not rebuild:
                raise ValueError("dsparse offload: this static KV cache was written outside the compiled model (e.g. "
                                 "an eager prefill into a reused cache), so its offloaded rows are not in the host "
                                 "store" + _PLACEHOLDER_HINT)
            STATS["label_rebuilds"] += 1
            del _ENTRIES[entry.key]
            entry = _build(spec, k, entry.capacity)  # its host store (offload) is copied afresh from k too
            _bind(spec, k, entry)
        else:
            _write(spec, entry, new_k, positions)
        entry.length = max(entry.length, k.shape[2])
        entry.next = _next_position(positions)
        return entry


def _next_position(positions: torch.Tensor) -> int | None:
    """The position a continuing step writes next (one position vector on the CPU; else None: not tracked)."""
    if positions.dim() == 1 and positions.device.type == "cpu" and positions.numel():
        return int(positions[-1]) + 1
    return None


def _continues(spec: LabelSpec, entry: Entry, k: torch.Tensor, positions: torch.Tensor) -> bool:
    """Whether the entry's labels still describe ``k`` before this step's ``positions``. A step from position 0
    (a new sequence) or right after the last one is trusted; any other (a gap, a rewind) is checked by relabelling
    the row just before it and comparing with the stored label. Needs the first position on the host: done for
    CPU position vectors, where reading it is free (on a GPU it would be a host wait per layer and step)."""
    if positions.dim() != 1 or positions.device.type != "cpu" or not positions.numel():
        return True
    first = int(positions[0])
    if first == 0 or first == entry.next:
        return True
    if first > entry.length:  # rows in between were written elsewhere
        return False
    row = k[:, :, first - 1:first]
    probe = Entry(spec, row, 1)
    torch.ops.dsc.label_write(row, spec.on(k.device), torch.zeros(1, dtype=torch.long), probe.data, probe.scale,
                              probe.zero, spec.bits)
    pairs = [(entry.data, probe.data)] + ([(entry.scale, probe.scale), (entry.zero, probe.zero)]
                                          if spec.bits != 16 else [])
    return all(torch.equal(have[:, :, first - 1], want[:, :, 0]) for have, want in pairs)


def labels_dynamic(spec: LabelSpec, k: torch.Tensor, past_k: torch.Tensor | None, new_k: torch.Tensor,
                   rebuild: bool = True) -> Entry:
    """Labels of ``k = cat(past_k, new_k)``: continue the entry of ``past_k`` (or rebuild it from ``past_k`` when
    out of sync), append ``new_k`` and re-key the entry under ``k``. ``rebuild=False`` (``past_k`` is an offload
    placeholder, with no rows to label): out of sync is an error."""
    p = 0 if past_k is None or past_k.dim() != 4 else past_k.shape[2]
    t, s = new_k.shape[2], k.shape[2]
    if p + t != s:
        raise ValueError(f"dsparse: dynamic cache step with past length {p} + new {t} != cache length {s}")
    with _LOCK:
        entry, rebuilt = None, False
        if p:
            entry = _ENTRIES.get(_key(spec, past_k))
            if entry is not None and (entry.length != p or entry.batch != k.shape[0]):
                entry = None
            if entry is None and not rebuild:
                raise ValueError("dsparse offload: this dynamic KV cache was changed outside the compiled model "
                                 "(cropped, reordered by beam search, copied, or filled by another model), so its "
                                 "offloaded rows are not in the host store" + _PLACEHOLDER_HINT)
            if entry is None:
                STATS["label_rebuilds"] += 1
                entry, rebuilt = _build(spec, past_k, max(2 * s, 64)), True
            else:
                del _ENTRIES[entry.key]
        _note_rebuild(spec, rebuilt)
        if entry is None:
            entry = Entry(spec, k, max(2 * s, 64))
        if entry.capacity < s:
            entry.grow(spec, k, max(2 * s, 2 * entry.capacity))
        if t:
            _write(spec, entry, new_k, torch.arange(p, s, device=k.device))
        entry.length = s
        _bind(spec, k, entry)
        return entry


# A dynamic site whose labels are rebuilt on consecutive steps (its cache is replaced between steps: a sliding
# window the analysis did not recognise, beam search reordering it, a cache edited outside the model) pays a
# rebuild, which reads every key, on top of its attention: more than dense attention. After REBUILD_LIMIT such
# steps in a row the label spec (one layer of one config) attends densely until a new sequence starts (a step with
# no past), and says so once.
REBUILD_LIMIT = 2
_REBUILD_RUNS: dict[int, int] = {}  # id(spec) -> consecutive dynamic steps that rebuilt the labels
_DENSE: set[int] = set()  # id(spec): attends densely until a new sequence starts
_WARNED: set[int] = set()  # id(spec): the fallback was announced


def _note_rebuild(spec: LabelSpec, rebuilt: bool) -> None:
    """Count consecutive rebuilds of ``spec``'s dynamic labels; a step that continues (or starts) a chain resets
    the count."""
    if not rebuilt:
        _REBUILD_RUNS.pop(id(spec), None)
        return
    n = _REBUILD_RUNS[id(spec)] = _REBUILD_RUNS.get(id(spec), 0) + 1
    if n >= REBUILD_LIMIT and id(spec) not in _DENSE:
        _DENSE.add(id(spec))
        STATS["rebuild_fallbacks"] += 1


def should_stay_dense(spec, past_k: torch.Tensor | None) -> bool:
    """Whether a dynamic site should skip its labels and attend densely: its labels were rebuilt on
    ``REBUILD_LIMIT`` consecutive steps of the sequence that ``past_k`` (the cache before this step) continues.
    A step with no past starts a new sequence and gets labels again. ``spec``: the site's ``ops.SiteSpec`` (its
    ``label`` and ``layer``; the first fallback warns once, naming the layer) or a bare :class:`LabelSpec`.
    Host-side bookkeeping only."""
    label = getattr(spec, "label", spec)
    key = id(label)
    with _LOCK:
        if past_k is None or past_k.dim() != 4 or past_k.shape[2] == 0:
            _DENSE.discard(key)
            _REBUILD_RUNS.pop(key, None)
            return False
        if key not in _DENSE:
            return False
        if key not in _WARNED:
            _WARNED.add(key)
            layer = getattr(spec, "layer", None)
            where = f"layer {layer}" if layer is not None else "an attention site"
            warnings.warn(
                f"dsparse: the labels of {where} were rebuilt from its whole dynamic KV cache on {REBUILD_LIMIT} "
                "consecutive decode steps (the cache is replaced between steps: e.g. a sliding window, beam search "
                "reordering it, or edits outside the compiled model). A rebuild reads every key, more than dense "
                f"attention does, so {where} attends densely for the rest of this sequence (and of any other "
                "that does the same).", RuntimeWarning, stacklevel=2)
        return True


def lookup(spec: LabelSpec, t: torch.Tensor) -> Entry | None:
    """The entry filed under ``t`` (no side effects), for a reader that runs before the site's own op."""
    return _ENTRIES.get(_key(spec, t))


def entry_count() -> int:
    """Live label caches (tests: they go away with their KV caches)."""
    return len(_ENTRIES)
