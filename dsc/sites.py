"""Attention sites: which calls are SDPA, and which decoder layer a module path names (one place for both).

Calibration (eager, module hooks), the evaluation policies (a ``TorchFunctionMode``) and the backend
(``node.meta["nn_module_stack"]``) all recognize SDPA calls and see module paths such as
``model.layers.3.self_attn`` or Dynamo's ``L['self'].model.layers[3].self_attn``; all must agree.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

# The callables an SDPA call reaches a TorchFunctionMode or an FX graph as.
SDPA_FUNCTIONS = frozenset({F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention})


def is_sdpa(func) -> bool:
    """Whether ``func`` (a ``__torch_function__`` func or an FX node target) is scaled_dot_product_attention."""
    try:
        return func in SDPA_FUNCTIONS
    except TypeError:  # an unhashable target
        return False


SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def sdpa_arguments(args: tuple, kwargs: dict | None) -> dict:
    """An SDPA call's arguments by name (``query``, ``key``, ... as in :data:`SDPA_ARGS`), positional or not."""
    out = dict(zip(SDPA_ARGS, args))
    out.update(kwargs or {})
    return out


@contextmanager
def module_stack(model: torch.nn.Module, keep: Callable[[str], bool] | None = None) -> Iterator[list[str]]:
    """While active, the yielded list holds the paths (``named_modules`` names) of the modules of ``model``
    running now, innermost last (forward pre-hooks push, forward hooks pop; removed on exit). ``keep(path)``
    limits the hooks to some modules (e.g. those :func:`layer_index` places in a layer)."""
    stack: list[str] = []
    handles = []

    def push(name):
        return lambda mod, args: stack.append(name)

    def pop(mod, args, out):
        if stack:
            stack.pop()

    try:
        for name, mod in model.named_modules():
            if keep is None or keep(name):
                handles.append(mod.register_forward_pre_hook(push(name)))
                handles.append(mod.register_forward_hook(pop, always_call=True))
        yield stack
    finally:
        for h in handles:
            h.remove()


_LAYER_CONTAINERS = {"layers", "layer", "h", "blocks", "block"}
_TOKEN = re.compile(r"[A-Za-z_]\w*|\d+")


def layer_index(module_path: str) -> int | None:
    """The decoder-layer index in a module path: the number after the outermost ``layers``/``h``/``blocks``
    container (T5's ``decoder.block.3.layer.1.EncDecAttention`` is block 3; its inner ``layer.N`` numbers the
    sub-layers), else ``None``."""
    tokens = [t for t in _TOKEN.findall(module_path) if t != "_modules"]
    for name, nxt in zip(tokens, tokens[1:]):
        if name in _LAYER_CONTAINERS and nxt.isdigit():
            return int(nxt)
    return None
