"""A plain greedy decode loop with a static or dynamic HF cache, timed per step.

``model.generate`` hides per-step timing and adds overhead; benchmarks, the demo and the tests drive the model
through this loop instead (gpt-fast style: prefill once, then one forward per new token).
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch


def text_ids(tokenizer, length: int, split: str = "evaluation") -> torch.Tensor:
    """``length`` token ids of real essay text (repeated if the split is shorter), int64 ``[length]``."""
    from dsc.assets import essay_text

    ids = tokenizer(essay_text(split), return_tensors="pt").input_ids[0]
    if ids.numel() < length:
        ids = ids.repeat(length // ids.numel() + 1)
    return ids[:length].clone()


def make_cache(model, kind: str, max_len: int):
    """A fresh HF cache: ``"static"`` (preallocated ``max_len`` positions) or ``"dynamic"`` (grows by cat)."""
    from transformers import DynamicCache, StaticCache

    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=max_len)
    if kind == "dynamic":
        return DynamicCache(config=model.config)
    raise ValueError(f"cache kind must be 'static' or 'dynamic', got {kind!r}")


@dataclass
class DecodeResult:
    tokens: torch.Tensor                 # [B, steps] generated ids (greedy)
    logits: list[torch.Tensor]           # per step [B, vocab] (only when keep_logits)
    prefill_s: float
    step_s: list[float] = field(default_factory=list)
    cache_bytes: int = 0                 # bytes the KV cache's tensors hold at the end (distinct storages)

    @property
    def median_step_s(self) -> float:
        s = sorted(self.step_s)
        return s[len(s) // 2] if s else float("nan")


@dataclass
class Prefilled:
    """A prompt already run through the model: a static cache holding it (room for ``steps`` more tokens), the last
    position's logits ``[B, vocab]`` and the time it took. Decode runs that start from it (:func:`greedy_decode`
    with ``prefilled=``) rewind the cache to the prompt first, so one prefill serves several of them."""
    cache: object
    logits: torch.Tensor
    length: int
    seconds: float

    @property
    def rewindable(self) -> bool:
        """Whether rewinding restores the prompt: not with sliding-window layers, whose decode writes roll the
        window's rows away."""
        return not any(getattr(layer, "is_sliding", False) for layer in self.cache.layers)


def _last_only(model) -> dict:
    """Only the last position's logits are read: a model that can skip the others (HF's logits_to_keep) does, which
    spares the prefill a [B, L, vocab] tensor (3 GB at 4K tokens, batch 4, on the embedded model)."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, steps: int) -> Prefilled:
    """``input_ids`` ``[B, L]`` through the (eager) model into a static cache with room for ``steps`` more tokens.

    A batch of identical rows (a benchmark's) is run as one row and its cache widened to the batch: the same K/V and
    logits for 1/B of the work. Benchmarks share the result between the models they time (the prefill is dense for
    every policy), so each prompt is prefilled once per shape, not once per configuration."""
    b, length = input_ids.shape
    device = model_device(model)
    input_ids = input_ids.to(device)
    same = b > 1 and bool((input_ids == input_ids[:1]).all())
    kv = make_cache(model, "static", length + steps)
    t0 = clock(device)
    logits = model(input_ids=input_ids[:1] if same else input_ids, cache=kv, use_cache=True,
                   cache_position=torch.arange(length, device=device), **_last_only(model)).logits[:, -1]
    if same:
        _widen(kv, b)
        logits = logits.expand(b, -1)
    return Prefilled(kv, logits, length, clock(device) - t0)


def model_device(model) -> torch.device:
    """Where the model's weights (and so its inputs and cache) live."""
    return next(model.parameters()).device


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the device's queued work has finished (a CUDA launch returns before its kernels
    run, so an unsynchronised clock would time the launches only)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _widen(kv, batch: int) -> None:
    """A one-row static cache as ``batch`` identical rows (each layer reallocated at the batch size, then copied)."""
    for layer in kv.layers:
        k, v = layer.keys, layer.values
        layer.lazy_initialization(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
        layer.keys.copy_(k.expand_as(layer.keys))
        layer.values.copy_(v.expand_as(layer.values))


def _rewind(kv, length: int) -> None:
    """Make a static cache's next write land at ``length`` (HF's static layers write at their own running count)."""
    for layer in kv.layers:
        layer.cumulative_length.fill_(length)


@torch.no_grad()
def greedy_decode(model, input_ids: torch.Tensor, steps: int, *, forward=None, cache: str = "static",
                  attention_mask: torch.Tensor | None = None, keep_logits: bool = False,
                  progress: bool = False, prefilled: Prefilled | None = None) -> DecodeResult:
    """Prefill ``input_ids`` ``[B, L]`` then decode ``steps`` tokens greedily with ``forward`` (default: the model).

    ``attention_mask`` (``[B, L]``, 0 = padding) supports left-padded batches; it is extended by one per step.
    ``prefilled`` (from :func:`prefill` on these ids with at least ``steps`` of room) skips the prefill: the cache is
    rewound to the prompt and the decode starts from its logits.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] <= 0 or input_ids.shape[1] <= 0:
        raise ValueError(f"input_ids must be [batch > 0, length > 0], got shape {tuple(input_ids.shape)}")
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    forward = forward or model
    B, L = input_ids.shape
    if prefilled is not None and (prefilled.length != L or prefilled.logits.shape[0] != B
                                  or attention_mask is not None or cache != "static"):
        raise ValueError(f"prefilled holds {prefilled.logits.shape[0]} x {prefilled.length} tokens in a static cache "
                         f"without padding; these ids are {B} x {L} (cache {cache!r})")
    if prefilled is not None and not prefilled.rewindable:
        raise ValueError("prefilled: a cache with sliding-window layers cannot be rewound to its prompt; prefill "
                         "for each decode instead")
    kv = prefilled.cache if prefilled is not None else make_cache(model, cache, L + steps)
    device = model_device(model)
    input_ids = input_ids.to(device)
    mask = attention_mask if attention_mask is None else attention_mask.to(device)
    pos = torch.arange(L, device=device)
    last_only = _last_only(model)

    def run(ids, cache_position, mask):
        kwargs = {"attention_mask": mask} if mask is not None else {}
        kwargs.update(last_only)
        if mask is not None:
            # Left padding: positions count real tokens only, as generate() does.
            kwargs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        return forward(input_ids=ids, cache=kv, cache_position=cache_position, use_cache=True, **kwargs).logits

    if prefilled is not None:
        _rewind(kv, L)
        logits, prefill_s = prefilled.logits, prefilled.seconds
    else:
        t0 = clock(device)
        logits = run(input_ids, pos, mask)[:, -1]
        prefill_s = clock(device) - t0
    out = DecodeResult(tokens=torch.empty(B, steps, dtype=torch.long), logits=[], prefill_s=prefill_s)
    it = range(steps)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, desc="decode", unit="tok", leave=False)
    for i in it:
        nxt = logits.argmax(-1)
        out.tokens[:, i] = nxt
        if keep_logits:
            out.logits.append(logits.float().clone())
        if i == steps - 1:
            break
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        t0 = clock(device)
        logits = run(nxt[:, None], torch.tensor([L + i], device=device), mask)[:, -1]
        out.step_s.append(clock(device) - t0)
    out.cache_bytes = cache_bytes(kv)
    return out


def cache_bytes(cache) -> int:
    """Bytes held by an HF cache's K/V tensors (each storage once: offload placeholders hold one element)."""
    seen = {}
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())
