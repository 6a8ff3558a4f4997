"""Training: the ``torch.func`` train step and evaluation on held-out tokens.

``make_train_step`` differentiates ``cross_entropy(transformer_lm(params, x), y)`` with
``torch.func.grad_and_value`` and applies a :class:`flm.optim.GradientTransformation`; the whole
step is a pure function ``(params, opt_state, inputs, targets) -> (params, opt_state, metrics)``
that never reads values back to the host, so ``torch.compile`` turns it into one graph.

Source: CS336 assignment 1 handout §4–§5 (training loop), design notes in ``shared/design.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from flm import optim
from flm.loss import cross_entropy, token_cross_entropy
from flm.model import TransformerConfig, transformer_lm
from flm.tree import tree_leaves

__all__ = ["make_loss_fn", "make_train_step", "evaluate"]

PyTree = Any
TrainStep = Callable[[PyTree, Any, torch.Tensor, torch.Tensor], tuple[PyTree, Any, dict[str, torch.Tensor]]]


def make_loss_fn(config: TransformerConfig) -> Callable[[PyTree, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Return ``loss(params, inputs, targets) -> mean cross-entropy`` for ``config``'s LM.

    Args:
        config: the model's hyperparameters.

    Returns:
        A pure function of ``params``, ``inputs (..., seq_len)`` and ``targets (..., seq_len)``
        returning a 0-d float32 loss in nats/token. Token ids are not value-checked (check
        them where data enters, e.g. ``flm.data.get_batch(..., vocab_size=...)``).

    Source: handout §4.1, eq. (16).
    """

    def loss_fn(params: PyTree, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return cross_entropy(transformer_lm(params, inputs, config, check_ids=False), targets)

    return loss_fn


def make_train_step(
    config: TransformerConfig,
    tx: optim.GradientTransformation,
    *,
    compile: bool = False,
    donate: bool = False,
    compile_kwargs: dict[str, Any] | None = None,
) -> TrainStep:
    """Build ``step(params, opt_state, inputs, targets) -> (params, opt_state, metrics)``.

    One step: ``(grads, loss) = grad_and_value(loss_fn)(params, inputs, targets)``; the global
    gradient norm (before any clipping in ``tx``); ``updates, opt_state = tx.update(grads,
    opt_state, params)``; ``params = apply_updates(params, updates)``.

    Args:
        config: the model's hyperparameters.
        tx: the optimiser, e.g. ``chain(clip_by_global_norm(1.0), adamw(cosine_schedule(...)))``.
        compile: wrap the whole step in ``torch.compile(fullgraph=True)`` (one graph: forward,
            backward, clipping and the optimiser; compile the outermost function, never
            ``grad(compile(f))``). The first call compiles; a new input shape recompiles.
        donate: update the incoming params in place (their buffers are donated: the caller must
            not use the old ``params`` again). Off by default, so the step is pure.
        compile_kwargs: extra ``torch.compile`` arguments (e.g. ``{"backend": "aot_eager"}`` on
            MPS, or ``{"mode": "max-autotune"}`` on CUDA).

    Returns:
        ``step``. ``inputs``/``targets`` are ``(batch, seq_len)`` int64; ``metrics`` holds 0-d
        tensors ``loss`` (float32, nats/token), ``grad_norm`` (before clipping) and, when ``tx``
        has a schedule, ``lr`` (the learning rate this step used). Nothing is synced to the host.

    Source: handout §4–§5; ``torch.func.grad_and_value``.
    """
    loss_and_grad = torch.func.grad_and_value(make_loss_fn(config))

    def step(
        params: PyTree, opt_state: Any, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[PyTree, Any, dict[str, torch.Tensor]]:
        lr = optim.learning_rate_at(tx, opt_state)
        grads, loss = loss_and_grad(params, inputs, targets)
        metrics = {"loss": loss.detach(), "grad_norm": optim.global_norm(grads)}
        if lr is not None:
            metrics["lr"] = lr
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optim.apply_updates(params, updates, inplace=donate)
        return params, opt_state, metrics

    if compile:
        return torch.compile(step, **{"fullgraph": True, **(compile_kwargs or {})})
    return step


def _as_tensor_1d(tokens: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    if tokens.ndim != 1:
        raise ValueError(f"evaluate: tokens must be a 1-D array, got shape {tuple(tokens.shape)}")
    return tokens


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
) -> dict[str, float]:
    """Mean per-token loss and perplexity of the model on a token sequence.

    The tokens are cut into consecutive, non-overlapping windows of ``context_length + 1``
    tokens (inputs and shifted targets; windows share their boundary token), so every token
    after the first is predicted exactly once, with ``context_length`` tokens of context at most.
    With ``num_batches=None`` all windows are evaluated, in order; otherwise ``num_batches ·
    batch_size`` windows evenly spaced over the sequence (a cheaper estimate).

    Args:
        params: the parameter tree.
        config: the model's hyperparameters.
        tokens: ``(num_tokens,)`` integer ids (e.g. an ``np.memmap`` from ``flm.data.load_tokens``).
        batch_size: windows per forward pass.
        context_length: tokens per window (≤ ``config.context_length``).
        num_batches: evaluate only this many batches (``None``: everything).
        device: where to run (default: the parameters' device).

    Returns:
        ``{"loss": nats/token, "perplexity": exp(loss), "tokens": number of predicted tokens}``.

    Raises:
        ValueError: for fewer than ``context_length + 1`` tokens or bad sizes.

    Source: handout §4.1 eqs. (16), (18); §5.3.
    """
    tokens = _as_tensor_1d(tokens)
    n = int(tokens.shape[0])
    if batch_size <= 0 or context_length <= 0:
        raise ValueError(f"evaluate: batch_size and context_length must be positive, got {batch_size}, {context_length}")
    if context_length > config.context_length:
        raise ValueError(f"evaluate: context_length={context_length} exceeds the model's {config.context_length}")
    num_windows = (n - 1) // context_length
    if num_windows == 0:
        raise ValueError(f"evaluate: need at least context_length + 1 = {context_length + 1} tokens, got {n}")
    starts = np.arange(num_windows, dtype=np.int64) * context_length
    if num_batches is not None:
        wanted = min(num_windows, num_batches * batch_size)
        starts = starts[np.linspace(0, num_windows - 1, wanted).round().astype(np.int64)]
    if device is None:
        device = tree_leaves(params)[0].device
    offsets = np.arange(context_length + 1, dtype=np.int64)
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for i in range(0, len(starts), batch_size):
        idx = starts[i : i + batch_size, None] + offsets
        window = tokens[idx] if isinstance(tokens, torch.Tensor) else torch.from_numpy(np.asarray(tokens[idx]).astype(np.int64))
        window = window.to(device=device, dtype=torch.int64)
        logits = transformer_lm(params, window[:, :-1], config)
        total += token_cross_entropy(logits, window[:, 1:]).double().sum()
        count += window.shape[0] * context_length
    loss = float(total) / count
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf, "tokens": count}
