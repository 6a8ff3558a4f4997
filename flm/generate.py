"""Text generation: temperature and nucleus (top-p) sampling over a KV-cached Transformer LM.

``prefill(params, config, token_ids)`` runs the prompt once and returns its logits and a
:class:`KVCache`; ``decode_step(params, config, token_ids_last, cache)`` feeds one new token per
row and costs one position, not the whole prefix. Both run the model's own
:func:`flm.model.transformer_lm` with an attention hook per layer (``attend``) that writes the new
keys and values into the cache and attends over everything cached, so every model variant is
written once. ``generate`` drives them: temperature scaling (temperature 0 is greedy argmax),
top-k and top-p filtering, a stop at ``eos_id`` or ``max_new_tokens``, batches of prompts of
different lengths, and a sliding window at ``context_length``; ``generate_stream`` yields the
tokens as they are sampled.

Policies (documented once here, referred to below):

- **Ragged batches** are right-aligned with left padding. Each row's positions start at 0 on its
  first real token, and no real token attends to a pad slot, so every row gets exactly the
  logits it would get alone.
- **Context length**: the model never sees more than ``context_length`` tokens. A longer prompt
  keeps its last ``context_length`` tokens. Once prompt + generated tokens fill the context, each
  new token slides the window: the oldest token is dropped and the cache is recomputed (one
  prefill) for the last ``context_length`` tokens, with RoPE positions restarting at 0 for the
  window. Every sampled token therefore comes from exactly ``transformer_lm(x[-context_length:])``.
  Past that point each token costs a full prefill (absolute RoPE positions in the cache make a
  cheaper shift impossible without changing the model's input).
- **EOS**: a row stops after it samples ``eos_id``; the returned continuation excludes the EOS
  token (friendlier for decoding text).
- **Randomness** comes only from the explicit ``torch.Generator`` (a fresh one seeded 0 when
  ``None``, so a plain call is reproducible).

The cache's buffers are preallocated to ``min(context_length, prompt + max_new_tokens)`` slots
and written in place at the new slots (no O(n²) concatenation); nothing else grows with
``max_new_tokens`` but the returned ids themselves. The cache is explicit state, returned by every call, but
``decode_step`` *donates* its input cache's buffers to its output (as JAX's donated buffers):
the old cache stays valid for its own ``length``, but branching from it overwrites the newer one;
:func:`clone_cache` first if you need to branch.

Command line: ``flm generate RUN_DIR --prompt "Once upon a time"`` (``flm.cli.generate``).

Source: CS336 assignment 1 handout §6 (decoding, temperature, top-p); Holtzman et al. (2019),
"The Curious Case of Neural Text Degeneration" (nucleus sampling); Fan et al. (2018),
"Hierarchical Neural Story Generation" (top-k sampling).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch

from flm import nn
from flm.model import TransformerConfig, check_token_ids, transformer_lm
from flm.sampling import (
    check_sampling,
    sample_next_token,
    top_k_mask,
    top_p_filter,
    top_p_mask,
)

__all__ = [
    "KVCache",
    "init_cache",
    "clone_cache",
    "prefill",
    "decode_step",
    "top_p_mask",
    "top_p_filter",
    "top_k_mask",
    "sample_next_token",
    "generate",
    "generate_stream",
]

Params = dict[str, Any]


class KVCache(NamedTuple):
    """Per-layer attention keys and values of the tokens seen so far (a pytree).

    Attributes:
        keys: one tensor per layer, ``(batch, heads, capacity, d_head)``; slots ``[0, length)``
            are filled (after RoPE), the rest are scratch.
        values: one tensor per layer, ``(batch, heads, capacity, d_head)``.
        length: number of filled slots (a Python int, the same for every row).
        pad_lengths: ``(batch,)`` int64 number of left-pad slots per row (the row's first real
            token sits at slot ``pad_lengths[b]`` and has position 0), or ``None`` when no row
            is padded.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    length: int
    pad_lengths: torch.Tensor | None


def init_cache(
    config: TransformerConfig,
    batch_size: int,
    *,
    capacity: int | None = None,
    pad_lengths: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> KVCache:
    """Allocate an empty cache (``length == 0``).

    Args:
        config: the model's hyperparameters.
        batch_size: number of rows.
        capacity: slots per row (default and maximum ``config.context_length``).
        pad_lengths: ``(batch,)`` left-pad slots per row, or ``None`` for no padding.
        device: where to allocate.
        dtype: float dtype of keys/values (default float32; use the parameters' dtype).

    Returns:
        A :class:`KVCache` with zero-filled buffers ``(batch, heads, capacity, d_head)``.

    Raises:
        ValueError: for a non-positive batch size or a capacity outside ``[1, context_length]``.
    """
    capacity = config.context_length if capacity is None else capacity
    if batch_size <= 0:
        raise ValueError(f"init_cache: batch_size must be positive, got {batch_size}")
    if not 1 <= capacity <= config.context_length:
        raise ValueError(f"init_cache: capacity must be in [1, context_length={config.context_length}], got {capacity}")
    shape = (batch_size, config.num_heads, capacity, config.d_head)
    kw = dict(device=device, dtype=dtype or torch.float32)
    keys = [torch.zeros(shape, **kw) for _ in range(config.num_layers)]
    values = [torch.zeros(shape, **kw) for _ in range(config.num_layers)]
    return KVCache(keys, values, 0, pad_lengths)


def clone_cache(cache: KVCache) -> KVCache:
    """Return a copy of ``cache`` with its own buffers (to branch generation from one state).

    Args:
        cache: any :class:`KVCache`.

    Returns:
        An equal :class:`KVCache` sharing no memory with ``cache``.
    """
    pads = None if cache.pad_lengths is None else cache.pad_lengths.clone()
    return KVCache([k.clone() for k in cache.keys], [v.clone() for v in cache.values], cache.length, pads)


def _attention_mask(cache: KVCache, num_new: int, device: torch.device) -> torch.Tensor | None:
    """Bool mask ``(batch or 1, 1, num_new, length + num_new)`` for the new queries, or ``None``.

    Query at slot ``i`` attends key slot ``j`` iff ``j ≤ i`` and ``j`` is a real token of its row;
    a pad query attends itself only (its output is never used, but must stay finite). ``None``
    when one unpadded query attends every filled slot (nothing to mask).
    """
    total = cache.length + num_new
    if cache.pad_lengths is None:
        return None if num_new == 1 else nn.causal_mask(num_new, total, device=device)[None, None]
    causal = nn.causal_mask(num_new, total, device=device)  # (num_new, total)
    slots = torch.arange(total, device=device)
    real_key = slots[None, :] >= cache.pad_lengths[:, None]  # (batch, total)
    diag = slots[None, :] == (slots[cache.length :, None])  # (num_new, total)
    return (causal[None] & (real_key[:, None, :] | diag[None]))[:, None]  # (batch, 1, num_new, total)


def _positions(cache: KVCache, num_new: int, device: torch.device) -> torch.Tensor:
    """RoPE positions of the new slots: ``(num_new,)``, or ``(batch, num_new)`` with padding."""
    slots = torch.arange(cache.length, cache.length + num_new, device=device)
    if cache.pad_lengths is None:
        return slots
    return (slots[None, :] - cache.pad_lengths[:, None]).clamp(min=0)


def _cache_hook(
    k_buf: torch.Tensor, v_buf: torch.Tensor, start: int, mask: torch.Tensor | None, implementation: str
) -> nn.Attend:
    """The attention hook of one layer: store the new keys/values at slots ``[start, start + n)``
    (in place: the buffers are donated) and attend over every filled slot."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        end = start + k.shape[-2]
        k_buf[:, :, start:end] = k
        v_buf[:, :, start:end] = v
        return nn.dot_product_attention(q, k_buf[:, :, :end], v_buf[:, :, :end], mask, implementation=implementation)

    return attend


def _forward(
    params: Params, config: TransformerConfig, token_ids: torch.Tensor, cache: KVCache, *, last_only: bool
) -> tuple[torch.Tensor, KVCache]:
    """Run ``token_ids (batch, num_new)`` through the model on top of ``cache``; write their k/v."""
    batch, num_new = token_ids.shape
    start, end = cache.length, cache.length + num_new
    capacity = cache.keys[0].shape[-2] if cache.keys else config.context_length
    if end > capacity:
        raise ValueError(
            f"KV cache holds {capacity} slots (context_length={config.context_length}); "
            f"{cache.length} filled + {num_new} new tokens do not fit"
        )
    if cache.keys and cache.keys[0].shape[0] != batch:
        raise ValueError(f"KV cache has batch {cache.keys[0].shape[0]}, token_ids batch {batch}")
    device = token_ids.device
    mask = _attention_mask(cache, num_new, device)
    hooks = [_cache_hook(k, v, start, mask, config.attention) for k, v in zip(cache.keys, cache.values, strict=True)]
    logits = transformer_lm(
        params,
        token_ids,
        config,
        _positions(cache, num_new, device),
        check_ids=False,
        attend=hooks,
        last_only=last_only,
    )
    return logits, KVCache(cache.keys, cache.values, end, cache.pad_lengths)


def _check_2d_ids(token_ids: torch.Tensor, config: TransformerConfig, name: str) -> None:
    if (
        not isinstance(token_ids, torch.Tensor)
        or token_ids.dim() != 2
        or token_ids.shape[0] == 0
        or token_ids.shape[1] == 0
    ):
        shape = tuple(token_ids.shape) if isinstance(token_ids, torch.Tensor) else type(token_ids).__name__
        raise ValueError(f"{name}: token_ids must be a non-empty (batch, seq_len) tensor, got {shape}")
    check_token_ids(token_ids, config.vocab_size)


def prefill(
    params: Params,
    config: TransformerConfig,
    token_ids: torch.Tensor,
    *,
    pad_lengths: torch.Tensor | None = None,
    capacity: int | None = None,
    last_only: bool = False,
) -> tuple[torch.Tensor, KVCache]:
    """Run a (left-padded) batch of prompts and build the KV cache.

    Args:
        params: the tree from :func:`flm.model.init_params`.
        config: the model's hyperparameters.
        token_ids: ``(batch, seq_len)`` int ids, ``1 ≤ seq_len ≤ context_length``; row ``b``'s first
            ``pad_lengths[b]`` entries are padding (any valid id).
        pad_lengths: ``(batch,)`` int left-pad counts (each ``< seq_len``), or ``None``.
        capacity: cache slots to allocate (default ``context_length``).
        last_only: return logits for the last position only (what generation needs).

    Returns:
        ``(logits, cache)``: logits ``(batch, seq_len or 1, vocab_size)`` in the parameters' dtype,
        equal to ``transformer_lm`` on each unpadded row (logits at pad slots are meaningless);
        ``cache.length == seq_len``.

    Raises:
        ValueError: bad shape, an id outside the vocabulary, ``seq_len > capacity`` or bad pad counts.

    Source: handout §6 (decoding); the KV cache is the standard decoder-only inference trick.
    """
    _check_2d_ids(token_ids, config, "prefill")
    batch, seq_len = token_ids.shape
    if pad_lengths is not None:
        pad_lengths = torch.as_tensor(pad_lengths, dtype=torch.int64, device=token_ids.device)
        if pad_lengths.shape != (batch,):
            raise ValueError(f"prefill: pad_lengths must have shape ({batch},), got {tuple(pad_lengths.shape)}")
        if bool(((pad_lengths < 0) | (pad_lengths >= seq_len)).any()):
            raise ValueError(f"prefill: pad_lengths must be in [0, seq_len={seq_len}), got {pad_lengths.tolist()}")
        if not bool(pad_lengths.any()):
            pad_lengths = None
    dtype = params["token_embeddings"]["weight"].dtype
    cache = init_cache(config, batch, capacity=capacity, pad_lengths=pad_lengths, device=token_ids.device, dtype=dtype)
    return _forward(params, config, token_ids, cache, last_only=last_only)


def decode_step(
    params: Params, config: TransformerConfig, token_ids_last: torch.Tensor, cache: KVCache
) -> tuple[torch.Tensor, KVCache]:
    """Feed one new token per row on top of ``cache``: cost of one position, not the prefix.

    Args:
        params: the tree from :func:`flm.model.init_params`.
        config: the model's hyperparameters.
        token_ids_last: ``(batch,)`` or ``(batch, 1)`` int ids (not range-checked here: no host
            sync per token; :func:`generate` only feeds ids it sampled).
        cache: the state from :func:`prefill` or a previous step, with ``length < capacity``.
            Its buffers are donated to the returned cache (see the module docstring).

    Returns:
        ``(logits, cache)``: logits ``(batch, 1, vocab_size)`` for the new position and the cache
        with ``length + 1`` slots.

    Raises:
        ValueError: the cache is full (slide the window with a new :func:`prefill`) or the
            batch does not match.

    Source: handout §6 (decoding).
    """
    if token_ids_last.dim() == 1:
        token_ids_last = token_ids_last[:, None]
    if token_ids_last.dim() != 2 or token_ids_last.shape[1] != 1:
        raise ValueError(
            f"decode_step: token_ids_last must be (batch,) or (batch, 1), got {tuple(token_ids_last.shape)}"
        )
    return _forward(params, config, token_ids_last, cache, last_only=False)


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _prompts_to_padded(prompt_ids: Any, vocab_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise prompts to a right-aligned ``(batch, max_len)`` tensor and ``(batch,)`` pad counts."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 1:
            prompt_ids = prompt_ids[None]
        if prompt_ids.dim() != 2:
            raise ValueError(f"generate: prompt tensor must be 1-D or 2-D, got shape {tuple(prompt_ids.shape)}")
        if prompt_ids.shape[0] == 0 or prompt_ids.shape[1] == 0:
            raise ValueError(f"generate: empty prompt (shape {tuple(prompt_ids.shape)})")
        check_token_ids(prompt_ids, vocab_size)
        return prompt_ids.to(device=device, dtype=torch.int64), torch.zeros(
            prompt_ids.shape[0], dtype=torch.int64, device=device
        )
    if not isinstance(prompt_ids, Sequence) or isinstance(prompt_ids, (str, bytes)):
        raise ValueError(
            f"generate: prompt_ids must be a tensor or a list of lists of ints, got {type(prompt_ids).__name__}"
        )
    rows = list(prompt_ids)
    if rows and all(isinstance(t, int) and not isinstance(t, bool) for t in rows):
        rows = [rows]  # a single flat prompt
    if not rows:
        raise ValueError("generate: no prompts given")
    for i, row in enumerate(rows):
        if isinstance(row, (str, bytes)) or not isinstance(row, (Sequence, torch.Tensor)) or len(row) == 0:
            raise ValueError(f"generate: prompt {i} is empty or not a sequence of ids: {row!r}")
        if isinstance(row, torch.Tensor):
            if row.dim() != 1 or row.is_floating_point() or row.is_complex() or row.dtype == torch.bool:
                raise ValueError(
                    f"generate: prompt {i} must be a 1-D integer tensor, got {row.dtype} {tuple(row.shape)}"
                )
        elif not all(isinstance(t, int) and not isinstance(t, bool) for t in row):
            raise ValueError(f"generate: prompt {i} must hold ints, got {row!r}")
    lengths = [len(r) for r in rows]
    width = max(lengths)
    padded = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, row in enumerate(rows):
        padded[i, width - lengths[i] :] = torch.as_tensor(row, dtype=torch.int64)
    pads = torch.tensor([width - n for n in lengths], dtype=torch.int64)
    check_token_ids(padded, vocab_size)
    return padded.to(device), pads.to(device)


def _check_generate_args(
    config: TransformerConfig,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int | None,
    eos_id: int | None,
    vocab_limit: int | None = None,
) -> None:
    check_sampling(temperature, top_p, top_k)
    if vocab_limit is not None and not (
        isinstance(vocab_limit, int) and not isinstance(vocab_limit, bool) and 1 <= vocab_limit <= config.vocab_size
    ):
        raise ValueError(
            f"generate: vocab_limit must be an int in [1, vocab_size={config.vocab_size}], got {vocab_limit!r}"
        )
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int ≥ 0, got {max_new_tokens!r}")
    if eos_id is not None and not (isinstance(eos_id, int) and 0 <= eos_id < config.vocab_size):
        raise ValueError(f"generate: eos_id must be in [0, vocab_size={config.vocab_size}), got {eos_id!r}")


@torch.no_grad()
def generate_stream(
    params: Params,
    config: TransformerConfig,
    prompt_ids: Any,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    vocab_limit: int | None = None,
) -> Iterator[list[int | None]]:
    """Sample continuations step by step, yielding each step's new tokens as they are sampled.

    The same decoding as :func:`generate` (see the module's policies), as a generator: after each
    step it yields one entry per prompt, the id just sampled, or ``None`` for a row that has
    already finished (sampled ``eos_id``; the EOS itself is yielded as ``None`` too). Stops after
    ``max_new_tokens`` steps or when every row has finished. Only the KV cache (at most
    ``context_length`` slots) and a ``context_length`` window of ids are kept, so a large
    ``max_new_tokens`` allocates nothing up front.

    Args:
        params: the tree from :func:`flm.model.init_params` (or a checkpoint).
        config: the model's hyperparameters.
        prompt_ids: as in :func:`generate`.
        max_new_tokens: most tokens to generate per prompt (≥ 0).
        temperature: ``τ ≥ 0``; 0 = greedy argmax.
        top_p: nucleus threshold in ``(0, 1]`` (1 = no filtering).
        top_k: keep the ``top_k`` most likely tokens (``None``/0 = off).
        eos_id: stop a row after it samples this id, or ``None``.
        generator: the only source of randomness; ``None`` = a fresh generator seeded 0 on the
            parameters' device.
        vocab_limit: sample only ids ``< vocab_limit`` (see :func:`generate`).

    Yields:
        ``list[int | None]`` of length ``batch`` per step.

    Raises:
        ValueError: as :func:`generate` (raised at the first ``next``).

    Source: handout §6; Holtzman et al. (2019); Fan et al. (2018).
    """
    _check_generate_args(config, max_new_tokens, temperature, top_p, top_k, eos_id, vocab_limit)
    device = params["token_embeddings"]["weight"].device
    prompts, pads = _prompts_to_padded(prompt_ids, config.vocab_size, device)
    if max_new_tokens == 0:
        return
    if generator is None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(0)
    ctx = config.context_length
    window = prompts[:, -ctx:]  # the model sees at most the last ctx ids
    pads = (pads - (prompts.shape[1] - window.shape[1])).clamp(min=0)
    capacity = min(ctx, window.shape[1] + max_new_tokens - 1)

    def window_prefill() -> tuple[torch.Tensor, KVCache]:
        return prefill(params, config, window, pad_lengths=pads, capacity=capacity, last_only=True)

    logits, cache = window_prefill()
    finished = torch.zeros(window.shape[0], dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        last = logits[:, -1]
        if vocab_limit is not None and vocab_limit < config.vocab_size:
            last = last.masked_fill(torch.arange(config.vocab_size, device=device) >= vocab_limit, float("-inf"))
        token = sample_next_token(last, temperature=temperature, top_p=top_p, top_k=top_k, generator=generator)
        if eos_id is not None:
            token = torch.where(finished, eos_id, token)
            was_done = finished.clone()
            finished |= token == eos_id
            yield [None if done else t for done, t in zip((was_done | finished).tolist(), token.tolist())]
            if bool(finished.all()):  # the one host sync per token
                return
        else:
            yield token.tolist()
        if step == max_new_tokens - 1:
            return
        if window.shape[1] < ctx:
            window = torch.cat([window, token[:, None]], dim=1)
        else:  # slide: drop the oldest id, recompute the window with positions from 0
            window = torch.cat([window[:, 1:], token[:, None]], dim=1)
            pads = (pads - 1).clamp(min=0)
        if cache.length < capacity:
            logits, cache = decode_step(params, config, token, cache)
        else:
            logits, cache = window_prefill()


def generate(
    params: Params,
    config: TransformerConfig,
    prompt_ids: Any,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    vocab_limit: int | None = None,
) -> list[list[int]]:
    """Sample continuations of a batch of prompts with a KV cache (see the module's policies).

    Args:
        params: the tree from :func:`flm.model.init_params` (or a checkpoint).
        config: the model's hyperparameters.
        prompt_ids: a list of prompts (lists of ints, lengths may differ), one flat list of ints,
            or an int tensor ``(seq_len,)`` / ``(batch, seq_len)``; ids in ``[0, vocab_size)``.
        max_new_tokens: most tokens to generate per prompt (≥ 0).
        temperature: ``τ ≥ 0``; 0 = greedy argmax.
        top_p: nucleus threshold in ``(0, 1]`` (1 = no filtering).
        top_k: keep only the ``top_k`` most likely tokens (``None``/0 = off).
        eos_id: stop a row after it samples this id (excluded from the result), or ``None``.
        generator: the only source of randomness; ``None`` = a fresh generator seeded 0 on the
            parameters' device.
        vocab_limit: sample only ids ``< vocab_limit`` (their logits are kept, the rest set to
            ``-inf``), e.g. the tokenizer's size when BPE training stopped before the model's
            ``vocab_size`` (the ids above it decode to nothing); ``None`` = every id.

    Returns:
        One list of generated ids per prompt (without the prompt and without EOS), in order;
        each has at most ``max_new_tokens`` ids.

    Raises:
        ValueError: empty prompt, id outside the vocabulary, ``temperature < 0``, ``top_p``
            outside ``(0, 1]``, ``top_k < 0``, negative ``max_new_tokens`` or ``eos_id`` outside
            the vocabulary.

    Source: handout §6; Holtzman et al. (2019) for top-p; Fan et al. (2018) for top-k.
    """
    _check_generate_args(config, max_new_tokens, temperature, top_p, top_k, eos_id, vocab_limit)
    rows: list[list[int]] | None = None
    for step in generate_stream(
        params,
        config,
        prompt_ids,
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        eos_id=eos_id,
        generator=generator,
        vocab_limit=vocab_limit,
    ):
        if rows is None:
            rows = [[] for _ in step]
        for row, t in zip(rows, step):
            if t is not None:
                row.append(t)
    if rows is None:  # max_new_tokens == 0: still validate the prompts and return one list each
        device = params["token_embeddings"]["weight"].device
        return [[] for _ in range(_prompts_to_padded(prompt_ids, config.vocab_size, device)[0].shape[0])]
    return rows


if __name__ == "__main__":  # the old entry point; the one command line is ``flm`` (issue 20)
    import sys

    print(
        "error: python -m flm.generate is no longer a command; run: flm generate … (or python -m flm generate …)",
        file=sys.stderr,
    )
    sys.exit(2)
