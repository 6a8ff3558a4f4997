"""The small transformations optimisers are chained from: momentum (``trace``), Adam scaling,
decoupled weight decay and the learning rate; and reading a chain's step count and learning rate.

Source: CS336 assignment 1 handout §4.2–4.3; Kingma & Ba (2015); Loshchilov & Hutter (2019).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import optree
import torch

from flm._compat import foreach_add, foreach_add_, foreach_mul
from flm.optim import _kernels
from flm.optim.base import EmptyState, GradientTransformation, PyTree, Schedule, identity
from flm.optim.schedules import as_schedule
from flm.tree import tree_leaves, tree_map, tree_structure

__all__ = [
    "ScaleByAdamState",
    "ScaleByLearningRateState",
    "TraceState",
    "trace",
    "scale_by_adam",
    "add_decayed_weights",
    "scale_by_learning_rate",
    "step_count",
    "learning_rate_at",
]


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


def __getattr__(name: str, stacklevel: int = 2) -> Any:
    """``AdamWState``, deprecated: it is :class:`ScaleByAdamState`, only the moments part of
    :func:`adamw`'s state ``(ScaleByAdamState, EmptyState, ScaleByLearningRateState)``, so the name
    said more than it was. It still works (the same class, so ``isinstance`` and checkpoints are
    unchanged) and warns with a ``DeprecationWarning``: use ``ScaleByAdamState``.

    Args:
        name: the attribute Python did not find on the module.
        stacklevel: the frame the warning names (3 when ``flm.optim`` forwards the look-up).

    Returns:
        :class:`ScaleByAdamState` for ``"AdamWState"``.

    Raises:
        AttributeError: for any other name.
    """
    if name == "AdamWState":
        import warnings

        warnings.warn(
            "flm.optim.AdamWState is deprecated: it is ScaleByAdamState, only the first part of adamw's "
            "state (ScaleByAdamState, EmptyState, ScaleByLearningRateState); use ScaleByAdamState",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
        return ScaleByAdamState
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class ScaleByLearningRateState(NamedTuple):
    """State of :func:`scale_by_learning_rate`: ``step``, the 0-d int64 count of updates done,
    at which the learning-rate schedule is evaluated."""

    step: torch.Tensor


class TraceState(NamedTuple):
    """State of :func:`trace`: the momentum buffers (a tree like the params; ``()`` without momentum)."""

    trace: PyTree


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
        if _kernels.use_foreach(g + b):
            new = foreach_mul(b, mu)
            foreach_add_(new, g)
        else:
            new = [bi * mu + gi for bi, gi in zip(b, g)]
        return optree.tree_unflatten(spec, new), TraceState(optree.tree_unflatten(tree_structure(state.trace), new))

    return GradientTransformation(init, update)


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
            state have different numbers of leaves, or a gradient leaf's shape differs from its
            state leaf's (naming the leaf and both shapes).

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
        return ScaleByAdamState(
            step=_kernels.step_tensor(_kernels.first_device(params)), m=zeros, v=tree_map(torch.zeros_like, params)
        )

    def update(grads: PyTree, state: ScaleByAdamState, params: PyTree = None) -> tuple[PyTree, ScaleByAdamState]:
        g, spec = optree.tree_flatten(grads, namespace="")
        m, v = tree_leaves(state.m), tree_leaves(state.v)
        if not (len(g) == len(m) == len(v)):
            raise ValueError(f"scale_by_adam: {len(g)} gradient leaves but state has {len(m)} m / {len(v)} v leaves")
        _kernels.check_leaf_shapes("scale_by_adam", grads, g, m)
        step = state.step + 1
        if not g:
            return grads, state._replace(step=step)
        m_new, v_new = _kernels.adam_moments(m, v, g, b1, b2, inplace)
        d = _kernels.adam_direction(m_new, v_new, *_kernels.adam_coefficients(step, b1, b2, eps))
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
    lam = _kernels.hyper(weight_decay)
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
        idx = [i for i, f in enumerate(_kernels.decay_mask(mask, params, len(p))) if f]
        if not idx:
            return updates, state
        out, u_sel, p_sel = list(u), [u[i] for i in idx], [p[i] for i in idx]
        if _kernels.use_foreach(u_sel + p_sel) and _kernels.host_scalars(u_sel, lam):
            new = foreach_add(u_sel, p_sel, alpha=float(lam))
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
    schedule = as_schedule(learning_rate)

    def init(params: PyTree) -> ScaleByLearningRateState:
        return ScaleByLearningRateState(step=_kernels.step_tensor(_kernels.first_device(params)))

    def update(updates: PyTree, state: ScaleByLearningRateState, params: PyTree = None) -> tuple[PyTree, Any]:
        u, spec = optree.tree_flatten(updates, namespace="")
        scaled = _kernels.mul_scalar(u, -schedule(state.step).to(torch.float64)) if u else u
        return optree.tree_unflatten(spec, scaled), ScaleByLearningRateState(step=state.step + 1)

    return GradientTransformation(init, update, schedule)


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
