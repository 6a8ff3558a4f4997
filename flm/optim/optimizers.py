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


def _adamw_leaf_new(
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    p: torch.Tensor | None,
    coefs: torch.Tensor,
    decay: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One leaf of :func:`_adamw_kernel`'s update, written to be compiled as one fused pass:
    ``(u, m', v')`` with ``m' = m + (1 − β1)(g − m)``, ``v' = β2 v + (1 − β2) g²`` and
    ``u = s·m'/(√v' + ε_t) + d·θ`` (no θ term when ``decay`` is ``None``), the moments in new
    tensors. ``coefs`` holds ``(1 − β1, β2, 1 − β2, ε_t, s)`` and ``decay`` ``d``: tensors, not
    Python floats (with ``dynamic=True`` torch 2.13's CPU inductor turned float arguments into
    symbols and computed a wrong ``v'`` from ``addcmul(v·β2, g, g, value=1 − β2)``)."""
    c = coefs.to(g.dtype)
    m_new = m.lerp(g, c[0])
    v_new = v * c[1] + g * g * c[2]
    return _adamw_leaf_direction(m_new, v_new, c, p, decay), m_new, v_new


def _adamw_leaf_inplace(
    g: torch.Tensor,
    m: torch.Tensor,
    v: torch.Tensor,
    p: torch.Tensor | None,
    coefs: torch.Tensor,
    decay: torch.Tensor | None,
) -> torch.Tensor:
    """:func:`_adamw_leaf_new` with the moments written into ``m`` and ``v``, returning ``u`` (a
    function of its own, so each keeps its own few compiled graphs: with and without decay)."""
    c = coefs.to(g.dtype)
    m.lerp_(g, c[0])
    v.mul_(c[1]).add_(g * g * c[2])
    return _adamw_leaf_direction(m, v, c, p, decay)


def _adamw_leaf_direction(
    m: torch.Tensor, v: torch.Tensor, c: torch.Tensor, p: torch.Tensor | None, decay: torch.Tensor | None
) -> torch.Tensor:
    """``u = s·m/(√v + ε_t) + d·θ`` from the updated moments (``c`` as in :func:`_adamw_leaf_new`)."""
    u = m / (v.sqrt() + c[3]) * c[4]
    return u if decay is None else u + p * decay.to(p.dtype)


# Leaves smaller than this (elements) take the foreach kernel in adamw(kernel="compiled"); measured
# on a 2-core CPU: 64-wide toy model 17.7 ms foreach vs 21.3 ms all-compiled (leaves of 4K-16K
# elements), handout model 314 vs 293 ms (262K-5M elements).
_COMPILED_MIN_NUMEL = 1 << 16


def _compiled_adamw_kernel(inplace: bool) -> Callable[..., tuple[list, list, list]]:
    """:func:`_adamw_kernel`'s signature, running one ``torch.compile`` (dynamic sizes) of the
    per-leaf update on each leaf's flattened storage: one graph for every leaf whatever its shape
    (per dtype, with and without decay), so the compiled update does not grow with depth. Small
    leaves take :func:`_adamw_kernel` together."""
    leaf = torch.compile(_adamw_leaf_inplace if inplace else _adamw_leaf_new, dynamic=True)

    def flat(t: torch.Tensor) -> torch.Tensor:
        # A 1-D alias of a contiguous leaf's storage, not a view (no ``_base`` for the compiled
        # function to guard on, whose shape would specialise the graph per leaf shape).
        return t.view(-1).detach()

    def kernel(g, m, v, p, flags, *, b1, b2, eps, step, lr_t, weight_decay, inplace):
        upd, m_new, v_new = [None] * len(g), list(m), list(v)
        # Leaves below _COMPILED_MIN_NUMEL go through the foreach kernel together: for them a call
        # of the compiled function (~30 µs on a CPU) costs more than the passes it saves. So do
        # half-precision leaves, whose foreach kernels compute in float32 (the leaf function would
        # round β2 = 0.999 to 1 in bf16).
        small = [
            i
            for i, gi in enumerate(g)
            if gi.numel() < _COMPILED_MIN_NUMEL or gi.dtype not in (torch.float32, torch.float64)
        ]
        if small:
            outs = _adamw_kernel(
                [g[i] for i in small],
                [m[i] for i in small],
                [v[i] for i in small],
                [p[i] for i in small] if p else [],
                [flags[i] for i in small] if p else [],
                b1=b1,
                b2=b2,
                eps=eps,
                step=step,
                lr_t=lr_t,
                weight_decay=weight_decay,
                inplace=inplace,
            )
            for i, ui, mi, vi in zip(small, *outs):
                upd[i], m_new[i], v_new[i] = ui, mi, vi
        eps_t, k = _kernels.adam_coefficients(step, b1, b2, eps)
        scale, decay = -lr_t * k, -lr_t * weight_decay
        coefs = torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in (1.0 - b1, b2, 1.0 - b2, eps_t, scale)])
        for i, (gi, mi, vi) in enumerate(zip(g, m, v)):
            if upd[i] is not None:
                continue
            decayed = bool(p) and flags[i]
            pi = flat(p[i]) if decayed else None
            out = leaf(flat(gi), flat(mi), flat(vi), pi, coefs, decay if decayed else None)
            if inplace:
                upd[i] = out.view(gi.shape)
            else:
                upd[i], m_new[i], v_new[i] = (t.view(gi.shape) for t in out)
        return upd, m_new, v_new

    return kernel


def adamw(
    lr: float | torch.Tensor | Schedule,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float | torch.Tensor = 0.01,
    mask: PyTree | Callable[[PyTree], PyTree] | None = None,
    *,
    inplace: bool = False,
    kernel: str = "foreach",
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
        kernel: what runs the update on eager leaves. ``"foreach"``: the foreach kernels (7
            passes over each leaf's memory on the CPU). ``"compiled"``: one ``torch.compile`` of
            the per-leaf update (dynamic sizes, so one graph serves every leaf, whatever the
            depth), called leaf by leaf: one fused pass reading ``g, m, v, θ`` per float32 or
            float64 leaf of ≥ 2¹⁶ elements (smaller and half-precision leaves take the foreach
            kernel together). The first
            update compiles (seconds); the results equal the foreach kernel's up to rounding.
            What ``make_train_step(compile="blocks")``'s optimiser uses (the whole-step compile
            fuses the update itself). Inside ``torch.func`` transforms and under an outer
            ``torch.compile`` both run the chain's own ``update``.

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
    if kernel not in ("foreach", "compiled"):
        raise ValueError(f"adamw: kernel must be 'foreach' or 'compiled', got {kernel!r}")
    compiled_kernel = _compiled_adamw_kernel(inplace) if kernel == "compiled" else None
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
        contiguous = all(t.is_contiguous() for t in g + m + v + p)  # the compiled kernel takes flat views
        upd, m_new, v_new = (compiled_kernel if compiled_kernel and contiguous else _adamw_kernel)(
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
