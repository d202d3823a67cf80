"""The FX side of the ``dsparse`` backend: SDPA site analysis (:mod:`.analysis`), the rewrite (:mod:`.rewrite`),
the run-time op and label store (:mod:`.ops`, :mod:`.store`) and :func:`dsc.explain` (:mod:`.explain`)."""

from . import site_op  # noqa: F401,E402  (registers dsc::site_attention, dsc::site_predict and the placeholders)
