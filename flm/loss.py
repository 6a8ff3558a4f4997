"""Cross-entropy and perplexity, computed stably in float32.

Source: CS336 assignment 1 handout §4.1, eqs. (16)–(18).
"""

from __future__ import annotations

import torch

__all__ = ["token_cross_entropy", "cross_entropy", "perplexity"]


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy ``logsumexp(o) − o[target]``, without averaging.

    The maximum is subtracted before exponentiating and ``log``/``exp`` cancel, so logits of any
    magnitude (e.g. ±1e4) give finite losses.

    Args:
        logits: ``(..., vocab_size)`` unnormalised scores, any float dtype.
        targets: ``(...)`` integer class ids in ``[0, vocab_size)`` (same leading shape).

    Returns:
        ``(...)`` float32 losses in nats (float64 for float64 logits).

    Raises:
        ValueError: if the leading shapes differ or ``targets`` is not an integer tensor.

    Source: handout §4.1, eq. (17) and the cross_entropy problem.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"cross_entropy: logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree on the leading dims"
        )
    if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
        raise ValueError(f"cross_entropy: targets must be integer class ids, got {targets.dtype}")
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))  # float64 stays float64
    m = x.amax(dim=-1, keepdim=True).detach()  # the shift cancels: no gradient flows through it
    lse = m.squeeze(-1) + (x - m).exp().sum(dim=-1).log()
    target_logit = x.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return lse - target_logit


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over all leading (batch-like) dimensions.

    Args:
        logits: ``(..., vocab_size)``.
        targets: ``(...)`` integer ids.

    Returns:
        0-d float32 tensor (float64 for float64 logits): the mean loss in nats per token.

    Raises:
        ValueError: as :func:`token_cross_entropy`.

    Source: handout §4.1, eq. (16).
    """
    return token_cross_entropy(logits, targets).mean()


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
