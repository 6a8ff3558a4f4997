"""The Transformer language model as a pure function over a parameter tree, and its accounting.

``init_params(config)`` builds the nested dict of tensors whose flattened keys are the handout's
reference state-dict keys; ``transformer_lm(params, token_ids, config)`` maps token ids to
next-token logits. ``count_params``, ``forward_flops`` and ``training_memory`` answer the
handout's resource-accounting questions (§3.6 "transformer_accounting", §4.3 "adamwAccounting")
from a config alone.

Source: CS336 assignment 1 handout §3.1–3.6 (Figure 1), §4.3.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flm import nn
from flm._compat import checks_enabled

__all__ = [
    "TransformerConfig",
    "CHOICES",
    "init_params",
    "param_template",
    "check_params",
    "transformer_lm",
    "check_token_ids",
    "count_params",
    "forward_flops",
    "train_step_flops",
    "training_memory",
    "adamw_step_flops",
]

Params = dict[str, Any]

#: The allowed values of each choice of :class:`TransformerConfig`: the block's
#: (:data:`flm.nn.BLOCK_CHOICES`) and the position encoding; the ``flm`` command's flags read it.
CHOICES: dict[str, tuple[str, ...]] = {**nn.BLOCK_CHOICES, "position": ("rope", "nope")}
# The longest context a config may claim (2**24 tokens): a guard against corrupt or hand-edited
# configs, far above anything this library trains.
MAX_CONTEXT_LENGTH = 1 << 24


@dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of a decoder-only Transformer LM (validated at construction).

    Attributes:
        vocab_size: number of token ids.
        context_length: the longest sequence the model accepts.
        d_model: residual-stream width.
        num_layers: number of Transformer blocks.
        num_heads: attention heads; ``d_model % num_heads == 0``.
        d_ff: inner width of the feed-forward network (≈ 8/3·d_model for SwiGLU).
        rope_theta: RoPE base Θ.
        eps: RMSNorm epsilon.
        norm: ``"pre"`` (default), ``"post"`` or ``"none"`` (handout §7.3 ablations).
        ffn: ``"swiglu"`` (default) or ``"silu"`` (ungated, §7.3).
        position: ``"rope"`` (default) or ``"nope"`` (no position information, §7.3).
        tie_embeddings: share the token embedding with the LM head (no ``lm_head`` parameter).
        attention: ``"auto"`` (default: PyTorch's fused kernels, flm's own attention under
            ``vmap``), ``"flm"`` (flm's masked-softmax attention, the reference) or ``"sdpa"``
            (always the fused kernels); see :func:`flm.nn.dot_product_attention`.

    Raises:
        ValueError: naming the offending value, e.g. ``d_model % num_heads != 0`` or an odd
            head dimension with RoPE.
    """

    vocab_size: int
    context_length: int
    d_model: int
    num_layers: int
    num_heads: int
    d_ff: int
    rope_theta: float = 10000.0
    eps: float = 1e-5
    norm: str = "pre"
    ffn: str = "swiglu"
    position: str = "rope"
    tie_embeddings: bool = False
    attention: str = "auto"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "d_model", "num_layers", "num_heads", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TransformerConfig: {name} must be a positive int, got {value!r}")
        if self.context_length > MAX_CONTEXT_LENGTH:
            raise ValueError(
                f"TransformerConfig: context_length={self.context_length} exceeds the limit {MAX_CONTEXT_LENGTH}"
            )
        if self.d_model % self.num_heads:
            raise ValueError(
                f"TransformerConfig: d_model={self.d_model} is not divisible by num_heads={self.num_heads}"
            )
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"TransformerConfig: {name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.position == "rope":
            if self.d_head % 2:
                raise ValueError(
                    f"TransformerConfig: RoPE needs an even head dimension, got d_model/num_heads="
                    f"{self.d_model}/{self.num_heads}={self.d_head}"
                )
            if not self.rope_theta > 0:
                raise ValueError(f"TransformerConfig: rope_theta must be positive, got {self.rope_theta!r}")
        if not self.eps > 0:
            raise ValueError(f"TransformerConfig: eps must be positive, got {self.eps!r}")

    @property
    def d_head(self) -> int:
        """Per-head dimension ``d_model // num_heads``."""
        return self.d_model // self.num_heads

    @property
    def block(self) -> nn.BlockConfig:
        """The settings each Transformer block takes (:class:`flm.nn.BlockConfig`)."""
        return nn.BlockConfig(
            num_heads=self.num_heads,
            rope_theta=self.rope_theta if self.position == "rope" else None,
            norm=self.norm,
            ffn=self.ffn,
            eps=self.eps,
            attention=self.attention,
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the config as a JSON-serialisable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TransformerConfig:
        """Build a config from :meth:`to_dict`'s output (e.g. a checkpoint's or ``config.json``'s).

        Args:
            d: field name -> value; missing fields take their defaults.

        Returns:
            The validated :class:`TransformerConfig`.

        Raises:
            ValueError: unknown keys, or values the config's validation rejects.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"TransformerConfig.from_dict: unknown keys {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> TransformerConfig:
        """Return a copy with ``changes`` applied (validated again).

        Args:
            **changes: field name -> new value.

        Returns:
            A new :class:`TransformerConfig`.

        Raises:
            ValueError: a value the validation rejects; ``TypeError``: an unknown field.
        """
        return dataclasses.replace(self, **changes)


def init_params(
    config: TransformerConfig,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Params:
    """Initialise all parameters of the LM with the handout's initialisation (§3.4.1).

    Values are drawn on the generator's device (CPU by default) and moved to ``device``, so the
    same seed gives the same model on every device. With ``tie_embeddings`` the shared table is
    drawn with std ``1/√d_model`` (std 1 would make the logits ``√d_model`` times too large).

    Args:
        config: the model's hyperparameters.
        generator: source of randomness; ``None`` uses a fresh ``torch.Generator`` seeded with 0,
            so a plain call is reproducible.
        device: where to place the parameters.
        dtype: parameter dtype (default float32).

    Returns:
        ``{"token_embeddings", "layers": [block, ...], "ln_final", "lm_head"}`` (no ``ln_final``
        when ``norm == "none"``, no ``lm_head`` when ``tie_embeddings``); see ``flm.flatten``.

    Source: handout §3.4.1, §3.6.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    kw = dict(generator=generator, device=device, dtype=dtype)
    emb_std = config.d_model**-0.5 if config.tie_embeddings else 1.0
    params: Params = {"token_embeddings": nn.init_embedding(config.vocab_size, config.d_model, std=emb_std, **kw)}
    block = dict(norm=config.norm, ffn=config.ffn)
    params["layers"] = [
        nn.init_transformer_block(config.d_model, config.d_ff, **block, **kw) for _ in range(config.num_layers)
    ]
    if config.norm != "none":
        params["ln_final"] = nn.init_rms_norm(config.d_model, device=device, dtype=dtype)
    if not config.tie_embeddings:
        params["lm_head"] = nn.init_linear(config.d_model, config.vocab_size, **kw)
    return params


def param_template(config: TransformerConfig, dtype: torch.dtype | None = None) -> Params:
    """The parameter tree of ``config`` on the ``meta`` device: shapes and dtypes, no memory, no draws.

    Args:
        config: the model's hyperparameters.
        dtype: parameter dtype (default float32).

    Returns:
        The tree :func:`init_params` would return, with ``meta`` tensors.
    """
    return init_params(config, device="meta", dtype=dtype)


def check_params(params: Params, config: TransformerConfig, *, name: str = "params") -> None:
    """Check that ``params`` has exactly the tensors and shapes ``config`` describes.

    Compares every leaf against :func:`param_template` (built on the ``meta`` device, so a
    corrupt config claiming a huge model allocates nothing).

    Args:
        params: a parameter tree (e.g. from a checkpoint).
        config: the config the tree should match.
        name: how to call the tree in messages (e.g. the checkpoint's path).

    Raises:
        ValueError: naming the first missing or unexpected tensor, or the first shape mismatch.
    """
    from flm.tree import flatten

    want = {k: tuple(v.shape) for k, v in flatten(param_template(config)).items()}
    have = {k: tuple(v.shape) for k, v in flatten(params).items()}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing:
        raise ValueError(
            f"{name}: the config describes a tensor {missing[0]!r} that is missing ({len(missing)} missing)"
        )
    if extra:
        raise ValueError(f"{name}: tensor {extra[0]!r} is not part of the model the config describes")
    for key, shape in want.items():
        if have[key] != shape:
            raise ValueError(f"{name}: {key!r} has shape {have[key]}, the config implies {shape}")


def check_token_ids(token_ids: torch.Tensor, vocab_size: int) -> None:
    """Raise ``ValueError`` naming the first token id outside ``[0, vocab_size)``.

    This reads values back to the host (a sync): call it where data enters, not inside a
    compiled or vmapped step.

    Args:
        token_ids: integer tensor of any shape.
        vocab_size: the exclusive upper bound.

    Raises:
        ValueError: for a non-integer tensor or an out-of-range id.
    """
    if token_ids.is_floating_point() or token_ids.is_complex() or token_ids.dtype == torch.bool:
        raise ValueError(f"token ids must be an integer tensor, got {token_ids.dtype}")
    if token_ids.numel() == 0:
        return
    bad = (token_ids < 0) | (token_ids >= vocab_size)
    if bool(bad.any()):
        first = int(token_ids[bad].flatten()[0])
        raise ValueError(f"token id {first} is outside [0, vocab_size={vocab_size})")


def transformer_lm(
    params: Params,
    token_ids: torch.Tensor,
    config: TransformerConfig,
    token_positions: torch.Tensor | None = None,
    *,
    check_ids: bool = True,
    attend: Sequence[nn.Attend] | None = None,
    last_only: bool = False,
    block_fn: Callable[..., torch.Tensor] | None = None,
) -> torch.Tensor:
    """Map token ids to next-token logits: embed → blocks → final RMSNorm → LM head.

    Args:
        params: the tree from :func:`init_params`.
        token_ids: ``(..., seq_len)`` integer ids in ``[0, vocab_size)``, ``seq_len ≤ context_length``.
        config: the model's hyperparameters.
        token_positions: ``(..., seq_len)`` absolute positions (default ``arange(seq_len)``).
        check_ids: check that every id lies in ``[0, vocab_size)``. The check reads the ids back
            to the host (a sync), so it is eager-only: it is skipped under ``torch.compile`` and
            when ``token_ids`` is wrapped by a ``torch.func`` transform (``vmap``, ``grad``, …
            wrap every tensor argument of the transformed function; ids it closes over stay
            plain and are checked). The train step passes ``False`` (its batches are checked
            where they enter).
        attend: one attention hook per layer (see :func:`flm.nn.multihead_self_attention`),
            e.g. the KV cache of ``flm.generate``; ``None`` = causal self-attention.
        last_only: return the logits of the last position only, ``(..., 1, vocab_size)``
            (what sampling needs; skips the LM head for the other positions).
        block_fn: what runs each layer, called as ``block_fn(layer_params, x, config.block,
            token_positions, attend=hook, rope_cache=tables)``; default
            :func:`flm.nn.transformer_block`. ``tables`` are RoPE's ``(cos, sin)``
            (:func:`flm.nn.attention_rope_tables`), built once per forward for every layer
            (``None`` with ``position="nope"``). The train step's ``compile="blocks"`` passes one
            ``torch.compile`` of it, shared by every layer (the tables are one more input).

    Returns:
        Logits ``(..., seq_len, vocab_size)`` in the parameters' dtype (unnormalised).

    Raises:
        ValueError: ``seq_len > context_length``, an empty sequence, (when checked) an id
            outside the vocabulary, or a number of hooks other than ``num_layers``.

    Source: handout §3.1, §3.6 (Figure 1).
    """
    seq_len = token_ids.shape[-1] if token_ids.dim() else 0
    if seq_len == 0:
        raise ValueError(
            f"transformer_lm: token_ids must have shape (..., seq_len) with seq_len ≥ 1, got {tuple(token_ids.shape)}"
        )
    if seq_len > config.context_length:
        raise ValueError(f"transformer_lm: seq_len={seq_len} exceeds context_length={config.context_length}")
    if token_positions is not None and token_positions.shape[-1] != seq_len:
        raise ValueError(
            f"transformer_lm: token_positions has {token_positions.shape[-1]} positions, token_ids {seq_len}"
        )
    if attend is not None and len(attend) != len(params["layers"]):
        raise ValueError(f"transformer_lm: {len(attend)} attention hooks for {len(params['layers'])} layers")
    if check_ids and checks_enabled(token_ids):
        check_token_ids(token_ids, config.vocab_size)
    block = config.block
    x = nn.embedding(params["token_embeddings"], token_ids, check=False)  # the ids are checked above (check_ids)
    # RoPE's cos/sin tables depend only on the positions: built once here, not in every layer.
    rope_cache = (
        None
        if block.rope_theta is None
        else nn.attention_rope_tables(x, block.num_heads, block.rope_theta, token_positions)
    )
    run_block = nn.transformer_block if block_fn is None else block_fn
    for i, layer in enumerate(params["layers"]):
        hook = None if attend is None else attend[i]
        x = run_block(layer, x, block, token_positions, attend=hook, rope_cache=rope_cache)
    if last_only:
        x = x[..., -1:, :]
    if config.norm != "none":
        x = nn.rms_norm(params["ln_final"], x, config.eps)
    head = params["token_embeddings"] if config.tie_embeddings else params["lm_head"]
    return nn.linear(head, x)


# --------------------------------------------------------------------------------------------
# Resource accounting (handout §3.6 transformer_accounting, §4.3 adamwAccounting)
# --------------------------------------------------------------------------------------------


def count_params(config: TransformerConfig) -> int:
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


def forward_flops(config: TransformerConfig, seq_len: int | None = None) -> dict[str, int]:
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


def train_step_flops(config: TransformerConfig, batch_size: int, seq_len: int | None = None) -> int:
    """FLOPs of one training step: forward + backward ≈ 3 × forward (Kaplan et al. 2020).

    Source: handout §4.3 adamwAccounting (d).
    """
    return 3 * batch_size * forward_flops(config, seq_len)["total"]


def adamw_step_flops(config: TransformerConfig) -> int:
    """Approximate FLOPs of one AdamW update: about 15 elementwise operations per parameter.

    (m update 3, v update 4, bias-corrected step size O(1), ``m/(√v+ε)`` 3, parameter update 2,
    weight decay 2, plus the square root, counted as 1.)

    Source: handout §4.3 adamwAccounting (c), Algorithm 1.
    """
    return 15 * count_params(config)


def training_memory(
    config: TransformerConfig, batch_size: int, *, bytes_per_element: int = 4, seq_len: int | None = None
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


def max_batch_size(config: TransformerConfig, memory_bytes: float, **kw: Any) -> int:
    """Largest batch size whose :func:`training_memory` total fits in ``memory_bytes``.

    Source: handout §4.3 adamwAccounting (b).
    """
    fixed = training_memory(config, 0, **kw)["total"]
    per_seq = training_memory(config, 1, **kw)["total"] - fixed
    return max(0, math.floor((memory_bytes - fixed) / per_seq))
