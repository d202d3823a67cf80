"""The one byte model of Double Sparsity decoding (ALGORITHM.md sec. 1): what a decode step reads per cached
(token, KV head), dense vs Double Sparsity, and what an offloaded sequence keeps on the device.

Per (token, KV head), with head_dim ``D``, ``e`` bytes per K/V element, ``r`` label channels:

- dense attention reads K and V: ``2 * D * e`` bytes (:func:`kv_bytes`);
- Double Sparsity reads the labels of every token, ``r * e`` bytes at 16 bits (the key dtype), else
  ``ceil(r * bits / 8)`` bytes of codes plus 8 bytes of fp32 scale and zero (:func:`label_bytes`), then K and V
  of the selected share ``k / S`` of the tokens (:func:`ds_bytes`);
- the byte-count limit of the speedup is dense / DS (:func:`byte_limit`).

Plain arithmetic (a model is asked only for its config and parameter sizes): the benchmarks, the demo, the
evaluation and the offload report all count with it.
"""
from __future__ import annotations

QUANT_META_BYTES = 8  # fp32 scale + fp32 zero per (token, KV head) of quantized labels


def label_bytes(r: int, bits: int, elem_bytes: int) -> int:
    """Bytes of one (token, KV head)'s labels: ``r`` channels at ``bits`` (16 = the key dtype, ``elem_bytes``
    each; 8 / 4 = codes, 4-bit packed two per byte, plus the fp32 scale and zero)."""
    if bits == 16:
        return r * elem_bytes
    if bits not in (8, 4):
        raise ValueError(f"bits must be 16, 8 or 4, got {bits!r}")
    return (r * bits + 7) // 8 + QUANT_META_BYTES


def kv_bytes(head_dim: int, elem_bytes: int) -> int:
    """Bytes of one (token, KV head)'s K and V rows: ``2 * D * e`` (what dense attention reads per token)."""
    return 2 * head_dim * elem_bytes


def ds_bytes(head_dim: int, elem_bytes: int, r: int, bits: int, frac: float) -> float:
    """Bytes Double Sparsity reads per (token, KV head) when it keeps the share ``frac = k / S`` of the tokens:
    every token's labels, then the K/V rows of the selected ones."""
    return label_bytes(r, bits, elem_bytes) + frac * kv_bytes(head_dim, elem_bytes)


def byte_limit(head_dim: int, elem_bytes: int, r: int, bits: int, frac: float) -> tuple[float, float, float]:
    """``(dense bytes, DS bytes, dense / DS)`` per (token, KV head): the speedup a bandwidth-bound step can reach."""
    dense = kv_bytes(head_dim, elem_bytes)
    ds = ds_bytes(head_dim, elem_bytes, r, bits, frac)
    return dense, ds, dense / ds


def cache_bytes(tokens: int, kv_heads: int, head_dim: int, elem_bytes: int, layers: int = 1, batch: int = 1) -> int:
    """K/V bytes of ``tokens`` positions of ``batch`` sequences over ``layers`` layers (a whole-layer transfer, or a
    full cache)."""
    return layers * batch * tokens * kv_heads * kv_bytes(head_dim, elem_bytes)


def offload_device_bytes(*, layers: int, sparse_layers: int, batch: int, kv_heads: int, sel_heads: int,
                         length: int, head_dim: int, itemsize: int, r: int, label_bits: int,
                         budget_tokens: int) -> dict:
    """Device bytes of one batch's KV state: the full cache vs offload (labels of the sparse layers, the dense
    layers' K/V resident, and one staging buffer of the selected rows, ``sel_heads`` selections of
    ``budget_tokens`` rows, used by one layer at a time)."""
    full = cache_bytes(length, kv_heads, head_dim, itemsize, layers, batch)
    dense = cache_bytes(length, kv_heads, head_dim, itemsize, layers - sparse_layers, batch)
    labels = sparse_layers * batch * length * kv_heads * label_bytes(r, label_bits, itemsize)
    staging = batch * sel_heads * budget_tokens * kv_bytes(head_dim, itemsize)
    offload = dense + labels + staging
    return {"full": full, "offload": offload, "dense_layers": dense, "labels": labels, "staging": staging,
            "saved": full - offload, "per_sequence_full": full // batch, "per_sequence_offload": offload // batch}


def attention_bytes(cfg, model_cfg, ds, batch: int, length: int, elem_bytes: int = 4) -> tuple[float, float]:
    """K/V bytes one decode step reads in all attention layers: dense vs Double Sparsity (ALGORITHM.md sec. 1,
    the per-token counts above), for a cache of ``elem_bytes`` per element (4: fp32)."""
    d = getattr(model_cfg, "head_dim", None) or model_cfg.hidden_size // model_cfg.num_attention_heads
    hkv, layers = model_cfg.num_key_value_heads, model_cfg.num_hidden_layers
    k = ds.tokens_kept(length)
    if ds.gqa == "head":  # each query head of a group may pick its own rows
        k *= model_cfg.num_attention_heads // hkv
    dense_t = kv_bytes(d, elem_bytes)
    if length < ds.dense_below:  # the sparse layers attend densely too (no labels read)
        ds_t = dense_t
    else:
        ds_t = ds_bytes(d, elem_bytes, ds.r, ds.label_bits, min(k, length) / length)
    sparse_layers = sum(1 for i in range(layers) if i not in ds.dense_layers and cfg.has_layer(i))
    per_layer = length * hkv * batch
    return layers * per_layer * dense_t, per_layer * ((layers - sparse_layers) * dense_t + sparse_layers * ds_t)


def weight_bytes(model) -> int:
    """Parameter bytes one decode step reads: every parameter once, except an input embedding table that is not
    also the output layer (a step reads only the rows of its batch's tokens from it)."""
    total = sum(tensor_bytes(p) for p in model.parameters())  # a tied weight counts once
    emb = model.get_input_embeddings().weight
    out = model.get_output_embeddings()
    if out is not None and out.weight is emb:
        return total
    return total - tensor_bytes(emb)


def tensor_bytes(t) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's quantized weights, whose ``element_size`` is that of the
    dtype they stand for) counts the tensors it is made of (int8 codes, scales). A tensor-parallel DTensor counts
    whole (all ranks), like the K/V counts beside it."""
    from torch.distributed.tensor import DTensor

    if hasattr(t, "__tensor_flatten__") and not isinstance(t, DTensor):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def step_limit(model, channels, ds, batch: int, length: int) -> float:
    """The byte-count limit of a whole decode step: (weights + dense K/V) / (weights + Double Sparsity's K/V and
    labels), for ``batch`` sequences of ``length`` cached tokens (the share of the step that sparsity can shrink)."""
    weights = weight_bytes(model)
    dense, sparse = attention_bytes(channels, model.config, ds, batch, length,
                                    next(model.parameters()).element_size())
    return (weights + dense) / (weights + sparse)
