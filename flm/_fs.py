"""The file-system primitives under :mod:`flm._io` and :mod:`flm.manifest`.

A leaf module (it imports nothing of flm), so the manifest can write itself atomically and
:func:`flm._io.atomic_path` can consult the manifest before every rename without the two
importing each other: ``_fs`` → ``manifest`` → ``_io``. Everything here is re-exported by
:mod:`flm._io`, the module the rest of flm writes files through.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["TEMP_SUFFIX", "LOCK_NAME", "is_temp_name", "fsync_dir", "replacing"]

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
