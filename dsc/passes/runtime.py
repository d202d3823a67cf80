"""The run-time state of one ``dsparse`` compile, with one owner.

A :class:`Runtime` is made per compiled model (per :class:`dsc.backend.SparseBackend`, which ``dsc.compile`` and
``dsc.sparse_backend`` create, or per ``options`` object of ``torch.compile(..., backend="dsparse")``). It owns
everything the rewritten graphs need between calls:

- the site table: what each rewritten attention site does (:class:`SiteSpec`); graphs carry ``(runtime key,
  site index)``, two ints, as the site op's first arguments;
- the label store (:class:`dsc.passes.store.LabelStore`): label caches and, with offload, the host K/V stores;
- the predictions in flight (offload with next-layer prediction);
- each site's CPU decode plan (the signature its ops' checks passed for, :func:`dsc.passes.site_op.planned_decode`);
- the counters (``stats``) that ``dsc.explain``, the benchmarks and the tests read;
- the site reports of every graph compiled (``reports``), the debug switches (from its config).

The compiled graphs keep their runtime alive (the backend's compiled callables hold it); when they are freed
(``torch._dynamo.reset()``, a recompiled model), so is the runtime with every label cache it holds. The only
process-wide object is :data:`_LIVE`, a weak index from key to live runtime (it holds none of their state).
"""
from __future__ import annotations

import threading
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

from dsc.config import DSConfig, Selection

from .store import LabelSpec, LabelStore

_LIVE: "weakref.WeakValueDictionary[int, Runtime]" = weakref.WeakValueDictionary()
_LIVE_LOCK = threading.Lock()


def _claim_key(rt: "Runtime") -> int:
    """The smallest positive int no live runtime holds. Small and reproducible (1 for a process's first compiled
    model), because graphs carry it as a constant: inductor's and AOTAutograd's caches key on it, so a second
    process compiling the same model hits them. A key is free again only once its runtime, hence every graph that
    names it, is gone."""
    with _LIVE_LOCK:
        key = 1
        while key in _LIVE:
            key += 1
        _LIVE[key] = rt
        return key


@dataclass(frozen=True)
class SiteSpec:
    """What one rewritten site does at run time: its layer's labels, the selection knobs, and its policies."""

    label: LabelSpec
    layer: int
    selection: Selection
    dense_prefill: bool = True
    offload: bool = False

    @property
    def group(self) -> bool:
        return self.selection.gqa == "group"

    @property
    def min_length(self) -> int:
        return self.selection.dense_below


class Runtime:
    """The state of one compiled model (see the module docstring). ``config``: the backend options it runs."""

    def __init__(self, config: Optional[DSConfig] = None):
        self.config = config if config is not None else DSConfig()
        self.stats: Counter = Counter()
        self.labels = LabelStore(self.stats, device_sync=self.config.device_sync)
        self.sites: list[SiteSpec] = []
        self.reports: list[list] = []  # per compiled graph: its analysis.Site decisions (graph nodes dropped)
        self.predictions: dict[int, tuple] = {}  # site -> (idx, k block, v block, rows) fetched ahead
        self.plans: dict[int, tuple] = {}  # site -> (signature, planned): its CPU decode step's plan (site_op)
        self._site_index: dict[SiteSpec, int] = {}
        self._label_specs: dict[tuple, tuple[LabelSpec, Any]] = {}
        self._lock = threading.Lock()
        self.key = _claim_key(self)  # the int the graphs carry to find this runtime (unique among live ones)

    @property
    def zero_copy(self) -> bool:
        return self.config.zero_copy

    @property
    def measure_overlap(self) -> bool:
        return self.config.measure_overlap

    def label_spec(self, channels_cfg: Any, layer: int, r: int, bits: int) -> LabelSpec:
        """One LabelSpec per (channel config, layer, r, bits): the prefill and decode graphs of a model share it,
        hence share the label caches."""
        key = (id(channels_cfg), layer, r, bits)
        with self._lock:
            hit = self._label_specs.get(key)
            if hit is None:  # the value keeps the config alive, so its id() stays unique while filed here
                spec = LabelSpec(channels=channels_cfg.channels(layer, r).contiguous(), bits=bits)
                hit = self._label_specs[key] = (spec, channels_cfg)
            return hit[0]

    def add_site(self, spec: SiteSpec) -> int:
        """The index of ``spec`` in the site table (a recompiled graph reuses the index of an equal site)."""
        with self._lock:
            if spec not in self._site_index:
                self._site_index[spec] = len(self.sites)
                self.sites.append(spec)
            return self._site_index[spec]

    def counts(self) -> dict[str, int]:
        """Live objects this runtime holds (tests: nothing accumulates)."""
        return {"sites": len(self.sites), "label_specs": len(self._label_specs), "reports": len(self.reports),
                "entries": len(self.labels.entries), "predictions": len(self.predictions), "plans": len(self.plans)}


def lookup(key: int) -> Runtime:
    """The live runtime a graph's site op names."""
    rt = _LIVE.get(key)
    if rt is None:
        raise RuntimeError("dsparse: this compiled graph's runtime was freed (its compiled model was reset or "
                           "garbage-collected while the graph still ran); recompile the model")
    return rt


def live_runtimes() -> list[Runtime]:
    """Every runtime alive in this process (tests: compiles that are reset leave none behind)."""
    return list(_LIVE.values())
