"""What every ``flm`` subcommand shares: one-line errors with exit codes, logging, devices, threads.

Exit codes: 0 success, 1 a runtime failure (a corrupt file, a full disk, a NaN loss, a busy run
directory), 2 a usage error (a bad flag or setting, a missing file, an unavailable device,
settings that contradict the run directory), 130 interrupted by Ctrl-C, 143 stopped by SIGTERM
(``flm train`` finishes the step and saves a checkpoint first; SIGUSR1 makes it save one and go
on). Errors print one line
``error: …`` on stderr; ``--debug`` or ``FLM_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch

__all__ = [
    "UsageError",
    "Terminated",
    "ArgumentParser",
    "run_command",
    "setup_logging",
    "pick_device",
    "set_threads",
    "log",
    "format_error",
    "OutOfMemory",
    "is_memory_error",
    "memory_error_bytes",
    "format_bytes",
    "for_terminal",
    "plain_text",
    "warnings_to_log",
]

logger = logging.getLogger("flm")


class UsageError(ValueError):
    """A problem with what the user asked for (exit code 2): bad flags, files or settings."""


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by SIGTERM (exit code 143, ``128 + SIGTERM``)."""


_ROLE = re.compile(r":[\w:]+:`(~?)([^`<]*?)\s*(<[^>]*>)?`")


def plain_text(text: str) -> str:
    """Docstring markup as a terminal shows it: a Sphinx role becomes its target
    (``:func:`flm.nn.f``` → ``flm.nn.f``; ``:func:`~flm.nn.f``` → ``f``; ``:ref:`title <label>```
    → ``title``) and ``literal`` loses its backquotes.

    Args:
        text: reStructuredText from a docstring.

    Returns:
        The text without that markup.
    """

    def role(m: re.Match[str]) -> str:
        tilde, target, title = m.groups()
        if title is None and tilde:
            return target.rsplit(".", 1)[-1]
        return target

    return _ROLE.sub(role, text).replace("``", "")


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` with one-line errors: ``error: <message> (see <prog> --help)``, exit code 2,
    and help without docstring markup (:func:`plain_text`: descriptions come from docstrings)."""

    def format_help(self) -> str:
        """The help text, as plain text."""
        return plain_text(super().format_help())

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def log(message: str) -> None:
    """Log an informational line through the ``flm`` logger (shown by the CLI, silenceable in scripts)."""
    logger.info(message)


_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 but \t and \n, DEL, C1


def for_terminal(text: str, stream: Any) -> str:
    """``text`` as it may be written to ``stream``: on a terminal, control characters (C0 but
    ``\\n`` and ``\\t``, DEL, C1) are shown escaped (``\\x1b``) so a sample cannot move the cursor,
    recolour or reset the terminal; files and pipes get the exact text.

    Args:
        text: the text to write.
        stream: where it goes (a terminal when its ``isatty()`` says so).

    Returns:
        ``text``, escaped when ``stream`` is a terminal.
    """
    if not _CONTROLS.search(text) or not _isatty(stream):
        return text
    return _CONTROLS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _Formatter(logging.Formatter):
    """A plain-line formatter that escapes control characters when its stream is a terminal."""

    def __init__(self, fmt: str, stream: Any) -> None:
        super().__init__(fmt)
        self.stream = stream

    def format(self, record: logging.LogRecord) -> str:
        return for_terminal(super().format(record), self.stream)


def setup_logging(quiet: bool = False) -> None:
    """Send the ``flm`` logger's messages to stdout as plain lines (warnings to stderr, as
    ``warning: …``), with control characters escaped on a terminal (:func:`for_terminal`).
    ``quiet`` shows only warnings and errors, and no progress bars (:func:`flm.progress.progress_bar`
    draws none while the ``flm`` logger's level is above INFO)."""
    root = logging.getLogger("flm")
    root.handlers.clear()
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(_Formatter("%(message)s", sys.stdout))
    out.addFilter(lambda r: r.levelno < logging.WARNING)
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(_Formatter("warning: %(message)s", sys.stderr))
    err.setLevel(logging.WARNING)
    root.addHandler(out)
    root.addHandler(err)
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False


@contextlib.contextmanager
def warnings_to_log() -> Iterator[None]:
    """While a command runs, each Python warning reaches the user as one ``warning: …`` line on
    the ``flm`` logger (a ``UserWarning`` as its message, other categories prefixed with their
    name) instead of Python's two lines with the source file and the offending code. The warning
    filters are unchanged (a warning shown once still shows once); the previous
    ``warnings.showwarning`` is restored afterwards, so a library user's handling is untouched."""
    import warnings

    def show(message: Warning | str, category: type[Warning], *args: object, **kwargs: object) -> None:
        text = " ".join(str(message).split())
        logger.warning(text if category is UserWarning else f"{category.__name__}: {text}")

    previous = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def pick_device(device: str | None) -> str:
    """``"auto"``/``None`` → the best available (cuda > mps > cpu); otherwise check it exists.

    Raises:
        UsageError: the device is unknown or not available in this PyTorch build.
    """
    from flm.data import resolve_device
    from flm.train.config import default_device

    if device in (None, "auto"):
        return default_device()
    try:
        resolve_device(device)
    except ValueError as err:
        build = "" if torch.cuda.is_available() or torch.version.cuda else " (this PyTorch is a CPU-only build)"
        raise UsageError(f"--device {device}: {err}{build}") from None
    return device


def checkpoint_arg(path: str) -> Path:
    """The checkpoint a ``RUN_OR_CHECKPOINT`` argument names (a missing path is a usage error, exit 2).

    Raises:
        UsageError: the path does not exist, or is a directory without checkpoints.
    """
    from flm.runs import find_checkpoint

    try:
        return find_checkpoint(path)
    except ValueError as err:
        raise UsageError(str(err)) from None


def set_threads(threads: int | None) -> None:
    """Use ``threads`` intra-op threads (``None``: PyTorch's default, or ``OMP_NUM_THREADS``).

    Raises:
        UsageError: a non-positive count.
    """
    if threads is None:
        return
    if threads < 1:
        raise UsageError(f"--threads must be ≥ 1, got {threads}")
    torch.set_num_threads(threads)


class OutOfMemory(MemoryError):
    """Memory ran out at a stage flm can name; the message is flm's whole line (what ran out of
    memory, the allocation, and the setting to change)."""


_TORCH_ALLOC = re.compile(r"not enough memory|can't allocate memory|out of memory|bad_alloc", re.IGNORECASE)
_ALLOC_SIZE = re.compile(r"tried to allocate ([\d.]+) ?(bytes|[KMGT]i?B)", re.IGNORECASE)
_UNITS = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_UNITS.update({"KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12})


def memory_error_bytes(err: BaseException) -> int | None:
    """The size of the allocation that failed, when ``err`` is a memory error that names it.

    Args:
        err: any exception.

    Returns:
        Bytes, or ``None`` (not a memory error, or one that does not say: see :func:`is_memory_error`).
    """
    if not is_memory_error(err):
        return None
    m = _ALLOC_SIZE.search(str(err))
    if m is None:
        return None
    return int(float(m.group(1)) * _UNITS.get(m.group(2), 1))


def is_memory_error(err: BaseException) -> bool:
    """Whether ``err`` says memory ran out: Python's ``MemoryError``, torch's ``OutOfMemoryError``,
    or the ``RuntimeError`` torch's CPU allocator raises (``DefaultCPUAllocator: not enough memory``)."""
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(err, RuntimeError) and _TORCH_ALLOC.search(str(err)) is not None


def format_bytes(n: float) -> str:
    """``n`` bytes as a short decimal size: ``512 B``, ``3.4 MB``, ``82.0 GB``."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{int(n)} B"


def format_error(err: BaseException) -> str:
    """One line describing an error a user can cause (file names and OS reasons spelled out): a
    full disk says so and names the file; a memory error names the allocation."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        what = "the disk is full" if err.errno == errno.ENOSPC else "the disk quota is exhausted"
        where = f": cannot write {err.filename}" if err.filename else ""
        return f"{what}{where} ({(err.strerror or 'no space left on device').lower()}; free some space or use another --out-dir)"
    if isinstance(err, OSError) and err.strerror:
        where = f" {err.filename}" if err.filename else ""
        hint = ""
        if err.errno in (errno.EACCES, errno.EPERM):
            hint = " (check the permissions or use another --out-dir)"
        return f"{err.strerror.lower()}:{where}{hint}"
    if isinstance(err, OSError) and (m := re.fullmatch(r"(\d+) requested and (\d+) written", str(err))):
        return f"a write stopped short ({m.group(2)} of {m.group(1)} bytes written): the disk is probably full"
    if isinstance(err, OutOfMemory):
        return str(err)
    if is_memory_error(err):
        size = memory_error_bytes(err)
        what = f"could not allocate {format_bytes(size)}" if size else "an allocation failed"
        return f"out of memory: {what} (free some memory, or use a machine with more)"
    text = str(err) or type(err).__name__
    return " ".join(text.split())  # one line, whatever the message held


def run_command(handler: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a subcommand, turning what a user can cause into ``error: …`` and an exit code.

    Returns:
        The exit code (see the module docstring).
    """
    from flm._io import RunLockedError
    from flm.train import NonFiniteLossError
    from flm.train.loop import CompileError

    debug = getattr(args, "debug", False) or os.environ.get("FLM_DEBUG", "") not in ("", "0")
    try:
        with _stop_signals():
            return int(handler(args) or 0)
    except Terminated:
        if debug:
            raise
        print("error: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    except UsageError as err:
        if debug:
            raise
        print(f"error: {format_error(err)}", file=sys.stderr)
        return 2
    except (
        ValueError,
        OSError,
        RunLockedError,
        NonFiniteLossError,
        CompileError,
        MemoryError,
        torch.OutOfMemoryError,
    ) as err:
        if debug:
            raise
        print(f"error: {format_error(err)}", file=sys.stderr)
        return 1
    except Exception as err:
        if debug:
            raise
        if is_memory_error(err):  # torch's CPU allocator raises a plain RuntimeError
            print(f"error: {format_error(err)}", file=sys.stderr)
            return 1
        print(
            f"error: internal error: {type(err).__name__}: {format_error(err)} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


@contextlib.contextmanager
def _stop_signals() -> Iterator[None]:
    """While a command runs: SIGTERM raises :class:`Terminated` (so temporary files are cleaned up
    and the exit code is 143, as Ctrl-C raises ``KeyboardInterrupt``), and SIGUSR1, which would
    otherwise kill the process, is logged and ignored. The training loop installs its own handlers
    (checkpoint, then stop or continue) while it runs. Main thread only; restored afterwards."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum: int, frame: object) -> None:
        raise Terminated()

    def on_usr1(signum: int, frame: object) -> None:
        logger.warning("SIGUSR1: no training step is running, so there is no checkpoint to save; continuing")

    wanted = [(signal.SIGTERM, on_term)]
    if hasattr(signal, "SIGUSR1"):
        wanted.append((signal.SIGUSR1, on_usr1))
    previous = [(sig, signal.signal(sig, handler)) for sig, handler in wanted]
    try:
        yield
    finally:
        for sig, handler in previous:
            signal.signal(sig, handler)


def usage(message: str) -> Any:
    """Raise a :class:`UsageError` (for use in expressions)."""
    raise UsageError(message)
