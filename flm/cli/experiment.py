"""``flm experiment NAME``: the handout's §7 experiments (and §2.7's tokenizer one) as commands.

    flm experiment lr --train-text train.txt --valid-text valid.txt --out-dir runs/experiments

NAME is one of lr, batch-size, ablations, tie, generate, tokenizer, or all. The base run is the
cpu-small preset unless flags or ``--preset``/``--config`` say otherwise; every experiment shares
one tokenizer, one pair of token files and one baseline run in ``--out-dir``. Each writes
``OUT/<name>/report.md`` (table, plots, command, wall time, machine) and ``results.json``.

Source: CS336 assignment 1 handout §2.7, §7.2–7.3.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from flm import manifest
from flm._io import run_lock
from flm.cli.args import add_config_flags, base_config, config_from_args, pre_parse, presets_epilog
from flm.cli.common import UsageError, log, set_threads
from flm.cli.train import add_run_arguments, describe, make_plan
from flm.cli.train_data import check_data, write_data
from flm.runs import run_state

__all__ = ["add_parser", "run"]

GPT2_FILES = ("gpt2_vocab.json", "gpt2_merges.txt")
NAMES = ("lr", "batch-size", "ablations", "tie", "generate", "tokenizer", "all")


def add_parser(sub: Any, argv: list[str]) -> None:
    """Register ``flm experiment`` (the cpu-small preset is its default base run)."""
    preset, config_file = pre_parse(argv)
    try:
        defaults, _ = base_config(preset or "cpu-small", config_file)
    except ValueError:
        defaults, _ = base_config("cpu-small", None)
    p = sub.add_parser(
        "experiment",
        help="run one of the handout's experiments (sweeps, ablations, …)",
        description=__doc__.split("\n\n")[0],
        epilog=presets_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", choices=NAMES, help="which experiment")
    p.add_argument("--lrs", type=float, nargs="+", help="lr: the learning rates (default: 0.1x … 100x the base lr)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="batch-size: the sizes (default: 1 4 16 64 256)")
    p.add_argument("--gpt2-dir", help="tokenizer: a folder with gpt2_vocab.json/gpt2_merges.txt to compare with")
    add_run_arguments(p)
    add_config_flags(p, defaults)
    p.set_defaults(handler=run)


def _check_gpt2_dir(path: str) -> None:
    """A named ``--gpt2-dir`` must hold both GPT-2 files: a comparison asked for is never dropped silently.

    Raises:
        UsageError: the directory is missing, is not a directory, or lacks a file (naming it).
    """
    d = Path(path)
    if not d.exists():
        raise UsageError(f"--gpt2-dir {path}: no such directory")
    if not d.is_dir():
        raise UsageError(
            f"--gpt2-dir {path}: not a directory (give the folder holding gpt2_vocab.json and gpt2_merges.txt)"
        )
    for name in GPT2_FILES:
        if not (d / name).is_file():
            raise UsageError(f"--gpt2-dir {path} has no {name} (the GPT-2 comparison needs {' and '.join(GPT2_FILES)})")


def run(args: argparse.Namespace) -> int:
    """Plan and prepare the shared data, then run the experiment(s)."""
    from flm.experiments import Context, run_experiment
    from flm.experiments.handout import EXPERIMENT_DIRS

    if args.preset is None and args.config is None:
        args.preset = "cpu-small"
    try:
        cfg = config_from_args(args)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.resume:
        raise UsageError("experiments do not resume; a finished baseline is reused automatically")
    for lr in args.lrs or ():
        if not lr > 0:
            raise UsageError(f"--lrs: learning rates must be positive, got {lr:g}")
    for b in args.batch_sizes or ():
        if b < 1:
            raise UsageError(f"--batch-sizes: must be ≥ 1, got {b}")
    if args.gpt2_dir is not None:
        _check_gpt2_dir(args.gpt2_dir)
    if args.print_config:
        import json

        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    set_threads(args.threads)
    out = Path(args.out_dir or "runs/experiments")
    # The experiments directory holds many runs of its own: only the shared data is planned here.
    try:
        state = run_state(out)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if state.has_run:  # an experiments directory keeps its runs in subdirectories
        raise UsageError(f"--out-dir {out} holds a training run; experiments need their own directory")
    plan = make_plan(cfg, out, resume=False, overwrite=True)
    plan.remove = []
    for line in describe(plan)[:3]:
        log(line)
    names = [n for n in NAMES if n != "all"] if args.name == "all" else [args.name]
    command = getattr(args, "command_line", f"flm experiment {args.name}")
    # The experiments replace their own subdirectories: anything in them flm did not write (or a
    # link) is refused now, before any work, never deleted (flm.manifest).
    subdirs = sorted({sub for n in names for sub in EXPERIMENT_DIRS[n]})
    refused = manifest.refused(out, subdirs)
    if refused:
        raise UsageError(manifest.refusal_message(refused, out))
    checked = check_data(plan)
    with run_lock(out):
        tokenizer, tokens = write_data(plan, *checked)
        ctx = Context(plan.config, out, tokens, tokenizer, log, {k: v[0] for k, v in plan.texts.items()})
        for name in names:
            kw: dict[str, Any] = {}
            if name == "lr" and args.lrs:
                kw["lrs"] = args.lrs
            if name == "batch-size" and args.batch_sizes:
                kw["sizes"] = args.batch_sizes
            if name == "tokenizer" and args.gpt2_dir is not None:
                kw["gpt2_dir"] = args.gpt2_dir
            run_experiment(ctx, name, command, **kw)
    return 0
