"""Pre-tokenization: split text on special tokens, then into GPT-2 regex pieces, and count them.

BPE merges never cross a pre-token boundary (handout §2; GPT-2, Radford et al. 2019), so
training only needs the multiset of pre-tokens. Large files are counted in parallel over byte
ranges that start at a special token, so no pre-token or special token straddles two ranges.
:func:`pretokenize` gives the pieces of the GPT-2 pattern faster on ASCII text.

Why two pre-tokenizers: ``PRETOKEN_RE`` (the third-party ``regex`` module, for Unicode classes)
is the reference; ``ASCII_RE`` is the same pattern for the standard ``re`` module, which is faster,
used by :func:`pretokenize` on ASCII text and ASCII stretches of mixed text. Measured on 4.5 MB of
text (the shared TinyStories excerpt x5, and ``tests/helpers.py``'s ``generate_stories``; two runs
on 2 busy CPU cores, best of 3-5), against ``PRETOKEN_RE.findall`` in its place: pre-tokenization
1.7-1.8x as fast (e.g. 15.4 vs 9.3 MB/s), single-process ``Tokenizer.encode`` with GPT-2's vocabulary
(warm cache) 1.4-1.7x, BPE training's counting (:func:`count_pretokens`) 1.5-1.7x.
``tests/test_bpe_encode.py`` checks with hypothesis that both give the same pieces on random ASCII
and mixed text.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from itertools import pairwise

import regex

__all__ = [
    "ASCII_PATTERN",
    "ASCII_RE",
    "GPT2_PATTERN",
    "PRETOKEN_RE",
    "chunk_boundaries",
    "count_file",
    "count_pretokens",
    "pretokenize",
    "safe_split_token",
    "special_pattern",
    "split_special",
    "prefix_end",
]

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PRETOKEN_RE = regex.compile(GPT2_PATTERN)

# ----- A faster pre-tokenizer for ASCII text -----
#
# The third-party ``regex`` module (needed for ``\p{L}``) is about half as fast as the standard
# library's ``re`` on this pattern. On ASCII text the Unicode classes reduce to plain ones, so
# ``re`` can do the work: ``\p{L}`` is [A-Za-z] and ``\p{N}`` is [0-9] (no other ASCII character
# is a letter or a number), and ``regex``'s ``\s`` (Unicode White_Space) is [\t\n\x0b\x0c\r ].
# Careful: ``re``'s own ``\s`` also matches \x1c-\x1f, which are not White_Space, so it is spelled
# out. ``(?!\S)`` becomes ``(?![^<white space>])``: not followed by a non-space, or at the end.
_WS = r"\t\n\x0b\x0c\r "
ASCII_PATTERN = rf"""'(?:[sdmt]|ll|ve|re)| ?[A-Za-z]+| ?[0-9]+| ?[^{_WS}A-Za-z0-9]+|[{_WS}]+(?![^{_WS}])|[{_WS}]+"""
ASCII_RE = re.compile(ASCII_PATTERN)

# Mixed text is cut into ASCII stretches (for ``ASCII_RE``) and islands around non-ASCII characters
# (for ``PRETOKEN_RE``), only at *safe cuts*: between an ASCII non-space character and an ASCII
# space character. Both patterns give the same pieces for the parts as for the whole text there:
# (1) a piece ends at the cut, since no piece holds a non-space followed by a space; (2) no match
# left of the cut looks past it, except to see that the space is not a letter, digit, symbol or
# contraction letter, which the end of the text also is not (the only look-ahead, ``(?!\S)``,
# follows white space, and the cut is preceded by a non-space); (3) the pattern has no look-behind,
# so matching right of the cut does not depend on the text before it.
_CUT_RE = re.compile(rf"[^{_WS}\x80-\U0010ffff](?=[{_WS}])")  # the character before a safe cut
_CUT_BEFORE_RE = regex.compile(rf"[^{_WS}\x80-\U0010ffff][{_WS}]", regex.REVERSE)  # searched right to left
_NON_ASCII_RE = regex.compile(r"[^\x00-\x7f]+")  # (regex scans for it 15x faster than re)
_LAST_NON_ASCII_RE = regex.compile(r"[^\x00-\x7f]+", regex.REVERSE)
# Non-ASCII characters closer together than this share one island: fewer, longer islands bound the
# per-island overhead (a few microseconds) on text that mixes scripts densely.
_ISLAND_GAP = 64


def pretokenize(text: str) -> list[str]:
    """Split ``text`` into GPT-2 pre-tokens: the same list as ``PRETOKEN_RE.findall(text)``, faster.

    ASCII text goes through ``ASCII_RE`` (standard ``re``, about twice as fast as ``regex``); mixed
    text is cut at safe cuts (see above) into ASCII stretches and islands holding the non-ASCII
    characters, which ``PRETOKEN_RE`` splits. Special tokens are not handled here.

    Args:
        text: the text.

    Returns:
        the pre-tokens, in order; they concatenate to ``text``.
    """
    if text.isascii():
        return ASCII_RE.findall(text)
    out: list[str] = []
    pos, n = 0, len(text)  # text[:pos] is done; pos is 0 or a safe cut
    while pos < n:
        m = _NON_ASCII_RE.search(text, pos)
        if m is None:
            out += ASCII_RE.findall(text, pos)
            break
        # The island starts at the last safe cut before the first non-ASCII character (or at pos) ...
        c = _CUT_BEFORE_RE.search(text, pos, m.start())
        start = c.start() + 1 if c else pos
        # ... takes in non-ASCII characters that follow within _ISLAND_GAP (each step jumps to the
        # last one in the window, so the next hit is at least _ISLAND_GAP further) ...
        end = m.end()
        while (m := _LAST_NON_ASCII_RE.search(text, end, end + _ISLAND_GAP)) is not None:
            end = m.end()
        # ... and ends at the next safe cut (or the end of the text).
        c = _CUT_RE.search(text, end)
        end = c.end() if c else n
        out += ASCII_RE.findall(text, pos, start)
        out += PRETOKEN_RE.findall(text, start, end)
        pos = end
    return out


def special_pattern(special_tokens: Iterable[str]) -> regex.Pattern | None:
    """Compile an alternation matching any special token, longest first.

    Longest first makes overlapping tokens (``<|eot|>`` and ``<|eot|><|eot|>``) match the
    longer one.

    Args:
        special_tokens: the special token strings (empty strings are ignored).

    Returns:
        a compiled pattern with one capture group, or None when there are no special tokens.
    """
    toks = sorted({t for t in special_tokens if t}, key=lambda t: (-len(t), t))
    if not toks:
        return None
    return regex.compile("(" + "|".join(regex.escape(t) for t in toks) + ")")


def split_special(text: str, pattern: regex.Pattern | None) -> list[str]:
    """Split ``text`` around special tokens.

    Args:
        text: the text.
        pattern: from :func:`special_pattern`, or None.

    Returns:
        alternating ``[text, special, text, special, ..., text]`` (odd indices are special tokens;
        text pieces may be empty).
    """
    return [text] if pattern is None else pattern.split(text)


def count_pretokens(text: str, special_tokens: Sequence[str] = ()) -> Counter[str]:
    """Count the GPT-2 regex pre-tokens of ``text``, with special tokens removed.

    Args:
        text: the text.
        special_tokens: special tokens to split on (they are not counted).

    Returns:
        Counter of pre-token strings.
    """
    counts: Counter[str] = Counter()
    parts = split_special(text, special_pattern(special_tokens))
    for part in parts[::2]:
        if part:
            counts.update(pretokenize(part))
    return counts


def prefix_end(path: str | os.PathLike, max_bytes: int | None, split_token: bytes, block: int = 1 << 20) -> int:
    """Where a file's first ``max_bytes`` end at a document boundary: the start of the last
    ``split_token`` at or before ``max_bytes`` (the file's size when it is shorter, ``max_bytes``
    itself when no token occurs before it).

    Args:
        path: the text file.
        max_bytes: the byte budget, or ``None`` for the whole file.
        split_token: the document separator (e.g. ``b"<|endoftext|>"``); empty: cut at ``max_bytes``.
        block: read size when scanning backwards.

    Returns:
        The end offset (exclusive), ``≤ max(max_bytes, 0)`` and ``≤`` the file size.
    """
    size = os.path.getsize(path)
    if max_bytes is None or max_bytes >= size:
        return size
    if not split_token:
        return max_bytes
    with open(path, "rb") as f:
        hi = max_bytes  # the latest start position a hit may have (inclusive)
        while hi >= 0:
            lo = max(0, hi - block + 1)
            f.seek(lo)
            data = f.read(hi - lo + len(split_token))
            hit = data.rfind(split_token, 0, hi - lo + len(split_token))
            if hit >= 0:
                return lo + hit
            hi = lo - 1
    return max_bytes


def chunk_boundaries(
    path: str | os.PathLike, n_chunks: int, split_token: bytes, block: int = 1 << 16, *, end: int | None = None
) -> list[int]:
    """Byte offsets that cut a file into about ``n_chunks`` ranges, each starting at ``split_token``.

    Each guessed cut (an equal split) is moved forward to the next occurrence of ``split_token``
    (or the end of file); duplicates are dropped, so fewer ranges may come back.

    Args:
        path: the file.
        n_chunks: the wanted number of ranges.
        split_token: the bytes to cut before (a special token, UTF-8).
        block: read size in bytes when scanning forward.

        end: treat the file as ending here (a prefix of it); default its size.

    Returns:
        sorted offsets ``[0, ..., end]``.
    """
    size = os.path.getsize(path) if end is None else end
    if n_chunks <= 1 or size == 0 or not split_token:
        return [0, size]
    cuts = [0]
    with open(path, "rb") as f:
        for k in range(1, n_chunks):
            pos = max(size * k // n_chunks, cuts[-1])
            f.seek(pos)
            tail = b""
            while True:
                data = f.read(block)
                if not data:
                    pos = size
                    break
                buf = tail + data
                hit = buf.find(split_token)
                if hit >= 0:
                    pos = pos - len(tail) + hit
                    break
                keep = len(split_token) - 1
                tail = buf[-keep:] if keep else b""
                pos += len(data)
            if pos > cuts[-1]:
                cuts.append(pos)
    if cuts[-1] != size:
        cuts.append(size)
    return cuts


def safe_split_token(special_tokens: Sequence[str]) -> str:
    """Pick a special token before whose occurrences a text can be cut without changing its parse.

    A cut before an occurrence of ``s`` is safe when no special token (``s`` included) can
    overlap that occurrence from the left, i.e. no proper suffix of a special token is a prefix
    of ``s`` or has ``s`` as a prefix. ``<|endoftext|>`` alone is safe.

    Args:
        special_tokens: the special tokens.

    Returns:
        the longest safe special token, or ``""`` when none is safe (then do not cut).
    """
    toks = [t for t in special_tokens if t]
    for s in sorted(toks, key=len, reverse=True):
        if not any(m[i:].startswith(s) or s.startswith(m[i:]) for m in toks for i in range(1, len(m))):
            return s
    return ""


def _read_range(path: str | os.PathLike, start: int, end: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not valid UTF-8 at byte {start + e.start}") from e


def _count_range(args: tuple[str, int, int, tuple[str, ...]]) -> Counter[str]:
    path, start, end, special_tokens = args
    return count_pretokens(_read_range(path, start, end), special_tokens)


def count_file(
    path: str | os.PathLike,
    special_tokens: Sequence[str] = (),
    num_workers: int | None = None,
    progress: Callable[[int], object] | None = None,
    *,
    end: int | None = None,
) -> Counter[str]:
    """Count the pre-tokens of a UTF-8 file, in parallel over special-token-aligned ranges.

    Args:
        path: the text file.
        special_tokens: special tokens (split on, not counted); ranges of about 4 MB are cut
            before one of them (see :func:`safe_split_token`). A file without any is read whole.
        num_workers: processes to use; None picks 1 for files under 2 MB (process start-up
            costs more than it saves there), else ``min(os.cpu_count(), 8)``.
        progress: an optional callable ``progress(n_bytes)`` called as ranges finish.
        end: count only the bytes before this offset (see :func:`prefix_end`).

    Returns:
        Counter of pre-token strings.

    Raises:
        ValueError: the file cannot be read or is not UTF-8 (names the file).
    """
    try:
        size = os.path.getsize(path) if end is None else end
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if num_workers is None:
        num_workers = 1 if size < (2 << 20) else min(os.cpu_count() or 1, 8)
    specials = tuple(special_tokens)
    split = safe_split_token(specials).encode("utf-8")
    # Several ranges per worker balance the load; ~4 MB ranges bound memory (when the special
    # token occurs often enough to cut there), also in a single process.
    n_chunks = max(num_workers * 4 if num_workers > 1 else 1, size // (4 << 20))
    cuts = chunk_boundaries(path, n_chunks, split, end=size)
    tasks = [(str(path), a, b, specials) for a, b in pairwise(cuts)]
    total: Counter[str] = Counter()
    if num_workers <= 1 or len(tasks) <= 1:
        for t in tasks:
            total.update(_count_range(t))
            if progress:
                progress(t[2] - t[1])
        return total
    from flm.tokenizer._mp import pool_context

    with pool_context().Pool(min(num_workers, len(tasks))) as pool:
        for t, c in zip(tasks, pool.imap(_count_range, tasks)):
            total.update(c)
            if progress:
                progress(t[2] - t[1])
    return total
