"""Functional optimisers: gradient transformations over parameter pytrees, optax-style.

A :class:`GradientTransformation` is a pair of pure functions::

    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    params = apply_updates(params, updates)

Optimisers are chains of small transformations, each with its own state: AdamW is
``chain(scale_by_adam(β1, β2, ε), add_decayed_weights(λ), scale_by_learning_rate(α))`` and SGD is
``chain(trace(μ), scale_by_learning_rate(α))``. States are NamedTuples of tensors (step counts are
0-d int64 tensors), so they flatten into a checkpoint and work under ``torch.compile`` and
``torch.func.vmap``. Learning rates may be schedules ``step -> lr`` evaluated on the 0-d step
tensor (no host sync).

For speed the transformations run on flattened leaves with ``torch._foreach_*`` kernels (falling
back to per-leaf ops inside ``vmap``, which has no batching rule for them, and under
``torch.compile``); :func:`adamw` runs its whole chain as one fused kernel on eager tensors.
Semantics stay pure: the caller's params, grads and state are never written unless
``inplace=True`` is asked for, which donates the old state's buffers (as JAX's buffer donation
does) to reach ``torch.optim`` speed.

Source: CS336 assignment 1 handout §4.2–4.5; Loshchilov & Hutter (2019), Algorithm 2; the optax
design (Babuschkin et al., 2020: optimisers as chains of gradient transformations).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import optree
import torch

from flm.tree import tree_leaves, tree_map, tree_structure

__all__ = [
    "AdamWState",
    "EmptyState",
    "GradientTransformation",
    "ScaleByAdamState",
    "ScaleByLearningRateState",
    "Schedule",
    "TraceState",
    "adamw",
    "add_decayed_weights",
    "apply_updates",
    "chain",
    "clip_by_global_norm",
    "constant_schedule",
    "cosine_schedule",
    "global_norm",
    "identity",
    "learning_rate_at",
    "scale_by_adam",
    "scale_by_learning_rate",
    "sgd",
    "step_count",
    "trace",
]

PyTree = Any
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


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam` (and the first part of :func:`adamw`'s state).

    Attributes:
        step: 0-d int64 tensor, the number of updates done so far.
        m: first-moment estimates, a tree like the params (same dtypes).
        v: second-moment estimates, a tree like the params.
    """

    step: torch.Tensor
    m: PyTree
    v: PyTree


AdamWState = ScaleByAdamState
"""The moments part of :func:`adamw`'s state (an alias of :class:`ScaleByAdamState`)."""


class ScaleByLearningRateState(NamedTuple):
    """State of :func:`scale_by_learning_rate`: ``step``, the 0-d int64 count of updates done,
    at which the learning-rate schedule is evaluated."""

    step: torch.Tensor


class TraceState(NamedTuple):
    """State of :func:`trace`: the momentum buffers (a tree like the params; ``()`` without momentum)."""

    trace: PyTree


# --------------------------------------------------------------------------------------------
# Leaf-list kernels: torch._foreach_* when possible, per-leaf ops inside functorch transforms.
# --------------------------------------------------------------------------------------------


def _use_foreach(leaves: Sequence[torch.Tensor]) -> bool:
    """Eager, untransformed leaves get ``_foreach`` kernels; inside ``vmap``/``grad`` (which have
    no batching rules for them) and under ``torch.compile`` (which fuses per-leaf ops itself)
    the same math runs leaf by leaf."""
    if not leaves or torch.compiler.is_compiling():
        return False
    is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return not any(is_wrapped(t) for t in leaves)


def _host_scalars(leaves: Sequence[torch.Tensor], *scalars: float | torch.Tensor) -> bool:
    """Whether the leaves live on the CPU and the scalars are floats or 0-d CPU tensors, so the
    foreach kernels can take the scalars as Python floats without a device sync."""
    if any(t.device.type != "cpu" for t in leaves):
        return False
    return all(not isinstance(x, torch.Tensor) or (x.dim() == 0 and x.device.type == "cpu") for x in scalars)


def _step_tensor(device: torch.device | None = None) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=device)


def _first_device(tree: PyTree) -> torch.device | None:
    leaves = tree_leaves(tree)
    return leaves[0].device if leaves else None


def _mul_scalar(leaves: list[torch.Tensor], factor: torch.Tensor) -> list[torch.Tensor]:
    """``[x · factor]`` for a 0-d float64 ``factor``: one foreach kernel with a host float on
    the CPU, a tensor scalar (no sync) on accelerators, per-leaf ops inside transforms."""
    if _use_foreach(leaves):
        if _host_scalars(leaves, factor):
            return torch._foreach_mul(leaves, float(factor))
        if len({x.dtype for x in leaves}) == 1:
            return torch._foreach_mul(leaves, factor.to(leaves[0].dtype))
    return [x * factor.to(x.dtype) for x in leaves]


# --------------------------------------------------------------------------------------------
# Schedules (handout §4.4)
# --------------------------------------------------------------------------------------------


def constant_schedule(lr: float) -> Schedule:
    """Return the schedule ``step -> lr`` (a float64 0-d tensor on the step's device)."""
    lr = float(lr)

    def schedule(step: torch.Tensor | int) -> torch.Tensor:
        step = torch.as_tensor(step)
        return torch.full((), lr, dtype=torch.float64, device=step.device)

    return schedule


def cosine_schedule(
    max_learning_rate: float, min_learning_rate: float, warmup_iters: int, cosine_cycle_iters: int
) -> Schedule:
    """Cosine annealing with linear warm-up, as a function of the (0-based) step ``t``.

    .. math::
        α_t = \\begin{cases}
          \\frac{t}{T_w} α_{max} & t < T_w \\\\
          α_{min} + \\tfrac12\\left(1 + \\cos\\left(\\frac{t − T_w}{T_c − T_w} π\\right)\\right)(α_{max} − α_{min}) & T_w ≤ t ≤ T_c \\\\
          α_{min} & t > T_c
        \\end{cases}

    Args:
        max_learning_rate: α_max (a float, or a 0-d tensor: one value per model inside ``vmap``).
        min_learning_rate: α_min (likewise).
        warmup_iters: T_w ≥ 0.
        cosine_cycle_iters: T_c ≥ T_w.

    Returns:
        ``schedule(step)``: accepts an int or a 0-d tensor and returns a float64 0-d tensor on the
        step's device, computed with tensor ops (no host sync; compiles into a step).

    Raises:
        ValueError: for negative iteration counts or ``T_c < T_w``.

    Source: handout §4.4 (learning_rate_schedule).
    """
    if warmup_iters < 0 or cosine_cycle_iters < warmup_iters:
        raise ValueError(
            f"cosine_schedule: need 0 ≤ warmup_iters ≤ cosine_cycle_iters, got {warmup_iters}, {cosine_cycle_iters}"
        )
    a_max, a_min = _hyper(max_learning_rate), _hyper(min_learning_rate)
    t_w, t_c = int(warmup_iters), int(cosine_cycle_iters)

    def schedule(step: torch.Tensor | int) -> torch.Tensor:
        t = torch.as_tensor(step).to(torch.float64)
        zero = torch.zeros_like(t)
        warm = t / t_w * a_max if t_w > 0 else zero + a_max
        progress = (t - t_w) / (t_c - t_w) if t_c > t_w else zero
        cosine = a_min + 0.5 * (1.0 + torch.cos(progress * math.pi)) * (a_max - a_min)
        return torch.where(t < t_w, warm, torch.where(t <= t_c, cosine, zero + a_min))

    return schedule


def _hyper(x: float | torch.Tensor) -> float | torch.Tensor:
    """A hyperparameter as a float, or as the tensor it is (a per-model value under ``vmap``)."""
    return x.to(torch.float64) if isinstance(x, torch.Tensor) else float(x)


def _as_schedule(lr: float | torch.Tensor | Schedule) -> Schedule:
    if callable(lr):
        return lr
    if isinstance(lr, torch.Tensor):  # e.g. one learning rate per model in a vmapped sweep
        return lambda step: torch.zeros((), dtype=torch.float64, device=lr.device) + lr.to(torch.float64)
    if not isinstance(lr, (int, float)) or lr < 0:
        raise ValueError(f"learning rate must be a non-negative float or a schedule, got {lr!r}")
    return constant_schedule(float(lr))


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
        ValueError: if the structures differ.
    """
    if tree_structure(params) != tree_structure(updates):
        raise ValueError("apply_updates: params and updates have different tree structures")
    p_leaves, spec = optree.tree_flatten(params, namespace="")
    u_leaves = [u.to(p.dtype) for p, u in zip(p_leaves, tree_leaves(updates))]
    if inplace:
        if _use_foreach(p_leaves):
            torch._foreach_add_(p_leaves, u_leaves)
        else:
            for p, u in zip(p_leaves, u_leaves):
                p.add_(u)
        return params
    new = torch._foreach_add(p_leaves, u_leaves) if _use_foreach(p_leaves) else [p + u for p, u in zip(p_leaves, u_leaves)]
    return optree.tree_unflatten(spec, new)


# --------------------------------------------------------------------------------------------
# Gradient clipping (handout §4.5)
# --------------------------------------------------------------------------------------------


def global_norm(tree: PyTree) -> torch.Tensor:
    """The ℓ2 norm of all leaves of ``tree`` taken together, ``sqrt(Σ ‖leaf‖²)``.

    Args:
        tree: a tree of float tensors.

    Returns:
        0-d tensor in the leaves' (promoted) dtype; 0 for an empty tree.

    Source: handout §4.5.
    """
    leaves = tree_leaves(tree)
    if not leaves:
        return torch.zeros(())
    norms = torch._foreach_norm(leaves) if _use_foreach(leaves) else [torch.linalg.vector_norm(x) for x in leaves]
    dtype = torch.promote_types(norms[0].dtype, torch.float32)
    return torch.linalg.vector_norm(torch.stack([n.to(dtype) for n in norms]))


def clip_by_global_norm(max_norm: float, eps: float = 1e-6) -> GradientTransformation:
    """Scale the gradients down when their global ℓ2 norm exceeds ``max_norm``.

    ``g ← g · M / (‖g‖₂ + ε)`` if ``‖g‖₂ > M``, else ``g`` unchanged (exactly), with ε = 1e-6 as in
    the handout and ``torch.nn.utils.clip_grad_norm_``. Computed with tensor ops (no host sync).

    Args:
        max_norm: M > 0.
        eps: ε added to the norm.

    Returns:
        A stateless :class:`GradientTransformation`.

    Raises:
        ValueError: if ``max_norm`` is not positive.

    Source: handout §4.5 (gradient_clipping).
    """
    if not max_norm > 0:
        raise ValueError(f"clip_by_global_norm: max_norm must be positive, got {max_norm!r}")

    def init(params: PyTree) -> EmptyState:
        return EmptyState()

    def update(grads: PyTree, state: EmptyState, params: PyTree = None) -> tuple[PyTree, EmptyState]:
        leaves, spec = optree.tree_flatten(grads, namespace="")
        if not leaves:
            return grads, state
        norm = global_norm(grads)
        scale = torch.where(norm > max_norm, max_norm / (norm + eps), torch.ones_like(norm))
        if _use_foreach(leaves):
            scaled = torch._foreach_mul(leaves, scale.to(leaves[0].dtype))
        else:
            scaled = [g * scale.to(g.dtype) for g in leaves]
        return optree.tree_unflatten(spec, scaled), state

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------------------------
# Transformations: momentum, Adam scaling, decoupled weight decay, learning rate
# --------------------------------------------------------------------------------------------


def _decay_mask(mask: PyTree | Callable[[PyTree], PyTree] | None, params: PyTree, n: int) -> list[bool]:
    if mask is None:
        return [True] * n
    tree = mask(params) if callable(mask) else mask
    flags = [bool(x) for x in tree_leaves(tree)]
    if len(flags) != n:
        raise ValueError(f"add_decayed_weights: weight-decay mask has {len(flags)} leaves, params have {n}")
    return flags


def trace(decay: float) -> GradientTransformation:
    """Heavy-ball momentum: keep ``b ← μ b + g`` and output ``b`` (``g`` itself when μ = 0).

    Args:
        decay: μ ∈ [0, 1).

    Returns:
        A :class:`GradientTransformation` with :class:`TraceState` (buffers like the params;
        ``()`` when μ = 0, the identity then).

    Raises:
        ValueError: if ``decay`` is outside [0, 1).

    Source: handout §4.2 (SGD); ``torch.optim.SGD`` with zero dampening; optax ``trace``.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"trace: momentum decay must be in [0, 1), got {decay!r}")
    mu = float(decay)

    def init(params: PyTree) -> TraceState:
        return TraceState(trace=tree_map(torch.zeros_like, params) if mu > 0 else ())

    def update(grads: PyTree, state: TraceState, params: PyTree = None) -> tuple[PyTree, TraceState]:
        if mu == 0:
            return grads, state
        g, spec = optree.tree_flatten(grads, namespace="")
        b = tree_leaves(state.trace)
        if len(b) != len(g):
            raise ValueError(f"trace: {len(g)} gradient leaves but state has {len(b)} buffers")
        if _use_foreach(g + b):
            new = torch._foreach_mul(b, mu)
            torch._foreach_add_(new, g)
        else:
            new = [bi * mu + gi for bi, gi in zip(b, g)]
        return optree.tree_unflatten(spec, new), TraceState(optree.tree_unflatten(tree_structure(state.trace), new))

    return GradientTransformation(init, update)


def _adam_moments(m: list, v: list, g: list, b1: float, b2: float, inplace: bool) -> tuple[list, list]:
    """``m ← lerp(m, g, 1 − β1)``, ``v ← β2 v + (1 − β2) g²`` (into ``m``, ``v`` when ``inplace``)."""
    if _use_foreach(g + m + v):
        if inplace:
            torch._foreach_lerp_(m, g, 1.0 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, g, g, 1.0 - b2)
            return m, v
        m_new, v_new = torch._foreach_lerp(m, g, 1.0 - b1), torch._foreach_mul(v, b2)
        torch._foreach_addcmul_(v_new, g, g, 1.0 - b2)
        return m_new, v_new
    m_new = [mi.lerp(gi, 1.0 - b1) for mi, gi in zip(m, g)]
    return m_new, [torch.addcmul(vi * b2, gi, gi, value=1.0 - b2) for vi, gi in zip(v, g)]


def _adam_coefficients(step: torch.Tensor, b1: float, b2: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ε√(1 − β2ᵗ), √(1 − β2ᵗ)/(1 − β1ᵗ))`` as float64 0-d tensors, for ``t = step``."""
    t = step.to(torch.float64)
    bias2_sqrt = torch.sqrt(1.0 - b2**t)
    return eps * bias2_sqrt, bias2_sqrt / (1.0 - b1**t)


def _adam_direction(m: list, v: list, eps_t: torch.Tensor, k: torch.Tensor, out_scale: torch.Tensor | None = None
                    ) -> list:
    """``k · m / (√v + ε_t)`` leaf by leaf, then ``× out_scale`` (in the same buffer) if given."""
    scale = k if out_scale is None else k * out_scale
    if _use_foreach(m + v) and _host_scalars(m, eps_t, scale):
        d = torch._foreach_sqrt(v)
        torch._foreach_add_(d, float(eps_t))
        for mi, di in zip(m, d):  # m / denom into the denominator's buffer: one allocation, not two
            torch.div(mi, di, out=di)
        torch._foreach_mul_(d, float(scale))
        return d
    if _use_foreach(m + v) and len({x.dtype for x in m}) == 1:
        dtype = m[0].dtype
        d = torch._foreach_sqrt(v)
        torch._foreach_add_(d, eps_t.to(dtype))
        d = torch._foreach_div(m, d)
        torch._foreach_mul_(d, scale.to(dtype))
        return d
    return [mi / (vi.sqrt() + eps_t.to(vi.dtype)) * scale.to(mi.dtype) for mi, vi in zip(m, v)]


def scale_by_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *, inplace: bool = False
) -> GradientTransformation:
    """Rescale the gradients by Adam's bias-corrected moment ratio (no learning rate, no sign flip).

    With ``t = state.step + 1`` and gradient ``g``:

    .. math::
        m ← β_1 m + (1 − β_1) g, \\qquad v ← β_2 v + (1 − β_2) g^2,

        d = \\frac{\\hat m}{\\sqrt{\\hat v} + ε}, \\qquad \\hat m = \\frac{m}{1 − β_1^t},\\quad \\hat v = \\frac{v}{1 − β_2^t},

    computed as ``d = (√(1 − β2ᵗ)/(1 − β1ᵗ)) · m / (√v + ε√(1 − β2ᵗ))``. ε is added to the
    bias-corrected ``√v̂`` as in Loshchilov & Hutter (2019, Algorithm 2) and ``torch.optim.AdamW``
    (the handout's Algorithm 1 folds the bias corrections into α_t instead, which moves ε by a
    factor √(1 − β2ᵗ)).

    Args:
        b1: β1 ∈ [0, 1).
        b2: β2 ∈ [0, 1).
        eps: ε > 0.
        inplace: write the new moments into the incoming state's buffers (donating them, in eager
            mode) instead of allocating new ones: the state passed to ``update`` must not be used again.

    Returns:
        A :class:`GradientTransformation` with :class:`ScaleByAdamState`; the output ``d`` has the
        structure and dtypes of the gradients.

    Raises:
        ValueError: for β outside [0, 1) or ε ≤ 0; from ``update``, when the gradients and the
            state have different numbers of leaves.

    Source: handout §4.3, Algorithm 1; Kingma & Ba (2015), Algorithm 1; Loshchilov & Hutter (2019),
    Algorithm 2; optax ``scale_by_adam``.
    """
    b1, b2 = float(b1), float(b2)
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"scale_by_adam: betas must be in [0, 1), got ({b1!r}, {b2!r})")
    if not eps > 0:
        raise ValueError(f"scale_by_adam: eps must be positive, got {eps!r}")
    eps = float(eps)

    def init(params: PyTree) -> ScaleByAdamState:
        zeros = tree_map(torch.zeros_like, params)
        return ScaleByAdamState(step=_step_tensor(_first_device(params)), m=zeros, v=tree_map(torch.zeros_like, params))

    def update(grads: PyTree, state: ScaleByAdamState, params: PyTree = None) -> tuple[PyTree, ScaleByAdamState]:
        g, spec = optree.tree_flatten(grads, namespace="")
        m, v = tree_leaves(state.m), tree_leaves(state.v)
        if not (len(g) == len(m) == len(v)):
            raise ValueError(f"scale_by_adam: {len(g)} gradient leaves but state has {len(m)} m / {len(v)} v leaves")
        step = state.step + 1
        if not g:
            return grads, state._replace(step=step)
        m_new, v_new = _adam_moments(m, v, g, b1, b2, inplace)
        d = _adam_direction(m_new, v_new, *_adam_coefficients(step, b1, b2, eps))
        m_tree = optree.tree_unflatten(tree_structure(state.m), m_new)
        v_tree = optree.tree_unflatten(tree_structure(state.v), v_new)
        return optree.tree_unflatten(spec, d), ScaleByAdamState(step, m_tree, v_tree)

    return GradientTransformation(init, update)


def add_decayed_weights(
    weight_decay: float | torch.Tensor, mask: PyTree | Callable[[PyTree], PyTree] | None = None
) -> GradientTransformation:
    """Add decoupled weight decay to the updates: ``u ← u + λθ`` on the masked leaves.

    Placed before :func:`scale_by_learning_rate`, this gives AdamW's ``−αλθ`` term (decay of θ
    before this step's update, as in Loshchilov & Hutter (2019, Algorithm 2, line 12)).

    Args:
        weight_decay: λ ≥ 0, a float or a 0-d tensor (e.g. one value per model inside ``vmap``;
            a tensor λ is always applied, a float 0 makes this the identity).
        mask: which leaves get decay: a tree of bools shaped like the params, or a callable
            ``params -> tree of bools`` (e.g. skip gains and embeddings); ``None`` decays all.

    Returns:
        A stateless :class:`GradientTransformation` (:class:`EmptyState`); ``update`` needs
        ``params`` (same structure as the updates) unless λ is a float 0.

    Raises:
        ValueError: for a negative or non-finite float λ; from ``update``, for missing params or a
            mask/params leaf count that differs from the updates'.

    Source: handout §4.3, Algorithm 1 (θ ← θ − αλθ); Loshchilov & Hutter (2019), Algorithm 2;
    optax ``add_decayed_weights``.
    """
    if not isinstance(weight_decay, torch.Tensor) and not (0.0 <= weight_decay < math.inf):
        raise ValueError(f"add_decayed_weights: weight_decay must be a finite value ≥ 0, got {weight_decay!r}")
    lam = _hyper(weight_decay)
    if not isinstance(lam, torch.Tensor) and lam == 0.0:
        return identity()

    def update(updates: PyTree, state: EmptyState, params: PyTree = None) -> tuple[PyTree, EmptyState]:
        u, spec = optree.tree_flatten(updates, namespace="")
        if not u:
            return updates, state
        if params is None:
            raise ValueError("add_decayed_weights: update needs params (weight decay > 0)")
        p = tree_leaves(params)
        if len(p) != len(u):
            raise ValueError(f"add_decayed_weights: {len(u)} update leaves but params have {len(p)}")
        idx = [i for i, f in enumerate(_decay_mask(mask, params, len(p))) if f]
        if not idx:
            return updates, state
        out, u_sel, p_sel = list(u), [u[i] for i in idx], [p[i] for i in idx]
        if _use_foreach(u_sel + p_sel) and _host_scalars(u_sel, lam):
            new = torch._foreach_add(u_sel, p_sel, alpha=float(lam))
        elif isinstance(lam, torch.Tensor):
            new = [ui + pi * lam.to(pi.dtype) for ui, pi in zip(u_sel, p_sel)]
        else:
            new = [torch.add(ui, pi, alpha=lam) for ui, pi in zip(u_sel, p_sel)]
        for i, x in zip(idx, new):
            out[i] = x
        return optree.tree_unflatten(spec, out), state

    return GradientTransformation(lambda params: EmptyState(), update)


def scale_by_learning_rate(learning_rate: float | torch.Tensor | Schedule) -> GradientTransformation:
    """Multiply the updates by ``−α_t`` (gradient *descent*), with ``α_t = schedule(step)``.

    Args:
        learning_rate: α ≥ 0 as a float, a 0-d tensor (e.g. one value per model inside ``vmap``)
            or a schedule ``step -> α_t`` evaluated on the 0-d int64 step count (0 at the first update).

    Returns:
        A :class:`GradientTransformation` with :class:`ScaleByLearningRateState` whose
        ``learning_rate`` is the schedule (so :func:`learning_rate_at` can report α_t).

    Raises:
        ValueError: for a negative or non-numeric float learning rate.

    Source: handout §4.2 (θ ← θ − α∇L) and §4.4 (schedules); optax ``scale_by_learning_rate``.
    """
    schedule = _as_schedule(learning_rate)

    def init(params: PyTree) -> ScaleByLearningRateState:
        return ScaleByLearningRateState(step=_step_tensor(_first_device(params)))

    def update(updates: PyTree, state: ScaleByLearningRateState, params: PyTree = None) -> tuple[PyTree, Any]:
        u, spec = optree.tree_flatten(updates, namespace="")
        scaled = _mul_scalar(u, -schedule(state.step).to(torch.float64)) if u else u
        return optree.tree_unflatten(spec, scaled), ScaleByLearningRateState(step=state.step + 1)

    return GradientTransformation(init, update, schedule)


# --------------------------------------------------------------------------------------------
# Optimisers: SGD (handout §4.2) and AdamW (handout §4.3)
# --------------------------------------------------------------------------------------------


def sgd(lr: float | torch.Tensor | Schedule, momentum: float = 0.0) -> GradientTransformation:
    """Stochastic gradient descent, optionally with heavy-ball momentum: ``chain(trace(μ), scale_by_learning_rate(α))``.

    ``b ← μ b + g`` (when μ > 0), ``Δθ = −α_t b`` (or ``−α_t g``), as ``torch.optim.SGD``
    with zero dampening.

    Args:
        lr: learning rate α (float or 0-d tensor) or a schedule ``step -> α_t``.
        momentum: μ ∈ [0, 1).

    Returns:
        A :class:`GradientTransformation` with state ``(TraceState, ScaleByLearningRateState)``.

    Raises:
        ValueError: for a negative learning rate or momentum outside [0, 1).

    Source: handout §4.2, eq. (19).
    """
    return chain(trace(momentum), scale_by_learning_rate(lr))


def _adamw_kernel(
    g: list, m: list, v: list, p: list, flags: list[bool], *, b1: float, b2: float, eps: float,
    step: torch.Tensor, lr_t: torch.Tensor, weight_decay: float | torch.Tensor, inplace: bool,
) -> tuple[list, list, list]:
    """AdamW's chain on eager leaf lists: ``(updates, m, v)`` with ``u = −α·k·m/(√v + ε_t) − αλθ``
    (θ on the flagged leaves only), what ``chain(scale_by_adam, add_decayed_weights,
    scale_by_learning_rate)`` computes, up to rounding (a few ulps per step).

    On the CPU, with ``s = −αk``: the moments (3 passes), ``√v`` into a new buffer, ``(√v + ε_t)/s``
    as one ``add`` with a 0-d shift, ``m / that`` into the same buffer and ``+= −αλθ``: 7 passes
    and one new tensor per leaf (``torch.optim.AdamW(foreach=True)`` makes 8 passes and one).
    Elsewhere, or when ``1/s`` would not be representable, the direction is scaled separately.
    """
    m_new, v_new = _adam_moments(m, v, g, b1, b2, inplace)
    eps_t, k = _adam_coefficients(step, b1, b2, eps)
    scale = -lr_t * k
    foldable = {x.dtype for x in m_new} <= {torch.float32, torch.float64, torch.bfloat16}
    if _host_scalars(m_new, eps_t, scale) and foldable and abs(float(scale)) > 1e-30:
        upd = torch._foreach_sqrt(v_new)
        shift, inv = eps_t / scale, float(1.0 / scale)
        for mi, ui in zip(m_new, upd):
            torch.add(shift, ui, alpha=inv, out=ui)
            torch.div(mi, ui, out=ui)
    else:
        upd = _adam_direction(m_new, v_new, eps_t, k, out_scale=-lr_t)
    idx = [i for i, f in enumerate(flags) if f]
    if idx:
        u_sel, p_sel = [upd[i] for i in idx], [p[i] for i in idx]
        decay = -lr_t * weight_decay
        if _host_scalars(u_sel, decay):
            torch._foreach_add_(u_sel, p_sel, alpha=float(decay))
        else:
            torch._foreach_add_(u_sel, torch._foreach_mul(p_sel, decay.to(u_sel[0].dtype)))
    return upd, m_new, v_new


def adamw(
    lr: float | torch.Tensor | Schedule,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float | torch.Tensor = 0.01,
    mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    *,
    inplace: bool = False,
) -> GradientTransformation:
    """AdamW: ``chain(scale_by_adam(β1, β2, ε), add_decayed_weights(λ, mask), scale_by_learning_rate(α))``.

    With step ``t = state.step + 1``, learning rate ``α = lr(state.step)`` and gradient ``g``:

    .. math::
        m ← β_1 m + (1 − β_1) g, \\qquad v ← β_2 v + (1 − β_2) g^2,

        α_t = α \\frac{\\sqrt{1 − β_2^t}}{1 − β_1^t}, \\qquad
        Δθ = −α_t \\frac{m}{\\sqrt{v} + ε\\sqrt{1 − β_2^t}} − αλθ.

    This is the handout's Algorithm 1 with two details placed as in Loshchilov & Hutter (2019,
    Algorithm 2) and ``torch.optim.AdamW``: ε is added to the bias-corrected ``√v̂`` (hence the
    ``ε√(1 − β_2^t)`` above) and the decay uses θ before this step's Adam update. Both differ
    from a literal reading of the pseudo-code by O(ε) and O(α²λ); with them flm matches
    ``torch.optim.AdamW`` to float64 round-off.

    ``init`` and the state are exactly the chain's. On eager tensors (outside ``vmap``/``grad``
    and ``torch.compile``) ``update`` runs the chain as one fused foreach kernel (same results up
    to a few ulps of rounding per step); otherwise it runs the chain's own ``update``.

    Args:
        lr: α, a float, a 0-d tensor (e.g. one value per model inside ``vmap``) or a schedule
            ``step -> α`` (evaluated on the 0-d step tensor).
        betas: (β1, β2), each in [0, 1).
        eps: ε > 0.
        weight_decay: λ ≥ 0 (a float, or a 0-d tensor such as a per-model value inside ``vmap``).
        mask: which leaves get weight decay: a tree of bools shaped like the params, or a
            callable ``params -> tree of bools`` (e.g. skip gains and embeddings).
        inplace: write the new moments into the incoming state's buffers (donating them) instead
            of allocating new ones: the state passed to ``update`` must not be used again.

    Returns:
        A :class:`GradientTransformation` with state ``(ScaleByAdamState, EmptyState,
        ScaleByLearningRateState)``; ``update`` needs ``params`` when ``weight_decay > 0``.

    Raises:
        ValueError: for hyperparameters out of range, a malformed state, or missing ``params``
            with weight decay.

    Source: handout §4.3, Algorithm 1; Loshchilov & Hutter (2019), Algorithm 2; optax ``adamw``.
    """
    if len(betas) != 2:
        raise ValueError(f"adamw: betas must be a pair (β1, β2), got {betas!r}")
    b1, b2 = (float(b) for b in betas)
    composed = chain(scale_by_adam(b1, b2, eps, inplace=inplace), add_decayed_weights(weight_decay, mask),
                     scale_by_learning_rate(lr))
    use_decay = isinstance(weight_decay, torch.Tensor) or weight_decay > 0

    def update(grads: PyTree, state: tuple[Any, ...], params: PyTree = None) -> tuple[PyTree, tuple[Any, ...]]:
        if not (isinstance(state, tuple) and len(state) == 3 and isinstance(state[0], ScaleByAdamState)
                and isinstance(state[2], ScaleByLearningRateState)):
            raise ValueError("adamw: state must be (ScaleByAdamState, EmptyState, ScaleByLearningRateState), "
                             f"got {type(state).__name__}")
        adam_state, decay_state, lr_state = state
        g, spec = optree.tree_flatten(grads, namespace="")
        m, v = tree_leaves(adam_state.m), tree_leaves(adam_state.v)
        p: list[torch.Tensor] = []
        flags: list[bool] = []
        if use_decay and g:  # checked before any (donated) moment is written, on either path
            if params is None:
                raise ValueError("adamw: update needs params when weight_decay > 0")
            p = tree_leaves(params)
            flags = _decay_mask(mask, params, len(p))
        if not (len(g) == len(m) == len(v) and len(p) in (0, len(g)) and _use_foreach(g + m + v + p)):
            return composed.update(grads, state, params)
        step = adam_state.step + 1
        upd, m_new, v_new = _adamw_kernel(g, m, v, p, flags, b1=b1, b2=b2, eps=float(eps), step=step,
                                          lr_t=composed.learning_rate(lr_state.step).to(torch.float64),
                                          weight_decay=_hyper(weight_decay), inplace=inplace)
        m_tree = optree.tree_unflatten(tree_structure(adam_state.m), m_new)
        v_tree = optree.tree_unflatten(tree_structure(adam_state.v), v_new)
        new_state = (ScaleByAdamState(step, m_tree, v_tree), decay_state, ScaleByLearningRateState(lr_state.step + 1))
        return optree.tree_unflatten(spec, upd), new_state

    return GradientTransformation(composed.init, update, composed.learning_rate)


# --------------------------------------------------------------------------------------------
# Reading a (chain) state
# --------------------------------------------------------------------------------------------


def _find(state: Any, kinds: tuple[type, ...]) -> list[Any]:
    """The sub-states of the given types in a nested state, depth first (into plain tuples/lists)."""
    if isinstance(state, kinds):
        return [state]
    if type(state) in (tuple, list):
        return [found for s in state for found in _find(s, kinds)]
    return []


def step_count(state: Any) -> torch.Tensor | None:
    """Return the update count (0-d int64 tensor) held in an optimiser state, or ``None``.

    Looks through nested ``chain`` tuples, e.g. ``chain(clip_by_global_norm(1.0), adamw(...))``'s
    ``(EmptyState(), (ScaleByAdamState, EmptyState, ScaleByLearningRateState))``: the count of the
    last :class:`ScaleByLearningRateState` (the one whose schedule :func:`chain` exposes as
    ``learning_rate``), else of the first :class:`ScaleByAdamState`.

    Args:
        state: a state from ``tx.init``/``tx.update`` (or one restored with that structure).

    Returns:
        The 0-d int64 step tensor (a ``(K,)`` one for a vmapped stack of states), or ``None``.
    """
    counters = _find(state, (ScaleByLearningRateState,))
    if counters:
        return counters[-1].step
    adam = _find(state, (ScaleByAdamState,))
    return adam[0].step if adam else None


def learning_rate_at(tx: GradientTransformation, state: Any) -> torch.Tensor | None:
    """The learning rate ``tx`` uses for its next update from ``state`` (float64 0-d tensor).

    Args:
        tx: e.g. ``chain(clip_by_global_norm(1.0), adamw(cosine_schedule(...)))``.
        state: ``tx``'s state.

    Returns:
        ``tx.learning_rate`` evaluated at :func:`step_count` of ``state`` (a ``(K,)`` tensor for a
        vmapped stack of states), or ``None`` when ``tx`` has no schedule or ``state`` no step count.
    """
    step = step_count(state)
    if tx.learning_rate is None or step is None:
        return None
    return tx.learning_rate(step)
