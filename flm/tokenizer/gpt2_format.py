"""GPT-2's vocab/merges file format: JSON ``{token: id}`` and ``a b`` merge lines in byte-to-unicode form.

GPT-2 (Radford et al. 2019, ``encoder.py``) stores byte tokens as printable strings: each of the
256 bytes maps to one unicode character (printable ASCII/Latin-1 bytes map to themselves, the
others to ``chr(256 + k)``), so a token's bytes become a string without spaces or control
characters. ``vocab.json`` maps those strings to ids; ``merges.txt`` holds one merge per line,
``left right``, in creation order, optionally after a ``#version`` line. The CS336 fixtures and
Hugging Face ``tokenizers`` byte-level BPE files use the same format.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from flm._io import atomic_write_text

__all__ = [
    "bytes_to_unicode",
    "token_to_str",
    "str_to_token",
    "read_vocab",
    "read_merges",
    "write_vocab",
    "write_merges",
]


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table.

    Returns:
        dict mapping each byte value 0..255 to a one-character string.

    Source: GPT-2 ``encoder.py`` (``bytes_to_unicode``); re-derived here from its definition.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def token_to_str(token: bytes) -> str:
    """Write a token's bytes as its GPT-2 byte-to-unicode string.

    Args:
        token: the token's bytes.

    Returns:
        one printable character per byte.
    """
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def str_to_token(text: str) -> bytes:
    """Read a GPT-2 byte-to-unicode string back into bytes.

    Args:
        text: a token string from a GPT-2 format vocab or merges file.

    Returns:
        the token's bytes.

    Raises:
        KeyError: a character is not in the byte-to-unicode table.
    """
    table = _unicode_to_bytes()
    return bytes(table[c] for c in text)


def _read_text(path: str | os.PathLike) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


def read_vocab(path: str | os.PathLike) -> dict[int, bytes]:
    """Read a GPT-2 format ``vocab.json`` into ``{id: token bytes}``.

    Token strings with characters outside the byte-to-unicode table (added tokens written raw
    by some tools) are read as their UTF-8 bytes.

    Args:
        path: the JSON file.

    Returns:
        the vocabulary, id -> bytes.

    Raises:
        ValueError: unreadable file, invalid JSON (with its line), not an object, a
            non-integer or negative id, or an id used twice; the message names the file.
    """
    text = _read_text(path)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object {{token: id}}, got {type(raw).__name__}")
    vocab: dict[int, bytes] = {}
    for tok, idx in raw.items():
        if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0:
            raise ValueError(f"{path}: token {tok!r} has id {idx!r}; ids must be non-negative integers")
        if idx in vocab:
            raise ValueError(f"{path}: id {idx} is used by two tokens ({token_to_str(vocab[idx])!r} and {tok!r})")
        try:
            vocab[idx] = str_to_token(tok)
        except KeyError:
            vocab[idx] = tok.encode("utf-8")
    return vocab


def read_merges(path: str | os.PathLike) -> list[tuple[bytes, bytes]]:
    """Read a GPT-2 format ``merges.txt`` into ``[(left bytes, right bytes), ...]``.

    A first line starting with ``#version`` and blank lines are skipped.

    Args:
        path: the merges text file.

    Returns:
        the merges in file order (= creation order = priority order).

    Raises:
        ValueError: unreadable file, or a line that is not two byte-to-unicode tokens
            separated by one space; the message names the file and line number.
    """
    merges: list[tuple[bytes, bytes]] = []
    for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
        line = line.rstrip("\r")
        if not line or (lineno == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise ValueError(f"{path}:{lineno}: expected 'left right', got {line!r}")
        try:
            merges.append((str_to_token(parts[0]), str_to_token(parts[1])))
        except KeyError as e:
            raise ValueError(f"{path}:{lineno}: character {e.args[0]!r} is not a byte-to-unicode character") from e
    return merges


def write_vocab(path: str | os.PathLike, vocab: dict[int, bytes]) -> None:
    """Write ``{id: bytes}`` as a GPT-2 format ``vocab.json`` (ids ascending), atomically.

    Args:
        path: destination file.
        vocab: the vocabulary.

    Raises:
        ValueError: two ids share the same bytes (a JSON object cannot hold both).
    """
    out: dict[str, int] = {}
    for idx in sorted(vocab):
        key = token_to_str(vocab[idx])
        if key in out:
            raise ValueError(f"{path}: ids {out[key]} and {idx} share the token {key!r}; cannot write as JSON")
        out[key] = idx
    atomic_write_text(path, json.dumps(out, ensure_ascii=False, indent=0) + "\n")


def write_merges(path: str | os.PathLike, merges: list[tuple[bytes, bytes]]) -> None:
    """Write merges as a GPT-2 format ``merges.txt`` (``#version: 0.2`` header), atomically.

    Args:
        path: destination file.
        merges: the merges in creation order.
    """
    lines = ["#version: 0.2"] + [f"{token_to_str(a)} {token_to_str(b)}" for a, b in merges]
    atomic_write_text(path, "\n".join(lines) + "\n")
