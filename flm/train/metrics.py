"""Run metrics: one JSONL file per run (plus optional TensorBoard / Weights & Biases sinks), reading
it back tolerantly, throughput and MFU, and the loss plot.

Every logged step appends one JSON object to ``RUN/metrics.jsonl``: ``step``, ``wall_time`` (s
since the run started, resumes included), ``tokens``, ``train_loss``, ``val_loss`` and
``val_perplexity`` (null unless evaluated at that step), ``lr``, ``grad_norm``,
``tokens_per_sec`` (smoothed, training time only: evaluation and checkpoint time excluded) and
``mfu`` (model FLOP utilisation against the device's peak, null when unknown).

Source: CS336 assignment 1 handout §7.1 (experiment_log: loss against steps and wall-clock time).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch

from flm import manifest
from flm._io import atomic_write_text, atomic_writer

__all__ = [
    "MetricsLogger",
    "Sink",
    "JsonlSink",
    "read_metrics",
    "truncate_metrics",
    "plot_metrics",
    "Throughput",
    "device_peak_flops",
    "StepMeter",
    "metrics_record",
]

logger = logging.getLogger("flm")

# Dense peak FLOP/s from the vendors' datasheets, by device-name substring and compute dtype
# ("bf16" = tensor cores at bf16; "fp32" = plain float32, no TF32).
_GPU_PEAKS = (
    ("H200", {"bf16": 989.4e12, "fp32": 66.9e12}),
    ("H100", {"bf16": 989.4e12, "fp32": 66.9e12}),
    ("A100", {"bf16": 312e12, "fp32": 19.5e12}),
    ("L40S", {"bf16": 362e12, "fp32": 91.6e12}),
    ("L4", {"bf16": 121e12, "fp32": 30.3e12}),
    ("A10", {"bf16": 125e12, "fp32": 31.2e12}),
    ("4090", {"bf16": 165e12, "fp32": 82.6e12}),
    ("3090", {"bf16": 71e12, "fp32": 35.6e12}),
)


def device_peak_flops(device: str | torch.device, dtype: torch.dtype | None = None) -> float | None:
    """Peak matmul FLOP/s of ``device`` for MFU: a datasheet value for known GPUs, a short
    measurement (the best of five square float32/bf16 matmuls, up to 2048², grown from 256² while the
    next size's product would take under ~0.5 s, so it stays near a second even where bf16 is
    emulated) on the CPU, ``None`` otherwise.

    The CPU measurement is only as good as the moment it is taken: if other processes share the
    cores then, the peak reads low and MFU high (above 100 % is possible); pass ``peak_flops``
    (``--peak-flops``) for a stable reference.

    Args:
        device: where the model runs.
        dtype: the compute dtype (``None``: float32).

    Returns:
        FLOP/s, or ``None`` when unknown (e.g. MPS, an unlisted GPU).
    """
    dev = torch.device(device)
    key = "bf16" if dtype == torch.bfloat16 else "fp32"
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        for part, peaks in _GPU_PEAKS:
            if part in name:
                return peaks[key]
        return None
    if dev.type != "cpu":
        return None
    # Size the measurement by a small probe first: a CPU without native bf16 multiplies bf16
    # matrices hundreds of times slower than float32, and five 2048² products then took minutes.
    n, best = 256, float("inf")
    while True:
        a = torch.randn(n, n, dtype=dtype or torch.float32)
        a @ a  # warm-up (thread pool, packing buffers)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - t0)
        if n >= 2048 or best * 8 > 0.5:  # the next size would take over ~0.5 s a product
            return 2 * n**3 / best
        n *= 2


class Throughput:
    """Smoothed training tokens/s and MFU, excluding time spent outside training steps.

    Args:
        flops_per_token: training FLOPs per token (e.g. ``train_step_flops(config, 1) / context_length``).
        peak_flops: the device's peak FLOP/s, or ``None`` (no MFU).
        smoothing: weight of the newest interval in the exponential moving average.
    """

    def __init__(self, flops_per_token: float, peak_flops: float | None, smoothing: float = 0.3) -> None:
        self.flops_per_token, self.peak_flops, self.smoothing = flops_per_token, peak_flops, smoothing
        self.rate: float | None = None
        self._mark = time.perf_counter()
        self._excluded = 0.0

    def exclude(self, seconds: float) -> None:
        """Leave ``seconds`` (an evaluation, a checkpoint) out of the current interval."""
        self._excluded += seconds

    def update(self, tokens: int) -> float:
        """Close the interval in which ``tokens`` were trained; returns the smoothed tokens/s."""
        now = time.perf_counter()
        seconds = max(now - self._mark - self._excluded, 1e-9)
        self._mark, self._excluded = now, 0.0
        if tokens == 0:  # nothing measured (e.g. only the compiling first step): keep the estimate
            return self.rate or 0.0
        rate = tokens / seconds
        self.rate = rate if self.rate is None else self.smoothing * rate + (1 - self.smoothing) * self.rate
        return self.rate

    @property
    def mfu(self) -> float | None:
        """Model FLOP utilisation of the smoothed rate (``None`` without a peak)."""
        if self.rate is None or not self.peak_flops:
            return None
        return self.rate * self.flops_per_token / self.peak_flops


class StepMeter:
    """The log interval of a run: when a metrics line is due, and the steps' metrics since the last one.

    The train step returns its metrics as device tensors; they wait here until a logged step, where
    :meth:`summarise` reads them back with one host sync (so the steps between logged steps run
    without waiting for the device).

    Args:
        interval: a metrics line every this many steps (0: only when another component asks).

    Raises:
        ValueError: a negative ``interval``.

    Source: handout §7.1 (experiment_log).
    """

    def __init__(self, interval: int) -> None:
        if interval < 0:
            raise ValueError(f"StepMeter: interval must be >= 0, got {interval}")
        self.interval = interval
        self.pending: list[dict[str, torch.Tensor]] = []

    def due(self, step: int) -> bool:
        """Whether a metrics line falls on ``step``."""
        return self.interval > 0 and step % self.interval == 0

    def add(self, metrics: dict[str, torch.Tensor]) -> None:
        """Keep one step's metrics (``loss``, ``grad_norm``, optionally ``lr``; scalars, or ``(K,)``
        for K models trained together)."""
        self.pending.append(metrics)

    def summarise(self) -> dict[str, torch.Tensor | None]:
        """Read the kept steps back (one host sync) and start a new interval.

        Returns:
            ``losses``: ``(n, ...)`` every step's loss, on the CPU; ``train_loss``: their mean over
            the steps (NaN for a model with a NaN step); ``lr`` (``None`` when the step reports
            none) and ``grad_norm``: the last step's, on the CPU.

        Raises:
            ValueError: no step since the last summary.
        """
        if not self.pending:
            raise ValueError("StepMeter.summarise: no step since the last summary")
        losses = torch.stack([p["loss"] for p in self.pending]).cpu()
        last = self.pending[-1]
        self.pending = []
        return {
            "losses": losses,
            "train_loss": losses.mean(0),
            "lr": last["lr"].cpu() if "lr" in last else None,
            "grad_norm": last["grad_norm"].cpu(),
        }


def metrics_record(
    step: int,
    *,
    wall_time: float,
    tokens: int,
    train_loss: float | None,
    lr: float | None,
    grad_norm: float | None,
    val_loss: float | None,
    val_perplexity: float | None,
    tokens_per_sec: float,
    mfu: float | None,
) -> dict[str, Any]:
    """One line of ``metrics.jsonl``: the fields in their order, rounded as written.

    Args:
        step: the logged step.
        wall_time: seconds since the run started (resumes included).
        tokens: tokens trained by this model up to ``step``.
        train_loss: the mean training loss over the steps since the last line (``None``: non-finite).
        lr: the last step's learning rate (``None``: unknown).
        grad_norm: the last step's gradient norm before clipping.
        val_loss: the validation loss at ``step``, or ``None`` when not evaluated.
        val_perplexity: ``exp(val_loss)``, or ``None``.
        tokens_per_sec: this model's smoothed training throughput.
        mfu: model FLOP utilisation, or ``None`` without a known peak.

    Returns:
        The record (``wall_time`` to ms, ``tokens_per_sec`` to 0.1, ``mfu`` to 4 digits).

    Source: handout §7.1 (experiment_log: loss against steps and wall-clock time).
    """
    return {
        "step": step,
        "wall_time": round(wall_time, 3),
        "tokens": tokens,
        "train_loss": train_loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "val_loss": val_loss,
        "val_perplexity": val_perplexity,
        "tokens_per_sec": round(tokens_per_sec, 1),
        "mfu": None if mfu is None else round(mfu, 4),
    }


class Sink(Protocol):
    """Where metric records go: ``write(record)`` for every logged step, ``close()`` at the end."""

    def write(self, record: dict[str, Any]) -> None:
        """Record one logged step (``step``, ``train_loss``, ``lr``, ``val_loss``, … as in ``metrics.jsonl``)."""
        ...

    def close(self) -> None:
        """Flush and release the sink; called once when training ends."""
        ...


class JsonlSink:
    """Append each record as one JSON line to ``path`` (flushed, so a crash loses at most one line)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "a", encoding="utf-8")
        self._head_recorded = False
        manifest.record(path, append=True)  # an append-only file: its first 4 KiB identify it (flm.manifest)

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` as one line and flush it.

        Raises:
            OSError: the write failed (a full disk, …), naming the file.
        """
        try:
            self._f.write(json.dumps(record) + "\n")
            self._f.flush()
        except OSError as err:
            self._failed = True
            if err.filename is not None:
                raise
            raise OSError(err.errno, err.strerror or str(err), str(self.path)) from err
        if not self._head_recorded:  # re-recorded until the recorded head is complete
            manifest.record(self.path, append=True)
            self._head_recorded = self._f.tell() >= 4096

    def close(self) -> None:
        """Close the file (idempotent; after a failed write, a second failure to flush is not raised
        again, so the first error is the one reported)."""
        try:
            self._f.close()
        except OSError:
            if not getattr(self, "_failed", False):
                raise
        with contextlib.suppress(OSError):
            manifest.record(self.path, append=True)


class _TensorBoardSink:
    def __init__(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        if manifest.has_manifest(log_dir.parent):  # a tracked run directory: so is its tensorboard/
            manifest.claim(log_dir)
        self._dir, self._before = log_dir, set(os.listdir(log_dir)) if log_dir.is_dir() else set()
        self._w = SummaryWriter(log_dir=str(log_dir))

    def write(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._w.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._w.close()
        for name in sorted(set(os.listdir(self._dir)) - self._before):  # the event files it wrote
            manifest.record(self._dir / name)


class _WandbSink:
    def __init__(self, project: str, config: dict[str, Any] | None, out_dir: Path) -> None:
        try:
            import wandb
        except ImportError:
            raise ValueError("--wandb needs the wandb package: pip install wandb") from None
        self._run = wandb.init(project=project, config=config, dir=str(out_dir), name=out_dir.name)

    def write(self, record: dict[str, Any]) -> None:
        self._run.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=record["step"])

    def close(self) -> None:
        self._run.finish()


class MetricsLogger:
    """The metrics of one run: ``RUN/metrics.jsonl`` plus the optional sinks, behind one ``write``.

    Args:
        out_dir: the run directory.
        tensorboard: also write to ``out_dir/tensorboard``.
        wandb: a Weights & Biases project name, or ``None``.
        run_config: the run's settings (sent to wandb).
        resume_step: when resuming, drop the lines logged after this step (written after the
            checkpoint being resumed) and a torn last line; ``None`` starts a fresh file.
        enabled: ``False`` (non-zero ranks) writes nothing.

    Raises:
        ValueError: a sink's package is missing, or the file has a corrupt line before its last.
        flm.manifest.ForeignFilesError: a fresh run would delete a ``metrics.jsonl`` flm did not write.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        tensorboard: bool = False,
        wandb: str | None = None,
        run_config: dict[str, Any] | None = None,
        resume_step: int | None = None,
        enabled: bool = True,
    ) -> None:
        self.path = Path(out_dir) / "metrics.jsonl"
        self.sinks: list[Sink] = []
        if not enabled:
            return
        if resume_step is None:
            manifest.remove(self.path)  # flm's own file only (flm.manifest)
        else:
            truncate_metrics(self.path, resume_step)
        # The optional sinks first: a missing package fails before metrics.jsonl exists.
        if tensorboard:
            self.sinks.append(_TensorBoardSink(Path(out_dir) / "tensorboard"))
        if wandb:
            self.sinks.append(_WandbSink(wandb, run_config, Path(out_dir)))
        self.sinks.insert(0, JsonlSink(self.path))

    def write(self, record: dict[str, Any]) -> None:
        """Send one record to every sink."""
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        """Close every sink (idempotent)."""
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def read_metrics(
    path: str | os.PathLike, *, warn: Callable[[str], None] | None = None, skip_corrupt: bool = False
) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` file into a list of dicts.

    A torn or garbled tail (a run killed mid-write; garbage a crash left at the end of the file:
    bytes that are not UTF-8 or lines that are not JSON objects) is dropped, with a warning
    naming the file and the lines.

    Args:
        path: the file.
        warn: where the warning goes (default: the ``flm`` logger).
        skip_corrupt: also drop (with a warning) corrupt lines before the tail instead of raising;
            for ``--resume``, where the checkpoint, not the log, is the source of truth.

    Returns:
        The records in file order.

    Raises:
        ValueError: a corrupt line followed by good ones, unless ``skip_corrupt`` (naming file and line).
        OSError: the file cannot be read.
    """
    warn = warn or logger.warning
    lines = Path(path).read_bytes().splitlines()
    parsed: list[tuple[int, dict[str, Any] | None, str]] = []
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except UnicodeDecodeError:
            parsed.append((i, None, "not UTF-8 text"))
            continue
        except ValueError as err:
            parsed.append((i, None, str(err)))
            continue
        parsed.append((i, row, ""))
    tail = len(parsed)  # the good lines end where the garbled tail begins
    while tail and parsed[tail - 1][1] is None:
        tail -= 1
    rows = []
    for i, row, why in parsed[:tail]:
        if row is None:
            if not skip_corrupt:
                raise ValueError(f"{path}:{i}: corrupt metrics line ({why})")
            warn(f"{path}: dropping corrupt line {i} ({why})")
            continue
        rows.append(row)
    if tail < len(parsed):
        first, last, why = parsed[tail][0], parsed[-1][0], parsed[tail][2]
        if first == last == len(lines):
            warn(f"{path}: dropping a torn last line {first} ({why})")
        else:
            warn(f"{path}: dropping a garbled tail, lines {first}-{len(lines)} ({why})")
    return rows


def truncate_metrics(path: str | os.PathLike, last_step: int) -> None:
    """Keep only the records up to ``last_step`` in ``path``, atomically: lines logged after that
    checkpoint go, and so do torn or corrupt lines (each dropped with a warning naming the file).

    Raises:
        OSError: the file cannot be read or rewritten.
    """
    path = Path(path)
    if not path.exists():
        return
    keep = [r for r in read_metrics(path, skip_corrupt=True) if _step_of(r) <= last_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def _step_of(record: dict[str, Any]) -> float:
    step = record.get("step", 0)
    return step if isinstance(step, (int, float)) else float("inf")  # a record without a step: dropped


def plot_metrics(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> bool:
    """Plot train and validation loss against steps and wall-clock time to ``out_png``.

    Uses matplotlib's object API (no global backend switch). Returns ``False`` without writing
    when matplotlib (the ``plot`` extra) is missing or there are no metrics yet.

    Returns:
        Whether the plot was written.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    if not Path(metrics_path).exists():
        return False
    rows = read_metrics(metrics_path)
    train = [r for r in rows if r.get("train_loss") is not None]
    val = [r for r in rows if r.get("val_loss") is not None]
    if not train and not val:
        return False
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "step", "step"), (axes[1], "wall_time", "wall-clock time (s)")):
        ax.plot([r[key] for r in train], [r["train_loss"] for r in train], label="train", lw=1)
        ax.plot([r[key] for r in val], [r["val_loss"] for r in val], "o-", label="validation", ms=3)
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_writer(out_png) as f:
        fig.savefig(f, format="png", dpi=110)
    return True
