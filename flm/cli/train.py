"""``flm train``: data → BPE tokenizer → token files → training → evaluation of the best model → samples.

The command first makes a plan and checks all of it before it writes or deletes anything: the
settings, the device, the text files (or the data set to download), the run directory (a run
already there needs ``--resume`` or ``--overwrite``), a resumed checkpoint's model and tokenizer
against the current settings, and that the validation text holds at least one window. It prints
the plan (tokens, estimated time, download size — only the ``--train-bytes`` prefix of a data
set's training file when that is all the run reads —, and a warning when the run would pass over
its training text more than 20 times) and only then downloads, writes the tokenizer
and token files, trains (:func:`flm.train.train_loop`), evaluates ``best.safetensors`` on every
validation token (``results.json``) and writes samples (``samples.txt``). Cached stages are
reused when their inputs have not changed. ``--dry-run`` stops after the plan and its checks,
having written and downloaded nothing; a download that cannot reach its server fails with one
line naming what works offline.

Source: CS336 assignment 1 handout §5.3, §7.2; ``shared/spec/training_pipeline_notes.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from flm import distributed, manifest
from flm._io import atomic_write_json, atomic_write_text, run_lock
from flm.cli.args import add_config_flags, base_config, config_from_args, presets_epilog
from flm.cli.common import (
    OutOfMemory,
    Terminated,
    UsageError,
    format_bytes,
    is_memory_error,
    log,
    logger,
    memory_error_bytes,
    pick_device,
)
from flm.cli.memory import check_memory, memory_driver, step_memory
from flm.cli.plan import Plan
from flm.cli.train_data import (
    check_data,
    data_line,
    download_once,
    dry_run_checks,
    write_data,
)
from flm.config import PATH_FIELDS, RunConfig, default_preset, missing_paths
from flm.download import (
    DATASETS,
    check_local_size,
    prefix_path,
    prefix_stamp,
)
from flm.model import count_params, train_step_flops
from flm.progress import format_count, format_duration
from flm.runs import (
    BEST,
    cached_tokenizer,
    prepare_tokens,
    run_state,
    tokenizer_stamp,
    unigram_entropy,
)
from flm.sharded_checkpoint import list_all_checkpoints
from flm.tokenizer import EOS_TOKEN, Tokenizer
from flm.train import evaluate, train_loop
from flm.train.checkpointer import model_config_changes, newest_loadable
from flm.train.config import compile_mode_problem, resolve_auto
from flm.train.metrics import device_peak_flops

__all__ = [
    "add_parser",
    "run",
    "Plan",
    "make_plan",
    "describe",
    "execute",
    "resolve_settings",
    "check_data",
    "write_data",
]

# Rough fractions of the peak FLOP/s a step reaches, for the time estimate only (measured on a
# 2-core CPU for the cpu-small and handout models; GPU values are conservative guesses).
_EFFICIENCY = {("cpu", False): 0.6, ("cpu", True): 0.65, ("cuda", False): 0.25, ("cuda", True): 0.4}


def add_parser(sub: Any, argv: list[str]) -> None:
    """Register ``flm train``; ``argv`` is pre-scanned for ``--preset``/``--config`` (help defaults)."""
    from flm.cli.args import pre_parse

    preset, config_file = pre_parse(argv)
    try:
        defaults, _ = base_config(preset, config_file)
    except ValueError:
        defaults, _ = base_config(None, None)  # the error is reported when the command runs
    p = sub.add_parser(
        "train",
        help="train a tokenizer and a model end to end (the main job)",
        description=__doc__.split("\n\n")[0],
        epilog=presets_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_run_arguments(p)
    add_dry_run_argument(p)
    add_config_flags(p, defaults)
    p.set_defaults(handler=run)


def add_dry_run_argument(p: argparse.ArgumentParser) -> None:
    """``--dry-run``: print the plan and run every check, write nothing (``flm train``, ``flm sweep``)."""
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan and run every check, then stop: nothing is written or downloaded "
        "(a data set still to fetch is reported as 'would download N bytes')",
    )


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The flags every config-driven command shares (preset, config file, run dir, resume …)."""
    g = p.add_argument_group("run")
    g.add_argument("--preset", help="start from a named configuration (see below)")
    g.add_argument("--config", help="load settings from a .json or .toml file (e.g. a run's own config.json)")
    g.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    g.add_argument("--out-dir", help="the run directory (default: runs/<preset>)")
    g.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        type=_resume_value,
        metavar="auto",
        help="continue the run in --out-dir from its newest good checkpoint; --resume auto: resume if "
        "there is one, else start (what a torchrun --max-restarts restart should run)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="delete the run in --out-dir (checkpoints, metrics, results) and start over",
    )
    g.add_argument("--tokens", type=float, help="total training tokens (sets --max-iters from batch size and context)")
    g.add_argument(
        "--threads", type=int, help="CPU threads for PyTorch (default: all cores; OMP_NUM_THREADS also works)"
    )


def _resume_value(text: str) -> str:
    """``--resume``'s optional value: ``auto`` (resume if the run directory holds a checkpoint, else
    start); ``--resume`` alone is ``True``.

    Raises:
        argparse.ArgumentTypeError: any other value.
    """
    if text != "auto":
        raise argparse.ArgumentTypeError(f"expected nothing or 'auto', got {text!r}")
    return text


def resolve_settings(cfg: RunConfig) -> tuple[RunConfig, dict[str, str]]:
    """Resolve the device and the ``"auto"`` train settings (dtype, compile, TF32) for this machine.

    Args:
        cfg: the run config as given (device and train settings possibly ``"auto"``).

    Returns:
        ``(cfg, auto)``: the config with concrete values, and ``{field: reason}`` for each field that
        was ``"auto"`` (empty on ``--resume``, whose config.json already holds concrete values).

    Raises:
        UsageError: the device is unknown or unavailable, or the compile mode cannot apply on it.
    """
    device = pick_device(cfg.train.device)
    train, reasons = resolve_auto(cfg.train.replace(device=device))
    problem = compile_mode_problem(train, torch.device(device).type)
    if problem:
        raise UsageError(problem)
    auto = {r.split(" ", 1)[0]: r for r in reasons}
    return cfg.replace(train=train.to_dict()), auto


def _check_text(path: str, role: str, min_bytes: int) -> None:
    p = Path(path)
    if not p.exists():
        raise UsageError(f"--{role}-text {path}: no such file")
    if not p.is_file():
        raise UsageError(f"--{role}-text {path}: not a regular file")
    if not os.access(p, os.R_OK):
        raise UsageError(f"--{role}-text {path}: not readable (permission denied)")
    size = p.stat().st_size
    if size < min_bytes:  # a token is at least one byte, so fewer bytes cannot make one window
        raise UsageError(
            f"--{role}-text {path} has {size} bytes; at least context_length + 1 = {min_bytes} tokens are needed"
        )


def _wants_prefix(info: Any, pin: Any, train_bytes: int | None) -> bool:
    """Whether a run reading ``train_bytes`` of a data set's training file should download only a
    prefix: the (decompressed) file's pinned size is larger than the prefix would be."""
    whole = None if pin is None else pin.local_size if info.gzip else pin.size
    return train_bytes is not None and whole is not None and train_bytes + len(EOS_TOKEN) < whole


def _trained_on_prefix(plan: Plan) -> bool:
    """Whether the run being resumed was trained on the downloaded prefix (its cached tokenizer's
    stamp names the prefix file as it is now), so a whole file downloaded since does not change
    the text under it."""
    cfg = plan.config
    d = cfg.data
    path = prefix_path(d.dataset, d.data_dir, "train", d.train_bytes)
    if prefix_stamp(path) is None:
        return False
    try:
        stamp = tokenizer_stamp(path, cfg.model.vocab_size, d.train_bytes)
        return cached_tokenizer(plan.out_dir, stamp) is not None
    except (OSError, ValueError):
        return False


def _plan_prefix(plan: Plan, train_bytes: int, dry_run: bool) -> None:
    """Plan the training text as a downloaded prefix (:func:`flm.download.download_prefix`):
    reuse one already on disk, or plan its download; a plan note says it is unverified."""
    d = plan.config.data
    info = DATASETS[d.dataset]
    remote = info.files["train"]
    path = prefix_path(d.dataset, d.data_dir, "train", train_bytes)
    if path.exists() and prefix_stamp(path) is None:
        raise UsageError(
            f"{path} exists but flm's stamp ({path.name}.stamp.json) does not describe it; it is kept: "
            "move it away, or pass --train-text/--valid-text"
        )
    plan.texts["train"] = (str(path), train_bytes)
    plan.prefixes["train"] = train_bytes
    if not path.exists():  # of a gzip file: the compressed bytes that hold the prefix are not known in advance
        size = None if info.gzip else train_bytes + len(EOS_TOKEN)
        of = f"{remote} (decompressed)" if info.gzip else remote
        plan.downloads.append((d.dataset, f"the first {train_bytes:,} bytes of {of}", size))
    plan.notes.append(
        f"data: {path.name} is an unverified prefix: the first {train_bytes:,} bytes of {remote} (--train-bytes), "
        "cut at a document boundary; the pinned SHA-256 covers only the whole file, so this prefix is not "
        "digest-verified (without --train-bytes the whole file is downloaded and verified)"
    )


def make_plan(cfg: RunConfig, out_dir: Path, *, resume: bool | str, overwrite: bool, dry_run: bool = False) -> Plan:
    """Check everything that can be checked before writing; return the plan.

    With ``dry_run`` the checks write nothing at all (a data file's verified digest is not
    recorded in its stamp). ``resume="auto"`` (``--resume auto``) decides from the run directory
    (:func:`_auto_resume`): resume when it holds a checkpoint, else start; ``plan.resume`` holds
    the decision.

    Args:
        cfg: the run config as given.
        out_dir: the run directory (resolved).
        resume: ``True`` (``--resume``), ``"auto"`` (``--resume auto``) or ``False``.
        overwrite: ``--overwrite``.
        dry_run: ``--dry-run``.

    Returns:
        The checked :class:`Plan`.

    Raises:
        UsageError: contradictory flags, an unavailable device, missing or too-short texts, a run
            directory that holds a run (without ``--resume``/``--overwrite``), or a checkpoint
            whose model or tokenizer differs from the current settings.
    """
    if resume and overwrite:
        raise UsageError("give --resume or --overwrite, not both")
    cfg, auto = resolve_settings(cfg)
    device = cfg.train.device
    if cfg.train.compile and device.startswith("mps"):
        raise UsageError("--compile on MPS needs the aot_eager backend; run without --compile on MPS")
    for flag, package, wanted in (
        ("--tensorboard", "tensorboard", cfg.train.tensorboard),
        ("--wandb", "wandb", cfg.train.wandb),
    ):
        if wanted and importlib.util.find_spec(package) is None:
            raise UsageError(f"{flag} needs the {package} package: pip install {package}")
    plan = Plan(cfg, out_dir, resume, auto=auto, dry_run=dry_run)
    if cfg.model.vocab_size < 256 + 1:  # the tokenizer has one id per byte, plus <|endoftext|>
        raise UsageError(f"--vocab-size {cfg.model.vocab_size} is smaller than 256 bytes + 1 special token = 257")
    if cfg.data.train_bytes is not None and cfg.data.train_bytes < cfg.model.context_length + 1:
        raise UsageError(
            f"--train-bytes {cfg.data.train_bytes} is less than context_length + 1 = {cfg.model.context_length + 1} "
            "(a token is at least one byte)"
        )
    plan.notes.append(check_memory(cfg))
    need = cfg.model.context_length + 1
    d = cfg.data
    if d.train_text is not None:
        _check_text(d.train_text, "train", need)
        _check_text(d.valid_text, "valid", need)
        plan.texts = {"train": (d.train_text, d.train_bytes), "valid": (d.valid_text, None)}
        plan.train_text_bytes = Path(d.train_text).stat().st_size
    else:
        info = DATASETS[d.dataset]
        for split in info.files:
            local = Path(d.data_dir) / info.local_name(split)
            pin = info.pins.get(split)
            plan.texts[split] = (str(local), d.train_bytes if split == "train" else None)
            if split == "train" and local.is_file():
                plan.train_text_bytes = local.stat().st_size
            elif split == "train" and pin is not None:
                plan.train_text_bytes = pin.local_size if info.gzip else pin.size
            if (
                split == "train"
                and _wants_prefix(info, pin, d.train_bytes)
                and (not local.is_file() or (resume and _trained_on_prefix(plan)))
            ):
                _plan_prefix(plan, d.train_bytes, dry_run)
            elif not local.is_file():
                plan.downloads.append((d.dataset, info.files[split], pin.size if pin else None))
            elif pin is not None:
                try:
                    check_local_size(local, pin, gzip=info.gzip, record=not dry_run)
                except ValueError as err:
                    raise UsageError(str(err)) from None
    if plan.train_text_bytes is not None and d.train_bytes is not None:
        plan.train_text_bytes = min(plan.train_text_bytes, d.train_bytes)
    try:
        state = run_state(out_dir)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if state.refused:  # the user's files, links, changed files: never touched, --overwrite or not
        raise UsageError(manifest.refusal_message(state.refused, out_dir))
    restart = False
    if resume == "auto":
        resume, restart = _auto_resume(plan, state)
        plan.resume = resume
    if state.has_run and not (resume or overwrite or restart):
        where = f" (newest checkpoint: step {state.last_step})" if state.last_step is not None else ""
        raise UsageError(
            f"--out-dir {out_dir} already holds a run{where}; pass --resume to continue it or --overwrite to start over"
        )
    if state.foreign and not (resume or overwrite):
        names = ", ".join(p.name for p in state.foreign[:3]) + (" …" if len(state.foreign) > 3 else "")
        raise UsageError(
            f"--out-dir {out_dir} holds files flm did not write ({names}); use another --out-dir, "
            "or pass --overwrite to start a run beside them (they are kept)"
        )
    if overwrite or restart:
        plan.remove = state.removable
    if resume:
        _check_resume(plan, state.checkpoints)
    return plan


def _auto_resume(plan: Plan, state: Any) -> tuple[bool, bool]:
    """``--resume auto``'s decision from what the run directory holds (the same on every rank of
    a torchrun job that reads the same directory; :func:`_agree_on_resume` checks it).

    - a checkpoint: resume, as ``--resume`` (a damaged or mismatched one is refused as there: the
      decision never throws training away);
    - nothing of a run (a missing or empty directory, or only cached data): start;
    - a run that stopped before its first checkpoint (metrics or a best model, no checkpoint and
      no ``results.json``): start over, removing its outputs as ``--overwrite`` would — only files
      the manifest shows flm wrote (the plan has refused the others already).

    Args:
        plan: the plan (gets a note saying what was decided).
        state: the run directory's :class:`flm.runs.RunState`.

    Returns:
        ``(resume, restart)``: whether to resume, and whether a stopped run's outputs go.

    Raises:
        UsageError: a finished run (``results.json``) without a checkpoint to resume from.
    """
    out = plan.out_dir
    if state.checkpoints:
        return True, False
    if not state.has_run:
        plan.notes.append(f"--resume auto: starting: no checkpoint to resume in {out}")
        return False, False
    if any(p.name == "results.json" for p in state.outputs):
        raise UsageError(
            f"--resume auto: {out} holds a finished run (results.json) but no checkpoint to resume from; "
            "pass --overwrite to start over, or use another --out-dir"
        )
    plan.restart = True
    plan.notes.append(
        f"--resume auto: starting over: no checkpoint to resume in {out}; the run there stopped before its "
        "first checkpoint"
    )
    return False, True


def _check_resume(plan: Plan, checkpoints: list[Path]) -> None:
    """Pick the newest checkpoint that loads, verifies (CRC) and is finite, as the loop will.

    Raises:
        UsageError: no checkpoint at all, or the newest readable one has other model settings.
        ValueError: no checkpoint loads (each named with its reason); nothing has been changed.
    """
    cfg = plan.config
    if not checkpoints:
        raise UsageError(
            f"--resume: {plan.out_dir} holds no checkpoint to resume from; run without --resume to start a new run"
        )
    skipped: list[str] = []

    def check(path: Path, header: dict[str, Any]) -> None:
        saved = header.get("config") or {}
        changes = model_config_changes(saved.get("model", {}), cfg.model)
        if changes:
            raise UsageError(
                f"--resume: {path.name} was trained with other model settings ({'; '.join(changes)}); "
                "drop those flags, or start a new run with --overwrite or another --out-dir"
            )
        now = cfg.train.to_dict()
        was = saved.get("train", {})
        plan.train_changes = [
            f"{k} {was[k]!r} → {now[k]!r}"
            for k in now
            if k in was
            and was[k] != now[k]
            and k not in ("device", "compile", "compile_scope", "compile_mode", "tensorboard", "wandb", "peak_flops")
        ]

    found = newest_loadable(checkpoints, check=check, skip=lambda path, why: skipped.append(f"{path.name}: {why}"))
    if found is not None:  # the one the loop's Checkpointer.resume takes (the same function)
        path, header, _ = found
        plan.resume_from = (path, int(header.get("step", 0)))
        plan.notes.append(f"resume from {path.name} (step {plan.resume_from[1]})")
        return
    raise ValueError(
        f"--resume: none of the {len(checkpoints)} checkpoint(s) in {plan.out_dir} can be loaded "
        f"({'; '.join(skipped)}); nothing was changed: move the damaged files away to resume from an older one, "
        "or start over with --overwrite"
    )


def _estimate(cfg: RunConfig) -> tuple[float, float | None]:
    flops = train_step_flops(cfg.model, cfg.train.batch_size) * cfg.train.max_iters
    device = torch.device(cfg.train.device)
    peak = cfg.train.peak_flops or device_peak_flops(device, cfg.train.compute_dtype)
    if not peak:
        return flops, None
    eff = _EFFICIENCY.get((device.type, cfg.train.compile), 0.3)
    return flops, flops / (peak * eff)


# Beyond this many passes over the training text, more steps mostly memorise it.
MAX_EPOCHS = 20


def bytes_per_token(vocab_size: int) -> float:
    """A rough bytes-per-token ratio of a byte-level BPE tokenizer on English text, for the plan's
    estimates only: 1 with the 256 bytes alone, rising to about 4 at 4,096 tokens and beyond
    (TinyStories: 4.07 at 4,096, 4.25 at 10,000)."""
    import math

    return min(4.0, 1.0 + 3.0 * math.log(max(vocab_size, 256) / 256) / math.log(16))


def epochs_warning(plan: Plan, train_tokens: int | None = None) -> str | None:
    """The warning for a run that would pass over its training text more than :data:`MAX_EPOCHS`
    times, or ``None``.

    Args:
        plan: the plan (its config's planned tokens, its ``train_text_bytes``).
        train_tokens: the training set's exact token count once encoded; ``None``: estimated
            from its bytes (:func:`bytes_per_token`).

    Returns:
        E.g. ``"training for ~1,500 epochs of the training text (327.68M tokens planned, the text
        ~213K tokens): …"``; ``None`` within :data:`MAX_EPOCHS` or when the text's size is unknown.
    """
    cfg = plan.config
    if train_tokens is None:
        if not plan.train_text_bytes:
            return None
        train_tokens = max(int(plan.train_text_bytes / bytes_per_token(cfg.model.vocab_size)), 1)
        about = "~"
    else:
        about = ""
    epochs = cfg.tokens / max(train_tokens, 1)
    if epochs <= MAX_EPOCHS:
        return None
    shown = f"{epochs:,.0f}" if epochs < 100 else f"{float(f'{epochs:.2g}'):,.0f}"
    return (
        f"training for ~{shown} epochs of the training text ({_count(cfg.tokens)} tokens planned, the text "
        f"{about}{_count(train_tokens)} tokens): beyond ~{MAX_EPOCHS} the model mostly memorises it; "
        "give more text (--train-text, --train-bytes) or train for fewer --tokens/--max-iters"
    )


def _count(n: float) -> str:
    """``327680000`` → ``"327.68M"``, ``213400`` → ``"213K"``, ``512`` → ``"512"``."""
    if n >= 1e6:
        return f"{n / 1e6:,.2f}M"
    return f"{n / 1e3:,.0f}K" if n >= 1e3 else f"{n:,.0f}"


def describe(plan: Plan) -> list[str]:
    """The plan as printable lines: model, tokens, estimated time, downloads, run directory."""
    cfg = plan.config
    m, t = cfg.model, cfg.train
    flops, seconds = _estimate(cfg)
    lines = [
        f"plan: preset {cfg.preset}, run dir {plan.out_dir}, device {t.device}, "
        + ("bf16 mixed precision" if t.compute_dtype is not None else "float32")
        + (
            (
                ", compiled (one block reused per layer; AdamW one leaf update)"
                if t.compile_scope == "blocks"
                else ", compiled" + ("" if t.compile_mode == "default" else f" (mode {t.compile_mode})")
            )
            if t.compile
            else ", eager"
        )
        + (", TF32 matmuls" if t.tf32 and t.device.startswith("cuda") else ""),
        f"  model: {count_params(m):,} parameters (d_model {m.d_model}, {m.num_layers} layers, {m.num_heads} heads, "
        f"d_ff {m.d_ff}, vocab {m.vocab_size}, context {m.context_length})",
        f"  training: {t.max_iters:,} steps x {t.batch_size} x {m.context_length} = {cfg.tokens / 1e6:,.2f}M tokens, "
        f"{flops / 1e15:,.2f} PFLOP" + (f", roughly {format_duration(seconds)} here" if seconds else ""),
    ]
    if plan.auto:
        lines.append("  auto: " + "; ".join(plan.auto.values()) + " (flags such as --dtype/--no-compile override)")
    if t.time_budget:
        lines.append(f"  time budget: {t.time_budget:g} min (training stops early and keeps the best model)")
    if plan.downloads:
        total = sum(b or 0 for *_, b in plan.downloads)
        files = ", ".join(f for _, f, _ in plan.downloads)
        unknown = [f for _, f, b in plan.downloads if b is None]
        rest = "an unknown number of bytes" if unknown else ""  # the files' list names them
        if plan.dry_run:
            size = " + ".join(x for x in (f"{total:,} bytes ({format_count(total)})" if total else "", rest) if x)
            lines.append(f"  dry run: would download {size}: {files} into {cfg.data.data_dir}; nothing was fetched")
        else:
            size = " + ".join(x for x in (format_count(total) if total else "", rest) if x)
            lines.append(f"  download: {files} ({size}) into {cfg.data.data_dir}")
    warning = epochs_warning(plan)
    if warning:
        lines.append(f"  warning: {warning}")
    if plan.remove:
        names = [p.name for p in plan.remove if p.parent == plan.out_dir]
        lines.append(
            f"  {'--resume auto' if plan.restart else '--overwrite'}: removing {len(plan.remove)} file(s) "
            "of the previous run: " + ", ".join(names[:12]) + (" …" if len(names) > 12 else "")
        )
    if plan.train_changes:
        lines.append("  resumed with changed settings: " + "; ".join(plan.train_changes))
    lines += [f"  {n}" for n in plan.notes]
    return lines


def execute(plan: Plan) -> dict[str, Any]:
    """Carry out a checked plan (see the module docstring); returns what ``results.json`` holds.

    Under ``torchrun`` the first rank to see each run directory prepares the data there (download,
    tokenizer, token files) while the other ranks wait: rank 0 alone on a shared file system, each
    node's first rank with node-local directories (the plan's ``data:`` line says which; the
    tokenizers and token counts are then checked to agree). Every rank trains; rank 0 evaluates
    and writes checkpoints and metrics.

    Raises:
        UsageError: a text that encodes to fewer than ``context_length + 1`` tokens, or a resumed
            checkpoint made with another tokenizer (found before anything is written).
        ValueError, OSError: failures while running (one line each in the CLI).
        KeyboardInterrupt: training was interrupted by Ctrl-C (its checkpoint is saved).
        Terminated: training was stopped by SIGTERM (its checkpoint is saved).
    """
    cfg, out = plan.config, plan.out_dir
    info = distributed.init_from_env(cfg.train.device)
    if info.enabled:
        plan.config = cfg = cfg.replace(train={"device": info.device})
    try:
        _agree_on_resume(plan, info)
        # The first rank to see each run directory prepares the data in it: rank 0 alone when
        # every node shares it, each node's first rank when the directories are node-local.
        prepares = info.is_main
        if info.enabled:
            owners = distributed.directory_owners(out)
            prepares = owners[info.rank] == info.rank
            line = data_line(len(set(owners)), distributed.node_count(), out)
            if cfg.train.shard and len(set(owners)) > 1:  # every rank sees the same owners: all stop
                raise UsageError(
                    f"--shard: the ranks see {len(set(owners))} different {out} directories (node-local disks); "
                    "every rank writes its shard of each checkpoint into one directory, so --out-dir must be "
                    "on a file system all nodes share"
                )
            if info.is_main:
                log(line)
            download_once(plan, info)
        with _out_of_memory(f"while tokenizing {_text_names(plan)}", _TEXT_ADVICE):
            checked = check_data(plan) if prepares else None  # before the lock: a failed check writes nothing
        with run_lock(out) if prepares else contextlib.nullcontext():
            if prepares:
                with _out_of_memory(f"while tokenizing {_text_names(plan)}", _TEXT_ADVICE):
                    tokenizer, tokens = write_data(plan, *checked)
                exact = epochs_warning(plan, len(tokens["train"])) if info.is_main else None
                if exact and not epochs_warning(plan):  # the plan's estimate did not warn already
                    logger.warning(exact)
                distributed.barrier()  # release the other ranks: tokenizer and token files are ready
            else:
                distributed.barrier()
                tokenizer = Tokenizer.from_files(out / "vocab.json", out / "merges.txt", special_tokens=[EOS_TOKEN])
                tokens = prepare_tokens(out, tokenizer, plan.texts, log=lambda _m: None)
            # Node-local directories were prepared apart: diverging inputs are an error, not silent.
            distributed.check_same(
                f"{tokenizer.fingerprint()} {len(tokens['train'])} {len(tokens['valid'])}",
                "the tokenizer or the token files",
            )
            step_advice = f"flm estimated {format_bytes(step_memory(cfg)['total'])} per step; {memory_driver(cfg)}"
            with _out_of_memory("in the training step", step_advice):
                summary = train_loop(
                    cfg.model,
                    cfg.train,
                    tokens["train"],
                    tokens["valid"],
                    out,
                    resume=plan.resume,
                    run_config=cfg.to_dict(),
                    tokenizer_fingerprint=tokenizer.fingerprint(),
                    log=log,
                    dist_info=info,
                )
            if summary["status"] in ("interrupted", "terminated"):
                if info.is_main:
                    log(f"stopped at step {summary['step']}; continue with: flm train --resume --out-dir {out}")
                raise Terminated() if summary["status"] == "terminated" else KeyboardInterrupt
            # A finished run: every rank left the loop at the same step; wait for all of them before
            # rank 0 evaluates, so no rank tears the group down under another's last collective.
            # (The abort at exit once seen in bench/shard.py came from a pinned default group,
            # fixed in flm._compat: see _UNPIN_DEFAULT_GROUP.)
            distributed.barrier()
            if not info.is_main:
                return summary
            with _out_of_memory("evaluating the best model", f"lower --batch-size ({cfg.train.batch_size})"):
                return _finish(cfg, out, tokenizer, tokens, summary)
    finally:
        distributed.shutdown()


def _agree_on_resume(plan: Plan, info: distributed.DistInfo) -> None:
    """Under torchrun, check that every rank planned the same start (fresh, or the same
    checkpoint's step) before any rank writes: each rank planned from its own view of the run
    directory, and ranks whose ``--out-dir`` are not one shared directory (node-local disks) can
    see different checkpoints, which would silently train diverged replicas.

    Args:
        plan: this rank's checked plan.
        info: this process's place in the job (nothing is checked single-process).

    Raises:
        UsageError: the ranks disagree (on every rank, naming each rank's decision).
    """
    if not info.enabled:
        return
    step = -1 if plan.resume_from is None else plan.resume_from[1]
    mine = torch.tensor([int(plan.resume), step], dtype=torch.int64)
    seen = [tuple(t.view(torch.int64).tolist()) for t in distributed.all_gather_bytes(mine.view(torch.uint8))]
    if len(set(seen)) > 1:
        said = "; ".join(
            f"rank {r}: " + (f"resume from step {s}" if resume else "start") for r, (resume, s) in enumerate(seen)
        )
        raise UsageError(
            f"the ranks disagree on where to start ({said}): their --out-dir {plan.out_dir} does not hold the "
            "same checkpoints; resuming under torchrun needs an --out-dir that every rank reads (a shared file system)"
        )


_TEXT_ADVICE = (
    "the text, not the batch, is the cause: a long stretch without spaces or punctuation (one pre-token) "
    "needs memory in proportion to its length; split or clean the text"
)


def _text_names(plan: Plan) -> str:
    paths = [path for path, _ in plan.texts.values()]
    return " and ".join(paths) if paths else f"the {plan.config.data.dataset} data"


@contextlib.contextmanager
def _out_of_memory(what: str, advice: str):
    """Turn a memory error inside the block into one :class:`~flm.cli.common.OutOfMemory` line:
    ``out of memory <what>: could not allocate <size>; <advice>``."""
    try:
        yield
    except OutOfMemory:
        raise
    except Exception as err:
        if not is_memory_error(err):
            raise
        size = memory_error_bytes(err)
        alloc = f"could not allocate {format_bytes(size)}" if size else "an allocation failed"
        raise OutOfMemory(f"out of memory {what}: {alloc}; {advice}") from err


def _finish(
    cfg: RunConfig, out: Path, tokenizer: Tokenizer, tokens: dict[str, Any], summary: dict[str, Any]
) -> dict[str, Any]:
    """Evaluate the best checkpoint on every validation token; write results.json and samples.txt."""
    from flm.generate import generate
    from flm.runs import encode_prompt, load_model

    params, model, header = load_model(out / BEST if (out / BEST).exists() else out, device=cfg.train.device)
    final = evaluate(params, model, tokens["valid"], cfg.train.batch_size, model.context_length, progress=True)
    h1 = unigram_entropy(tokens["valid"], model.vocab_size)
    best_step = int(header.get("step", 0))
    log(
        f"validation: loss {final['loss']:.4f} nats/token (perplexity {final['perplexity']:.2f}) on "
        f"{final['tokens']:,} tokens at best step {best_step}; unigram entropy {h1:.4f}"
    )
    results = {
        "best_step": best_step,
        "val_loss": final["loss"],
        "val_perplexity": final["perplexity"],
        "val_tokens": final["tokens"],
        "unigram_entropy": h1,
        "steps": summary["step"],
        "status": summary["status"],
        "train_wall_time_s": summary["wall_time"],
        "train_tokens_per_sec": summary["tokens_per_sec"],
        "mfu": summary["mfu"],
        "num_params": count_params(model),
    }
    s = cfg.sample
    if s.max_new_tokens and s.prompts:
        atomic_write_json(out / "results.json", results)  # kept if sampling fails
        gen = torch.Generator(device=cfg.train.device).manual_seed(s.seed)
        ids = generate(
            params,
            model,
            [encode_prompt(tokenizer, p) for p in s.prompts],
            s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k or None,
            eos_id=tokenizer.eos_id,
            generator=gen,
            vocab_limit=min(tokenizer.vocab_size, model.vocab_size),  # BPE may stop short of vocab_size
        )
        texts = [p + tokenizer.decode(o) for p, o in zip(s.prompts, ids, strict=True)]
        sep = "\n\n" + "-" * 72 + "\n\n"
        head = f"# {out.name}: best step {best_step}, temperature {s.temperature}, top-p {s.top_p}, top-k {s.top_k}\n\n"
        atomic_write_text(out / "samples.txt", head + sep.join(texts) + "\n")
        log(sep.join(texts))
        results["samples"] = texts
    atomic_write_json(out / "results.json", results)
    return results


def run(args: argparse.Namespace) -> int:
    """``flm train``: resolve the config, plan, print the plan, execute."""
    from flm.cli.common import set_threads

    if args.resume and args.config is None:
        # Continue the run as it was configured: its own config.json is the base, flags still win
        # (--resume auto: only when there is a checkpoint to continue; a start takes the flags alone).
        preset = args.preset or default_preset()
        saved = Path(args.out_dir or f"runs/{preset}") / "config.json"
        if saved.is_file() and (args.resume is True or list_all_checkpoints(saved.parent)):
            args.config = str(saved)
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.print_config:
        resolved, auto = resolve_settings(cfg)
        print(json.dumps({**resolved.to_dict(), **({"auto": auto} if auto else {})}, indent=2))
        return 0
    if args.config is not None:  # a run's config.json naming texts that are gone: say which file said so
        given = {name for name in PATH_FIELDS if f"data.{name}" in vars(args)}
        for name, why in missing_paths(args.config).items():
            if name not in given:
                raise UsageError(f"{why}; move it back, or give the texts: --train-text FILE --valid-text FILE")
    set_threads(args.threads)
    # Under torchrun every rank checks the plan, rank 0 alone prints it (as it alone logs the run).
    main_rank = os.environ.get("RANK", "0") == "0"
    show = log if main_rank else lambda _line: None
    out = resolve_out_dir(Path(args.out_dir or f"runs/{cfg.preset}"), log=show)
    if args.dry_run:  # no lock either: a dry run writes nothing, not even .lock
        plan = make_plan(cfg, out, resume=args.resume, overwrite=args.overwrite, dry_run=True)
        for line in describe(plan):
            show(line)
        for line in dry_run_checks(plan):
            show(line)
        return 0
    # An existing run directory is locked before its checkpoints are listed (a run in progress
    # rotates them), so a second process says "in use by pid N" instead of failing on a vanished
    # file. Rank 0 only: the ranks of one torchrun job share the directory.
    lock = out.is_dir() and main_rank
    with run_lock(out) if lock else contextlib.nullcontext():
        plan = make_plan(cfg, out, resume=args.resume, overwrite=args.overwrite)
        for line in describe(plan):
            show(line)
        execute(plan)
    return 0


def resolve_out_dir(out: Path, log: Callable[[str], None] = log) -> Path:
    """The run directory with links resolved, once: ``runs -> /scratch/runs`` is fine, and every
    later path is taken inside the resolved directory (links inside it are refused by name);
    ``log`` says so when a link was resolved."""
    real = Path(os.path.realpath(out))
    if real != Path(os.path.abspath(out)):
        log(f"run dir {out} is {real}")
        return real
    return out
