"""Offline channel statistics: run the model eagerly on calibration text and measure, per (layer, KV head,
channel), how much each channel contributes to attention logits, exactly as ``scaled_dot_product_attention``
sees q and k (post-RoPE, in the layout the kernels read).

No per-architecture code: a ``TorchFunctionMode`` intercepts every SDPA call and module hooks say which module
is running; :func:`dsc.sites.layer_index` maps its path to a layer (the same mapping the backend uses).

Statistics, with ``t`` over all calibration tokens, ``h`` a query head of KV group ``g`` (``h // G == g``):
- ``qk``: ``S[g, c] = sum_{h in g} mean_t |q[h, t, c] * k[g, t, c]|`` (each token's query with its own key);
- ``q``:  ``S[g, c] = sum_{h in g} mean_t |q[h, t, c]|``;
- ``k``:  ``S[g, c] = mean_t |k[g, t, c]|``.
Summing the G query heads of a group is what group scoring does at run time (one label set per KV head scores
the sum of the group's queries), so the channels that carry most of the group's logits rank first.
Sums are float64 over every token of every block (the reference overwrote the statistic with each block).
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

from dsc.calibration.config import ROPE_LAYOUTS, ChannelConfig, model_fingerprint, model_shapes, rope_partner
from dsc.sites import is_sdpa, layer_index, module_stack, sdpa_arguments

METHODS = ("qk", "q", "k")


# ------------------------------------------------------------------------------------------ SDPA interception
class _SdpaSpy(TorchFunctionMode):
    """Calls ``callback(module_path, q, k, kwargs)`` for every SDPA call, then runs it unchanged."""

    def __init__(self, stack: list[str], callback: Callable[..., None]):
        super().__init__()
        self.stack, self.callback = stack, callback

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_sdpa(func):
            a = sdpa_arguments(args, kwargs)
            self.callback(self.stack[-1] if self.stack else "", a["query"], a["key"], kwargs)
        return func(*args, **kwargs)


@contextmanager
def capture_sdpa(model: torch.nn.Module, callback: Callable[[str, torch.Tensor, torch.Tensor, dict], None]):
    """While active, every SDPA call inside ``model`` reports ``(innermost module path, q, k, sdpa kwargs)``."""
    with module_stack(model) as stack, _SdpaSpy(stack, callback):
        yield


@contextmanager
def _sdpa_eval_mode(model: torch.nn.Module):
    """Eval mode and the SDPA attention implementation for the duration (restored afterwards)."""
    was_training = model.training
    cfg = getattr(model, "config", None)
    old = getattr(cfg, "_attn_implementation", None)
    switch = old not in (None, "sdpa") and hasattr(model, "set_attn_implementation")
    if switch:
        model.set_attn_implementation("sdpa")
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        if switch:
            model.set_attn_implementation(old)


# ------------------------------------------------------------------------------------------------ statistics
@dataclass
class ChannelStats:
    """float64 per-layer sums ``[Hkv, D]`` of each method's statistic, and the token count per layer."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sums: dict[str, dict[int, torch.Tensor]] = field(default_factory=lambda: {m: {} for m in METHODS})
    counts: dict[int, int] = field(default_factory=dict)
    rope_layout: str | None = None
    tokens: int = 0

    def mean(self, method: str = "qk") -> dict[int, torch.Tensor]:
        """``{layer: [Hkv, D]}`` float64: the statistic of ``method`` averaged over all calibration tokens."""
        _check_method(method)
        return {layer: s / self.counts[layer] for layer, s in sorted(self.sums[method].items())}

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        """Fold another collection of the same model into this one (sums and counts add; incremental runs)."""
        mine = (self.num_heads, self.num_kv_heads, self.head_dim)
        theirs = (other.num_heads, other.num_kv_heads, other.head_dim)
        if mine != theirs:
            raise ValueError(f"cannot merge statistics of heads/kv_heads/head_dim {theirs} into {mine}")
        for m in METHODS:
            for layer, v in other.sums[m].items():
                acc = self.sums[m]
                acc[layer] = acc[layer] + v if layer in acc else v.clone()
        for layer, n in other.counts.items():
            self.counts[layer] = self.counts.get(layer, 0) + n
        self.tokens += other.tokens
        self.num_layers = max(self.num_layers, other.num_layers)
        if self.rope_layout is None:
            self.rope_layout = other.rope_layout
        return self

    def add(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """Accumulate one SDPA call: ``q [B, Hq, L, D]``, ``k [B, Hkv, L, D]`` (the queries' own keys)."""
        b, hq, n, d = q.shape
        hkv = k.shape[1]
        qd = q.detach().to(torch.float64).view(b, hkv, hq // hkv, n, d)
        kd = k.detach().to(torch.float64).unsqueeze(2)
        part = {"qk": (qd * kd).abs().sum(dim=(0, 2, 3)), "q": qd.abs().sum(dim=(0, 2, 3)),
                "k": kd.abs().sum(dim=(0, 2, 3))}
        for m, v in part.items():
            acc = self.sums[m]
            acc[layer] = acc[layer] + v.cpu() if layer in acc else v.cpu()
        self.counts[layer] = self.counts.get(layer, 0) + b * n


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} ('qk' is the paper's best), got {method!r}")


def _own_keys(q: torch.Tensor, k: torch.Tensor, num_kv_heads: int | None, where: str) -> torch.Tensor:
    """The keys of the queries' own tokens, with KV heads only (undoing ``repeat_kv`` if the model expanded them)."""
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"{where}: SDPA q/k must be 4-D [B, H, L, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    n, s = q.shape[2], k.shape[2]
    if s < n:
        raise ValueError(f"{where}: SDPA has {n} queries but only {s} keys; cannot pair each query with its key")
    k = k[:, :, s - n:]  # appended-cache convention: the last L keys are the queries' own
    hq, hk = q.shape[1], k.shape[1]
    if hq % hk:
        raise ValueError(f"{where}: {hq} query heads are not a multiple of {hk} key heads")
    if num_kv_heads and hk != num_kv_heads:
        if hk != hq or hq % num_kv_heads:
            raise ValueError(f"{where}: SDPA keys have {hk} heads; the model config says num_key_value_heads="
                             f"{num_kv_heads} and num_attention_heads={hq}")
        g = hq // num_kv_heads
        grouped = k.reshape(k.shape[0], num_kv_heads, g, n, k.shape[-1])
        if not torch.equal(grouped, grouped[:, :, :1].expand_as(grouped)):
            raise ValueError(f"{where}: keys have {hk} heads but are not repeats of {num_kv_heads} KV heads "
                             "(repeat_kv); the model config's num_key_value_heads does not describe this attention")
        k = grouped[:, :, 0]
    return k


def _rope_evidence(q: torch.Tensor, ids: torch.Tensor) -> dict[str, float] | None:
    """Layer-0 queries depend only on the token (RoPE models have no absolute position input), so two positions
    holding the same token differ by the rotation alone: the rotation pairs' norms agree. Returns, per layout,
    the worst relative disagreement of pair norms, and under ``"none"`` how much the vectors differ at all."""
    ids = ids.reshape(-1)
    qf = q.detach()[0].to(torch.float64)  # [Hq, L, D]
    if qf.shape[1] != ids.numel() or qf.shape[-1] % 2:
        return None
    first: dict[int, int] = {}
    pairs = []
    for pos, tok in enumerate(ids.tolist()):
        if tok in first and pos - first[tok] >= 8:
            pairs.append((first[tok], pos))
        first.setdefault(tok, pos)
    if not pairs:
        return None
    pairs = pairs[:64]
    a = qf[:, [p for p, _ in pairs]]  # [Hq, P, D]
    b = qf[:, [p for _, p in pairs]]
    d = qf.shape[-1]
    out = {"none": float(((a - b).norm(dim=-1) / (a.norm(dim=-1) + b.norm(dim=-1) + 1e-30)).max())}
    for layout in ROPE_LAYOUTS:
        part = torch.tensor([rope_partner(c, d, layout) for c in range(d)])
        na, nb = (a ** 2 + a[..., part] ** 2).sqrt(), (b ** 2 + b[..., part] ** 2).sqrt()
        out[layout] = float(((na - nb).abs() / (na + nb + 1e-30)).max())
    return out


def _decide_rope_layout(evidence: dict[str, float] | None, dtype: torch.dtype) -> str | None:
    if evidence is None:
        return None
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    if evidence["none"] <= tol:
        return None  # queries do not rotate with position: no RoPE on this model
    fits = [lay for lay in ROPE_LAYOUTS if evidence[lay] <= tol]
    return fits[0] if len(fits) == 1 else None


# ------------------------------------------------------------------------------------------------------ data
def token_blocks(data: Any, block_size: int, tokens: int | None, tokenizer=None) -> list[torch.Tensor]:
    """Cut calibration data into int64 blocks of at most ``block_size`` tokens, ``tokens`` in total.

    ``data``: a str, a list of str or a dict name -> str (tokenized, joined with EOS into one stream), a 1-D
    token tensor/list (one stream), or a 2-D tensor / list of token sequences (each cut on its own).
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an int >= 2, got {block_size!r}")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
        raise ValueError(f"tokens must be a positive int (or None for all data), got {tokens!r}")
    if isinstance(data, Mapping):
        data = list(data.values())
    if isinstance(data, str):
        data = [data]
    if isinstance(data, torch.Tensor):
        if data.dim() not in (1, 2) or data.dtype.is_floating_point:
            raise ValueError(f"token data must be a 1-D or 2-D integer tensor, got {data.dtype} {tuple(data.shape)}")
        streams = [data] if data.dim() == 1 else list(data)
    else:
        data = list(data)
        if not data:
            raise ValueError("calibration data is empty; pass texts or token batches")
        if all(isinstance(x, str) for x in data):
            if tokenizer is None:
                raise ValueError("calibration data are texts but no tokenizer was given; pass tokenizer=...")
            eos = getattr(tokenizer, "eos_token_id", None)
            stream: list[int] = []
            for i, text in enumerate(data):
                if i and eos is not None:
                    stream.append(int(eos))
                stream.extend(tokenizer(text)["input_ids"])
            streams = [torch.tensor(stream, dtype=torch.int64)]
        elif all(isinstance(x, int) and not isinstance(x, bool) for x in data):
            streams = [torch.tensor(data, dtype=torch.int64)]
        else:
            try:
                streams = [torch.as_tensor(x, dtype=torch.int64).reshape(-1) for x in data]
            except (TypeError, ValueError, RuntimeError) as e:
                raise ValueError(f"calibration data must be texts or token sequences: {e}") from e
    blocks: list[torch.Tensor] = []
    left = math.inf if tokens is None else tokens
    for s in streams:
        s = torch.as_tensor(s, dtype=torch.int64).reshape(-1).cpu()
        for start in range(0, s.numel(), block_size):
            if left <= 0:
                return blocks
            block = s[start:start + min(block_size, left)]
            if block.numel() < 2:
                continue  # a single token attends only to itself; no statistic worth a forward pass
            blocks.append(block)
            left -= block.numel()
    if not blocks:
        raise ValueError("calibration data holds no block of >= 2 tokens")
    return blocks


# ------------------------------------------------------------------------------------------------ collection
def collect_stats(model: torch.nn.Module, data: Any, *, tokens: int | None = 65536, block_size: int = 512,
                  tokenizer=None, progress: bool = True) -> ChannelStats:
    """Run ``model`` on the calibration blocks (no grad, eval, SDPA) and accumulate :class:`ChannelStats`."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd module: calibrate the eager original
    blocks = token_blocks(data, block_size, tokens, tokenizer)
    try:
        shapes = model_shapes(model)
    except ValueError:
        shapes = None  # not an HF model: take the sizes from the SDPA calls
    hkv_cfg = shapes["num_kv_heads"] if shapes else None
    state: dict[str, Any] = {"stats": None, "seen": {}, "evidence": None, "ids": None}

    def on_sdpa(path: str, q: torch.Tensor, k: torch.Tensor, kwargs: dict) -> None:
        layer = layer_index(path)
        where = f"SDPA call in {path or '<top level>'}"
        if layer is None:
            raise ValueError(f"{where}: cannot tell its decoder layer (dsc.sites.layer_index found none); "
                             "calibration needs attention inside a numbered layer container such as model.layers.N")
        state["seen"][layer] = state["seen"].get(layer, 0) + 1
        if state["seen"][layer] > 1:
            raise ValueError(f"{where}: layer {layer} calls scaled_dot_product_attention more than once per forward "
                             "(cross-attention or several attentions per layer), which a per-layer channel config "
                             "cannot describe")
        kk = _own_keys(q, k, hkv_cfg, where)
        st = state["stats"]
        if st is None:
            st = state["stats"] = ChannelStats(
                num_layers=shapes["num_layers"] if shapes else 0, num_heads=q.shape[1], num_kv_heads=kk.shape[1],
                head_dim=q.shape[-1])
        if (q.shape[1], kk.shape[1], q.shape[-1]) != (st.num_heads, st.num_kv_heads, st.head_dim):
            raise ValueError(f"{where}: heads/head_dim {q.shape[1]}/{kk.shape[1]}/{q.shape[-1]} differ from other "
                             f"layers' {st.num_heads}/{st.num_kv_heads}/{st.head_dim}; a channel config needs "
                             "uniform attention shapes")
        if layer == 0 and state["evidence"] is None:
            state["evidence"] = _rope_evidence(q, state["ids"])
            state["dtype"] = q.dtype
        st.add(layer, q, kk)

    fwd_kwargs = {"use_cache": False}
    params = inspect.signature(model.forward).parameters
    if "logits_to_keep" in params:
        fwd_kwargs["logits_to_keep"] = 1  # the statistic needs no logits; skip most of the LM head
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    total = sum(b.numel() for b in blocks)
    from tqdm.auto import tqdm

    # force_eager: a compiled forward (model.compile(), a compiled model.forward) runs its Python code, so the
    # SDPA calls are seen; the statistic must come from eager q/k anyway.
    with torch.compiler.set_stance("force_eager"), _sdpa_eval_mode(model), torch.no_grad(), \
            capture_sdpa(model, on_sdpa), \
            tqdm(total=total, unit="tok", desc="calibrating", disable=not progress) as bar:
        for block in blocks:
            state["seen"] = {}
            state["ids"] = block
            model(input_ids=block[None].to(device), **fwd_kwargs)
            if not state["seen"]:
                raise ValueError("the model made no scaled_dot_product_attention call; calibration reads q and k "
                                 "at SDPA, so load the model with attn_implementation='sdpa'")
            bar.update(block.numel())
    st: ChannelStats = state["stats"]
    if not st.num_layers:
        st.num_layers = max(st.counts) + 1
    if shapes:
        want = {k: shapes[k] for k in ("num_heads", "num_kv_heads", "head_dim")}
        got = {"num_heads": st.num_heads, "num_kv_heads": st.num_kv_heads, "head_dim": st.head_dim}
        if want != got:
            raise ValueError(f"attention as seen at SDPA {got} differs from the model config {want}")
    if "dtype" in state:
        st.rope_layout = _decide_rope_layout(state["evidence"], state["dtype"])
    st.tokens = total
    return st


def calibrate(model: torch.nn.Module, data: Any, method: str = "qk", tokens: int | None = 65536,
              block_size: int = 512, tokenizer=None, pair_aware: bool = False, progress: bool = True,
              rope_layout: str | None = "auto") -> ChannelConfig:
    """Rank every (layer, KV head)'s channels on calibration data; returns a :class:`ChannelConfig`.

    ``data``: texts (with ``tokenizer``) or token batches, see :func:`token_blocks`. ``tokens`` caps the total
    (``None``: all). ``rope_layout="auto"`` detects the layout from layer-0 queries (``None`` if not a clear
    ``rotate_half``/``interleaved`` RoPE); pass it explicitly to override. ``pair_aware`` ranks whole RoPE pairs.
    """
    _check_method(method)
    if rope_layout not in ("auto", None, *ROPE_LAYOUTS):
        raise ValueError(f"rope_layout must be 'auto', None, or one of {ROPE_LAYOUTS}, got {rope_layout!r}")
    fingerprint = model_fingerprint(getattr(model, "_orig_mod", model))  # before the long part: fails early
    st = collect_stats(model, data, tokens=tokens, block_size=block_size, tokenizer=tokenizer, progress=progress)
    layout = st.rope_layout if rope_layout == "auto" else rope_layout
    if pair_aware and layout is None:
        raise ValueError("pair_aware=True needs the model's RoPE layout, which could not be detected; pass "
                         "rope_layout='rotate_half' (HF convention) or 'interleaved' (Meta/gpt-fast)")
    return config_from_stats(st, method=method, pair_aware=pair_aware, rope_layout=layout,
                             fingerprint=fingerprint)


def config_from_stats(st: ChannelStats, *, method: str = "qk", pair_aware: bool = False,
                      rope_layout: str | None = None, fingerprint: str | None = None) -> ChannelConfig:
    """Rank collected statistics into a :class:`ChannelConfig` (several methods can share one collection)."""
    return ChannelConfig.from_scores(
        st.mean(method), pair_aware=pair_aware, rope_layout=rope_layout, num_layers=st.num_layers,
        num_heads=st.num_heads, method=method, tokens=st.tokens, fingerprint=fingerprint)

