"""Learning-rate schedules as tensor functions of the 0-d step count (no host sync, no recompile).

Source: CS336 assignment 1 handout §4.4 (learning_rate_schedule).
"""

from __future__ import annotations

import math

import torch

from flm.optim._kernels import hyper
from flm.optim.base import Schedule

__all__ = ["constant_schedule", "cosine_schedule", "as_schedule"]


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
    a_max, a_min = hyper(max_learning_rate), hyper(min_learning_rate)
    t_w, t_c = int(warmup_iters), int(cosine_cycle_iters)

    def schedule(step: torch.Tensor | int) -> torch.Tensor:
        t = torch.as_tensor(step).to(torch.float64)
        zero = torch.zeros_like(t)
        warm = t / t_w * a_max if t_w > 0 else zero + a_max
        progress = (t - t_w) / (t_c - t_w) if t_c > t_w else zero
        cosine = a_min + 0.5 * (1.0 + torch.cos(progress * math.pi)) * (a_max - a_min)
        return torch.where(t < t_w, warm, torch.where(t <= t_c, cosine, zero + a_min))

    return schedule


def as_schedule(lr: float | torch.Tensor | Schedule) -> Schedule:
    """A learning rate as a schedule ``step -> lr``.

    Args:
        lr: a schedule (returned as it is), a float ≥ 0 (:func:`constant_schedule`), or a tensor
            (one learning rate per model in a vmapped sweep; returned as float64 at every step).

    Returns:
        The schedule.

    Raises:
        ValueError: ``lr`` is a negative number or neither a number, a tensor nor a callable.
    """
    if callable(lr):
        return lr
    if isinstance(lr, torch.Tensor):  # e.g. one learning rate per model in a vmapped sweep
        return lambda step: torch.zeros((), dtype=torch.float64, device=lr.device) + lr.to(torch.float64)
    if not isinstance(lr, (int, float)) or lr < 0:
        raise ValueError(f"learning rate must be a non-negative float or a schedule, got {lr!r}")
    return constant_schedule(float(lr))
