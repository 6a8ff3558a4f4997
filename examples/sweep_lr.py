#!/usr/bin/env python
"""A learning-rate sweep on TinyStories as one process: K models trained together by ``vmap``.

    python examples/sweep_lr.py --train-text ../shared/data/tinystories/train.txt \\
        --valid-text ../shared/data/tinystories/valid.txt --out-dir runs/sweep --lrs 1e-3,3e-3,1e-2 \\
        --preset tiny --max-iters 300

Every model has the preset's shape, the same init seed and sees the same batches; only the peak
learning rate differs (the final rate is the preset's ``min_lr / lr`` ratio times it, so every
model follows the same cosine shape). The K parameter trees and AdamW states are stacked along a
leading model axis (``flm.tree.stack``) and trained by one ``flm.train.make_vmapped_train_step``
call per step. Validation loss is measured per model with ``flm.train.evaluate`` on the
``unstack``ed parameters. Writes into ``--out-dir``:

* ``metrics.jsonl``: one line per logged step, ``step, wall_time, tokens, lrs, train_loss,
  grad_norm, val_loss`` with one entry per model (in ``--lrs`` order; ``null`` for a diverged
  model's non-finite loss, and ``val_loss`` null between evaluations);
* ``sweep.png``: a training/validation loss curve per learning rate, and final validation loss
  against the learning rate (handout §7.2, ``learning_rate``).

The tokenizer (``vocab.json``/``merges.txt``) and ``train.tokens``/``valid.tokens`` are the
pipeline's (``flm/pipeline.py``), with the same stamps: point ``--out-dir`` at a run directory of
``examples/train_tinystories.py`` with the same texts and vocabulary size and they are reused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from flm import optim
from flm.data import get_batch
from flm.model import TransformerConfig
from flm.pipeline import PRESETS
from flm.pipeline import prepare_tokens as pipeline_prepare_tokens
from flm.train import decay_mask, evaluate, init_vmapped, make_vmapped_train_step
from flm.tree import unstack


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sweep_lr.py", description="Learning-rate sweep as one vmapped run.")
    p.add_argument("--train-text", required=True, help="training text (documents separated by <|endoftext|>)")
    p.add_argument("--valid-text", required=True, help="validation text")
    p.add_argument("--out-dir", default="runs/sweep_lr", help="output directory (may be a pipeline run dir)")
    p.add_argument("--lrs", default="1e-3,3e-3,1e-2", help="comma-separated peak learning rates")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model shape and optimiser defaults")
    p.add_argument("--max-iters", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--warmup-iters", type=int, default=None)
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--eval-interval", type=int, default=None)
    p.add_argument("--eval-batches", type=int, default=None)
    p.add_argument("--log-interval", type=int, default=None)
    p.add_argument("--seed", type=int, default=0, help="init seed (all models) and batch-sampler seed")
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the vmapped step")
    p.add_argument("--num-workers", type=int, default=None, help="processes for tokenizer training/encoding")
    args = p.parse_args(argv)
    try:
        args.lr_list = [float(v) for v in args.lrs.split(",") if v.strip()]
    except ValueError:
        p.error(f"--lrs must be comma-separated numbers, got {args.lrs!r}")
    if not args.lr_list or any(not (v > 0 and math.isfinite(v)) for v in args.lr_list):
        p.error(f"--lrs must hold positive learning rates, got {args.lrs!r}")
    return args


def prepare_tokens(out: Path, train_text: str, valid_text: str, vocab_size: int, num_workers: int | None, log=print):
    """The pipeline's tokenizer and encode stages (same cache stamps): memmapped train/valid tokens."""
    return pipeline_prepare_tokens(out, train_text, valid_text, vocab_size, num_workers, log=log, progress=False)[1]


def _finite(values: torch.Tensor) -> list[float | None]:
    return [float(v) if math.isfinite(float(v)) else None for v in values.double().cpu()]


def plot_sweep(rows: list[dict[str, Any]], lrs: list[float], out_png: Path) -> bool:
    """One train (line) and validation (markers) curve per learning rate, and final val loss vs lr."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.cm.viridis([i / max(1, len(lrs) - 1) for i in range(len(lrs))])
    finite = [v for r in rows for v in r["train_loss"] if v is not None]
    for i, lr in enumerate(lrs):
        tr = [(r["step"], r["train_loss"][i]) for r in rows if r["train_loss"][i] is not None]
        va = [(r["step"], r["val_loss"][i]) for r in rows if r["val_loss"] is not None and r["val_loss"][i] is not None]
        if tr:
            ax.plot(*zip(*tr), color=colors[i], lw=1, label=f"lr {lr:g}")
        if va:
            ax.plot(*zip(*va), "o--", color=colors[i], ms=3, lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("train (lines) and validation (dots) loss")
    if finite:  # diverged models can blow up the scale: clip to the interesting range
        ax.set_ylim(min(finite) - 0.1, min(max(finite), min(finite) + 4.0) + 0.1)
    ax.grid(alpha=0.3)
    ax.legend()
    last_val = next((r["val_loss"] for r in reversed(rows) if r["val_loss"] is not None), None)
    if last_val is not None:
        pts = [(lr, v) for lr, v in zip(lrs, last_val) if v is not None]
        if pts:
            ax_lr.plot(*zip(*pts), "o-")
        for lr, v in zip(lrs, last_val):
            if v is None:
                ax_lr.axvline(lr, color="r", ls=":", lw=1)
    ax_lr.set_xscale("log")
    ax_lr.set_xlabel("peak learning rate")
    ax_lr.set_ylabel("final validation loss")
    ax_lr.set_title("final validation loss (red: diverged)")
    ax_lr.grid(alpha=0.3, which="both")
    fig.tight_layout()
    tmp = out_png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_png)
    return True


def run(args: argparse.Namespace, log=print) -> dict[str, Any]:
    s = dict(PRESETS[args.preset])
    for key in ("max_iters", "batch_size", "warmup_iters", "weight_decay", "eval_interval", "eval_batches", "log_interval"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    s["warmup_iters"] = min(s["warmup_iters"], s["max_iters"])
    config = TransformerConfig(
        vocab_size=s["vocab_size"], context_length=s["context_length"], d_model=s["d_model"],
        num_layers=s["num_layers"], num_heads=s["num_heads"], d_ff=s["d_ff"], rope_theta=s["rope_theta"],
    )
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for path in (args.train_text, args.valid_text):
        if not os.path.isfile(path):
            raise ValueError(f"text file not found: {path}")
    tokens = prepare_tokens(out, args.train_text, args.valid_text, config.vocab_size, args.num_workers, log)

    lrs, k = args.lr_list, len(args.lr_list)
    min_ratio = s["min_lr"] / s["lr"]
    max_iters, warmup, batch, ctx = s["max_iters"], s["warmup_iters"], s["batch_size"], config.context_length
    hparams = {
        "lr": torch.tensor(lrs, dtype=torch.float64),
        "min_lr": torch.tensor(lrs, dtype=torch.float64) * min_ratio,
        "weight_decay": torch.full((k,), float(s["weight_decay"]), dtype=torch.float64),
    }

    def make_tx(h):
        schedule = optim.cosine_schedule(h["lr"], h["min_lr"], warmup, max_iters)
        adam = optim.adamw(schedule, betas=(0.9, 0.95), weight_decay=h["weight_decay"], mask=decay_mask)
        return optim.chain(optim.clip_by_global_norm(s["grad_clip"]), adam) if s["grad_clip"] > 0 else adam

    params, opt_state = init_vmapped(config, make_tx, hparams, [args.seed] * k, device=args.device)
    hparams = {n: v.to(args.device) for n, v in hparams.items()}
    step_fn = make_vmapped_train_step(config, make_tx, shared_batch=True, compile=args.compile)
    sampler = torch.Generator().manual_seed(args.seed + 1)
    metrics_path = out / "metrics.jsonl"
    metrics_path.unlink(missing_ok=True)
    log(f"sweep: {k} models × {max_iters} steps, lrs {lrs}, batch {batch} × {ctx} tokens (shared)")

    def evaluate_all() -> list[float | None]:
        vals = []
        for p in unstack(params):
            leaves_ok = all(bool(torch.isfinite(t).all()) for t in p.values() if isinstance(t, torch.Tensor))
            vals.append(evaluate(p, config, tokens["valid"], batch, ctx, s["eval_batches"])["loss"] if leaves_ok else None)
        return [v if v is not None and math.isfinite(v) else None for v in vals]

    rows: list[dict[str, Any]] = []
    pending: list[torch.Tensor] = []
    t0 = time.perf_counter()
    for step in range(1, max_iters + 1):
        x, y = get_batch(tokens["train"], batch, ctx, args.device, sampler)
        params, opt_state, m = step_fn(params, opt_state, hparams, x, y)
        pending.append(m["loss"])
        at_eval = s["eval_interval"] > 0 and step % s["eval_interval"] == 0
        if step % s["log_interval"] and not at_eval and step != max_iters:
            continue
        losses = torch.stack(pending).mean(0)  # (K,) mean over the interval (NaN if any step was)
        pending.clear()
        row = {
            "step": step,
            "wall_time": round(time.perf_counter() - t0, 3),
            "tokens": step * batch * ctx,
            "lrs": _finite(m["lr"]),
            "train_loss": _finite(losses),
            "grad_norm": _finite(m["grad_norm"]),
            "val_loss": evaluate_all() if at_eval or step == max_iters else None,
        }
        rows.append(row)
        with open(metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        fmt = lambda vs: " ".join("  nan " if v is None else f"{v:6.3f}" for v in vs)  # noqa: E731
        log(f"step {step:5d} | train {fmt(row['train_loss'])}" + (f" | val {fmt(row['val_loss'])}" if row["val_loss"] else ""))

    plot_sweep(rows, lrs, out / "sweep.png")
    final = rows[-1]["val_loss"]
    finite = [(v, lr) for v, lr in zip(final, lrs) if v is not None]
    best_lr = min(finite)[1] if finite else None
    log(f"final validation loss per lr: {dict(zip(lrs, final))}; best lr {best_lr}; {time.perf_counter() - t0:.1f}s")
    return {"lrs": lrs, "final_val_loss": final, "best_lr": best_lr, "steps": max_iters, "wall_time": time.perf_counter() - t0}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, run the sweep, return ``{"lrs", "final_val_loss", "best_lr", "steps", "wall_time"}``."""
    return run(parse_args(argv), log=lambda msg: print(msg, flush=True))


if __name__ == "__main__":
    try:
        main()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
