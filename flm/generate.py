"""Text generation: temperature and nucleus (top-p) sampling over a KV-cached Transformer LM.

``prefill(params, config, token_ids)`` runs the prompt once and returns its logits and a
:class:`KVCache`; ``decode_step(params, config, token_ids_last, cache)`` feeds one new token per
row and costs one position, not the whole prefix. ``generate`` drives them: temperature scaling
(temperature 0 is greedy argmax), top-p filtering, a stop at ``eos_id`` or ``max_new_tokens``,
batches of prompts of different lengths, and a sliding window at ``context_length``.

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

The cache's buffers are preallocated to ``context_length`` and written in place at the new
slots (no O(n²) concatenation). The cache is explicit state, returned by every call, but
``decode_step`` *donates* its input cache's buffers to its output (as JAX's donated buffers):
the old cache stays valid for its own ``length``, but branching from it overwrites the newer one;
:func:`clone_cache` first if you need to branch.

Command line::

    python -m flm.generate --checkpoint RUN_DIR/ckpt.safetensors --prompt "Once upon a time" \\
        --temperature 0.8 --top-p 0.9 --max-new-tokens 256 [--seed 0] [--device cpu] [--num-samples N]

Source: CS336 assignment 1 handout §6 (decoding, temperature, top-p); Holtzman et al. (2019),
"The Curious Case of Neural Text Degeneration" (nucleus sampling).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from einops import rearrange

from flm import nn
from flm.model import TransformerConfig, check_token_ids

__all__ = [
    "KVCache",
    "init_cache",
    "clone_cache",
    "prefill",
    "decode_step",
    "top_p_mask",
    "top_p_filter",
    "sample_next_token",
    "generate",
    "parse_args",
    "main",
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
    a pad query attends itself only (its output is never used, but must stay finite).
    """
    total = cache.length + num_new
    causal = nn.causal_mask(num_new, total, device=device)  # (num_new, total)
    if cache.pad_lengths is None:
        return causal[None, None]
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
    rope_theta = config.rope_theta if config.position == "rope" else None
    positions = _positions(cache, num_new, device)
    mask = _attention_mask(cache, num_new, device)
    if config.attention == "flm" and cache.pad_lengths is None and num_new == 1:
        mask = None  # one query attending every filled slot: nothing to mask
    ffn = nn.swiglu if config.ffn == "swiglu" else nn.silu_ffn

    def attn(layer: Params, h: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor) -> torch.Tensor:
        q, k, v = nn.attention_qkv(layer["attn"], h, config.num_heads, rope_theta, positions)
        k_buf[:, :, start:end] = k  # donated buffers: in-place write of the new slots only
        v_buf[:, :, start:end] = v
        keys, values = k_buf[:, :, :end], v_buf[:, :, :end]
        if config.attention == "sdpa":
            from flm._fused import fused_causal_attention

            out = fused_causal_attention(q, keys, values, None if start == 0 and cache.pad_lengths is None else mask)
        else:
            out = nn.scaled_dot_product_attention(q, keys, values, mask)
        return nn.linear(layer["attn"]["output_proj"], rearrange(out, "b heads seq d_head -> b seq (heads d_head)"))

    x = nn.embedding(params["token_embeddings"], token_ids)
    for layer, k_buf, v_buf in zip(params["layers"], cache.keys, cache.values, strict=True):
        if config.norm == "pre":
            z = x + attn(layer, nn.rms_norm(layer["ln1"], x, config.eps), k_buf, v_buf)
            x = z + ffn(layer["ffn"], nn.rms_norm(layer["ln2"], z, config.eps))
        elif config.norm == "post":
            z = nn.rms_norm(layer["ln1"], x + attn(layer, x, k_buf, v_buf), config.eps)
            x = nn.rms_norm(layer["ln2"], z + ffn(layer["ffn"], z), config.eps)
        else:
            z = x + attn(layer, x, k_buf, v_buf)
            x = z + ffn(layer["ffn"], z)
    if last_only:
        x = x[:, -1:]
    if config.norm != "none":
        x = nn.rms_norm(params["ln_final"], x, config.eps)
    head = params["token_embeddings"] if config.tie_embeddings else params["lm_head"]
    return nn.linear(head, x), KVCache(cache.keys, cache.values, end, cache.pad_lengths)


def _check_2d_ids(token_ids: torch.Tensor, config: TransformerConfig, name: str) -> None:
    if not isinstance(token_ids, torch.Tensor) or token_ids.dim() != 2 or token_ids.shape[0] == 0 or token_ids.shape[1] == 0:
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
        raise ValueError(f"decode_step: token_ids_last must be (batch,) or (batch, 1), got {tuple(token_ids_last.shape)}")
    return _forward(params, config, token_ids_last, cache, last_only=False)


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def _check_top_p(top_p: float) -> None:
    if not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0.0):
        raise ValueError(f"temperature must be a finite number ≥ 0, got {temperature!r}")


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
    _check_top_p(top_p)
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
        _check_top_p(top_p)
        return probs
    kept = probs * top_p_mask(probs, top_p)
    return kept / kept.sum(dim=-1, keepdim=True)


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample one token per row from temperature-scaled, nucleus-filtered logits.

    Args:
        logits: ``(batch, vocab_size)`` unnormalised scores.
        temperature: ``τ ≥ 0``; probabilities ``softmax(logits / τ)``; 0 = greedy argmax (no
            randomness, ``top_p`` irrelevant).
        top_p: nucleus threshold in ``(0, 1]``.
        generator: the only source of randomness (sampling happens on its device).

    Returns:
        ``(batch,)`` int64 token ids on ``logits``' device.

    Raises:
        ValueError: ``temperature < 0`` (or not finite), ``top_p`` outside ``(0, 1]``.

    Source: handout §6, eq. (24) and the nucleus equation; Holtzman et al. (2019).
    """
    _check_temperature(temperature)
    _check_top_p(top_p)
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = top_p_filter(nn.softmax(logits.float() / temperature, dim=-1), top_p)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator)[:, 0].to(logits.device)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _prompts_to_padded(
    prompt_ids: Any, vocab_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise prompts to a right-aligned ``(batch, max_len)`` tensor and ``(batch,)`` pad counts."""
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 1:
            prompt_ids = prompt_ids[None]
        if prompt_ids.dim() != 2:
            raise ValueError(f"generate: prompt tensor must be 1-D or 2-D, got shape {tuple(prompt_ids.shape)}")
        if prompt_ids.shape[0] == 0 or prompt_ids.shape[1] == 0:
            raise ValueError(f"generate: empty prompt (shape {tuple(prompt_ids.shape)})")
        check_token_ids(prompt_ids, vocab_size)
        return prompt_ids.to(device=device, dtype=torch.int64), torch.zeros(prompt_ids.shape[0], dtype=torch.int64, device=device)
    if not isinstance(prompt_ids, Sequence) or isinstance(prompt_ids, (str, bytes)):
        raise ValueError(f"generate: prompt_ids must be a tensor or a list of lists of ints, got {type(prompt_ids).__name__}")
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
                raise ValueError(f"generate: prompt {i} must be a 1-D integer tensor, got {row.dtype} {tuple(row.shape)}")
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


@torch.no_grad()
def generate(
    params: Params,
    config: TransformerConfig,
    prompt_ids: Any,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
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
        eos_id: stop a row after it samples this id (excluded from the result), or ``None``.
        generator: the only source of randomness; ``None`` = a fresh generator seeded 0 on the
            parameters' device.

    Returns:
        One list of generated ids per prompt (without the prompt and without EOS), in order;
        each has at most ``max_new_tokens`` ids.

    Raises:
        ValueError: empty prompt, id outside the vocabulary, ``temperature < 0``, ``top_p``
            outside ``(0, 1]``, negative ``max_new_tokens`` or ``eos_id`` outside the vocabulary.

    Source: handout §6; Holtzman et al. (2019) for top-p.
    """
    _check_temperature(temperature)
    _check_top_p(top_p)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int ≥ 0, got {max_new_tokens!r}")
    if eos_id is not None and not (isinstance(eos_id, int) and 0 <= eos_id < config.vocab_size):
        raise ValueError(f"generate: eos_id must be in [0, vocab_size={config.vocab_size}), got {eos_id!r}")
    device = params["token_embeddings"]["weight"].device
    prompts, pads = _prompts_to_padded(prompt_ids, config.vocab_size, device)
    batch, width = prompts.shape
    if max_new_tokens == 0:
        return [[] for _ in range(batch)]
    if generator is None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(0)

    ctx = config.context_length
    # history: right-aligned prompts then generated tokens; the model sees its last ≤ ctx slots.
    history = torch.zeros(batch, width + max_new_tokens, dtype=torch.int64, device=device)
    history[:, :width] = prompts
    filled = width

    def window_prefill(end: int) -> tuple[torch.Tensor, KVCache]:
        begin = max(0, end - ctx)
        window_pads = (pads - begin).clamp(min=0)
        return prefill(params, config, history[:, begin:end], pad_lengths=window_pads, last_only=True)

    logits, cache = window_prefill(filled)
    out = torch.zeros(batch, max_new_tokens, dtype=torch.int64, device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = 0
    for step in range(max_new_tokens):
        token = sample_next_token(logits[:, -1], temperature=temperature, top_p=top_p, generator=generator)
        if eos_id is not None:
            token = torch.where(finished, eos_id, token)
        out[:, step] = token
        history[:, filled] = token
        filled += 1
        steps = step + 1
        if eos_id is not None:
            finished |= token == eos_id
            if bool(finished.all()):  # the one host sync per token
                break
        if step == max_new_tokens - 1:
            break
        if cache.length < ctx:
            logits, cache = decode_step(params, config, token, cache)
        else:  # slide: drop the oldest token, recompute the window with positions from 0
            logits, cache = window_prefill(filled)

    rows = out[:, :steps].tolist()
    if eos_id is not None:
        rows = [r[: r.index(eos_id)] if eos_id in r else r for r in rows]
    return rows


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _float_arg(check: Callable[[float], None]) -> Callable[[str], float]:
    """An argparse type: parse a float and validate it with ``check`` (its ValueError becomes a usage error)."""

    def parse(s: str) -> float:
        value = float(s)
        try:
            check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value

    return parse


_temperature_arg = _float_arg(_check_temperature)
_top_p_arg = _float_arg(_check_top_p)


def _non_negative_int(s: str) -> int:
    value = int(s)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {value}")
    return value


def _positive_int(s: str) -> int:
    value = int(s)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 1, got {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line of ``python -m flm.generate``.

    Args:
        argv: arguments without the program name (default ``sys.argv[1:]``).

    Returns:
        A namespace with ``checkpoint``, ``prompt``, ``temperature``, ``top_p``,
        ``max_new_tokens``, ``seed``, ``device``, ``num_samples``.

    Raises:
        SystemExit: on bad arguments (argparse's behaviour), e.g. ``--top-p 0``.
    """
    p = argparse.ArgumentParser(prog="python -m flm.generate", description="Sample text from a trained flm checkpoint.")
    p.add_argument("--checkpoint", required=True, help="RUN_DIR/ckpt.safetensors; vocab.json and merges.txt sit beside it")
    p.add_argument("--prompt", default="", help="text to continue (default: start from <|endoftext|>)")
    p.add_argument("--temperature", type=_temperature_arg, default=1.0, help="softmax temperature ≥ 0 (0 = greedy)")
    p.add_argument("--top-p", type=_top_p_arg, default=1.0, help="nucleus threshold in (0, 1]")
    p.add_argument("--max-new-tokens", type=_non_negative_int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-samples", type=_positive_int, default=1)
    return p.parse_args(argv)


def _model_config(config: Any) -> TransformerConfig:
    """Accept a ``TransformerConfig``, its ``to_dict()``, or a run config with a ``"model"`` key."""
    if isinstance(config, TransformerConfig):
        return config
    if not isinstance(config, dict):
        raise ValueError(f"checkpoint config must be a dict, got {type(config).__name__}")
    if "model" in config:
        return _model_config(config["model"])
    return TransformerConfig.from_dict(config)


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Load a checkpoint and its tokenizer, sample continuations of ``--prompt`` and print them.

    Args:
        argv: command-line arguments (see :func:`parse_args`).

    Returns:
        The decoded continuations, one per sample.

    Raises:
        ValueError: an unreadable config, a prompt that encodes to no tokens without an EOS to
            start from, or prompt ids outside the model's vocabulary.
    """
    from pathlib import Path

    from flm.checkpoint import load_checkpoint  # lazy: written alongside this module
    from flm.tokenizer import Tokenizer

    args = parse_args(argv)
    ckpt_path = Path(args.checkpoint)
    run_dir = ckpt_path.parent
    ckpt = load_checkpoint(ckpt_path)
    config = _model_config(ckpt.config)
    from flm.tree import tree_map

    params = tree_map(lambda t: t.to(args.device), ckpt.params)
    eot = "<|endoftext|>"
    tokenizer = Tokenizer.from_files(str(run_dir / "vocab.json"), str(run_dir / "merges.txt"), special_tokens=[eot])
    eot_ids = tokenizer.encode(eot)
    eos_id = eot_ids[0] if len(eot_ids) == 1 else None
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        if eos_id is None:
            raise ValueError("empty prompt and no <|endoftext|> token to start from")
        prompt_ids = [eos_id]
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    outputs = generate(
        params,
        config,
        [prompt_ids] * args.num_samples,
        args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        eos_id=eos_id,
        generator=generator,
    )
    texts = [tokenizer.decode(ids) for ids in outputs]
    for i, text in enumerate(texts):
        if args.num_samples > 1:
            print(f"--- sample {i} ---")
        print(args.prompt + text)
        sys.stdout.flush()
    return texts


if __name__ == "__main__":  # pragma: no cover
    main()
