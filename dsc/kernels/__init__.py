"""Double Sparsity kernels: the label cache and the ``dsc::`` ops (label_write, label_scores, select_topk,
sparse_attention, ds_decode; dense_attention over KV-native K/V), the offload ops (write_rows,
sparse_attention_host: K/V rows in host memory) and ``paged_sparse_attention`` (sparse attention over a paged KV
cache, the layout serving engines use: :mod:`.paged`).

Importing this package registers the ops, so ``torch.ops.dsc.ds_decode`` etc. exist afterwards; :class:`DecodePlan`
runs ``ds_decode`` per decode step over fixed buffers, its arguments checked once (:mod:`.plan`). Implementations:
:mod:`.reference` (plain-torch oracle), :mod:`.cpu` (fast CPU path), :mod:`.triton_ops` (GPU launchers).
"""
from __future__ import annotations

from .ops import (dense_attention, ds_decode, label_scores, label_write, paged_sparse_attention, select_topk,
                  sparse_attention, sparse_attention_host, write_rows)
from .plan import DecodePlan
from .reference import alloc_labels, label_prefix

__all__ = ["DecodePlan", "alloc_labels", "dense_attention", "ds_decode", "label_prefix", "label_scores",
           "label_write", "paged_sparse_attention", "select_topk", "sparse_attention", "sparse_attention_host", "write_rows"]
