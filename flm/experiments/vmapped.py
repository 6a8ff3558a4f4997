"""K models of one shape trained together by ``torch.func.vmap``: hyperparameter sweeps in one process.

Every model has the base config's shape and sees the same batches; each has its own peak learning
rate (the final rate keeps the base ``min_lr / lr`` ratio, so every model follows the same cosine
shape), weight decay and init seed. The K parameter trees and optimiser states are stacked along
a leading model axis and trained by one :func:`flm.train.make_vmapped_train_step` call per step.
The sweep runs on the training loop's components (:mod:`flm.train.loop`): a ``StepMeter`` for the
log interval, an ``Evaluator``, a ``Clock`` and, per model, a ``MetricsLogger`` and a
``Checkpointer``. So each model's ``OUT/<label>/`` is a training loop's run directory:
``metrics.jsonl`` in the loop's format, ``best.safetensors`` (its best validation loss) and a
final ``ckpt_<max_iters>.safetensors`` holding its own slice of the stacked optimiser state and
the shared sampler's state, stored under the single-run config of that model
(:func:`variant_config`), so :func:`flm.train.train_loop` with ``resume=True`` continues it. A
model whose loss turns NaN (diverged) keeps training inside the vmap without affecting the
others; its losses are recorded as null and it writes no NaN checkpoint (its best model, from
before it diverged, is kept).

Source: CS336 assignment 1 handout §7.2 (learning_rate: a sweep including a divergent run).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flm import manifest, optim
from flm.checkpoint import checkpoint_name
from flm.config import RunConfig
from flm.data import get_batch
from flm.loss import perplexity
from flm.model import train_step_flops
from flm.progress import info
from flm.train import decay_mask, init_vmapped, make_vmapped_train_step
from flm.train.checkpointer import BEST_NAME, Checkpointer, NonFiniteLossError
from flm.train.clock import Clock
from flm.train.config import compile_mode_problem, resolve_auto
from flm.train.evaluate import Evaluator
from flm.train.metrics import MetricsLogger, StepMeter, Throughput, device_peak_flops, metrics_record
from flm.train.step import CUDA_GRAPH_MODES
from flm.tree import unstack

__all__ = ["vmapped_train", "variant_config", "Variant"]

Variant = dict[str, Any]  # {"label": str, "lr": float, "weight_decay": float, "seed": int}


def _finite_or_none(values: torch.Tensor) -> list[float | None]:
    return [float(v) if math.isfinite(float(v)) else None for v in values.double().cpu()]


def diverged(final_val_loss: float | None, vocab_size: int) -> bool:
    """Whether a run diverged: its final validation loss is missing or non-finite (NaN weights), or
    clearly worse than guessing uniformly (``> 1.1 · ln vocab_size`` nats; training starts near
    ``ln vocab_size``, so the model blew up and did not recover). A run that merely learned little
    stays near ``ln vocab_size`` and does not count.
    """
    if final_val_loss is None or not math.isfinite(final_val_loss):
        return True
    return final_val_loss > 1.1 * math.log(vocab_size)


def variant_config(cfg: RunConfig, variant: Variant) -> RunConfig:
    """The single-run config of one model of a sweep: what ``flm train`` would train it with.

    The base config with the variant's peak learning rate, its final rate at the base ``min_lr /
    lr`` ratio (the product the sweep's float64 schedule computes), its weight decay and its init
    seed. The data sampler is the base seed's in both (a sweep's models share their batches), and
    a resumed run restores it from the checkpoint.

    Args:
        cfg: the sweep's base run.
        variant: ``{"label", "lr"?, "weight_decay"?, "seed"?}`` (missing: the base config's).

    Returns:
        The model's :class:`~flm.config.RunConfig`.

    Raises:
        ValueError: a value the config refuses (e.g. a negative learning rate), naming it.
    """
    t = cfg.train
    lr = float(variant.get("lr", t.lr))
    return cfg.replace(
        train={
            "lr": lr,
            "min_lr": lr * (t.min_lr / t.lr),
            "weight_decay": float(variant.get("weight_decay", t.weight_decay)),
            "seed": int(variant.get("seed", t.seed)),
        }
    )


def vmapped_train(
    cfg: RunConfig,
    train_tokens: np.ndarray,
    valid_tokens: np.ndarray,
    out_dir: str | os.PathLike,
    variants: Sequence[Variant],
    *,
    log: Callable[[str], None] | None = None,
    tokenizer_fingerprint: str | None = None,
    checkpoints: bool = True,
) -> list[dict[str, Any]]:
    """Train ``len(variants)`` models of ``cfg.model``'s shape at once; evaluate, log and keep each.

    Each model's directory ``out_dir/<label>`` becomes a run directory of
    :func:`flm.train.train_loop`'s format: ``metrics.jsonl``, ``best.safetensors`` (written at each
    evaluation that improves the model's best validation loss) and, at the end,
    ``ckpt_<max_iters>.safetensors`` with the model's parameters, its own optimiser state (the
    stacked state unstacked: the structure a single run's optimiser has), the sampler state and
    the wall time, under :func:`variant_config`'s config. A model whose parameters are NaN/inf at
    the end (diverged) gets no final checkpoint (checkpoints refuse NaN); its ``best.safetensors``
    from before it diverged stays, and its summary says so.

    Args:
        cfg: the base run (model shape, batch size, schedule shape, intervals, device).
        train_tokens: ``(n,)`` training ids.
        valid_tokens: ``(m,)`` validation ids (at least ``context_length + 1``).
        out_dir: where the ``<label>/`` run directories go.
        variants: one dict per model: ``label``, and optionally ``lr``, ``weight_decay``, ``seed``
            (defaults: the base config's).
        log: where log lines go (default: the ``flm`` logger at INFO).
        tokenizer_fingerprint: the tokenizer the tokens were made with, stored in the checkpoints
            (``flm train --resume`` checks it), or ``None``.
        checkpoints: write the checkpoints (``False``: only ``metrics.jsonl``).

    Returns:
        One summary per variant: ``label``, ``lr``, ``weight_decay``, ``final_val_loss`` and
        ``best_val_loss`` (``None`` when diverged), ``best_step``, ``diverged``, ``wall_time``,
        ``tokens_per_sec``, ``checkpoint`` (the final checkpoint's file name, ``None`` when none
        was written) and ``best_checkpoint`` (``"best.safetensors"``, or ``None``).

    Raises:
        ValueError: no variants, duplicate labels, too little validation data, a variant's value
            the config refuses.
        flm.manifest.ForeignFilesError: a ``<label>`` directory or a file the sweep writes there is
            a link or not flm's (nothing written).
    """
    if not variants:
        raise ValueError("vmapped_train: no variants")
    log = log or info
    labels = [v["label"] for v in variants]
    if len(set(labels)) != len(labels):
        raise ValueError(f"vmapped_train: duplicate labels in {labels}")
    t = cfg.train
    ctx, k, device = cfg.model.context_length, len(variants), t.resolved_device()
    t, _ = resolve_auto(t, device)  # "auto" dtype/compile: the same per-device defaults as flm train
    if t.compile_mode in CUDA_GRAPH_MODES:
        raise ValueError(
            f"vmapped_train: compile_mode {t.compile_mode!r} (CUDA graphs) needs a donating step, which the vmapped "
            "sweep does not have; use default or max-autotune-no-cudagraphs"
        )
    problem = compile_mode_problem(t, torch.device(device).type)
    if problem:
        raise ValueError(f"vmapped_train: {problem}")
    resolved = cfg.replace(train=t.to_dict())
    run_configs = [variant_config(resolved, v).to_dict() for v in variants]  # checks each variant first
    evaluator = Evaluator(valid_tokens, cfg.model, t.batch_size, t.eval_batches, t.eval_interval)  # checks the length
    lrs = [float(v.get("lr", t.lr)) for v in variants]
    ratio = t.min_lr / t.lr
    hparams = {
        "lr": torch.tensor(lrs, dtype=torch.float64),
        "min_lr": torch.tensor(lrs, dtype=torch.float64) * ratio,
        "weight_decay": torch.tensor(
            [float(v.get("weight_decay", t.weight_decay)) for v in variants], dtype=torch.float64
        ),
    }

    def make_tx(h: dict[str, torch.Tensor]) -> optim.GradientTransformation:
        schedule = optim.cosine_schedule(h["lr"], h["min_lr"], t.warmup_iters, t.max_iters)
        adam = optim.adamw(schedule, betas=t.betas, eps=t.eps, weight_decay=h["weight_decay"], mask=decay_mask)
        return optim.chain(optim.clip_by_global_norm(t.grad_clip), adam) if t.grad_clip > 0 else adam

    seeds = [int(v.get("seed", t.seed)) for v in variants]
    params, opt_state = init_vmapped(cfg.model, make_tx, hparams, seeds, device=device)
    hparams = {n: v.to(device) for n, v in hparams.items()}
    step_fn = make_vmapped_train_step(
        cfg.model,
        make_tx,
        shared_batch=True,
        compile=t.compile,
        compile_kwargs=None if t.compile_mode == "default" else {"mode": t.compile_mode},
        compute_dtype=t.compute_dtype,
    )
    sampler = torch.Generator().manual_seed(t.seed + 1)
    out = Path(out_dir)
    # Only flm's own files are replaced, never through a link (flm.manifest): all checked first.
    written = ("metrics.jsonl", BEST_NAME, checkpoint_name(t.max_iters)) if checkpoints else ("metrics.jsonl",)
    manifest.check_replace([*(out / x for x in labels), *(out / x / n for x in labels for n in written)], where=out)
    for label in labels:
        manifest.claim(out / label)
    # The training loop's components, one per model where each model has its own: metrics.jsonl,
    # and the checkpoints (the best model at evaluations, the final checkpoint at the end).
    loggers = [MetricsLogger(out / label) for label in labels]
    ckpts = [
        Checkpointer(
            out / label,
            interval=0,
            keep=t.keep_checkpoints,
            run_config=run_config,
            tokenizer_fingerprint=tokenizer_fingerprint,
            enabled=checkpoints,
            log=log,
        )
        for label, run_config in zip(labels, run_configs)
    ]
    meter = StepMeter(t.log_interval)
    peak = device_peak_flops(device, t.compute_dtype)
    clock = Clock(
        Throughput(k * train_step_flops(cfg.model, 1) / ctx, peak),
        tokens_per_step=k * t.batch_size * ctx,
        max_iters=t.max_iters,
    )
    last_val: list[float | None] = [None] * k
    log(f"vmapped: {k} models x {t.max_iters} steps ({', '.join(labels)}), batch {t.batch_size} x {ctx} tokens")
    try:
        for step in range(1, t.max_iters + 1):
            x, y = get_batch(train_tokens, t.batch_size, ctx, device, sampler)
            params, opt_state, m = step_fn(params, opt_state, hparams, x, y)
            meter.add(m)
            at_eval = evaluator.due(step) or step == t.max_iters
            if not (meter.due(step) or at_eval):
                continue
            rate = clock.tick(step)
            summary = meter.summarise()  # a model's train_loss is NaN if any step of the interval was
            vals = None
            if at_eval:
                with clock.aside():
                    models = unstack(params)
                    vals = evaluator.each(models, step)
                for ckpt, model, val in zip(ckpts, models, vals):
                    if val is not None:
                        ckpt.save_best(step, model, val)
                last_val = vals
            train_l, lrs_now, norms = (_finite_or_none(summary[n]) for n in ("train_loss", "lr", "grad_norm"))
            wall_time = clock.elapsed()
            for i, logger in enumerate(loggers):
                val = vals[i] if vals else None
                record = metrics_record(
                    step,
                    wall_time=wall_time,
                    tokens=step * t.batch_size * ctx,
                    train_loss=train_l[i],
                    lr=lrs_now[i],
                    grad_norm=norms[i],
                    val_loss=val,
                    val_perplexity=None
                    if val is None
                    else _finite_or_none(perplexity(val, dtype=torch.float64)[None])[0],
                    tokens_per_sec=rate / k,
                    mfu=clock.throughput.mfu,
                )
                logger.write(record)
            fmt = lambda vs: " ".join("   nan" if v is None else f"{v:6.3f}" for v in vs)
            log(
                f"step {step:5d} | train {fmt(train_l)}"
                + (f" | val {fmt(vals)}" if vals else "")
                + f" | {rate:,.0f} tok/s"
            )
    finally:
        for logger in loggers:
            logger.close()
    wall, rate = clock.elapsed(), clock.throughput.rate
    finals = (
        _save_final(ckpts, labels, params, opt_state, t.max_iters, sampler, wall, log) if checkpoints else [None] * k
    )
    return [
        {
            "label": label,
            "lr": lrs[i],
            "weight_decay": float(hparams["weight_decay"][i]),
            "final_val_loss": last_val[i],
            "best_val_loss": ckpts[i].best_loss if math.isfinite(ckpts[i].best_loss) else None,
            "best_step": ckpts[i].best_step,
            "diverged": diverged(last_val[i], cfg.model.vocab_size),
            "wall_time": wall,
            "tokens_per_sec": rate / k if rate else None,
            "checkpoint": finals[i],
            "best_checkpoint": BEST_NAME if checkpoints and (out / label / BEST_NAME).is_file() else None,
        }
        for i, label in enumerate(labels)
    ]


def _save_final(
    ckpts: list[Checkpointer],
    labels: list[str],
    params: Any,
    opt_state: Any,
    step: int,
    sampler: torch.Generator,
    wall_time: float,
    log: Callable[[str], None],
) -> list[str | None]:
    """Each model's final checkpoint: its slice of the stacked parameters and optimiser state (the
    structure a single run's optimiser has), the shared sampler's state and the wall time: what
    the training loop's periodic checkpoint holds. A model with NaN/inf values writes none.

    Returns:
        Per model, the file name written, or ``None``.
    """
    names: list[str | None] = []
    for ckpt, label, model, state in zip(ckpts, labels, unstack(params), unstack(opt_state), strict=True):
        try:
            path = ckpt.save(step, model, state, sampler=sampler, metadata={"wall_time": wall_time})
        except NonFiniteLossError:
            kept = f"its best.safetensors (step {ckpt.best_step}) is kept" if ckpt.best_step else "no model is kept"
            log(f"{label}: diverged (NaN/inf parameters or optimiser state): no final checkpoint written; {kept}")
            names.append(None)
            continue
        names.append(path.name if path is not None else None)
    return names
