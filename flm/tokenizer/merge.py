"""Apply BPE merges to one pre-token: the inner loop of encoding (handout §2.6.2).

Encoding a pre-token starts from its bytes (one id each) and repeatedly merges the adjacent pair
with the lowest merge rank; among equal ranks the leftmost pair goes first (GPT-2, Radford et al.
2019; tiktoken). It stops when no adjacent pair has a rank. Two implementations give the same ids:

* :func:`merge_short`: a plain list of ids and a list of pair ranks, scanned with ``min`` and
  ``list.index`` on every merge. That is O(n) per merge and O(n^2) per pre-token, but the scans
  run in C, so it is the fastest for the short pre-tokens that make up ordinary text.
* :func:`merge_long`: ``(rank, position)`` entries in a heap (grouped by rank) over a doubly
  linked list of parts. Each merge costs O(log n), so a pre-token costs O(n log n): a megabyte
  without whitespace (one pre-token) takes about a second instead of hours.

:func:`bpe_merge` picks one by length (:data:`LONG_PIECE`, measured by ``bench/tokenizer.py``).
Ids are non-negative ints; ``ranks`` maps each pair to one rank and ``merged[rank]`` is never one
of that rank's own two parts (both hold for a :class:`~flm.tokenizer.Tokenizer`'s merges).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from heapq import heapify, heappop, heappush
from itertools import pairwise, repeat

__all__ = ["LONG_PIECE", "bpe_merge", "merge_long", "merge_short"]

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


def merge_long(ids: list[int], ranks: Mapping[tuple[int, int], int], merged: Sequence[int]) -> list[int]:
    """Merge ``ids`` with a heap over a linked list of parts: O(n log n) for n bytes.

    Parts are named by the position of their first byte, so positions keep their left-to-right
    order as parts merge. ``nxt[i]``/``prv[i]`` link the live parts, ``tok[i]`` is the id of the
    part at ``i`` (-1 once merged away) and ``pair[i]`` the rank of the pair (part at ``i``, next
    part), or None. The ``(rank, position)`` entries of the pairs are kept grouped by rank: a heap
    of ranks, and per rank a list of positions (``where``). The lowest rank is taken from the heap
    and its positions are merged left to right. (A heap of ``(rank, position)`` entries gives the
    same order, but every entry then costs a pop from a heap of ~n entries; here it costs a list
    pop, about 3x faster on a megabyte.) Entries are never removed when a merge changes a pair:
    they are skipped as stale when ``pair[i]`` no longer holds their rank. Each rank belongs to
    one pair, so an entry whose rank ``pair[i]`` holds is current.

    A merge creates pairs of the new token with its neighbours. When every merge's parts exist
    before it (true of every trained merge list), those pairs rank above the merge, so a rank's
    positions are all known when it is taken, and each entry is sorted once: O(n log n). With
    other lists a new pair may rank below the one being merged: then the remaining positions go
    back to the heap and the lower rank is merged first (still exact; they are sorted again).

    Args:
        ids: the pre-token's byte ids, in order (not modified).
        ranks: ``{(left id, right id): rank}``; a lower rank merges first.
        merged: ``merged[rank]`` is the id of the token that merge ``rank`` creates.

    Returns:
        the merged ids, as :func:`merge_short` gives them.
    """
    n = len(ids)
    get = ranks.get
    tok = list(ids)
    nxt = list(range(1, n + 1))  # n: no next part
    prv = list(range(-1, n - 1))  # -1: no previous part
    pair = list(map(get, pairwise(ids)))
    pair.append(None)
    where: dict[int, list[int]] = {}  # rank -> positions of pairs that had it (some stale), unordered
    for i, r in enumerate(pair):
        if r is not None:
            if r in where:
                where[r].append(i)
            else:
                where[r] = [i]
    heap = list(where)  # the ranks that have a list in ``where``
    heapify(heap)

    def add(q: int, i: int) -> None:  # record a new pair of rank q at position i
        if q in where:
            where[q].append(i)
        else:
            where[q] = [i]
            heappush(heap, q)

    while heap:
        r = heappop(heap)
        todo = where.pop(r)
        todo.sort(reverse=True)  # so that todo.pop() gives the leftmost position
        new = merged[r]
        while todo:
            i = todo.pop()
            if pair[i] != r:
                continue  # stale: this pair has merged or changed since
            # Merge the part at j into the part at i and unlink j.
            j = nxt[i]
            tok[i] = new
            tok[j] = -1
            pair[j] = None
            k = nxt[i] = nxt[j]
            if k < n:
                prv[k] = i
                q = pair[i] = get((new, tok[k]))
                if q is not None:
                    add(q, i)
            else:
                pair[i] = None
            h = prv[i]
            if h >= 0:
                q = pair[h] = get((tok[h], new))
                if q is not None:
                    add(q, h)
            if heap and heap[0] < r:  # a new pair ranks lower (only with unordered merge lists)
                if todo:
                    add(r, todo.pop())  # puts r back on the heap with an entry ...
                    where[r] += todo  # ... and the rest of its positions
                break
    return list(filter((-1).__ne__, tok))  # the live parts, in order


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
