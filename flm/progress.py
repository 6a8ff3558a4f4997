"""Progress bars for long loops (downloads, BPE training, encoding, evaluation), on stderr.

:func:`progress_bar` returns a :class:`ProgressBar`: tqdm's bar, redrawn in place on a terminal,
and a plain line at most every ``log_interval`` seconds anywhere else, so CI logs and files stay
short and free of ``\\r`` (in a notebook, ``tqdm.auto``'s widget). Both have ``update(n)``,
``close()`` and work as context managers.

Example::

    with progress_bar(total=n_bytes, desc="train.txt") as bar:
        for chunk in chunks:
            ...
            bar.update(len(chunk))
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

from tqdm import tqdm

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


class _Lines:
    """The stream a :class:`ProgressBar` writes to off a terminal: each redraw (``\\r``, the text,
    padding) becomes one plain line, blank writes are dropped, and a stream that fails is given up on
    (the work goes on)."""

    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream

    def write(self, s: str) -> None:
        text = s.lstrip("\r").rstrip()
        if text and self.stream is not None:
            try:
                self.stream.write(text + "\n")
                self.stream.flush()
            except (OSError, ValueError):  # a closed or broken stream
                self.stream = None


class ProgressBar(tqdm):
    """A ``tqdm`` bar, redrawn in place on a terminal and written as plain throttled lines elsewhere.

    On a terminal it is tqdm's bar (``\\r`` redraws at most every ``min_interval`` seconds). In a
    file, a pipe or a CI log those redraws would pile up in one endless line, so there each redraw is
    a plain line (:meth:`render`): one at the start, then at most one every ``log_interval`` seconds,
    and the final state on ``close()`` unless that line was just written.

    Args:
        total: the expected final count, or ``None`` when unknown (no percentage or ETA then).
        desc: a short label shown first (e.g. a file name).
        unit: the unit of the count; ``"B"`` (bytes) is shown with binary prefixes.
        enabled: when ``False`` the bar counts but never writes anything.
        initial: the count already done (e.g. the size of a resumed partial download); it is
            shown, but excluded from the rate.
        file: the stream to write to; ``None`` means ``sys.stderr``.
        min_interval: the least number of seconds between redraws on a terminal.
        log_interval: the least number of seconds between lines when the stream is not a terminal.

    Raises:
        ValueError: a negative ``total`` or ``initial``.
    """

    monitor_interval = 0  # no tqdm monitor thread: miniters=1 already redraws whenever one is due

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
        stream = sys.stderr if file is None else file
        self._plain = not (enabled and _isatty(stream))
        super().__init__(
            total=total,
            desc=desc,
            unit=unit,
            initial=initial,
            file=_Lines(stream if enabled else None) if self._plain else stream,  # disabled: counts, writes nowhere
            mininterval=log_interval if self._plain else min_interval,
            miniters=1,
            position=0 if self._plain else None,  # tqdm moves the cursor for bars at other positions
            dynamic_ncols=not self._plain,
            unit_scale=True,
            unit_divisor=1024 if unit == "B" else 1000,
        )

    def close(self) -> None:
        """Draw the final state and end the line (idempotent); off a terminal, only if that state's
        line is not the last one written."""
        if getattr(self, "_plain", False) and getattr(self, "last_print_n", None) == self.n:
            self.leave = False
        super().close()

    def __str__(self) -> str:
        return self.render() if self._plain else super().__str__()

    def render(self, now: float | None = None) -> str:
        """Return the bar's plain-line text (what it writes off a terminal).

        Args:
            now: the reading of the bar's clock (``time.time()``) to compute the rate with; ``None`` means now.

        Returns:
            A line such as ``"train.txt  45%|#########...........| 1.2 MiB/2.7 MiB [0:03<0:04, 410.0 KiB/s]"``.
        """
        now = self._time() if now is None else now
        elapsed = max(now - getattr(self, "start_t", now), 1e-9)  # tqdm draws once before it sets start_t
        rate = (self.n - self.initial) / elapsed
        prefix, count = f"{self.desc}  " if self.desc else "", format_count(self.n, self.unit)
        rate_text = f"{format_count(rate, self.unit)}/s"
        if not self.total:
            return f"{prefix}{count} [{format_duration(elapsed)}, {rate_text}]"
        frac = min(max(self.n / self.total, 0.0), 1.0)
        bar = "#" * int(frac * 20) + "." * (20 - int(frac * 20))
        eta = max(self.total - self.n, 0) / rate if rate > 0 else float("inf")
        return (
            f"{prefix}{frac * 100:3.0f}%|{bar}| {count}/{format_count(self.total, self.unit)} "
            f"[{format_duration(elapsed)}<{format_duration(eta)}, {rate_text}]"
        )


def _in_notebook() -> bool:
    return "ipykernel" in sys.modules


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def progress_bar(
    total: int | float | None, desc: str = "", unit: str = "B", enabled: bool = True, *, initial: int | float = 0
) -> Any:
    """A progress bar suited to where the output goes: a :class:`ProgressBar` (tqdm's bar on a
    terminal, plain throttled lines in logs and files), or ``tqdm.auto``'s widget in a notebook.

    A bar is drawn only while the ``flm`` logger's own level is INFO or below (or unset): setting
    it higher, as ``flm --quiet`` and ``logging.getLogger("flm").setLevel(logging.WARNING)`` do,
    silences bars with the other progress messages.

    Args:
        total: expected final count, or ``None`` when unknown.
        desc: a short label (e.g. a file name).
        unit: unit of the count; ``"B"`` is shown with binary prefixes.
        enabled: ``False`` gives a bar that counts but never writes.
        initial: count already done (e.g. a resumed download), excluded from the rate.

    Returns:
        An object with ``update(n)``, ``close()`` and context-manager support.
    """
    enabled = enabled and logging.getLogger("flm").level <= logging.INFO
    if enabled and _in_notebook():
        from tqdm.auto import tqdm as auto_tqdm

        divisor = 1024 if unit == "B" else 1000
        return auto_tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=divisor, initial=initial)
    return ProgressBar(total, desc, unit, enabled, initial=initial)


def want_progress(progress: bool | None, size: int) -> bool:
    """Whether to show a bar: ``progress`` if given, else whether the input (``size`` bytes) is over 4 MB."""
    return bool(progress) if progress is not None else size > AUTO_PROGRESS_BYTES


def info(message: str) -> None:
    """Log a progress message on the ``flm`` logger at INFO: the ``flm`` command shows them, a
    script silences them with ``logging.getLogger("flm").setLevel(logging.WARNING)``."""
    logging.getLogger("flm").info(message)
