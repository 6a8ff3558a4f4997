"""The multiprocessing start method for flm's tokenizer workers."""

from __future__ import annotations

import multiprocessing
import sys


def pool_context() -> multiprocessing.context.BaseContext:
    """Return the multiprocessing context used for pre-tokenization and encoding workers.

    ``fork`` on Linux (workers start in milliseconds and inherit the imported modules);
    ``spawn`` elsewhere (macOS and Windows, where fork is unsafe or missing).

    Returns:
        a multiprocessing context.
    """
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")
