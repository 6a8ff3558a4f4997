"""Evaluation: mean per-token loss and perplexity of a model on held-out tokens.

Source: CS336 assignment 1 handout §4.1 eqs. (16), (18); §5.3.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from flm.loss import perplexity, token_cross_entropy
from flm.model import TransformerConfig, transformer_lm
from flm.progress import progress_bar
from flm.tree import all_finite, tree_leaves

__all__ = ["evaluate", "Evaluator"]

PyTree = Any


@torch.no_grad()
def evaluate(
    params: PyTree,
    config: TransformerConfig,
    tokens: np.ndarray | torch.Tensor,
    batch_size: int,
    context_length: int,
    num_batches: int | None = None,
    *,
    device: torch.device | str | None = None,
    progress: bool = False,
    logits_fn: Callable[[PyTree, torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, float]:
    """Mean per-token loss and perplexity of the model on a token sequence.

    The tokens are cut into consecutive, non-overlapping windows of ``context_length + 1``
    tokens (inputs and shifted targets; windows share their boundary token). When ``n − 1`` is
    not a multiple of ``context_length``, the ``r`` tokens left over are predicted by one more
    window, the sequence's last ``context_length + 1`` tokens, of which only the last ``r``
    predictions count (the others were counted already): the same shape as every other window,
    so a compiled model would not recompile for it. Every token after the first is predicted
    exactly once, with ``context_length`` tokens of context at most.
    With ``num_batches=None`` every token is evaluated, in order; otherwise ``num_batches ·
    batch_size`` whole windows evenly spaced over the sequence (a cheaper estimate; everything
    when that covers all the windows).

    Args:
        params: the parameter tree.
        config: the model's hyperparameters.
        tokens: ``(num_tokens,)`` integer ids (e.g. an ``np.memmap`` from ``flm.data.load_tokens``).
        batch_size: windows per forward pass.
        context_length: tokens per window (≤ ``config.context_length``).
        num_batches: evaluate only this many batches (``None``: everything).
        device: where to run (default: the parameters' device).
        progress: show a progress bar over the batches (stderr).
        logits_fn: ``(params, inputs) -> logits`` (default :func:`flm.model.transformer_lm` with
            ``config``); sharded training passes its gathering forward, which every rank runs.

    Returns:
        ``{"loss": nats/token, "perplexity": exp(loss), "tokens": number of predicted tokens}``
        (``n − 1`` when everything is evaluated).

    Raises:
        ValueError: for fewer than ``context_length + 1`` tokens or bad sizes.

    Source: handout §4.1 eqs. (16), (18); §5.3.
    """
    if tokens.ndim != 1:
        raise ValueError(f"evaluate: tokens must be a 1-D array, got shape {tuple(tokens.shape)}")
    n = int(tokens.shape[0])
    if batch_size <= 0 or context_length <= 0:
        raise ValueError(
            f"evaluate: batch_size and context_length must be positive, got {batch_size}, {context_length}"
        )
    if context_length > config.context_length:
        raise ValueError(f"evaluate: context_length={context_length} exceeds the model's {config.context_length}")
    if num_batches is not None and num_batches <= 0:  # 0 would evaluate nothing and divide by zero
        raise ValueError(f"evaluate: num_batches must be positive or None, got {num_batches}")
    num_windows = (n - 1) // context_length
    if num_windows == 0:
        raise ValueError(f"evaluate: need at least context_length + 1 = {context_length + 1} tokens, got {n}")
    starts = np.arange(num_windows, dtype=np.int64) * context_length
    # skip[i]: predictions of window i already counted by an earlier window (only the tail's).
    skip = np.zeros(num_windows, dtype=np.int64)
    if num_batches is not None and num_batches * batch_size < num_windows:
        picked = np.linspace(0, num_windows - 1, num_batches * batch_size).round().astype(np.int64)
        starts, skip = starts[picked], skip[picked]
    elif (rest := (n - 1) % context_length) > 0:  # the tail: the last window, its new predictions only
        starts = np.append(starts, n - 1 - context_length)
        skip = np.append(skip, context_length - rest)
    if device is None:
        device = tree_leaves(params)[0].device
    offsets = np.arange(context_length + 1, dtype=np.int64)
    positions = torch.arange(context_length, device=device)
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    bar = progress_bar(len(starts), "evaluate", unit="seq", enabled=progress)
    for i in range(0, len(starts), batch_size):
        idx = starts[i : i + batch_size, None] + offsets
        window = (
            tokens[idx]
            if isinstance(tokens, torch.Tensor)
            else torch.from_numpy(np.asarray(tokens[idx]).astype(np.int64))
        )
        window = window.to(device=device, dtype=torch.int64)
        inputs = window[:, :-1]
        logits = transformer_lm(params, inputs, config) if logits_fn is None else logits_fn(params, inputs)
        losses = token_cross_entropy(logits, window[:, 1:]).double()
        first = skip[i : i + batch_size]
        if first.any():  # a masked sum (not a slice): every window keeps its shape
            keep = positions >= torch.from_numpy(first).to(device)[:, None]
            losses = torch.where(keep, losses, torch.zeros((), dtype=losses.dtype, device=device))
        total += losses.sum()
        count += int(window.shape[0] * context_length - first.sum())
        bar.update(window.shape[0])
    bar.close()
    loss = float(total) / count
    return {"loss": loss, "perplexity": float(perplexity(loss, dtype=torch.float64)), "tokens": count}


class Evaluator:
    """The validation side of a run: its tokens, how much to evaluate, and when.

    Checks up front that the validation tokens hold at least one window, so a too-short
    validation text fails before training, not after it.

    Args:
        tokens: ``(num_tokens,)`` validation ids.
        config: the model's hyperparameters.
        batch_size: windows per forward pass.
        num_batches: batches per periodic evaluation (``None``: all windows).
        interval: evaluate every this many steps (0: only at the end).
        logits_fn: the forward (see :func:`evaluate`).

    Raises:
        ValueError: fewer than ``context_length + 1`` tokens, or ``num_batches`` < 1.
    """

    def __init__(
        self,
        tokens: np.ndarray | torch.Tensor,
        config: TransformerConfig,
        batch_size: int,
        num_batches: int | None,
        interval: int,
        *,
        logits_fn: Callable[[PyTree, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        need = config.context_length + 1
        if tokens.ndim != 1 or int(tokens.shape[0]) < need:
            raise ValueError(
                f"the validation data has {int(tokens.shape[0]) if tokens.ndim == 1 else tokens.shape} tokens; "
                f"evaluation needs at least context_length + 1 = {need}"
            )
        if num_batches is not None and num_batches < 1:
            raise ValueError(f"eval_batches must be ≥ 1 or None (all), got {num_batches}")
        self.tokens, self.config, self.batch_size = tokens, config, batch_size
        self.num_batches, self.interval, self.logits_fn = num_batches, interval, logits_fn
        self.last: tuple[int, float] | None = None  # (step, loss) of the latest evaluation

    def due(self, step: int) -> bool:
        """Whether a periodic evaluation falls on ``step``."""
        return self.interval > 0 and step % self.interval == 0

    def __call__(self, params: PyTree, step: int, *, full: bool = False) -> dict[str, float]:
        """Evaluate ``params`` (``full``: every window, else ``num_batches``); returns
        ``{"loss", "perplexity", "tokens", "seconds"}``."""
        t0 = time.perf_counter()
        res = evaluate(
            params,
            self.config,
            self.tokens,
            self.batch_size,
            self.config.context_length,
            None if full else self.num_batches,
            logits_fn=self.logits_fn,
        )
        res["seconds"] = time.perf_counter() - t0
        self.last = (step, res["loss"])
        return res

    def each(self, models: Sequence[PyTree], step: int) -> list[float | None]:
        """Evaluate several models on the same windows (the K models of a vmapped sweep,
        ``flm.tree.unstack``-ed); a model with NaN/inf parameters (diverged) is not evaluated.

        Args:
            models: parameter trees of one config.
            step: the step evaluated at (``last`` then holds the last evaluated model's loss).

        Returns:
            Each model's loss (nats/token); ``None`` for a diverged model or a non-finite loss.

        Source: handout §7.2 (learning_rate: a sweep including a divergent run).
        """
        losses: list[float | None] = []
        for params in models:
            loss = self(params, step)["loss"] if all_finite(params) else math.nan
            losses.append(loss if math.isfinite(loss) else None)
        return losses
