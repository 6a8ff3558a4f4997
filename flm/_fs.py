"""The file-system primitives under :mod:`flm._io` and :mod:`flm.manifest`.

A leaf module (it imports nothing of flm), so the manifest can write itself atomically and
:func:`flm._io.atomic_path` can consult the manifest before every rename without the two
importing each other: ``_fs`` → ``manifest`` → ``_io``. The write primitives are re-exported by
:mod:`flm._io`, the module the rest of flm writes files through; :func:`safetensors_metadata` is
the one safetensors header reader, of :mod:`flm.checkpoint` and :mod:`flm.manifest`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["TEMP_SUFFIX", "LOCK_NAME", "is_temp_name", "fsync_dir", "replacing", "safetensors_metadata"]

TEMP_SUFFIX = ".tmp"
LOCK_NAME = ".lock"
_RUST_TEMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temporary a write in progress makes: ``.<name>.<random>.tmp`` (flm)
    or ``.tmp<6 random>`` (safetensors' writer)."""
    return (name.startswith(".") and name.endswith(TEMP_SUFFIX)) or _RUST_TEMP.fullmatch(name) is not None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename in ``directory`` durable where the platform allows it (POSIX); best effort elsewhere."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(
    path: str | os.PathLike[str], before_rename: Callable[[Path, Path], None] | None = None
) -> Iterator[Path]:
    """A temporary path beside ``path``; when the ``with`` block ends without an error the file is
    fsynced, given ordinary permissions (``0666 & ~umask``), ``before_rename(tmp, path)`` is
    called, and it is renamed over ``path`` (then the directory is fsynced). On an error, the
    hook's included, the temporary is removed and ``path`` is left as it was.

    Args:
        path: the destination; its directory must exist.
        before_rename: called with the temporary and the destination just before the rename
            (:func:`flm._io.atomic_path` passes :func:`flm.manifest.before_replace`).

    Yields:
        The temporary's path (``.<name>.<random>.tmp`` in the same directory).

    Raises:
        OSError: the directory is not writable, the disk is full, … (naming ``path`` when the
            error named no file).
        Exception: whatever ``before_rename`` raises (nothing is replaced).
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    try:
        yield Path(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        if before_rename is not None:
            before_rename(Path(tmp), target)
        os.replace(tmp, target)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        named = _name_write_error(err, target)
        if named is not None:
            raise named from err
        raise
    fsync_dir(target.parent)


def _name_write_error(err: BaseException, target: Path) -> OSError | None:
    """An ``OSError`` naming ``target`` for a failed write that named no file: a plain write or
    flush error (a full disk), or the I/O error safetensors' Rust writer reports as text
    (``… (os error 28)``); ``None`` for anything else."""
    if isinstance(err, OSError):
        if err.filename is not None or err.errno is None:
            return None
        return OSError(err.errno, err.strerror or str(err), str(target))
    if type(err).__name__ != "SafetensorError":
        return None
    m = re.search(r"\(os error (\d+)\)", str(err))
    if m is None:
        return None
    code = int(m.group(1))
    return OSError(code, os.strerror(code), str(target))


def safetensors_metadata(f: BinaryIO, size: int, *, max_header: int | None = None) -> dict[str, Any]:
    """The ``__metadata__`` dict of the safetensors file ``f``, reading only its header.

    A safetensors file starts with an 8-byte little-endian length ``n``, then ``n`` bytes of JSON:
    an object whose optional ``__metadata__`` maps strings to strings. This reads those bytes, not
    the tensors (``safetensors.safe_open`` takes only a path, and ``safetensors.torch.load``
    returns no metadata, hence a reader of flm's own).

    Args:
        f: a binary file object positioned at the file's start.
        size: the file's size in bytes (bounds ``n`` before anything is read).
        max_header: refuse a header longer than this many bytes (``None``: only the file size bounds it).

    Returns:
        The ``__metadata__`` dict, ``{}`` when the header has none.

    Raises:
        ValueError: for a corrupt header: shorter than 8 bytes, a length beyond the file (or
            ``max_header``), not JSON, or JSON that is not an object (nor its ``__metadata__``).
        OSError: the file cannot be read.

    Source: the safetensors format (https://github.com/huggingface/safetensors, "Format").
    """
    head = f.read(8)
    if len(head) < 8:
        raise ValueError(f"file is {len(head)} bytes, shorter than a safetensors header")
    n = int.from_bytes(head, "little")
    if n > size - 8:
        raise ValueError(f"header length {n} exceeds the file size {size}")
    if max_header is not None and n > max_header:
        raise ValueError(f"header length {n} exceeds the {max_header} bytes read")
    header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError(f"the safetensors header is a JSON {type(header).__name__}, not an object")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"the safetensors __metadata__ is a JSON {type(meta).__name__}, not an object")
    return meta
