"""Naming of attention sites: one place that maps a module path to a decoder layer index.

Calibration (eager, module hooks) and the backend (``node.meta["nn_module_stack"]``) both see module paths such
as ``model.layers.3.self_attn`` or Dynamo's ``L['self'].model.layers[3].self_attn``; both must agree on the layer.
"""
from __future__ import annotations

import re

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
