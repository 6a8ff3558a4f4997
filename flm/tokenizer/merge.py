"""Apply BPE merges to one pre-token: the inner loop of encoding (handout §2.6.2).

Encoding a pre-token starts from its bytes (one id each) and repeatedly merges the adjacent pair
with the lowest merge rank; among equal ranks the leftmost pair goes first (GPT-2, Radford et al.
2019; tiktoken). It stops when no adjacent pair has a rank. Two implementations give the same ids:

* :func:`merge_short`: a plain list of ids and a list of pair ranks, scanned with ``min`` and
  ``list.index`` on every merge. That is O(n) per merge and O(n^2) per pre-token, but the scans
  run in C, so it is the fastest for the short pre-tokens that make up ordinary text.
* :func:`merge_long`: ``(rank, position)`` entries in a heap (grouped by rank) over a doubly
  linked list of parts. Each merge costs O(log n), so a pre-token costs O(n log n): a megabyte
  without whitespace (one pre-token) takes about a second instead of hours. From
  :data:`COMPACT_PIECE` bytes on, its state lives in arrays of 4-byte ints rather than lists of
  Python ints: ~16-25 bytes of RAM per byte of the pre-token instead of ~150 (24 MB of one
  character, or of NUL bytes, is one pre-token).

:func:`bpe_merge` picks one by length (:data:`LONG_PIECE`, measured by ``bench/tokenizer.py``).
Ids are non-negative ints; ``ranks`` maps each pair to one rank and ``merged[rank]`` is never one
of that rank's own two parts (both hold for a :class:`~flm.tokenizer.Tokenizer`'s merges).
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Mapping, MutableSequence, Sequence
from heapq import heapify, heappop, heappush
from itertools import islice, pairwise, repeat

import numpy as np

__all__ = ["COMPACT_PIECE", "LONG_PIECE", "bpe_merge", "merge_long", "merge_short"]

# Pre-tokens with at least this many bytes use the heap. Below it the list version is faster (about
# 2x at 8 bytes, a typical word). With GPT-2's merges the two break even near 64-96 bytes on
# letters cut from English text, nearer 32-64 on repetitive or random runs ("aaaa...", "xqzj..."),
# and at 256 bytes the heap is 2-5x faster (bench/tokenizer.py --crossover).
LONG_PIECE = 64


def merge_short(ids: list[int], ranks: Mapping[tuple[int, int], int], merged: Sequence[int]) -> list[int]:
    """Merge ``ids`` in place with O(n) list scans per merge (fast for short pre-tokens).

    Args:
        ids: the pre-token's byte ids, in order; rewritten in place.
        ranks: ``{(left id, right id): rank}``; a lower rank merges first.
        merged: ``merged[rank]`` is the id of the token that merge ``rank`` creates.

    Returns:
        ``ids``, merged until no adjacent pair has a rank.
    """
    get = ranks.get
    inf = len(merged)  # larger than every rank: "this pair does not merge"
    # pair[i] is the rank of (ids[i], ids[i + 1]); a merge at i changes only pair[i - 1] and pair[i].
    pair = list(map(get, pairwise(ids), repeat(inf)))
    while pair:
        r = min(pair)  # the lowest rank ...
        if r == inf:
            break
        i = pair.index(r)  # ... and its leftmost occurrence
        new = ids[i] = merged[r]
        del ids[i + 1], pair[i]
        if i:
            pair[i - 1] = get((ids[i - 1], new), inf)
        if i < len(pair):
            pair[i] = get((new, ids[i + 1]), inf)
    return ids


_CHUNK = 1 << 18  # pairs ranked and grouped at a time: bounds the temporary arrays (~5 MB)
_SMALL = 1024  # fewer positions than this are grouped and sorted in Python: faster than numpy's calls

# Pre-tokens with at least this many bytes keep merge_long's state in arrays of machine integers
# (~16 bytes per byte); shorter ones in lists, faster to index from Python (2x on 64-4096 bytes), at
# ~110 bytes per byte: at most ~7 MB here.
COMPACT_PIECE = 1 << 16


def _arange(start: int, stop: int, typecode: str) -> array:
    """``array(typecode, range(start, stop))``, filled by numpy (~50x faster than from a range)."""
    out = array(typecode)
    out.frombytes(np.arange(start, stop, dtype=typecode).view(np.uint8))
    return out


def _positions_by_rank(tok: Sequence[int], get: Callable, at: str | None) -> dict[int, MutableSequence[int]]:
    """Group the positions of ``tok``'s adjacent pairs by the pairs' ranks.

    The ranks are looked up a chunk of pairs at a time and each chunk is sorted by rank with
    numpy (a stable argsort keeps positions in order): about 10x faster than appending one
    position at a time from Python, with a bounded temporary.

    Args:
        tok: ids, shape (n,).
        get: ``ranks.get``.
        at: ``array`` typecode of positions, or None for lists.

    Returns:
        ``{rank: the positions i, ascending, where (tok[i], tok[i + 1]) has that rank}`` (arrays or lists).
    """
    where: dict[int, MutableSequence[int]] = {}
    if at is None or len(tok) <= _SMALL:  # numpy's per-call overhead (a few us a rank) would dominate
        for i, r in enumerate(map(get, pairwise(tok))):
            if r is not None:
                if r in where:
                    where[r].append(i)
                else:
                    where[r] = array(at, (i,)) if at else [i]
        return where
    pairs = pairwise(tok)
    for start in range(0, len(tok) - 1, _CHUNK):
        rank = np.fromiter(map(get, islice(pairs, _CHUNK), repeat(-1)), dtype=np.int32)
        order = np.argsort(rank, kind="stable")
        rank = rank[order]
        cuts = np.flatnonzero(rank[1:] != rank[:-1]) + 1  # where a new rank starts
        for a, b in pairwise([np.searchsorted(rank, 0), *cuts.tolist(), len(rank)]):  # -1s sort first
            if b > a:
                positions = (order[a:b] + start).astype(at)
                where.setdefault(int(rank[a]), array(at)).frombytes(positions.view(np.uint8))
    return where


def _merge_linked(
    tok: MutableSequence[int],
    where: dict[int, MutableSequence[int]],
    get: Callable,
    merged: Sequence[int],
    at: str | None,
) -> None:
    """The merge loop of :func:`merge_long`: rewrites ``tok`` in place (merged-away parts become -1).

    Args:
        tok: ids, shape (n + 1,): the n ids and a sentinel -1 (the "part" after the last one).
        where: ``{rank: positions}`` of the initial pairs (from :func:`_positions_by_rank`); emptied.
        get: ``ranks.get``.
        merged: ``merged[rank]`` is the id of the token that merge ``rank`` creates.
        at: ``array`` typecode of positions (for ``tok`` an array), or None (lists).
    """
    n = len(tok) - 1
    nxt = _arange(1, n + 2, at) if at else list(range(1, n + 2))  # n: no next part
    prv = _arange(-1, n, at) if at else list(range(-1, n))  # -1: no previous part
    pair_of = {r: (tok[p[0]], tok[p[0] + 1]) for r, p in where.items()}  # rank -> (left id, right id)
    heap = list(where)  # the ranks that have positions in ``where``
    heapify(heap)

    def first(q: int, i: int) -> None:  # the first position of rank q: give it an array and a heap entry
        where[q] = array(at, (i,)) if at else [i]
        pair_of[q] = (tok[i], tok[nxt[i]])
        heappush(heap, q)

    while heap:
        r = heappop(heap)
        todo = where.pop(r)
        if at and len(todo) > _SMALL:
            np.frombuffer(todo, dtype=at).sort()  # in place: left to right
        elif len(todo) > 1:
            todo = sorted(todo)
        left, right = pair_of[r]
        new = merged[r]
        it = iter(todo)
        for i in it:
            if tok[i] != left:
                continue  # stale: this part has merged since (or is gone)
            j = nxt[i]
            if tok[j] != right:
                continue  # stale: the next part has merged since
            # Merge the part at j into the part at i and unlink j; record the new pairs' positions.
            tok[i] = new
            tok[j] = -1
            k = nxt[i] = nxt[j]
            prv[k] = i
            q = get((new, tok[k]))  # tok[n] is -1, in no pair
            if q in where:
                where[q].append(i)
            elif q is not None:
                first(q, i)
            h = prv[i]
            if h >= 0:
                q = get((tok[h], new))
                if q in where:
                    where[q].append(h)
                elif q is not None:
                    first(q, h)
            if heap and heap[0] < r:  # a new pair ranks lower (only with unordered merge lists)
                rest = array(at, it) if at else list(it)  # r's remaining positions go back to the heap
                if rest:
                    where[r] = rest
                    heappush(heap, r)
                break


def merge_long(ids: Iterable[int], ranks: Mapping[tuple[int, int], int], merged: Sequence[int]) -> list[int]:
    """Merge ``ids`` with a heap over a linked list of parts: O(n log n) time, ~16 bytes per id.

    Parts are named by the position of their first byte, so positions keep their left-to-right
    order as parts merge. ``nxt[i]``/``prv[i]`` link the live parts and ``tok[i]`` is the id of
    the part at ``i`` (-1 once merged away). The positions of the adjacent pairs are kept grouped
    by rank: a heap of ranks, and per rank an array of positions (``where``). The lowest rank is
    taken from the heap and its positions are merged left to right. (A heap of ``(rank, position)``
    entries gives the same order, but every entry then costs a pop from a heap of ~n entries; here
    it costs a step of an iterator, about 3x faster on a megabyte.) Positions are never removed when
    a merge changes a pair: they are skipped as stale when the parts at ``i`` and after it are no
    longer the rank's pair (each rank belongs to one pair).

    A merge creates pairs of the new token with its neighbours. When every merge's parts exist
    before it (true of every trained merge list), those pairs rank above the merge, so a rank's
    positions are all known when it is taken, and each position is sorted once: O(n log n). With
    other lists a new pair may rank below the one being merged: then the remaining positions go
    back to the heap and the lower rank is merged first (still exact; they are sorted again).

    Memory: everything lives in ``array.array``s of 4-byte machine integers, not lists of Python
    ints (an 8-byte pointer plus a 32-byte int object each): ids and two links take 12 bytes per
    id, and each recorded position 4 (one per initial pair, at most two per merge). A pathological
    pre-token (24 MB of one character) needs about 20 bytes per byte instead of about 150. Shorter
    pre-tokens than :data:`COMPACT_PIECE` use lists instead (same steps, faster to index).

    Args:
        ids: the pre-token's byte ids, in order (not modified; an iterator saves a list of n ints).
        ranks: ``{(left id, right id): rank}``; a lower rank merges first.
        merged: ``merged[rank]`` is the id of the token that merge ``rank`` creates.

    Returns:
        the merged ids, as :func:`merge_short` gives them (equal ids share one int object).
    """
    tok: MutableSequence[int] = array("i", ids)
    n = len(tok)
    at = None if n < COMPACT_PIECE else "i" if n < 2**31 - 1 else "q"  # positions: 4 bytes below 2 GB
    if at is None:
        tok = tok.tolist()
    tok.append(-1)  # the sentinel
    where = _positions_by_rank(tok, ranks.get, at)
    if where:  # else nothing merges (e.g. a run of NUL bytes with GPT-2's merges)
        _merge_linked(tok, where, ranks.get, merged, at)
    tok.pop()
    return _live_ids(tok) if at else list(filter((-1).__ne__, tok))


def _live_ids(tok: array) -> list[int]:
    """The ids >= 0 of ``tok``, in order, as a list in which equal ids share one int object.

    (``tolist`` makes an int object per element: 32 bytes each, besides the list's 8-byte pointer.)

    Args:
        tok: ids, -1 for merged-away parts, shape (n,).

    Returns:
        the live ids.
    """
    live = np.frombuffer(tok, dtype=np.int32)
    live = live[live >= 0]
    canon: dict[int, int] = {}
    out: list[int] = []
    for a in range(0, len(live), _CHUNK):
        ids = live[a : a + _CHUNK].tolist()
        out += map(canon.setdefault, ids, ids)
    return out


def bpe_merge(ids: list[int], ranks: Mapping[tuple[int, int], int], merged: Sequence[int]) -> list[int]:
    """Merge a pre-token's byte ids: :func:`merge_short` below :data:`LONG_PIECE` ids, else :func:`merge_long`.

    Args:
        ids: the pre-token's byte ids, in order (may be rewritten in place).
        ranks: ``{(left id, right id): rank}``; a lower rank merges first.
        merged: ``merged[rank]`` is the id of the token that merge ``rank`` creates.

    Returns:
        the merged ids.
    """
    if len(ids) < LONG_PIECE:
        return merge_short(ids, ranks, merged)
    return merge_long(ids, ranks, merged)
