"""Offline channel calibration: statistics (:func:`calibrate`), :class:`ChannelConfig`, reference-format
import/export, the cached default calibration of the embedded model, and the ``dsc calibrate`` command."""
from __future__ import annotations

import importlib

_LAZY = {
    "ChannelConfig": "dsc.calibration.config",
    "calibrate": "dsc.calibration.stats",
    "collect_stats": "dsc.calibration.stats",
    "import_reference": "dsc.calibration.interchange",
    "export_reference": "dsc.calibration.interchange",
    "default_config": "dsc.calibration.default",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dsc.calibration' has no attribute {name!r}")
