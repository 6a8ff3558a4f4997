"""Functional optimisers: gradient transformations over parameter pytrees, optax-style.

A :class:`GradientTransformation` is a pair of pure functions::

    state = tx.init(params)
    updates, state = tx.update(grads, state, params)
    params = apply_updates(params, updates)

State is a NamedTuple of tensors (step counts are 0-d int64 tensors), so it flattens into a
checkpoint and works under ``torch.compile`` and ``torch.func.vmap``. Learning rates may be
schedules ``step -> lr`` evaluated on the 0-d step tensor (no host sync).

For speed the updates run on flattened leaves with ``torch._foreach_*`` kernels (falling back to
per-leaf ops inside ``vmap``, which has no batching rule for them). Semantics stay pure: the
caller's params, grads and state are never written unless ``inplace=True`` is asked for, which
donates the old state's buffers (as JAX's buffer donation does) to reach ``torch.optim`` speed.

Source: CS336 assignment 1 handout §4.2–4.5; Loshchilov & Hutter (2019), Algorithm 2.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import optree
import torch

from flm.tree import tree_leaves, tree_map, tree_structure

__all__ = [
    "GradientTransformation",
    "EmptyState",
    "AdamWState",
    "SGDState",
    "Schedule",
    "identity",
    "chain",
    "adamw",
    "sgd",
    "clip_by_global_norm",
    "global_norm",
    "apply_updates",
    "cosine_schedule",
    "constant_schedule",
    "step_count",
    "learning_rate_at",
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
            (set by :func:`adamw` and :func:`sgd`, passed through by :func:`chain`), so a train
            step can report the learning rate it used; see :func:`learning_rate_at`.
    """

    init: Callable[[PyTree], Any]
    update: Callable[..., tuple[PyTree, Any]]
    learning_rate: Schedule | None = None


class EmptyState(NamedTuple):
    """State of a stateless transformation."""


class AdamWState(NamedTuple):
    """AdamW state.

    Attributes:
        step: 0-d int64 tensor, the number of updates done so far.
        m: first-moment estimates, a tree like the params (same dtypes).
        v: second-moment estimates, a tree like the params.
    """

    step: torch.Tensor
    m: PyTree
    v: PyTree


class SGDState(NamedTuple):
    """SGD state: the update count and the momentum buffers (an empty tuple without momentum)."""

    step: torch.Tensor
    momentum: PyTree


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


def _scalar(x: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    return x if not isinstance(x, torch.Tensor) else x.to(like.device)


def _step_tensor(device: torch.device | None = None) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=device)


def _first_device(tree: PyTree) -> torch.device | None:
    leaves = tree_leaves(tree)
    return leaves[0].device if leaves else None


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
# SGD (handout §4.2) and AdamW (handout §4.3)
# --------------------------------------------------------------------------------------------


def sgd(lr: float | Schedule, momentum: float = 0.0) -> GradientTransformation:
    """Stochastic gradient descent, optionally with heavy-ball momentum.

    ``b ← μ b + g`` (when μ > 0), ``Δθ = −α_t b`` (or ``−α_t g``), as ``torch.optim.SGD``
    with zero dampening.

    Args:
        lr: learning rate α or a schedule ``step -> α_t``.
        momentum: μ ∈ [0, 1).

    Returns:
        A :class:`GradientTransformation` with :class:`SGDState`.

    Raises:
        ValueError: for a negative learning rate or momentum outside [0, 1).

    Source: handout §4.2, eq. (19).
    """
    schedule = _as_schedule(lr)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"sgd: momentum must be in [0, 1), got {momentum!r}")

    def init(params: PyTree) -> SGDState:
        buf = tree_map(torch.zeros_like, params) if momentum > 0 else ()
        return SGDState(step=_step_tensor(_first_device(params)), momentum=buf)

    def update(grads: PyTree, state: SGDState, params: PyTree = None) -> tuple[PyTree, SGDState]:
        lr_t = schedule(state.step)
        if momentum > 0:
            buf = tree_map(lambda b, g: b * momentum + g, state.momentum, grads)
        else:
            buf = state.momentum
        direction = buf if momentum > 0 else grads
        updates = tree_map(lambda d: d * (-lr_t).to(d.dtype), direction)
        return updates, SGDState(step=state.step + 1, momentum=buf)

    return GradientTransformation(init, update, schedule)


def _decay_mask(mask: PyTree | Callable[[PyTree], PyTree] | None, params: PyTree, n: int) -> list[bool]:
    if mask is None:
        return [True] * n
    tree = mask(params) if callable(mask) else mask
    flags = [bool(x) for x in tree_leaves(tree)]
    if len(flags) != n:
        raise ValueError(f"adamw: weight-decay mask has {len(flags)} leaves, params have {n}")
    return flags


def adamw(
    lr: float | Schedule,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float | torch.Tensor = 0.01,
    mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    *,
    inplace: bool = False,
) -> GradientTransformation:
    """AdamW: Adam with decoupled weight decay.

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
        A :class:`GradientTransformation` whose state is :class:`AdamWState`; ``update`` needs
        ``params`` when ``weight_decay > 0``.

    Raises:
        ValueError: for hyperparameters out of range, or missing ``params`` with weight decay.

    Source: handout §4.3, Algorithm 1; Loshchilov & Hutter (2019), Algorithm 2.
    """
    schedule = _as_schedule(lr)
    b1, b2 = (float(b) for b in betas)
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"adamw: betas must be in [0, 1), got {betas!r}")
    if not eps > 0:
        raise ValueError(f"adamw: eps must be positive, got {eps!r}")
    if not isinstance(weight_decay, torch.Tensor) and weight_decay < 0:
        raise ValueError(f"adamw: weight_decay must be ≥ 0, got {weight_decay!r}")
    # A tensor weight decay (per model under vmap) is always applied; a float 0 skips the work.
    use_decay = isinstance(weight_decay, torch.Tensor) or weight_decay > 0

    def init(params: PyTree) -> AdamWState:
        zeros = tree_map(torch.zeros_like, params)
        return AdamWState(step=_step_tensor(_first_device(params)), m=zeros, v=tree_map(torch.zeros_like, params))

    def update(grads: PyTree, state: AdamWState, params: PyTree = None) -> tuple[PyTree, AdamWState]:
        g, spec = optree.tree_flatten(grads, namespace="")
        m, v = tree_leaves(state.m), tree_leaves(state.v)
        if not (len(g) == len(m) == len(v)):
            raise ValueError(f"adamw: {len(g)} gradient leaves but state has {len(m)} m / {len(v)} v leaves")
        if not g:
            return grads, state._replace(step=state.step + 1)
        if use_decay and params is None:
            raise ValueError("adamw: update needs params when weight_decay > 0")
        step = state.step + 1
        lr_t = schedule(state.step).to(torch.float64)
        t = step.to(torch.float64)
        bias1 = 1.0 - b1**t
        bias2_sqrt = torch.sqrt(1.0 - b2**t)
        step_size = lr_t / bias1
        dtype = g[0].dtype
        if _use_foreach(g + m + v):
            if inplace:
                torch._foreach_lerp_(m, g, 1.0 - b1)
                torch._foreach_mul_(v, b2)
                torch._foreach_addcmul_(v, g, g, 1.0 - b2)
                m_new, v_new = m, v
            else:
                m_new = torch._foreach_lerp(m, g, 1.0 - b1)
                v_new = torch._foreach_mul(v, b2)
                torch._foreach_addcmul_(v_new, g, g, 1.0 - b2)
            host = _host_scalars(g, lr_t, weight_decay)
            if host:
                # CPU tensors: the scalars can be Python floats (reading a CPU 0-d tensor is no device
                # sync), which lets the decay fold into a fused kernel: Δ = −λα·θ + addcdiv(m, denom).
                # 4 passes over the leaves instead of 7 (sqrt, +ε, decay·θ, addcdiv).
                denom = torch._foreach_sqrt(v_new)
                torch._foreach_add_(denom, float(eps * bias2_sqrt))
                scale = float(-step_size * bias2_sqrt)
                flags = _decay_mask(mask, params, len(g)) if use_decay else [False] * len(g)
                if all(flags):
                    upd = torch._foreach_mul(tree_leaves(params), float(-lr_t * weight_decay))
                    torch._foreach_addcdiv_(upd, m_new, denom, scale)
                else:
                    upd = torch._foreach_div(m_new, denom)
                    torch._foreach_mul_(upd, scale)
                    idx = [i for i, f in enumerate(flags) if f]
                    if idx:
                        p = tree_leaves(params)
                        torch._foreach_add_([upd[i] for i in idx], [p[i] for i in idx], alpha=float(-lr_t * weight_decay))
                del denom
            else:
                # Δ = −(α√(1−β2ᵗ)/(1−β1ᵗ)) · m / (√v + ε√(1−β2ᵗ)), in one buffer: denom, denom/m, m/denom, ×scale.
                upd = torch._foreach_sqrt(v_new)
                torch._foreach_add_(upd, (eps * bias2_sqrt).to(dtype))
                torch._foreach_div_(upd, m_new)
                torch._foreach_reciprocal_(upd)
                torch._foreach_mul_(upd, (-step_size * bias2_sqrt).to(dtype))
        else:
            host = False
            m_new = [mi.lerp(gi, 1.0 - b1) for mi, gi in zip(m, g)]
            v_new = [vi * b2 + gi * gi * (1.0 - b2) for vi, gi in zip(v, g)]
            upd = [mi / (vi.sqrt() / bias2_sqrt.to(dtype) + eps) * (-step_size).to(dtype) for mi, vi in zip(m_new, v_new)]
        if use_decay and not host:
            p = tree_leaves(params)
            flags = _decay_mask(mask, params, len(p))
            decay = (-lr_t * weight_decay).to(dtype)
            idx = [i for i, f in enumerate(flags) if f]
            if _use_foreach(p) and isinstance(upd, list) and idx:
                torch._foreach_add_([upd[i] for i in idx], torch._foreach_mul([p[i] for i in idx], decay))
            else:
                upd = [u + pi * decay if f else u for u, pi, f in zip(upd, p, flags)]
        m_tree = optree.tree_unflatten(tree_structure(state.m), m_new)
        v_tree = optree.tree_unflatten(tree_structure(state.v), v_new)
        return optree.tree_unflatten(spec, upd), AdamWState(step=step, m=m_tree, v=v_tree)

    return GradientTransformation(init, update, schedule)


def step_count(state: Any) -> torch.Tensor | None:
    """Return the update count (0-d int64 tensor) held in an optimiser state, or ``None``.

    Looks through ``chain`` tuples for the first :class:`AdamWState`/:class:`SGDState`.
    """
    if isinstance(state, (AdamWState, SGDState)):
        return state.step
    if isinstance(state, (tuple, list)):
        for s in state:
            found = step_count(s)
            if found is not None:
                return found
    return None


def learning_rate_at(tx: GradientTransformation, state: Any) -> torch.Tensor | None:
    """The learning rate ``tx`` uses for its next update from ``state`` (float64 0-d tensor).

    Returns ``None`` when ``tx`` has no schedule or ``state`` holds no step count.
    """
    step = step_count(state)
    if tx.learning_rate is None or step is None:
        return None
    return tx.learning_rate(step)
