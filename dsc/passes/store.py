"""The label store: label caches that live beside the KV cache, outside the compiled graph.

Why a side store: a pre-grad pass cannot add buffers to a Dynamo graph (AOTAutograd rejects them), so the labels
are owned by the run-time object of a compile (:class:`dsc.passes.runtime.Runtime` holds one :class:`LabelStore`)
and looked up by the identity of the K tensor the site op receives:

- static caches (``index_copy_`` into a fixed buffer): keyed by the buffer's address, valid while its storage
  lives (a weakref finalizer drops the labels with the cache). Prefill and decode graphs, and any number of
  caches and batch sizes, find their own entry; a new sequence in a reused cache overwrites positions.
- dynamic caches (``torch.cat(past, new)`` each step): the entry follows the chain: it is found under the
  previous step's K (``past``), checked (same address, length and batch), extended with the new tokens and
  re-keyed under the new K. Anything out of sync (a cache touched outside the compiled graph, cropped, reordered
  by beam search, copied, or a sliding window) misses, and the labels are rebuilt from ``past`` itself, so a
  wrong label is never used; the runtime's counters count rebuilds so steady-state tests can assert there are none.

Bookkeeping is host-side metadata (addresses, shapes), plus a check per static step that the row before it still
holds what was labelled: read on the host for CPU tensors (free there), decided on the device otherwise
(``dsc::label_sync``): no device synchronisation.
"""
from __future__ import annotations

import threading
import warnings
import weakref
from collections import Counter
from dataclasses import dataclass, field

import torch

from dsc.kernels import alloc_labels, label_prefix, native


@dataclass(frozen=True, eq=False)
class LabelSpec:
    """What a label is: the channels of one layer under one config, and its format. Compared by identity: a
    runtime makes one per (layer, config), and its label caches are filed under it."""

    channels: torch.Tensor  # int64 [Hkv, r] (CPU master copy)
    bits: int
    _on_device: dict = field(default_factory=dict, repr=False)  # device -> channels there (a copy made once)

    def on(self, device: torch.device) -> torch.Tensor:
        key = str(device)
        t = self._on_device.get(key)
        if t is None:
            t = self._on_device[key] = outside_graph_pool(lambda: self.channels.to(device), device)
        return t


def outside_graph_pool(make, device: torch.device):
    """``make()``'s tensors, allocated where no CUDA graph memory pool can claim them. Label caches are created
    by the first call of a compiled graph, which inductor's CUDA graph trees run with every allocation of this
    thread routed to the graphs' private pool, whose blocks a later recording may reuse while the labels still
    live; a short-lived thread allocates from the ordinary pool instead (then the caller's stream waits for it,
    and the tensors record that stream, so their memory is not reused before its work is done). Elsewhere:
    ``make()``."""
    if device.type != "cuda":
        return make()
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("dsparse: a label cache would be created during CUDA graph capture (a static KV cache "
                           "first seen in a recording, not in its warm-up run); run one step without CUDA graphs "
                           "first, or compile without mode='reduce-overhead'")
    made: list = []

    def work():
        try:
            with torch.cuda.device(device):
                made.append(make())
                torch.cuda.current_stream().synchronize()  # the zero fill is done before another stream reads it
        except BaseException as e:  # handed to the caller's thread
            made.append(e)

    worker = threading.Thread(target=work, name="dsc-label-alloc")
    worker.start()
    worker.join()
    out = made[0]
    if isinstance(out, BaseException):
        raise out
    for t in out if isinstance(out, tuple) else (out,):
        t.record_stream(torch.cuda.current_stream(device))
    return out


class Entry:
    """One label cache: ``data``/``scale``/``zero`` with ``capacity`` positions, ``length`` of them written;
    ``host``: the layer's K/V rows in host memory when the site offloads (:mod:`dsc.passes.offload`)."""

    __slots__ = ("data", "scale", "zero", "state", "capacity", "length", "batch", "key", "host", "next", "probe",
                 "__weakref__")

    def __init__(self, label: LabelSpec, like: torch.Tensor, capacity: int):
        b, hkv = like.shape[0], like.shape[1]
        r = label.channels.shape[1]

        def make():
            return (*alloc_labels(b, hkv, capacity, r, label.bits, dtype=like.dtype, device=like.device),
                    torch.zeros(b, hkv, 2, dtype=torch.int64, device=like.device))

        self.data, self.scale, self.zero, self.state = outside_graph_pool(make, like.device)
        self.capacity, self.length, self.batch, self.key, self.host = capacity, 0, b, None, None
        self.next = None  # static caches: the position a continuing step writes next (None: not known)
        self.probe = None  # static caches on the CPU: a one-row entry the continuity check relabels into
        # state: dsc::label_sync's, on the device: [b, h, 0] rows labelled for this sequence, [b, h, 1] rebuilds

    def view(self, s: int, bits: int):
        """The first ``s`` positions, as the kernels want them (``scale``/``zero`` stay ``[0]`` at 16 bits)."""
        return label_prefix(self.data, self.scale, self.zero, bits, s)

    def grow(self, label: LabelSpec, like: torch.Tensor, capacity: int) -> None:
        old = (self.data, self.scale, self.zero)
        fresh = Entry(label, like, capacity)
        n = self.length
        fresh.data[:, :, :n].copy_(old[0][:, :, :n])
        if label.bits != 16:
            fresh.scale[:, :, :n].copy_(old[1][:, :, :n])
            fresh.zero[:, :, :n].copy_(old[2][:, :, :n])
        self.data, self.scale, self.zero, self.capacity = fresh.data, fresh.scale, fresh.zero, capacity


def _static_capacity(k: torch.Tensor) -> int:
    """The full extent of the static buffer ``k`` is a prefix view of (from its strides), else its length."""
    s, d = k.shape[2], k.shape[3]
    if k.stride(3) == 1 and k.stride(2) == d and k.shape[1] > 0 and k.stride(1) % d == 0:
        return max(s, k.stride(1) // d)
    return s


def _next_position(positions: torch.Tensor) -> int | None:
    """The position a continuing step writes next (one position vector on the CPU; else None: not tracked)."""
    if positions.dim() == 1 and positions.device.type == "cpu" and positions.numel():
        return int(positions[-1]) + 1
    return None


def _drop_entry(store_ref, key, entry_ref) -> None:
    """Finalizer of a K tensor's storage: forget the entry filed under it (if the store still lives)."""
    store = store_ref()
    if store is not None:
        store.forget(key, entry_ref())


_FIRST_ROW = torch.zeros(1, dtype=torch.int64)  # the position a one-row probe is written at


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    """``t`` reinterpreted as integers of its width: compared bit for bit, a NaN label equals itself."""
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


_MISS_WARN = 4  # consecutive first sights of a static cache before the "replaced every step" warning
# A dynamic site whose labels are rebuilt on consecutive steps (its cache is replaced between steps: a sliding
# window the analysis did not recognise, beam search reordering it, a cache edited outside the model) pays a
# rebuild, which reads every key, on top of its attention: more than dense attention. After REBUILD_LIMIT such
# steps in a row the label spec (one layer of one config) attends densely until a new sequence starts (a step with
# no past), and says so once.
REBUILD_LIMIT = 2
_PLACEHOLDER_HINT = (", and the device holds only a placeholder. Start from a fresh cache, or compile without "
                     "offload for such use.")


class LabelStore:
    """The label caches of one runtime, filed under ``(LabelSpec, address of K's first element)``, and the
    per-spec bookkeeping that decides when labels are rebuilt or given up. ``stats``: the runtime's counters
    (label_writes, label_builds, label_rebuilds, entries_freed, rebuild_fallbacks)."""

    def __init__(self, stats: Counter, device_sync: bool = False):
        self.stats = stats
        self.device_sync = device_sync  # CPU static caches too take the device's path (label_sync, no host reads)
        self.entries: dict[tuple[LabelSpec, int], Entry] = {}
        self._lock = threading.RLock()  # re-entrant: a finalizer may fire while it is held
        self._misses: Counter = Counter()  # label -> consecutive first-sight builds of a static cache
        self._rebuild_runs: Counter = Counter()  # label -> consecutive dynamic steps that rebuilt the labels
        self._dense: set[LabelSpec] = set()  # attends densely until a new sequence starts
        self._warned: set[LabelSpec] = set()  # the dense fallback was announced

    # ------------------------------------------------------------------------------------------ filing
    def _bind(self, label: LabelSpec, t: torch.Tensor, entry: Entry) -> None:
        """File ``entry`` under ``t``'s address; it is dropped when ``t``'s storage is freed."""
        key = (label, t.data_ptr())
        entry.key = key
        self.entries[key] = entry
        weakref.finalize(t.untyped_storage(), _drop_entry, weakref.ref(self), key, weakref.ref(entry))

    def forget(self, key, entry: Entry | None) -> None:
        with self._lock:
            if entry is not None and self.entries.get(key) is entry:
                del self.entries[key]
                self.stats["entries_freed"] += 1

    def lookup(self, label: LabelSpec, t: torch.Tensor) -> Entry | None:
        """The entry filed under ``t`` (no side effects), for a reader that runs before the site's own op."""
        return self.entries.get((label, t.data_ptr()))

    # ------------------------------------------------------------------------------------------ writing
    def _write(self, label: LabelSpec, entry: Entry, keys: torch.Tensor, positions: torch.Tensor) -> None:
        torch.ops.dsc.label_write(keys, label.on(keys.device), positions, entry.data, entry.scale, entry.zero,
                                  label.bits)
        self.stats["label_writes"] += 1

    def _build(self, label: LabelSpec, keys: torch.Tensor, capacity: int) -> Entry:
        """A fresh entry holding the labels of every position of ``keys`` (a rebuild / first sight)."""
        entry = Entry(label, keys, capacity)
        self.stats["label_builds"] += 1
        s = keys.shape[2]
        if s:
            self._write(label, entry, keys, torch.arange(s, device=keys.device))
        entry.length = s
        entry.state[:, :, 0] = s
        return entry

    def ensure_capacity(self, label: LabelSpec, entry: Entry, like: torch.Tensor, n: int) -> None:
        """Grow ``entry`` to hold ``n`` positions. A placeholder buffer (stride 0) does not reveal its full length,
        so its labels start at the length first seen and grow when a longer view of it arrives."""
        with self._lock:
            if entry.capacity < n:
                entry.grow(label, like, max(n, 2 * entry.capacity))

    # ------------------------------------------------------------------------------------------ static caches
    def static(self, label: LabelSpec, k: torch.Tensor, new_k: torch.Tensor, positions: torch.Tensor,
               rebuild: bool = True) -> Entry:
        """Labels of a static cache ``k`` (already holding ``new_k`` at ``positions``): write only the new tokens;
        on first sight of the buffer (or a changed shape) label all of ``k``. ``rebuild=False`` (``k`` is an
        offload placeholder): a first sight must be the buffer's first write (from position 0), labelled from
        ``new_k``.

        A step that does not start a sequence (position 0) is checked against the cache, also one that continues
        the last: rows written outside the compiled model (an eager prefill into a reused cache) make the labels
        stale, and they are rebuilt from ``k`` (or, over a placeholder, refused). On the device path
        (:meth:`_decides_on_device`) ``dsc::label_sync`` does all of it."""
        with self._lock:
            entry = self.lookup(label, k)
            if not rebuild and entry is not None and entry.batch == k.shape[0]:
                self.ensure_capacity(label, entry, k, k.shape[2])  # a longer prefix view of a placeholder buffer
            device = rebuild and self._decides_on_device(positions)
            if entry is None or entry.batch != k.shape[0] or entry.capacity < k.shape[2]:
                entry = self._first_sight(label, entry, k, new_k, positions, rebuild)
                if device:  # the step's own kernel too (a no-op write here), so that a CUDA graph's warm-up run
                    self._sync(label, entry, k, positions)  # compiles it and its recording only launches it
                return entry
            self._misses.pop(label, None)
            if device:
                self._sync(label, entry, k, positions)  # `next` is not tracked there (a host read)
            else:
                if not self._continues(label, entry, k, positions, rows=rebuild):
                    if not rebuild:
                        raise ValueError("dsparse offload: this static KV cache was written outside the compiled "
                                         "model (e.g. an eager prefill into a reused cache), so its offloaded rows "
                                         "are not in the host store" + _PLACEHOLDER_HINT)
                    self.stats["label_rebuilds"] += 1
                    del self.entries[entry.key]
                    entry = self._build(label, k, entry.capacity)  # its host store (offload) is copied from k too
                    self._bind(label, k, entry)
                else:
                    self._write(label, entry, new_k, positions)
                entry.next = _next_position(positions)
            entry.length = max(entry.length, k.shape[2])
            return entry

    def _sync(self, label: LabelSpec, entry: Entry, k: torch.Tensor, positions: torch.Tensor) -> None:
        torch.ops.dsc.label_sync(k, label.on(k.device), positions, entry.data, entry.scale, entry.zero, label.bits,
                                 entry.state)
        self.stats["label_writes"] += 1

    def _decides_on_device(self, positions: torch.Tensor) -> bool:
        """Whether a static step's label bookkeeping runs on the device (``dsc::label_sync``): always for device
        positions (a host read would be a wait, and a CUDA graph replay skips host code), and for CPU ones with
        ``device_sync``; one position vector only (a ``[B, T]`` layout is written as given, unchecked)."""
        return (positions.dim() == 1 and positions.shape[0] > 0
                and (positions.device.type != "cpu" or self.device_sync))

    def device_rebuilds(self) -> int:
        """Prefix rebuilds ``dsc::label_sync`` made on the device, summed over batch rows and KV heads of every
        entry (reads the device counters: call it between steps, not in one)."""
        with self._lock:
            return sum(int(e.state[:, :, 1].sum()) for e in self.entries.values())

    def continuing(self, label: LabelSpec, k: torch.Tensor, p: int) -> Entry | None:
        """The entry of static cache ``k`` when a step writing position ``p`` continues its sequence (right after
        the last position written, batch and capacity unchanged), else None: for the planned decode step
        (``dsc.passes.site_op.planned_decode``), whose native kernel then checks the row before ``p``."""
        entry = self.entries.get((label, k.data_ptr()))
        if entry is None or entry.next != p or entry.batch != k.shape[0] or entry.capacity < k.shape[2]:
            return None
        return entry

    def append_planned(self, label: LabelSpec, entry: Entry, new_k: torch.Tensor, positions: torch.Tensor,
                       s: int) -> None:
        """:meth:`static`'s write for a step :meth:`continuing` accepted, with arguments the caller's plan validated:
        the native label write directly (the op, hence its torch path, for the rows it declines)."""
        with self._lock:
            self._misses.pop(label, None)
            channels = label.on(new_k.device)
            if native.label_write(new_k, channels, positions, entry.data, entry.scale, entry.zero, label.bits):
                self.stats["label_writes"] += 1
            else:
                self._write(label, entry, new_k, positions)
            entry.length = max(entry.length, s)
            entry.next = entry.next + new_k.shape[2]

    def _first_sight(self, label, old: Entry | None, k, new_k, positions, rebuild: bool) -> Entry:
        if old is not None:
            self.stats["label_rebuilds"] += 1
        self._note_static_miss(label)
        if rebuild:
            entry = self._build(label, k, _static_capacity(k))
        else:
            if int(positions.min()) != 0:  # once per sequence: the only host wait of a first sight
                raise ValueError("dsparse offload: this static KV cache holds rows the compiled model never saw (it "
                                 "was filled elsewhere or by another model)" + _PLACEHOLDER_HINT)
            entry = Entry(label, k, _static_capacity(k))
            self.stats["label_builds"] += 1
            self._write(label, entry, new_k, positions)
            entry.length = k.shape[2]
        self._bind(label, k, entry)
        entry.next = _next_position(positions)
        return entry

    def _note_static_miss(self, label: LabelSpec) -> None:
        self._misses[label] += 1
        if self._misses[label] == _MISS_WARN:
            warnings.warn(
                "dsparse: a static KV cache reaches the attention op as a new tensor on every step, so its labels "
                "are rebuilt each time (correct, but slow): the cache is replaced between steps, e.g. beam search "
                "reorders it (index_select makes a copy) or the 'aot_eager' inner compiler copies it (inductor "
                "updates it in place). Use a dynamic cache for beam search.", RuntimeWarning, stacklevel=4)

    def _continues(self, label: LabelSpec, entry: Entry, k: torch.Tensor, positions: torch.Tensor,
                   rows: bool = True) -> bool:
        """Whether the entry's labels still describe ``k`` before this step's ``positions``: a step from position 0
        (a new sequence) is trusted; any other is checked on the row just before it (:meth:`_row_matches`), also
        right after the last position written, since a new prompt prefilled outside the compiled model can end
        exactly there. ``rows=False`` (``k`` is an offload placeholder, with no rows to relabel): a step right after
        the last position written is trusted. Needs the first position on the host: done for CPU position vectors,
        where reading it is free (on a GPU ``dsc::label_sync`` decides on the device)."""
        if positions.dim() != 1 or positions.device.type != "cpu" or not positions.numel():
            return True
        first = int(positions[0])
        if first == 0 or (not rows and first == entry.next):
            return True
        if first > entry.length:  # rows in between were written elsewhere
            return False
        return self._row_matches(label, entry, k, first - 1)

    def _row_matches(self, label: LabelSpec, entry: Entry, k: torch.Tensor, row: int) -> bool:
        """Whether the stored labels of position ``row`` are, bit for bit, the labels of ``k``'s row ``row`` now
        (every batch row and KV head): relabelled into the entry's one-row probe by the same write the labels
        came from (native where it takes the call). CPU tensors."""
        keys = k[:, :, row:row + 1]
        probe = entry.probe
        if probe is None or probe.batch != keys.shape[0]:
            probe = entry.probe = Entry(label, keys, 1)
        channels, first = label.on(k.device), _FIRST_ROW
        if not native.label_write(keys, channels, first, probe.data, probe.scale, probe.zero, label.bits):
            torch.ops.dsc.label_write(keys, channels, first, probe.data, probe.scale, probe.zero, label.bits)
        pairs = [(entry.data, probe.data)] + ([(entry.scale, probe.scale), (entry.zero, probe.zero)]
                                              if label.bits != 16 else [])
        return all(torch.equal(_as_bits(have[:, :, row]), _as_bits(want[:, :, 0])) for have, want in pairs)

    # ------------------------------------------------------------------------------------------ dynamic caches
    def dynamic(self, label: LabelSpec, k: torch.Tensor, past_k: torch.Tensor | None, new_k: torch.Tensor,
                rebuild: bool = True) -> Entry:
        """Labels of ``k = cat(past_k, new_k)``: continue the entry of ``past_k`` (or rebuild it from ``past_k``
        when out of sync), append ``new_k`` and re-key the entry under ``k``. ``rebuild=False`` (``past_k`` is an
        offload placeholder, with no rows to label): out of sync is an error."""
        p = 0 if past_k is None or past_k.dim() != 4 else past_k.shape[2]
        t, s = new_k.shape[2], k.shape[2]
        if p + t != s:
            raise ValueError(f"dsparse: dynamic cache step with past length {p} + new {t} != cache length {s}")
        with self._lock:
            entry, rebuilt = None, False
            if p:
                entry = self.lookup(label, past_k)
                if entry is not None and (entry.length != p or entry.batch != k.shape[0]):
                    entry = None
                if entry is None and not rebuild:
                    raise ValueError("dsparse offload: this dynamic KV cache was changed outside the compiled model "
                                     "(cropped, reordered by beam search, copied, or filled by another model), so "
                                     "its offloaded rows are not in the host store" + _PLACEHOLDER_HINT)
                if entry is None:
                    self.stats["label_rebuilds"] += 1
                    entry, rebuilt = self._build(label, past_k, max(2 * s, 64)), True
                else:
                    del self.entries[entry.key]
            self._note_rebuild(label, rebuilt)
            if entry is None:
                entry = Entry(label, k, max(2 * s, 64))
            if entry.capacity < s:
                entry.grow(label, k, max(2 * s, 2 * entry.capacity))
            if t:
                self._write(label, entry, new_k, torch.arange(p, s, device=k.device))
            entry.length = s
            self._bind(label, k, entry)
            return entry

    def _note_rebuild(self, label: LabelSpec, rebuilt: bool) -> None:
        """Count consecutive rebuilds of ``label``'s dynamic labels; a step that continues (or starts) a chain
        resets the count."""
        if not rebuilt:
            self._rebuild_runs.pop(label, None)
            return
        self._rebuild_runs[label] += 1
        if self._rebuild_runs[label] >= REBUILD_LIMIT and label not in self._dense:
            self._dense.add(label)
            self.stats["rebuild_fallbacks"] += 1

    def should_stay_dense(self, label: LabelSpec, past_k: torch.Tensor | None, layer: int | None = None) -> bool:
        """Whether a dynamic site should skip its labels and attend densely: its labels were rebuilt on
        ``REBUILD_LIMIT`` consecutive steps of the sequence that ``past_k`` (the cache before this step)
        continues. A step with no past starts a new sequence and gets labels again. The first fallback warns once,
        naming ``layer``. Host-side bookkeeping only."""
        with self._lock:
            if past_k is None or past_k.dim() != 4 or past_k.shape[2] == 0:
                self._dense.discard(label)
                self._rebuild_runs.pop(label, None)
                return False
            if label not in self._dense:
                return False
            if label not in self._warned:
                self._warned.add(label)
                where = f"layer {layer}" if layer is not None else "an attention site"
                warnings.warn(
                    f"dsparse: the labels of {where} were rebuilt from its whole dynamic KV cache on {REBUILD_LIMIT} "
                    "consecutive decode steps (the cache is replaced between steps: e.g. a sliding window, beam "
                    "search reordering it, or edits outside the compiled model). A rebuild reads every key, more "
                    f"than dense attention does, so {where} attends densely for the rest of this sequence (and of "
                    "any other that does the same).", RuntimeWarning, stacklevel=4)
            return True
