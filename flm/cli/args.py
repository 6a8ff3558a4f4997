"""Command-line flags generated from the config dataclasses, so every setting is reachable.

Each field of :class:`flm.model.TransformerConfig`, :class:`flm.train.TrainConfig`,
:class:`flm.config.DataConfig` and :class:`flm.config.SampleConfig` becomes one flag, named after
the field (``d_model`` → ``--d-model``), typed from its annotation, with its help text taken from
the class docstring's ``Attributes:`` section and its default from the resolved preset. Two
fields share a name (``eps``) and get explicit flags: ``--norm-eps`` (RMSNorm) and ``--adam-eps``.

Plain ``argparse`` built from ``dataclasses.fields`` rather than a library (tyro, jsonargparse):
the configs are flat frozen dataclasses, so ~150 readable lines cover them, with no new
dependency and full control over presets, ``--config`` files and one-line errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from typing import Any

from flm.cli.common import plain_text
from flm.config import PRESET_NOTES, PRESETS, SECTIONS, RunConfig, default_preset, load_config_file
from flm.download import DATASETS
from flm.model import CHOICES as MODEL_CHOICES
from flm.train.config import COMPILE_MODES, COMPILE_SCOPES, COMPUTE_DTYPES

__all__ = [
    "add_config_flags",
    "config_from_args",
    "field_docs",
    "flag_name",
    "help_text",
    "presets_epilog",
    "pre_parse",
]

_FLAG_NAMES = {("model", "eps"): "norm-eps", ("train", "eps"): "adam-eps", ("sample", "seed"): "sample-seed"}
_CHOICES = {
    **{("model", k): v for k, v in MODEL_CHOICES.items()},
    ("train", "dtype"): ("auto", *COMPUTE_DTYPES),
    ("train", "compile_scope"): COMPILE_SCOPES,
    ("train", "compile_mode"): COMPILE_MODES,
    ("data", "dataset"): tuple(sorted(DATASETS)),
}
_SKIP = {("train", "device")}  # added by hand: "auto" and a clearer help


def field_docs(cls: type) -> dict[str, str]:
    """``{field: description}`` from the ``Attributes:`` section of a dataclass's docstring."""
    doc = cls.__doc__ or ""
    if "Attributes:" not in doc:
        return {}
    body = doc.split("Attributes:", 1)[1]
    body = re.split(r"\n\s*\n\s*(?:Raises|Returns|Example)", body)[0]
    docs: dict[str, str] = {}
    current = None
    for line in body.splitlines():
        m = re.match(r"\s{4,8}(\w+): (.*)", line)
        if m and m.group(1) in {f.name for f in dataclasses.fields(cls)}:
            current = m.group(1)
            docs[current] = m.group(2).strip()
        elif current and line.strip():
            docs[current] += " " + line.strip()
    return docs


def help_text(doc: str, *, optional: bool = False) -> str:
    """A field's docstring description as ``--help`` text: plain text
    (:func:`flm.cli.common.plain_text`) without the docstring's own "(default)" marks (the help
    appends the preset's default once), and with ``None`` written ``none``, the value the flag
    takes for it (a field that cannot be ``None`` loses its "or None").

    Args:
        doc: the description from the ``Attributes:`` section.
        optional: whether the field accepts ``None`` (``--flag none``).

    Returns:
        One line of help text, without a final full stop.
    """
    text = plain_text(doc)
    text = re.sub(r"\s*\(default\)", "", text)  # '"pre" (default), "post"' → '"pre", "post"'
    text = text.replace("(default: ", "(")  # '"auto" (default: fused kernels)' → '"auto" (fused kernels)'
    if optional:
        text = re.sub(r"\bNone\b", "none", text)
    else:
        text = re.sub(r"\s+or None\b", "", text)
    return " ".join(text.split()).rstrip(".")


def _parse_optional(kind: type) -> Any:
    def parse(text: str) -> Any:
        if text.lower() in ("none", "null"):
            return None
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} or none, got {text!r}") from None

    parse.__name__ = kind.__name__
    return parse


def flag_name(section: str, name: str) -> str:
    """The command-line flag of a config field: ``flag_name("train", "batch_size") == "--batch-size"``.

    Args:
        section: ``"model"``, ``"train"``, ``"data"`` or ``"sample"``.
        name: the field's name in that section's dataclass.

    Returns:
        The flag, with the renames that keep flags unique (``model.eps`` is ``--norm-eps``).
    """
    return "--" + _FLAG_NAMES.get((section, name), name.replace("_", "-"))


def add_config_flags(
    parser: argparse.ArgumentParser, defaults: RunConfig, sections: tuple[str, ...] = tuple(SECTIONS)
) -> None:
    """Add one flag per config field (``dest = "<section>.<field>"``, absent unless given).

    Args:
        parser: where to add them (one argument group per section).
        defaults: the resolved config whose values the help shows as defaults.
        sections: which sections get flags.
    """
    for section in sections:
        cls = SECTIONS[section]
        hints = typing.get_type_hints(cls)
        docs = field_docs(cls)
        group = parser.add_argument_group(f"{section} settings")
        for f in dataclasses.fields(cls):
            if (section, f.name) in _SKIP:
                continue
            hint = hints[f.name]
            args = typing.get_args(hint)
            optional = isinstance(hint, types.UnionType) and type(None) in args
            base = next((a for a in args if a is not type(None)), hint) if optional else hint
            current = getattr(getattr(defaults, section), f.name)
            kw: dict[str, Any] = {"dest": f"{section}.{f.name}", "default": argparse.SUPPRESS}
            shown = " ".join(map(str, current)) if isinstance(current, tuple) else current
            text = help_text(docs.get(f.name, ""), optional=optional)
            kw["help"] = f"{text} (default: {'none' if current is None else shown})".replace("%", "%%")
            if base is bool or (isinstance(hint, types.UnionType) and set(args) == {bool, str}):
                kw["action"] = argparse.BooleanOptionalAction  # bool | "auto": neither flag keeps auto
            elif typing.get_origin(base) is tuple:
                inner = typing.get_args(base)
                kw["type"] = inner[0]
                kw["nargs"] = "+" if inner[-1] is Ellipsis else len(inner)
                kw["metavar"] = f.name.upper().rstrip("S") if inner[-1] is Ellipsis else ("B1", "B2")
            else:
                kw["type"] = _parse_optional(base) if optional else base
                kw["metavar"] = f.name.upper()
                if (section, f.name) in _CHOICES:
                    kw["choices"] = _CHOICES[(section, f.name)]
                    del kw["metavar"]
            group.add_argument(flag_name(section, f.name), **kw)
        if section == "train":
            group.add_argument(
                "--device",
                dest="train.device",
                default=argparse.SUPPRESS,
                help=f"cpu, cuda, cuda:N, mps or auto = the best available (default: {defaults.train.device})",
            )


def presets_epilog() -> str:
    """The presets, described for ``--help``."""
    lines = ["presets (--preset; the default is handout with CUDA, cpu-small without):"]
    for name, preset in PRESETS.items():
        m, t = preset["model"], preset["train"]
        tokens = t["batch_size"] * m["context_length"] * t["max_iters"]
        lines.append(
            f"  {name:15s} {PRESET_NOTES[name]}; d_model {m['d_model']}, {m['num_layers']} layers, "
            f"{t['max_iters']} steps x {t['batch_size']} x {m['context_length']} = {tokens / 1e6:.2f}M tokens"
        )
    lines.append("settings apply in order: defaults < preset < --config file < flags; --print-config shows the result")
    return "\n".join(lines)


def pre_parse(argv: list[str]) -> tuple[str | None, str | None]:
    """Find ``--preset`` and ``--config`` in ``argv`` before the full parser exists (so ``--help``
    shows the chosen preset's values as defaults). Unknown flags are ignored here."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--preset")
    p.add_argument("--config")
    known, _ = p.parse_known_args(argv)
    return known.preset, known.config


def base_config(preset: str | None, config_file: str | None) -> tuple[RunConfig, dict[str, Any]]:
    """The defaults a command line starts from: the preset (from the flag, else the config file,
    else :func:`flm.config.default_preset`) and the config file's settings.

    Raises:
        ValueError: an unknown preset or an unreadable/invalid config file.
    """
    layer = load_config_file(config_file) if config_file else {}
    preset = preset or layer.get("preset") or default_preset()
    return RunConfig.resolve(preset, layer), layer


_CLASS_SECTION = {cls.__name__: section for section, cls in SECTIONS.items()}


def flag_error(err: ValueError) -> ValueError:
    """Rewrite a config class's message in terms of its flags: ``TrainConfig: grad_clip must …``
    → ``--grad-clip must …``, ``DataConfig: give both train_text and valid_text`` → ``give both
    --train-text and --valid-text``, ``need min_lr ≤ lr, got min_lr=5.0`` → ``need --min-lr ≤ --lr,
    got --min-lr=5.0``. A field name becomes its flag where it starts the message, contains an
    underscore, precedes ``=`` or follows a comparison; other words are left alone.

    Args:
        err: the config class's error.

    Returns:
        A ``ValueError`` with the rewritten message (other messages unchanged).
    """
    text = str(err)
    m = re.match(r"(" + "|".join(_CLASS_SECTION) + r"): (.*)", text, re.DOTALL)
    if m is None:
        return ValueError(text)
    section, body = _CLASS_SECTION[m.group(1)], m.group(2)
    names = sorted((f.name for f in dataclasses.fields(SECTIONS[section])), key=len, reverse=True)

    def repl(n: re.Match[str]) -> str:
        name, before, after = n.group(1), body[: n.start()], body[n.end() : n.end() + 1]
        if n.start() == 0 or "_" in name or after == "=" or re.search(r"(?:[≤≥<>]|\bby) $", before):
            return flag_name(section, name)
        return name

    return ValueError(re.sub(r"(?<![\w\-.'\"])(" + "|".join(names) + r")\b(?![-'\"])", repl, body))


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run config a parsed command line describes: defaults < preset < ``--config`` < flags.

    ``--tokens N`` sets ``max_iters = round(N / (batch_size × context_length))``.

    Raises:
        ValueError: invalid settings (naming the flag's field), ``--tokens`` with ``--max-iters``,
            or a non-positive ``--tokens``.
    """
    preset = getattr(args, "preset", None)
    _, file_layer = base_config(preset, getattr(args, "config", None))
    preset = preset or file_layer.get("preset") or default_preset()
    flags: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        if "." in dest:
            section, name = dest.split(".", 1)
            flags.setdefault(section, {})[name] = value
    try:
        cfg = RunConfig.resolve(preset, file_layer, flags)
    except ValueError as err:
        raise flag_error(err) from None
    tokens = getattr(args, "tokens", None)
    if tokens is not None:
        if "max_iters" in flags.get("train", {}):
            raise ValueError("give --tokens or --max-iters, not both")
        if not tokens > 0:
            raise ValueError(f"--tokens must be positive, got {tokens:g}")
        per_step = cfg.train.batch_size * cfg.model.context_length
        if tokens < per_step:
            raise ValueError(
                f"--tokens {tokens:g} is less than one step ({cfg.train.batch_size} sequences x "
                f"{cfg.model.context_length} tokens = {per_step})"
            )
        flags.setdefault("train", {})["max_iters"] = round(tokens / per_step)
        try:
            cfg = RunConfig.resolve(preset, file_layer, flags)
        except ValueError as err:
            raise flag_error(err) from None
    return cfg
