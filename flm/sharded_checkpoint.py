"""Sharded checkpoints: every rank writes its own shards in parallel; loading reshards to any world size.

A sharded checkpoint is a directory (``ckpt_<step, 7 digits>.shards/`` for a periodic one,
``best.shards/`` for the best model) holding

- one safetensors file per rank, ``rank-<r, 5 digits>-of-<W, 5 digits>.safetensors``: that rank's
  shards (the :mod:`flm.shard` layout: every leaf split along dim 0, zero-padded to
  ``ceil(d0/W)`` rows; 0-d leaves such as AdamW's step count replicated) under the keys a full
  checkpoint uses (``params.<path>``, ``opt_state.<path>``), with a CRC-32 of its tensors in its
  own metadata; each file is written atomically (:mod:`flm._io`);
- ``index.json``, written last, atomically, by rank 0 once every rank's file exists
  (:func:`commit`): the world size, the step, what a full checkpoint's header holds (config,
  metadata, sampler RNG state, the optimiser state's structure) and, per tensor, its full shape,
  dtype and whether it is sharded, plus every rank file's name and CRC.

A directory without a valid ``index.json`` is incomplete (a save that was killed): it is never
loaded. A kill at any moment therefore leaves the previous checkpoint loadable.

**Generations.** A directory can be saved into again (the best model at each improvement, or a
periodic step reached again after a resume). Each save then writes a new *generation* of rank
files (``rank-…-of-….v<g>.safetensors``, ``g`` one more than the committed index's) beside the
committed ones, and the new ``index.json`` names them; only after it is in place are the files it
does not name removed. Every rank picks the same ``g`` (:func:`next_generation` reads the committed
index, which no commit changes while ranks write), so a kill at any point leaves ``index.json``
naming a complete, unchanged set of files: the previous best model stays loadable.

Loading (:func:`load_sharded`) gives a rank its shards at the *requested* world size, reading only
the rows it needs from the saved files (``safe_open(...).get_slice``); at the saved world size it
is bitwise the saved shards, and at world size 1 (:func:`consolidate`) bitwise the whole tensors.
Nothing is unpickled.

Source: Rajbhandari et al. (2020), "ZeRO" (stage 3 sharded state); PyTorch Distributed
Checkpoint's per-rank files plus a metadata file committed last.
"""

from __future__ import annotations

import base64
import json
import os
import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file as st_save_file

from flm import manifest
from flm._fs import safetensors_metadata
from flm._io import atomic_path, atomic_write_json, is_temp_name, remove_orphan_temps
from flm.checkpoint import (
    Checkpoint,
    checkpoint_tensors,
    config_json,
    describe_state,
    flm_version,
    list_by_step,
    list_checkpoints,
    load_checkpoint,
    read_header,
    rebuild_state,
    restore_tree,
    save_checkpoint,
    tensor_checksum,
)
from flm.shard import rows_per_rank, shard_rows
from flm.tree import flatten, unflatten

__all__ = [
    "INDEX_NAME",
    "BEST_SHARDS",
    "FORMAT_VERSION",
    "sharded_checkpoint_name",
    "is_sharded_checkpoint_name",
    "list_sharded_checkpoints",
    "list_all_checkpoints",
    "merge_checkpoints",
    "checkpoint_step",
    "rank_file_name",
    "read_index",
    "is_complete",
    "next_generation",
    "save_shard",
    "commit",
    "read_sharded_header",
    "load_sharded",
    "consolidate",
    "write_consolidated",
    "reshard_checkpoint",
    "read_any_header",
    "load_any",
]

INDEX_NAME = "index.json"
BEST_SHARDS = "best.shards"
FORMAT = "flm-sharded-checkpoint"
FORMAT_VERSION = 1
_SHARD_FORMAT = "flm-shard"
_CKPT_DIR = re.compile(r"^ckpt_(\d+)\.shards$")
_CKPT_FILE = re.compile(r"^ckpt_(\d+)\.safetensors$")
_RANK_FILE = re.compile(r"^rank-(\d{5})-of-(\d{5})(?:\.v(\d+))?\.safetensors$")
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    )
}
# safetensors' dtype names -> torch's
_ST_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def sharded_checkpoint_name(step: int) -> str:
    """The directory name of the periodic sharded checkpoint at ``step``: ``ckpt_<step, 7 digits>.shards``."""
    return f"ckpt_{int(step):07d}.shards"


def is_sharded_checkpoint_name(name: str) -> bool:
    """Whether ``name`` is a periodic sharded checkpoint's directory name (``ckpt_<step>.shards``)."""
    return _CKPT_DIR.match(name) is not None


def list_sharded_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """The periodic sharded checkpoint directories ``ckpt_<step>.shards`` in ``out_dir``, oldest first.

    Incomplete ones (no valid ``index.json``) are listed too: see :func:`is_complete`.

    Args:
        out_dir: a run directory (a missing one has none).

    Returns:
        Their paths, sorted by step.
    """
    return list_by_step(out_dir, _CKPT_DIR, directories=True)


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step a periodic checkpoint's name carries (``ckpt_<step>.safetensors`` or ``ckpt_<step>.shards``).

    Raises:
        ValueError: another name.
    """
    name = Path(path).name
    m = _CKPT_FILE.match(name) or _CKPT_DIR.match(name)
    if m is None:
        raise ValueError(f"{name!r} is not a periodic checkpoint's name (ckpt_<step>.safetensors or .shards)")
    return int(m.group(1))


def merge_checkpoints(files: list[Path], dirs: list[Path]) -> list[Path]:
    """Periodic checkpoint files and sharded directories in one list, oldest first (at one step the
    directory after the file)."""
    return sorted([*files, *dirs], key=lambda p: (checkpoint_step(p), p.name.endswith(".shards")))


def list_all_checkpoints(out_dir: str | os.PathLike, *, complete_only: bool = True) -> list[Path]:
    """The periodic checkpoints of a run in both formats (``ckpt_<step>.safetensors`` files and
    ``ckpt_<step>.shards`` directories), oldest first; at one step a directory sorts after the file.

    Args:
        out_dir: a run directory.
        complete_only: leave out sharded directories without a valid ``index.json``.

    Returns:
        Their paths, sorted by step.
    """
    dirs = [p for p in list_sharded_checkpoints(out_dir) if not complete_only or is_complete(p)]
    return merge_checkpoints(list_checkpoints(out_dir), dirs)


def rank_file_name(rank: int, world_size: int, generation: int = 0) -> str:
    """The file rank ``rank`` of ``world_size`` writes: ``rank-<r>-of-<W>.safetensors`` (generation 0)
    or ``rank-<r>-of-<W>.v<g>.safetensors``.

    Raises:
        ValueError: a rank outside ``[0, world_size)`` or a negative generation.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"sharded checkpoint: rank {rank} is outside world_size {world_size}")
    if generation < 0:
        raise ValueError(f"sharded checkpoint: generation must be ≥ 0, got {generation}")
    return f"rank-{rank:05d}-of-{world_size:05d}" + (f".v{generation}" if generation else "") + ".safetensors"


def _err(directory: Path, what: str) -> ValueError:
    return ValueError(f"sharded checkpoint {directory}: {what}")


def read_index(directory: str | os.PathLike) -> dict[str, Any]:
    """The validated ``index.json`` of a sharded checkpoint directory.

    Args:
        directory: the ``.shards`` directory.

    Returns:
        The index dict (``format``, ``format_version``, ``world_size``, ``generation``, ``step``,
        ``config``, ``metadata``, ``has_opt_state``, ``opt_state_tree``, ``rng_state``, ``files``,
        ``tensors``).

    Raises:
        ValueError: naming the directory: not a directory, no ``index.json`` (an incomplete save),
            or an index that is not flm's or is corrupt.
    """
    d = Path(directory)
    if not d.is_dir():
        raise _err(d, "not a directory")
    p = d / INDEX_NAME
    if p.is_symlink() or not p.is_file():
        raise _err(d, f"incomplete: no {INDEX_NAME} (a save that did not finish); it is never loaded")
    try:
        idx = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise _err(d, f"unreadable {INDEX_NAME}: {err}") from None
    if not isinstance(idx, dict) or idx.get("format") != FORMAT:
        raise _err(d, f"{INDEX_NAME} is not an flm sharded-checkpoint index")
    if idx.get("format_version") != FORMAT_VERSION:
        raise _err(d, f"format_version {idx.get('format_version')!r}; this flm reads {FORMAT_VERSION}")
    world, files, tensors = idx.get("world_size"), idx.get("files"), idx.get("tensors")
    if not (isinstance(world, int) and world >= 1 and isinstance(files, list) and len(files) == world):
        raise _err(d, f"corrupt {INDEX_NAME}: world_size {world!r} and its file list disagree")
    for r, f in enumerate(files):
        name = f.get("name") if isinstance(f, dict) else None
        m = _RANK_FILE.match(name) if isinstance(name, str) else None
        if m is None or int(m.group(1)) != r or int(m.group(2)) != world:
            raise _err(d, f"corrupt {INDEX_NAME}: file entry {r} is {f!r}")
    if not isinstance(tensors, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("shape"), list) and v.get("dtype") in _DTYPES for v in tensors.values()
    ):
        raise _err(d, f"corrupt {INDEX_NAME}: bad tensor table")
    return idx


def is_complete(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` is a committed sharded checkpoint (its ``index.json`` reads and is valid)."""
    try:
        read_index(directory)
    except ValueError:
        return False
    return True


def next_generation(directory: str | os.PathLike) -> int:
    """The generation a new save into ``directory`` writes: one more than its committed index's, else 0.

    Every rank computes the same number: it depends only on the committed ``index.json``, which no
    commit changes while the ranks write their files.
    """
    try:
        return int(read_index(directory).get("generation", 0)) + 1
    except (ValueError, TypeError):
        return 0


def save_shard(
    directory: str | os.PathLike,
    rank: int,
    world_size: int,
    params: Any,
    opt_state: Any = None,
    *,
    generation: int = 0,
    allow_nonfinite: bool = False,
) -> Path:
    """Write this rank's shards into ``directory`` (each rank calls it, in parallel).

    Args:
        directory: the ``.shards`` directory (created if missing).
        rank: this rank, ``0 ≤ rank < world_size``.
        world_size: number of ranks.
        params: this rank's parameter shards (:func:`flm.shard.shard_tree` layout: leaves
            ``(ceil(d0/W), *rest)``, 0-d leaves whole).
        opt_state: this rank's optimiser-state shards, or ``None`` (the best model).
        generation: :func:`next_generation` of the directory (the same on every rank).
        allow_nonfinite: write NaN/inf values too (refused by default, as
            :func:`flm.checkpoint.save_checkpoint`).

    Returns:
        The rank file written.

    Raises:
        ValueError: a bad rank, non-tensor leaves, or (unless ``allow_nonfinite``) NaN/inf values.
        OSError: the file cannot be written (a committed checkpoint in ``directory`` is intact).
    """
    d = Path(directory)
    path = d / rank_file_name(rank, world_size, generation)
    check = {"allow_nonfinite": allow_nonfinite, "target": str(path)}
    tensors = checkpoint_tensors("params", params, **check)
    if opt_state is not None:
        tensors.update(checkpoint_tensors("opt_state", opt_state, **check))
    header = {
        "format": _SHARD_FORMAT,
        "shard_format_version": FORMAT_VERSION,
        "rank": rank,
        "world_size": world_size,
        "generation": generation,
        "checksum": {"algorithm": "crc32", "value": tensor_checksum(tensors)},
    }
    d.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        st_save_file(tensors, os.fspath(tmp), metadata={"flm": json.dumps(header)})
    return path


def _shard_header(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            meta = safetensors_metadata(f, os.fstat(f.fileno()).st_size)
        header = json.loads(meta.get("flm", "null"))
    except OSError as err:
        raise ValueError(f"sharded checkpoint: cannot read {path}: {err.strerror or err}") from None
    except ValueError as err:
        raise ValueError(f"sharded checkpoint: {path} is not a valid safetensors file: {err}") from None
    if not isinstance(header, dict) or header.get("format") != _SHARD_FORMAT:
        raise ValueError(f"sharded checkpoint: {path} is not an flm shard file")
    return header


def _full_shapes(like: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for prefix in ("params", "opt_state"):
        tree = like.get(prefix)
        if tree is None:
            continue
        for key, leaf in flatten(tree).items():
            shapes[f"{prefix}.{key}" if key else prefix] = tuple(int(n) for n in leaf.shape)
    return shapes


def commit(
    directory: str | os.PathLike,
    world_size: int,
    step: int,
    *,
    like: dict[str, Any],
    config: Any = None,
    metadata: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    generation: int = 0,
) -> Path:
    """Complete a sharded checkpoint: check every rank's file, then write ``index.json`` (rank 0
    only, after a barrier that follows every rank's :func:`save_shard`), then remove the files of
    other generations and world sizes and orphan temporaries (only flm's own: :mod:`flm.manifest`).

    The ``.shards`` directory gets its own manifest (:mod:`flm.manifest`: every file in it
    recorded, ``index.json`` before it appears), so rotation and ``--overwrite`` remove it only
    while it holds nothing but flm's files, in a tracked run directory or not.

    Args:
        directory: the ``.shards`` directory the ranks wrote.
        world_size: number of ranks that wrote.
        step: the training step.
        like: the *full-size* templates ``{"params": …, "opt_state": … or None}`` (their shapes and
            structure; ``meta``-device tensors are enough), which give every leaf's first
            dimension and the optimiser state's NamedTuples.
        config: a ``TransformerConfig`` or JSON dict, as :func:`flm.checkpoint.save_checkpoint`.
        metadata: JSON metadata (best loss, tokenizer fingerprint, …).
        generator: the data sampler, whose state is saved.
        generation: the generation the ranks wrote (:func:`next_generation`).

    Returns:
        The index's path.

    Raises:
        ValueError: a rank's file is missing or unreadable, or its tensors disagree with ``like``
            (nothing is committed: a previous commit of the directory stays in force).
        OSError: the index cannot be written.
    """
    d = Path(directory)
    shapes = _full_shapes(like)
    files, tensors = [], {}
    for r in range(world_size):
        path = d / rank_file_name(r, world_size, generation)
        if not path.is_file():
            raise _err(d, f"rank {r}'s file {path.name} is missing (did every rank save its shard?)")
        header = _shard_header(path)
        if (header.get("rank"), header.get("world_size"), header.get("generation")) != (r, world_size, generation):
            raise _err(d, f"{path.name} belongs to another save (its header says rank {header.get('rank')})")
        with safe_open(os.fspath(path), framework="pt") as f:
            keys = set(f.keys())
            if keys != set(shapes):
                extra = sorted(keys - set(shapes)) or sorted(set(shapes) - keys)
                raise _err(d, f"{path.name}'s tensors differ from the template's, e.g. {extra[0]!r}")
            for key in keys:
                sl = f.get_slice(key)
                got, full = tuple(sl.get_shape()), shapes[key]
                want = (rows_per_rank(full[0], world_size), *full[1:]) if full else ()
                if got != want:
                    raise _err(d, f"{path.name}: {key!r} has shape {got}, a {world_size}-way shard of {full} is {want}")
                dtype = _ST_DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise _err(d, f"{path.name}: {key!r} has dtype {sl.get_dtype()}, which flm does not store")
                if r == 0:
                    tensors[key] = {"shape": list(full), "dtype": dtype, "sharded": bool(full)}
                elif tensors[key]["dtype"] != dtype:
                    raise _err(d, f"{path.name}: {key!r} is {dtype}, rank 0's shard is {tensors[key]['dtype']}")
        files.append({"name": path.name, "checksum": header["checksum"]["value"]})
    opt_state = like.get("opt_state")
    index = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "flm_version": flm_version(),
        "world_size": world_size,
        "generation": generation,
        "step": int(step),
        "config": config_json(config),
        "metadata": metadata or {},
        "has_opt_state": opt_state is not None,
        "opt_state_tree": describe_state(opt_state) if opt_state is not None else None,
        "rng_state": base64.b64encode(generator.get_state().numpy().tobytes()).decode()
        if generator is not None
        else None,
        "files": files,
        "tensors": tensors,
    }
    try:
        text = json.dumps(index)
    except TypeError as err:
        raise ValueError(f"sharded checkpoint: metadata/config is not JSON-serialisable: {err}") from None
    if not manifest.has_manifest(d):  # flm's own directory: record the rank files (their headers say so)
        manifest.claim(d)
    atomic_write_json(d / INDEX_NAME, json.loads(text))
    _remove_unindexed(d, {f["name"] for f in files})
    return d / INDEX_NAME


def _remove_unindexed(d: Path, keep: set[str]) -> None:
    """Remove what a committed index no longer names: other generations' and world sizes' rank
    files and orphan temporaries (a file flm cannot show it wrote is kept)."""
    remove_orphan_temps(d)
    for p in d.iterdir():
        if p.name in keep or p.name in (INDEX_NAME, manifest.MANIFEST_NAME) or is_temp_name(p.name):
            continue
        if _RANK_FILE.match(p.name):
            try:
                manifest.remove(p)
            except manifest.ForeignFilesError:
                pass


def read_sharded_header(directory: str | os.PathLike) -> dict[str, Any]:
    """A sharded checkpoint's header in :func:`flm.checkpoint.read_header`'s form (``step``,
    ``config``, ``metadata``, ``has_opt_state``, ``opt_state_tree``, ``rng_state``) plus
    ``world_size`` and ``sharded: True``; reads only ``index.json``.

    Raises:
        ValueError: an incomplete or corrupt directory (see :func:`read_index`).
    """
    idx = read_index(directory)
    keep = ("flm_version", "step", "config", "metadata", "has_opt_state", "opt_state_tree", "rng_state", "world_size")
    return {"format_version": 1, **{k: idx.get(k) for k in keep}, "sharded": True}


def _verify(d: Path, f: Any, entry: dict[str, Any], path: Path) -> None:
    header = _shard_header(path)
    stored = (header.get("checksum") or {}).get("value")
    if stored != entry.get("checksum"):
        raise _err(
            d, f"{path.name} records checksum {stored!r}, the index {entry.get('checksum')!r} (another save's file?)"
        )
    got = tensor_checksum({k: f.get_tensor(k) for k in f.keys()})
    if got != stored:
        raise _err(d, f"{path.name} is corrupt: its tensor data has checksum {got}, the file records {stored!r}")


def load_sharded(
    directory: str | os.PathLike,
    rank: int,
    world_size: int,
    like: Any = None,
    *,
    verify: bool = True,
) -> Checkpoint:
    """Rank ``rank``'s shards of a committed sharded checkpoint at ``world_size`` ranks (resharding).

    Each leaf comes back in the :mod:`flm.shard` layout for ``world_size``: rows
    ``[rank·c, min((rank+1)·c, d0))`` of the whole leaf, zero-padded to ``c = ceil(d0/world_size)``
    rows, read straight from the saved files' rows (only the files holding them are opened). At the
    saved world size the result is bitwise the saved shards; at world size 1 the whole tensors.

    Args:
        directory: the ``.shards`` directory.
        rank: ``0 ≤ rank < world_size``.
        world_size: the world size to load at (any, not necessarily the saved one).
        like: templates as :func:`flm.checkpoint.load_checkpoint` takes them, shaped as *this
            rank's* shards: a :class:`~flm.checkpoint.Checkpoint` or ``{"params": …, "opt_state": …}``.
            Without one: parameters as nested dicts/lists, the optimiser state as saved.
        verify: check each file this rank reads against its CRC-32 and the index's record of it.

    Returns:
        A :class:`~flm.checkpoint.Checkpoint` (step, config, metadata and RNG state from the index).

    Raises:
        ValueError: naming the directory and file: incomplete or corrupt index, a missing rank
            file, a checksum mismatch, a shape mismatch with ``like``, a bad rank.
    """
    d = Path(directory)
    if not 0 <= rank < world_size:
        raise ValueError(f"load_sharded: rank {rank} is outside world_size {world_size}")
    idx = read_index(d)
    saved_world, entries = idx["world_size"], idx["files"]
    opened: dict[int, Any] = {}
    with ExitStack() as stack:

        def source(j: int) -> Any:
            if j not in opened:
                path = d / entries[j]["name"]
                if not path.is_file():
                    raise _err(d, f"rank {j}'s file {path.name} is missing")
                try:
                    f = stack.enter_context(safe_open(os.fspath(path), framework="pt"))
                except Exception as err:  # safetensors' own error types for corrupt files
                    raise _err(d, f"{path.name} is not a valid safetensors file: {err}") from None
                if verify:
                    _verify(d, f, entries[j], path)
                opened[j] = f
            return opened[j]

        flat: dict[str, torch.Tensor] = {}
        for key, spec in idx["tensors"].items():
            full, dtype = tuple(spec["shape"]), _DTYPES[spec["dtype"]]
            try:
                if not spec.get("sharded", bool(full)):
                    flat[key] = source(rank if world_size == saved_world else 0).get_tensor(key).clone()
                elif world_size == saved_world:
                    flat[key] = source(rank).get_tensor(key).clone()
                else:
                    flat[key] = _gather_rows(key, full, dtype, rank, world_size, saved_world, source)
            except ValueError:
                raise
            except Exception as err:  # a key the file lacks, a truncated file, …
                raise _err(d, f"cannot read {key!r}: {err}") from None
            want = (rows_per_rank(full[0], world_size), *full[1:]) if spec.get("sharded", bool(full)) else full
            if tuple(flat[key].shape) != want:
                raise _err(d, f"{key!r} has shape {tuple(flat[key].shape)}, expected {want}")
    return _assemble(flat, idx, like, str(d))


def _gather_rows(
    key: str, full: tuple[int, ...], dtype: torch.dtype, rank: int, world: int, saved_world: int, source: Any
) -> torch.Tensor:
    """Rows ``[rank·c, min((rank+1)·c, d0))`` of the whole leaf, zero-padded to ``c`` rows, read
    from the saved files that hold them (file ``j`` holds rows ``[j·c_s, (j+1)·c_s)``)."""
    d0 = full[0]
    c, c_s = rows_per_rank(d0, world), rows_per_rank(d0, saved_world)
    out = torch.zeros((c, *full[1:]), dtype=dtype)
    start, stop = min(rank * c, d0), min((rank + 1) * c, d0)
    row = start
    while row < stop:
        j = row // c_s
        end = min(stop, (j + 1) * c_s)
        part = source(j).get_slice(key)[row - j * c_s : end - j * c_s]
        out[row - start : end - start].copy_(part)
        row = end
    return out


def _templates(like: Any) -> dict[str, Any]:
    if isinstance(like, Checkpoint):
        return {"params": like.params, "opt_state": like.opt_state}
    if isinstance(like, dict):
        unknown = set(like) - {"params", "opt_state"}
        if unknown:
            raise ValueError(f"load_sharded: like has unknown keys {sorted(unknown)}; use 'params'/'opt_state'")
        return like
    if like is not None:
        raise ValueError(f"load_sharded: like must be a Checkpoint or a dict, got {type(like).__name__}")
    return {}


def _assemble(flat: dict[str, torch.Tensor], header: dict[str, Any], like: Any, name: str) -> Checkpoint:
    """A :class:`Checkpoint` from ``{params.<path>/opt_state.<path>: tensor}`` and a header."""
    templates = _templates(like)
    groups: dict[str, dict[str, torch.Tensor]] = {"params": {}, "opt_state": {}}
    for key, t in flat.items():
        prefix = key.split(".", 1)[0]
        if prefix not in groups:
            raise ValueError(f"load_sharded: {name} has an unexpected tensor {key!r}")
        groups[prefix][key] = t
    trees: dict[str, Any] = {}
    for prefix in ("params", "opt_state"):
        if prefix == "opt_state" and not header.get("has_opt_state", True):
            if templates.get("opt_state") is not None:
                raise ValueError(f"load_sharded: {name} holds no optimiser state, but a template was given")
            trees[prefix] = None
        elif templates.get(prefix) is not None:
            trees[prefix] = restore_tree(prefix, groups[prefix], templates[prefix], name)
        elif prefix == "opt_state" and header.get("opt_state_tree") is not None:
            rest = dict(groups[prefix])
            trees[prefix] = rebuild_state(header["opt_state_tree"], rest, name)
            if rest:
                raise ValueError(f"load_sharded: {name} has tensors its recorded structure lacks, e.g. {min(rest)!r}")
        else:
            plen = len(prefix) + 1
            trees[prefix] = unflatten({k[plen:]: v for k, v in groups[prefix].items()}, fill_missing=True)
    rng = header.get("rng_state")
    return Checkpoint(
        params=trees["params"],
        opt_state=trees["opt_state"],
        step=int(header.get("step", 0)),
        config=header.get("config"),
        metadata=header.get("metadata") or {},
        rng_state=torch.frombuffer(bytearray(base64.b64decode(rng)), dtype=torch.uint8) if rng else None,
    )


def consolidate(directory: str | os.PathLike, like: Any = None, *, verify: bool = True) -> Checkpoint:
    """The whole parameters and optimiser state of a sharded checkpoint (:func:`load_sharded` at
    world size 1: bitwise :func:`flm.shard.unshard_rows` of the saved shards), in memory.

    Args:
        directory: the ``.shards`` directory.
        like: full-size templates, as :func:`flm.checkpoint.load_checkpoint` takes them (optional).
        verify: check every rank file's CRC-32.

    Returns:
        A :class:`~flm.checkpoint.Checkpoint`.

    Raises:
        ValueError: as :func:`load_sharded`.
    """
    return load_sharded(directory, 0, 1, like, verify=verify)


def write_consolidated(
    directory: str | os.PathLike, out: str | os.PathLike, *, params_only: bool = False
) -> Checkpoint:
    """Consolidate a sharded checkpoint (verified) into one ordinary checkpoint file, atomically.

    Args:
        directory: the ``.shards`` directory.
        out: the ``.safetensors`` file to write (:func:`flm.checkpoint.save_checkpoint`; in a
            directory with a manifest, only a file flm wrote is replaced).
        params_only: leave the optimiser state out (as ``best.safetensors`` holds).

    Returns:
        The consolidated :class:`~flm.checkpoint.Checkpoint`.

    Raises:
        ValueError: as :func:`load_sharded`; :class:`flm.manifest.ForeignFilesError` for a file at
            ``out`` flm did not write.
        OSError: ``out`` cannot be written (a previous file there is intact).
    """
    ckpt = consolidate(directory)
    generator = None
    if ckpt.rng_state is not None:
        generator = torch.Generator()
        generator.set_state(ckpt.rng_state)
    save_checkpoint(
        out,
        params=ckpt.params,
        opt_state=None if params_only else ckpt.opt_state,
        step=ckpt.step,
        config=ckpt.config,
        metadata=ckpt.metadata,
        generator=generator,
    )
    return ckpt


def reshard_checkpoint(ckpt: Checkpoint, rank: int, world_size: int, like: Any = None, *, name: str = "") -> Checkpoint:
    """Rank ``rank``'s shards (:func:`flm.shard.shard_rows` per leaf) of a whole checkpoint, e.g. an
    unsharded ``ckpt_<step>.safetensors`` resumed under ``--shard``.

    Args:
        ckpt: a whole checkpoint (:func:`flm.checkpoint.load_checkpoint` without a template).
        rank: ``0 ≤ rank < world_size``.
        world_size: number of ranks.
        like: this rank's shard-shaped templates, as :func:`load_sharded` takes them.
        name: the source, for messages.

    Returns:
        The sharded :class:`~flm.checkpoint.Checkpoint` (same step, config, metadata, RNG state).

    Raises:
        ValueError: a shape mismatch with ``like``.
    """
    flat = {f"params.{k}" if k else "params": shard_rows(t, rank, world_size) for k, t in flatten(ckpt.params).items()}
    if ckpt.opt_state is not None:
        for k, t in flatten(ckpt.opt_state).items():
            flat[f"opt_state.{k}" if k else "opt_state"] = shard_rows(t, rank, world_size)
    header = {
        "step": ckpt.step,
        "config": ckpt.config,
        "metadata": ckpt.metadata,
        "has_opt_state": ckpt.opt_state is not None,
        "opt_state_tree": describe_state(ckpt.opt_state) if ckpt.opt_state is not None else None,
        "rng_state": base64.b64encode(ckpt.rng_state.numpy().tobytes()).decode()
        if ckpt.rng_state is not None
        else None,
    }
    if header["has_opt_state"] and header["opt_state_tree"] is None and _templates(like).get("opt_state") is None:
        raise ValueError(f"reshard_checkpoint: {name or 'the checkpoint'}: its optimiser state needs a template")
    return _assemble(flat, header, like, name or "checkpoint")


def read_any_header(path: str | os.PathLike) -> dict[str, Any]:
    """The header of a checkpoint file (:func:`flm.checkpoint.read_header`) or of a sharded
    checkpoint directory (:func:`read_sharded_header`).

    Raises:
        ValueError: naming the path, for a missing, incomplete or corrupt checkpoint.
    """
    return read_sharded_header(path) if Path(path).is_dir() else read_header(path)


def load_any(
    path: str | os.PathLike, like: Any = None, *, rank: int = 0, world_size: int = 1, verify: bool = True
) -> Checkpoint:
    """Load a checkpoint file or a sharded directory as rank ``rank`` of ``world_size`` would hold it.

    A directory is resharded by :func:`load_sharded`; a whole file is loaded whole at world size 1
    (with ``like`` as :func:`flm.checkpoint.load_checkpoint` takes it), else sharded with
    :func:`reshard_checkpoint`.

    Raises:
        ValueError: as :func:`load_sharded` / :func:`flm.checkpoint.load_checkpoint`.
    """
    if Path(path).is_dir():
        return load_sharded(path, rank, world_size, like, verify=verify)
    if world_size == 1:
        return load_checkpoint(path, like=like, verify=verify)
    return reshard_checkpoint(load_checkpoint(path, verify=verify), rank, world_size, like, name=os.fspath(path))
