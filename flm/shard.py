"""Sharded parameters, gradients and optimiser state (the ZeRO-3 / FSDP idea) for flm's pytrees.

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
from typing import Any

import torch

from flm.tree import tree_map

__all__ = ["shard_rows", "unshard_rows", "rows_per_rank", "shard_tree", "unshard_tree"]

PyTree = Any


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
