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

For speed the transformations run on flattened leaves with torch's foreach kernels (falling
back to per-leaf ops inside ``vmap``, which has no batching rule for them, and under
``torch.compile``); :func:`adamw` runs its whole chain as one fused kernel on eager tensors.
Semantics stay pure: the caller's params, grads and state are never written unless
``inplace=True`` is asked for, which donates the old state's buffers (as JAX's buffer donation
does) to reach ``torch.optim`` speed.

Source: CS336 assignment 1 handout §4.2–4.5; Loshchilov & Hutter (2019), Algorithm 2; the optax
design (Babuschkin et al., 2020: optimisers as chains of gradient transformations).
"""

from typing import Any

from flm.optim.base import EmptyState, GradientTransformation, Schedule, apply_updates, chain, identity
from flm.optim.clip import ClipState, clip_by_global_norm, global_norm, recorded_grad_norm
from flm.optim.optimizers import adamw, sgd
from flm.optim.schedules import constant_schedule, cosine_schedule
from flm.optim.transforms import (
    ScaleByAdamState,
    ScaleByLearningRateState,
    TraceState,
    add_decayed_weights,
    learning_rate_at,
    scale_by_adam,
    scale_by_learning_rate,
    step_count,
    trace,
)

__all__ = [
    "ClipState",
    "recorded_grad_norm",
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


def __getattr__(name: str) -> Any:
    """Deprecated names, each with a ``DeprecationWarning``: ``AdamWState`` (use ``ScaleByAdamState``)."""
    if name == "AdamWState":
        from flm.optim import transforms

        return transforms.__getattr__(name, stacklevel=3)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
