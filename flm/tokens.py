"""The token-file format: a flat little-endian ``uint16``/``uint32`` id array plus a JSON sidecar.

A tokenized corpus is one file of raw ids (readable with ``np.memmap``) and a sidecar at
``path + ".json"``::

    {"format": "flm-tokens", "version": 1, "dtype": "uint16", "count": N, "vocab_size": V,
     "tokenizer_fingerprint": "<sha256 hex>" | null, "tokenizer_files": [...] | null, "source": "..." | null}

``uint16`` holds vocabularies up to 65,536 ids, ``uint32`` the rest. :func:`write_tokens` and
``flm.tokenizer.encode_file`` write it (atomically, the sidecar last, with :func:`sidecar_dict`);
:func:`load_tokens` memory-maps it and checks size, vocabulary and tokenizer fingerprint.

Source: CS336 assignment 1 handout §5.1 (memory-mapped data sets; check the ids against the
vocabulary size).
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flm._io import atomic_write_bytes, atomic_write_json

__all__ = [
    "TOKEN_FORMAT",
    "TOKEN_FORMAT_VERSION",
    "token_dtype",
    "sidecar_path",
    "sidecar_dict",
    "read_sidecar",
    "load_tokens",
    "write_tokens",
    "positive_int",
]

TOKEN_FORMAT = "flm-tokens"
TOKEN_FORMAT_VERSION = 1
_TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
# Elements per chunk when scanning a token file for out-of-vocabulary ids (64 MiB of uint32).
_SCAN_CHUNK = 16 * 1024 * 1024


def positive_int(name: str, value: Any) -> int:
    """``value`` as a Python int if it is a positive integer (an ``int`` or anything with
    ``__index__``, such as a NumPy integer; not a bool).

    Args:
        name: the setting's name, for the message.
        value: the value to check.

    Returns:
        ``operator.index(value)``.

    Raises:
        ValueError: ``value`` is a bool, not an integer, or ``≤ 0`` (the message names ``name``).
    """
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v}")
    return v


def token_dtype(vocab_size: int) -> np.dtype:
    """The on-disk dtype for ids below ``vocab_size``: little-endian uint16 if they fit, else uint32.

    Args:
        vocab_size: number of ids (max id + 1).

    Returns:
        ``np.dtype("<u2")`` or ``np.dtype("<u4")``.

    Raises:
        ValueError: ``vocab_size`` is not positive or exceeds 2**32.
    """
    vocab_size = positive_int("vocab_size", vocab_size)
    if vocab_size > 2**32:
        raise ValueError(f"vocab_size {vocab_size} does not fit the uint32 token format")
    return _TOKEN_DTYPES["uint16"] if vocab_size <= 1 << 16 else _TOKEN_DTYPES["uint32"]


def sidecar_dict(
    count: int,
    vocab_size: int,
    *,
    tokenizer_fingerprint: str | None = None,
    tokenizer_files: Sequence[str] | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """The sidecar describing ``count`` ids below ``vocab_size`` (the one definition of its fields).

    Returns:
        The JSON-serialisable sidecar dict (see the module docstring).

    Raises:
        ValueError: as :func:`token_dtype`.
    """
    return {
        "format": TOKEN_FORMAT,
        "version": TOKEN_FORMAT_VERSION,
        "dtype": token_dtype(vocab_size).name,
        "count": int(count),
        "vocab_size": int(vocab_size),
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "tokenizer_files": [str(p) for p in tokenizer_files] if tokenizer_files else None,
        "source": source,
    }


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """Return the JSON sidecar path of a token file: ``path + ".json"``.

    Args:
        path: the token file.

    Returns:
        ``Path(str(path) + ".json")``.
    """
    return Path(os.fspath(path) + ".json")


def read_sidecar(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and validate the JSON sidecar of a token file.

    Args:
        path: the token file (not the sidecar); the sidecar is ``path + ".json"``.

    Returns:
        The sidecar as a dict with keys ``format``, ``version``, ``dtype`` (``"uint16"``/``"uint32"``),
        ``count``, ``vocab_size``, ``tokenizer_fingerprint``, ``tokenizer_files``, ``source``.

    Raises:
        FileNotFoundError: no sidecar next to ``path``.
        ValueError: the sidecar is not valid JSON or not an ``flm-tokens`` version-1 description.
    """
    sc = sidecar_path(path)
    try:
        text = sc.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no sidecar {sc} for token file {os.fspath(path)!r}; pass dtype= to load_tokens to read a raw file"
        ) from None
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"sidecar {sc} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != TOKEN_FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"sidecar {sc} is not an {TOKEN_FORMAT!r} description (format={got!r})")
    if meta.get("version") != TOKEN_FORMAT_VERSION:
        raise ValueError(
            f"sidecar {sc} has version {meta.get('version')!r}; this flm reads version {TOKEN_FORMAT_VERSION}"
        )
    if meta.get("dtype") not in _TOKEN_DTYPES:
        raise ValueError(f"sidecar {sc} has dtype {meta.get('dtype')!r}; expected one of {sorted(_TOKEN_DTYPES)}")
    for key, minimum in (("count", 0), ("vocab_size", 1)):
        v = meta.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError(f"sidecar {sc} has invalid {key} {v!r} (an integer >= {minimum} is required)")
    meta.setdefault("tokenizer_fingerprint", None)
    meta.setdefault("tokenizer_files", None)
    meta.setdefault("source", None)
    return meta


def _scan_ids(arr: np.ndarray, bound: int, path: str) -> None:
    """Raise ValueError naming the first id >= bound (or < 0), scanning ``_SCAN_CHUNK`` elements at a time."""
    signed = np.issubdtype(arr.dtype, np.signedinteger)
    for lo in range(0, arr.shape[0], _SCAN_CHUNK):
        chunk = arr[lo : lo + _SCAN_CHUNK]
        bad_hi = int(chunk.max()) >= bound
        bad_lo = signed and int(chunk.min()) < 0
        if bad_hi or bad_lo:
            mask = (chunk >= bound) | (chunk < 0) if signed else chunk >= bound
            i = int(np.argmax(mask))
            raise ValueError(
                f"token file {path!r} contains token id {int(chunk[i])} at position {lo + i}, "
                f"outside the vocabulary [0, {bound})"
            )


def load_tokens(
    path: str | os.PathLike[str],
    *,
    vocab_size: int | None = None,
    tokenizer_fingerprint: str | None = None,
    check: bool = True,
    dtype: str | np.dtype | type | None = None,
) -> np.ndarray:
    """Memory-map a token file written by ``flm.tokenizer.encode_file`` or ``write_tokens``.

    The file is opened with ``np.memmap(path, dtype=<sidecar dtype>, mode="r")``; nothing is read
    up front except (when ``check``) one bounded-memory pass that verifies every id is below the
    vocabulary size (``max()`` over chunks of 16M elements).

    Args:
        path: the token file; its sidecar is ``path + ".json"``.
        vocab_size: the model's vocabulary size; the file's recorded ``vocab_size`` must not exceed it,
            and ids are checked against it (default: the recorded ``vocab_size``).
        tokenizer_fingerprint: the sha256 hex fingerprint of the tokenizer the caller uses; when given it
            must equal the one recorded in the sidecar.
        check: scan the whole file once for out-of-vocabulary ids (one sequential read).
        dtype: for a raw file without a sidecar, its element dtype (e.g. ``"uint16"``); read little-endian.
            With a sidecar it must agree with the recorded dtype if given.

    Returns:
        A read-only ``np.memmap`` of shape ``(count,)`` (an empty ``np.ndarray`` for an empty file,
        which cannot be memory-mapped).

    Raises:
        FileNotFoundError: the token file is missing, or it has no sidecar and ``dtype`` is not given.
        ValueError: a truncated or corrupt file (size != count × itemsize, naming the file); a sidecar
            ``vocab_size`` above ``vocab_size``; a tokenizer fingerprint mismatch (naming the tokenizer the
            file was made with); an id outside ``[0, vocab_size)`` (naming the id and its position);
            a ``dtype`` that disagrees with the sidecar or is not an integer dtype.

    Source: CS336 assignment 1 handout §5.1 (memory-mapped datasets; check ids < vocab size).
    """
    path_s = os.fspath(path)
    if vocab_size is not None:
        vocab_size = positive_int("vocab_size", vocab_size)
    if not os.path.isfile(path_s):
        raise FileNotFoundError(f"token file {path_s!r} does not exist")
    size = os.path.getsize(path_s)
    has_sidecar = sidecar_path(path_s).is_file()

    if has_sidecar:
        meta = read_sidecar(path_s)
        np_dtype = _TOKEN_DTYPES[meta["dtype"]]
        if dtype is not None and np.dtype(dtype).newbyteorder("<") != np_dtype:
            raise ValueError(
                f"dtype={np.dtype(dtype).name!r} disagrees with the sidecar of {path_s!r}, which says {meta['dtype']!r}"
            )
        expected = meta["count"] * np_dtype.itemsize
        if size != expected:
            raise ValueError(
                f"token file {path_s!r} is truncated or corrupt: it has {size} bytes but its sidecar records "
                f"count {meta['count']} × {np_dtype.itemsize} bytes = {expected} bytes"
            )
        if vocab_size is not None and meta["vocab_size"] > vocab_size:
            raise ValueError(
                f"token file {path_s!r} was made with vocab_size {meta['vocab_size']}, larger than the "
                f"given vocab_size {vocab_size}"
            )
        if tokenizer_fingerprint is not None:
            recorded = meta.get("tokenizer_fingerprint")
            if recorded is None or str(recorded).lower() != str(tokenizer_fingerprint).lower():
                made_with = f"tokenizer {recorded}" if recorded else "an unrecorded tokenizer"
                files = meta.get("tokenizer_files")
                if files:
                    made_with += f" (files {files})"
                raise ValueError(
                    f"token file {path_s!r} was made with {made_with}, not the given tokenizer "
                    f"{tokenizer_fingerprint}; re-encode it with this tokenizer"
                )
        bound = vocab_size if vocab_size is not None else meta["vocab_size"]
    else:
        if dtype is None:
            read_sidecar(path_s)  # raises the FileNotFoundError that explains what to do
        np_dtype = np.dtype(dtype)
        if not np.issubdtype(np_dtype, np.integer):
            raise ValueError(f"dtype must be an integer dtype for token ids, got {np_dtype.name!r}")
        np_dtype = np_dtype.newbyteorder("<")
        if size % np_dtype.itemsize:
            raise ValueError(
                f"token file {path_s!r} is truncated or corrupt: {size} bytes is not a multiple of the "
                f"{np_dtype.name} item size {np_dtype.itemsize}"
            )
        if tokenizer_fingerprint is not None:
            raise ValueError(f"token file {path_s!r} has no sidecar, so its tokenizer fingerprint cannot be checked")
        bound = vocab_size

    if size == 0:
        return np.empty(0, dtype=np_dtype)
    arr = np.memmap(path_s, dtype=np_dtype, mode="r")
    if check and bound is not None:
        _scan_ids(arr, bound, path_s)
    return arr


def write_tokens(
    path: str | os.PathLike[str],
    ids: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    vocab_size: int,
    tokenizer_fingerprint: str | None = None,
    source: str | None = None,
    tokenizer_files: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Write in-memory token ids as a token file plus JSON sidecar (the ``encode_file`` format).

    The dtype is ``uint16`` when ``vocab_size <= 65536`` and ``uint32`` otherwise, little-endian.
    Both files are written atomically (temp file in the same directory, then ``os.replace``); an old
    sidecar is removed first and the new one written last, so a reader never sees a sidecar that
    describes other data.

    Args:
        path: the token file to write; the sidecar goes to ``path + ".json"``.
        ids: token ids, shape ``(n_tokens,)`` (a list, numpy array or tensor of integers).
        vocab_size: the tokenizer's vocabulary size; every id must be in ``[0, vocab_size)``.
        tokenizer_fingerprint: the sha256 hex fingerprint of the tokenizer, recorded in the sidecar.
        source: a description of where the text came from (e.g. its path), recorded in the sidecar.
        tokenizer_files: the tokenizer's files, recorded in the sidecar.

    Returns:
        The sidecar dict that was written.

    Raises:
        ValueError: ``ids`` not 1-D or not integers; an id outside ``[0, vocab_size)`` (naming it);
            a non-positive or too large (> 2**32) ``vocab_size``.
    """
    dtype = token_dtype(vocab_size)
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    arr = np.asarray(ids)
    if arr.size == 0:
        arr = arr.reshape(0).astype(np.int64)
    if arr.ndim != 1:
        raise ValueError(f"ids must be 1-D (n_tokens,), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ids must be integers, got dtype {arr.dtype}")
    if arr.size:
        hi, lo = int(arr.max()), int(arr.min())
        if hi >= vocab_size or lo < 0:
            bad = hi if hi >= vocab_size else lo
            pos = int(np.argmax(arr == bad))
            raise ValueError(f"token id {bad} at position {pos} is outside the vocabulary [0, {vocab_size})")
    data = np.ascontiguousarray(arr.astype(dtype, copy=False))
    meta = sidecar_dict(
        data.shape[0],
        vocab_size,
        tokenizer_fingerprint=tokenizer_fingerprint,
        tokenizer_files=tokenizer_files,
        source=source,
    )
    p = Path(os.fspath(path))
    sidecar_path(p).unlink(missing_ok=True)  # never leave a sidecar that describes other data
    atomic_write_bytes(p, data.tobytes())
    atomic_write_json(sidecar_path(p), meta)
    return meta
