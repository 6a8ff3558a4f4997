"""The checkpoints of a training run: when to save, which to keep, the best model, and where to resume.

A run directory holds periodic ``ckpt_<step>.safetensors`` files (parameters, optimiser state,
step, sampler RNG state, the run's config and the tokenizer fingerprint; the newest
``keep_checkpoints`` are kept) and ``best.safetensors`` (parameters only, plus config, step,
validation loss and tokenizer fingerprint). Two rules keep a run recoverable:

- a checkpoint whose parameters or optimiser state hold a NaN or ±inf is never written (the
  error names the last good checkpoint instead), so ``--resume`` always finds a good one;
- resuming picks the newest checkpoint that loads, verifies (CRC) and is finite, and refuses one
  whose model config or tokenizer differs from the current run's.

Source: CS336 assignment 1 handout §5.2 (checkpointing).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from flm import manifest
from flm.checkpoint import Checkpoint, checkpoint_name, list_checkpoints, load_checkpoint, read_header, save_checkpoint
from flm.model import TransformerConfig
from flm.progress import info
from flm.tree import all_finite

__all__ = ["Checkpointer", "NonFiniteLossError", "model_config_changes", "newest_loadable", "BEST_NAME"]

PyTree = Any
BEST_NAME = "best.safetensors"
# Fields that change how a model computes, not what its parameters mean: free to differ on resume.
_RUNTIME_FIELDS = ("attention",)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss or parameters; the message names the step and the last good checkpoint."""


def model_config_changes(saved: dict[str, Any], current: TransformerConfig) -> list[str]:
    """The model settings that differ between a saved config dict and ``current``, as
    ``"name: saved → current"`` strings (runtime-only fields such as ``attention`` ignored)."""
    now = current.to_dict()
    return [
        f"{k}: {saved.get(k)!r} → {now[k]!r}"
        for k in now
        if k not in _RUNTIME_FIELDS and saved.get(k, now[k]) != now[k]
    ]


def newest_loadable(
    paths: list[Path],
    *,
    like: Any = None,
    check: Callable[[Path, dict[str, Any]], None] | None = None,
    skip: Callable[[Path, str], None],
) -> tuple[Path, dict[str, Any], Checkpoint] | None:
    """The checkpoint a resume takes: the newest of ``paths`` whose header reads, that ``check``
    accepts, that loads with its checksum verified and that holds only finite values.

    The one rule behind :meth:`Checkpointer.resume` and ``flm train --resume``'s plan, so the plan
    names the checkpoint the loop will resume from.

    Args:
        paths: checkpoint files, oldest first (:func:`flm.checkpoint.list_checkpoints`).
        like: the template :func:`flm.checkpoint.load_checkpoint` restores to (``None``: as saved).
        check: called with a readable checkpoint's path and header before it is loaded; what it
            raises ends the search (e.g. another model's settings).
        skip: called with each unusable checkpoint's path and the reason, newest first.

    Returns:
        ``(path, header, checkpoint)``, or ``None`` when no checkpoint qualifies.

    Raises:
        Exception: whatever ``check`` raises.
    """
    for path in reversed(paths):
        try:
            header = read_header(path)
        except ValueError as err:
            skip(path, str(err))
            continue
        if check is not None:
            check(path, header)
        try:
            ckpt = load_checkpoint(path, like=like, verify=True)
        except ValueError as err:
            skip(path, str(err))
            continue
        if not all_finite((ckpt.params, ckpt.opt_state)):
            skip(path, "it holds NaN/inf values")
            continue
        return path, header, ckpt
    return None


class Checkpointer:
    """Owns a run's checkpoint interval, rotation, best model and resume point.

    Args:
        out_dir: the run directory.
        interval: save every this many steps (0: only when asked, e.g. at the end).
        keep: how many periodic checkpoints to keep (the newest).
        run_config: the run's settings, stored in every checkpoint (``config``).
        tokenizer_fingerprint: the tokenizer the run's token files were made with (stored, and
            checked on resume), or ``None``.
        enabled: ``False`` (non-zero ranks) writes nothing.
        log: where messages go (default: the ``flm`` logger at INFO).
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        interval: int,
        keep: int,
        run_config: dict[str, Any],
        tokenizer_fingerprint: str | None = None,
        enabled: bool = True,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.out = Path(out_dir)
        self.interval, self.keep, self.enabled, self.log = interval, max(1, keep), enabled, log or info
        self.run_config, self.fingerprint = run_config, tokenizer_fingerprint
        self.last_good: Path | None = None  # the newest checkpoint known to be good
        self.last_saved_step: int | None = None
        self.best_loss, self.best_step = math.inf, None

    def due(self, step: int) -> bool:
        """Whether a periodic checkpoint falls on ``step``."""
        return self.interval > 0 and step % self.interval == 0

    def last_good_text(self) -> str:
        """Where a run can resume from, for an error message: the last good checkpoint's path and
        ``--resume``, or that no checkpoint was written yet."""
        if self.last_good is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint is {self.last_good} (--resume continues from it)"

    def _check_finite(self, step: int, *trees: PyTree) -> None:
        if not all_finite(trees):
            raise NonFiniteLossError(
                f"the parameters or optimiser state became NaN/inf by step {step}; not saving them: {self.last_good_text()}"
            )

    def save(
        self,
        step: int,
        params: PyTree,
        opt_state: PyTree,
        *,
        sampler: torch.Generator | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Path | None:
        """Write ``ckpt_<step>.safetensors`` (never a non-finite one) and drop the oldest beyond ``keep``.

        Returns:
            The path written (``None`` when disabled).

        Raises:
            NonFiniteLossError: the parameters or optimiser state are not finite (nothing written;
                the message names the last good checkpoint).
        """
        if not self.enabled:  # other ranks keep count, so every rank takes the same save decisions
            self.last_saved_step = step
            return None
        self._check_finite(step, params, opt_state)
        meta = {
            "best_val_loss": self.best_loss if math.isfinite(self.best_loss) else None,
            "best_step": self.best_step,
            "tokenizer_fingerprint": self.fingerprint,
            **(metadata or {}),
        }
        path = self.out / checkpoint_name(step)
        save_checkpoint(
            path,
            params=params,
            opt_state=opt_state,
            step=step,
            config=self.run_config,
            generator=sampler,
            metadata=meta,
        )
        self.last_good, self.last_saved_step = path, step
        for old in list_checkpoints(self.out)[: -self.keep]:
            if old != path:
                try:
                    manifest.remove(old)  # only a checkpoint flm wrote (flm.manifest)
                except manifest.ForeignFilesError as err:
                    self.log(f"warning: keeping {old.name}: {err}")
        return path

    def save_best(self, step: int, params: PyTree, val_loss: float) -> bool:
        """Write ``best.safetensors`` (parameters only) when ``val_loss`` beats the best so far.

        Returns:
            Whether it was written.
        """
        if not (math.isfinite(val_loss) and val_loss < self.best_loss):
            return False
        self.best_loss, self.best_step = val_loss, step
        if self.enabled and all_finite(params):
            meta = {"val_loss": val_loss, "tokenizer_fingerprint": self.fingerprint}
            save_checkpoint(self.out / BEST_NAME, params=params, step=step, config=self.run_config, metadata=meta)
        return True

    def resume(self, like: dict[str, PyTree], model_config: TransformerConfig) -> Checkpoint | None:
        """Load the newest good periodic checkpoint, or return ``None`` when there is none.

        Checkpoints that do not load, fail their checksum or hold non-finite values are skipped
        with a message (an older one is tried). The best loss so far is restored from the
        checkpoint and from ``best.safetensors`` (a corrupt one is ignored with a warning naming it).

        Args:
            like: ``{"params": …, "opt_state": …}`` templates (structure, dtype, device).
            model_config: the current run's model; it must equal the checkpoint's.

        Raises:
            ValueError: the newest readable checkpoint was made with another model config or
                another tokenizer (naming the differences).
        """
        found = newest_loadable(
            list_checkpoints(self.out),
            like=like,
            check=lambda path, header: self.check_compatible(header, model_config, path),
            skip=lambda path, why: self.log(f"warning: skipping {path.name}: {why}"),
        )
        if found is None:
            return None
        path, _, ckpt = found
        meta = ckpt.metadata
        best = meta.get("best_val_loss")
        self.best_loss = float(best) if best is not None else math.inf
        self.best_step = meta.get("best_step")
        best_path = self.out / BEST_NAME
        if best_path.exists():
            try:
                b = read_header(best_path)
                loss = (b.get("metadata") or {}).get("val_loss")
                if loss is not None and float(loss) < self.best_loss:
                    self.best_loss, self.best_step = float(loss), b.get("step")
            except (ValueError, TypeError) as err:
                self.log(f"warning: not counting {best_path}'s validation loss as the best so far: {err}")
        self.last_good, self.last_saved_step = path, ckpt.step
        return ckpt

    def check_compatible(self, header: dict[str, Any], model_config: TransformerConfig, path: Path) -> None:
        """Check that a checkpoint belongs to this run before resuming from it.

        Args:
            header: the checkpoint's header (:func:`flm.checkpoint.read_header`).
            model_config: this run's model.
            path: the checkpoint (for the message).

        Raises:
            ValueError: the checkpoint's model settings or tokenizer fingerprint differ from this run's.
        """
        saved = header.get("config") or {}
        saved_model = saved.get("model", saved) if isinstance(saved, dict) else {}
        changes = model_config_changes(saved_model, model_config)
        if changes:
            raise ValueError(
                f"cannot resume from {path}: it was trained with other model settings ({'; '.join(changes)}); "
                "keep the run's settings, or start a new run with --overwrite or another --out-dir"
            )
        saved_fp = (header.get("metadata") or {}).get("tokenizer_fingerprint")
        if saved_fp and self.fingerprint and saved_fp != self.fingerprint:
            raise ValueError(
                f"cannot resume from {path}: it was trained with tokenizer {saved_fp[:12]}…, "
                f"the run's tokenizer is {self.fingerprint[:12]}…"
            )
