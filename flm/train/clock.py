"""The clock of a training run: wall time (resumes included), the time budget, throughput and ETA.

One :class:`Clock` serves :func:`flm.train.train_loop` and the vmapped sweep
(:func:`flm.experiments.vmapped.vmapped_train`): it counts the tokens trained since the last logged
step, keeps work that is not training (evaluation, checkpoints, the compiling first step) out of
tokens/s, and keeps the longest such pause in reserve so a time budget still leaves room for the
final evaluation and checkpoint.

Source: CS336 assignment 1 handout §7.1 (experiment_log: loss against wall-clock time).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from flm.train.metrics import Throughput

__all__ = ["Clock"]


class Clock:
    """Wall time, time budget, tokens/s, MFU and ETA of one run.

    Args:
        throughput: the tokens/s and MFU meter (:class:`flm.train.metrics.Throughput`).
        tokens_per_step: tokens trained per step (all models of a vmapped sweep together).
        max_iters: the run's last step (for the ETA).
        start_step: the step the run starts or resumes at.
        offset: seconds already spent before a resume (the checkpoint's ``wall_time``).
        budget_minutes: stop once this much wall time (with the reserve) is spent; ``None`` or 0:
            no budget.

    Raises:
        ValueError: a negative ``tokens_per_step``, ``start_step`` or ``offset``.

    Source: handout §7.1 (experiment_log: wall-clock time); the time budget of §7.2.
    """

    def __init__(
        self,
        throughput: Throughput,
        *,
        tokens_per_step: int,
        max_iters: int,
        start_step: int = 0,
        offset: float = 0.0,
        budget_minutes: float | None = None,
    ) -> None:
        if tokens_per_step < 0 or start_step < 0 or offset < 0:
            raise ValueError(
                f"Clock: tokens_per_step={tokens_per_step}, start_step={start_step} and offset={offset} "
                "must not be negative"
            )
        self.t0 = time.perf_counter() - offset
        self.budget = budget_minutes * 60 if budget_minutes else None
        self.reserve = 0.0
        self.throughput = throughput
        self.tokens_per_step, self.max_iters = tokens_per_step, max_iters
        self.interval_start = start_step  # the throughput interval's first step

    def elapsed(self) -> float:
        """Seconds since the run started (resumes included)."""
        return time.perf_counter() - self.t0

    def over_budget(self) -> bool:
        """Whether the time budget, less the reserve for the final evaluation and checkpoint, is spent."""
        return self.budget is not None and self.elapsed() + self.reserve >= self.budget

    @contextlib.contextmanager
    def aside(self) -> Iterator[None]:
        """Time work that is not training (an evaluation, a checkpoint): left out of tokens/s, and the
        longest such pause (× 1.5) is kept in reserve for the time budget.

        Yields:
            Nothing.
        """
        t = time.perf_counter()
        yield
        seconds = time.perf_counter() - t
        self.throughput.exclude(seconds)
        self.reserve = max(self.reserve, 1.5 * seconds)

    def skip(self, seconds: float, step: int) -> None:
        """Leave ``seconds`` and the steps up to ``step`` out of tokens/s and the ETA (the compiling
        first step), without keeping them in the budget's reserve."""
        self.throughput.exclude(seconds)
        self.interval_start = step

    def tick(self, step: int) -> float:
        """Close the throughput interval at ``step`` (a logged step).

        Returns:
            The smoothed tokens/s.
        """
        rate = self.throughput.update((step - self.interval_start) * self.tokens_per_step)
        self.interval_start = step
        return rate

    def eta(self, step: int, rate: float | None = None) -> float | None:
        """Seconds left to ``max_iters`` at ``rate`` tokens/s (default: the smoothed rate); ``None``
        while no rate is known."""
        rate = self.throughput.rate if rate is None else rate
        return (self.max_iters - step) * self.tokens_per_step / rate if rate else None
