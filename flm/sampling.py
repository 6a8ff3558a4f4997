"""Decoding tricks: temperature scaling, top-k and nucleus (top-p) filtering, and sampling one token.

Pure functions of a ``(batch, vocab_size)`` row of logits; randomness comes only from an explicit
``torch.Generator``. :mod:`flm.generate` uses them to decode from a KV-cached model.

Source: CS336 assignment 1 handout §6 (temperature, top-p); Holtzman et al. (2019), "The Curious
Case of Neural Text Degeneration" (nucleus sampling); Fan et al. (2018), "Hierarchical Neural
Story Generation" (top-k sampling).
"""

from __future__ import annotations

import math

import torch

from flm import nn
from flm._compat import checks_enabled

__all__ = ["top_p_mask", "top_p_filter", "top_k_mask", "sample_next_token", "check_sampling"]


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_sampling(temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None, *, where: str = "") -> None:
    """Validate decoding settings: the one check behind :func:`sample_next_token`,
    :func:`flm.generate.generate` and :class:`flm.config.SampleConfig`.

    Booleans are refused everywhere (``temperature=True`` or ``top_k=True`` is a mistake, not 1).

    Args:
        temperature: ``τ``, a finite number ≥ 0 (0 = greedy).
        top_p: the nucleus threshold, a number in ``(0, 1]``.
        top_k: ``None`` or an int ≥ 0 (``None`` and 0 = off).
        where: a prefix for the message naming the caller (``"SampleConfig: "``).

    Raises:
        ValueError: naming the first offending setting and its value.
    """
    if not (_number(temperature) and math.isfinite(temperature) and temperature >= 0.0):
        raise ValueError(f"{where}temperature must be a finite number ≥ 0, got {temperature!r}")
    if not (_number(top_p) and 0.0 < top_p <= 1.0):
        raise ValueError(f"{where}top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0):
        raise ValueError(f"{where}top_k must be an int ≥ 0 (0 or None = off), got {top_k!r}")


def top_p_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The nucleus: the smallest set of most-probable tokens whose probability reaches ``top_p``.

    Sort descending and keep each token whose cumulative probability *before* it is ``< top_p``;
    the most probable token is always kept. Among tied probabilities at the boundary the sort
    order decides which one is kept (the smallest set is then not unique).

    Args:
        probs: ``(..., vocab_size)`` probabilities (rows sum to 1), float dtype.
        top_p: threshold in ``(0, 1]``; 1 keeps every token.

    Returns:
        ``(..., vocab_size)`` bool mask, True = kept.

    Raises:
        ValueError: ``top_p`` outside ``(0, 1]``.

    Source: handout §6 ("nucleus or top-p sampling"); Holtzman et al. (2019) §3.1.
    """
    check_sampling(top_p=top_p)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep_sorted = mass_before < top_p
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tokens outside the nucleus and renormalise.

    Args:
        probs: ``(..., vocab_size)`` probabilities, float dtype.
        top_p: threshold in ``(0, 1]``.

    Returns:
        ``(..., vocab_size)`` probabilities, same dtype, supported on :func:`top_p_mask`.

    Raises:
        ValueError: ``top_p`` outside ``(0, 1]``.

    Source: handout §6, nucleus sampling equation; Holtzman et al. (2019).
    """
    if top_p >= 1.0:
        check_sampling(top_p=top_p)
        return probs
    kept = probs * top_p_mask(probs, top_p)
    return kept / kept.sum(dim=-1, keepdim=True)


def top_k_mask(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """The ``top_k`` highest-scoring tokens of each row (ties at the boundary: the sort decides).

    Args:
        logits: ``(..., vocab_size)`` scores (or probabilities).
        top_k: how many to keep, ≥ 1; values ≥ ``vocab_size`` keep everything.

    Returns:
        ``(..., vocab_size)`` bool mask, True = kept.

    Raises:
        ValueError: ``top_k < 1``.

    Source: Fan et al. (2018) §5.4 (top-k sampling).
    """
    if not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k_mask: top_k must be an int ≥ 1, got {top_k!r}")
    k = min(top_k, logits.shape[-1])
    idx = logits.topk(k, dim=-1).indices
    return torch.zeros(logits.shape, dtype=torch.bool, device=logits.device).scatter(-1, idx, True)


def _check_logits(logits: torch.Tensor) -> None:
    """Raise ``ValueError`` for a row with NaN or +inf, or a row that is entirely ``-inf`` (a host sync)."""
    bad_rows = logits.isnan().any(dim=-1) | logits.isposinf().any(dim=-1) | logits.isneginf().all(dim=-1)
    if bool(bad_rows.any()):
        row = int(bad_rows.nonzero()[0, 0])
        values = logits[row]
        if bool(values.isnan().any()):
            what = "NaN"
        elif bool(values.isposinf().any()):
            what = "+inf"
        else:
            what = "only -inf (no token left to sample)"
        raise ValueError(
            f"sample_next_token: logits row {row} holds {what}; every row needs finite values or -inf, with at "
            "least one finite (NaN/inf logits come from a model whose parameters or inputs are not finite)"
        )


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Sample one token per row from temperature-scaled, top-k and nucleus-filtered logits.

    Args:
        logits: ``(batch, vocab_size)`` unnormalised scores.
        temperature: ``τ ≥ 0``; probabilities ``softmax(logits / τ)``; 0 = greedy argmax (no
            randomness, ``top_p``/``top_k`` irrelevant).
        top_p: nucleus threshold in ``(0, 1]``.
        top_k: keep only the ``top_k`` most likely tokens first (``None`` or 0: off).
        generator: the only source of randomness (sampling happens on its device).
        check: check that no row holds NaN or +inf and that every row has a finite value. The
            check reads the logits back to the host (a sync), so it is eager-only: it is skipped
            under ``torch.compile`` and inside ``torch.func`` transforms.

    Returns:
        ``(batch,)`` int64 token ids on ``logits``' device.

    Raises:
        ValueError: ``temperature < 0`` (or not finite), ``top_p`` outside ``(0, 1]``, ``top_k < 0``;
            (when checked) a row of logits with NaN or +inf, or with only ``-inf``.

    Source: handout §6, eq. (24) and the nucleus equation; Holtzman et al. (2019); Fan et al. (2018).
    """
    check_sampling(temperature, top_p, top_k)
    if check and logits.numel() and checks_enabled(logits):
        _check_logits(logits)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    if top_k:
        scaled = scaled.masked_fill(~top_k_mask(scaled, top_k), float("-inf"))
    probs = top_p_filter(nn.softmax(scaled, dim=-1), top_p)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator)[:, 0].to(logits.device)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
