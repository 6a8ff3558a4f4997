"""Data loading for LM training: random batches from a flat token array, token files, and dataset downloads.

Source: CS336 assignment 1 handout §5.1 (data loading). A tokenized corpus is one flat array of
token ids ``x`` of length ``n``; any start ``i`` with ``0 <= i <= n - m - 1`` gives a training pair
``(x[i : i + m], x[i + 1 : i + m + 1])`` for context length ``m``. ``get_batch`` samples ``batch_size``
starts uniformly and gathers only those windows, so it works on an ``np.memmap`` of a file far larger
than memory (the handout's advice: memory-map the data, with the right dtype, and check the ids are
below the vocabulary size).

Token files (written by ``flm.tokenizer.encode_file`` or ``write_tokens``) are a raw little-endian
``uint16``/``uint32`` array plus a JSON sidecar at ``path + ".json"``::

    {"format": "flm-tokens", "version": 1, "dtype": "uint16", "count": N, "vocab_size": V,
     "tokenizer_fingerprint": "<sha256 hex>" | null, "tokenizer_files": [...] | null, "source": "..." | null}

``download`` fetches the handout's data sets (TinyStoriesV2-GPT4, the OpenWebText sample) with
resumption of partial downloads; ``python -m flm.data download tinystories DEST`` does the same.
"""

from __future__ import annotations

import argparse
import gzip
import json
import operator
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from flm.progress import ProgressBar

__all__ = [
    "get_batch",
    "load_tokens",
    "write_tokens",
    "read_sidecar",
    "sidecar_path",
    "DatasetInfo",
    "DATASETS",
    "download",
    "TOKEN_FORMAT",
    "TOKEN_FORMAT_VERSION",
]

TOKEN_FORMAT = "flm-tokens"
TOKEN_FORMAT_VERSION = 1
_TOKEN_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
# Elements per chunk when scanning a token file for out-of-vocabulary ids (64 MiB of uint32).
_SCAN_CHUNK = 16 * 1024 * 1024


# ------------------------------------------------------------------------------------------------
# Argument checks
# ------------------------------------------------------------------------------------------------
def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    try:
        v = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a positive integer, got {value!r}") from None
    if v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v}")
    return v


def _resolve_device(device: str | torch.device) -> torch.device:
    """Parse ``device`` and check it exists here, raising ``ValueError`` naming it otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
        return dev
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device {device!r} requested but MPS is not available")
        return dev
    backend = getattr(torch, dev.type, None)  # e.g. torch.xpu
    is_available = getattr(backend, "is_available", None)
    if callable(is_available) and is_available():
        return dev
    raise ValueError(f"device {device!r} is not available (supported: 'cpu', 'cuda[:i]', 'mps')")


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------
def get_batch(
    dataset: np.ndarray | torch.Tensor,
    batch_size: int,
    context_length: int,
    device: str | torch.device,
    generator: torch.Generator | None = None,
    *,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample a batch of input windows and their next-token targets from a flat token array.

    Start indices are drawn uniformly from every valid position ``0 … len(dataset) − context_length − 1``
    (inclusive) with ``torch.randint`` on the CPU ``generator`` (so a seeded generator gives the same batch
    on any device). Only the ``batch_size × (context_length + 1)`` needed elements are read, so
    ``dataset`` can be an ``np.memmap`` of a file larger than memory.

    Args:
        dataset: token ids, shape ``(n_tokens,)``; a numpy array or ``np.memmap`` of any integer dtype
            (typically ``uint16``/``uint32``/``int64``), or a 1-D integer ``torch.Tensor``.
        batch_size: number of sequences ``batch_size`` (> 0).
        context_length: sequence length ``context_length`` (> 0).
        device: where the result goes, e.g. ``"cpu"``, ``"cuda:0"``, ``"mps"``. On CUDA the host copy is
            pinned and transferred with ``non_blocking=True``.
        generator: a CPU ``torch.Generator`` for reproducible sampling; ``None`` uses the global RNG.
        vocab_size: when given, check every sampled id is in ``[0, vocab_size)`` (a cheap host-side check
            of the sampled windows only).

    Returns:
        ``(inputs, targets)``, both ``int64`` tensors of shape ``(batch_size, context_length)`` on ``device``,
        with ``inputs[b] = dataset[s_b : s_b + context_length]`` and
        ``targets[b] = dataset[s_b + 1 : s_b + context_length + 1]``.

    Raises:
        ValueError: non-positive ``batch_size``/``context_length``/``vocab_size``; a dataset that is not
            1-D or is shorter than ``context_length + 1``; an invalid or unavailable ``device``; a
            non-CPU ``generator``; a sampled id outside ``[0, vocab_size)``.
        TypeError: a dataset with a non-integer dtype.

    Source: CS336 assignment 1 handout §5.1 (data_loading).
    """
    batch_size = _positive_int("batch_size", batch_size)
    context_length = _positive_int("context_length", context_length)
    if vocab_size is not None:
        vocab_size = _positive_int("vocab_size", vocab_size)
    dev = _resolve_device(device)
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")

    is_tensor = isinstance(dataset, torch.Tensor)
    if not is_tensor and not isinstance(dataset, np.ndarray):
        dataset = np.asarray(dataset)
    if dataset.ndim != 1:
        raise ValueError(f"dataset must be 1-D (n_tokens,), got shape {tuple(dataset.shape)}")
    if is_tensor:
        if dataset.dtype.is_floating_point or dataset.dtype.is_complex or dataset.dtype == torch.bool:
            raise TypeError(f"dataset must hold integer token ids, got dtype {dataset.dtype}")
    elif not np.issubdtype(dataset.dtype, np.integer):
        raise TypeError(f"dataset must hold integer token ids, got dtype {dataset.dtype}")
    n = int(dataset.shape[0])
    if n < context_length + 1:
        raise ValueError(
            f"dataset has {n} tokens, fewer than context_length + 1 = {context_length + 1}; "
            "cannot form a single (input, target) window"
        )

    # randint's high is exclusive: starts in [0, n - context_length - 1].
    starts = torch.randint(0, n - context_length, (batch_size,), generator=generator)
    if is_tensor:
        offsets = torch.arange(context_length + 1)
        idx = (starts[:, None] + offsets).to(dataset.device)
        windows = dataset[idx].to(torch.int64)  # (batch_size, context_length + 1)
        if vocab_size is not None:
            _check_window_ids(windows, vocab_size)
        inputs, targets = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    else:
        idx = starts.numpy()[:, None] + np.arange(context_length + 1)
        windows = dataset[idx]  # fancy indexing reads only these elements, even from a memmap
        if vocab_size is not None:
            _check_window_ids(windows, vocab_size)
        inputs = torch.from_numpy(windows[:, :-1].astype(np.int64))  # astype makes them contiguous
        targets = torch.from_numpy(windows[:, 1:].astype(np.int64))
    return _to_device(inputs, dev), _to_device(targets, dev)


def _check_window_ids(windows: np.ndarray | torch.Tensor, vocab_size: int) -> None:
    hi, lo = int(windows.max()), int(windows.min())  # one sync for a device tensor; cheap on the host
    bad = hi if hi >= vocab_size else lo
    if hi >= vocab_size or lo < 0:
        raise ValueError(f"dataset contains token id {bad}, outside the vocabulary [0, {vocab_size})")


def _to_device(x: torch.Tensor, dev: torch.device) -> torch.Tensor:
    if x.device == dev:
        return x
    if dev.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(dev, non_blocking=True)
    return x.to(dev)


# ------------------------------------------------------------------------------------------------
# Token files
# ------------------------------------------------------------------------------------------------
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
        vocab_size = _positive_int("vocab_size", vocab_size)
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
            raise ValueError(
                f"token file {path_s!r} has no sidecar, so its tokenizer fingerprint cannot be checked"
            )
        bound = vocab_size

    if size == 0:
        return np.empty(0, dtype=np_dtype)
    arr = np.memmap(path_s, dtype=np_dtype, mode="r")
    if check and bound is not None:
        _scan_ids(arr, bound, path_s)
    return arr


def _atomic_write(path: Path, write: Any) -> None:
    """Write ``path`` via a temp file in the same directory and ``os.replace`` (no partial files)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


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
    vocab_size = _positive_int("vocab_size", vocab_size)
    if vocab_size > 2**32:
        raise ValueError(f"vocab_size {vocab_size} does not fit the uint32 token format")
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
    dtype_name = "uint16" if vocab_size <= 2**16 else "uint32"
    data = np.ascontiguousarray(arr.astype(_TOKEN_DTYPES[dtype_name], copy=False))
    meta = {
        "format": TOKEN_FORMAT,
        "version": TOKEN_FORMAT_VERSION,
        "dtype": dtype_name,
        "count": int(data.shape[0]),
        "vocab_size": vocab_size,
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "tokenizer_files": list(tokenizer_files) if tokenizer_files is not None else None,
        "source": source,
    }
    p = Path(os.fspath(path))
    sc = sidecar_path(p)
    try:
        sc.unlink()
    except FileNotFoundError:
        pass
    _atomic_write(p, lambda f: f.write(data.tobytes()))
    _atomic_write(sc, lambda f: f.write((json.dumps(meta, indent=2) + "\n").encode("utf-8")))
    return meta


# ------------------------------------------------------------------------------------------------
# Downloads
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetInfo:
    """Where a data set lives and how its files are stored.

    Attributes:
        base_url: the default base URL; a file's URL is ``base_url + "/" + remote file name``.
        files: split (``"train"``, ``"valid"``) → remote file name.
        gzip: whether the remote files are gzip-compressed (they are decompressed to the name
            without ``.gz``).
        description: a short human description.
    """

    base_url: str
    files: Mapping[str, str]
    gzip: bool = False
    description: str = ""

    def local_name(self, split: str) -> str:
        """The file name the split is saved under (the remote name without ``.gz`` when compressed)."""
        name = self.files[split]
        return name[: -len(".gz")] if self.gzip and name.endswith(".gz") else name


DATASETS: Mapping[str, DatasetInfo] = MappingProxyType(
    {
        "tinystories": DatasetInfo(
            base_url="https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main",
            files=MappingProxyType(
                {"train": "TinyStoriesV2-GPT4-train.txt", "valid": "TinyStoriesV2-GPT4-valid.txt"}
            ),
            gzip=False,
            description="TinyStoriesV2-GPT4 (Eldan & Li 2023), the handout's small data set",
        ),
        "owt": DatasetInfo(
            base_url="https://huggingface.co/datasets/stanford-cs336/owt-sample/resolve/main",
            files=MappingProxyType({"train": "owt_train.txt.gz", "valid": "owt_valid.txt.gz"}),
            gzip=True,
            description="the CS336 OpenWebText sample (gzip-compressed on the hub)",
        ),
    }
)

_CHUNK_BYTES = 1 << 20
_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(?:(\d+)-(\d+)|\*)\s*/\s*(\d+|\*)\s*$", re.IGNORECASE)


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``"bytes 100-199/1000"`` → ``(100, 1000)``; ``"bytes */1000"`` → ``(None, 1000)``; unknown parts → None."""
    if not value:
        return None, None
    m = _CONTENT_RANGE.match(value)
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(3)) if m.group(3) != "*" else None
    return start, total


def _int_header(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _fetch(url: str, part: Path, *, timeout: float, progress: bool, desc: str, _allow_restart: bool = True) -> int:
    """Download ``url`` into ``part``, resuming from its current size with a Range request.

    A 206 reply whose range starts at the current size is appended; a 200 reply (server ignores
    Range) restarts the file from zero. Returns the final size; raises IOError (``.part`` kept) when
    the bytes received disagree with Content-Length or the total from Content-Range.
    """
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "flm-data/1", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:
            # Range not satisfiable: the .part may already hold the whole file.
            _, total = _parse_content_range(e.headers.get("Content-Range"))
            e.close()
            if total == have:
                return have
            if _allow_restart:  # the .part is longer than the remote file: it is stale, start over
                part.unlink()
                return _fetch(url, part, timeout=timeout, progress=progress, desc=desc, _allow_restart=False)
        raise OSError(f"download of {desc} from {url} failed: HTTP {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise OSError(f"download of {desc} from {url} failed: {e.reason}") from e

    with resp:
        status = resp.status
        length = _int_header(resp.headers.get("Content-Length"))
        if status == 206 and have:
            start, total = _parse_content_range(resp.headers.get("Content-Range"))
            if start != have:
                if not _allow_restart:
                    raise OSError(f"download of {desc}: server sent range start {start}, expected {have}")
                resp.close()
                part.unlink()
                return _fetch(url, part, timeout=timeout, progress=progress, desc=desc, _allow_restart=False)
            mode = "ab"
        elif status == 200:
            have = 0  # the server ignored Range (or there was none): start from zero
            total = length
            mode = "wb"
        else:
            raise OSError(f"download of {desc} from {url} failed: unexpected HTTP status {status}")

        received = 0
        error: BaseException | None = None
        with open(part, mode) as f, ProgressBar(total, desc, unit="B", enabled=progress, initial=have) as bar:
            try:
                while True:
                    chunk = resp.read(_CHUNK_BYTES)
                    if not chunk:
                        break
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (OSError, EOFError, ValueError) as e:  # includes IncompleteRead, resets, timeouts
                error = e
    size = part.stat().st_size
    if error is not None or (length is not None and received != length) or (total is not None and size != total):
        expected = total if total is not None else (have + length if length is not None else "?")
        why = f" ({type(error).__name__}: {error})" if error is not None else ""
        raise OSError(
            f"download of {desc} from {url} is incomplete: got {size} of {expected} bytes{why}; "
            f"the partial file {part} is kept, run again to resume"
        )
    return size


def _gunzip(src: Path, dest: Path, *, progress: bool) -> None:
    """Decompress ``src`` (gzip) to ``dest`` atomically, streaming in 1 MiB chunks."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with open(src, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as gz, os.fdopen(fd, "wb") as out:
            with ProgressBar(src.stat().st_size, f"{dest.name} (gunzip)", unit="B", enabled=progress) as bar:
                pos = 0
                while True:
                    block = gz.read(_CHUNK_BYTES)
                    if not block:
                        break
                    out.write(block)
                    new_pos = raw.tell()
                    bar.update(new_pos - pos)
                    pos = new_pos
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except (OSError, EOFError, zlib.error) as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        # A size-checked download that fails to decompress is corrupt; resuming it cannot help.
        src.unlink(missing_ok=True)
        raise ValueError(f"{src.name} is not a valid gzip file ({e}); it was removed, run again to re-download") from e
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def download(
    name: str,
    dest_dir: str | os.PathLike[str],
    *,
    base_url: str | None = None,
    progress: bool = True,
    timeout: float = 60,
    splits: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Download a data set's train and valid files into ``dest_dir``, resuming partial downloads.

    Each file is fetched into ``<file>.part`` and renamed to its final name only once its size has been
    checked against Content-Length / Content-Range, so a final file is always complete and is skipped
    (no network request) when present. If a ``.part`` exists, the next call sends
    ``Range: bytes=<size>-`` and appends on a 206 reply, or restarts from zero on a 200.

    Gzip data sets (``owt``): the *compressed* bytes are downloaded (resumably) to ``<name>.gz.part``;
    once complete they are decompressed streaming to ``<name>`` (atomically) and the ``.gz.part`` removed.
    This needs the compressed size in extra disk space for a while, but keeps resumption exact.

    Args:
        name: a key of ``DATASETS`` (``"tinystories"`` or ``"owt"``).
        dest_dir: the directory to save into (created if needed).
        base_url: overrides the data set's base URL (the file name is appended); default: the
            ``FLM_DATA_BASE_URL`` environment variable, else ``DATASETS[name].base_url``.
        progress: show a progress bar on stderr.
        timeout: socket timeout in seconds for connecting and for each read.
        splits: which splits to fetch (default: all, i.e. ``("train", "valid")``).

    Returns:
        ``{"train": path, "valid": path}``: the local (decompressed) files.

    Raises:
        ValueError: an unknown ``name`` or split; a downloaded gzip file that does not decompress.
        OSError: a network or HTTP error, or a size mismatch (naming the file; the ``.part`` is kept).

    Source: CS336 assignment 1 handout §5.1 and its data set links.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known: {sorted(DATASETS)}")
    info = DATASETS[name]
    if splits is None:
        splits = tuple(info.files)
    for s in splits:
        if s not in info.files:
            raise ValueError(f"data set {name!r} has no split {s!r}; it has {sorted(info.files)}")
    base = base_url or os.environ.get("FLM_DATA_BASE_URL") or info.base_url
    base = base.rstrip("/")
    dest = Path(os.fspath(dest_dir))
    dest.mkdir(parents=True, exist_ok=True)

    out: dict[str, Path] = {}
    for split in splits:
        remote = info.files[split]
        final = dest / info.local_name(split)
        out[split] = final
        if final.is_file():  # only ever created by an atomic rename of a complete file
            continue
        url = f"{base}/{remote}"
        part = dest / f"{remote}.part"
        _fetch(url, part, timeout=timeout, progress=progress, desc=remote)
        if info.gzip:
            _gunzip(part, final, progress=progress)
            part.unlink(missing_ok=True)
        else:
            os.replace(part, final)
    return out


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flm.data", description="flm data utilities")
    sub = parser.add_subparsers(dest="command", required=True)
    dl = sub.add_parser("download", help="download a data set (resumes partial downloads)")
    dl.add_argument("name", choices=sorted(DATASETS), help="which data set")
    dl.add_argument("dest", help="directory to save into")
    dl.add_argument("--base-url", default=None, help="override the base URL (the file name is appended)")
    dl.add_argument("--timeout", type=float, default=60.0, help="socket timeout in seconds")
    dl.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        paths = download(args.name, args.dest, base_url=args.base_url, progress=not args.no_progress, timeout=args.timeout)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for split, p in paths.items():
        print(f"{split}\t{p}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
