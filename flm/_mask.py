"""The causal mask, in a leaf module so that :mod:`flm.nn` (flm's attention) and :mod:`flm._fused`
(PyTorch's fused kernels) both use it without importing each other; :mod:`flm.nn` re-exports it
as ``flm.nn.causal_mask``, its public name.
"""

from __future__ import annotations

import torch

__all__ = ["causal_mask"]


def causal_mask(
    num_queries: int, num_keys: int | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """Boolean causal mask: query ``i`` attends to key ``j`` iff ``j ≤ i + (keys − queries)``.

    With ``num_keys > num_queries`` the queries are the last ``num_queries`` positions of the
    key sequence (the KV-cache case).

    Args:
        num_queries: number of query positions.
        num_keys: number of key positions (default: ``num_queries``).
        device: where to build the mask.

    Returns:
        ``(num_queries, num_keys)`` bool tensor.

    Source: handout §3.5.5 ("Causal masking").
    """
    num_keys = num_queries if num_keys is None else num_keys
    q_pos = torch.arange(num_queries, device=device) + (num_keys - num_queries)
    k_pos = torch.arange(num_keys, device=device)
    return k_pos[None, :] <= q_pos[:, None]
