"""The FX side of the ``dsparse`` backend: SDPA site analysis (:mod:`.analysis`), the rewrite (:mod:`.rewrite`),
the run-time op and label store (:mod:`.ops`, :mod:`.store`) and :func:`dsc.explain` (:mod:`.explain`)."""
