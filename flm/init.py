"""Parameter initialisers for flm's layers: truncated normals from an explicit ``torch.Generator``.

Each ``init_*`` returns the parameter dict its layer in :mod:`flm.nn` takes. Values are drawn on
the generator's device (CPU for a default generator) in float32 and then moved, so one seed gives
the same model on every device. On the ``meta`` device nothing is drawn or allocated: the result
holds shapes and dtypes only (e.g. to check a checkpoint against a config).

Source: CS336 assignment 1 handout §3.4.1 (parameter initialisation).
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = [
    "truncated_normal",
    "init_linear",
    "init_embedding",
    "init_rms_norm",
    "init_swiglu",
    "init_silu_ffn",
    "init_multihead_self_attention",
    "init_transformer_block",
]

Params = dict[str, Any]


def truncated_normal(
    shape: tuple[int, ...],
    std: float,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Sample ``N(0, std²)`` truncated to ``[-3·std, 3·std]`` by inverse-CDF sampling.

    The draw happens on the generator's device (CPU for a default ``torch.Generator()``) in
    float32, then moves to ``device``/``dtype``, so one seed gives the same values everywhere.

    Args:
        shape: output shape.
        std: standard deviation before truncation (> 0).
        generator: source of randomness (``None``: PyTorch's global generator).
        device: target device.
        dtype: target float dtype (default float32).

    Returns:
        A tensor of ``shape`` with values in ``[-3·std, 3·std]`` (uninitialised on ``meta``).

    Source: handout §3.4.1 (what ``torch.nn.init.trunc_normal_`` computes).
    """
    if device is not None and torch.device(device).type == "meta":  # shapes only: draw nothing
        return torch.empty(shape, device="meta", dtype=dtype or torch.float32)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    lo = 0.5 * (1.0 + math.erf(-3.0 / math.sqrt(2.0)))  # Φ(-3)
    u = torch.rand(shape, generator=generator, device=gen_device, dtype=torch.float32)
    u = lo + (1.0 - 2.0 * lo) * u  # uniform on [Φ(-3), Φ(3)]
    z = math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)  # Φ⁻¹(u)
    z = z.clamp_(-3.0, 3.0) * std
    return z.to(device=device, dtype=dtype or torch.float32)


def init_linear(
    d_in: int,
    d_out: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Params:
    """Initialise a linear layer: ``W ~ N(0, 2/(d_in + d_out))`` truncated at ±3σ.

    Returns:
        ``{"weight": (d_out, d_in)}``.

    Source: handout §3.4.1.
    """
    std = math.sqrt(2.0 / (d_in + d_out))
    return {"weight": truncated_normal((d_out, d_in), std, generator=generator, device=device, dtype=dtype)}


def init_embedding(
    vocab_size: int,
    d_model: int,
    *,
    std: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Params:
    """Initialise an embedding table: ``N(0, std²)`` truncated at ±3·std (handout: std 1).

    Returns:
        ``{"weight": (vocab_size, d_model)}``.

    Source: handout §3.4.1.
    """
    return {"weight": truncated_normal((vocab_size, d_model), std, generator=generator, device=device, dtype=dtype)}


def init_rms_norm(
    d_model: int, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Params:
    """Initialise an RMSNorm gain to ones.

    Returns:
        ``{"weight": (d_model,)}``.

    Source: handout §3.4.1.
    """
    return {"weight": torch.ones(d_model, device=device, dtype=dtype or torch.float32)}


def init_swiglu(
    d_model: int,
    d_ff: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Params:
    """Initialise a SwiGLU FFN: ``w1, w3: (d_ff, d_model)``, ``w2: (d_model, d_ff)``.

    Source: handout §3.4.1, §3.5.2.
    """
    kw = dict(generator=generator, device=device, dtype=dtype)
    return {
        "w1": init_linear(d_model, d_ff, **kw),
        "w2": init_linear(d_ff, d_model, **kw),
        "w3": init_linear(d_model, d_ff, **kw),
    }


def init_silu_ffn(
    d_model: int,
    d_ff: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Params:
    """Initialise an ungated SiLU FFN: ``w1: (d_ff, d_model)``, ``w2: (d_model, d_ff)``.

    Source: handout §7.3.
    """
    kw = dict(generator=generator, device=device, dtype=dtype)
    return {"w1": init_linear(d_model, d_ff, **kw), "w2": init_linear(d_ff, d_model, **kw)}


def init_multihead_self_attention(
    d_model: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Params:
    """Initialise the four ``(d_model, d_model)`` projections of multi-head self-attention.

    Returns:
        ``{"q_proj", "k_proj", "v_proj", "output_proj"}``, each ``{"weight": (d_model, d_model)}``.

    Source: handout §3.4.1, §3.5.5.
    """
    kw = dict(generator=generator, device=device, dtype=dtype)
    return {name: init_linear(d_model, d_model, **kw) for name in ("q_proj", "k_proj", "v_proj", "output_proj")}


def init_transformer_block(
    d_model: int,
    d_ff: int,
    *,
    norm: str = "pre",
    ffn: str = "swiglu",
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Params:
    """Initialise one Transformer block (norm and FFN variants included).

    Args:
        d_model: residual width.
        d_ff: FFN inner width.
        norm: ``"pre"``/``"post"`` (RMSNorm gains ``ln1``, ``ln2``) or ``"none"`` (no gains).
        ffn: ``"swiglu"`` (``w1, w2, w3``) or ``"silu"`` (``w1, w2``).
        generator: source of randomness.
        device: where to place the parameters.
        dtype: parameter dtype (default float32).

    Returns:
        ``{"ln1", "attn", "ln2", "ffn"}`` (without the norms when ``norm == "none"``).

    Source: handout §3.4.1, §3.6.
    """
    kw = dict(generator=generator, device=device, dtype=dtype)
    init_ffn = init_swiglu if ffn == "swiglu" else init_silu_ffn
    block: Params = {}
    if norm != "none":
        block["ln1"] = init_rms_norm(d_model, device=device, dtype=dtype)
    block["attn"] = init_multihead_self_attention(d_model, **kw)
    if norm != "none":
        block["ln2"] = init_rms_norm(d_model, device=device, dtype=dtype)
    block["ffn"] = init_ffn(d_model, d_ff, **kw)
    return block
