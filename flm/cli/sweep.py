"""``flm sweep``: a learning-rate (and weight-decay) sweep as one vmapped run.

    flm sweep --preset cpu-small --train-text train.txt --valid-text valid.txt --lrs 1e-3 3e-3 1e-2

Every model has the run's shape, the same init and the same batches; only the peak learning rate
(and, with ``--weight-decays``, the weight decay) differs. Writes ``OUT/sweep.png`` (curves and
loss against learning rate), ``OUT/sweep.json`` and, per model, a run directory ``OUT/lr_<lr>/`` of
``flm train``'s format: ``config.json`` (that model's single-run config), the tokenizer (and links
to the token files, where the file system allows), ``metrics.jsonl``, ``best.safetensors`` and the
final ``ckpt_<max_iters>.safetensors`` with the model's own optimiser state. So ``flm generate``,
``flm eval`` and ``flm.load_run`` read it, and ``flm train --resume --out-dir OUT/lr_<lr>
--max-iters N`` continues it. A diverged model writes no NaN checkpoint (its best model is kept).

Source: CS336 assignment 1 handout §7.2 (learning_rate).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

from flm import manifest
from flm._io import atomic_write_json, run_lock
from flm.cli.args import add_config_flags, base_config, config_from_args, pre_parse, presets_epilog
from flm.cli.common import UsageError, log, set_threads
from flm.cli.plan import Plan
from flm.cli.train import add_run_arguments, describe, make_plan
from flm.cli.train_data import check_data, write_data
from flm.config import RunConfig
from flm.runs import save_tokenizer, tokenizer_stamp
from flm.tokenizer import Tokenizer

__all__ = ["add_parser", "run"]


def add_parser(sub: Any, argv: list[str]) -> None:
    """Register ``flm sweep``."""
    preset, config_file = pre_parse(argv)
    try:
        defaults, _ = base_config(preset, config_file)
    except ValueError:
        defaults, _ = base_config(None, None)
    p = sub.add_parser(
        "sweep",
        help="a learning-rate sweep as one vmapped run",
        description=__doc__.split("\n\n")[0],
        epilog=presets_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("sweep")
    g.add_argument("--lrs", type=float, nargs="+", required=True, help="peak learning rates, one model each")
    g.add_argument("--weight-decays", type=float, nargs="+", help="weight decays (crossed with --lrs)")
    add_run_arguments(p)
    from flm.cli.train import add_dry_run_argument

    add_dry_run_argument(p)
    add_config_flags(p, defaults)
    p.set_defaults(handler=run)


def variants(lrs: list[float], weight_decays: list[float] | None) -> list[dict[str, Any]]:
    """One model per (lr, weight decay) pair, labelled ``lr_<lr>[_wd_<wd>]``.

    Raises:
        UsageError: a non-positive or non-finite learning rate, a negative weight decay.
    """
    for lr in lrs:
        if not (math.isfinite(lr) and lr > 0):
            raise UsageError(f"--lrs: learning rates must be positive, got {lr:g}")
    for wd in weight_decays or ():
        if not (math.isfinite(wd) and wd >= 0):
            raise UsageError(f"--weight-decays: must be ≥ 0, got {wd:g}")
    for flag, values in (("--lrs", lrs), ("--weight-decays", weight_decays or ())):
        twice = sorted({f"{v:g}" for v in values if sum(f"{w:g}" == f"{v:g}" for w in values) > 1})
        if twice:
            raise UsageError(f"{flag}: {', '.join(twice)} given more than once (each value trains one model)")
    if not weight_decays:
        return [{"label": f"lr_{lr:g}", "lr": lr} for lr in lrs]
    return [
        {"label": f"lr_{lr:g}_wd_{wd:g}", "lr": lr, "weight_decay": wd}
        for lr, wd in itertools.product(lrs, weight_decays)
    ]


def run(args: argparse.Namespace) -> int:
    """Plan (as ``flm train`` does), prepare the data, train the vmapped models, plot and summarise."""
    from flm.experiments.report import load_curves, markdown_table, plot_curves, plot_loss_vs_lr
    from flm.experiments.vmapped import variant_config, vmapped_train

    try:
        cfg = config_from_args(args)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if cfg.model.attention == "sdpa":
        raise UsageError("--attention sdpa has no vmap batching rule; use auto or flm for a sweep")
    if cfg.train.shard:
        raise UsageError("--shard does not combine with the vmapped sweep yet (its step is not a torch.func transform)")
    vs = variants(args.lrs, args.weight_decays)
    if args.resume:
        out = args.out_dir or "OUT"
        raise UsageError(
            f"a sweep cannot resume as a whole; continue one of its models with "
            f"flm train --resume --out-dir {out}/{vs[0]['label']} --max-iters N, or run the sweep again with --overwrite"
        )
    if args.print_config:
        print(json.dumps({**cfg.to_dict(), "sweep": vs}, indent=2))
        return 0
    set_threads(args.threads)
    out = Path(args.out_dir or f"runs/sweep-{cfg.preset}")
    plan = make_plan(cfg, out, resume=False, overwrite=args.overwrite, dry_run=args.dry_run)
    existing = [out / v["label"] for v in vs if (out / v["label"]).exists()]
    if existing and not args.overwrite:
        raise UsageError(
            f"--out-dir {out} already holds this sweep's {existing[0].name}/; pass --overwrite to replace it"
        )
    refused = manifest.refused(out, [v["label"] for v in vs] + ["sweep.json", "sweep.png", "sweep_curves.png"])
    if refused:  # the user's files or links where the sweep writes: never replaced (flm.manifest)
        raise UsageError(manifest.refusal_message(refused, out))
    plan.remove += existing
    for line in describe(plan):
        log(line)
    try:
        configs = {v["label"]: variant_config(plan.config, v) for v in vs}
    except ValueError as err:
        raise UsageError(str(err)) from None
    log(f"  sweep: {len(vs)} models in one vmapped step: {', '.join(v['label'] for v in vs)}")
    log(
        f"  each model's directory keeps its final and best model: flm train --resume --out-dir {out}/<model> continues it"
    )
    if args.dry_run:
        from flm.cli.train_data import dry_run_checks

        for line in dry_run_checks(plan):
            log(line)
        return 0
    checked = check_data(plan)
    with run_lock(out):
        tokenizer, tokens = write_data(plan, *checked)
        for label, model_cfg in configs.items():
            write_model_dir(plan, out / label, model_cfg, tokenizer)
        summaries = vmapped_train(
            plan.config,
            tokens["train"],
            tokens["valid"],
            out,
            vs,
            log=log,
            tokenizer_fingerprint=tokenizer.fingerprint(),
        )
        curves = load_curves({s["label"]: out / s["label"] for s in summaries})
        plot_curves(curves, out / "sweep_curves.png", title="learning-rate sweep")
        plot_loss_vs_lr(summaries, out / "sweep.png", title="final validation loss against peak learning rate")
        atomic_write_json(out / "sweep.json", {"config": plan.config.to_dict(), "results": summaries})
    table = markdown_table(
        ["model", "lr", "final val loss", "best val loss", "diverged", "kept"],
        [[s["label"], s["lr"], s["final_val_loss"], s["best_val_loss"], s["diverged"], _kept(s)] for s in summaries],
    )
    log(table)
    return 0


def _kept(summary: dict[str, Any]) -> str:
    """What a model's directory holds to generate from or resume, for the results table."""
    final, best = summary.get("checkpoint"), summary.get("best_checkpoint")
    if final and best:
        return f"{final}, {best}"
    if best:
        return f"{best} only (diverged: no final checkpoint)"
    return final or "nothing (diverged before a finite evaluation)"


_TOKEN_FILES = (".tokens", ".tokens.json", ".stamp.json")


def write_model_dir(plan: Plan, d: Path, cfg: RunConfig, tokenizer: Tokenizer) -> None:
    """Make ``d`` one sweep model's run directory before training: ``config.json`` (its single-run
    config, with the plan's ``auto`` reasons and its data paths relative to ``d``, as ``flm train``
    writes it), the tokenizer with the
    stamp ``flm train --resume`` recognises as cached, and hard links to the sweep's token files and
    their stamps (no copy; where the file system refuses links, a resume encodes them again).

    Args:
        plan: the sweep's checked plan (its texts, ``auto`` reasons and run directory).
        d: the model's directory, ``OUT/<label>`` (new, or emptied by ``--overwrite``).
        cfg: the model's single-run config (:func:`flm.experiments.vmapped.variant_config`).
        tokenizer: the sweep's tokenizer.

    Raises:
        flm.manifest.ForeignFilesError: a file to be written is not flm's (checked by the plan).
    """
    manifest.claim(d, log=log)
    train_text, max_bytes = plan.texts["train"]
    save_tokenizer(d, tokenizer, tokenizer_stamp(train_text, cfg.model.vocab_size, max_bytes))
    for split in plan.texts:
        names = [f"{split}{ext}" for ext in _TOKEN_FILES]
        try:
            for name in names:
                manifest.remove(d / name)
                os.link(plan.out_dir / name, d / name)
                manifest.record(d / name)
        except OSError as err:
            for name in names:
                manifest.remove(d / name)
            log(f"warning: {d.name}/: no links to the {split} token files ({err}); a resume encodes them again")
    # As flm train writes it: data paths relative to the directory (absolute ones as a fallback).
    saved = cfg.to_dict(run_dir=d)
    atomic_write_json(d / "config.json", {**saved, **({"auto": plan.auto} if plan.auto else {})})
