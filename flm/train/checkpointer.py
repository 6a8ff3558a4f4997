"""The checkpoints of a training run: when to save, which to keep, the best model, and where to resume.

A run directory holds periodic ``ckpt_<step>.safetensors`` files (parameters, optimiser state,
step, sampler RNG state, the run's config and the tokenizer fingerprint; the newest
``keep_checkpoints`` are kept) and ``best.safetensors`` (parameters only, plus config, step,
validation loss and tokenizer fingerprint). Two rules keep a run recoverable:

- a checkpoint whose parameters or optimiser state hold a NaN or ±inf is never written (the
  error names the last good checkpoint instead), so ``--resume`` always finds a good one;
- resuming picks the newest checkpoint that loads, verifies (CRC) and is finite, and refuses one
  whose model config or tokenizer differs from the current run's.

With ``shard=ShardSpec(...)`` (``flm train --shard``: parameters and optimiser state split over the
ranks, :mod:`flm.shard`) the same rules hold for sharded checkpoints (:mod:`flm.sharded_checkpoint`):
every rank writes its shards of ``ckpt_<step>.shards/`` (and of ``best.shards/``) in parallel, then
after ``barrier()`` rank 0 commits the ``index.json`` and rotates; a directory without an index is
never resumed from. Ranks take every decision together: whether the state is finite, and which
checkpoint a resume takes (through ``agree``). Resuming reshards: a checkpoint saved by any number of
ranks (or an unsharded file) loads at this run's world size.

Source: CS336 assignment 1 handout §5.2 (checkpointing).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from flm import manifest
from flm.checkpoint import Checkpoint, checkpoint_name, list_checkpoints, read_header, save_checkpoint
from flm.model import TransformerConfig
from flm.progress import info
from flm.sharded_checkpoint import (
    BEST_SHARDS,
    commit,
    is_complete,
    list_all_checkpoints,
    list_sharded_checkpoints,
    load_any,
    next_generation,
    read_any_header,
    read_sharded_header,
    save_shard,
    sharded_checkpoint_name,
)
from flm.tree import all_finite

__all__ = [
    "Checkpointer",
    "NonFiniteLossError",
    "ShardSpec",
    "model_config_changes",
    "newest_loadable",
    "BEST_NAME",
    "BEST_SHARDS",
]

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


class ShardSpec(NamedTuple):
    """How a :class:`Checkpointer` saves and resumes sharded state (``flm train --shard``).

    Attributes:
        rank: this process's rank.
        world_size: number of ranks.
        full_like: the *full-size* templates ``{"params": …, "opt_state": …}`` (``meta``-device
            tensors are enough): every leaf's first dimension and the optimiser state's structure,
            which the shards alone do not tell (rank 0 records them in the index).
        barrier: waits until every rank reaches it (e.g. ``torch.distributed.barrier``).
        agree: takes this rank's flag and returns whether *every* rank's flag is true (e.g. an
            all-reduce of the flag with ``MIN``); so ranks refuse a non-finite save together, and
            a resume skips a checkpoint any rank cannot load.
    """

    rank: int
    world_size: int
    full_like: dict[str, Any]
    barrier: Callable[[], None] = lambda: None
    agree: Callable[[bool], bool] = bool


def newest_loadable(
    paths: list[Path],
    *,
    like: Any = None,
    check: Callable[[Path, dict[str, Any]], None] | None = None,
    skip: Callable[[Path, str], None],
    rank: int = 0,
    world_size: int = 1,
    agree: Callable[[bool], bool] = bool,
) -> tuple[Path, dict[str, Any], Checkpoint] | None:
    """The checkpoint a resume takes: the newest of ``paths`` whose header reads, that ``check``
    accepts, that loads with its checksum verified and that holds only finite values.

    The one rule behind :meth:`Checkpointer.resume` and ``flm train --resume``'s plan, so the plan
    names the checkpoint the loop will resume from.

    Args:
        paths: checkpoint files or sharded checkpoint directories, oldest first
            (:func:`flm.sharded_checkpoint.list_all_checkpoints`).
        like: the template :func:`flm.checkpoint.load_checkpoint` restores to (``None``: as saved);
            with ``world_size > 1``, shaped as this rank's shards.
        check: called with a readable checkpoint's path and header before it is loaded; what it
            raises ends the search (e.g. another model's settings).
        skip: called with each unusable checkpoint's path and the reason, newest first.
        rank: load this rank's shards (:func:`flm.sharded_checkpoint.load_any`) …
        world_size: … at this world size (1: the whole state).
        agree: every rank's verdict on a checkpoint, combined (true only when all ranks could load
            it), so all ranks take the same one; ``bool`` for one process.

    Returns:
        ``(path, header, checkpoint)``, or ``None`` when no checkpoint qualifies.

    Raises:
        Exception: whatever ``check`` raises.
    """
    for path in reversed(paths):
        why = ""
        try:
            header = read_any_header(path)
        except ValueError as err:
            why = str(err)
        if not agree(not why):
            skip(path, why or "another rank cannot read it")
            continue
        if check is not None:
            check(path, header)
        ckpt = None
        try:
            ckpt = load_any(path, like=like, rank=rank, world_size=world_size, verify=True)
        except ValueError as err:
            why = str(err)
        if ckpt is not None and not all_finite((ckpt.params, ckpt.opt_state)):
            why = "it holds NaN/inf values"
        if not agree(not why):
            skip(path, why or "another rank cannot load it")
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
        enabled: ``False`` (non-zero ranks of an unsharded run) writes nothing.
        log: where messages go (default: the ``flm`` logger at INFO).
        shard: save and resume sharded state (:class:`ShardSpec`): every rank calls
            :meth:`save`, :meth:`save_best` and :meth:`resume` with its own shards.
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
        shard: ShardSpec | None = None,
    ) -> None:
        self.out = Path(out_dir)
        self.shard = shard
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
        finite = all_finite(trees)
        if self.shard is not None:
            finite = bool(self.shard.agree(finite))
        if not finite:
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

        Sharded (``shard=``): every rank calls it with its shards; ``ckpt_<step>.shards/`` is written
        and committed (see :mod:`flm.sharded_checkpoint`) and, on rank 0, the oldest complete ones
        beyond ``keep`` and incomplete ones (killed saves) are removed, each only if the manifest
        shows flm wrote everything in it.

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
        if self.shard is not None:
            path = self._save_sharded(
                self.out / sharded_checkpoint_name(step), step, params, opt_state, meta, sampler, self.shard.full_like
            )
            self.last_good, self.last_saved_step = path, step
            if self.shard.rank == 0:
                self._rotate_sharded(path)
            self.shard.barrier()
            return path
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

    def _save_sharded(
        self,
        directory: Path,
        step: int,
        params: PyTree,
        opt_state: PyTree,
        meta: dict[str, Any],
        sampler: torch.Generator | None,
        full_like: dict[str, Any],
    ) -> Path:
        """Every rank writes its file of the next generation; after the barrier rank 0 commits."""
        spec = self.shard
        assert spec is not None
        generation = next_generation(directory)  # the committed index's + 1: the same on every rank
        save_shard(directory, spec.rank, spec.world_size, params, opt_state, generation=generation)
        spec.barrier()
        if spec.rank == 0:
            commit(
                directory,
                spec.world_size,
                step,
                like=full_like,
                config=self.run_config,
                metadata=meta,
                generator=sampler,
                generation=generation,
            )
        return directory

    def _rotate_sharded(self, current: Path) -> None:
        """Rank 0: keep the newest ``keep`` complete checkpoints (both formats), drop killed saves."""
        complete = list_all_checkpoints(self.out)
        stale = [p for p in complete[: -self.keep] if p != current]
        stale += [p for p in list_sharded_checkpoints(self.out) if p != current and not is_complete(p)]
        for old in stale:
            try:
                manifest.remove(old)  # only what flm wrote (flm.manifest), a directory as a whole
            except manifest.ForeignFilesError as err:
                self.log(f"warning: keeping {old.name}: {err}")

    def save_best(self, step: int, params: PyTree, val_loss: float) -> bool:
        """Write ``best.safetensors`` (parameters only) when ``val_loss`` beats the best so far.

        Sharded (``shard=``): every rank calls it with its parameter shards (and the same
        ``val_loss``); ``best.shards/`` gets a new generation of rank files and its index is
        replaced last, so a kill at any moment leaves the previous best model loadable.

        Returns:
            Whether it was written.
        """
        if not (math.isfinite(val_loss) and val_loss < self.best_loss):
            return False
        self.best_loss, self.best_step = val_loss, step
        finite = all_finite(params)
        if self.shard is not None:
            if self.enabled and self.shard.agree(finite):
                meta = {"val_loss": val_loss, "tokenizer_fingerprint": self.fingerprint}
                full = {"params": self.shard.full_like["params"]}
                self._save_sharded(self.out / BEST_SHARDS, step, params, None, meta, None, full)
                self.shard.barrier()
            return True
        if self.enabled and finite:
            meta = {"val_loss": val_loss, "tokenizer_fingerprint": self.fingerprint}
            save_checkpoint(self.out / BEST_NAME, params=params, step=step, config=self.run_config, metadata=meta)
        return True

    def resume(self, like: dict[str, PyTree], model_config: TransformerConfig) -> Checkpoint | None:
        """Load the newest good periodic checkpoint, or return ``None`` when there is none.

        Checkpoints that do not load, fail their checksum or hold non-finite values are skipped
        with a message (an older one is tried). The best loss so far is restored from the
        checkpoint and from ``best.safetensors`` / ``best.shards`` (a corrupt one is ignored with
        a warning naming it). Both formats are candidates (``ckpt_<step>.safetensors`` and complete
        ``ckpt_<step>.shards``); sharded (``shard=``), the state comes back as this rank's shards at
        this run's world size, whatever world size saved it.

        Args:
            like: ``{"params": …, "opt_state": …}`` templates (structure, dtype, device); sharded,
                shaped as this rank's shards.
            model_config: the current run's model; it must equal the checkpoint's.

        Raises:
            ValueError: the newest readable checkpoint was made with another model config or
                another tokenizer (naming the differences).
        """
        spec = self.shard
        found = newest_loadable(
            list_all_checkpoints(self.out),
            like=like,
            check=lambda path, header: self.check_compatible(header, model_config, path),
            skip=lambda path, why: self.log(f"warning: skipping {path.name}: {why}"),
            rank=spec.rank if spec else 0,
            world_size=spec.world_size if spec else 1,
            agree=spec.agree if spec else bool,
        )
        if found is None:
            return None
        path, _, ckpt = found
        meta = ckpt.metadata
        best = meta.get("best_val_loss")
        self.best_loss = float(best) if best is not None else math.inf
        self.best_step = meta.get("best_step")
        for best_path in (self.out / BEST_NAME, self.out / BEST_SHARDS):
            if not best_path.exists():
                continue
            try:
                b = read_sharded_header(best_path) if best_path.is_dir() else read_header(best_path)
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
