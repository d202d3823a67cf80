"""Token-selection policies at equal budget, applied to any HF model by intercepting its SDPA calls.

One machinery for every policy: a policy only *scores* the keys of each query's causal prefix; selection
(``torch.ops.dsc.select_topk``: budget, sink/recent forced inside it, never an invalid key) and the exact
attention over the selected rows (``torch.ops.dsc.sparse_attention``) are the backend's ops, dispatched by device,
so policies differ only in what they rank by:

- ``dense``: no selection (exact attention);
- ``dsparse``: Double Sparsity: the calibrated ``r`` channels of each KV head, scored against the label cache
  (``torch.ops.dsc.label_write`` + ``label_scores``, optionally 8/4-bit labels): the backend's own selection;
- ``oracle``: exact ``q . K`` scores (the upper bound of any token selection at this budget);
- ``streaming``: StreamingLLM, the first ``sink`` tokens plus the most recent ones, nothing else;
- ``quest``: Quest, pages of ``page`` tokens scored by ``sum_c max(q_c min_c, q_c max_c)`` over each page's
  per-channel key min/max; whole pages are taken in score order (the query's own page uses the min/max of its
  tokens so far, as it would while decoding);
- ``sparq``: SparQ (without its mean-value reallocation), per query the top-``r`` channels by ``|q|``, scores
  from those channels of the full K.

:class:`SparseSDPA` is a ``TorchFunctionMode``: inside it, every SDPA call of the model computes, for each query
row, the policy's top-k over that row's own valid keys, then exact attention over them. A row attends exactly
as the same query would at a decode step with that cache, so one full-window forward gives the logits of
token-by-token sparse decoding (queries at positions ``< prefill`` attend densely, like a dense prefill).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import dsc.kernels  # noqa: F401  (registers torch.ops.dsc.*)
from dsc.attention_mask import causal_valid, valid_from_mask
from dsc.bytes import kv_bytes, label_bytes
from dsc.kernels import label_prefix
from dsc.config import (SELECTION_FIELDS, BudgetView, DSConfig, Selection, check_value, parse_budget,  # noqa: F401
                        resolve_r)
from dsc.sites import is_sdpa, layer_index, module_stack, sdpa_arguments

POLICIES = ("dense", "dsparse", "oracle", "streaming", "quest", "sparq")
ELEM_BYTES = 2  # bytes accounting assumes a 16-bit K/V cache (the serving dtype), whatever the eval dtype


@dataclass(frozen=True, init=False)
class Policy(BudgetView):
    """One attention policy: its ``name``, the token-selection knobs (a :class:`dsc.config.Selection`, the same
    object the backend's :attr:`DSConfig.selection` gives: one set of defaults and one validation), and the
    policy-only knobs.

    Built as ``Policy(name, budget=..., r=..., label_bits=..., gqa=..., sink=..., recent=..., min_length=...,
    dense_layers=..., page=..., channels=...)`` (the selection knobs by name, defaults the backend's) or
    ``Policy(name, selection=Selection(...), ...)``; ``dataclasses.replace(policy, budget=...)`` works too. The
    selection knobs read as attributes (``policy.budget``, ``policy.r``, ...). ``budget``: tokens per row (int) or
    a fraction of each row's valid tokens; ``r``: label channels (dsparse) or ``|q|`` channels (sparq; default
    head_dim / 4 of ``channels``, else 16); ``channels``: a ChannelConfig (dsparse only); ``page``: Quest's page.
    """

    name: str
    selection: Selection
    dense_layers: tuple[int, ...]
    page: int
    channels: object = field(compare=False, repr=False)

    def __init__(self, name: str = "dense", selection: Optional[Selection] = None, *,
                 dense_layers=DSConfig.dense_layers, page: int = 16, channels: Any = None, **knobs):
        unknown = sorted(set(knobs) - set(SELECTION_FIELDS))
        if unknown:
            raise TypeError(f"Policy got unknown knob(s) {unknown}; selection knobs: {list(SELECTION_FIELDS)}")
        if name not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {name!r}")
        if selection is None:
            knobs["r"] = resolve_r(knobs.get("r"), channels)  # as DSConfig: a quarter of head_dim when known
            selection = Selection(**knobs)
        elif knobs:
            selection = replace(selection, **knobs)
        if not isinstance(selection, Selection):
            raise ValueError(f"Policy.selection must be a dsc.config.Selection, got {type(selection).__name__}")
        set_ = object.__setattr__
        set_(self, "name", name)
        set_(self, "selection", selection)
        set_(self, "dense_layers", check_value("Policy", "dense_layers", dense_layers))
        set_(self, "page", check_value("Policy", "page", page))
        set_(self, "channels", channels)
        if name == "dsparse" and channels is None:
            raise ValueError("the dsparse policy needs a channel config (channels=ChannelConfig); get one with "
                             "dsc.calibration.default_config(model=..., tokenizer=...) or `dsc calibrate`")

    # The selection knobs, read through (BudgetView's rule reads budget/sink/recent/min_length from here).
    budget = property(lambda self: self.selection.budget)
    r = property(lambda self: self.selection.r)
    label_bits = property(lambda self: self.selection.label_bits)
    sink = property(lambda self: self.selection.sink)
    recent = property(lambda self: self.selection.recent)
    gqa = property(lambda self: self.selection.gqa)
    min_length = property(lambda self: self.selection.min_length)

    def label(self) -> str:
        """A short human-readable name with the knobs that matter for this policy."""
        if self.name == "dense":
            return "dense"
        b = f"{self.budget}" if isinstance(self.budget, int) else f"1/{1 / self.budget:.3g}"
        parts = [self.name, f"k={b}", self.gqa]
        if self.name in ("dsparse", "sparq"):
            parts.append(f"r={self.r}")
        if self.name == "dsparse" and self.label_bits != 16:
            parts.append(f"{self.label_bits}bit")
        parts.append(f"sink={self.sink}" if self.name == "streaming" else f"sink={self.sink},recent={self.recent}")
        return " ".join(parts)

    def backend_options(self, **extra) -> dict:
        """The ``dsparse`` backend options with this (dsparse) policy's knobs, plus ``extra``."""
        sel = {name: getattr(self.selection, name) for name in SELECTION_FIELDS}
        return dict(channels=self.channels, dense_layers=self.dense_layers, **sel, **extra)

    def score_bytes(self, head_dim: int, group_size: int) -> float:
        """Bytes read per (cached token, KV head) to score it, with a 16-bit cache (ALGORITHM.md sec. 1)."""
        d, e = head_dim, ELEM_BYTES
        if self.name in ("dense", "streaming"):
            return 0.0
        if self.name == "oracle":
            return float(d * e)
        if self.name == "quest":
            return 2.0 * d * e / self.page  # min and max vectors per page
        if self.name == "sparq":
            chans = self.r if self.gqa == "group" else min(d, group_size * self.r)
            return float(chans * e)
        return float(label_bytes(self.r, self.label_bits, e))  # dsparse: the labels (dsc.bytes, the one model)

    def for_bytes(self, bytes_frac: float, head_dim: int, group_size: int) -> "Policy | None":
        """This policy with the fractional token budget that makes its bytes read ``bytes_frac`` of dense
        (group selection assumed: one fetched row per selected token), or None if scoring alone exceeds it."""
        dense = kv_bytes(head_dim, ELEM_BYTES)
        tok = bytes_frac - self.score_bytes(head_dim, group_size) / dense
        if tok <= 0:
            return None
        return replace(self, budget=min(tok, 0.999999))


# ------------------------------------------------------------------------------------------------ scoring
def _group_heads(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """``[B, Hq, L, D]`` -> ``[B, Hkv, G, L, D]``."""
    b, hq, l, d = q.shape
    return q.view(b, hkv, hq // hkv, l, d)


def _reduce(scores5: torch.Tensor, group: bool) -> torch.Tensor:
    """``[B, Hkv, G, L, S]`` per-head scores -> ``[B, Hkv, L, S]`` (group sum) or ``[B, Hq, L, S]``."""
    if group:
        return scores5.sum(2)
    b, hkv, g, l, s = scores5.shape
    return scores5.reshape(b, hkv * g, l, s)


class LayerScorer:
    """Scores of one SDPA call's keys for chunks of its queries under ``policy`` (fp32, invalid = ``-inf``).

    Built once per call: per-key state (labels, page min/max) is computed once and sliced per chunk."""

    def __init__(self, policy: Policy, layer: int, k: torch.Tensor):
        self.p, self.layer, self.k = policy, layer, k
        b, hkv, s, d = k.shape
        self.group = policy.gqa == "group"
        if policy.name == "dsparse":
            cfg = policy.channels
            self.ch = cfg.channels(layer, policy.r).to(k.device)
            self.labels = dsc.kernels.alloc_labels(b, hkv, s, policy.r, policy.label_bits, dtype=k.dtype,
                                                   device=k.device)
            torch.ops.dsc.label_write(k, self.ch, torch.arange(s, device=k.device), *self.labels, policy.label_bits)
        elif policy.name == "quest":
            pg = policy.page
            npg = -(-s // pg)
            pad = npg * pg - s
            kf = k.float()
            lo = F.pad(kf, (0, 0, 0, pad), value=float("inf")).view(b, hkv, npg, pg, d)
            hi = F.pad(kf, (0, 0, 0, pad), value=float("-inf")).view(b, hkv, npg, pg, d)
            self.run_min = lo.cummin(3).values.view(b, hkv, npg * pg, d)  # min of page so far, per position
            self.run_max = hi.cummax(3).values.view(b, hkv, npg * pg, d)
            self.page_min = self.run_min.view(b, hkv, npg, pg, d)[:, :, :, -1]
            self.page_max = self.run_max.view(b, hkv, npg, pg, d)[:, :, :, -1]

    def scores(self, q: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """``q [B, Hq, C, D]`` against keys ``[:S]`` with ``valid [B|1, 1, C, S]`` -> ``[B, Hsel, C, S]``."""
        p, k = self.p, self.k
        s = valid.shape[-1]
        b, hkv = k.shape[0], k.shape[1]
        hq, c = q.shape[1], q.shape[2]
        if p.name == "dsparse":
            return torch.ops.dsc.label_scores(q, self.ch, *label_prefix(*self.labels, p.label_bits, s), p.label_bits,
                                              valid.expand(b, 1, c, s), None, self.group)
        if p.name == "streaming":  # newest first: after the forced sinks, top-k takes the most recent tokens
            hsel = hkv if self.group else hq
            sc = torch.arange(s, dtype=torch.float32, device=q.device).expand(b, hsel, c, s)
        elif p.name == "oracle":
            qg = _group_heads(q.float(), hkv)
            sc = _reduce(torch.einsum("bhgcd,bhsd->bhgcs", qg, k[:, :, :s].float()), self.group)
        elif p.name == "sparq":
            qg = _group_heads(q.float(), hkv)
            if self.group:
                qg = qg.sum(2, keepdim=True)  # the group's summed score is (sum_h q_h) . k
            top = qg.abs().topk(min(p.r, qg.shape[-1]), dim=-1).indices
            qm = torch.zeros_like(qg).scatter_(-1, top, qg.gather(-1, top))
            sc = _reduce(torch.einsum("bhgcd,bhsd->bhgcs", qm, k[:, :, :s].float()), False)
            if self.group:
                sc = sc.view(b, hkv, c, s)
        else:  # quest
            return self._quest(q, valid)
        return sc.masked_fill(~valid, float("-inf"))

    def _quest(self, q: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        p, k = self.p, self.k
        b, hkv, _, d = k.shape
        s, c, pg = valid.shape[-1], q.shape[2], p.page
        npg = -(-s // pg)
        qg = _group_heads(q.float(), hkv)                                   # [B, Hkv, G, C, D]
        qpos, qneg = qg.clamp(min=0), qg.clamp(max=0)
        full = (torch.einsum("bhgcd,bhpd->bhgcp", qpos, self.page_max[:, :, :npg])
                + torch.einsum("bhgcd,bhpd->bhgcp", qneg, self.page_min[:, :, :npg]))
        # The page holding the row's last valid key is still filling: use its min/max up to that key.
        pos = torch.arange(s, device=q.device)
        last = torch.where(valid, pos, -1).amax(-1).clamp(min=0).expand(b, 1, c)[:, 0]   # [B, C]
        gi = last[:, None, :, None].expand(b, hkv, c, d)
        cmax, cmin = self.run_max.gather(2, gi), self.run_min.gather(2, gi)            # [B, Hkv, C, D]
        cur = (qpos * cmax[:, :, None]).sum(-1) + (qneg * cmin[:, :, None]).sum(-1)    # [B, Hkv, G, C]
        cur_page = (last // pg)[:, None, None, :, None]                                # [B, 1, 1, C, 1]
        pages = torch.arange(npg, device=q.device)
        full = torch.where(pages == cur_page, cur[..., None], full)
        full = full.masked_fill(pages > cur_page, float("-inf"))
        full = _reduce(full, self.group)                                               # [B, Hsel, C, P]
        # Rank pages (stable: earlier page first on ties); token key = -(rank * page + offset) takes whole pages
        # in rank order, and the first tokens of the last page taken.
        order = full.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(-1, order, pages.expand_as(order))
        tok_rank = rank.repeat_interleave(pg, -1)[..., :s]
        key = -(tok_rank * pg + (pos % pg)).float()
        return key.masked_fill(~valid, float("-inf"))


# ------------------------------------------------------------------------------------------- interception
@dataclass
class Stats:
    """Counters over sparse rows: rows, mean selected rows fetched per KV head (union over the group); and over
    every decoding row (past the dense prefill, dense rows included): the mean share of its valid tokens kept."""

    rows: int = 0
    fetched: float = 0.0   # sum over (row, KV head) of distinct selected positions
    valid: float = 0.0     # sum over (row, KV head) of valid positions
    kept: float = 0.0      # sum over (decoding row, selection head) of the share of valid tokens attended
    kept_rows: int = 0

    def kept_frac(self) -> float:
        return self.kept / self.kept_rows if self.kept_rows else 1.0

    def fetched_frac(self) -> float:
        return self.fetched / self.valid if self.valid else 1.0


class SparseSDPA(TorchFunctionMode):
    """Replaces each SDPA call of a model by per-row ``policy`` selection + exact attention over the selection.

    Selection and attention are the backend's ops, dispatched by device: ``torch.ops.dsc.select_topk`` over the
    policy's scores (for ``dsparse``: ``label_write`` + ``label_scores``, exactly what the backend calls), then
    ``torch.ops.dsc.sparse_attention`` over the selected rows; the SDPA mask means what it means to the backend
    (:func:`dsc.attention_mask.valid_from_mask`).

    ``stack`` holds the module paths entered (pushed by forward pre-hooks), so the innermost one names the layer
    (:func:`dsc.sites.layer_index`). ``prefill``: queries at absolute positions ``< prefill`` attend densely.
    ``chunk``: query rows handled together (bounds memory: about ``chunk * S * Hq`` floats at a time).
    """

    def __init__(self, policy: Policy, stack: list[str], prefill: int = 0, chunk: int = 256,
                 num_kv_heads: int | None = None):
        super().__init__()
        self.policy, self.stack, self.prefill, self.chunk = policy, stack, int(prefill), int(chunk)
        self.num_kv_heads = num_kv_heads
        self.stats = Stats()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not is_sdpa(func) or self.policy.name == "dense":
            return func(*args, **kwargs)
        layer = layer_index(self.stack[-1]) if self.stack else None
        if layer is None or layer in self.policy.dense_layers:
            return func(*args, **kwargs)
        if self.policy.name == "dsparse" and not self.policy.channels.has_layer(layer):
            return func(*args, **kwargs)  # not calibrated: dense, as the backend does
        a = sdpa_arguments(args, kwargs)
        if a.get("dropout_p", 0.0):
            raise ValueError("SparseSDPA evaluates inference only: SDPA was called with dropout_p > 0")
        if a["key"].shape[2] <= self.prefill:  # every query lies in the dense prefill
            return func(*args, **kwargs)
        return self.attend(layer, a["query"], a["key"], a["value"], a.get("attn_mask"), bool(a.get("is_causal")),
                           a.get("scale"))

    def attend(self, layer, q, k, v, attn_mask, is_causal, scale):
        b, hq, lq, d = q.shape
        hkv, s = k.shape[1], k.shape[2]
        if self.num_kv_heads and hkv == hq != self.num_kv_heads:
            # HF repeats K/V to the query heads (repeat_kv) when it passes a mask: undo the copy so selection
            # and labels stay per KV head, as at decode.
            rep = hq // self.num_kv_heads
            k, v = k[:, ::rep], v[:, ::rep]
            hkv = self.num_kv_heads
        if hq % hkv:
            raise ValueError(f"layer {layer}: {hq} query heads are not a multiple of {hkv} KV heads")
        p = self.policy
        sm_scale = scale if scale is not None else d ** -0.5
        scorer = LayerScorer(p, layer, k)
        out = torch.empty_like(q)
        g = hq // hkv
        mask_valid, mask_bias = valid_from_mask(attn_mask)
        causal = causal_valid(lq, s, q.device) if is_causal else None
        for a in range(0, lq, self.chunk):
            e = min(lq, a + self.chunk)
            rows = torch.arange(a, e, device=q.device)
            hi = min(s, e) if (is_causal and attn_mask is None) else s  # top-left causal: rows < e see keys < e
            valid = torch.ones(1, 1, e - a, hi, dtype=torch.bool, device=q.device)
            if causal is not None:
                valid = valid & causal[a:e, :hi]
            bias = None
            if mask_valid is not None:
                valid = valid & _rows(mask_valid, a, e, hi)
                valid = valid if valid.dim() == 4 else valid.view(1, 1, *valid.shape[-2:])
                if valid.shape[1] != 1:
                    valid = valid.all(1, keepdim=True)  # a position is valid only if valid for every head
                if mask_bias is not None:
                    bias = _rows(mask_bias, a, e, hi)
            bsz = valid.shape[0]
            # Dense rows: positions before the prefill and prefixes shorter than the budget's dense_below.
            nvalid = valid.sum(-1, keepdim=True)                     # [B|1, 1, C, 1]
            absolute = (s - lq + rows)[None, None, :, None]
            dense_row = (absolute < self.prefill) | (nvalid < p.dense_below)
            qc = q[:, :, a:e].contiguous()
            kc, vc = k[:, :, :hi], v[:, :, :hi]
            dense_out = None
            if bool(dense_row.any()):
                dmask = valid if bias is None else torch.where(valid, bias, float("-inf")).to(q.dtype)
                dense_out = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=dmask, scale=sm_scale,
                                                           enable_gqa=True)
            if bool(dense_row.all()):
                sel = valid.expand(max(b, bsz), hkv if p.gqa == "group" else hq, e - a, hi)  # as idx would be
                out[:, :, a:e] = dense_out
            else:
                sc = scorer.scores(qc, valid.expand(max(b, bsz), 1, e - a, hi))
                recent = 0 if p.name == "streaming" else p.recent  # streaming: its scores already rank by recency
                idx = torch.ops.dsc.select_topk(sc, p.budget_tokens, p.budget_frac, p.sink, recent)
                sparse_out = torch.ops.dsc.sparse_attention(qc, kc, vc, idx, float(sm_scale), bias)
                sel = torch.zeros(*idx.shape[:3], hi + 1, dtype=torch.bool, device=q.device)
                sel.scatter_(-1, torch.where(idx >= 0, idx, hi), True)
                sel = torch.where(dense_row, valid, sel[..., :hi])
                out[:, :, a:e] = sparse_out if dense_out is None else torch.where(dense_row, dense_out, sparse_out)
            self._count(sel, valid, dense_row, hkv, sel.shape[1] == hkv)
            self._count_kept(sel, valid, absolute >= self.prefill)
        return out

    def _count_kept(self, sel, valid, decoding):
        share = sel.sum(-1).float() / valid.sum(-1).clamp(min=1).float()   # [B, Hsel, C]
        rows = decoding[..., 0].expand_as(share)
        self.stats.kept += float(share[rows].sum())
        self.stats.kept_rows += int(rows.sum())

    def _count(self, sel, valid, dense_row, hkv, grouped):
        sparse = ~dense_row[..., 0]                                   # [B|1, 1, C]
        if not bool(sparse.any()):
            return
        b, hs, c, s = sel.shape
        union = sel if grouped else sel.view(b, hkv, hs // hkv, c, s).any(2)
        fetched = union.sum(-1).float()                               # [B, Hkv, C]
        nv = valid.sum(-1).float().expand_as(fetched)
        m = sparse.expand_as(fetched)
        self.stats.fetched += float(fetched[m].sum())
        self.stats.valid += float(nv[m].sum())
        self.stats.rows += int(sparse.sum()) * b // sparse.shape[0]


def _rows(mask: torch.Tensor, a: int, e: int, hi: int) -> torch.Tensor:
    """Query rows ``a:e`` and keys ``:hi`` of an SDPA mask (a mask broadcasting one row keeps it)."""
    return mask[..., a:e, :hi] if mask.shape[-2] > 1 else mask[..., :hi]


@contextmanager
def apply_policy(model: torch.nn.Module, policy: Policy, prefill: int = 0, chunk: int = 256):
    """While active, the model's attention follows ``policy`` (see :class:`SparseSDPA`); yields the mode,
    whose ``stats`` count the rows fetched. Restores the model (hooks removed) on exit."""
    check_model(model)
    cfg = getattr(model, "config", None)
    with module_stack(model, keep=lambda name: layer_index(name) is not None) as stack:
        mode = SparseSDPA(policy, stack, prefill=prefill, chunk=chunk,
                          num_kv_heads=getattr(cfg, "num_key_value_heads", None))
        with mode:
            yield mode


def check_model(model) -> tuple[int, int, int, int]:
    """``(num_layers, num_heads, num_kv_heads, head_dim)`` of an HF decoder, and that it uses SDPA attention."""
    cfg = model.config
    impl = getattr(cfg, "_attn_implementation", None) or getattr(cfg, "attn_implementation", None)
    if impl not in (None, "sdpa"):
        raise ValueError(f"policies intercept scaled_dot_product_attention, but the model uses "
                         f"attn_implementation={impl!r}; load it with attn_implementation='sdpa'")
    hq = cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or hq
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    return cfg.num_hidden_layers, hq, hkv, d
