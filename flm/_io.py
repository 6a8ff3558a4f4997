"""Atomic file writes, the one way flm writes a file a reader may see.

Every write goes to a temporary file in the target's directory (named ``.<name>.<random>.tmp``),
is flushed and fsynced, gets ordinary permissions (``0666 & ~umask``, i.e. 0644 under the usual
umask: ``mkstemp`` alone would make it 0600), and is renamed over the target; the directory is
then fsynced so the rename survives a power cut. A reader therefore sees the old file or the new
one, never a torn one, and an interrupted write leaves at most an orphan ``.…tmp`` file, which
:func:`remove_orphan_temps` clears at the next start. The primitives (the temporary, the rename,
:func:`fsync_dir`, :func:`is_temp_name`) live in :mod:`flm._fs`, under :mod:`flm.manifest`, and
are re-exported here; this module adds the manifest's check before every rename.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from flm import manifest
from flm._fs import LOCK_NAME, TEMP_SUFFIX, fsync_dir, is_temp_name, replacing

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_writer",
    "atomic_path",
    "fsync_dir",
    "remove_orphan_temps",
    "is_temp_name",
    "run_lock",
    "RunLockedError",
    "TEMP_SUFFIX",
    "LOCK_NAME",
]


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file that replaces ``path`` when the ``with`` block ends without an error.

    Args:
        path: the destination; its directory must exist.
        mode: ``"wb"`` (bytes) or ``"w"`` (UTF-8 text with ``\\n`` newlines).

    Yields:
        The open temporary file. On an exception (``KeyboardInterrupt`` included) it is removed
        and ``path`` is left as it was.

    Raises:
        OSError: the directory is not writable, the disk is full, …
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_writer: mode must be 'wb' or 'w', got {mode!r}")
    kw = {"encoding": "utf-8", "newline": "\n"} if mode == "w" else {}
    with atomic_path(path) as tmp, open(tmp, mode, **kw) as f:
        yield f


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (not a file object);
    when the ``with`` block ends without an error the file is fsynced, given ordinary permissions
    and renamed over ``path``; on an error it is removed and ``path`` is left as it was. In a
    directory that holds an flm manifest (:mod:`flm.manifest`) the new file is recorded first.

    Raises:
        OSError: as :func:`atomic_writer`.
        flm.manifest.ForeignFilesError: in a tracked directory, ``path`` is a link or a file flm
            did not write (nothing is replaced).
    """
    with replacing(path, manifest.before_replace) as tmp:
        yield tmp


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | Callable[[IO[bytes]], Any]) -> None:
    """Write ``data`` (bytes, or a function that writes into the open file) to ``path`` atomically.

    Raises:
        OSError: as :func:`atomic_writer`; ``path`` keeps its old content.
    """
    with atomic_writer(path, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8, ``\\n`` newlines) to ``path`` atomically.

    Raises:
        OSError: as :func:`atomic_writer`; ``path`` keeps its old content.
    """
    with atomic_writer(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON (plus a final newline) to ``path`` atomically.

    Raises:
        TypeError: ``obj`` is not JSON-serialisable (nothing is written).
        OSError: as :func:`atomic_writer`.
    """
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def remove_orphan_temps(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporaries a killed write left in ``directory``: ``.<name>.*.tmp`` files
    (atomic writes) and directories (a token file's parts while it is encoded), and the
    ``.tmp`` + 6 random characters file safetensors' own writer (Rust ``tempfile``) makes beside a checkpoint.

    Only hidden entries with these names are touched (:func:`is_temp_name`), so nothing a user
    made is removed. Call it when a run starts, while holding the run directory's lock.

    Returns:
        The removed paths.
    """
    removed = []
    d = Path(directory)
    if not d.is_dir():
        return removed
    for p in d.iterdir():
        if not is_temp_name(p.name) or p.is_symlink():
            continue
        with contextlib.suppress(FileNotFoundError):
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
            removed.append(p)
    return removed


class RunLockedError(RuntimeError):
    """Another process holds the run directory's lock (the message names its pid)."""


# Locks this process holds: resolved directory -> [open lock file, depth]. A process may take
# the same run directory's lock again (the command holds it around the library's train loop);
# flock itself would refuse a second open file description of the same file.
_HELD: dict[str, list[Any]] = {}


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on a run directory (``DIR/.lock``) for the ``with`` block.

    Two processes writing one run directory would interleave metrics and delete each other's
    checkpoints, so the second one fails at once instead. The lock is an ``fcntl.flock`` on
    ``DIR/.lock``, released by the kernel when the process dies (a stale lock file is harmless);
    the file records the holder's pid for the message, and is removed when the block ends, while
    still locked and only if ``DIR/.lock`` is still that file (a process that opened it before the
    removal sees, once it holds the lock, that the name is gone, and locks a new file). Re-entrant within a process. Where
    ``fcntl`` does not exist (Windows) the lock is advisory only: the pid is written, not enforced.

    Args:
        directory: the run directory (created if missing).

    Raises:
        RunLockedError: another process holds the lock (names its pid).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    key = str(d.resolve())
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    try:  # never through a link: a link named .lock is refused, not followed
        fd = os.open(d / LOCK_NAME, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as err:
        if (d / LOCK_NAME).is_symlink():
            raise OSError(err.errno, f"{LOCK_NAME} is a symbolic link; move it away", str(d / LOCK_NAME)) from None
        raise
    f = os.fdopen(fd, "a+", encoding="utf-8")
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover (Windows)
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                raise RunLockedError(
                    f"run directory {d} is in use by pid {holder} (another flm process); "
                    "wait for it to finish or use another --out-dir"
                ) from None
            if not _names_file(d / LOCK_NAME, f.fileno()):  # its holder removed it before we locked: retry
                f.close()
                with run_lock(d):
                    yield
                return
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        _HELD[key] = [f, 1]
        try:
            yield
        finally:
            del _HELD[key]
            # Removed while still held, and only if DIR/.lock is still this file: a process that
            # opened it before the unlink finds the name gone once it locks, and starts over.
            if _names_file(d / LOCK_NAME, f.fileno()):
                with contextlib.suppress(OSError):
                    os.unlink(d / LOCK_NAME)
    finally:
        f.close()  # closing the file releases the flock


def _names_file(path: Path, fd: int) -> bool:
    """Whether ``path`` (not followed if a link) is the open file ``fd``: same device and inode."""
    try:
        st, own = os.stat(path, follow_symlinks=False), os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
