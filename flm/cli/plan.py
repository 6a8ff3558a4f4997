"""``flm train``'s plan: what the command is about to do, every part checked before anything is written."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flm.config import RunConfig

__all__ = ["Plan"]


@dataclass
class Plan:
    """What ``flm train`` is about to do, all checked before anything is written.

    Attributes:
        config: the resolved run config (device resolved).
        out_dir: the run directory.
        resume: continue from the newest checkpoint.
        remove: files ``--overwrite`` will delete.
        texts: ``split -> (path, max_bytes)`` once known (a data set to download: after download).
        downloads: ``(name, split, bytes)`` still to fetch.
        resume_from: the checkpoint to continue, and its step.
        train_changes: train settings that differ from the resumed checkpoint's.
        notes: lines to print with the plan.
        auto: ``{field: reason}`` for the train settings resolved from ``"auto"`` (written to
            ``config.json`` under ``"auto"``).
        train_text_bytes: bytes of training text the run reads (the file, or its ``--train-bytes``
            prefix; a data set still to download: its pinned size), ``None`` when unknown.
        dry_run: ``--dry-run``: the plan checks write nothing (no data-file stamps).
        restart: ``--resume auto`` starts over a run that stopped before its first checkpoint
            (``remove`` holds its files).
        prefixes: ``split -> bytes`` read from a downloaded prefix of the data set's file instead of
            the whole file (:func:`flm.download.download_prefix`; not digest-verified).
    """

    config: RunConfig
    out_dir: Path
    resume: bool
    remove: list[Path] = field(default_factory=list)
    texts: dict[str, tuple[str, int | None]] = field(default_factory=dict)
    downloads: list[tuple[str, str, int | None]] = field(default_factory=list)
    resume_from: tuple[Path, int] | None = None
    train_changes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    auto: dict[str, str] = field(default_factory=dict)
    train_text_bytes: int | None = None
    dry_run: bool = False
    restart: bool = False
    prefixes: dict[str, int] = field(default_factory=dict)
