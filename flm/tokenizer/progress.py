"""When tokenizer work shows a progress bar (the bar itself is :class:`flm.progress.ProgressBar`)."""

from __future__ import annotations

__all__ = ["AUTO_PROGRESS_BYTES", "want_progress"]

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
