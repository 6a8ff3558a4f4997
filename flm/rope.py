"""Rotary position embedding (RoPE): rotate each pair of query/key features by an angle that
grows with the token's position, so attention scores depend on relative positions.

Source: CS336 assignment 1 handout §3.5.3, eqs. (8)–(9); Su et al. (2021), "RoFormer".
"""

from __future__ import annotations

import torch
from einops import rearrange

from flm._compat import is_compiling

__all__ = ["rope", "rope_tables", "apply_rope", "check_rope"]


def rope_tables(
    token_positions: torch.Tensor, d_k: int, theta: float, *, dtype: torch.dtype, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation angles of RoPE as ``cos`` and ``sin`` tables: ``θ_{i,k} = i / Θ^{2k/d_k}`` for
    position ``i`` and pair ``k``.

    Args:
        token_positions: ``(..., seq_len)`` integer (or float) positions.
        d_k: the (even) feature dimension.
        theta: the RoPE base Θ.
        dtype: the compute dtype (float32 or float64).
        device: where to build them (default: the positions' device).

    Returns:
        ``(cos, sin)``, each ``(..., seq_len, d_k / 2)`` of ``dtype``.

    Source: handout §3.5.3, eqs. (8)–(9); Su et al. (2021).
    """
    device = token_positions.device if device is None else device
    inv_freq = theta ** (-torch.arange(0, d_k, 2, device=device, dtype=dtype) / d_k)  # (d_k/2,)
    angles = token_positions.to(device=device, dtype=dtype)[..., None] * inv_freq  # (..., seq_len, d_k/2)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair ``(x_{2k}, x_{2k+1})`` by the tables' angle, computed in their dtype.

    The rotation of a pair is the product of complex numbers ``(x_{2k} + i·x_{2k+1})·(cos + i·sin)``.
    Eager PyTorch computes it as one complex multiply (~7× faster than the separate real
    multiplies, adds and the stack that re-interleaves them); under ``torch.compile`` the real
    form is used, which inductor fuses (it generates no code for complex numbers). Both are the
    same four products and two sums.

    Args:
        x: ``(..., seq_len, d_k)`` with even ``d_k``, any float dtype.
        cos: ``(..., seq_len, d_k / 2)`` from :func:`rope_tables` (broadcasting against ``x``).
        sin: like ``cos``.

    Returns:
        ``(..., seq_len, d_k)`` in ``x``'s dtype.

    Source: handout §3.5.3, eq. (8) (the block-diagonal rotation applied pairwise).
    """
    x_c = x.to(cos.dtype)
    if is_compiling():
        pairs = rearrange(x_c, "... (half two) -> ... half two", two=2)
        x_even, x_odd = pairs[..., 0], pairs[..., 1]
        rotated = torch.stack((x_even * cos - x_odd * sin, x_even * sin + x_odd * cos), dim=-1)
        return rearrange(rotated, "... half two -> ... (half two)").to(x.dtype)
    as_complex = torch.view_as_complex(x_c.contiguous().unflatten(-1, (-1, 2)))  # (..., d_k/2) complex
    return torch.view_as_real(as_complex * torch.complex(cos, sin)).flatten(-2).to(x.dtype)


def rope(x: torch.Tensor, token_positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary position embedding: rotate each pair ``(x_{2k}, x_{2k+1})`` by ``pos / θ^{2k/d_k}``.

    Args:
        x: ``(..., seq_len, d_k)`` with even ``d_k``.
        token_positions: ``(..., seq_len)`` integer (or float) absolute positions; its leading
            dimensions broadcast against ``x``'s (right-aligned, e.g. ``(batch, 1, seq_len)``
            for ``x`` of ``(batch, heads, seq_len, d_k)``).
        theta: the RoPE base Θ (e.g. 10000.0).

    Returns:
        ``(..., seq_len, d_k)`` in ``x``'s dtype; angles and rotation computed in float32 (float64 for float64 input).

    Raises:
        ValueError: if ``d_k`` is odd, ``theta`` is not positive, or the positions' last
            dimension is not ``seq_len``.

    Source: handout §3.5.3, eqs. (8)–(9); Su et al. (2021).
    """
    d_k = x.shape[-1]
    check_rope(d_k, theta, token_positions.shape[-1], x.shape[-2])
    cos, sin = rope_tables(
        token_positions, d_k, theta, dtype=torch.promote_types(x.dtype, torch.float32), device=x.device
    )
    return apply_rope(x, cos, sin)


def check_rope(d_k: int, theta: float, num_positions: int, seq_len: int) -> None:
    """Validate RoPE's arguments before any work.

    Raises:
        ValueError: naming the value, if ``d_k`` is odd, ``theta`` is not positive, or the number
            of positions differs from ``seq_len``.
    """
    if d_k % 2:
        raise ValueError(f"rope: head dimension d_k={d_k} must be even")
    if theta <= 0:
        raise ValueError(f"rope: theta must be positive, got {theta}")
    if num_positions != seq_len:
        raise ValueError(f"rope: token_positions has {num_positions} positions but x has seq_len={seq_len}")
