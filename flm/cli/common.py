"""What every ``flm`` subcommand shares: one-line errors with exit codes, logging, devices, threads.

Exit codes: 0 success, 1 a runtime failure (a corrupt file, a full disk, a NaN loss, a busy run
directory), 2 a usage error (a bad flag or setting, a missing file, an unavailable device,
settings that contradict the run directory), 130 interrupted by Ctrl-C. Errors print one line
``error: …`` on stderr; ``--debug`` or ``FLM_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

__all__ = [
    "UsageError",
    "ArgumentParser",
    "run_command",
    "setup_logging",
    "pick_device",
    "set_threads",
    "log",
    "format_error",
]

logger = logging.getLogger("flm")


class UsageError(ValueError):
    """A problem with what the user asked for (exit code 2): bad flags, files or settings."""


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` with one-line errors: ``error: <message> (see <prog> --help)``, exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def log(message: str) -> None:
    """Log an informational line through the ``flm`` logger (shown by the CLI, silenceable in scripts)."""
    logger.info(message)


def setup_logging(quiet: bool = False) -> None:
    """Send the ``flm`` logger's messages to stdout as plain lines (warnings to stderr)."""
    root = logging.getLogger("flm")
    root.handlers.clear()
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(logging.Formatter("%(message)s"))
    out.addFilter(lambda r: r.levelno < logging.WARNING)
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(logging.Formatter("warning: %(message)s"))
    err.setLevel(logging.WARNING)
    root.addHandler(out)
    root.addHandler(err)
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    root.propagate = False


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


def format_error(err: BaseException) -> str:
    """One line describing an error a user can cause (file names and OS reasons spelled out)."""
    if isinstance(err, OSError) and err.strerror:
        where = f" {err.filename}" if err.filename else ""
        hint = ""
        if err.errno == errno.ENOSPC:
            hint = " (free some space or use another --out-dir)"
        elif err.errno in (errno.EACCES, errno.EPERM):
            hint = " (check the permissions or use another --out-dir)"
        return f"{err.strerror.lower()}:{where}{hint}"
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return f"out of memory ({err}); try a smaller --batch-size or a larger --grad-accum-steps"
    text = str(err) or type(err).__name__
    return " ".join(text.split())  # one line, whatever the message held


def run_command(handler: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a subcommand, turning what a user can cause into ``error: …`` and an exit code.

    Returns:
        The exit code (see the module docstring).
    """
    from flm._io import RunLockedError
    from flm.train import NonFiniteLossError

    debug = getattr(args, "debug", False) or os.environ.get("FLM_DEBUG", "") not in ("", "0")
    try:
        return int(handler(args) or 0)
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
    except (ValueError, OSError, RunLockedError, NonFiniteLossError, MemoryError, torch.OutOfMemoryError) as err:
        if debug:
            raise
        print(f"error: {format_error(err)}", file=sys.stderr)
        return 1
    except Exception as err:
        if debug:
            raise
        print(
            f"error: internal error: {type(err).__name__}: {format_error(err)} (run with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


def usage(message: str) -> Any:
    """Raise a :class:`UsageError` (for use in expressions)."""
    raise UsageError(message)
