"""Plots and markdown tables for experiments: learning curves by step and wall time, loss against
learning rate (the edge of stability), and results tables.

All plots use matplotlib's object API (no global backend) and are written atomically; without
matplotlib (the ``plot`` extra) they are skipped and the functions return ``False``.

Source: CS336 assignment 1 handout §7.1 (experiment_log), §7.2–7.3 (deliverables: learning curves).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flm._io import atomic_writer
from flm.train.metrics import read_metrics

__all__ = ["load_curves", "plot_curves", "plot_loss_vs_lr", "markdown_table", "fmt"]


def load_curves(runs: dict[str, str | os.PathLike]) -> dict[str, list[dict[str, Any]]]:
    """``{label: metrics rows}`` from ``{label: run directory}`` (runs without metrics are skipped)."""
    out = {}
    for label, d in runs.items():
        path = Path(d) / "metrics.jsonl"
        if path.exists():
            out[label] = read_metrics(path)
    return out


def _figure(ncols: int, width: float = 6.0) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, 4.3))
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _save(fig: Any, out_png: str | os.PathLike) -> None:
    fig.tight_layout()
    with atomic_writer(out_png) as f:
        fig.savefig(f, format="png", dpi=110)


def plot_curves(
    curves: dict[str, list[dict[str, Any]]],
    out_png: str | os.PathLike,
    *,
    title: str = "",
    ylim: tuple[float, float] | None = None,
) -> bool:
    """Validation (markers) and training (thin lines) loss per run, against steps and against wall time.

    Args:
        curves: ``{label: metrics rows}`` (see :func:`load_curves`).
        out_png: the image to write.
        title: shown above the left panel.
        ylim: the loss axis range (default: from the finite losses, clipped to 4 nats above the best).

    Returns:
        Whether the plot was written.
    """
    try:
        fig, axes = _figure(2)
    except ImportError:
        return False
    finite = [
        r[k]
        for rows in curves.values()
        for r in rows
        for k in ("train_loss", "val_loss")
        if r.get(k) is not None and math.isfinite(r[k])
    ]
    for label, rows in curves.items():
        for ax, key in zip(axes, ("step", "wall_time"), strict=True):
            tr = [(r[key], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
            va = [(r[key], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
            (line,) = ax.plot(*zip(*tr), lw=0.8, alpha=0.5) if tr else ax.plot([], [])
            if va:
                ax.plot(*zip(*va), "o-", ms=3, lw=1.2, color=line.get_color(), label=label)
            elif tr:
                line.set_label(f"{label} (no validation: diverged)")
    for ax, xlabel in zip(axes, ("step", "wall-clock time (s)"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        if ylim or finite:
            ax.set_ylim(*(ylim or (min(finite) - 0.1, min(max(finite), min(finite) + 4.0) + 0.1)))
    axes[0].set_title(title or "validation (markers) and training (lines) loss")
    axes[1].legend(fontsize=8)
    _save(fig, out_png)
    return True


def plot_loss_vs_lr(summaries: Sequence[dict[str, Any]], out_png: str | os.PathLike, *, title: str = "") -> bool:
    """Final (and best) validation loss against the peak learning rate, diverged runs marked in red.

    Args:
        summaries: dicts with ``lr``, ``final_val_loss``, ``best_val_loss``, ``diverged``.
        out_png: the image to write.
        title: the plot title.

    Returns:
        Whether the plot was written.
    """
    try:
        fig, (ax,) = _figure(1, width=6.5)
    except ImportError:
        return False
    ok = [s for s in summaries if s.get("final_val_loss") is not None]
    if ok:
        ax.plot([s["lr"] for s in ok], [s["final_val_loss"] for s in ok], "o-", label="final validation loss")
        ax.plot([s["lr"] for s in ok], [s["best_val_loss"] for s in ok], "x--", alpha=0.6, label="best validation loss")
    for s in summaries:
        if s.get("final_val_loss") is None:
            ax.axvline(s["lr"], color="r", ls=":", lw=1.2)
    if any(s.get("final_val_loss") is None for s in summaries):
        ax.plot([], [], "r:", label="diverged (NaN)")
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title or "loss against learning rate")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    _save(fig, out_png)
    return True


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats rounded, ``None`` as "—"."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}" if abs(value) >= 10**-digits else f"{value:.2e}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table (cells through :func:`fmt`)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
