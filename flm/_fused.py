"""The one place flm calls PyTorch's fused attention: an explicitly selected fast path.

``TransformerConfig(attention="sdpa")`` routes attention here instead of
:func:`flm.nn.scaled_dot_product_attention`. The result is tested equal to flm's own attention,
forward and gradients (tests/test_nn.py). It has no ``torch.func.vmap`` batching rule, so
vmapped training uses ``attention="flm"``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812  (fast path, selected explicitly)


def fused_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Causal attention with PyTorch's fused kernels (flash / memory-efficient / math).

    Args:
        q: ``(..., queries, d_k)``.
        k: ``(..., keys, d_k)``.
        v: ``(..., keys, d_v)``.
        mask: optional bool mask ``(queries, keys)`` (True = attend); when ``None`` the plain
            causal mask ``j ≤ i`` is used (queries = keys).

    Returns:
        ``(..., queries, d_v)``.

    Source: handout §3.5.4; Dao et al. (2022) FlashAttention.
    """
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
