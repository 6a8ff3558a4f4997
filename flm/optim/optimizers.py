"""Named optimisers as short chains: ``sgd`` and ``adamw`` (with its fused foreach kernel).

Source: CS336 assignment 1 handout §4.2 (SGD), §4.3 Algorithm 1 (AdamW); Loshchilov & Hutter
(2019), Algorithm 2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optree
import torch

from flm._compat import foreach_add_, foreach_sqrt
from flm.optim import _kernels
from flm.optim.base import GradientTransformation, PyTree, Schedule, chain
from flm.optim.transforms import (
    ScaleByAdamState,
    ScaleByLearningRateState,
    add_decayed_weights,
    scale_by_adam,
    scale_by_learning_rate,
    trace,
)
from flm.tree import tree_leaves, tree_structure

__all__ = ["sgd", "adamw"]


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
    g: list,
    m: list,
    v: list,
    p: list,
    flags: list[bool],
    *,
    b1: float,
    b2: float,
    eps: float,
    step: torch.Tensor,
    lr_t: torch.Tensor,
    weight_decay: float | torch.Tensor,
    inplace: bool,
) -> tuple[list, list, list]:
    """AdamW's chain on eager leaf lists: ``(updates, m, v)`` with ``u = −α·k·m/(√v + ε_t) − αλθ``
    (θ on the flagged leaves only), what ``chain(scale_by_adam, add_decayed_weights,
    scale_by_learning_rate)`` computes, up to rounding (a few ulps per step).

    On the CPU, with ``s = −αk``: the moments (3 passes), ``√v`` into a new buffer, ``(√v + ε_t)/s``
    as one ``add`` with a 0-d shift, ``m / that`` into the same buffer and ``+= −αλθ``: 7 passes
    and one new tensor per leaf (``torch.optim.AdamW(foreach=True)`` makes 8 passes and one).
    Elsewhere, or when ``1/s`` would not be representable, the direction is scaled separately.
    """
    m_new, v_new = _kernels.adam_moments(m, v, g, b1, b2, inplace)
    eps_t, k = _kernels.adam_coefficients(step, b1, b2, eps)
    scale = -lr_t * k
    foldable = {x.dtype for x in m_new} <= {torch.float32, torch.float64, torch.bfloat16}
    if _kernels.host_scalars(m_new, eps_t, scale) and foldable and abs(float(scale)) > 1e-30:
        upd = foreach_sqrt(v_new)
        shift, inv = eps_t / scale, float(1.0 / scale)
        for mi, ui in zip(m_new, upd):
            torch.add(shift, ui, alpha=inv, out=ui)
            torch.div(mi, ui, out=ui)
    else:
        upd = _kernels.adam_direction(m_new, v_new, eps_t, k, out_scale=-lr_t)
    idx = [i for i, f in enumerate(flags) if f]
    if idx:
        u_sel, p_sel = [upd[i] for i in idx], [p[i] for i in idx]
        decay = -lr_t * weight_decay
        if _kernels.host_scalars(u_sel, decay):
            foreach_add_(u_sel, p_sel, alpha=float(decay))
        else:  # −αλ in each leaf's own dtype (not the first leaf's), as the chain rounds it
            foreach_add_(u_sel, _kernels.mul_scalar(p_sel, decay))
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
        ValueError: for hyperparameters out of range, a malformed state, missing ``params``
            with weight decay, or a gradient leaf shaped unlike its parameter (naming the leaf,
            its shape and the parameter's; a shape check, so it also runs under compile and vmap).

    Source: handout §4.3, Algorithm 1; Loshchilov & Hutter (2019), Algorithm 2; optax ``adamw``.
    """
    if len(betas) != 2:
        raise ValueError(f"adamw: betas must be a pair (β1, β2), got {betas!r}")
    b1, b2 = (float(b) for b in betas)
    composed = chain(
        scale_by_adam(b1, b2, eps, inplace=inplace), add_decayed_weights(weight_decay, mask), scale_by_learning_rate(lr)
    )
    use_decay = isinstance(weight_decay, torch.Tensor) or weight_decay > 0

    def update(grads: PyTree, state: tuple[Any, ...], params: PyTree = None) -> tuple[PyTree, tuple[Any, ...]]:
        if not (
            isinstance(state, tuple)
            and len(state) == 3
            and isinstance(state[0], ScaleByAdamState)
            and isinstance(state[2], ScaleByLearningRateState)
        ):
            raise ValueError(
                "adamw: state must be (ScaleByAdamState, EmptyState, ScaleByLearningRateState), "
                f"got {type(state).__name__}"
            )
        adam_state, decay_state, lr_state = state
        g, spec = optree.tree_flatten(grads, namespace="")
        m, v = tree_leaves(adam_state.m), tree_leaves(adam_state.v)
        p: list[torch.Tensor] = []
        flags: list[bool] = []
        if use_decay and g:  # checked before any (donated) moment is written, on either path
            if params is None:
                raise ValueError("adamw: update needs params when weight_decay > 0")
            p = tree_leaves(params)
            flags = _kernels.decay_mask(mask, params, len(p))
        if len(g) == len(m) == len(v) and len(p) in (0, len(g)):  # before any (donated) moment is written
            _kernels.check_leaf_shapes("adamw", grads, g, m, p)
        if not (len(g) == len(m) == len(v) and len(p) in (0, len(g)) and _kernels.use_foreach(g + m + v + p)):
            return composed.update(grads, state, params)
        step = adam_state.step + 1
        upd, m_new, v_new = _adamw_kernel(
            g,
            m,
            v,
            p,
            flags,
            b1=b1,
            b2=b2,
            eps=float(eps),
            step=step,
            lr_t=composed.learning_rate(lr_state.step).to(torch.float64),
            weight_decay=_kernels.hyper(weight_decay),
            inplace=inplace,
        )
        m_tree = optree.tree_unflatten(tree_structure(adam_state.m), m_new)
        v_tree = optree.tree_unflatten(tree_structure(adam_state.v), v_new)
        new_state = (ScaleByAdamState(step, m_tree, v_tree), decay_state, ScaleByLearningRateState(lr_state.step + 1))
        return optree.tree_unflatten(spec, upd), new_state

    return GradientTransformation(composed.init, update, composed.learning_rate)
