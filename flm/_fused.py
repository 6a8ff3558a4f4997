"""The one place flm calls PyTorch's fused attention kernels.

:func:`flm.nn.dot_product_attention` routes here for ``implementation="sdpa"``, and for the
default ``"auto"`` everywhere but inside ``torch.func.vmap`` (the fused CPU kernels have no
batching rule there). The result is tested equal to flm's own masked-softmax attention, forward
and gradients (``tests/test_nn.py``); flm's attention stays selectable as the reference with
``attention="flm"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flm._mask import causal_mask


def fused_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, *, causal: bool = False
) -> torch.Tensor:
    """Attention with PyTorch's fused kernels (flash / memory-efficient / math).

    Args:
        q: ``(..., queries, d_k)``.
        k: ``(..., keys, d_k)``.
        v: ``(..., keys, d_v)``.
        mask: optional bool mask broadcastable to ``(..., queries, keys)`` (True = attend).
        causal: the causal mask ``j ≤ i + (keys − queries)`` instead of ``mask``.

    Returns:
        ``(..., queries, d_v)``.

    Source: handout §3.5.4; Dao et al. (2022) FlashAttention.
    """
    if causal:
        if q.shape[-2] == k.shape[-2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # PyTorch's is_causal aligns the mask top-left; flm's causal mask aligns it bottom-right
        # (queries are the last positions of the keys), so pass it explicitly.
        mask = causal_mask(q.shape[-2], k.shape[-2], device=q.device)
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return F.scaled_dot_product_attention(q, k, v)
