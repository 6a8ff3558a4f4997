"""Random training batches from a flat token array (memory-mapped files welcome).

Source: CS336 assignment 1 handout §5.1 (data loading). A tokenized corpus is one flat array of
token ids ``x`` of length ``n``; any start ``i`` with ``0 <= i <= n - m - 1`` gives a training pair
``(x[i : i + m], x[i + 1 : i + m + 1])`` for context length ``m``. ``get_batch`` samples ``batch_size``
starts uniformly and gathers only those windows, so it works on an ``np.memmap`` of a file far larger
than memory (the handout's advice: memory-map the data, with the right dtype, and check the ids are
below the vocabulary size).

The token-file format lives in :mod:`flm.tokens` and the data set downloads in
:mod:`flm.download`; their public names are re-exported here.
"""

from __future__ import annotations

import numpy as np
import torch

from flm.download import DATASETS, DatasetInfo, download
from flm.tokens import (
    TOKEN_FORMAT,
    TOKEN_FORMAT_VERSION,
    load_tokens,
    positive_int,
    read_sidecar,
    sidecar_path,
    write_tokens,
)

__all__ = [
    "get_batch",
    "resolve_device",
    "load_tokens",
    "write_tokens",
    "read_sidecar",
    "sidecar_path",
    "DatasetInfo",
    "DATASETS",
    "download",
    "TOKEN_FORMAT",
    "TOKEN_FORMAT_VERSION",
]


def resolve_device(device: str | torch.device) -> torch.device:
    """Parse ``device`` and check that it exists on this machine.

    Args:
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, … or a :class:`torch.device`.

    Returns:
        The :class:`torch.device`.

    Raises:
        ValueError: naming the device, if it cannot be parsed or is not available here (no CUDA
            build or device, a CUDA index beyond the visible devices, no MPS).
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
        return dev
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device {device!r} requested but MPS is not available")
        return dev
    backend = getattr(torch, dev.type, None)  # e.g. torch.xpu
    is_available = getattr(backend, "is_available", None)
    if callable(is_available) and is_available():
        return dev
    raise ValueError(f"device {device!r} is not available (supported: 'cpu', 'cuda[:i]', 'mps')")


# ------------------------------------------------------------------------------------------------
# Batches
# ------------------------------------------------------------------------------------------------
def get_batch(
    dataset: np.ndarray | torch.Tensor,
    batch_size: int,
    context_length: int,
    device: str | torch.device,
    generator: torch.Generator | None = None,
    *,
    vocab_size: int | None = None,
    rows: slice | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample a batch of input windows and their next-token targets from a flat token array.

    Start indices are drawn uniformly from every valid position ``0 … len(dataset) − context_length − 1``
    (inclusive) with ``torch.randint`` on the CPU ``generator`` (so a seeded generator gives the same batch
    on any device). Only the ``batch_size × (context_length + 1)`` needed elements are read, so
    ``dataset`` can be an ``np.memmap`` of a file larger than memory.

    With ``rows=slice(a, b)`` all ``batch_size`` starts are still drawn (the generator advances
    exactly as without it) but only rows ``a … b − 1`` of that batch are read and returned: a
    data-parallel rank takes its share of the global batch, ``rows=slice(rank * k, (rank + 1) * k)``
    with ``k = batch_size // world_size``, and the ranks' shares put together are the batch one
    process draws from the same generator state.

    Args:
        dataset: token ids, shape ``(n_tokens,)``; a numpy array or ``np.memmap`` of any integer dtype
            (typically ``uint16``/``uint32``/``int64``), or a 1-D integer ``torch.Tensor``.
        batch_size: number of sequences ``batch_size`` (> 0).
        context_length: sequence length ``context_length`` (> 0).
        device: where the result goes, e.g. ``"cpu"``, ``"cuda:0"``, ``"mps"``. On CUDA the host copy is
            pinned and transferred with ``non_blocking=True``.
        generator: a CPU ``torch.Generator`` for reproducible sampling; ``None`` uses the global RNG.
        vocab_size: when given, check every sampled id is in ``[0, vocab_size)`` (a cheap host-side check
            of the sampled windows only).
        rows: a non-empty ``slice(a, b)`` with ``0 <= a < b <= batch_size`` (step 1): return only these
            rows of the drawn batch. ``None``: all of them.

    Returns:
        ``(inputs, targets)``, both ``int64`` tensors of shape ``(batch_size, context_length)`` on ``device``
        (``(b − a, context_length)`` with ``rows``), with ``inputs[i] = dataset[s_i : s_i + context_length]``
        and ``targets[i] = dataset[s_i + 1 : s_i + context_length + 1]`` for the selected starts ``s_i``.

    Raises:
        ValueError: non-positive ``batch_size``/``context_length``/``vocab_size``; a dataset that is not
            1-D or is shorter than ``context_length + 1``; an invalid or unavailable ``device``; a
            non-CPU ``generator``; a sampled id outside ``[0, vocab_size)``; ``rows`` not a non-empty
            step-1 slice within ``[0, batch_size)``.
        TypeError: a dataset with a non-integer dtype.

    Source: CS336 assignment 1 handout §5.1 (data_loading).
    """
    batch_size = positive_int("batch_size", batch_size)
    context_length = positive_int("context_length", context_length)
    if vocab_size is not None:
        vocab_size = positive_int("vocab_size", vocab_size)
    if rows is not None:
        _check_rows(rows, batch_size)
    dev = resolve_device(device)
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator must be a CPU torch.Generator, got one on {generator.device}")

    is_tensor = isinstance(dataset, torch.Tensor)
    if not is_tensor and not isinstance(dataset, np.ndarray):
        dataset = np.asarray(dataset)
    if dataset.ndim != 1:
        raise ValueError(f"dataset must be 1-D (n_tokens,), got shape {tuple(dataset.shape)}")
    if is_tensor:
        if dataset.dtype.is_floating_point or dataset.dtype.is_complex or dataset.dtype == torch.bool:
            raise TypeError(f"dataset must hold integer token ids, got dtype {dataset.dtype}")
    elif not np.issubdtype(dataset.dtype, np.integer):
        raise TypeError(f"dataset must hold integer token ids, got dtype {dataset.dtype}")
    n = int(dataset.shape[0])
    if n < context_length + 1:
        raise ValueError(
            f"dataset has {n} tokens, fewer than context_length + 1 = {context_length + 1}; "
            "cannot form a single (input, target) window"
        )

    # randint's high is exclusive: starts in [0, n - context_length - 1].
    starts = torch.randint(0, n - context_length, (batch_size,), generator=generator)
    if rows is not None:
        starts = starts[rows]  # the whole batch is drawn, only these rows are read
    if is_tensor:
        offsets = torch.arange(context_length + 1)
        idx = (starts[:, None] + offsets).to(dataset.device)
        windows = dataset[idx].to(torch.int64)  # (batch_size, context_length + 1)
        if vocab_size is not None:
            _check_window_ids(windows, vocab_size)
        inputs, targets = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
    else:
        idx = starts.numpy()[:, None] + np.arange(context_length + 1)
        windows = dataset[idx]  # fancy indexing reads only these elements, even from a memmap
        if vocab_size is not None:
            _check_window_ids(windows, vocab_size)
        inputs = torch.from_numpy(windows[:, :-1].astype(np.int64))  # astype makes them contiguous
        targets = torch.from_numpy(windows[:, 1:].astype(np.int64))
    return _to_device(inputs, dev), _to_device(targets, dev)


def _check_rows(rows: object, batch_size: int) -> None:
    ok = (
        isinstance(rows, slice)
        and rows.step in (None, 1)
        and all(isinstance(v, int) and not isinstance(v, bool) for v in (rows.start, rows.stop))
    )
    if not ok or not 0 <= rows.start < rows.stop <= batch_size:
        raise ValueError(
            f"rows must be a slice(a, b) with 0 <= a < b <= batch_size = {batch_size} (step 1), got {rows!r}"
        )


def _check_window_ids(windows: np.ndarray | torch.Tensor, vocab_size: int) -> None:
    hi, lo = int(windows.max()), int(windows.min())  # one sync for a device tensor; cheap on the host
    bad = hi if hi >= vocab_size else lo
    if hi >= vocab_size or lo < 0:
        raise ValueError(f"dataset contains token id {bad}, outside the vocabulary [0, {vocab_size})")


def _to_device(x: torch.Tensor, dev: torch.device) -> torch.Tensor:
    if x.device == dev:
        return x
    if dev.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(dev, non_blocking=True)
    return x.to(dev)


if __name__ == "__main__":  # the old entry point; the one command line is ``flm`` (issue 20)
    import sys

    print(
        "error: python -m flm.data is no longer a command; run: flm download … (or python -m flm download …)",
        file=sys.stderr,
    )
    sys.exit(2)
