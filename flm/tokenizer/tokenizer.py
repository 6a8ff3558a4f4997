"""The byte-level BPE ``Tokenizer``: encode text to ids and decode ids to text (handout §2).

Encoding (GPT-2 byte-level BPE, Radford et al. 2019; Sennrich et al. 2016): split the text on
special tokens (longest first), split each piece into GPT-2 regex pre-tokens, and turn each
pre-token's UTF-8 bytes into ids by applying the merges in creation order (repeatedly the
leftmost pair of lowest rank, as GPT-2 and tiktoken do; see :mod:`flm.tokenizer.merge`).

Speed-ups, none of which changes a result:

* ASCII text is pre-tokenized with the standard ``re`` module (:func:`~flm.tokenizer.pretokenize.pretokenize`);
* a pre-token whose bytes are a vocabulary token that the merges rebuild from its bytes (checked
  once per token at construction) is that token, without merging;
* pre-token -> ids results are cached in a bounded dict.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType

from flm.tokenizer.gpt2_format import read_merges, read_vocab, write_merges, write_vocab
from flm.tokenizer.merge import LONG_PIECE, bpe_merge, merge_long, merge_short
from flm.tokenizer.pretokenize import pretokenize, special_pattern

__all__ = ["EOS_TOKEN", "Tokenizer"]

EOS_TOKEN = "<|endoftext|>"
_CACHE_MAX = 1 << 18  # pre-token -> ids entries kept before the cache is emptied
_CACHE_PIECE_MAX = 1024  # longer pre-tokens (rarely repeated; a 1 MB line can be one) are not cached


class Tokenizer:
    """A byte-level BPE tokenizer from a vocabulary and merges.

    Args:
        vocab: ``{id: token bytes}``; must hold all 256 single bytes.
        merges: ``[(left bytes, right bytes), ...]`` in creation (= priority) order; both sides
            and their concatenation must be in ``vocab``.
        special_tokens: strings encoded as one id each and never split; those not in ``vocab``
            are appended with new ids (``max id + 1, ...``).

    Raises:
        ValueError: a bad id or token, a missing single byte, or a merge whose parts or result
            are not in ``vocab``.
    """

    def __init__(
        self,
        vocab: Mapping[int, bytes],
        merges: Sequence[tuple[bytes, bytes]],
        special_tokens: Sequence[str] | None = None,
    ):
        self._vocab: dict[int, bytes] = {}
        for i, tok in vocab.items():
            if not isinstance(i, int) or i < 0 or not isinstance(tok, (bytes, bytearray)):
                raise ValueError(f"vocab entries must be (non-negative int id, bytes), got ({i!r}, {tok!r})")
            self._vocab[int(i)] = bytes(tok)
        self._ids: dict[bytes, int] = {}
        for i in sorted(self._vocab):
            self._ids.setdefault(self._vocab[i], i)  # the lowest id wins for duplicate bytes

        self._special: list[str] = []
        self._special_ids: dict[str, int] = {}
        for s in special_tokens or ():
            if not isinstance(s, str) or not s:
                raise ValueError(f"special tokens must be non-empty strings, got {s!r}")
            if s in self._special_ids:
                continue
            b = s.encode("utf-8")
            if b not in self._ids:
                new = max(self._vocab, default=-1) + 1
                self._vocab[new] = b
                self._ids[b] = new
            self._special.append(s)
            self._special_ids[s] = self._ids[b]

        missing = [b for b in range(256) if bytes([b]) not in self._ids]
        if missing:
            raise ValueError(f"vocab lacks {len(missing)} single-byte tokens (first: {bytes([missing[0]])!r})")
        self._byte_ids = [self._ids[bytes([b])] for b in range(256)]

        self._merges: list[tuple[bytes, bytes]] = []
        self._ranks: dict[tuple[int, int], int] = {}  # (left id, right id) -> rank (the first, if repeated)
        self._merged: list[int] = []  # rank -> id of the merged token
        for rank, (a, b) in enumerate(merges):
            a, b = bytes(a), bytes(b)
            for part in (a, b, a + b):
                if part not in self._ids:
                    raise ValueError(f"merge {rank} ({a!r}, {b!r}): token {part!r} is not in the vocabulary")
            self._merges.append((a, b))
            self._ranks.setdefault((self._ids[a], self._ids[b]), rank)
            self._merged.append(self._ids[a + b])

        # Most new pre-tokens of ordinary text are one token (" the", " once"), and merging their
        # bytes pair by pair is most of the cost of encoding them (~6 us each). Such a pre-token is
        # looked up whole instead, as tiktoken does, but only where the merges do rebuild the token
        # from its bytes, so the lookup never changes a result. That holds for every token of GPT-2
        # and of train_bpe's vocabularies, not for every hand-made merge list (tests/test_bpe_encode.py
        # has one), so it is checked here, once per merge: about 0.3 s for GPT-2's 50,000 merges,
        # the cost of merging each token once. It pays off when worker processes (each starting
        # with an empty cache) encode a corpus, or when a long encode refills the cache.
        self._whole: dict[bytes, int] = {bytes([b]): i for b, i in enumerate(self._byte_ids)}
        byte_id = self._byte_ids.__getitem__
        for t in self._merged:
            tb = self._vocab[t]
            if tb not in self._whole and bpe_merge(list(map(byte_id, tb)), self._ranks, self._merged) == [t]:
                self._whole[tb] = t
        self._setup()
        self.source_files: list[str] | None = None

    def _setup(self) -> None:
        self._special_re = special_pattern(self._special)
        self._max_special = max((len(s) for s in self._special), default=0)
        self._cache: dict[str, list[int]] = {}
        self._fingerprint: str | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for k in ("_special_re", "_cache"):
            state.pop(k)
        return state

    def __setstate__(self, state: dict) -> None:
        fp = state.get("_fingerprint")
        self.__dict__.update(state)
        self._setup()
        self._fingerprint = fp

    # ----- construction from / to files -----

    @classmethod
    def from_files(
        cls,
        vocab_path: str | os.PathLike,
        merges_path: str | os.PathLike,
        special_tokens: Sequence[str] | None = None,
    ) -> Tokenizer:
        """Load a tokenizer from GPT-2 format files (``vocab.json`` and ``merges.txt``).

        Args:
            vocab_path: JSON ``{token string: id}`` in GPT-2 byte-to-unicode form.
            merges_path: merges text, one ``left right`` per line, optional ``#version`` line.
            special_tokens: as in the constructor.

        Returns:
            the tokenizer (``source_files`` records the two paths).

        Raises:
            ValueError: unreadable or malformed files (the message names file and line).
        """
        tok = cls(read_vocab(vocab_path), read_merges(merges_path), special_tokens)
        tok.source_files = [str(vocab_path), str(merges_path)]
        return tok

    def save(self, vocab_path: str | os.PathLike, merges_path: str | os.PathLike) -> None:
        """Write the vocabulary (special tokens included) and merges in GPT-2 format, atomically.

        Args:
            vocab_path: destination ``vocab.json``.
            merges_path: destination ``merges.txt``.

        Raises:
            ValueError: two ids share the same bytes (JSON cannot hold both).
        """
        write_vocab(vocab_path, self._vocab)
        write_merges(merges_path, self._merges)

    # ----- properties and lookups -----

    @property
    def vocab(self) -> Mapping[int, bytes]:
        """Read-only ``{id: bytes}`` view, special tokens included."""
        return MappingProxyType(self._vocab)

    @property
    def merges(self) -> list[tuple[bytes, bytes]]:
        """A copy of the merges in priority order."""
        return list(self._merges)

    @property
    def vocab_size(self) -> int:
        """Number of ids an embedding table needs: ``max id + 1``."""
        return max(self._vocab) + 1

    @property
    def special_tokens(self) -> list[str]:
        """The special token strings, in the order given."""
        return list(self._special)

    def token_to_id(self, token: bytes | str) -> int:
        """Return the id of a token.

        Args:
            token: the token's bytes, or a string (UTF-8 encoded).

        Returns:
            its id.

        Raises:
            KeyError: the token is not in the vocabulary.
        """
        b = token.encode("utf-8") if isinstance(token, str) else bytes(token)
        try:
            return self._ids[b]
        except KeyError:
            raise KeyError(f"token {token!r} is not in the vocabulary") from None

    def id_to_token(self, idx: int) -> bytes:
        """Return the bytes of token ``idx``.

        Raises:
            ValueError: ``idx`` is not in the vocabulary.
        """
        try:
            return self._vocab[int(idx)]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"token id {idx!r} is not in the vocabulary") from None

    @property
    def eos_id(self) -> int | None:
        """The id of ``<|endoftext|>`` if the vocabulary has it, else None."""
        return self._ids.get(EOS_TOKEN.encode("utf-8"))

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the vocabulary, merges and special tokens; ties token files to a tokenizer.

        Returns:
            64 hex characters; equal tokenizers (same ids, merges, special tokens) give equal digests.
        """
        if self._fingerprint is None:
            h = hashlib.sha256(b"flm-bpe-v1\n")
            for i in sorted(self._vocab):
                h.update(f"{i} {self._vocab[i].hex()}\n".encode())
            h.update(b"merges\n")
            for a, b in self._merges:
                h.update(f"{a.hex()} {b.hex()}\n".encode())
            h.update(b"special\n" + json.dumps(self._special).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    # ----- encoding -----

    def _bpe(self, piece: str) -> list[int]:
        """Apply the merges to one pre-token: repeatedly merge the leftmost adjacent pair of lowest
        rank (as GPT-2 and tiktoken do), until no adjacent pair has a rank. A pre-token that the
        merges turn into one token is looked up whole (same result, see ``__init__``)."""
        b = piece.encode("utf-8")
        whole = self._whole.get(b)
        if whole is not None:
            return [whole]
        ids = map(self._byte_ids.__getitem__, b)
        if len(b) < LONG_PIECE:
            return merge_short(list(ids), self._ranks, self._merged)
        return merge_long(ids, self._ranks, self._merged)  # an iterator: no list of n ints (8n bytes)

    def _encode_pieces(self, pieces: Iterable[str], out: list[int]) -> None:
        # The hot loop of encoding: for most pre-tokens one dict lookup and one list extension.
        # Names are bound to locals once (faster than attribute lookups in the loop).
        cache = self._cache
        get = cache.get
        for piece in pieces:
            ids = get(piece)
            if ids is None:
                ids = self._bpe(piece)
                if len(piece) <= _CACHE_PIECE_MAX:
                    if len(cache) >= _CACHE_MAX:
                        cache.clear()
                    cache[piece] = ids
            out += ids

    def encode(self, text: str) -> list[int]:
        """Encode a string to token ids.

        Args:
            text: the text.

        Returns:
            the ids; special tokens (longest match first) become their own ids.
        """
        out: list[int] = []
        if self._special_re is None:
            self._encode_pieces(pretokenize(text), out)
            return out
        for k, part in enumerate(self._special_re.split(text)):
            if k % 2:
                out.append(self._special_ids[part])
            elif part:
                self._encode_pieces(pretokenize(part), out)
        return out

    def _encode_prefix(self, buf: str) -> tuple[list[int], int]:
        """Encode the longest prefix of ``buf`` whose ids cannot change when text is appended.

        A special token match is final once the longest special token fits after its start; a
        regex pre-token is final once the engine looked only at characters inside the buffer
        (its end + 1 and its start + 2; the contraction and ``\\s+(?!\\S)`` alternatives look
        that far), i.e. when ``end + 2 <= len``. (``pretokenize`` gives exactly the pieces of
        ``PRETOKEN_RE.findall``, so this reasoning about the GPT-2 pattern holds for it too.)

        Returns:
            ``(ids, cut)``: the ids of ``buf[:cut]``; ``buf[cut:]`` must be encoded with what follows.
        """
        out: list[int] = []
        n, pos, limit = len(buf), 0, len(buf)
        if self._special_re is not None:
            limit = n - self._max_special + 1
            for m in self._special_re.finditer(buf):
                s, e = m.span()
                if s + self._max_special > n:
                    limit = min(limit, s)
                    break
                self._encode_pieces(pretokenize(buf[pos:s]), out)
                out.append(self._special_ids[m.group()])
                pos = e
        if limit <= pos:
            return out, pos
        text = buf[pos:limit]
        # The GPT-2 pattern matches every character, so the pieces tile ``text``: drop trailing
        # pieces until at least 2 characters are dropped; the rest ends at or before len - 2.
        pieces = pretokenize(text)
        dropped = 0
        while pieces and dropped < 2:
            dropped += len(pieces.pop())
        self._encode_pieces(pieces, out)
        return out, limit - dropped if pieces else pos

    def encode_iterable(self, iterable: Iterable[str], *, buffer_chars: int = 1 << 16) -> Iterator[int]:
        """Lazily encode a stream of strings (e.g. a file's lines), with bounded memory.

        Gives the same ids as ``encode("".join(iterable))``: text is buffered until about
        ``buffer_chars`` characters, then everything up to the last point where appended text
        can no longer change the ids is encoded and yielded; the rest waits for more text.

        Args:
            iterable: strings (chunks may cut pre-tokens or special tokens anywhere).
            buffer_chars: characters to gather before encoding (memory vs. overhead; results
                do not depend on it).

        Yields:
            token ids.
        """
        for ids in self.encode_batches(iterable, buffer_chars=buffer_chars):
            yield from ids

    def encode_batches(self, iterable: Iterable[str], *, buffer_chars: int = 1 << 16) -> Iterator[list[int]]:
        """Like :meth:`encode_iterable`, but yield the ids in lists (one per encoded buffer; faster).

        Args:
            iterable: strings.
            buffer_chars: characters to gather before encoding.

        Yields:
            lists of token ids whose concatenation is ``encode("".join(iterable))``.
        """
        pending: list[str] = []
        size = 0
        threshold = max(1, buffer_chars)
        rest = ""
        for chunk in iterable:
            pending.append(chunk)
            size += len(chunk)
            if size >= threshold:
                # One join (``rest + "".join(pending)`` copies twice), and nothing else keeps the parts:
                # on a long pre-token (megabytes without a break) every copy counts.
                pending.insert(0, rest)
                buf, pending, size, rest = "".join(pending), [], 0, ""
                ids, cut = self._encode_prefix(buf)
                rest = buf[cut:]
                # A long undecided tail (e.g. a huge whitespace run) waits for more text, not rescans.
                threshold = max(buffer_chars, len(rest))
                if ids:
                    yield ids
        pending.insert(0, rest)
        text, pending, rest = "".join(pending), [], ""
        ids = self.encode(text)
        if ids:
            yield ids

    # ----- decoding -----

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """Concatenate the bytes of the given ids.

        Args:
            ids: token ids (a list, array or tensor).

        Returns:
            the bytes.

        Raises:
            ValueError: an id is not in the vocabulary (the message names it).
        """
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        elif not isinstance(ids, (list, tuple)):
            ids = list(ids)
        vocab = self._vocab
        try:
            return b"".join([vocab[i] for i in ids])
        except (KeyError, TypeError):
            bad = next(i for i in ids if not isinstance(i, int) or i not in vocab)
            raise ValueError(f"token id {bad!r} is not in the vocabulary (vocab_size {self.vocab_size})") from None

    def decode(self, ids: Iterable[int]) -> str:
        """Decode token ids to text; invalid UTF-8 becomes U+FFFD (``errors="replace"``).

        Args:
            ids: token ids (a list, array or tensor).

        Returns:
            the text.

        Raises:
            ValueError: an id is not in the vocabulary (the message names it).
        """
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self._merges)}, special_tokens={self._special})"
