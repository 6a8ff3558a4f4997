"""Checkpoints: parameters, optimiser state, step, config and RNG state in one safetensors file.

Tensors are stored under ``params.<dotted path>`` and ``opt_state.<dotted path>`` (the paths of
:func:`flm.flatten`); everything else is JSON in the safetensors header metadata under the key
``"flm"``, with a CRC-32 checksum of every tensor's bytes that :func:`load_checkpoint` verifies
with ``verify=True`` (as every ``flm`` command does): a flipped data byte is then an error, not a
silently different model. Loading never executes code
(no pickle). Saving to a path is atomic (:mod:`flm._io`): an interrupted save leaves the previous
checkpoint intact. :func:`list_checkpoints` finds a run's periodic ``ckpt_<step>.safetensors``.

Source: CS336 assignment 1 handout §5.2 (checkpointing).
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import optree
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from safetensors.torch import save_file as st_save_file

from flm._fs import safetensors_metadata
from flm._io import atomic_path
from flm.tree import flatten, leaf_paths, unflatten

__all__ = [
    "Checkpoint",
    "save_checkpoint",
    "load_checkpoint",
    "read_header",
    "list_checkpoints",
    "checkpoint_name",
    "is_checkpoint_name",
    "FORMAT_VERSION",
]

FORMAT_VERSION = 1
_META_KEY = "flm"
_PREFIXES = ("params", "opt_state")
_CKPT = re.compile(r"^ckpt_(\d+)\.safetensors$")

PathOrFile = str | os.PathLike | BinaryIO


def checkpoint_name(step: int) -> str:
    """The file name of the periodic checkpoint at ``step``: ``ckpt_<step, 7 digits>.safetensors``."""
    return f"ckpt_{int(step):07d}.safetensors"


def is_checkpoint_name(name: str) -> bool:
    """Whether ``name`` is a periodic checkpoint's file name (``ckpt_<step>.safetensors``)."""
    return _CKPT.match(name) is not None


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """The periodic checkpoints ``ckpt_<step>.safetensors`` in ``out_dir``, oldest (lowest step) first.

    Args:
        out_dir: a run directory (a missing one has none).

    Returns:
        Their paths, sorted by step.
    """
    return list_by_step(out_dir, _CKPT)


def list_by_step(out_dir: str | os.PathLike, pattern: re.Pattern[str], *, directories: bool = False) -> list[Path]:
    """The entries of ``out_dir`` whose name ``pattern`` matches, sorted by the step its first group holds.

    Args:
        out_dir: a run directory (a missing one has none).
        pattern: a name pattern whose group 1 is the step, e.g. ``ckpt_(\\d+)\\.safetensors``.
        directories: keep only directories (sharded checkpoints) instead of any entry.

    Returns:
        Their paths, lowest step first.
    """
    d = Path(out_dir)
    if not d.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in d.iterdir() if (m := pattern.match(p.name)) and (not directories or p.is_dir())
    ]
    return [p for _, p in sorted(found)]


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """CRC-32 of every tensor's bytes, combined with the names in key order (independent of the
    file layout). ``zlib.crc32`` releases the GIL, so large tensors are hashed on several threads."""

    def crc(t: torch.Tensor) -> int:
        return zlib.crc32(t.contiguous().view(-1).view(torch.uint8).numpy()) if t.numel() else 0

    keys = sorted(tensors)
    total = sum(tensors[k].numel() * tensors[k].element_size() for k in keys)
    if total > 16 << 20 and (os.cpu_count() or 1) > 1:
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            crcs = list(pool.map(crc, (tensors[k] for k in keys)))
    else:
        crcs = [crc(tensors[k]) for k in keys]
    combined = zlib.crc32("".join(f"{k}:{c:08x};" for k, c in zip(keys, crcs)).encode())
    return f"{combined:08x}"


class Checkpoint(NamedTuple):
    """What :func:`load_checkpoint` returns.

    Attributes:
        params: the parameter tree.
        opt_state: the optimiser state tree (``None`` if none was saved).
        step: the training step (int).
        config: the saved config as a JSON dict (``TransformerConfig.to_dict()`` when a
            ``TransformerConfig`` was saved), or ``None``.
        metadata: the caller's JSON metadata dict (``{}`` if none).
        rng_state: the saved ``torch.Generator`` state (uint8 tensor), or ``None``.
    """

    params: Any
    opt_state: Any
    step: int
    config: dict[str, Any] | None
    metadata: dict[str, Any]
    rng_state: torch.Tensor | None = None


def _name(target: PathOrFile) -> str:
    if isinstance(target, (str, os.PathLike)):
        return os.fspath(target)
    return getattr(target, "name", "<file object>")


def _config_to_json(config: Any) -> Any:
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if isinstance(config, dict):
        return config
    raise ValueError(
        f"save_checkpoint: config must be a TransformerConfig, a dict or None, got {type(config).__name__}"
    )


def _tensor_dict(prefix: str, tree: Any, *, allow_nonfinite: bool = True, target: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for key, leaf in flatten(tree).items():
        if not isinstance(leaf, torch.Tensor):
            raise ValueError(f"save_checkpoint: {prefix}.{key} is a {type(leaf).__name__}, not a tensor")
        t = leaf.detach().to("cpu").contiguous()
        if not allow_nonfinite and (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
            what = "NaN" if bool(t.isnan().any()) else "inf"
            raise ValueError(
                f"save_checkpoint: {prefix}.{key} holds {what} values; refusing to write {target} (a model with "
                "non-finite parameters cannot be trained on or sampled from; pass allow_nonfinite=True to save it anyway)"
            )
        if t.data_ptr() in seen and t.numel() > 0:  # safetensors refuses shared storage: store a copy
            t = t.clone()
        seen[t.data_ptr()] = key
        out[f"{prefix}.{key}" if key else prefix] = t
    return out


# The optimiser-state NamedTuples a checkpoint may name, by module-qualified class name. Loading
# rebuilds only these (looked up here, never imported by a name read from a file).
def _state_classes() -> dict[str, type]:
    from flm.optim.base import EmptyState
    from flm.optim.clip import ClipState
    from flm.optim.transforms import ScaleByAdamState, ScaleByLearningRateState, TraceState

    classes = (EmptyState, ClipState, ScaleByAdamState, ScaleByLearningRateState, TraceState)
    return {f"{c.__module__}.{c.__qualname__}": c for c in classes}


def _describe(tree: Any, classes: dict[str, type]) -> Any:
    """A JSON description of ``tree``'s structure (tensor leaves as ``"tensor"``), or ``None`` if
    it holds a node that cannot be described (a NamedTuple outside flm's state classes, …)."""
    if isinstance(tree, torch.Tensor):
        return "tensor"
    if tree is None:
        return {"none": None}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        name = f"{type(tree).__module__}.{type(tree).__qualname__}"
        if classes.get(name) is not type(tree):
            return None
        fields = [_describe(v, classes) for v in tree]
        return None if None in fields else {"namedtuple": name, "fields": fields}
    if isinstance(tree, (tuple, list)):
        items = [_describe(v, classes) for v in tree]
        return None if None in items else {type(tree).__name__: items}
    if isinstance(tree, dict) and all(isinstance(k, str) for k in tree):
        items = {k: _describe(v, classes) for k, v in tree.items()}
        return None if None in items.values() else {"dict": items}
    return None


def _rebuild(desc: Any, flat: dict[str, torch.Tensor], path: str, classes: dict[str, type], name: str) -> Any:
    """The tree ``desc`` (from :func:`_describe`) describes, with the tensors of ``flat`` at its leaves'
    dotted paths (popped from ``flat``)."""

    def child(part: Any) -> str:
        return f"{path}.{part}" if path else str(part)

    if desc == "tensor":
        key = f"opt_state.{path}" if path else "opt_state"
        if key not in flat:
            raise ValueError(f"load_checkpoint: {name} has no tensor {key!r} (present in its recorded structure)")
        return flat.pop(key)
    if not isinstance(desc, dict) or len(desc) not in (1, 2):
        raise ValueError(f"load_checkpoint: {name}: corrupt optimiser-state structure at {path or '<root>'!r}")
    if "none" in desc:
        return None
    if "namedtuple" in desc:
        cls = classes.get(desc["namedtuple"])
        fields = desc.get("fields")
        if cls is None:
            raise ValueError(
                f"load_checkpoint: {name}: optimiser state names the class {desc['namedtuple']!r}, "
                f"not one of flm's state classes ({', '.join(sorted(classes))}); pass like= to load it"
            )
        if not isinstance(fields, list) or len(fields) != len(cls._fields):
            raise ValueError(
                f"load_checkpoint: {name}: {desc['namedtuple']} at {path or '<root>'!r} has the wrong fields"
            )
        return cls(*(_rebuild(d, flat, child(f), classes, name) for f, d in zip(cls._fields, fields)))
    if "tuple" in desc and isinstance(desc["tuple"], list):
        return tuple(_rebuild(d, flat, child(i), classes, name) for i, d in enumerate(desc["tuple"]))
    if "list" in desc and isinstance(desc["list"], list):
        return [_rebuild(d, flat, child(i), classes, name) for i, d in enumerate(desc["list"])]
    if "dict" in desc and isinstance(desc["dict"], dict):
        return {k: _rebuild(d, flat, child(k), classes, name) for k, d in desc["dict"].items()}
    raise ValueError(f"load_checkpoint: {name}: corrupt optimiser-state structure at {path or '<root>'!r}")


def save_checkpoint(
    out: PathOrFile,
    *,
    params: Any,
    opt_state: Any = None,
    step: int | torch.Tensor = 0,
    config: Any = None,
    metadata: dict[str, Any] | None = None,
    generator: torch.Generator | None = None,
    allow_nonfinite: bool = False,
) -> None:
    """Write a checkpoint to a path (atomically) or a binary file object.

    Parameters and optimiser state holding NaN or inf are refused (nothing is written) unless
    ``allow_nonfinite=True``: such a checkpoint cannot be resumed or sampled from.

    Args:
        out: destination path, or a writable binary file object.
        params: the parameter tree (tensor leaves).
        opt_state: the optimiser state tree (NamedTuples/tuples of tensors), or ``None``.
        step: the training step (int or 0-d tensor; read once, here).
        config: a ``TransformerConfig`` or a JSON-serialisable dict (e.g. the whole run config).
        metadata: extra JSON-serialisable information (e.g. metrics, data positions).
        generator: a ``torch.Generator`` whose state (e.g. the data sampler's) is saved too.
        allow_nonfinite: write tensors that hold NaN/inf too (e.g. to keep a diverged run for
            inspection). Off by default.

    Raises:
        ValueError: for non-tensor leaves, metadata that is not JSON-serialisable, or (unless
            ``allow_nonfinite``) a floating-point tensor holding NaN/inf (naming it).
        OSError: if the file cannot be written (a previous checkpoint at ``out`` is kept).

    Source: handout §5.2.
    """
    check = {"allow_nonfinite": allow_nonfinite, "target": _name(out)}
    tensors = _tensor_dict("params", params, **check)
    if opt_state is not None:
        tensors.update(_tensor_dict("opt_state", opt_state, **check))
    header = {
        "format_version": FORMAT_VERSION,
        "flm_version": _flm_version(),
        "step": int(step),
        "config": _config_to_json(config),
        "metadata": metadata or {},
        "has_opt_state": opt_state is not None,
        # its NamedTuples/tuples, so loading without like= gives a state the optimiser accepts
        "opt_state_tree": _describe(opt_state, _state_classes()) if opt_state is not None else None,
        "rng_state": base64.b64encode(generator.get_state().numpy().tobytes()).decode()
        if generator is not None
        else None,
        "checksum": {"algorithm": "crc32", "value": _checksum(tensors)},
    }
    try:
        meta = {_META_KEY: json.dumps(header)}
    except TypeError as err:
        raise ValueError(f"save_checkpoint: metadata/config is not JSON-serialisable: {err}") from None
    if not isinstance(out, (str, os.PathLike)):
        out.write(st_save(tensors, metadata=meta))
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:  # safetensors writes the file itself: no second copy in memory
        st_save_file(tensors, os.fspath(tmp), metadata=meta)


def _flm_version() -> str:
    from flm import __version__

    return __version__


def _read_tensors(src: PathOrFile, name: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors (each its own copy, independent of the file) and header metadata.

    A path is memory-mapped by safetensors and each tensor copied out once (about the speed of
    ``torch.load``; reading the whole file into ``bytes`` first would copy everything twice). A
    file object is read whole.
    """
    try:
        if isinstance(src, (str, os.PathLike)):
            if not os.path.isfile(src):
                raise OSError(f"no such file: {os.fspath(src)!r}")
            with safe_open(os.fspath(src), framework="pt") as f:
                meta = f.metadata() or {}
                return {k: f.get_tensor(k).clone() for k in f.keys()}, meta
        data = src.read()
        return st_load(data), safetensors_metadata(io.BytesIO(data), len(data))
    except OSError as err:
        raise ValueError(f"load_checkpoint: cannot read {name!r}: {err}") from None
    except Exception as err:  # safetensors raises its own error types for corrupt/truncated files
        raise ValueError(f"load_checkpoint: {name} is not a valid safetensors checkpoint: {err}") from None


def _restore(prefix: str, flat: dict[str, torch.Tensor], template: Any, name: str) -> Any:
    leaves, spec = optree.tree_flatten(template, namespace="")
    out = []
    expected = set()
    for key, like in zip(leaf_paths(template), leaves):
        full = f"{prefix}.{key}" if key else prefix
        expected.add(full)
        if full not in flat:
            raise ValueError(f"load_checkpoint: {name} has no tensor {full!r} (present in the template)")
        t = flat[full]
        if tuple(t.shape) != tuple(like.shape):
            raise ValueError(
                f"load_checkpoint: {name}: {full!r} has shape {tuple(t.shape)}, the template expects {tuple(like.shape)}"
            )
        out.append(t.to(device=like.device, dtype=like.dtype))
    extra = sorted(set(flat) - expected)
    if extra:
        raise ValueError(f"load_checkpoint: {name} has tensors the template lacks, e.g. {extra[0]!r}")
    return optree.tree_unflatten(spec, out)


def _parse_header(metadata: dict[str, str], name: str) -> dict[str, Any]:
    raw = metadata.get(_META_KEY)
    if raw is None:
        raise ValueError(f"load_checkpoint: {name} has no flm metadata (key {_META_KEY!r}); not an flm checkpoint")
    try:
        header = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"load_checkpoint: {name}: corrupt flm metadata: {err}") from None
    if not isinstance(header, dict):
        raise ValueError(f"load_checkpoint: {name}: corrupt flm metadata (not a JSON object)")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"load_checkpoint: {name} has format_version {version!r}; this flm reads {FORMAT_VERSION}")
    return header


def read_header(src: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a checkpoint file (step, config, metadata, …) without reading its tensors.

    Reads only the safetensors header (8 bytes of length + the JSON), so it is cheap for any size.

    Args:
        src: the checkpoint's path.

    Returns:
        The header dict: ``format_version``, ``flm_version``, ``step``, ``config``, ``metadata``,
        ``has_opt_state``, ``opt_state_tree`` (the optimiser state's structure, when describable),
        ``rng_state``, ``checksum``.

    Raises:
        ValueError: naming the file, for a missing, unreadable or corrupt file.
    """
    name = os.fspath(src)
    try:
        with open(src, "rb") as f:
            meta = safetensors_metadata(f, os.fstat(f.fileno()).st_size)
    except OSError as err:
        raise ValueError(f"load_checkpoint: cannot read {name!r}: {err.strerror or err}") from None
    except ValueError as err:
        raise ValueError(f"load_checkpoint: {name} is not a valid safetensors checkpoint: {err}") from None
    return _parse_header(meta, name)


def load_checkpoint(src: PathOrFile, like: Any = None, *, verify: bool = False) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`; never executes code.

    Args:
        src: a path or a readable binary file object.
        like: optional templates to restore structure, dtypes and devices exactly: a
            :class:`Checkpoint` (its ``params``/``opt_state``) or a dict with keys ``"params"``
            and/or ``"opt_state"`` (e.g. ``{"params": init_params(cfg), "opt_state":
            tx.init(params)}``). Without a template the parameters come back as nested
            dicts/lists, and the optimiser state as saved (its tuples and flm's state NamedTuples,
            which the checkpoint records by name), so ``tx.update`` takes it; a checkpoint written
            before that record (or holding other NamedTuples) gives nested dicts/lists.
        verify: check the stored CRC-32 of the tensor bytes, so a flipped data byte raises
            instead of loading a silently different model. Opt-in because it is not cheap
            next to the load itself: on the 22.7M-parameter handout model with AdamW state
            (272 MB, page-cached) a load takes ~0.032 s and the check adds ~0.064 s, about 2× the
            load (CRC-32 at ~4 GB/s on 2 cores; ``python bench/checkpoint.py``). The ``flm`` commands
            (resume, generate, eval, export) always verify. Files without a checksum load
            without the check.

    Returns:
        A :class:`Checkpoint`.

    Raises:
        ValueError: naming the file and key, for an unreadable, truncated or corrupt file, a
            checksum mismatch, a missing or unexpected key, or a shape mismatch against ``like``.

    Source: handout §5.2.
    """
    name = _name(src)
    flat, with_meta = _read_tensors(src, name)
    header = _parse_header(with_meta, name)
    stored = header.get("checksum")
    if verify and stored is not None:
        got = _checksum(flat)
        if stored.get("algorithm") != "crc32" or stored.get("value") != got:
            raise ValueError(
                f"load_checkpoint: {name} is corrupt: its tensor data has checksum {got}, "
                f"the file records {stored.get('value')!r}"
            )

    groups: dict[str, dict[str, torch.Tensor]] = {p: {} for p in _PREFIXES}
    for key, t in flat.items():
        prefix = key.split(".", 1)[0]
        if prefix not in groups:
            raise ValueError(f"load_checkpoint: {name} has an unexpected tensor {key!r}")
        groups[prefix][key] = t

    templates: dict[str, Any] = {}
    if isinstance(like, Checkpoint):
        templates = {"params": like.params, "opt_state": like.opt_state}
    elif isinstance(like, dict):
        unknown = set(like) - set(_PREFIXES)
        if unknown:
            raise ValueError(f"load_checkpoint: like has unknown keys {sorted(unknown)}; use 'params'/'opt_state'")
        templates = like
    elif like is not None:
        raise ValueError(f"load_checkpoint: like must be a Checkpoint or a dict, got {type(like).__name__}")

    trees: dict[str, Any] = {}
    for prefix in _PREFIXES:
        if prefix == "opt_state" and not header.get("has_opt_state", True):
            if templates.get("opt_state") is not None:
                raise ValueError(f"load_checkpoint: {name} holds no optimiser state, but a template was given")
            trees[prefix] = None
            continue
        if templates.get(prefix) is not None:
            trees[prefix] = _restore(prefix, groups[prefix], templates[prefix], name)
        elif prefix == "opt_state" and header.get("opt_state_tree") is not None:
            rest = dict(groups[prefix])
            trees[prefix] = _rebuild(header["opt_state_tree"], rest, "", _state_classes(), name)
            if rest:
                raise ValueError(
                    f"load_checkpoint: {name} has tensors its recorded structure lacks, e.g. {min(rest)!r}"
                )
        else:
            plen = len(prefix) + 1
            trees[prefix] = unflatten({k[plen:]: v for k, v in groups[prefix].items()}, fill_missing=True)
    rng = header.get("rng_state")
    rng_state = torch.frombuffer(bytearray(base64.b64decode(rng)), dtype=torch.uint8) if rng else None
    return Checkpoint(
        params=trees["params"],
        opt_state=trees["opt_state"],
        step=int(header.get("step", 0)),
        config=header.get("config"),
        metadata=header.get("metadata") or {},
        rng_state=rng_state,
    )


# ------------------------------------------------ shared with flm.sharded_checkpoint (same format)


def tensor_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """The CRC-32 a checkpoint records for ``tensors`` (``{key: tensor}``; independent of the file layout).

    Returns:
        Eight hex digits.
    """
    return _checksum(tensors)


def checkpoint_tensors(
    prefix: str, tree: Any, *, allow_nonfinite: bool = True, target: str = ""
) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores for ``tree``: ``{"<prefix>.<dotted path>": contiguous CPU tensor}``.

    Raises:
        ValueError: a non-tensor leaf, or (unless ``allow_nonfinite``) NaN/inf values (naming
            the key and ``target``).
    """
    return _tensor_dict(prefix, tree, allow_nonfinite=allow_nonfinite, target=target)


def describe_state(opt_state: Any) -> Any:
    """The JSON description of an optimiser state's structure a checkpoint header records
    (``opt_state_tree``), or ``None`` when it holds classes outside flm's state classes."""
    return _describe(opt_state, _state_classes())


def rebuild_state(desc: Any, flat: dict[str, torch.Tensor], name: str) -> Any:
    """The optimiser state ``desc`` (:func:`describe_state`) describes, with the ``opt_state.<path>``
    tensors of ``flat`` at its leaves (popped from ``flat``; what is left was not described).

    Raises:
        ValueError: a corrupt description or a missing tensor (naming ``name``).
    """
    return _rebuild(desc, flat, "", _state_classes(), name)


def restore_tree(prefix: str, flat: dict[str, torch.Tensor], template: Any, name: str) -> Any:
    """``template``'s structure with the ``<prefix>.<path>`` tensors of ``flat``, moved to each
    template leaf's device and dtype.

    Raises:
        ValueError: a missing or extra key, or a shape that differs from the template's.
    """
    return _restore(prefix, flat, template, name)


def config_json(config: Any) -> Any:
    """A config as a checkpoint header stores it (``TransformerConfig.to_dict()``, a dict, or ``None``).

    Raises:
        ValueError: another type.
    """
    return _config_to_json(config)


def flm_version() -> str:
    """The flm version a checkpoint header records."""
    return _flm_version()
