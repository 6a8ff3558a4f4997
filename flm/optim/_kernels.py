"""The leaf-list kernels and checks that :mod:`flm.optim`'s transformations share.

A private module: its names are the optimisers' building blocks, not flm's API. Each runs one
foreach kernel (``flm._compat.foreach_*``) on eager, untransformed leaves, and the
same math leaf by leaf inside ``torch.func`` transforms (which have no batching rules for the
foreach kernels) and under ``torch.compile`` (which fuses per-leaf ops itself). The Adam pieces
serve both :func:`flm.optim.scale_by_adam` and the fused :func:`flm.optim.adamw`, so the two
compute the same formula by construction.

Source: Kingma & Ba (2015), Algorithm 1; Loshchilov & Hutter (2019), Algorithm 2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from flm._compat import (
    foreach_add_,
    foreach_addcmul_,
    foreach_div,
    foreach_lerp,
    foreach_lerp_,
    foreach_mul,
    foreach_mul_,
    foreach_sqrt,
    is_compiling,
    is_transformed,
)
from flm.tree import leaf_paths, tree_leaves

__all__ = [
    "use_foreach",
    "host_scalars",
    "step_tensor",
    "first_device",
    "mul_scalar",
    "hyper",
    "decay_mask",
    "check_leaf_shapes",
    "adam_moments",
    "adam_coefficients",
    "adam_direction",
]


def use_foreach(leaves: Sequence[torch.Tensor]) -> bool:
    """Whether ``leaves`` may take the foreach kernels (``flm._compat.foreach_*``).

    Args:
        leaves: the tensors one kernel call would take (gradients, state and parameters together).

    Returns:
        ``True`` for a non-empty list of eager, untransformed tensors; ``False`` inside a
        ``torch.func`` transform and under ``torch.compile``, where the caller runs the same
        math leaf by leaf.
    """
    if len(leaves) == 0 or is_compiling():
        return False
    return not is_transformed(leaves)


def host_scalars(leaves: Sequence[torch.Tensor], *scalars: float | torch.Tensor) -> bool:
    """Whether the foreach kernels can take ``scalars`` as Python floats without a device sync.

    Args:
        leaves: the tensors of the kernel call.
        *scalars: floats or tensors.

    Returns:
        ``True`` when every leaf lives on the CPU and every scalar is a float or a 0-d CPU tensor.
    """
    if any(t.device.type != "cpu" for t in leaves):
        return False
    return all(not isinstance(x, torch.Tensor) or (x.dim() == 0 and x.device.type == "cpu") for x in scalars)


def step_tensor(device: torch.device | None = None) -> torch.Tensor:
    """A new step count: a 0-d int64 zero on ``device`` (the optimiser states' ``step``)."""
    return torch.zeros((), dtype=torch.int64, device=device)


def first_device(tree: Any) -> torch.device | None:
    """The device of the first leaf of ``tree`` (``None`` for an empty tree)."""
    leaves = tree_leaves(tree)
    return leaves[0].device if leaves else None


def mul_scalar(leaves: list[torch.Tensor], factor: torch.Tensor) -> list[torch.Tensor]:
    """``[x · factor]`` as new tensors.

    Args:
        leaves: tensors of any float dtypes.
        factor: a 0-d float64 tensor.

    Returns:
        One tensor per leaf, in the leaf's dtype: one foreach kernel with a host float on the
        CPU, with a tensor scalar (no sync) on accelerators, per-leaf ops inside transforms.
    """
    if use_foreach(leaves):
        if host_scalars(leaves, factor):
            return foreach_mul(leaves, float(factor))
        if len({x.dtype for x in leaves}) == 1:
            return foreach_mul(leaves, factor.to(leaves[0].dtype))
    return [x * factor.to(x.dtype) for x in leaves]


def hyper(x: float | torch.Tensor) -> float | torch.Tensor:
    """A hyperparameter as a float, or as the float64 tensor it is (one value per model under ``vmap``)."""
    return x.to(torch.float64) if isinstance(x, torch.Tensor) else float(x)


def decay_mask(mask: Any | Callable[[Any], Any] | None, params: Any, n: int) -> list[bool]:
    """Which of the ``n`` parameter leaves weight decay applies to.

    Args:
        mask: ``None`` (all), a tree of bools like ``params``, or a function ``params -> tree``.
        params: the parameter tree.
        n: the number of parameter leaves.

    Returns:
        ``n`` bools in leaf order.

    Raises:
        ValueError: the mask has another number of leaves than the parameters.
    """
    if mask is None:
        return [True] * n
    tree = mask(params) if callable(mask) else mask
    flags = [bool(x) for x in tree_leaves(tree)]
    if len(flags) != n:
        raise ValueError(f"add_decayed_weights: weight-decay mask has {len(flags)} leaves, params have {n}")
    return flags


def check_leaf_shapes(where: str, grads: Any, g: list, m: list, p: list | None = None) -> None:
    """Check that each gradient leaf has its moment's (and parameter's) shape: torch would
    otherwise fail deep in a kernel, or silently broadcast.

    Args:
        where: the caller's name, for the message.
        grads: the gradient tree (to name a leaf by its path).
        g: its leaves; ``m``: the first-moment leaves; ``p``: the parameter leaves, if any.

    Raises:
        ValueError: naming the first leaf whose shape differs.
    """
    for i, (gi, mi) in enumerate(zip(g, m)):
        pi = p[i] if p else None
        if gi.shape == mi.shape and (pi is None or pi.shape == gi.shape):
            continue
        name = leaf_paths(grads)[i] or "<root>"
        want = mi.shape if gi.shape != mi.shape else pi.shape
        held = "the optimiser state holds" if gi.shape != mi.shape else "the parameter has"
        raise ValueError(
            f"{where}: gradient leaf {name!r} has shape {tuple(gi.shape)}, but {held} shape {tuple(want)}; "
            "each gradient leaf must have its parameter's shape"
        )


def adam_moments(m: list, v: list, g: list, b1: float, b2: float, inplace: bool) -> tuple[list, list]:
    """Adam's moment updates ``m ← lerp(m, g, 1 − β1)``, ``v ← β2 v + (1 − β2) g²``.

    Args:
        m, v, g: first moments, second moments and gradients, leaf lists of equal shapes.
        b1, b2: β1, β2.
        inplace: write into ``m`` and ``v`` (donating them) instead of new tensors: with the
            foreach kernels, and leaf by leaf under ``torch.compile`` (where the writes become
            input mutations, so a compiled step keeps its moments' buffers; a compiled ``vmap``
            then needs moments batched like the gradients). Inside an eager ``torch.func``
            transform the moments are new tensors.

    Returns:
        ``(m_new, v_new)``.
    """
    if use_foreach(g + m + v):
        if inplace:
            foreach_lerp_(m, g, 1.0 - b1)
            foreach_mul_(v, b2)
            foreach_addcmul_(v, g, g, 1.0 - b2)
            return m, v
        m_new, v_new = foreach_lerp(m, g, 1.0 - b1), foreach_mul(v, b2)
        foreach_addcmul_(v_new, g, g, 1.0 - b2)
        return m_new, v_new
    if inplace and (is_compiling() or not is_transformed(g + m + v)):
        for mi, vi, gi in zip(m, v, g):
            mi.lerp_(gi, 1.0 - b1)
            vi.mul_(b2).addcmul_(gi, gi, value=1.0 - b2)
        return m, v
    m_new = [mi.lerp(gi, 1.0 - b1) for mi, gi in zip(m, g)]
    return m_new, [torch.addcmul(vi * b2, gi, gi, value=1.0 - b2) for vi, gi in zip(v, g)]


def adam_coefficients(step: torch.Tensor, b1: float, b2: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's bias corrections folded into two scalars, for ``t = step``.

    Args:
        step: the 0-d step count ``t ≥ 1``.
        b1, b2, eps: β1, β2, ε.

    Returns:
        ``(ε√(1 − β2ᵗ), √(1 − β2ᵗ)/(1 − β1ᵗ))`` as float64 0-d tensors, so that
        ``k · m / (√v + ε_t)`` is the bias-corrected Adam direction.
    """
    t = step.to(torch.float64)
    bias2_sqrt = torch.sqrt(1.0 - b2**t)
    return eps * bias2_sqrt, bias2_sqrt / (1.0 - b1**t)


def adam_direction(
    m: list, v: list, eps_t: torch.Tensor, k: torch.Tensor, out_scale: torch.Tensor | None = None
) -> list:
    """``k · m / (√v + ε_t)`` leaf by leaf, then ``× out_scale`` (in the same buffer) if given.

    Args:
        m, v: the updated moments.
        eps_t, k: from :func:`adam_coefficients`.
        out_scale: an optional 0-d factor (the fused AdamW's ``−lr``).

    Returns:
        New tensors, one per leaf, in the moments' dtypes.
    """
    scale = k if out_scale is None else k * out_scale
    if use_foreach(m + v) and host_scalars(m, eps_t, scale):
        d = foreach_sqrt(v)
        foreach_add_(d, float(eps_t))
        for mi, di in zip(m, d):  # m / denom into the denominator's buffer: one allocation, not two
            torch.div(mi, di, out=di)
        foreach_mul_(d, float(scale))
        return d
    if use_foreach(m + v) and len({x.dtype for x in m}) == 1:
        dtype = m[0].dtype
        d = foreach_sqrt(v)
        foreach_add_(d, eps_t.to(dtype))
        d = foreach_div(m, d)
        foreach_mul_(d, scale.to(dtype))
        return d
    return [mi / (vi.sqrt() + eps_t.to(vi.dtype)) * scale.to(mi.dtype) for mi, vi in zip(m, v)]
