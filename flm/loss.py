"""Cross-entropy and perplexity, computed stably in float32.

Source: CS336 assignment 1 handout §4.1, eqs. (16)–(18).
"""

from __future__ import annotations

from typing import Any

import torch

from flm._compat import checks_enabled, in_forward_mode, is_compiling, is_transformed

__all__ = ["token_cross_entropy", "cross_entropy", "token_linear_cross_entropy", "perplexity"]


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


def _loss_and_lse_(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row loss and ``lse = m + log Σ exp(o − m)`` of a ``(rows, vocab_size)`` chunk, overwriting
    ``logits`` (the caller's own float32/float64 temporary) in place."""
    m = logits.amax(dim=-1, keepdim=True)
    shifted_target = logits.sub_(m).gather(-1, targets.unsqueeze(-1))
    log_total = logits.exp_().sum(dim=-1, keepdim=True).log_()
    return (log_total - shifted_target).squeeze(-1), (m + log_total).squeeze(-1)


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
            loss, lse = _loss_and_lse_(x.to(compute, copy=True), t)  # the chunk's only (…, vocab_size) temporary
            losses.append(loss)
            lses.append(lse)
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
            del p  # before the next chunk's copy exists
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


class _LinearCrossEntropy(torch.autograd.Function):
    """:func:`token_cross_entropy` of ``x Wᵀ`` without the ``(rows, vocab_size)`` logits ever whole.

    The forward computes the logits of ``chunk`` rows at a time, keeps each row's ``lse`` and loss
    and drops the chunk: it saves ``x``, ``W``, the targets and one float32 ``lse`` per row. The
    backward recomputes each chunk's logits, turns them in place into
    ``(softmax(o) − onehot(target)) · dL/dloss`` and accumulates ``dW += pᵀ x`` into one buffer
    (float32 for lower-precision weights), writing ``dx = p W`` chunk by chunk. Peak memory beyond
    the inputs: one chunk's logits and the gradient of ``W``, where autograd of
    ``token_cross_entropy(x @ Wᵀ)`` holds the whole logits, their gradient and, when chunks are
    recomputed separately, a ``W``-sized gradient per chunk plus their sum.
    """

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> tuple:
        compute = torch.promote_types(x.dtype, torch.float32)
        losses, lses = [], []
        for xc, t in zip(x.split(chunk), targets.split(chunk)):
            loss, lse = _loss_and_lse_(
                (xc @ weight.mT).to(compute), t
            )  # the chunk's only (chunk, vocab_size) temporary
            losses.append(loss)
            lses.append(lse)
        return torch.cat(losses), torch.cat(lses)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        x, weight, targets, chunk = inputs
        ctx.chunk = chunk
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, weight, targets, output[1])

    @staticmethod
    def backward(ctx: Any, grad: Any, _grad_lse: Any) -> tuple[Any, Any, None, None]:
        if grad is None:
            return None, None, None, None
        x, weight, targets, lse = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable ops of the inputs
            logits = (x @ weight.mT).to(lse.dtype)
            e = (logits - logits.amax(dim=-1, keepdim=True).detach()).exp()
            onehot = torch.zeros_like(e).scatter_(-1, targets.unsqueeze(-1), 1.0)
            dlogits = ((e / e.sum(dim=-1, keepdim=True) - onehot) * grad.unsqueeze(-1)).to(weight.dtype)
            return dlogits @ weight, dlogits.mT @ x, None, None
        need_x, need_w = ctx.needs_input_grad[:2]
        compute = lse.dtype
        grad_x = torch.empty_like(x) if need_x else None
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        chunk = ctx.chunk
        for i in range(0, x.shape[0], chunk):
            xc, t, s, g = x[i : i + chunk], targets[i : i + chunk], lse[i : i + chunk], grad[i : i + chunk]
            p = (xc @ weight.mT).to(compute).sub_(s.unsqueeze(-1)).exp_()  # softmax(o) = exp(o − lse)
            p.scatter_add_(-1, t.unsqueeze(-1), p.new_full((t.shape[0], 1), -1.0))
            p = p.mul_(g.unsqueeze(-1)).to(weight.dtype)
            if need_x:
                torch.mm(p, weight, out=grad_x[i : i + chunk])
            if need_w:
                if acc == weight.dtype:
                    grad_w.addmm_(p.mT, xc)
                else:
                    grad_w += p.mT @ xc
            del p  # before the next chunk's logits exist
        return grad_x, None if grad_w is None else grad_w.to(weight.dtype), None, None


def token_linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, check: bool = True, chunk_rows: int | None = None
) -> torch.Tensor:
    """Per-position cross-entropy of the logits ``x Wᵀ`` (the LM head fused into the loss), without averaging.

    Equals ``token_cross_entropy(x @ weight.mT, targets)`` (tested, values and gradients), but the
    logits exist one chunk of rows at a time, in the forward and in the backward, which recomputes
    them; the weight's gradient is accumulated into one buffer. Worth it where the head's logits
    or its per-chunk weight gradients dominate memory (a large vocabulary; the sharded step, whose
    head is gathered whole). Costs one more ``x Wᵀ`` per step. Inside ``torch.func`` transforms,
    in forward mode and under ``torch.compile`` it computes the plain ``token_cross_entropy`` of
    the whole logits (same values, same derivatives).

    Args:
        x: ``(..., d_model)`` the final hidden states (after the final norm), float dtype.
        weight: ``(vocab_size, d_model)`` the head's weight, the same dtype as ``x``.
        targets: ``(...)`` integer class ids in ``[0, vocab_size)``.
        check: check the target values (eager-only; see :func:`token_cross_entropy`).
        chunk_rows: rows per chunk; ``None`` chooses as :func:`token_cross_entropy` does.

    Returns:
        ``(...)`` float32 losses in nats (float64 for float64 inputs).

    Raises:
        ValueError: shapes that disagree (``x``'s leading dims vs ``targets``, ``d_model`` vs the
            weight), a bad ``chunk_rows``, or (when checked) a target outside ``[0, vocab_size)``.
        TypeError: ``x`` and ``weight`` of different dtypes.

    Source: handout §3.4.2 eq. (1) and §4.1 eq. (17); the fused head + loss of Wijmans et al.
    (2024), "Cut Your Losses in Large-Vocabulary Language Models".
    """
    if weight.dim() != 2 or x.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"linear_cross_entropy: x {tuple(x.shape)} and weight {tuple(weight.shape)} disagree "
            "(weight must be (vocab_size, d_model) with d_model = x's last dimension)"
        )
    if x.dtype != weight.dtype:
        raise TypeError(f"linear_cross_entropy: x is {x.dtype} but weight is {weight.dtype}; cast one to the other")
    if x.shape[:-1] != targets.shape:
        raise ValueError(
            f"linear_cross_entropy: x {tuple(x.shape)} and targets {tuple(targets.shape)} disagree on the leading dims"
        )
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"linear_cross_entropy: chunk_rows must be a positive integer or None, got {chunk_rows!r}")
    if in_forward_mode(x, weight) or is_compiling() or is_transformed(x, weight, targets):
        return token_cross_entropy(x @ weight.mT, targets, check=check, chunk_rows=chunk_rows)
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"linear_cross_entropy: targets must be integer class ids, got {targets.dtype}")
    if weight.shape[0] == 0:
        raise ValueError(f"linear_cross_entropy: weight {tuple(weight.shape)} has no classes")
    if check and targets.numel() and checks_enabled(x, targets):
        _check_targets(x.new_empty((0, weight.shape[0])), targets)
    rows = targets.numel()
    if rows == 0:
        return x.new_empty(targets.shape, dtype=torch.promote_types(x.dtype, torch.float32))
    chunk = _chunk_rows(rows, weight.shape[0], chunk_rows)
    flat = x.reshape(rows, x.shape[-1])
    return _LinearCrossEntropy.apply(flat, weight, targets.reshape(rows).long(), chunk)[0].view(targets.shape)


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
