"""Cross-entropy and perplexity, computed stably in float32.

Source: CS336 assignment 1 handout §4.1, eqs. (16)–(18).
"""

from __future__ import annotations

from typing import Any

import torch

from flm._compat import checks_enabled, in_forward_mode, is_compiling, is_transformed

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


# Chunked path: logits with more elements than this are processed in row chunks of about
# _CHUNK_ELEMENTS (64 MiB in float32), so a 50K-vocabulary batch is never upcast or exponentiated
# whole (16 × 1,024 tokens × 50,304 classes is 3.3 GB per float32 copy).
_CHUNK_ELEMENTS = 2**24


def _chunk_rows(rows: int, vocab_size: int, chunk_rows: int | None) -> int:
    """Rows per chunk: ``chunk_rows`` if given, else about ``_CHUNK_ELEMENTS / vocab_size`` when
    the logits exceed ``2 × _CHUNK_ELEMENTS`` elements; ``rows`` (one chunk) otherwise."""
    if chunk_rows is not None:
        return max(1, min(chunk_rows, rows))
    if rows * vocab_size <= 2 * _CHUNK_ELEMENTS:
        return rows
    return max(1, _CHUNK_ELEMENTS // vocab_size)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """The loss of :class:`_CrossEntropy` over ``(rows, vocab_size)`` logits, a chunk of rows at a time.

    Each chunk is upcast to float32 (float64 stays), reduced to its rows' ``lse = m + log Σ exp(o − m)``
    and losses, and dropped: the forward keeps the logits (in their own dtype, e.g. bf16) and one
    float32 ``lse`` per row, never a whole float32 copy or its exponentials. The backward
    recomputes ``softmax(o) = exp(o − lse)`` per chunk (one more ``exp`` pass than
    :class:`_CrossEntropy`), subtracts the one-hot target and writes the chunk's gradient in the
    logits' dtype. Under ``create_graph=True`` (a double backward) the gradient is the plain
    formula's, in differentiable ops, so second derivatives stay exact.
    """

    generate_vmap_rule = True  # eager vmap takes the whole path; a compiled vmap may come here

    @staticmethod
    def forward(logits: torch.Tensor, targets: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        compute = torch.promote_types(logits.dtype, torch.float32)
        losses, lses = [], []
        for x, t in zip(logits.split(chunk), targets.split(chunk)):
            shifted = x.to(compute, copy=True)  # the chunk's only (…, vocab_size) temporary
            m = shifted.amax(dim=-1, keepdim=True)
            shifted_target = shifted.sub_(m).gather(-1, t.unsqueeze(-1))
            log_total = shifted.exp_().sum(dim=-1, keepdim=True).log_()
            losses.append((log_total - shifted_target).squeeze(-1))
            lses.append((m + log_total).squeeze(-1))
        return torch.cat(losses), torch.cat(lses)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, torch.Tensor, int], output: tuple) -> None:
        logits, targets, chunk = inputs
        ctx.chunk = chunk
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(logits, targets, output[1])

    @staticmethod
    def backward(ctx: Any, grad: Any, _grad_lse: Any) -> tuple[Any, None, None]:
        if grad is None:
            return None, None, None
        logits, targets, lse = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops of the inputs
            x = logits.to(torch.promote_types(logits.dtype, torch.float32))
            m = x.amax(dim=-1, keepdim=True).detach()
            e = (x - m).exp()
            p = e / e.sum(dim=-1, keepdim=True)
            onehot = torch.zeros_like(p).scatter_(-1, targets.unsqueeze(-1), 1.0)
            return ((p - onehot) * grad.unsqueeze(-1)).to(logits.dtype), None, None
        grad_logits = torch.empty_like(logits)
        chunk = ctx.chunk
        compute = torch.promote_types(logits.dtype, torch.float32)
        for x, t, s, g, out in zip(
            logits.split(chunk), targets.split(chunk), lse.split(chunk), grad.split(chunk), grad_logits.split(chunk)
        ):
            p = x.to(compute, copy=True).sub_(s.unsqueeze(-1)).exp_()  # softmax(o) = exp(o − lse)
            p.scatter_add_(-1, t.unsqueeze(-1), p.new_full((t.shape[0], 1), -1.0))
            out.copy_(p.mul_(g.unsqueeze(-1)))
        return grad_logits, None, None


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


def token_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, *, check: bool = True, chunk_rows: int | None = None
) -> torch.Tensor:
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

    Large logits (more than 2²⁵ elements, e.g. a batch of 16 × 1,024 tokens over a 50K vocabulary)
    are processed a chunk of rows at a time (about 2²⁴ elements each): their float32 upcast and
    exponentials exist one chunk at a time, never whole, and the gradient is written in the
    logits' dtype (tested equal to the unchunked loss and gradient). Inside ``torch.func``
    transforms and in forward mode the loss is computed whole.

    Args:
        logits: ``(..., vocab_size)`` unnormalised scores, any float dtype, ``vocab_size ≥ 1``.
        targets: ``(...)`` integer class ids in ``[0, vocab_size)`` (same leading shape).
        check: check that every target lies in ``[0, vocab_size)``. The check reads the targets
            back to the host (a sync), so it is eager-only: it is skipped under ``torch.compile``
            and inside ``torch.func`` transforms (``vmap``, ``grad``), and the train step passes
            ``False``. Shape and dtype checks always run.
        chunk_rows: rows (positions) per chunk; ``None`` chooses as above. A value ≥ the number
            of positions computes the loss whole.

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
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"cross_entropy: chunk_rows must be a positive integer or None, got {chunk_rows!r}")
    vocab_size = logits.shape[-1]
    rows = targets.numel()
    chunk = _chunk_rows(rows, vocab_size, chunk_rows)
    if chunk < rows and not in_forward_mode(logits) and (is_compiling() or not is_transformed(logits, targets)):
        flat = logits.reshape(rows, vocab_size)
        return _ChunkedCrossEntropy.apply(flat, targets.reshape(rows).long(), chunk)[0].view(targets.shape)
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


def cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, *, check: bool = True, chunk_rows: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy over all leading (batch-like) dimensions.

    Args:
        logits: ``(..., vocab_size)``.
        targets: ``(...)`` integer ids, at least one.
        check: check the target values (eager-only; see :func:`token_cross_entropy`).
        chunk_rows: rows per chunk for large logits (see :func:`token_cross_entropy`).

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
    return token_cross_entropy(logits, targets, check=check, chunk_rows=chunk_rows).mean()


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
