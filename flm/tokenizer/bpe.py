"""Byte-level BPE training (handout §2; Sennrich et al. 2016; GPT-2 byte-level BPE, Radford et al. 2019).

Training counts pre-tokens once (:mod:`flm.tokenizer.pretokenize`), then merges greedily: each
step merges the most frequent adjacent pair of tokens, ties going to the lexicographically
greater pair of byte strings. Pair counts are updated incrementally: a pair -> words index
finds the words a merge touches, and only their pairs change. The best pair comes from a
max-heap with lazy invalidation: an entry whose count went down is re-pushed with its current
count when it reaches the top, and new pairs (those holding the new token, the only ones whose
count can go up) are pushed once per merge.

Vocabulary ids: special tokens ``0..k-1`` (in the order given), the 256 single bytes
``k..k+255`` (by byte value), then one id per merge in creation order. The CS336 reference
fixture uses the same layout except that its 256 bytes follow GPT-2's byte-to-unicode order;
the byte strings are the same.
"""

from __future__ import annotations

import heapq
import os
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence

from flm.progress import progress_bar, want_progress
from flm.tokenizer.pretokenize import count_file, prefix_end, safe_split_token

__all__ = ["train_bpe", "train_bpe_from_counts", "check_train_args"]


class _Desc:
    """Heap key that orders byte-string pairs descending, so a min-heap pops the greatest first."""

    __slots__ = ("t",)

    def __init__(self, t: tuple[bytes, bytes]):
        self.t = t

    def __lt__(self, other: _Desc) -> bool:
        return self.t > other.t

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Desc) and self.t == other.t

    __hash__ = None  # type: ignore[assignment]


def _decrement(
    pair_count: dict[tuple[int, int], int], pair_words: dict[tuple[int, int], set[int]], p: tuple[int, int], f: int
) -> None:
    c = pair_count.get(p, 0) - f  # the merged pair itself is already gone (a == b cases)
    if c > 0:
        pair_count[p] = c
    else:
        pair_count.pop(p, None)
        pair_words.pop(p, None)


def check_train_args(vocab_size: int, special_tokens: Sequence[str]) -> list[str]:
    """Validate training arguments and return the special tokens without duplicates.

    Args:
        vocab_size: the wanted vocabulary size.
        special_tokens: special token strings.

    Returns:
        the special tokens, de-duplicated, in their first-seen order.

    Raises:
        ValueError: a special token is not a non-empty string, or ``vocab_size`` is smaller
            than 256 + the number of special tokens.
    """
    if isinstance(special_tokens, str):
        raise ValueError("special_tokens must be a list of strings, not a string")
    specials: list[str] = []
    for t in special_tokens:
        if not isinstance(t, str) or not t:
            raise ValueError(f"special tokens must be non-empty strings, got {t!r}")
        if t not in specials:
            specials.append(t)
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(specials):
        raise ValueError(
            f"vocab_size={vocab_size!r} is smaller than 256 bytes + {len(specials)} special tokens = {256 + len(specials)}"
        )
    return specials


def train_bpe_from_counts(
    counts: Mapping[str | bytes, int],
    vocab_size: int,
    special_tokens: Sequence[str] = (),
    *,
    progress: bool = False,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Learn BPE merges from a pre-token count table.

    Args:
        counts: pre-token (str, UTF-8 encoded here, or bytes) -> number of occurrences.
        vocab_size: the final vocabulary size (bytes + special tokens + merges).
        special_tokens: special tokens, given ids ``0..k-1``; never merged.
        progress: draw a progress bar over merges on stderr.

    Returns:
        ``(vocab, merges)``: id -> bytes, and the merges as pairs of byte strings in creation order.
        Stops early with a warning when no pair is left to merge.

    Raises:
        ValueError: bad ``vocab_size`` or special tokens (see :func:`check_train_args`).
    """
    specials = check_train_args(vocab_size, special_tokens)
    k = len(specials)
    tok_bytes: list[bytes] = [t.encode("utf-8") for t in specials] + [bytes([b]) for b in range(256)]
    n_merges = vocab_size - len(tok_bytes)

    # Words: token-id lists with their counts; single-token words have no pairs and are dropped.
    words: list[list[int]] = []
    freq: list[int] = []
    for tok, c in counts.items():
        raw = tok.encode("utf-8") if isinstance(tok, str) else tok
        if len(raw) > 1 and c > 0:
            words.append([k + b for b in raw])
            freq.append(c)

    pair_count: dict[tuple[int, int], int] = defaultdict(int)
    pair_words: dict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, w in enumerate(words):
        f = freq[wi]
        for p in zip(w, w[1:]):
            pair_count[p] += f
            pair_words[p].add(wi)

    heap = [(-c, _Desc((tok_bytes[a], tok_bytes[b])), (a, b)) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)

    merges: list[tuple[bytes, bytes]] = []
    bar = progress_bar(n_merges, "bpe merges", unit="merges", enabled=progress)
    while len(merges) < n_merges:
        # Pop stale entries until the top holds its pair's current count.
        while heap:
            negc, key, pair = heap[0]
            cur = pair_count.get(pair, 0)
            if cur == -negc:
                break
            heapq.heappop(heap)
            if cur > 0:
                heapq.heappush(heap, (-cur, key, pair))
        if not heap:
            warnings.warn(
                f"BPE training stopped after {len(merges)} merges (vocab {len(tok_bytes)} < {vocab_size}): no pair left to merge",
                stacklevel=2,
            )
            break
        _, key, pair = heapq.heappop(heap)
        a, b = pair
        new = len(tok_bytes)
        tok_bytes.append(tok_bytes[a] + tok_bytes[b])
        merges.append(key.t)

        # Only the pairs next to each merged occurrence change: (left, a) -> (left, new) and
        # (b, right) -> (new, right). Between two adjacent occurrences the pair (b, a) is counted
        # once, as the left side of the second one.
        grown: set[tuple[int, int]] = set()
        del pair_count[pair]
        for wi in pair_words.pop(pair):
            w = words[wi]
            n = len(w)
            f = freq[wi]
            out: list[int] = []
            i = 0
            while i < n:
                if w[i] == a and i + 1 < n and w[i + 1] == b:
                    if out:
                        _decrement(pair_count, pair_words, (w[i - 1], a), f)
                        p = (out[-1], new)
                        pair_count[p] += f
                        pair_words[p].add(wi)
                        grown.add(p)
                    if i + 2 < n and not (w[i + 2] == a and i + 3 < n and w[i + 3] == b):
                        right = w[i + 2]
                        _decrement(pair_count, pair_words, (b, right), f)
                        p = (new, right)
                        pair_count[p] += f
                        pair_words[p].add(wi)
                        grown.add(p)
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            if len(out) != n:
                words[wi] = out
        for p in grown:
            c = pair_count.get(p, 0)
            if c > 0:
                heapq.heappush(heap, (-c, _Desc((tok_bytes[p[0]], tok_bytes[p[1]])), p))
        bar.update()
    bar.close()
    return dict(enumerate(tok_bytes)), merges


def train_bpe(
    input_path: str | os.PathLike,
    vocab_size: int,
    special_tokens: Sequence[str],
    *,
    num_workers: int | None = None,
    progress: bool | None = False,
    max_bytes: int | None = None,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Train a byte-level BPE tokenizer on a UTF-8 text file.

    Text is split on the special tokens first (no merge crosses them; they are never merged),
    then into GPT-2 regex pre-tokens, counted in parallel for large files.

    Args:
        input_path: the training text (UTF-8).
        vocab_size: the final vocabulary size, at least 256 + number of special tokens.
        special_tokens: special token strings (e.g. ``["<|endoftext|>"]``), ids ``0..k-1``.
        num_workers: pre-tokenization processes; None picks automatically (1 under 2 MB).
        progress: progress bars on stderr; None shows them for inputs over 4 MB.
        max_bytes: train on the file's first ``max_bytes`` only, cut at the last special-token
            boundary before them (:func:`flm.tokenizer.pretokenize.prefix_end`); ``None``: all.

    Returns:
        ``(vocab, merges)``: ``{id: token bytes}`` (special tokens, 256 bytes, one token per
        merge) and the merges ``[(left, right), ...]`` in creation order.

    Raises:
        ValueError: ``vocab_size`` too small, bad special tokens, or an unreadable / non-UTF-8
            input file (the message names it).
    """
    specials = check_train_args(vocab_size, special_tokens)
    try:
        size = prefix_end(input_path, max_bytes, safe_split_token(specials).encode("utf-8"))
    except OSError as e:
        raise ValueError(f"cannot read {input_path}: {e}") from e
    show = want_progress(progress, size)
    with progress_bar(size, "pre-tokenize", enabled=show) as bar:
        counts = count_file(input_path, specials, num_workers=num_workers, progress=bar.update, end=size)
    return train_bpe_from_counts(counts, vocab_size, specials, progress=show)
