"""The core of flm's optimisers: ``GradientTransformation``, ``chain`` and ``apply_updates``. The
leaf-list kernels the transformations share (torch's foreach kernels on eager tensors, per-leaf ops
inside functorch transforms) are in :mod:`flm.optim._kernels`.

Source: the optax design (Babuschkin et al., 2020); CS336 assignment 1 handout §4.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from flm._compat import foreach_add, foreach_add_, is_compiling
from flm.optim import _kernels
from flm.tree import PyTree, tree_leaves, tree_structure

__all__ = ["GradientTransformation", "EmptyState", "Schedule", "PyTree", "identity", "chain", "apply_updates"]

Schedule = Callable[[torch.Tensor], torch.Tensor]


class GradientTransformation(NamedTuple):
    """A pure ``(init, update)`` pair.

    Attributes:
        init: ``init(params) -> state``.
        update: ``update(grads, state, params=None) -> (updates, new_state)``; ``updates`` has the
            structure of ``grads`` and is *added* to the parameters by :func:`apply_updates`.
        learning_rate: the schedule ``step -> lr`` the transformation follows, if it has one
            (set by :func:`scale_by_learning_rate`, passed through by :func:`chain`, so
            :func:`adamw` and :func:`sgd` have it), so a train step can report the learning rate
            it used; see :func:`learning_rate_at`.
    """

    init: Callable[[PyTree], Any]
    update: Callable[..., tuple[PyTree, Any]]
    learning_rate: Schedule | None = None


class EmptyState(NamedTuple):
    """State of a stateless transformation."""


# --------------------------------------------------------------------------------------------
# Combinators
# --------------------------------------------------------------------------------------------


def identity() -> GradientTransformation:
    """The transformation that returns the gradients unchanged (useful as a neutral element)."""

    def init(params: PyTree) -> EmptyState:
        return EmptyState()

    def update(grads: PyTree, state: EmptyState, params: PyTree = None) -> tuple[PyTree, EmptyState]:
        return grads, state

    return GradientTransformation(init, update)


def chain(*transformations: GradientTransformation) -> GradientTransformation:
    """Compose transformations left to right: each one's updates feed the next.

    Args:
        *transformations: e.g. ``chain(clip_by_global_norm(1.0), adamw(3e-4))``.

    Returns:
        A transformation whose state is the tuple of the parts' states.
    """
    txs = tuple(transformations)

    def init(params: PyTree) -> tuple[Any, ...]:
        return tuple(tx.init(params) for tx in txs)

    def update(grads: PyTree, state: tuple[Any, ...], params: PyTree = None) -> tuple[PyTree, tuple[Any, ...]]:
        if len(state) != len(txs):
            raise ValueError(f"chain: state has {len(state)} parts for {len(txs)} transformations")
        new_states = []
        for tx, s in zip(txs, state):
            grads, s = tx.update(grads, s, params)
            new_states.append(s)
        return grads, tuple(new_states)

    schedules = [tx.learning_rate for tx in txs if tx.learning_rate is not None]
    return GradientTransformation(init, update, schedules[-1] if schedules else None)


def apply_updates(params: PyTree, updates: PyTree, *, inplace: bool = False) -> PyTree:
    """Return ``params + updates`` leaf by leaf, keeping each parameter's dtype.

    Args:
        params: the parameter tree.
        updates: a tree of the same structure (e.g. from ``tx.update``).
        inplace: add into the caller's parameter tensors (donating them) instead of allocating
            new ones; the returned tree then holds the same tensor objects.

    Returns:
        The new parameter tree (same structure and dtypes as ``params``).

    Raises:
        ValueError: if the structures differ (compared in eager calls; under ``torch.compile``,
            whose dynamo cannot trace a ``PyTreeSpec`` comparison on torch 2.11, only the leaf
            counts are compared).
    """
    if not is_compiling() and tree_structure(params) != tree_structure(updates):
        raise ValueError("apply_updates: params and updates have different tree structures")
    p_leaves, spec = optree.tree_flatten(params, namespace="")
    update_leaves = tree_leaves(updates)
    if len(update_leaves) != len(p_leaves):
        raise ValueError(f"apply_updates: {len(p_leaves)} parameter leaves but {len(update_leaves)} update leaves")
    u_leaves = [u.to(p.dtype) for p, u in zip(p_leaves, update_leaves)]
    if inplace:
        if _kernels.use_foreach(p_leaves):
            foreach_add_(p_leaves, u_leaves)
        else:
            for p, u in zip(p_leaves, u_leaves):
                p.add_(u)
        return params
    new = (
        foreach_add(p_leaves, u_leaves)
        if _kernels.use_foreach(p_leaves)
        else [p + u for p, u in zip(p_leaves, u_leaves)]
    )
    return optree.tree_unflatten(spec, new)
