"""Offload: the K/V of sparse layers in host memory, only the selected rows fetched to the compute device.

What lives where (per sparse layer, per sequence):
- host (pinned when the compute device is a GPU): every K/V row, in :class:`HostKV`, beside the layer's label
  cache entry (:class:`dsc.passes.store.Entry`), so it follows the KV cache the same way the labels do (static
  buffer address, or the dynamic ``cat`` chain; rebuilt from the device cache when out of sync);
- compute device: the labels (``r`` of ``D`` channels) and, per decode step, a budget-sized staging buffer holding
  the selected rows only.

A decode step (:func:`attend`), label scores -> top-k on the device, then one of two gathers:
- zero-copy (a GPU, the default; ``DSConfig.zero_copy``): the sparse-attention kernel reads the selected rows
  straight from the pinned host store over the bus (``dsc::sparse_attention_host``); nothing else moves and the host
  never waits. New rows are written by a kernel into the pinned store in stream order (``write_rows``), so the current
  token's row is there before the attention kernel runs.
- staged (CPU, next-layer prediction, or ``zero_copy=False``): the selected indices go to the host; per KV head
  the union of its query heads' rows is gathered into one block and copied to the device in one transfer; exact
  attention runs over that block. On a GPU, new rows go to the host asynchronously (``non_blocking`` into pinned
  memory, an event recorded) and land before the next gather; the current step's rows are taken from the device,
  so the current token is always attended whether or not its host copy has landed.

Device memory: at offloaded sites the rewrite makes the model's cache hold placeholders (the cache's shape, one
stored element): a dynamic cache's ``cat(past, new)`` becomes ``dsc::kv_placeholder``; a static cache's writes are
dropped and the buffer HF allocates lazily inside the first compiled forward becomes ``dsc::kv_buffer_placeholder``
(buffers allocated before the model ran through the compiler stay on the device, with the reason in the site
report). The site op gets this step's rows (``new_k``/``new_v``); a multi-token step over a placeholder reads the
host rows (:meth:`HostKV.device_rows`). :func:`dsc.bytes.offload_device_bytes` computes what an offloaded sequence needs.

Traffic is counted in the runtime's counters (:attr:`dsc.passes.runtime.Runtime.stats`, which each
:class:`HostKV` adds to): ``h2d_bytes``: rows fetched; ``d2h_bytes``: rows written to the host;
``offload_fetches``: decode steps served from the host.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional

import torch
from torch import Tensor

from .store import Entry


class HostKV:
    """All K/V rows of one sparse layer's cache, in host memory: ``k``/``v`` ``[B, Hkv, capacity, D]``.
    ``stats``: the counters its traffic is added to (the runtime's); ``zero_copy``: on a GPU, attention kernels
    read the selected rows from pinned host memory themselves."""

    __slots__ = ("k", "v", "pending", "pinned", "zero_copy", "stats")

    def __init__(self, like_k: Tensor, like_v: Tensor, capacity: int, stats: Counter, zero_copy: bool = True):
        self.pinned = like_k.device.type == "cuda"
        self.zero_copy = self.pinned and zero_copy
        self.stats = stats
        b, hkv, _, d = like_k.shape
        # zeroed: a dense step over a static placeholder reads rows never written (masked, but must not be NaN)
        self.k = torch.zeros((b, hkv, capacity, d), dtype=like_k.dtype, pin_memory=self.pinned)
        self.v = torch.zeros((b, hkv, capacity, like_v.shape[-1]), dtype=like_v.dtype, pin_memory=self.pinned)
        self.pending: list = []  # (event, positions, k rows, v rows): device -> host copies in flight

    @classmethod
    def over(cls, k: Tensor, v: Tensor, stats: Optional[Counter] = None) -> "HostKV":
        """A store over existing host tensors, gathered on the host (the staged path; benchmarks)."""
        host = cls.__new__(cls)
        host.k, host.v, host.pending, host.pinned, host.zero_copy = k, v, [], k.is_pinned(), False
        host.stats = Counter() if stats is None else stats
        return host

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def grow(self, capacity: int) -> None:
        self.flush()
        if self.zero_copy:
            torch.cuda.current_stream().synchronize()  # rows written by kernels land before the host copies them
        old_k, old_v = self.k, self.v
        n = old_k.shape[2]
        self.k = torch.zeros(old_k.shape[:2] + (capacity, old_k.shape[3]), dtype=old_k.dtype, pin_memory=self.pinned)
        self.v = torch.zeros(old_v.shape[:2] + (capacity, old_v.shape[3]), dtype=old_v.dtype, pin_memory=self.pinned)
        self.k[:, :, :n].copy_(old_k)
        self.v[:, :, :n].copy_(old_v)

    def write(self, positions: Tensor, k_rows: Tensor, v_rows: Tensor) -> None:
        """Store rows ``k_rows``/``v_rows`` ``[B, Hkv, T, D]`` at ``positions`` (``[T]`` or ``[B, T]``)."""
        self.stats["d2h_bytes"] += k_rows.nbytes + v_rows.nbytes
        if k_rows.device.type == "cpu":
            self._scatter(positions, k_rows, v_rows)
            return
        if self.zero_copy:
            torch.ops.dsc.write_rows(k_rows, positions, self.k)
            torch.ops.dsc.write_rows(v_rows, positions, self.v)
            return
        # Asynchronous on a GPU: copy into fresh pinned memory, land in the store before the next gather.
        rows = [t.to("cpu", non_blocking=True) for t in (positions, k_rows, v_rows)]
        event = torch.cuda.Event()
        event.record()
        self.pending.append((event, *rows))

    def flush(self) -> None:
        for event, positions, k_rows, v_rows in self.pending:
            event.synchronize()
            self._scatter(positions, k_rows, v_rows)
        self.pending.clear()

    def _scatter(self, positions: Tensor, k_rows: Tensor, v_rows: Tensor) -> None:
        if positions.dim() == 1:
            self.k.index_copy_(2, positions, k_rows)
            self.v.index_copy_(2, positions, v_rows)
            return
        for b in range(positions.shape[0]):  # per-sequence positions (rare: HF passes one position vector)
            self.k[b].index_copy_(1, positions[b], k_rows[b])
            self.v[b].index_copy_(1, positions[b], v_rows[b])

    def device_rows(self, s: int, positions: Tensor, new_k: Tensor, new_v: Tensor, device: torch.device,
                    fresh: bool) -> tuple[Tensor, Tensor]:
        """All ``s`` rows on ``device``, for a step that attends densely over a placeholder cache. ``fresh`` (the
        store began with this step): the rows are this step's, at ``positions``, zeros elsewhere (masked); else a
        copy of the store (this step's rows included: flushed, or written in stream order)."""
        if fresh:
            if new_k.shape[2] == s:
                return new_k, new_v
            out = []
            for rows in (new_k, new_v):
                full = rows.new_zeros(rows.shape[:2] + (s, rows.shape[3]))
                if positions.dim() == 1:
                    full.index_copy_(2, positions, rows)
                else:
                    for b in range(positions.shape[0]):
                        full[b].index_copy_(1, positions[b], rows[b])
                out.append(full)
            return out[0], out[1]
        self.flush()
        self.stats["h2d_bytes"] += (self.k[:, :, :s].nbytes + self.v[:, :, :s].nbytes)
        return (self.k[:, :, :s].to(device, non_blocking=True), self.v[:, :, :s].to(device, non_blocking=True))

    def fetch(self, idx: Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Gather the rows selected by ``idx`` ``[B, Hsel, K]`` (``-1`` = unused slot; ``Hsel`` = Hkv, or Hq for
        per-query-head selection) and move them to ``device`` in one transfer per K and V.

        Each KV row is moved once per KV head even when several query heads of its group selected it: the block is
        the union of the group's selections, ``[B, Hkv, U, D]``. Returns ``(k_block, v_block, rows)`` where
        ``rows`` ``[B, Hkv, U]`` are the cache positions in the block and ``idx`` re-expressed as block slots is
        :func:`block_slots`."""
        self.flush()
        uniq = _union(idx.to("cpu"), self.k.shape[1])  # the only synchronisation of a step: the host needs them
        b, hkv, u = uniq.shape
        cap = self.k.shape[2]
        rows = ((torch.arange(b)[:, None, None] * hkv + torch.arange(hkv)[None, :, None]) * cap
                + uniq.clamp_min(0)).reshape(-1)
        out = []
        for t in (self.k, self.v):
            block = torch.empty((rows.numel(), t.shape[-1]), dtype=t.dtype, pin_memory=self.pinned)
            torch.index_select(t.reshape(-1, t.shape[-1]), 0, rows, out=block)
            out.append(block.view(b, hkv, u, t.shape[-1]).to(device, non_blocking=True))
            self.stats["h2d_bytes"] += block.nbytes
        self.stats["offload_fetches"] += 1
        return out[0], out[1], uniq


def _union(idx: Tensor, hkv: int) -> Tensor:
    """Per (sequence, KV head), the sorted distinct positions its query heads selected: ``[B, Hkv, U]`` (U = the
    largest union)."""
    b, hsel, kk = idx.shape
    srt = idx.reshape(b, hkv, (hsel // hkv) * kk).sort(-1).values
    first = torch.ones_like(srt, dtype=torch.bool)
    first[..., 1:] = srt[..., 1:] != srt[..., :-1]
    rank = first.cumsum(-1) - 1
    u = int(rank[..., -1].max()) + 1
    uniq = srt[..., -1:].expand(b, hkv, u).clone()  # shorter unions are padded with their largest position
    return uniq.scatter_(-1, rank, srt)


def block_slots(idx: Tensor, rows: Tensor) -> Tensor:
    """``idx`` ``[B, Hsel, Lq, K]`` (cache positions) as slots of a fetched block whose KV head ``h`` holds the
    positions ``rows[:, h]`` (sorted); ``-1`` stays ``-1``."""
    b, hsel, lq, kk = idx.shape
    hkv = rows.shape[1]
    per_kv = idx.reshape(b, hkv, -1)
    slot = torch.searchsorted(rows.contiguous(), per_kv.contiguous())
    return torch.where(idx >= 0, slot.view(b, hsel, lq, kk), torch.full_like(idx, -1))


def host_kv(entry: Entry, k: Tensor, v: Tensor, new_positions: Optional[Tensor], new_rows: Optional[tuple],
            stats: Counter, zero_copy: bool = True) -> HostKV:
    """The host store beside label ``entry``, brought up to date with the device cache ``k``/``v``: on first sight
    (or after a label rebuild: a new entry) every row is copied; afterwards only the rows at ``new_positions``.
    ``new_rows`` (``k``/``v`` are placeholders): this step's rows, the only ones the device holds."""
    s = k.shape[2]
    host = entry.host
    if host is None:
        if new_rows is None and new_positions is not None and new_positions.numel():
            _check_filled(k, new_positions)
        host = entry.host = HostKV(k, v, max(entry.capacity, s), stats, zero_copy)
        if new_rows is not None:  # the label store has refused a placeholder cache it did not see filled
            host.write(new_positions, *new_rows)
        elif s:
            host.write(torch.arange(s, device=k.device), k, v)
        return host
    if host.capacity < s:
        host.grow(max(entry.capacity, s))
    if new_rows is not None:
        host.write(new_positions, *new_rows)
    elif new_positions is not None and new_positions.numel():
        if new_positions.dim() == 1:
            host.write(new_positions, k.index_select(2, new_positions), v.index_select(2, new_positions))
        else:
            pos = new_positions[:, None, :, None]
            host.write(new_positions, k.gather(2, pos.expand(-1, k.shape[1], -1, k.shape[3])),
                       v.gather(2, pos.expand(-1, v.shape[1], -1, v.shape[3])))
    return host


def _check_filled(k: Tensor, new_positions: Tensor) -> None:
    """A device cache first seen at a later step must hold the rows before it. Only NaN or zeros there means it was
    materialised from an offload placeholder (e.g. beam search's reorder of a static cache, or a copy): the rows live
    only in a host store this cache no longer reaches, so attending them would be silently wrong. One host read,
    once per new cache."""
    first = int(new_positions.min())
    if first > 0 and not bool(k[:, :, :first].nan_to_num(0.0).any()):  # placeholders hold NaN, fresh buffers 0
        raise ValueError(
            "dsparse offload: this KV cache reached the model holding no values where its first "
            f"{first} rows should be: it was rebuilt from an offloaded (placeholder) cache outside the compiled model, "
            "e.g. reordered by beam search or copied. Offload cannot follow that; use offload=False for beam search "
            "(or num_beams=1), or a fresh cache.")


def attend(host: HostKV, q: Tensor, k: Tensor, v: Tensor, idx: Optional[Tensor], new_positions: Optional[Tensor],
           scale: float, bias: Optional[Tensor], predicted: Optional[tuple] = None,
           new_rows: Optional[tuple] = None) -> Tensor:
    """Exact attention of decode queries ``q`` ``[B, Hq, 1, D]`` over the selected rows ``idx`` ``[B, Hsel, 1, K]``,
    read from the host store; rows written this step come from the device instead: ``new_rows`` (``(new_k,
    new_v)``, the rows at ``new_positions``, when ``k``/``v`` are placeholders) or the device cache ``k``/``v``.
    ``predicted``: a :func:`prefetch` result (selection + rows already fetched) used instead of ``idx``; the rows
    written this step (``new_positions``, 1-D) are appended from the device: the current token is always attended."""
    b, hq, lq, _ = q.shape
    if predicted is None and host.zero_copy:
        s = k.shape[2]
        row_bytes = host.k.shape[-1] * host.k.element_size() + host.v.shape[-1] * host.v.element_size()
        host.stats["h2d_bytes"] += idx.numel() * row_bytes  # per slot (an upper bound: a row two heads chose counts
        host.stats["offload_fetches"] += 1                  # twice); counting exactly would need a host wait
        return torch.ops.dsc.sparse_attention_host(q, host.k[:, :, :s], host.v[:, :, :s], idx, scale, bias)
    if predicted is None:
        ks, vs, rows = host.fetch(idx[:, :, 0], q.device)
        rows = rows.to(q.device, non_blocking=True)
        if new_positions is not None and new_positions.numel() and k.device.type != "cpu":
            ks, vs = _overlay_new_rows(ks, vs, rows, new_positions, k, v, new_rows)
    else:
        idx, ks, vs, rows = predicted
        t = new_positions.numel()
        rows = torch.cat([rows.to(q.device, non_blocking=True), new_positions.expand(b, rows.shape[1], t)], -1)
        new_k, new_v = new_rows or (k.index_select(2, new_positions), v.index_select(2, new_positions))
        ks = torch.cat([ks, new_k], 2)
        vs = torch.cat([vs, new_v], 2)
        idx = torch.cat([idx, new_positions.expand(b, idx.shape[1], lq, t)], -1)
    stage_bias = None
    if bias is not None:  # the additive mask at the block's rows, per query head
        rows_q = rows.clamp_min(0).repeat_interleave(hq // rows.shape[1], dim=1)[:, :, None, :]
        stage_bias = bias.expand(b, hq, lq, k.shape[2]).gather(-1, rows_q.expand(-1, -1, lq, -1))
    return torch.ops.dsc.sparse_attention(q, ks, vs, block_slots(idx, rows), scale, stage_bias)


# ------------------------------------------------------------------------------------- next-layer prediction
def previous_tokens(valid: Optional[Tensor], n: int, current_is_last: bool) -> Optional[Tensor]:
    """The valid mask over the first ``n`` cached positions without the token being decoded: dynamic caches label
    ``n`` = the past only (the mask's extra column is the current token); in a static buffer the current token is
    each row's last valid position."""
    if valid is None:
        return None
    valid = valid[..., :n]
    if not current_is_last:
        return valid
    count = valid.sum(-1, keepdim=True)
    return valid & (valid.cumsum(-1) < count)


def prefetch(host: HostKV, idx: Tensor, device: torch.device) -> tuple:
    """Fetch the rows of a predicted selection now: ``(idx, k block, v block, rows)``, which the site op attends
    (:func:`attend`'s ``predicted``)."""
    ks, vs, rows = host.fetch(idx[:, :, 0], device)
    host.stats["predictions"] += 1
    return idx, ks, vs, rows


def count_overlap(stats: Counter, predicted_idx: Tensor, own: Tensor, new_positions: Tensor) -> None:
    """Share of the site's own selection (current token aside) that the prediction also selected."""
    hsel = own.shape[1]
    s = int(max(own.max(), predicted_idx.max(), new_positions.max())) + 2
    pred = predicted_idx if predicted_idx.shape[1] == hsel else predicted_idx.repeat_interleave(
        hsel // predicted_idx.shape[1], dim=1)

    def mask(i):
        m = torch.zeros(i.shape[:-1] + (s,), dtype=torch.bool, device=i.device)
        return m.scatter_(-1, torch.where(i >= 0, i, s - 1), True)[..., :-1]

    own_m = mask(own)
    own_m[..., new_positions] = False
    stats["overlap_hits"] += int((own_m & mask(pred)).sum())
    stats["overlap_total"] += int(own_m.sum())


def _overlay_new_rows(ks, vs, rows, new_positions, k, v, new_rows=None):
    """Replace block rows written this step (their host copy may still be in flight) with the device rows, so the
    current token is attended without waiting for the device -> host copy. The device rows are read from the cache
    ``k``/``v`` at the block's positions, or from ``new_rows`` (the rows at ``new_positions``, [B, Hkv, T, D])."""
    pos = new_positions if new_positions.dim() == 2 else new_positions[None]
    hit = rows[..., None] == pos[:, None, None, :]  # [B, Hkv, U, T]
    if new_rows is None:
        at = rows.clamp_min(0)[..., None]
        src_k, src_v = (t.gather(2, at.expand(-1, -1, -1, t.shape[3])) for t in (k, v))
    else:
        at = hit.int().argmax(-1)[..., None]  # which new row each block row is (where it is one)
        src_k, src_v = (t.gather(2, at.expand(-1, -1, -1, t.shape[3])) for t in new_rows)
    fresh = hit.any(-1)[..., None]
    return torch.where(fresh, src_k, ks), torch.where(fresh, src_v, vs)
