"""Run directories: their files, their cached stages (tokenizer, token files), and loading a trained run.

A run directory (``flm train --out-dir RUN``) holds::

    config.json                the RunConfig (loads back with --config RUN/config.json)
    vocab.json, merges.txt     the BPE tokenizer (GPT-2 format), tokenizer.stamp.json
    train.tokens, valid.tokens token files (+ .json sidecars, *.stamp.json)
    ckpt_<step>.safetensors    periodic checkpoints (params + optimiser state), best.safetensors
    ckpt_<step>.shards/        the same, sharded (``flm train --shard``: one file per rank plus
    best.shards/               index.json, flm.sharded_checkpoint); ``flm consolidate`` makes a file
    metrics.jsonl, loss.png    the learning curves
    results.json, samples.txt  the final evaluation and samples
    .lock                      the lock of the process writing it
    flm-manifest.json          what flm wrote here (flm.manifest): it replaces or deletes nothing else

Each cached stage records a stamp (its inputs: file path, size and modification time, settings,
tokenizer fingerprint) and is skipped when the stamp matches. :func:`load_run` gives a trained
run back as ``(params, config, tokenizer)`` for notebooks and scripts.

Source: CS336 assignment 1 handout §2, §5–§7.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flm import manifest
from flm._io import LOCK_NAME, atomic_write_json, is_temp_name
from flm.checkpoint import is_checkpoint_name, list_checkpoints
from flm.model import TransformerConfig, check_params
from flm.progress import info
from flm.sharded_checkpoint import (
    BEST_SHARDS,
    checkpoint_step,
    is_complete,
    is_sharded_checkpoint_name,
    list_all_checkpoints,
    list_sharded_checkpoints,
    load_any,
    merge_checkpoints,
    read_any_header,
)
from flm.tokenizer import EOS_TOKEN, Tokenizer, encode_file, train_bpe
from flm.tokens import load_tokens
from flm.tree import tree_map

__all__ = [
    "RunState",
    "run_state",
    "tokenizer_stamp",
    "cached_tokenizer",
    "train_tokenizer",
    "save_tokenizer",
    "encode_prompt",
    "prepare_tokens",
    "count_tokens",
    "unigram_entropy",
    "find_checkpoint",
    "load_model",
    "load_run",
    "BEST",
    "BEST_SHARDS",
]

BEST = "best.safetensors"
_TOKENIZER_STAMP = "tokenizer.stamp.json"
# What a finished or interrupted run leaves behind; --overwrite removes exactly these.
_RUN_OUTPUTS = ("metrics.jsonl", "loss.png", "results.json", "samples.txt", BEST, BEST_SHARDS, "config.json")
# The cached stages' files: reused or replaced by a run, never removed by --overwrite.
_CACHE_FILES = ("vocab.json", "merges.txt", _TOKENIZER_STAMP) + tuple(
    f"{split}{ext}" for split in ("train", "valid") for ext in (".tokens", ".tokens.json", ".stamp.json")
)


def _is_target(name: str) -> bool:
    """Whether a run may write or delete an entry of this name (so it must be flm's own)."""
    return (
        name in _RUN_OUTPUTS
        or name in _CACHE_FILES
        or name == "tensorboard"
        or is_checkpoint_name(name)
        or is_sharded_checkpoint_name(name)
    )


@dataclass(frozen=True)
class RunState:
    """What a run directory already holds.

    Attributes:
        checkpoints: the periodic checkpoints, oldest first (files, and complete sharded
            directories).
        outputs: the other files a run writes (metrics, best model, results, config; sharded
            checkpoint directories a killed save left incomplete).
        last_step: the step of the newest checkpoint (``None`` without one).
        foreign: entries with names flm never writes: a new run refuses to start among them
            without ``--overwrite``, and never touches them.
        refused: entries with names a run writes or deletes that flm cannot show it wrote
            (:mod:`flm.manifest`: the user's own files, links, changed files): every run refuses
            them, with or without ``--overwrite``.
    """

    checkpoints: list[Path]
    outputs: list[Path]
    last_step: int | None
    foreign: list[Path] = field(default_factory=list)
    refused: list[Path] = field(default_factory=list)

    @property
    def has_run(self) -> bool:
        """Whether training state lives here (checkpoints, a best model or metrics)."""
        return bool(self.checkpoints) or any(p.name in ("metrics.jsonl", BEST, BEST_SHARDS) for p in self.outputs)

    @property
    def removable(self) -> list[Path]:
        """The files ``--overwrite`` removes (training state and its outputs; caches stay)."""
        return [*self.checkpoints, *self.outputs]


def run_state(out_dir: str | os.PathLike) -> RunState:
    """Inspect a run directory (a missing one is empty); reads only checkpoint headers and
    checks each entry a run may write or delete against the manifest (:mod:`flm.manifest`).

    Raises:
        ValueError: ``out_dir`` exists but is not a directory, or holds an invalid manifest.
    """
    d = Path(out_dir)
    if d.exists() and not d.is_dir():
        raise ValueError(f"--out-dir {d} exists and is not a directory")
    entries = sorted(d.iterdir()) if d.is_dir() else []
    refused = manifest.refused(d, [p.name for p in entries if _is_target(p.name)])
    bad = set(refused) | {p for p in entries if p.is_symlink()}
    shards = list_sharded_checkpoints(d)
    ckpts = [p for p in merge_checkpoints(list_checkpoints(d), [s for s in shards if is_complete(s)]) if p not in bad]
    outputs = [d / name for name in (*_RUN_OUTPUTS, "tensorboard") if (d / name).exists() and d / name not in bad]
    outputs = [p for p in outputs if p.name not in ("tensorboard", BEST_SHARDS) or p.is_dir()]
    outputs += [p for p in shards if p not in bad and p not in ckpts]
    last = None
    if ckpts:
        try:
            last = int(read_any_header(ckpts[-1]).get("step", 0))
        except ValueError:
            last = checkpoint_step(ckpts[-1])
    foreign = [p for p in entries if not _is_flm_entry(p.name)]
    return RunState(ckpts, outputs, last, foreign, refused)


def _is_flm_entry(name: str) -> bool:
    return (
        _is_target(name)
        or name in (LOCK_NAME, manifest.MANIFEST_NAME)
        or name.endswith((".stamp.json", ".tokens", ".tokens.json"))
        or is_temp_name(name)
    )


def _file_stamp(path: str | os.PathLike) -> dict[str, Any]:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_stamp(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def tokenizer_stamp(train_text: str | os.PathLike, vocab_size: int, train_bytes: int | None = None) -> dict[str, Any]:
    """The inputs that determine a run's tokenizer (the cache key of the tokenizer stage)."""
    return {
        "train_text": _file_stamp(train_text),
        "train_bytes": train_bytes,
        "vocab_size": vocab_size,
        "special_tokens": [EOS_TOKEN],
    }


def cached_tokenizer(out_dir: str | os.PathLike, stamp: dict[str, Any]) -> Tokenizer | None:
    """The run directory's tokenizer when its stamp equals ``stamp`` (else ``None``: retrain).

    Raises:
        ValueError: the stamp matches but ``vocab.json``/``merges.txt`` are malformed.
    """
    d = Path(out_dir)
    vocab, merges = d / "vocab.json", d / "merges.txt"
    if not (vocab.exists() and merges.exists()) or _read_stamp(d / _TOKENIZER_STAMP) != stamp:
        return None
    return Tokenizer.from_files(vocab, merges, special_tokens=[EOS_TOKEN])


def train_tokenizer(
    train_text: str | os.PathLike,
    vocab_size: int,
    *,
    train_bytes: int | None = None,
    num_workers: int | None = None,
    progress: bool | None = None,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer with ``<|endoftext|>`` in memory (nothing is written).

    Raises:
        ValueError: an unreadable or non-UTF-8 text, or a vocabulary too small.
    """
    vocab, merges = train_bpe(
        train_text, vocab_size, [EOS_TOKEN], num_workers=num_workers, progress=progress, max_bytes=train_bytes
    )
    return Tokenizer(vocab, merges, [EOS_TOKEN])


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """A prompt's token ids for sampling; an empty prompt starts from ``<|endoftext|>`` (a new document).

    Raises:
        ValueError: an empty prompt and a tokenizer without ``<|endoftext|>``.
    """
    ids = tokenizer.encode(prompt)
    if ids:
        return ids
    if tokenizer.eos_id is None:
        raise ValueError("an empty prompt needs an <|endoftext|> token to start from")
    return [tokenizer.eos_id]


def save_tokenizer(out_dir: str | os.PathLike, tokenizer: Tokenizer, stamp: dict[str, Any]) -> None:
    """Write ``vocab.json``, ``merges.txt`` and the stage's stamp (each atomically, the stamp last).

    Raises:
        flm.manifest.ForeignFilesError: one of them exists and flm did not write it (nothing written).
    """
    d = Path(out_dir)
    manifest.check_replace([d / n for n in ("vocab.json", "merges.txt", _TOKENIZER_STAMP)], where=d)
    manifest.remove(d / _TOKENIZER_STAMP)
    tokenizer.save(d / "vocab.json", d / "merges.txt")
    atomic_write_json(d / _TOKENIZER_STAMP, stamp)


def prepare_tokens(
    out_dir: str | os.PathLike,
    tokenizer: Tokenizer,
    texts: dict[str, tuple[str | os.PathLike, int | None]],
    *,
    num_workers: int | None = None,
    log: Callable[[str], None] | None = None,
    progress: bool | None = None,
) -> dict[str, np.ndarray]:
    """Encode (or reuse) ``<split>.tokens`` for each ``split -> (text, max_bytes)`` and memory-map them.

    A split is re-encoded unless its stamp (text file, byte limit, tokenizer fingerprint) matches
    and the files exist.

    Returns:
        ``{split: np.memmap}``.

    Raises:
        ValueError: an unreadable text or a corrupt token file.
        flm.manifest.ForeignFilesError: a file to be replaced is not flm's (nothing written).
    """
    out, fp = Path(out_dir), tokenizer.fingerprint()
    manifest.check_replace(
        [out / f"{split}{ext}" for split in texts for ext in (".tokens", ".tokens.json", ".stamp.json")], where=out
    )
    log = log or info
    tokens = {}
    for split, (text, max_bytes) in texts.items():
        path, stamp_path = out / f"{split}.tokens", out / f"{split}.stamp.json"
        stamp = {"text": _file_stamp(text), "max_bytes": max_bytes, "tokenizer": fp}
        if _read_stamp(stamp_path) == stamp and path.exists() and Path(f"{path}.json").exists():
            log(f"encode {split}: cached")
        else:
            for stale in (stamp_path, Path(f"{path}.json"), path):
                manifest.remove(stale)
            manifest.expect(path)  # encode_file renames its own temporary into place
            n = encode_file(tokenizer, text, path, num_workers=num_workers, progress=progress, max_bytes=max_bytes)
            manifest.record(path)
            atomic_write_json(stamp_path, stamp)
            log(f"encode {split}: {n:,} tokens")
        tokens[split] = load_tokens(path, vocab_size=tokenizer.vocab_size, tokenizer_fingerprint=fp)
    return tokens


def count_tokens(tokenizer: Tokenizer, path: str | os.PathLike, *, at_least: int | None = None) -> int:
    """Count the tokens of a text file, stopping early once ``at_least`` are seen (no file written).

    Raises:
        ValueError: the file cannot be read or is not UTF-8.
    """
    n = 0
    try:
        with open(path, encoding="utf-8") as f:
            for ids in tokenizer.encode_batches(iter(lambda: f.read(1 << 16), "")):
                n += len(ids)
                if at_least is not None and n >= at_least:
                    return n
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    return n


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the tokens' own unigram distribution: the loss of a model that ignores context."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _val_loss(path: Path) -> float:
    """A best model's recorded validation loss (``inf`` when unknown or unreadable)."""
    try:
        loss = (read_any_header(path).get("metadata") or {}).get("val_loss")
        return float(loss) if loss is not None else float("inf")
    except (ValueError, TypeError):
        return float("inf")


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint from a path: the file itself, a sharded checkpoint directory (``*.shards``), or
    a run directory's best model (``best.safetensors`` or ``best.shards``: the one with the lower
    recorded validation loss, the file on a tie) else its newest periodic checkpoint (either format).

    Args:
        path: a checkpoint file, a ``.shards`` directory or a run directory.

    Returns:
        The checkpoint's path (a file, or a complete ``.shards`` directory).

    Raises:
        ValueError: nothing there, an incomplete ``.shards`` directory (no ``index.json``), or a
            directory without checkpoints.
    """
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        if p.name.endswith(".shards"):
            read_any_header(p)  # an incomplete or foreign directory: its error, naming it
            return p
        best = [b for b in (p / BEST, p / BEST_SHARDS) if (b.is_file() if b.name == BEST else is_complete(b))]
        if best:
            return min(best, key=_val_loss)  # min keeps the first (the file) on a tie
        ckpts = list_all_checkpoints(p)
        if ckpts:
            return ckpts[-1]
        raise ValueError(
            f"{p} holds no checkpoint (no {BEST} or {BEST_SHARDS}, no ckpt_*.safetensors or ckpt_*.shards)"
        )
    raise ValueError(f"{p} does not exist")


def _model_config(saved: Any, name: str) -> TransformerConfig:
    if not isinstance(saved, dict):
        raise ValueError(f"{name} has no model config")
    model = saved.get("model", saved)
    if not isinstance(model, dict):
        raise ValueError(f"{name}: its model config is not a JSON object")
    try:
        return TransformerConfig.from_dict(model)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: invalid model config: {err}") from None


def load_model(
    path: str | os.PathLike, *, device: str | torch.device | None = None, verify: bool = True
) -> tuple[dict[str, Any], TransformerConfig, dict[str, Any]]:
    """Load a checkpoint's parameters and model config, checked against each other.

    The config is validated, then every tensor's shape is compared with the parameter tree the
    config describes (built on the ``meta`` device: a corrupt config claiming a huge model
    allocates nothing), so a hand-edited ``vocab_size``/``d_ff``/``num_layers`` is an error, not
    an obscure failure or a silently wrong model.

    A sharded checkpoint (``.shards``) is consolidated in memory.

    Args:
        path: a checkpoint file, a ``.shards`` directory or a run directory (see :func:`find_checkpoint`).
        device: where to put the parameters (default: CPU).
        verify: check the stored CRC-32 of the tensor bytes.

    Returns:
        ``(params, config, header)`` (the header as :func:`flm.checkpoint.read_header` gives it;
        for a sharded checkpoint, :func:`flm.sharded_checkpoint.read_sharded_header`).

    Raises:
        ValueError: a missing, corrupt or inconsistent checkpoint (naming the file).
    """
    ckpt_path = find_checkpoint(path)
    header = read_any_header(ckpt_path)
    config = _model_config(header.get("config"), str(ckpt_path))
    ckpt = load_any(ckpt_path, verify=verify)
    check_params(ckpt.params, config, name=str(ckpt_path))
    params = tree_map(lambda t: t.to(device), ckpt.params) if device is not None else ckpt.params
    return params, config, header


def load_run(
    run: str | os.PathLike, *, device: str | torch.device | None = None
) -> tuple[dict[str, Any], TransformerConfig, Tokenizer]:
    """A trained run as ``(params, config, tokenizer)``: the best (else newest) checkpoint and the
    tokenizer beside it, checked to be the one the model was trained with.

    Example::

        params, config, tok = flm.load_run("runs/cpu-small")
        ids = flm.generate.generate(params, config, [tok.encode("Once upon a time")], 50, eos_id=tok.eos_id)

    Args:
        run: a run directory, or a checkpoint file inside one.
        device: where to put the parameters (default: CPU).

    Returns:
        ``(params, config, tokenizer)``.

    Raises:
        ValueError: a missing or corrupt checkpoint or tokenizer, or a tokenizer that is not the
            model's (its fingerprint differs from the one recorded in the checkpoint).
    """
    params, config, header = load_model(run, device=device)
    ckpt_path = find_checkpoint(run)
    tokenizer = load_tokenizer_beside(ckpt_path, header)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{ckpt_path}: the tokenizer has {tokenizer.vocab_size} ids, the model {config.vocab_size}")
    return params, config, tokenizer


def load_tokenizer_beside(ckpt_path: Path, header: dict[str, Any]) -> Tokenizer:
    """The tokenizer (``vocab.json``, ``merges.txt``) in a checkpoint's directory, checked against the
    fingerprint the checkpoint recorded.

    Raises:
        ValueError: missing or malformed files, or another tokenizer than the model's.
    """
    d = ckpt_path.parent
    vocab, merges = d / "vocab.json", d / "merges.txt"
    if not (vocab.exists() and merges.exists()):
        raise ValueError(f"no tokenizer beside {ckpt_path}: {vocab.name} and {merges.name} are needed in {d}")
    tokenizer = Tokenizer.from_files(vocab, merges, special_tokens=[EOS_TOKEN])
    want = (header.get("metadata") or {}).get("tokenizer_fingerprint")
    if want and tokenizer.fingerprint() != want:
        raise ValueError(
            f"the tokenizer in {d} ({tokenizer.fingerprint()[:12]}…) is not the one {ckpt_path.name} was trained "
            f"with ({want[:12]}…): its ids would decode to garbage"
        )
    return tokenizer
