"""dsc, the Double Sparsity compiler.

``torch.compile(model, backend="dsparse", options={...})`` decodes any compatible HF-style decoder with calibrated
Double Sparsity attention. Public API (imported lazily so ``import dsc`` stays cheap):

- :class:`DSConfig` – backend options (channel config, token budget, label format, ...)
- :class:`ChannelConfig` and :func:`calibrate` – offline channel calibration, save/load, reference interchange
- :func:`explain` – what the backend does at each attention site, and why
- :func:`compile` – ``model.compile(backend="dsparse")`` with the channel config checked against the model and a
  recompile budget of the model's own
- :func:`sparse_backend` – the backend with options bound, for ``torch.compile(mode=...)`` and HF's ``CompileConfig``
- :func:`runtime_of` – the run-time state of a compiled model (counters ``.stats``, site reports ``.reports``)
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "DSConfig": "dsc.config",
    "ChannelConfig": "dsc.calibration.config",
    "calibrate": "dsc.calibration.stats",
    "explain": "dsc.passes.explain",
    "compile": "dsc.backend",
    "sparse_backend": "dsc.backend",
    "runtime_of": "dsc.backend",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dsc' has no attribute {name!r}")
