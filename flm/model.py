"""The Transformer language model as a pure function over a parameter tree.

``init_params(config)`` builds the nested dict of tensors whose flattened keys are the handout's
reference state-dict keys; ``transformer_lm(params, token_ids, config)`` maps token ids to
next-token logits. The resource accounting (``count_params``, ``forward_flops``,
``train_step_flops``, ``adamw_step_flops``, ``training_memory``, ``max_batch_size``) lives in
:mod:`flm.accounting` and is re-exported here, so ``from flm.model import count_params`` keeps working.

Source: CS336 assignment 1 handout §3.1–3.6 (Figure 1).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from flm import nn
from flm._compat import checks_enabled
from flm.accounting import (
    adamw_step_flops,
    count_params,
    forward_flops,
    max_batch_size,
    train_step_flops,
    training_memory,
)

__all__ = [
    "TransformerConfig",
    "CHOICES",
    "init_params",
    "param_template",
    "check_params",
    "transformer_lm",
    "check_token_ids",
    # Re-exported from flm.accounting (their home since issue 20 item 7).
    "count_params",
    "forward_flops",
    "train_step_flops",
    "training_memory",
    "adamw_step_flops",
    "max_batch_size",
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
    *,
    place: Callable[[Params], Params] | None = None,
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
        place: applied to each part (the embedding table, each block, the final norm, the head)
            as soon as it is drawn, e.g. :func:`flm.shard.shard_tree` keeping this rank's rows,
            so the whole model never exists at once; the draws are the same either way.

    Returns:
        ``{"token_embeddings", "layers": [block, ...], "ln_final", "lm_head"}`` (no ``ln_final``
        when ``norm == "none"``, no ``lm_head`` when ``tie_embeddings``); see ``flm.flatten``.

    Source: handout §3.4.1, §3.6.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    kw = dict(generator=generator, device=device, dtype=dtype)
    emb_std = config.d_model**-0.5 if config.tie_embeddings else 1.0
    put = place or (lambda part: part)
    params: Params = {"token_embeddings": put(nn.init_embedding(config.vocab_size, config.d_model, std=emb_std, **kw))}
    block = dict(norm=config.norm, ffn=config.ffn)
    params["layers"] = [
        put(nn.init_transformer_block(config.d_model, config.d_ff, **block, **kw)) for _ in range(config.num_layers)
    ]
    if config.norm != "none":
        params["ln_final"] = put(nn.init_rms_norm(config.d_model, device=device, dtype=dtype))
    if not config.tie_embeddings:
        params["lm_head"] = put(nn.init_linear(config.d_model, config.vocab_size, **kw))
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
