"""Cross-entropy and perplexity, computed stably in float32.

Source: CS336 assignment 1 handout §4.1, eqs. (16)–(18).
"""

from __future__ import annotations

from typing import Any

import torch

from flm._compat import checks_enabled

__all__ = ["token_cross_entropy", "cross_entropy", "perplexity"]


class _CrossEntropy(torch.autograd.Function):
    """``logsumexp(o) − o[target]`` with a hand-written gradient ``softmax(o) − onehot(target)``.

    Autograd of the plain formula keeps and re-reads several ``(…, vocab_size)`` temporaries (the
    shifted logits, their exponentials, an expanded gradient, a zero-filled scatter target and a
    sum), which dominate a small model's step; here the forward keeps one (the exponentials) and
    the backward is one multiply and a scatter. ``generate_vmap_rule`` makes it work under
    ``torch.func.vmap``; ``torch.func.grad`` and ``torch.compile`` trace it like any function.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = x.amax(dim=-1, keepdim=True)  # the shift cancels: softmax and logsumexp are shift-invariant
        e = (x - m).exp()
        total = e.sum(dim=-1, keepdim=True)
        lse = (m + total.log()).squeeze(-1)
        return lse - x.gather(-1, targets.unsqueeze(-1)).squeeze(-1), e, total

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: tuple[torch.Tensor, ...]) -> None:
        _, targets = inputs
        _, e, total = output
        ctx.mark_non_differentiable(e, total)
        ctx.save_for_backward(e, total, targets)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor, _grad_e: Any, _grad_total: Any) -> tuple[torch.Tensor, None]:
        e, total, targets = ctx.saved_tensors
        grad_x = e * (grad.unsqueeze(-1) / total)  # softmax(o) · dL/dloss
        grad_x.scatter_add_(
            -1, targets.unsqueeze(-1), -grad.unsqueeze(-1)
        )  # − onehot(target) · dL/dloss (in place: ours)
        return grad_x, None


def _check_targets(logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the first target outside ``[0, vocab_size)`` (reads values: a host sync)."""
    vocab_size = logits.shape[-1]
    bad = (targets < 0) | (targets >= vocab_size)
    if bool(bad.any()):
        first = int(targets[bad].flatten()[0])
        raise ValueError(
            f"cross_entropy: targets holds the class id {first}, outside the valid range [0, {vocab_size}) "
            f"(logits have {vocab_size} classes in their last dimension)"
        )


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """Per-position cross-entropy ``logsumexp(o) − o[target]``, without averaging.

    The maximum is subtracted before exponentiating and ``log``/``exp`` cancel, so logits of any
    magnitude (e.g. ±1e4) give finite losses. The gradient ``softmax(o) − onehot(target)`` is
    written by hand (one multiply and a scatter, reusing the forward's exponentials) and tested
    equal to autograd of the formula and to ``torch.nn.functional.cross_entropy``.

    Args:
        logits: ``(..., vocab_size)`` unnormalised scores, any float dtype, ``vocab_size ≥ 1``.
        targets: ``(...)`` integer class ids in ``[0, vocab_size)`` (same leading shape).
        check: check that every target lies in ``[0, vocab_size)``. The check reads the targets
            back to the host (a sync), so it is eager-only: it is skipped under ``torch.compile``
            and inside ``torch.func`` transforms (``vmap``, ``grad``), and the train step passes
            ``False``. Shape and dtype checks always run.

    Returns:
        ``(...)`` float32 losses in nats (float64 for float64 logits).

    Raises:
        ValueError: if the leading shapes differ, ``logits`` has no classes, ``targets`` is not an
            integer tensor, or (when checked) a target is outside ``[0, vocab_size)``.
        TypeError: if ``logits`` is not a floating-point tensor.

    Source: handout §4.1, eq. (17) and the cross_entropy problem.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"cross_entropy: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree on the leading dims"
        )
    if not logits.is_floating_point():
        raise TypeError(f"cross_entropy: logits must be a floating-point tensor, got {logits.dtype}")
    if logits.shape[-1] == 0:
        raise ValueError(f"cross_entropy: logits {tuple(logits.shape)} have no classes in their last dimension")
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"cross_entropy: targets must be integer class ids, got {targets.dtype}")
    if check and targets.numel() and checks_enabled(logits, targets):
        _check_targets(logits, targets)
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays float64
    return _CrossEntropy.apply(x, targets.long())[0]


def _token_cross_entropy_autograd(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The same loss left to autograd (the reference :func:`token_cross_entropy`'s gradient is tested against)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    m = x.amax(dim=-1, keepdim=True).detach()
    lse = m.squeeze(-1) + (x - m).exp().sum(dim=-1).log()
    return lse - x.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, *, check: bool = True) -> torch.Tensor:
    """Mean cross-entropy over all leading (batch-like) dimensions.

    Args:
        logits: ``(..., vocab_size)``.
        targets: ``(...)`` integer ids, at least one.
        check: check the target values (eager-only; see :func:`token_cross_entropy`).

    Returns:
        0-d float32 tensor (float64 for float64 logits): the mean loss in nats per token.

    Raises:
        ValueError: as :func:`token_cross_entropy`, or empty ``targets`` (no mean to take).
        TypeError: as :func:`token_cross_entropy`.

    Source: handout §4.1, eq. (16).
    """
    if targets.numel() == 0:
        raise ValueError(
            f"cross_entropy: targets {tuple(targets.shape)} is empty; the mean over no tokens is undefined"
        )
    return token_cross_entropy(logits, targets, check=check).mean()


def perplexity(losses_or_mean: torch.Tensor | float) -> torch.Tensor:
    """Perplexity ``exp(mean loss)`` from per-token losses or their mean.

    Args:
        losses_or_mean: a tensor of per-token losses ``(...)`` (averaged first) or a scalar mean.

    Returns:
        0-d float32 tensor.

    Source: handout §4.1, eq. (18).
    """
    t = torch.as_tensor(losses_or_mean, dtype=torch.float32)
    return t.float().mean().exp()
