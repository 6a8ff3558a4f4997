"""Gradient clipping by the global ℓ2 norm.

Source: CS336 assignment 1 handout §4.5 (gradient_clipping).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from flm._compat import foreach_mul, foreach_mul_, foreach_norm
from flm.optim import _kernels
from flm.optim.base import GradientTransformation, PyTree
from flm.tree import tree_leaves

__all__ = ["global_norm", "clip_by_global_norm", "ClipState", "recorded_grad_norm"]


def _by_dtype(leaves: list[torch.Tensor]) -> dict[torch.dtype, list[int]]:
    """The positions of ``leaves`` grouped by dtype (in first-seen order), for one foreach call each."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, x in enumerate(leaves):
        groups.setdefault(x.dtype, []).append(i)
    return groups


def global_norm(tree: PyTree) -> torch.Tensor:
    """The ℓ2 norm of all leaves of ``tree`` taken together, ``sqrt(Σ ‖leaf‖²)``.

    Each leaf's norm is accumulated and returned in at least float32 (a bf16 leaf's norm is not
    rounded to bf16), and the total in the promotion of those dtypes.

    Args:
        tree: a tree of float tensors.

    Returns:
        0-d tensor in the leaves' promoted dtype, at least float32; 0 for an empty tree.

    Source: handout §4.5.
    """
    leaves = tree_leaves(tree)
    if not leaves:
        return torch.zeros(())
    if _kernels.use_foreach(leaves):
        norms: list[torch.Tensor] = [torch.zeros(())] * len(leaves)
        for dtype, idx in _by_dtype(leaves).items():
            group = foreach_norm([leaves[i] for i in idx], dtype=torch.promote_types(dtype, torch.float32))
            for i, n in zip(idx, group):
                norms[i] = n
    else:
        norms = [torch.linalg.vector_norm(x, dtype=torch.promote_types(x.dtype, torch.float32)) for x in leaves]
    dtype = torch.float32
    for n in norms:
        dtype = torch.promote_types(dtype, n.dtype)
    return torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms]))


class ClipState(NamedTuple):
    """State of :func:`clip_by_global_norm`: the global norm of the gradients it last saw (before
    clipping), so a train step can report it without computing it a second time."""

    grad_norm: torch.Tensor


def recorded_grad_norm(state: Any) -> torch.Tensor | None:
    """The gradient norm a :class:`ClipState` in ``state`` (e.g. a ``chain``'s tuple) recorded, or ``None``."""
    if isinstance(state, ClipState):
        return state.grad_norm
    if isinstance(state, tuple) and not hasattr(state, "_fields"):
        for part in state:
            found = recorded_grad_norm(part)
            if found is not None:
                return found
    return None


def clip_by_global_norm(
    max_norm: float,
    eps: float = 1e-6,
    *,
    inplace: bool = False,
    norm_fn: Callable[[PyTree], torch.Tensor] | None = None,
) -> GradientTransformation:
    """Scale the gradients down when their global ℓ2 norm exceeds ``max_norm``.

    ``g ← g · M / (‖g‖₂ + ε)`` if ``‖g‖₂ > M``, else ``g`` unchanged (exactly), with ε = 1e-6 as in
    the handout and ``torch.nn.utils.clip_grad_norm_``. Computed with tensor ops (no host sync).
    Each leaf is scaled in its own dtype, so a mixed-dtype tree (e.g. bf16 and float32 leaves)
    gets the float32 scale rounded once per dtype, not in the first leaf's dtype.

    Args:
        max_norm: M > 0.
        eps: ε added to the norm.
        inplace: scale the incoming gradient tensors in place (donating them: a train step that
            owns its freshly computed gradients saves one allocation and pass over them).
        norm_fn: ``grads -> 0-d norm`` (default :func:`global_norm`). Sharded training
            (:mod:`flm.shard`) passes the norm over every rank's shard, so each rank clips with the
            whole model's norm.

    Returns:
        A :class:`GradientTransformation` whose state, a :class:`ClipState`, records the global
        norm of the last gradients (before clipping; a 0-d float tensor).

    Raises:
        ValueError: if ``max_norm`` is not positive.

    Source: handout §4.5 (gradient_clipping).
    """
    if not max_norm > 0:
        raise ValueError(f"clip_by_global_norm: max_norm must be positive, got {max_norm!r}")

    def init(params: PyTree) -> ClipState:
        # In the dtype global_norm returns for gradients like params (at least float32), so the
        # state keeps one dtype and a donating step can write each new norm into this buffer.
        dtype = torch.float32
        for x in tree_leaves(params):
            if x.is_floating_point():
                dtype = torch.promote_types(dtype, x.dtype)
        return ClipState(torch.zeros((), dtype=dtype, device=_kernels.first_device(params)))

    def update(grads: PyTree, state: Any, params: PyTree = None) -> tuple[PyTree, ClipState]:
        leaves, spec = optree.tree_flatten(grads, namespace="")
        if not leaves:
            return grads, ClipState(torch.zeros(()))
        norm = (global_norm if norm_fn is None else norm_fn)(grads)
        scale = torch.where(norm > max_norm, max_norm / (norm + eps), torch.ones_like(norm))
        if _kernels.use_foreach(leaves):  # one foreach call per dtype, each with the scale in that dtype
            groups = _by_dtype(leaves)
            if inplace:
                for dtype, idx in groups.items():
                    foreach_mul_([leaves[i] for i in idx], scale.to(dtype))
                return grads, ClipState(norm)
            scaled = list(leaves)
            for dtype, idx in groups.items():
                for i, out in zip(idx, foreach_mul([leaves[i] for i in idx], scale.to(dtype))):
                    scaled[i] = out
        else:
            scaled = [g * scale.to(g.dtype) for g in leaves]
        return optree.tree_unflatten(spec, scaled), ClipState(norm)

    return GradientTransformation(init, update)
