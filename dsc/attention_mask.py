"""What an SDPA call's mask means for token selection: one rule for the backend and the evaluation.

``scaled_dot_product_attention`` takes a bool mask (True = may attend) or a float mask added to the logits; HF
builds float masks with ``torch.finfo(dtype).min`` (not ``-inf``) at masked positions, so a position is valid when
its float mask entry is above ``finfo(dtype).min / 2``. Selection only ever picks valid positions; the float mask
is still added to the logits of the picked ones (``bias``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def valid_from_mask(attn_mask: Optional[Tensor]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``(valid, bias)`` of an SDPA ``attn_mask``: ``(None, None)`` without a mask; a bool mask is ``valid`` itself
    (no bias); a float mask gives ``valid = attn_mask > finfo(dtype).min / 2`` and is the ``bias`` added to the
    logits."""
    if attn_mask is None:
        return None, None
    if attn_mask.dtype == torch.bool:
        return attn_mask, None
    if not attn_mask.dtype.is_floating_point:
        raise ValueError(f"an SDPA attn_mask is bool or floating point, got {attn_mask.dtype}")
    return attn_mask > torch.finfo(attn_mask.dtype).min / 2, attn_mask


def causal_valid(lq: int, s: int, device=None) -> Tensor:
    """``[lq, s]`` bool: the keys each query may see under SDPA's ``is_causal``, which is top-left aligned
    (query ``i`` sees keys ``j <= i``, whatever ``s``; not the bottom-right alignment of a decode step)."""
    return torch.ones(lq, s, dtype=torch.bool, device=device).tril()
