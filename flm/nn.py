"""Pure neural-network layers over parameter dicts, and their initialisers.

Every layer is a function ``f(params, x, ...)`` of a nested dict of tensors (its parameters) and
its inputs; nothing is stored between calls. Weights are kept ``(d_out, d_in)`` as in the handout
(§3.3.1: ``y = x Wᵀ``). Norms and softmax compute in float32 (float64 for float64 inputs) and cast back to the input dtype.
RoPE lives in :mod:`flm.rope` and the causal mask in :mod:`flm._mask`; both are re-exported here.

Source: CS336 assignment 1 handout §3.4–3.5 (Linear, Embedding, RMSNorm, SwiGLU, RoPE, softmax,
scaled dot-product attention, causal multi-head self-attention, the pre-norm block).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from einops import rearrange

from flm._compat import checks_enabled, in_forward_mode, is_compiling, is_vmapped
from flm._fused import fused_attention
from flm._mask import causal_mask
from flm.init import (
    init_embedding,
    init_linear,
    init_multihead_self_attention,
    init_rms_norm,
    init_silu_ffn,
    init_swiglu,
    init_transformer_block,
    truncated_normal,
)
from flm.rope import apply_rope, check_rope, rope, rope_tables

__all__ = [
    "linear",
    "embedding",
    "rms_norm",
    "silu",
    "swiglu",
    "silu_ffn",
    "softmax",
    "scaled_dot_product_attention",
    "dot_product_attention",
    "ATTENTION_IMPLEMENTATIONS",
    "BLOCK_CHOICES",
    "causal_mask",
    "rope",
    "rope_tables",
    "attention_rope_tables",
    "attention_qkv",
    "multihead_self_attention",
    "BlockConfig",
    "transformer_block",
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
# The attention hook: per-head queries, keys and values (after RoPE) -> per-head outputs.
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# RoPE's (cos, sin) tables for every head, (..., 1, seq_len, d_head / 2) each: see attention_rope_tables.
RopeCache = tuple[torch.Tensor, torch.Tensor]
#: The attention implementations :func:`dot_product_attention` takes.
ATTENTION_IMPLEMENTATIONS = ("auto", "flm", "sdpa")
#: The allowed values of each choice of :class:`BlockConfig`: the one definition that
#: ``TransformerConfig`` (which adds ``position``) and the ``flm`` command's flags read.
BLOCK_CHOICES: dict[str, tuple[str, ...]] = {
    "norm": ("pre", "post", "none"),
    "ffn": ("swiglu", "silu"),
    "attention": ATTENTION_IMPLEMENTATIONS,
}


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 (never lower the precision)."""
    return torch.promote_types(dtype, torch.float32)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def linear(params: Params, x: torch.Tensor) -> torch.Tensor:
    """Apply a bias-free linear map ``y = x Wᵀ``.

    Args:
        params: ``{"weight": (d_out, d_in)}``.
        x: ``(..., d_in)``, same dtype as the weight.

    Returns:
        ``(..., d_out)``.

    Raises:
        ValueError: if ``x``'s last dimension is not ``d_in``.

    Source: handout §3.4.2, eq. (1).
    """
    w = params["weight"]
    if x.shape[-1] != w.shape[-1]:
        raise ValueError(
            f"linear: input has last dimension {x.shape[-1]}, weight {tuple(w.shape)} expects d_in={w.shape[-1]}"
        )
    # (..., d_in) @ (d_in, d_out): one GEMM over all leading dims (what einsum "... i, o i -> ... o" lowers to).
    return x @ w.mT


def embedding(params: Params, token_ids: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """Look up embedding vectors for integer token ids.

    Args:
        params: ``{"weight": (vocab_size, d_model)}``.
        token_ids: ``(...)`` integer tensor with values in ``[0, vocab_size)``.
        check: check that every id lies in ``[0, vocab_size)``. The check reads the ids back to
            the host (a sync), so it is eager-only: it is skipped under ``torch.compile`` and
            inside ``torch.func`` transforms (``vmap``, ``grad``); pass ``False`` where the ids
            were checked already (``flm.model.transformer_lm`` does).

    Returns:
        ``(..., d_model)`` in the weight's dtype.

    Raises:
        ValueError: if ``token_ids`` is not an integer tensor, or (when checked) holds an id
            outside ``[0, vocab_size)``.

    Source: handout §3.4.3.
    """
    if token_ids.is_floating_point() or token_ids.is_complex() or token_ids.dtype == torch.bool:
        raise ValueError(f"embedding: token_ids must be an integer tensor, got {token_ids.dtype}")
    w = params["weight"]
    if check and token_ids.numel() and checks_enabled(w, token_ids):
        vocab_size = w.shape[0]
        bad = (token_ids < 0) | (token_ids >= vocab_size)
        if bool(bad.any()):
            first = int(token_ids[bad].flatten()[0])
            raise ValueError(
                f"embedding: token_ids holds the id {first}, outside the valid range [0, {vocab_size}) "
                f"(the table has {vocab_size} rows)"
            )
    flat_ids = token_ids.reshape(-1)
    if in_forward_mode(w):  # jvp/jacfwd/hessian/forward_ad: the plain lookup (see _Embedding)
        return torch.index_select(w, 0, flat_ids).view(*token_ids.shape, w.shape[-1])
    return _Embedding.apply(w, flat_ids).view(*token_ids.shape, w.shape[-1])


class _Embedding(torch.autograd.Function):
    """Row lookup ``W[ids]`` whose gradient is one ``index_add`` of the rows' gradients into a zero
    table (autograd of advanced indexing, and of ``index_select`` under ``torch.func.grad``, first
    clones a zero tensor of the table's size: an extra pass over ``vocab_size × d_model``).

    It has no ``jvp``: dynamo cannot trace a Function that defines one (so ``torch.compile`` of the
    step would break), and nested forward mode does not see inside a Function. Under forward-mode
    AD (``torch.func.jvp``, ``jacfwd``, ``hessian``) :func:`embedding` uses plain ``index_select``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(weight: torch.Tensor, flat_ids: torch.Tensor) -> torch.Tensor:
        return torch.index_select(weight, 0, flat_ids)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: torch.Tensor) -> None:
        weight, flat_ids = inputs
        ctx.save_for_backward(flat_ids)
        ctx.table_shape = weight.shape

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (flat_ids,) = ctx.saved_tensors
        table = grad.new_zeros(ctx.table_shape)
        return table.index_add_(0, flat_ids, grad), None


def rms_norm(params: Params, x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Root-mean-square layer normalisation ``x / RMS(x) * g``, computed in float32 (float64 for float64 input).

    ``RMS(x) = sqrt(mean(x²) + eps)`` over the last dimension.

    Args:
        params: ``{"weight": (d_model,)}``, the gain ``g``.
        x: ``(..., d_model)``, any float dtype.
        eps: added to the mean square for stability.

    Returns:
        ``(..., d_model)`` in ``x``'s dtype.

    Raises:
        ValueError: if ``x``'s last dimension does not match the gain.

    Source: handout §3.5.1, eq. (4); Zhang & Sennrich (2019), eq. (4).
    """
    g = params["weight"]
    if x.shape[-1] != g.shape[-1]:
        raise ValueError(f"rms_norm: input has last dimension {x.shape[-1]}, gain has {g.shape[-1]}")
    in_dtype = x.dtype
    x32 = x.to(_compute_dtype(in_dtype))
    inv_rms = torch.rsqrt(x32.square().mean(dim=-1, keepdim=True) + eps)
    return (x32 * inv_rms * g.to(x32.dtype)).to(in_dtype)


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU / Swish activation ``x · σ(x)``, elementwise.

    Args:
        x: any shape, float dtype.

    Returns:
        Same shape and dtype.

    Source: handout §3.5.2, eq. (5); Elfwing et al. (2017).
    """
    return x * torch.sigmoid(x)


def swiglu(params: Params, x: torch.Tensor) -> torch.Tensor:
    """SwiGLU feed-forward network ``W2 (SiLU(W1 x) ⊙ W3 x)``.

    Args:
        params: ``{"w1": {"weight": (d_ff, d_model)}, "w2": {"weight": (d_model, d_ff)},
            "w3": {"weight": (d_ff, d_model)}}``.
        x: ``(..., d_model)``.

    Returns:
        ``(..., d_model)``.

    Source: handout §3.5.2, eq. (7); Shazeer (2020).
    """
    return linear(params["w2"], silu(linear(params["w1"], x)) * linear(params["w3"], x))


def silu_ffn(params: Params, x: torch.Tensor) -> torch.Tensor:
    """Ungated SiLU feed-forward network ``W2 SiLU(W1 x)`` (the handout's SwiGLU ablation).

    Args:
        params: ``{"w1": {"weight": (d_ff, d_model)}, "w2": {"weight": (d_model, d_ff)}}``.
        x: ``(..., d_model)``.

    Returns:
        ``(..., d_model)``.

    Source: handout §7.3, eq. (25).
    """
    return linear(params["w2"], silu(linear(params["w1"], x)))


def softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Numerically stable softmax along ``dim``, computed in float32 (float64 for float64 input).

    Subtracts the maximum along ``dim`` before exponentiating, so inputs of any magnitude give
    finite results; ``-inf`` entries get probability exactly 0. A slice that is entirely ``-inf``
    has no distribution and gives NaN, as in PyTorch.

    Args:
        x: any shape, float dtype.
        dim: the dimension to normalise.

    Returns:
        Same shape and dtype as ``x``; slices along ``dim`` sum to 1.

    Raises:
        TypeError: if ``x`` is not a floating-point tensor (an integer or bool tensor has no
            probabilities to hold: convert it first, e.g. ``x.float()``).

    Source: handout §3.5.4, eq. (10).
    """
    if not x.is_floating_point():
        raise TypeError(f"softmax: x must be a floating-point tensor, got {x.dtype} (convert it, e.g. x.float())")
    in_dtype = x.dtype
    x32 = x.to(_compute_dtype(in_dtype))
    # The shift cancels in the result, so it carries no gradient: detaching it spares the
    # backward pass the scatter of gradients onto the maxima (exactly the same derivative).
    shifted = x32 - x32.amax(dim=dim, keepdim=True).detach()
    e = shifted.exp()
    return (e * e.sum(dim=dim, keepdim=True).reciprocal()).to(in_dtype)  # one reciprocal per row, then a multiply


def _check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: queries have d_k={q.shape[-1]} but keys have d_k={k.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"attention: {k.shape[-2]} keys but {v.shape[-2]} values")


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Scaled dot-product attention ``softmax(Q Kᵀ / √d_k) V`` with an optional boolean mask.

    Args:
        q: queries ``(..., queries, d_k)``.
        k: keys ``(..., keys, d_k)``.
        v: values ``(..., keys, d_v)``.
        mask: optional bool tensor broadcastable to ``(..., queries, keys)``; ``True`` = attend.
            Masked positions get probability exactly 0.

    Returns:
        ``(..., queries, d_v)`` in ``q``'s dtype (softmax computed in float32).

    Raises:
        ValueError: on mismatched ``d_k``/key counts, a non-bool mask, or a mask that does not
            broadcast to the score shape.

    Source: handout §3.5.4, eq. (11); Vaswani et al. (2017) §3.2.1.
    """
    _check_attention_inputs(q, k, v)
    d_k = q.shape[-1]
    # (..., queries, d_k) @ (..., d_k, keys): einsum "... q d, ... k d -> ... q k" as one batched GEMM.
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(d_k))
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"attention: mask must be bool (True = attend), got {mask.dtype}")
        try:
            shape = torch.broadcast_shapes(mask.shape, scores.shape)
        except RuntimeError:
            shape = None
        if shape != scores.shape:
            raise ValueError(
                f"attention: mask of shape {tuple(mask.shape)} does not broadcast to scores {tuple(scores.shape)}"
            )
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = softmax(scores, dim=-1)
    return torch.matmul(probs, v)  # (..., queries, keys) @ (..., keys, d_v) -> (..., queries, d_v)


def attention_rope_tables(
    x: torch.Tensor,
    num_heads: int,
    rope_theta: float,
    token_positions: torch.Tensor | None = None,
) -> RopeCache:
    """RoPE's ``cos`` and ``sin`` tables for the attention heads over ``x``, shared by q, k and every layer.

    :func:`attention_qkv` builds them when it is not given them; ``flm.model.transformer_lm``
    builds them once per forward and passes them to every block as ``rope_cache`` (as Llama's
    ``freqs_cis`` and Hugging Face's ``position_embeddings``). Only ``x``'s shape, dtype and
    device are read.

    Args:
        x: ``(..., seq_len, d_model)``, the attention input (its dtype picks the compute dtype:
            float32 for half/bfloat16/float32, float64 for float64).
        num_heads: number of heads ``h``; ``d_model`` must be divisible by it.
        rope_theta: the RoPE base Θ.
        token_positions: ``(..., seq_len)`` integer (or float) positions (default ``arange(seq_len)``).

    Returns:
        ``(cos, sin)``, each ``(..., 1, seq_len, d_head / 2)`` (the ``1`` broadcasts over heads) in
        the compute dtype, on ``x``'s device.

    Raises:
        ValueError: if ``d_model`` is not divisible by ``num_heads``, ``d_head`` is odd,
            ``rope_theta`` is not positive, or the positions' last dimension is not ``seq_len``.

    Source: handout §3.5.3, eqs. (8)–(9); Su et al. (2021).
    """
    d_model, seq_len = x.shape[-1], x.shape[-2]
    if num_heads <= 0 or d_model % num_heads:
        raise ValueError(f"attention: d_model={d_model} is not divisible by num_heads={num_heads}")
    d_head = d_model // num_heads
    if token_positions is None:
        token_positions = torch.arange(seq_len, device=x.device)
    check_rope(d_head, rope_theta, token_positions.shape[-1], seq_len)
    positions = token_positions.unsqueeze(-2)  # (..., 1, seq_len): same rotation for every head
    return rope_tables(positions, d_head, rope_theta, dtype=_compute_dtype(x.dtype), device=x.device)


def _check_rope_cache(rope_cache: RopeCache, seq_len: int, d_head: int) -> None:
    cos, sin = rope_cache
    want = (seq_len, d_head // 2)
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() < 2 or tuple(table.shape[-2:]) != want:
            raise ValueError(
                f"attention: rope_cache's {name} table has shape {tuple(table.shape)}, expected "
                f"(..., seq_len, d_head / 2) = (..., {want[0]}, {want[1]})"
            )


def attention_qkv(
    params: Params,
    x: torch.Tensor,
    num_heads: int,
    rope_theta: float | None = None,
    token_positions: torch.Tensor | None = None,
    *,
    rope_cache: RopeCache | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project ``x`` to per-head queries, keys and values, with RoPE on q and k when asked.

    Args:
        params: ``{"q_proj", "k_proj", "v_proj"}``, each ``{"weight": (d_model, d_model)}``.
        x: ``(..., seq_len, d_model)``.
        num_heads: number of heads ``h``; ``d_model`` must be divisible by it.
        rope_theta: the RoPE base, or ``None`` for no position encoding (NoPE).
        token_positions: ``(..., seq_len)`` positions (default ``arange(seq_len)``); not read when
            ``rope_cache`` is given.
        rope_cache: the ``(cos, sin)`` tables of :func:`attention_rope_tables` for these positions
            (built once and shared by every layer); ``None`` builds them here.

    Returns:
        ``(q, k, v)``, each ``(..., h, seq_len, d_head)``.

    Raises:
        ValueError: if ``d_model`` is not divisible by ``num_heads``, a ``rope_cache`` is given
            with ``rope_theta=None`` (NoPE), or its tables' last two dimensions are not
            ``(seq_len, d_head / 2)``.

    Source: handout §3.5.5, eqs. (12)–(14).
    """
    d_model = x.shape[-1]
    if num_heads <= 0 or d_model % num_heads:
        raise ValueError(f"attention: d_model={d_model} is not divisible by num_heads={num_heads}")
    if rope_theta is None and rope_cache is not None:
        raise ValueError("attention: rope_cache given but rope_theta is None (NoPE rotates nothing)")
    split = "... seq (heads d_head) -> ... heads seq d_head"
    q = rearrange(linear(params["q_proj"], x), split, heads=num_heads)
    k = rearrange(linear(params["k_proj"], x), split, heads=num_heads)
    v = rearrange(linear(params["v_proj"], x), split, heads=num_heads)
    if rope_theta is not None:
        if rope_cache is None:
            rope_cache = attention_rope_tables(x, num_heads, rope_theta, token_positions)
        else:
            _check_rope_cache(rope_cache, x.shape[-2], d_model // num_heads)
        cos, sin = rope_cache
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # one set of tables for q and k
    return q, k, v


def _use_fused(implementation: str, q: torch.Tensor) -> bool:
    if implementation == "flm":
        return False
    if implementation == "sdpa":
        return True
    if implementation == "auto":
        # PyTorch's fused CPU kernels have no vmap batching rule (torch 2.13 falls back to a slow
        # per-example loop with a warning), so under vmap the reference attention is the fast one;
        # they have no forward-mode derivative either, so jvp/jacfwd/hessian take the reference.
        return is_compiling() or not (is_vmapped(q) or in_forward_mode(q))
    raise ValueError(f"attention must be one of {ATTENTION_IMPLEMENTATIONS}, got {implementation!r}")


def dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    causal: bool = False,
    implementation: str = "auto",
) -> torch.Tensor:
    """Scaled dot-product attention by the chosen implementation: flm's own or PyTorch's fused kernel.

    ``"flm"`` is :func:`scaled_dot_product_attention` (the reference: it materialises the
    ``queries × keys`` scores). ``"sdpa"`` is ``torch.nn.functional.scaled_dot_product_attention``
    (flash / memory-efficient kernels; tested equal to ``"flm"``, forward and gradients, in
    ``tests/test_nn.py``). ``"auto"`` (the default) takes the fused kernel except under
    ``torch.func.vmap``, where it lacks a batching rule, and under forward-mode AD (``jvp``,
    ``jacfwd``, ``hessian``), which it lacks. The fused CPU kernels have no double backward
    either (grad of grad, Hessian-vector products by reverse-over-reverse), which no flag
    reveals: pass ``"flm"`` for those (``tests/test_composability.py``).

    Args:
        q: ``(..., queries, d_k)``.
        k: ``(..., keys, d_k)``.
        v: ``(..., keys, d_v)``.
        mask: optional bool mask broadcastable to ``(..., queries, keys)``, ``True`` = attend.
        causal: apply the causal mask ``j ≤ i + (keys − queries)`` (instead of ``mask``).
        implementation: ``"auto"``, ``"flm"`` or ``"sdpa"``.

    Returns:
        ``(..., queries, d_v)`` in ``q``'s dtype.

    Raises:
        ValueError: an unknown implementation, both ``mask`` and ``causal``, or bad shapes.

    Source: handout §3.5.4, eq. (11); Dao et al. (2022) for the fused kernels.
    """
    if mask is not None and causal:
        raise ValueError("dot_product_attention: give a mask or causal=True, not both")
    if _use_fused(implementation, q):
        _check_attention_inputs(q, k, v)
        return fused_attention(q, k, v, mask, causal=causal)
    if causal:
        mask = causal_mask(q.shape[-2], k.shape[-2], device=q.device)
    return scaled_dot_product_attention(q, k, v, mask)


def multihead_self_attention(
    params: Params,
    x: torch.Tensor,
    num_heads: int,
    rope_theta: float | None = None,
    token_positions: torch.Tensor | None = None,
    *,
    attention: str = "auto",
    attend: Attend | None = None,
    rope_cache: RopeCache | None = None,
) -> torch.Tensor:
    """Causal multi-head self-attention ``W_O · MultiHead(W_Q x, W_K x, W_V x)``.

    Args:
        params: ``{"q_proj", "k_proj", "v_proj", "output_proj"}``, each ``{"weight": (d_model, d_model)}``.
        x: ``(..., seq_len, d_model)``.
        num_heads: number of heads; ``d_model`` must be divisible by it.
        rope_theta: apply RoPE with this base to q and k; ``None`` for no positions (NoPE).
        token_positions: ``(..., seq_len)`` absolute positions (default ``arange(seq_len)``).
        attention: the implementation of causal attention, see :func:`dot_product_attention`.
        attend: a hook replacing causal attention: ``attend(q, k, v) -> out`` on per-head tensors
            ``(..., heads, seq_len, d_head)`` after RoPE (e.g. a KV cache that stores ``k, v``
            and attends over everything cached; see ``flm.generate``).
        rope_cache: RoPE's ``(cos, sin)`` tables from :func:`attention_rope_tables`, built once
            for all layers (``flm.model.transformer_lm`` does); ``None`` builds them here from
            ``token_positions``.

    Returns:
        ``(..., seq_len, d_model)``.

    Raises:
        ValueError: bad head count, unknown ``attention``, or a ``rope_cache`` that does not fit
            (see :func:`attention_qkv`).

    Source: handout §3.5.5; Vaswani et al. (2017) §3.2.2.
    """
    q, k, v = attention_qkv(params, x, num_heads, rope_theta, token_positions, rope_cache=rope_cache)
    if attend is None:
        out = dot_product_attention(q, k, v, causal=True, implementation=attention)
    else:
        out = attend(q, k, v)
    return linear(params["output_proj"], rearrange(out, "... heads seq d_head -> ... seq (heads d_head)"))


@dataclass(frozen=True)
class BlockConfig:
    """What one Transformer block needs to know (``TransformerConfig.block`` builds it).

    Attributes:
        num_heads: attention heads.
        rope_theta: the RoPE base Θ, or ``None`` for no position information (NoPE).
        norm: ``"pre"``, ``"post"`` or ``"none"`` (handout §7.3).
        ffn: ``"swiglu"`` or ``"silu"`` (ungated).
        eps: RMSNorm epsilon.
        attention: ``"auto"``, ``"flm"`` or ``"sdpa"`` (see :func:`dot_product_attention`).

    Raises:
        ValueError: an unknown choice or a non-positive head count.
    """

    num_heads: int
    rope_theta: float | None = 10000.0
    norm: str = "pre"
    ffn: str = "swiglu"
    eps: float = 1e-5
    attention: str = "auto"

    def __post_init__(self) -> None:
        if not isinstance(self.num_heads, int) or self.num_heads <= 0:
            raise ValueError(f"BlockConfig: num_heads must be a positive int, got {self.num_heads!r}")
        for name, allowed in BLOCK_CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"BlockConfig: {name} must be one of {allowed}, got {getattr(self, name)!r}")


def transformer_block(
    params: Params,
    x: torch.Tensor,
    config: BlockConfig,
    token_positions: torch.Tensor | None = None,
    *,
    attend: Attend | None = None,
    rope_cache: RopeCache | None = None,
) -> torch.Tensor:
    """One Transformer block: attention and feed-forward sub-layers with residual connections.

    With ``config.norm == "pre"`` (the default)::

        z = x + MHA(RMSNorm(x));  y = z + FFN(RMSNorm(z))

    ``"post"`` gives ``z = RMSNorm(x + MHA(x)); y = RMSNorm(z + FFN(z))`` and ``"none"`` drops the
    norms. ``config.ffn`` picks SwiGLU or the ungated SiLU FFN; ``config.rope_theta=None`` is NoPE.

    Args:
        params: ``{"ln1", "attn", "ln2", "ffn"}`` (no ``ln1``/``ln2`` when ``norm == "none"``).
        x: ``(..., seq_len, d_model)``.
        config: the block's :class:`BlockConfig`.
        token_positions: ``(..., seq_len)`` positions (default ``arange(seq_len)``).
        attend: attention hook passed to :func:`multihead_self_attention` (e.g. a KV cache).
        rope_cache: RoPE's ``(cos, sin)`` tables from :func:`attention_rope_tables`, shared by
            all layers (``flm.model.transformer_lm`` builds them once per forward); ``None``
            builds them in this block from ``token_positions``.

    Returns:
        ``(..., seq_len, d_model)``.

    Raises:
        ValueError: from :func:`multihead_self_attention` (e.g. a ``rope_cache`` that does not fit).

    Source: handout §3.6 eq. (15), Figure 2; ablations §7.3.
    """
    ffn = swiglu if config.ffn == "swiglu" else silu_ffn

    def attn(h: torch.Tensor) -> torch.Tensor:
        return multihead_self_attention(
            params["attn"],
            h,
            config.num_heads,
            config.rope_theta,
            token_positions,
            attention=config.attention,
            attend=attend,
            rope_cache=rope_cache,
        )

    if config.norm == "pre":
        z = x + attn(rms_norm(params["ln1"], x, config.eps))
        return z + ffn(params["ffn"], rms_norm(params["ln2"], z, config.eps))
    if config.norm == "post":
        z = rms_norm(params["ln1"], x + attn(x), config.eps)
        return rms_norm(params["ln2"], z + ffn(params["ffn"], z), config.eps)
    z = x + attn(x)
    return z + ffn(params["ffn"], z)
