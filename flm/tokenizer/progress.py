"""A tiny progress bar on stderr (no tqdm dependency)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress", "AUTO_PROGRESS_BYTES", "want_progress"]

AUTO_PROGRESS_BYTES = 4 << 20  # inputs over this size get a bar when progress=None


def want_progress(progress: bool | None, size: int) -> bool:
    """Decide whether to show a bar: ``progress`` if given, else whether ``size`` is over 4 MB.

    Args:
        progress: True/False to force, None for automatic.
        size: input size in bytes.

    Returns:
        whether to draw a progress bar.
    """
    return bool(progress) if progress is not None else size > AUTO_PROGRESS_BYTES


class Progress:
    """A progress bar ``desc: 42% 12.0/28.5 MB 3.1 MB/s`` redrawn at most 10 times a second.

    Args:
        total: the total amount (e.g. bytes, merges).
        desc: the label.
        unit: ``"B"`` for bytes (shown in MB) or a word shown as-is (e.g. ``"merges"``).
        enabled: when False every method does nothing.
        stream: where to draw (stderr by default).
    """

    def __init__(self, total: int, desc: str, unit: str = "B", enabled: bool = True, stream: TextIO | None = None):
        self.total, self.desc, self.unit, self.enabled = max(int(total), 0), desc, unit, enabled
        self.stream = stream or sys.stderr
        self.n = 0
        self._t0 = self._last = time.perf_counter()

    def _fmt(self, x: float) -> str:
        return f"{x / 1e6:.1f}" if self.unit == "B" else f"{int(x)}"

    def update(self, k: int = 1) -> None:
        """Advance by ``k`` units and redraw if 0.1 s passed.

        Args:
            k: amount done since the last call.
        """
        self.n += k
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last >= 0.1 or self.n >= self.total:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        pct = 100.0 * self.n / self.total if self.total else 100.0
        rate = self.n / max(now - self._t0, 1e-9)
        unit = "MB" if self.unit == "B" else self.unit
        self.stream.write(
            f"\r{self.desc}: {pct:5.1f}% {self._fmt(self.n)}/{self._fmt(self.total)} {unit} {self._fmt(rate)} {unit}/s"
        )
        self.stream.flush()

    def close(self) -> None:
        """Draw the final state and end the line."""
        if self.enabled:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
