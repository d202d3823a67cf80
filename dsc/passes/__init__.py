"""The FX side of the ``dsparse`` backend: SDPA site analysis (:mod:`.analysis`), the rewrite (:mod:`.rewrite`),
the site op and its strategies (:mod:`.site_op`), the run-time state of a compiled model (:mod:`.runtime`: its label
store :mod:`.store` and offload :mod:`.offload`), next-layer prediction (:mod:`.predict`) and :func:`dsc.explain`
(:mod:`.explain`)."""

from . import site_op  # noqa: F401,E402  (registers dsc::site_attention, dsc::site_predict and the placeholders)
