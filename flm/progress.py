"""Progress bars for long loops (downloads, BPE training, encoding, evaluation), on stderr.

:func:`progress_bar` returns a ``tqdm`` bar (``tqdm.auto``: a widget in notebooks) when stderr is
a terminal or a notebook runs the code, and otherwise a :class:`ProgressBar` that prints a plain
line at most every ``log_interval`` seconds, so CI logs and files stay short and free of ``\\r``.
Both have ``update(n)``, ``close()`` and work as context managers.

Example::

    with progress_bar(total=n_bytes, desc="train.txt") as bar:
        for chunk in chunks:
            ...
            bar.update(len(chunk))
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

__all__ = ["progress_bar", "want_progress", "ProgressBar", "format_count", "format_duration", "info"]

AUTO_PROGRESS_BYTES = 4 << 20  # inputs over this size get a bar when progress=None

_BINARY_PREFIXES = ("", "Ki", "Mi", "Gi", "Ti", "Pi")
_DECIMAL_PREFIXES = ("", "k", "M", "G", "T", "P")


def format_count(n: float, unit: str = "B") -> str:
    """Format a count for humans: binary prefixes for bytes (``"1.5 MiB"``), decimal otherwise (``"2.3k it"``).

    Args:
        n: the count (non-negative).
        unit: the unit; ``"B"`` selects binary prefixes (1024), anything else decimal ones (1000).

    Returns:
        A short string such as ``"512 B"``, ``"3.2 GiB"`` or ``"12.0k tok"``.
    """
    binary = unit == "B"
    base = 1024.0 if binary else 1000.0
    prefixes = _BINARY_PREFIXES if binary else _DECIMAL_PREFIXES
    value = float(n)
    i = 0
    while abs(value) >= base and i < len(prefixes) - 1:
        value /= base
        i += 1
    if i == 0:
        text = f"{value:.0f}" if value == int(value) else f"{value:.1f}"
        return f"{text} {unit}" if unit else text
    if binary:
        return f"{value:.1f} {prefixes[i]}{unit}"
    return f"{value:.1f}{prefixes[i]} {unit}" if unit else f"{value:.1f}{prefixes[i]}"


def format_duration(seconds: float) -> str:
    """Format a duration as ``"M:SS"`` or ``"H:MM:SS"`` (``"?"`` for an unknown or infinite one).

    Args:
        seconds: the duration in seconds.

    Returns:
        The formatted duration.
    """
    if seconds is None or seconds != seconds or seconds == float("inf") or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """A throttled, single-line progress bar with rate and ETA, written to stderr.

    Args:
        total: the expected final count, or ``None`` when unknown (no percentage or ETA then).
        desc: a short label shown first (e.g. a file name).
        unit: the unit of the count; ``"B"`` (bytes) is shown with binary prefixes.
        enabled: when ``False`` the bar counts but never writes anything.
        initial: the count already done (e.g. the size of a resumed partial download); it is
            shown, but excluded from the rate.
        file: the stream to write to; ``None`` means ``sys.stderr`` at the time of each write.
        min_interval: the least number of seconds between redraws on a terminal.
        log_interval: the least number of seconds between lines when the stream is not a terminal.

    Raises:
        ValueError: a negative ``total`` or ``initial``.
    """

    def __init__(
        self,
        total: int | float | None,
        desc: str = "",
        unit: str = "B",
        enabled: bool = True,
        *,
        initial: int | float = 0,
        file: TextIO | None = None,
        min_interval: float = 0.1,
        log_interval: float = 10.0,
    ) -> None:
        if total is not None and total < 0:
            raise ValueError(f"ProgressBar total must be non-negative or None, got {total!r}")
        if initial < 0:
            raise ValueError(f"ProgressBar initial must be non-negative, got {initial!r}")
        self.total = total
        self.desc = desc
        self.unit = unit
        self.enabled = enabled
        self.n = initial
        self._initial = initial
        self._file = file
        self._min_interval = min_interval
        self._log_interval = log_interval
        self._start = time.monotonic()
        self._last_draw = float("-inf")
        self._last_len = 0
        self._last_drawn_n: int | float | None = None
        self._closed = False

    # -- stream helpers -------------------------------------------------------------------------
    @property
    def file(self) -> TextIO:
        """The stream the bar writes to."""
        return self._file if self._file is not None else sys.stderr

    def _is_tty(self) -> bool:
        try:
            return bool(self.file.isatty())
        except (AttributeError, ValueError):
            return False

    # -- public API -----------------------------------------------------------------------------
    def update(self, n: int | float = 1) -> None:
        """Add ``n`` to the count and redraw if enough time has passed since the last redraw.

        Args:
            n: the amount of progress made since the last call.
        """
        self.n += n
        if not self.enabled or self._closed:
            return
        now = time.monotonic()
        interval = self._min_interval if self._is_tty() else self._log_interval
        if now - self._last_draw >= interval:
            self._draw(now)

    def close(self) -> None:
        """Draw the final state and end the line (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            self._draw(time.monotonic(), final=True)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- rendering ------------------------------------------------------------------------------
    def render(self, now: float | None = None) -> str:
        """Return the bar's current text (without line control characters).

        Args:
            now: the ``time.monotonic()`` reading to compute the rate with; ``None`` means now.

        Returns:
            A line such as ``"train.txt  45%|#########...........| 1.2 MiB/2.7 MiB [0:03<0:04, 410.0 KiB/s]"``.
        """
        now = time.monotonic() if now is None else now
        elapsed = max(now - self._start, 1e-9)
        rate = (self.n - self._initial) / elapsed
        rate_text = f"{format_count(rate, self.unit)}/s"
        prefix = f"{self.desc}  " if self.desc else ""
        if self.total:
            frac = min(max(self.n / self.total, 0.0), 1.0)
            width = 20
            filled = int(frac * width)
            bar = "#" * filled + "." * (width - filled)
            remaining = max(self.total - self.n, 0)
            eta = remaining / rate if rate > 0 else float("inf")
            return (
                f"{prefix}{frac * 100:3.0f}%|{bar}| {format_count(self.n, self.unit)}/"
                f"{format_count(self.total, self.unit)} [{format_duration(elapsed)}<{format_duration(eta)}, {rate_text}]"
            )
        return f"{prefix}{format_count(self.n, self.unit)} [{format_duration(elapsed)}, {rate_text}]"

    def _draw(self, now: float, final: bool = False) -> None:
        if final and not self._is_tty() and self._last_drawn_n == self.n:
            return  # a log line for this exact state was already written
        self._last_draw = now
        self._last_drawn_n = self.n
        text = self.render(now)
        f = self.file
        try:
            if self._is_tty():
                pad = " " * max(self._last_len - len(text), 0)
                f.write("\r" + text + pad + ("\n" if final else ""))
            else:
                f.write(text + "\n")
            f.flush()
        except (OSError, ValueError):  # a closed or broken stream must not break the work itself
            self.enabled = False
        self._last_len = len(text)


def _in_notebook() -> bool:
    return "ipykernel" in sys.modules


def _stderr_is_tty() -> bool:
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(
    total: int | float | None, desc: str = "", unit: str = "B", enabled: bool = True, *, initial: int | float = 0
) -> Any:
    """A progress bar suited to where the output goes: ``tqdm`` on a terminal or in a notebook,
    plain throttled lines (:class:`ProgressBar`) in logs and files.

    Args:
        total: expected final count, or ``None`` when unknown.
        desc: a short label (e.g. a file name).
        unit: unit of the count; ``"B"`` is shown with binary prefixes.
        enabled: ``False`` gives a bar that counts but never writes.
        initial: count already done (e.g. a resumed download), excluded from the rate.

    Returns:
        An object with ``update(n)``, ``close()`` and context-manager support.
    """
    if enabled and (_stderr_is_tty() or _in_notebook()):
        from tqdm.auto import tqdm

        binary = unit == "B"
        return tqdm(
            total=total,
            desc=desc,
            unit=unit,
            unit_scale=True,
            unit_divisor=1024 if binary else 1000,
            initial=initial,
            dynamic_ncols=True,
        )
    return ProgressBar(total, desc, unit, enabled, initial=initial)


def want_progress(progress: bool | None, size: int) -> bool:
    """Whether to show a bar: ``progress`` if given, else whether the input (``size`` bytes) is over 4 MB."""
    return bool(progress) if progress is not None else size > AUTO_PROGRESS_BYTES


def info(message: str) -> None:
    """Log a progress message on the ``flm`` logger at INFO: the ``flm`` command shows them, a
    script silences them with ``logging.getLogger("flm").setLevel(logging.WARNING)``."""
    logging.getLogger("flm").info(message)
