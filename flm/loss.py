"""Cross-entropy and perplexity, computed stably in float32.

Source: CS336 assignment 1 handout §4.1, eqs. (16)–(18).
"""

from __future__ import annotations

from typing import Any

import torch

from flm._compat import checks_enabled, in_forward_mode

__all__ = ["token_cross_entropy", "cross_entropy", "perplexity"]


class _CrossEntropy(torch.autograd.Function):
    """``log Σ exp(o − m) − (o[target] − m)`` with a hand-written, itself differentiable gradient.

    Autograd of the plain formula keeps and re-reads several ``(…, vocab_size)`` temporaries (the
    shifted logits, their exponentials, an expanded gradient, a zero-filled scatter target and a
    sum), which dominate a small model's step; here the forward keeps one (the exponentials
    ``e = exp(o − m)``, ``m`` the row maximum) and the first-order backward is
    ``softmax(o) − onehot(target) = e / Σe − onehot`` (one multiply and a scatter).

    ``e`` and ``total = Σe`` are also (internal, unused) differentiable outputs, with derivatives
    ``de = e·do`` and ``dtotal = Σ e·do`` (``m`` held constant: every quantity built from them is
    shift-invariant, so that is exact). The backward is plain differentiable ops on the saved
    ``e`` and ``total``, so differentiating it again (``create_graph=True``,
    ``torch.func.grad`` of ``grad``, ``jacrev``/``jacfwd``/``hessian``) reaches ``o`` through these
    outputs and gives the exact second derivative ``diag(p) − p pᵀ`` (``p = softmax(o)``).
    Unused output gradients are not materialised, so the first-order step pays nothing for this.
    ``generate_vmap_rule`` makes it work under ``torch.func.vmap``; ``torch.compile`` traces it.
    There is no ``jvp`` (dynamo cannot trace a custom one, and torch runs it with forward-mode AD
    off, so ``jacfwd(jacfwd(·))`` would be silently 0): in forward mode (``torch.func.jvp``,
    ``jacfwd``, ``hessian``, ``torch.autograd.forward_ad``) :func:`token_cross_entropy` uses the
    plain formula, which autograd differentiates to any order.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = x.amax(dim=-1, keepdim=True)  # the shift cancels: softmax and logsumexp are shift-invariant
        e = (x - m).exp()
        total = e.sum(dim=-1, keepdim=True)
        # log Σ exp(o − m) − (o[target] − m): both terms are O(log V) for the target near the maximum,
        # so nothing of size |o| is added and then cancelled (m + log Σ … − o[target] loses ulp(|o|)).
        shifted_target = x.gather(-1, targets.unsqueeze(-1)) - m
        return (total.log() - shifted_target).squeeze(-1), e, total

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor], output: tuple[torch.Tensor, ...]) -> None:
        _, targets = inputs
        _, e, total = output
        ctx.set_materialize_grads(False)  # e and total are never used in a loss: their gradients stay None
        ctx.save_for_backward(e, total, targets)

    @staticmethod
    def backward(ctx: Any, grad: Any, grad_e: Any, grad_total: Any) -> tuple[Any, None]:
        e, total, targets = ctx.saved_tensors
        index = targets.unsqueeze(-1)
        coef = None  # per row: dL/dloss / Σe (softmax = e / Σe) + dL/dtotal (dtotal/do = e)
        if grad is not None:
            coef = grad.unsqueeze(-1) / total
        if grad_total is not None:
            coef = grad_total if coef is None else coef + grad_total
        grad_x = None
        if coef is not None:
            grad_x = e * coef
        if grad_e is not None:  # de/do = e (elementwise)
            grad_x = grad_e * e if grad_x is None else grad_x + grad_e * e
        if grad is not None:  # − onehot(target) · dL/dloss (in place: grad_x is ours)
            grad_x.scatter_add_(-1, index, -grad.unsqueeze(-1))
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

    Computed as ``log Σ exp(o − m) − (o[target] − m)`` with ``m`` the row maximum: nothing is
    exponentiated above 1 and no term of size ``|o|`` is added and cancelled again, so logits of any
    magnitude (±1e4, ±3e38) give finite losses accurate to float32 rounding of the inputs. The
    gradient ``softmax(o) − onehot(target)`` is written by hand (one multiply and a scatter,
    reusing the forward's exponentials) and tested equal to autograd of the formula and to
    ``torch.nn.functional.cross_entropy``. The hand-written gradient is itself differentiable
    (``vmap``, ``grad``, ``jacrev``, ``grad`` of ``grad`` and ``create_graph=True`` double backward
    differentiate it), and forward mode (``jvp``, ``jacfwd``, ``hessian``, ``forward_ad``) uses
    the plain formula: every ``torch.func`` transform gives the derivatives of the plain formula,
    of any order.

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
    if in_forward_mode(x):  # jvp/jacfwd/hessian/forward_ad: plain ops (see _CrossEntropy)
        return _plain_cross_entropy(x, targets.long())
    return _CrossEntropy.apply(x, targets.long())[0]


def _plain_cross_entropy(x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log Σ exp(x − m) − (x[target] − m)`` in plain differentiable ops (``m`` the detached row maximum)."""
    m = x.amax(dim=-1, keepdim=True).detach()
    shifted = x - m
    return shifted.exp().sum(dim=-1).log() - shifted.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _token_cross_entropy_autograd(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The same loss left to autograd (the reference :func:`token_cross_entropy`'s derivatives are tested against)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return _plain_cross_entropy(x, targets.long())


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


def perplexity(losses_or_mean: torch.Tensor | float, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Perplexity ``exp(mean loss)`` from per-token losses or their mean; ``inf``, never an error, on overflow.

    Args:
        losses_or_mean: a tensor of per-token losses ``(...)`` (averaged first) or a scalar mean
            (a Python float or a 0-d tensor).
        dtype: the floating dtype of the mean and the result: ``torch.float32`` (default) or
            ``torch.float64`` for a reported number (``exp`` overflows to ``inf`` above a loss of
            about 88.7 in float32 and 709.8 in float64). A NaN loss gives NaN.

    Returns:
        0-d tensor of ``dtype``.

    Raises:
        ValueError: ``dtype`` is not a floating dtype.

    Source: handout §4.1, eq. (18).
    """
    if not dtype.is_floating_point:
        raise ValueError(f"perplexity: dtype must be a floating dtype, got {dtype}")
    return torch.as_tensor(losses_or_mean, dtype=dtype).mean().exp()
