"""Sharded parameters, gradients and optimiser state (the ZeRO-3 / FSDP idea) for flm's pytrees.

Each rank keeps ~1/world of the parameters, gradients and AdamW moments. The forward gathers one
part of the model at a time (the embedding table, each Transformer block, the final norm, the
head) with one autograd-aware all-gather (:func:`flm._compat.all_gather_autograd`), whose
backward reduce-scatters that part's gradient onto the ranks' shards, one buffer per part. Blocks
run under activation recomputation (``torch.utils.checkpoint``): the gathered weights are not kept
for the backward but gathered again when it reaches the part, so at most one part's whole weights
(and their gradients) exist at a time. The head, the last part of the forward and the first of
the backward, is fused into the loss (:func:`flm.loss.token_linear_cross_entropy`), so its
logits exist one chunk at a time and its gradient is one buffer. The optimiser is flm's own,
unchanged, on the shards; the clipping norm is the whole model's (:func:`sharded_global_norm`).
The step differentiates with ``torch.autograd`` (``torch.func`` does not compose with
collectives' autograd yet), so it is not compiled and not vmapped.

Import flm before joining a process group yourself (``torchrun -m flm train`` does): a torch
module imported after ``init_process_group`` can pin the default group, so gloo's threads outlive
``destroy_process_group`` and may abort the process at exit (``flm._compat._UNPIN_DEFAULT_GROUP``).

Every leaf of the parameter tree is split along its first dimension over the ranks, as FSDP2's
``Shard(0)`` placement: with ``c = ceil(d0 / world)`` rows per rank, rank ``r`` holds rows
``[r·c, min((r+1)·c, d0))`` of the full leaf, zero-padded to ``c`` rows, so every rank's shard has
the same shape ``(c, *rest)`` and the same number of dimensions as the full leaf (weight decay's
``ndim ≥ 2`` mask and the checkpoint's leaf paths carry over unchanged). Padding rows hold zeros,
receive zero gradients and stay zero under AdamW (its update of a zero parameter with a zero
gradient is zero), so they never change a norm or a result.

Source: Rajbhandari et al. (2020), "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models" (stage 3); Zhao et al. (2023), "PyTorch FSDP"; PyTorch FSDP2's per-parameter ``Shard(0)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import optree
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from flm import nn, optim
from flm._compat import all_gather_autograd
from flm.loss import token_linear_cross_entropy
from flm.model import TransformerConfig, init_params, param_template
from flm.tree import tree_map

__all__ = [
    "shard_rows",
    "unshard_rows",
    "rows_per_rank",
    "shard_tree",
    "unshard_tree",
    "init_sharded_params",
    "gather_tree",
    "sharded_transformer_lm",
    "sharded_global_norm",
    "make_sharded_train_step",
]

PyTree = Any
# Logit values per chunk of the sharded loss (4 MiB in float32): rows per chunk = this // vocab_size.
_LOSS_CHUNK_VALUES = 2**20


def rows_per_rank(d0: int, world_size: int) -> int:
    """``ceil(d0 / world_size)``: the rows of a leaf with first dimension ``d0`` each rank holds.

    Raises:
        ValueError: ``world_size < 1`` or ``d0 < 1``.
    """
    if world_size < 1:
        raise ValueError(f"shard: world_size must be ≥ 1, got {world_size}")
    if d0 < 1:
        raise ValueError(f"shard: a sharded leaf needs a first dimension ≥ 1, got {d0}")
    return math.ceil(d0 / world_size)


def shard_rows(full: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s shard of ``full``: its rows ``[rank·c, (rank+1)·c)``, zero-padded to ``c`` rows.

    Args:
        full: ``(d0, *rest)`` the whole leaf (a 0-d tensor is not sharded: returned as a copy).
        rank: ``0 ≤ rank < world_size``.
        world_size: number of ranks.

    Returns:
        ``(c, *rest)`` with ``c = ceil(d0 / world_size)``, a new contiguous tensor (``full`` is not
        modified or aliased).

    Raises:
        ValueError: a rank outside ``[0, world_size)``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"shard: rank {rank} is outside world_size {world_size}")
    if full.dim() == 0:
        return full.clone()
    c = rows_per_rank(full.shape[0], world_size)
    out = full.new_zeros((c, *full.shape[1:]))
    start, stop = min(rank * c, full.shape[0]), min((rank + 1) * c, full.shape[0])
    out[: stop - start].copy_(full[start:stop])
    return out


def unshard_rows(shards: list[torch.Tensor], d0: int) -> torch.Tensor:
    """The whole leaf from every rank's shard, in rank order: concatenate along dim 0, drop the padding.

    Args:
        shards: ``world_size`` tensors ``(c, *rest)``.
        d0: the whole leaf's first dimension.

    Returns:
        ``(d0, *rest)``.

    Raises:
        ValueError: shards of different shapes, or too few rows for ``d0``.
    """
    if len({tuple(s.shape) for s in shards}) != 1:
        raise ValueError(f"shard: shards of different shapes {[tuple(s.shape) for s in shards]}")
    if shards[0].dim() == 0:
        return shards[0].clone()
    if shards[0].shape[0] * len(shards) < d0:
        raise ValueError(f"shard: {len(shards)} shards of {shards[0].shape[0]} rows cannot hold {d0} rows")
    return torch.cat(shards, dim=0)[:d0]


def shard_tree(tree: PyTree, rank: int, world_size: int) -> PyTree:
    """:func:`shard_rows` on every leaf of ``tree`` (e.g. the parameters, or AdamW's moments)."""
    return tree_map(lambda t: shard_rows(t, rank, world_size), tree)


def unshard_tree(shards: list[PyTree], like: PyTree) -> PyTree:
    """The whole tree from every rank's sharded tree (rank order), shaped like ``like``'s leaves."""
    return tree_map(
        lambda ref, *parts: unshard_rows(list(parts), ref.shape[0]) if ref.dim() else parts[0].clone(), like, *shards
    )


def init_sharded_params(
    config: TransformerConfig,
    generator: torch.Generator,
    rank: int,
    world_size: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> PyTree:
    """This rank's shard of :func:`flm.model.init_params` (the same draws), never holding the whole model.

    Each part (embedding, block, norm, head) is drawn whole, sharded and dropped before the next,
    so the peak is this rank's shards plus one part.

    Args:
        config: the model.
        generator: the same generator (and seed) on every rank.
        rank: this rank.
        world_size: number of ranks.
        device: where the shards live.
        dtype: parameter dtype (default float32).

    Returns:
        The parameter tree with every leaf replaced by its :func:`shard_rows`.
    """
    return init_params(
        config, generator, device=device, dtype=dtype, place=lambda part: shard_tree(part, rank, world_size)
    )


class _Unpack(torch.autograd.Function):
    """The whole leaves from an all-gathered ``(world_size, n)`` buffer of flattened shards, and back.

    Forward: leaf ``i`` is rank-major rows ``gathered[:, offset_i : offset_i + numel_i]`` reshaped
    to ``(world_size · c_i, *rest_i)`` and stripped of its padding: a view where that layout is
    contiguous (a part with one leaf: the embedding, the head), else one copy. Backward: the leaves'
    gradients are written into one ``(world_size, n)`` buffer in the same layout (zero in the
    padding), or returned as a view of the one leaf's gradient when there is nothing to pad, so
    the reduce-scatter behind it gets one buffer. Autograd of the slicing instead allocates a
    whole ``(world_size, n)`` zero-filled buffer per leaf and sums them.
    """

    @staticmethod
    def forward(gathered: torch.Tensor, layout: tuple) -> tuple[torch.Tensor, ...]:
        world = gathered.shape[0]
        outs, offset = [], 0
        for shape, d0 in layout:
            n = math.prod(shape)
            rows = gathered[:, offset : offset + n].reshape(world * shape[0], *shape[1:])
            outs.append(rows if d0 == rows.shape[0] else rows[:d0])
            offset += n
        return tuple(outs)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Any) -> None:
        gathered, layout = inputs
        ctx.layout, ctx.buffer_shape = layout, gathered.shape
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple[Any, None]:
        world, n_total = ctx.buffer_shape
        layout = ctx.layout
        if len(layout) == 1 and grads[0] is not None and layout[0][1] == world * layout[0][0][0]:
            return grads[0].reshape(world, n_total), None  # one unpadded leaf: its gradient is the buffer
        ref = next((g for g in grads if g is not None), None)
        if ref is None:
            return None, None
        padded = any(d0 < world * shape[0] for shape, d0 in layout) or any(g is None for g in grads)
        buffer = (ref.new_zeros if padded else ref.new_empty)((world, n_total))
        offset = 0
        for (shape, d0), g in zip(layout, grads):
            c, n = shape[0], math.prod(shape)
            if g is not None:
                slots = buffer[:, offset : offset + n].view(world, *shape)  # rank r's c rows
                full, rem = divmod(d0, c)
                slots[:full].copy_(g[: full * c].reshape(full, *shape))
                if rem:
                    slots[full, :rem].copy_(g[full * c :])
            offset += n
        return buffer, None


def gather_tree(shards: PyTree, like: PyTree, world_size: int, group: Any = None) -> PyTree:
    """The whole leaves of a (sub)tree from every rank's shards, with one autograd-aware all-gather.

    The shards are flattened into one buffer, gathered, and each leaf cut out and stripped of its
    padding (a view of the gathered buffer for a single-leaf part); the gradient of the result
    flows back to this rank's shards, summed over ranks, through one reduce-scatter of one buffer.

    Args:
        shards: this rank's shards, ``(c, *rest)`` leaves of one dtype.
        like: the same (sub)tree with whole leaves' shapes (e.g. :func:`flm.model.param_template`).
        world_size: number of ranks (1: the shards are the leaves).
        group: the process group (default: the whole job).

    Returns:
        A tree like ``like`` holding the whole leaves (computed, differentiable).

    Raises:
        ValueError: leaves of several dtypes (one buffer needs one dtype).
    """
    leaves, spec = optree.tree_flatten(shards, namespace="")
    whole = optree.tree_leaves(like, namespace="")
    if world_size == 1:
        return optree.tree_unflatten(spec, [t[: ref.shape[0]] for t, ref in zip(leaves, whole)])
    if len({t.dtype for t in leaves}) > 1:
        raise ValueError(f"gather_tree: one gather needs one dtype, got {sorted({str(t.dtype) for t in leaves})}")
    flat = leaves[0].reshape(-1) if len(leaves) == 1 else torch.cat([t.reshape(-1) for t in leaves])
    gathered = all_gather_autograd(flat, group).view(world_size, -1)
    layout = tuple((tuple(t.shape), ref.shape[0]) for t, ref in zip(leaves, whole))
    return optree.tree_unflatten(spec, list(_Unpack.apply(gathered, layout)))


def sharded_transformer_lm(
    params: PyTree,
    token_ids: torch.Tensor,
    config: TransformerConfig,
    *,
    world_size: int,
    group: Any = None,
    compute_dtype: torch.dtype | None = None,
    targets: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`flm.model.transformer_lm` on sharded parameters (a collective: every rank calls it).

    Gathers one part at a time; with gradients enabled, blocks (and, for logits, the head) are
    recomputed in the backward (see the module docstring) instead of keeping their gathered weights.

    Args:
        params: this rank's shards (:func:`init_sharded_params`).
        token_ids: ``(batch, seq_len)`` int64 ids, this rank's own batch (not value-checked).
        config: the model.
        world_size: number of ranks the parameters are sharded over.
        group: the process group (default: the whole job).
        compute_dtype: mixed precision: the gathered (float32) weights are cast to it, so the
            gradients are reduced in the parameters' own dtype.
        targets: ``(batch, seq_len)``: return the mean cross-entropy instead of the logits, with
            the head fused into the loss (:func:`flm.loss.token_linear_cross_entropy`, chunks of
            about ``2**20`` logits), so the whole ``(batch · seq_len, vocab_size)`` logits never
            exist at once.

    Returns:
        Logits ``(batch, seq_len, vocab_size)``, or the 0-d float32 loss when ``targets`` is given.

    Source: handout §3.6 (the model); ZeRO stage 3 / FSDP (parameter gathering); Chen et al.
    (2016), "Training Deep Nets with Sublinear Memory Cost" (recomputation).
    """
    like = param_template(config)
    block = config.block
    recompute = torch.is_grad_enabled()

    def whole(shards: PyTree, template: PyTree) -> PyTree:
        full = gather_tree(shards, template, world_size, group)
        return full if compute_dtype is None else tree_map(lambda p: p.to(compute_dtype), full)

    def run(fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        return checkpoint(fn, *args, use_reentrant=False) if recompute else fn(*args)

    # The embedding's backward keeps only the ids, not the table: no recomputation needed.
    x = nn.embedding(whole(params["token_embeddings"], like["token_embeddings"]), token_ids, check=False)
    rope_cache = (
        None if block.rope_theta is None else nn.attention_rope_tables(x, block.num_heads, block.rope_theta, None)
    )
    for shards, template in zip(params["layers"], like["layers"]):

        def layer(shards: PyTree, h: torch.Tensor, template: PyTree = template) -> torch.Tensor:
            return nn.transformer_block(whole(shards, template), h, block, None, rope_cache=rope_cache)

        x = run(layer, shards, x)
    head_key = "token_embeddings" if config.tie_embeddings else "lm_head"
    if targets is None:

        def logits_of(parts: PyTree, h: torch.Tensor) -> torch.Tensor:
            full = whole(parts, {k: like[k] for k in parts})
            if "ln_final" in full:
                h = nn.rms_norm(full["ln_final"], h, config.eps)
            return nn.linear(full[head_key], h)

        return run(logits_of, {k: params[k] for k in ("ln_final", head_key) if k in params}, x)
    # The head fused into the loss (flm.loss.token_linear_cross_entropy): the logits exist one
    # chunk of ~2**20 values at a time, in the forward and in the backward (which recomputes
    # them), and the head's gradient is accumulated into one buffer, which is what the gather's
    # reduce-scatter receives. The final norm is gathered on its own, so the head stays a view of
    # its gathered buffer.
    if "ln_final" in params:
        x = nn.rms_norm(whole(params["ln_final"], like["ln_final"]), x, config.eps)
    head = whole(params[head_key], like[head_key])["weight"]
    chunk = max(1, _LOSS_CHUNK_VALUES // config.vocab_size)
    losses = token_linear_cross_entropy(x, head, targets, check=False, chunk_rows=chunk)
    return losses.mean()


def sharded_global_norm(grads: PyTree, group: Any = None) -> torch.Tensor:
    """The ℓ2 norm of the whole gradient from every rank's shards: ``sqrt(Σ_ranks ‖shard‖²)``
    (a collective; padding rows are zero and add nothing). Without a process group, the local norm.

    Args:
        grads: this rank's gradient shards.
        group: the process group (default: the whole job).

    Returns:
        A 0-d float32 tensor, the same on every rank.
    """
    local = optim.global_norm(grads)
    if not (dist.is_available() and dist.is_initialized()):
        return local
    squares = local.square()  # a new tensor: the all-reduce writes into it, nothing of the caller's
    dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=group)
    return squares.sqrt()


def make_sharded_train_step(
    config: TransformerConfig,
    tx: optim.GradientTransformation,
    *,
    world_size: int,
    group: Any = None,
    compute_dtype: torch.dtype | None = None,
    grad_accum_steps: int = 1,
    donate: bool = False,
) -> Callable[[PyTree, Any, torch.Tensor, torch.Tensor], tuple[PyTree, Any, dict[str, torch.Tensor]]]:
    """The train step of :func:`flm.train.make_train_step` on sharded parameters (every rank calls it).

    Each rank passes its own batch; the gradient each rank's shard receives is the mean over all
    ranks' batches (as data parallelism's all-reduce mean), so the step equals the replicated one up
    to float rounding. ``tx`` must clip with :func:`sharded_global_norm` (``make_optimizer(cfg,
    norm_fn=sharded_global_norm)``) to clip by the whole model's norm.

    Args:
        config: the model.
        tx: the optimiser, applied to the shards (elementwise, so sharding does not change it).
        world_size: number of ranks.
        group: the process group (default: the whole job).
        compute_dtype: mixed precision (see :func:`sharded_transformer_lm`).
        grad_accum_steps: micro-batches per step (see :func:`flm.train.make_train_step`).
        donate: update the incoming shards in place.

    Returns:
        ``step(params, opt_state, inputs, targets) -> (params, opt_state, metrics)`` with the
        metrics of :func:`flm.train.make_train_step` (``loss``: this rank's batch; ``grad_norm``:
        the whole model's).

    Source: ZeRO stage 3 (Rajbhandari et al., 2020); handout §4–§5.
    """
    from flm.train.step import step_body

    def loss_and_grad(params: PyTree, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[PyTree, torch.Tensor]:
        leaves, spec = optree.tree_flatten(params, namespace="")
        leaf_vars = [t.detach().requires_grad_() for t in leaves]
        loss = sharded_transformer_lm(
            optree.tree_unflatten(spec, leaf_vars),
            inputs,
            config,
            world_size=world_size,
            group=group,
            compute_dtype=compute_dtype,
            targets=targets,
        )
        # The gathers' backward sums over ranks: scaling by 1/world makes it the mean.
        grads = torch.autograd.grad(loss / world_size, leaf_vars)
        return optree.tree_unflatten(spec, list(grads)), loss.detach()

    def norm(grads: PyTree) -> torch.Tensor:
        return sharded_global_norm(grads, group)

    def step(params: PyTree, opt_state: Any, inputs: torch.Tensor, targets: torch.Tensor):
        return step_body(
            tx, loss_and_grad, params, opt_state, inputs, targets, grad_accum_steps, None, donate, norm_fn=norm
        )

    return step
