"""The configuration of a whole run: model, training, data and sampling settings, and the presets.

A :class:`RunConfig` is four frozen, validated dataclasses — :class:`flm.model.TransformerConfig`,
:class:`flm.train.TrainConfig`, :class:`DataConfig` and :class:`SampleConfig` — plus the preset it
started from. It round-trips through JSON and TOML files (``RUN/config.json`` is one), and the
``flm`` command line generates one flag per field from these classes (:mod:`flm.cli.args`).

Presets (:data:`PRESETS`) are partial configs; a run starts from the dataclass defaults, applies
a preset, then a ``--config`` file, then the explicit flags.

Source: CS336 assignment 1 handout §7.2 (the TinyStories settings and the low-resource tips).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from flm.model import TransformerConfig
from flm.sampling import check_sampling
from flm.train.config import TrainConfig

__all__ = [
    "DataConfig",
    "SampleConfig",
    "RunConfig",
    "PRESETS",
    "PRESET_NOTES",
    "DEFAULT_PROMPTS",
    "default_preset",
    "load_config_file",
    "missing_paths",
    "PATH_FIELDS",
]

DEFAULT_PROMPTS = ("Once upon a time", "Lily and her dog", "One day, a little boy named Tom")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it is tokenized.

    Attributes:
        dataset: the data set to download when no text files are given: tinystories or owt.
        data_dir: where downloaded data sets are kept.
        train_text: the training text (documents separated by <|endoftext|>); None downloads the data set.
        valid_text: the validation text; give both or neither.
        train_bytes: use only the first this many bytes of the training text (cut at a document boundary) for the tokenizer and the training tokens (None: all of it).
        num_workers: processes for tokenizer training and encoding (None: automatic).
    """

    dataset: str = "tinystories"
    data_dir: str = "data"
    train_text: str | None = None
    valid_text: str | None = None
    train_bytes: int | None = None
    num_workers: int | None = None

    def __post_init__(self) -> None:
        from flm.download import DATASETS

        if self.dataset not in DATASETS:
            raise ValueError(f"DataConfig: dataset must be one of {sorted(DATASETS)}, got {self.dataset!r}")
        if (self.train_text is None) != (self.valid_text is None):
            raise ValueError("DataConfig: give both train_text and valid_text, or neither (to download the data set)")
        for name in ("train_bytes", "num_workers"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"DataConfig: {name} must be a positive integer or None, got {v!r}")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """How the samples at the end of a run (and ``flm generate`` by default) are decoded.

    Attributes:
        prompts: the prompts to continue.
        max_new_tokens: most tokens to generate per prompt.
        temperature: softmax temperature (0 = greedy).
        top_p: nucleus threshold in (0, 1].
        top_k: keep only the k most likely tokens (0 or ``None`` = off).
        seed: seeds the sampling generator.
    """

    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    max_new_tokens: int = 256
    temperature: float = 0.8
    top_p: float = 0.9
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or not 0 <= self.max_new_tokens <= 1_000_000:
            raise ValueError(f"SampleConfig: max_new_tokens must be in [0, 1000000], got {self.max_new_tokens!r}")
        check_sampling(self.temperature, self.top_p, self.top_k, where="SampleConfig: ")


# Partial configs. "handout" is the handout's TinyStories model and budget (§7.2): 128 × 10,000
# steps × 256 tokens = 327.68M tokens (an estimate of ~3 min of training on one H200 at the 2.11M
# tokens/s measured there with bf16 + compile, torch 2.11; days on a laptop CPU). "handout-lowres"
# is the handout's CPU/MPS tip (§7.2): 32 × 5,000 × 256 = 40.96M tokens, target val loss ≤ 2.0.
# "cpu-small" finishes in minutes on a 2-core CPU; "tiny" is the CI smoke test.
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "handout": {
        "model": dict(vocab_size=10_000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344),
        "train": dict(
            batch_size=128,
            max_iters=10_000,
            lr=3e-3,
            min_lr=3e-4,
            warmup_iters=500,
            weight_decay=0.1,
            grad_clip=1.0,
            eval_interval=500,
            eval_batches=50,
            checkpoint_interval=1000,
            log_interval=50,
        ),
    },
    "handout-lowres": {
        "model": dict(vocab_size=10_000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344),
        "train": dict(
            batch_size=32,
            max_iters=5_000,
            lr=3e-3,
            min_lr=3e-4,
            warmup_iters=250,
            weight_decay=0.1,
            grad_clip=1.0,
            eval_interval=250,
            eval_batches=50,
            checkpoint_interval=500,
            log_interval=25,
        ),
    },
    "cpu-small": {
        "model": dict(vocab_size=4096, context_length=128, d_model=256, num_layers=4, num_heads=8, d_ff=704),
        "train": dict(
            batch_size=16,
            max_iters=600,
            lr=2e-3,
            min_lr=2e-4,
            warmup_iters=60,
            weight_decay=0.1,
            grad_clip=1.0,
            eval_interval=50,
            eval_batches=None,
            checkpoint_interval=200,
            log_interval=10,
        ),
        "data": dict(train_bytes=32 << 20),
    },
    "tiny": {
        "model": dict(vocab_size=300, context_length=32, d_model=32, num_layers=2, num_heads=2, d_ff=64),
        "train": dict(
            batch_size=8,
            max_iters=40,
            lr=3e-3,
            min_lr=3e-4,
            warmup_iters=5,
            weight_decay=0.1,
            grad_clip=1.0,
            eval_interval=20,
            eval_batches=4,
            checkpoint_interval=20,
            log_interval=5,
        ),
        "sample": dict(max_new_tokens=32),
    },
}
PRESET_NOTES = {
    "handout": "the handout's TinyStories run: 22.7M params, 327.68M tokens (est. ~3 min of training on one H200 with bf16 + compile)",
    "handout-lowres": "the handout's CPU/MPS budget: 40.96M tokens, val loss ≤ 2.0 expected (hours on a laptop)",
    "cpu-small": "5.3M params, 1.23M tokens: minutes on a 2-core CPU (the default without a GPU)",
    "tiny": "a smoke test: seconds",
}


def default_preset() -> str:
    """``"handout"`` where CUDA is available, else ``"cpu-small"`` (finishes in minutes without a GPU)."""
    import torch

    return "handout" if torch.cuda.is_available() else "cpu-small"


def _build(cls: type, values: dict[str, Any], section: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"config: unknown {section} setting(s) {unknown}; known: {sorted(names)}")
    values = dict(values)
    for f in dataclasses.fields(cls):  # JSON/TOML have lists where the dataclass has tuples
        if f.name in values and isinstance(values[f.name], list):
            values[f.name] = tuple(values[f.name])
    return cls(**values)


SECTIONS: dict[str, type] = {
    "model": TransformerConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "sample": SampleConfig,
}

# The DataConfig fields that name files or directories: a run's config.json stores them relative
# to the run directory, with the absolute path as a fallback (RunConfig.to_dict(run_dir)).
PATH_FIELDS = ("train_text", "valid_text", "data_dir")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything a run needs to know: model, training, data and sampling settings.

    Attributes:
        model: the Transformer.
        train: optimiser and loop settings.
        data: text sources and tokenization.
        sample: decoding of the samples.
        preset: the preset the settings started from (informational).
    """

    model: TransformerConfig
    train: TrainConfig
    data: DataConfig = DataConfig()
    sample: SampleConfig = SampleConfig()
    preset: str | None = None

    def to_dict(self, run_dir: str | os.PathLike | None = None) -> dict[str, Any]:
        """A JSON-serialisable dict with one key per section (``RUN/config.json``'s content).

        Args:
            run_dir: the directory the dict is saved in (``RUN`` for ``RUN/config.json``): the
                data paths (:data:`PATH_FIELDS`) are then written relative to it, so the run
                resumes from any working directory, and their absolute paths under ``"paths"``
                as a fallback (:func:`load_config_file` tries them in that order). ``None``:
                the paths as given.
        """
        out: dict[str, Any] = {"preset": self.preset}
        for name in SECTIONS:
            d = dataclasses.asdict(getattr(self, name))
            out[name] = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        if run_dir is not None:
            base = os.path.realpath(run_dir)  # no links left in it: "../" below is the real parent
            absolute = {k: os.path.abspath(v) for k in PATH_FIELDS if isinstance(v := out["data"][k], str)}
            for k, path in absolute.items():
                try:
                    out["data"][k] = os.path.relpath(path, base)
                except ValueError:  # pragma: no cover (Windows: another drive) — the absolute path
                    out["data"][k] = path
            out["paths"] = {"relative_to": "the directory of this file", "absolute": absolute}
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Build from :meth:`to_dict`'s output (missing sections take their defaults).

        Raises:
            ValueError: an unknown section or setting, or an invalid value.
        """
        # "auto" (written beside the sections) says why a setting was chosen, "paths" where the
        # data paths of a run's config.json point (load_config_file reads it): informational here.
        unknown = sorted(set(d) - set(SECTIONS) - {"preset", "auto", "paths"})
        if unknown:
            raise ValueError(f"config: unknown section(s) {unknown}; known: {sorted(SECTIONS)} and 'preset'")
        for required in ("model", "train"):
            if required not in d:
                raise ValueError(f"config: the {required!r} section is missing")
        parts = {name: _build(kind, d.get(name) or {}, name) for name, kind in SECTIONS.items() if name in d}
        return cls(preset=d.get("preset"), **parts)

    @classmethod
    def resolve(cls, preset: str | None = None, *layers: dict[str, dict[str, Any]]) -> RunConfig:
        """Dataclass defaults ← ``preset`` ← each layer in turn (partial ``{section: {field: value}}``).

        Args:
            preset: a key of :data:`PRESETS` (``None``: :func:`default_preset`).
            *layers: partial configs, later ones win (e.g. a config file, then the flags).

        Raises:
            ValueError: an unknown preset, section or setting, or an invalid resulting value.
        """
        preset = preset or default_preset()
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
        merged: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        explicit: set[str] = set()
        for i, layer in enumerate((PRESETS[preset], *layers)):
            for section, values in layer.items():
                if section in ("preset", "auto", "paths"):  # why settings were chosen; saved paths (informational)
                    continue
                if section not in merged:
                    raise ValueError(f"config: unknown section {section!r}; known: {sorted(SECTIONS)}")
                merged[section].update(values)
                if i > 0:
                    explicit.update(f"{section}.{k}" for k in values)
        train = merged["train"]
        warmup = train.get("warmup_iters", TrainConfig.warmup_iters)
        max_iters = train.get("max_iters", TrainConfig.max_iters)
        if "train.warmup_iters" not in explicit and warmup > max_iters:  # a preset's warm-up on a shorter run
            train["warmup_iters"] = max_iters
        return cls.from_dict({"preset": preset, **merged})

    def replace(self, **sections: dict[str, Any]) -> RunConfig:
        """A copy with some fields changed: ``cfg.replace(train={"lr": 1e-3}, model={"norm": "post"})``.

        Args:
            **sections: section name (``model``, ``train``, ``data``, ``sample``) -> field changes.

        Returns:
            A new :class:`RunConfig`; each changed section is validated again.

        Raises:
            ValueError: an unknown section or a rejected value; ``TypeError``: an unknown field.
        """
        parts = {}
        for name, changes in sections.items():
            if name not in SECTIONS:
                raise ValueError(f"config: unknown section {name!r}")
            parts[name] = dataclasses.replace(getattr(self, name), **changes)
        return dataclasses.replace(self, **parts)

    @property
    def tokens(self) -> int:
        """Training tokens of the run: ``batch_size × context_length × max_iters``."""
        return self.train.batch_size * self.model.context_length * self.train.max_iters


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a run config file (``.json`` or ``.toml``) into a partial ``{section: {field: value}}`` dict.

    Args:
        path: the file; a run directory's own ``config.json`` loads back.

    Returns:
        The settings it holds (with an optional top-level ``"preset"``).

    Raises:
        ValueError: a missing/unreadable file, bad syntax (naming the file), or another suffix.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as err:
        raise ValueError(f"cannot read config file {p}: {err.strerror or err}") from None
    if p.suffix == ".json":
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"config file {p} is not valid JSON: {err}") from None
    elif p.suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"config file {p} is not valid TOML: {err}") from None
    else:
        raise ValueError(f"config file {p}: use a .json or .toml file")
    if not isinstance(data, dict) or not all(isinstance(v, dict) for k, v in data.items() if k != "preset"):
        raise ValueError(f"config file {p}: expected sections such as {{'model': {{...}}, 'train': {{...}}}}")
    for name, (found, _) in _saved_paths(data, p).items():
        data["data"][name] = found
    return data


def missing_paths(path: str | os.PathLike) -> dict[str, str]:
    """The data paths of a run's ``config.json`` that point nowhere, each with a message that
    names the file and the places tried (see :func:`load_config_file`).

    Args:
        path: the config file.

    Returns:
        ``{field: message}`` for each of :data:`PATH_FIELDS` set to a path that exists in none of
        the places tried (empty for a file whose paths are all found, or that stores none).

    Raises:
        ValueError: as :func:`load_config_file`.
    """
    load_config_file(path)  # the same checks
    p = Path(path)
    data = json.loads(p.read_bytes()) if p.suffix == ".json" else {}
    return {name: why for name, (_, why) in _saved_paths(data, p).items() if why}


def _saved_paths(data: dict[str, Any], path: Path) -> dict[str, tuple[str, str | None]]:
    """Where the data paths of the config file ``path`` (parsed: ``data``) point:
    ``{field: (path to use, None)}``, or ``(the stored value, why it was not found)``.

    A run's ``config.json`` written with :meth:`RunConfig.to_dict(run_dir) <RunConfig.to_dict>`
    (it has ``"paths"``) is tried relative to its directory, then at the absolute path saved
    beside it. An older ``config.json`` (paths relative to the working directory of the first
    run) is tried relative to its directory, then as given (relative to the current working
    directory). Other config files keep their paths as given (relative to the working
    directory), as a hand-written file always did. ``data_dir`` (where a data set is downloaded
    to) is never missing: it falls back to the first place tried.
    """
    section, saved = data.get("data"), data.get("paths")
    if not isinstance(section, dict) or (saved is None and path.name != "config.json"):
        return {}
    absolute = saved.get("absolute") if isinstance(saved, dict) else None
    base = os.path.realpath(path.parent)
    out: dict[str, tuple[str, str | None]] = {}
    for name in PATH_FIELDS:
        value = section.get(name)
        if not isinstance(value, str):
            continue
        tried = [os.path.normpath(os.path.join(base, value))]  # an absolute value stays itself
        if saved is None:
            tried.append(value)  # an older config.json: as given, from the working directory
        elif isinstance(absolute, dict) and isinstance(absolute.get(name), str):
            tried.append(absolute[name])
        found = next((t for t in tried if os.path.exists(t)), None)
        if found is not None:
            out[name] = (found, None)
        elif name == "data_dir":
            out[name] = (tried[0] if saved is not None else value, None)
        else:
            places = " nor at ".join(dict.fromkeys(os.path.abspath(t) for t in tried))
            out[name] = (tried[0] if saved is not None else value, f"{path}: data.{name} {value!r} is not at {places}")
    return out
