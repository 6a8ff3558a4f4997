"""Resource accounting of the Transformer LM from its config alone: parameters, FLOPs, memory.

Answers the handout's accounting questions (§3.6 "transformer_accounting", §4.3
"adamwAccounting"): :func:`count_params`, :func:`forward_flops` by component,
:func:`train_step_flops` (what MFU divides by), :func:`adamw_step_flops`,
:func:`training_memory` and :func:`max_batch_size`. Every function reads only a config's sizes
(:class:`ModelShape`, which :class:`flm.model.TransformerConfig` satisfies), so this module
imports nothing of the model; :mod:`flm.model` re-exports these names.

Source: CS336 assignment 1 handout §3.6, §4.3.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

__all__ = [
    "ModelShape",
    "count_params",
    "forward_flops",
    "train_step_flops",
    "training_memory",
    "adamw_step_flops",
    "max_batch_size",
]


class ModelShape(Protocol):
    """The sizes and choices of a model that accounting reads (:class:`flm.model.TransformerConfig` has them).

    Attributes:
        vocab_size: number of token ids ``V``.
        context_length: the default sequence length ``s``.
        d_model: residual-stream width ``d``.
        num_layers: number of blocks ``L``.
        num_heads: attention heads ``h``.
        d_ff: feed-forward inner width.
        ffn: ``"swiglu"`` (3 matrices) or ``"silu"`` (2).
        norm: ``"none"`` drops the RMSNorm gains.
        tie_embeddings: whether the LM head shares the embedding table.
    """

    @property
    def vocab_size(self) -> int: ...
    @property
    def context_length(self) -> int: ...
    @property
    def d_model(self) -> int: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_heads(self) -> int: ...
    @property
    def d_ff(self) -> int: ...
    @property
    def ffn(self) -> str: ...
    @property
    def norm(self) -> str: ...
    @property
    def tie_embeddings(self) -> bool: ...


def count_params(config: ModelShape) -> int:
    """Number of trainable parameters of the model ``config`` describes.

    Embedding ``V·d`` + per block (4 attention projections ``4d²``, FFN ``3·d·d_ff`` (SwiGLU) or
    ``2·d·d_ff`` (SiLU), two gains ``2d``) + final gain ``d`` + LM head ``V·d`` (0 when tied).
    Equals ``flm.tree.num_elements(init_params(config))``.

    Args:
        config: the model.

    Returns:
        The parameter count.

    Source: handout §3.6, transformer_accounting (a).
    """
    d, v = config.d_model, config.vocab_size
    ffn = (3 if config.ffn == "swiglu" else 2) * d * config.d_ff
    norms = 2 * d if config.norm != "none" else 0
    block = 4 * d * d + ffn + norms
    total = v * d + config.num_layers * block
    if config.norm != "none":
        total += d
    if not config.tie_embeddings:
        total += v * d
    return total


def forward_flops(config: ModelShape, seq_len: int | None = None) -> dict[str, int]:
    """Matrix-multiply FLOPs of one forward pass over one sequence, by component.

    Counts ``2·m·n·p`` per ``(m×n)(n×p)`` product (handout rule), for ``s = seq_len`` tokens:

    - ``attention_projections``: Q, K, V and output projections, ``L · 4 · 2·s·d²``
    - ``attention_scores``: ``Q Kᵀ``, ``L · 2·s²·d``
    - ``attention_values``: ``softmax(·) V``, ``L · 2·s²·d``
    - ``ffn``: ``L · 3 · 2·s·d·d_ff`` (SwiGLU; 2 matrices for SiLU)
    - ``lm_head``: ``2·s·d·V``
    - ``total``: their sum.

    Args:
        config: the model's hyperparameters.
        seq_len: tokens per sequence (default ``context_length``).

    Returns:
        ``dict`` from component name to FLOPs (ints).

    Source: handout §3.6, transformer_accounting (b)–(e).
    """
    s = config.context_length if seq_len is None else seq_len
    d, L = config.d_model, config.num_layers
    n_ffn = 3 if config.ffn == "swiglu" else 2
    out = {
        "attention_projections": L * 4 * 2 * s * d * d,
        "attention_scores": L * 2 * s * s * d,
        "attention_values": L * 2 * s * s * d,
        "ffn": L * n_ffn * 2 * s * d * config.d_ff,
        "lm_head": 2 * s * d * config.vocab_size,
    }
    out["total"] = sum(out.values())
    return out


def train_step_flops(config: ModelShape, batch_size: int, seq_len: int | None = None) -> int:
    """FLOPs of one training step: forward + backward ≈ 3 × forward (Kaplan et al. 2020).

    Source: handout §4.3 adamwAccounting (d).
    """
    return 3 * batch_size * forward_flops(config, seq_len)["total"]


def adamw_step_flops(config: ModelShape) -> int:
    """Approximate FLOPs of one AdamW update: about 15 elementwise operations per parameter.

    (m update 3, v update 4, bias-corrected step size O(1), ``m/(√v+ε)`` 3, parameter update 2,
    weight decay 2, plus the square root, counted as 1.)

    Source: handout §4.3 adamwAccounting (c), Algorithm 1.
    """
    return 15 * count_params(config)


def training_memory(
    config: ModelShape, batch_size: int, *, bytes_per_element: int = 4, seq_len: int | None = None
) -> dict[str, int]:
    """Peak memory of a float32 AdamW training step, by component, in bytes.

    ``parameters = P``, ``gradients = P``, ``optimizer_state = 2P`` (AdamW's m and v) elements.
    ``activations`` counts the tensors the handout lists for the backward pass, per layer and
    sequence of ``s`` tokens: two RMSNorm inputs ``2sd``; Q, K, V ``3sd``; scores ``QᵀK`` and
    their softmax ``2hs²``; weighted values ``sd``; output projection ``sd``; FFN ``W1`` output and
    its SiLU ``2s·d_ff`` (SwiGLU adds the ``W3`` output and the gated product, ``2s·d_ff``); ``W2``
    output ``sd``. Then the final RMSNorm ``sd``, logits ``sV`` and the cross-entropy's softmax
    ``sV``. With ``d_ff = 4d`` and ``ffn="silu"`` this is the handout's
    ``B·[L·(16sd + 2hs²) + sd + 2sV]``.

    Args:
        config: the model's hyperparameters.
        batch_size: sequences per step ``B``.
        bytes_per_element: 4 for float32.
        seq_len: tokens per sequence (default ``context_length``).

    Returns:
        ``{"parameters", "gradients", "optimizer_state", "activations", "total"}`` in bytes.

    Source: handout §4.3, adamwAccounting (a)–(b).
    """
    s = config.context_length if seq_len is None else seq_len
    d, h, L, v, f = config.d_model, config.num_heads, config.num_layers, config.vocab_size, config.d_ff
    p = count_params(config)
    ffn_acts = (4 if config.ffn == "swiglu" else 2) * s * f
    per_layer = 2 * s * d + 3 * s * d + 2 * h * s * s + s * d + s * d + ffn_acts + s * d
    activations = batch_size * (L * per_layer + s * d + 2 * s * v)
    out = {
        "parameters": p * bytes_per_element,
        "gradients": p * bytes_per_element,
        "optimizer_state": 2 * p * bytes_per_element,
        "activations": activations * bytes_per_element,
    }
    out["total"] = sum(out.values())
    return out


def max_batch_size(config: ModelShape, memory_bytes: float, **kw: Any) -> int:
    """Largest batch size whose :func:`training_memory` total fits in ``memory_bytes``.

    Source: handout §4.3 adamwAccounting (b).
    """
    fixed = training_memory(config, 0, **kw)["total"]
    per_seq = training_memory(config, 1, **kw)["total"] - fixed
    return max(0, math.floor((memory_bytes - fixed) / per_seq))
