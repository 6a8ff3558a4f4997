"""The experiments of handout §7 (and the tokenizer experiments of §2.7), one function each.

Each ``exp_*`` takes a :class:`Context` (the base config, the output directory, the prepared
tokens) and returns a dict of results; :func:`run_experiment` writes it with ``report.md`` (a
markdown table, the plots, the wall time and the machine) under ``OUT/<name>/``.

Source: CS336 assignment 1 handout §2.7, §7.2–7.3.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flm import manifest
from flm._io import atomic_write_json, atomic_write_text
from flm.config import RunConfig
from flm.experiments.report import load_curves, markdown_table, plot_curves, plot_loss_vs_lr
from flm.experiments.vmapped import diverged, vmapped_train
from flm.model import count_params, max_batch_size
from flm.tokenizer import Tokenizer
from flm.train import train_loop

__all__ = ["Context", "EXPERIMENTS", "run_experiment", "machine", "EXPERIMENT_DIRS"]

# The subdirectories of OUT each experiment writes (and may replace), for the plan's checks.
EXPERIMENT_DIRS = {
    "lr": ("lr",),
    "batch-size": ("batch_size",),
    "ablations": ("baseline", "ablations"),
    "tie": ("baseline", "tie"),
    "generate": ("baseline", "generate"),
    "tokenizer": ("tokenizer",),
}


@dataclass
class Context:
    """What every experiment gets.

    Attributes:
        cfg: the base run (the cpu-small preset by default).
        out: the experiments directory (shared tokenizer and token files live here).
        tokens: ``{"train": memmap, "valid": memmap}``.
        tokenizer: the tokenizer of the token files.
        log: where progress lines go.
        data: the text files (``split -> path``), for the tokenizer experiment.
    """

    cfg: RunConfig
    out: Path
    tokens: dict[str, np.ndarray]
    tokenizer: Tokenizer
    log: Callable[[str], None]
    data: dict[str, str]


def machine() -> str:
    """One line describing this machine and the software (for every report)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores{gpu}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"Python {platform.python_version()}"
    )


def _train(ctx: Context, name: str, cfg: RunConfig, *, reuse: bool = False) -> dict[str, Any]:
    """One run into ``OUT/<name>`` (``reuse``: keep a finished run with the same config)."""
    d = ctx.out / name
    saved = d / "summary.json"
    if reuse and saved.exists():
        prev = json.loads(saved.read_text())
        if prev.get("config") == cfg.to_dict():
            ctx.log(f"{name}: reusing the finished run in {d}")
            return prev["summary"]
    manifest.remove(d)  # a previous run of flm's own only (flm.manifest); refused otherwise
    ctx.log(f"{name}: {count_params(cfg.model):,} params, {cfg.train.max_iters} steps")
    s = train_loop(
        cfg.model,
        cfg.train,
        ctx.tokens["train"],
        ctx.tokens["valid"],
        d,
        run_config=cfg.to_dict(),
        tokenizer_fingerprint=ctx.tokenizer.fingerprint(),
        log=ctx.log,
    )
    summary = {
        "label": name.split("/")[-1],
        "lr": cfg.train.lr,
        "final_val_loss": s["final_val_loss"],
        "best_val_loss": s["best_val_loss"],
        "diverged": diverged(s["final_val_loss"], cfg.model.vocab_size),
        "wall_time": s["wall_time"],
        "tokens_per_sec": s["tokens_per_sec"],
        "params": count_params(cfg.model),
    }
    atomic_write_json(saved, {"config": cfg.to_dict(), "summary": summary})
    return summary


def _vmapped(ctx: Context, name: str, cfg: RunConfig, variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    d = ctx.out / name
    for v in variants:
        manifest.remove(d / v["label"])
    return vmapped_train(cfg, ctx.tokens["train"], ctx.tokens["valid"], d, variants, log=ctx.log)


def baseline(ctx: Context) -> dict[str, Any]:
    """The base config trained once (``OUT/baseline``), shared by the ablations and generation."""
    return _train(ctx, "baseline", ctx.cfg, reuse=True)


def _rows(
    summaries: list[dict[str, Any]], extra: Callable[[dict[str, Any]], list[Any]] | None = None
) -> list[list[Any]]:
    return [
        [
            s["label"],
            s["lr"],
            s["final_val_loss"],
            s["best_val_loss"],
            "yes" if s["diverged"] else "no",
            round(s["wall_time"]),
            *(extra(s) if extra else []),
        ]
        for s in summaries
    ]


_HEAD = ["run", "peak lr", "final val loss", "best val loss", "diverged", "wall time (s)"]


# ------------------------------------------------------------------------------------------ §7.2


def exp_lr(ctx: Context, lrs: list[float] | None = None) -> dict[str, Any]:
    """Learning-rate sweep up to divergence, all rates in one vmapped run (handout §7.2 learning_rate)."""
    base = ctx.cfg.train.lr
    lrs = lrs or [base * f for f in (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)]
    summaries = _vmapped(ctx, "lr", ctx.cfg, [{"label": f"lr_{lr:.3g}", "lr": lr} for lr in lrs])
    d = ctx.out / "lr"
    plot_curves(
        load_curves({s["label"]: d / s["label"] for s in summaries}),
        d / "curves.png",
        title="learning-rate sweep (same init and batches)",
    )
    plot_loss_vs_lr(summaries, d / "loss_vs_lr.png", title="final validation loss against peak learning rate")
    ok = [s for s in summaries if not s["diverged"]]
    best = min(ok, key=lambda s: s["final_val_loss"]) if ok else None
    diverged = [s["lr"] for s in summaries if s["diverged"]]
    return {
        "table": markdown_table(_HEAD, _rows(summaries)),
        "plots": ["curves.png", "loss_vs_lr.png"],
        "best_lr": best["lr"] if best else None,
        "best_val_loss": best["final_val_loss"] if best else None,
        "smallest_diverging_lr": min(diverged) if diverged else None,
        "results": summaries,
    }


def exp_batch_size(ctx: Context, sizes: list[int] | None = None) -> dict[str, Any]:
    """Batch sizes from 1 up at the base token budget; the lr re-tuned per size among
    ``{½, 1, 2} × lr·√(B/B₀)`` (one vmapped run per size). Reports the memory-limited batch size too
    (handout §7.2 batch_size_experiment)."""
    base = ctx.cfg
    b0, tokens = base.train.batch_size, base.tokens
    sizes = sizes or [1, 4, 16, 64, 256]
    best_runs, rows, curves = [], [], {}
    for b in sizes:
        steps = max(1, round(tokens / (b * base.model.context_length)))
        cfg = base.replace(
            train={
                "batch_size": b,
                "max_iters": steps,
                "warmup_iters": max(1, steps // 10),
                "eval_interval": max(1, steps // 12),
                "log_interval": max(1, steps // 60),
                "checkpoint_interval": 0,
            }
        )
        lr0 = base.train.lr * math.sqrt(b / b0)
        summaries = _vmapped(
            ctx, f"batch_size/b{b}", cfg, [{"label": f"lr_{lr0 * f:.3g}", "lr": lr0 * f} for f in (0.5, 1.0, 2.0)]
        )
        ok = [s for s in summaries if not s["diverged"]] or summaries
        best = min(ok, key=lambda s: s["final_val_loss"] if s["final_val_loss"] is not None else math.inf)
        best_runs.append({**best, "batch_size": b, "steps": steps})
        curves[f"B={b}, lr {best['lr']:.2g}"] = load_curves({"x": ctx.out / f"batch_size/b{b}" / best["label"]})["x"]
        rows.append(
            [
                b,
                steps,
                best["lr"],
                best["final_val_loss"],
                best["best_val_loss"],
                round(best["wall_time"]),
                best["tokens_per_sec"],
                ", ".join(f"{s['lr']:.2g}: {fmt_loss(s)}" for s in summaries),
            ]
        )
    d = ctx.out / "batch_size"
    plot_curves(curves, d / "curves.png", title=f"batch size at {tokens / 1e6:.2f}M tokens (best lr each)")
    mem = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else _ram_bytes()
    limit = max_batch_size(base.model, 0.8 * mem)
    head = [
        "batch size",
        "steps",
        "best lr",
        "final val loss",
        "best val loss",
        "wall time (s)",
        "tokens/s",
        "final val loss per lr",
    ]
    return {
        "table": markdown_table(head, rows),
        "plots": ["curves.png"],
        "results": best_runs,
        "memory_limit_batch": limit,
        "memory_bytes": mem,
    }


def fmt_loss(s: dict[str, Any]) -> str:
    """A summary's final validation loss for a table cell ("diverged" when there is none)."""
    return "diverged" if s["final_val_loss"] is None else f"{s['final_val_loss']:.3f}"


def _ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


# ------------------------------------------------------------------------------------------ §7.3


def exp_ablations(ctx: Context) -> dict[str, Any]:
    """No RMSNorm at the base lr and lower ones (vmapped), post-norm, NoPE, and SiLU with
    ``d_ff = 4·d_model`` (≈ SwiGLU's parameter count), each against the baseline (handout §7.3)."""
    base = ctx.cfg
    summaries = [baseline(ctx)]
    lr = base.train.lr
    summaries += _vmapped(
        ctx,
        "ablations/no_norm",
        base.replace(model={"norm": "none"}),
        [{"label": f"no_norm_lr_{f * lr:.3g}", "lr": f * lr} for f in (1.0, 0.3, 0.1)],
    )
    for name, change in (
        ("post_norm", {"norm": "post"}),
        ("nope", {"position": "nope"}),
        ("silu", {"ffn": "silu", "d_ff": 4 * base.model.d_model}),
    ):
        summaries.append(_train(ctx, f"ablations/{name}", base.replace(model=change)))
    runs = {"baseline": ctx.out / "baseline"}
    for s in summaries[1:]:
        label = s["label"]
        runs[label] = ctx.out / ("ablations/no_norm/" + label if label.startswith("no_norm") else f"ablations/{label}")
    d = ctx.out / "ablations"
    curves = load_curves(runs)
    plot_curves(curves, d / "curves.png", title="ablations against the baseline (pre-norm, RoPE, SwiGLU)")
    params = {
        "baseline": count_params(base.model),
        "silu": count_params(base.replace(model={"ffn": "silu", "d_ff": 4 * base.model.d_model}).model),
    }
    return {
        "table": markdown_table(_HEAD + ["params"], _rows(summaries, lambda s: [s.get("params", params["baseline"])])),
        "plots": ["curves.png"],
        "results": summaries,
        "params": params,
    }


def exp_tie(ctx: Context) -> dict[str, Any]:
    """Tied input/output embeddings (init std 1/√d_model) at the base lr and half of it, against the baseline."""
    base = ctx.cfg
    summaries = [baseline(ctx)]
    lr = base.train.lr
    summaries += _vmapped(
        ctx,
        "tie",
        base.replace(model={"tie_embeddings": True}),
        [{"label": f"tied_lr_{f * lr:.3g}", "lr": f * lr} for f in (1.0, 0.5)],
    )
    d = ctx.out / "tie"
    runs = {"baseline": ctx.out / "baseline", **{s["label"]: d / s["label"] for s in summaries[1:]}}
    plot_curves(load_curves(runs), d / "curves.png", title="tied embeddings against the baseline")
    tied = count_params(base.replace(model={"tie_embeddings": True}).model)
    return {
        "table": markdown_table(_HEAD, _rows(summaries)),
        "plots": ["curves.png"],
        "results": summaries,
        "params": {"baseline": count_params(base.model), "tied": tied},
    }


def exp_generate(ctx: Context) -> dict[str, Any]:
    """A sample of up to ``max(256, max_new_tokens)`` tokens (or until ``<|endoftext|>``, as the
    handout allows) from the baseline's best model with the run's sampling settings, plus greedy
    decoding and a hot temperature for contrast (handout §7.2 generate)."""
    from flm.generate import generate
    from flm.runs import encode_prompt, load_model

    baseline(ctx)
    params, config, header = load_model(ctx.out / "baseline")
    tok, s = ctx.tokenizer, ctx.cfg.sample
    n = max(256, s.max_new_tokens)
    settings = [("chosen", s.temperature, s.top_p), ("greedy", 0.0, 1.0), ("hot", 1.5, 1.0)]
    samples = []
    for label, temp, top_p in settings:
        g = torch.Generator().manual_seed(s.seed)
        ids = generate(
            params,
            config,
            [encode_prompt(tok, s.prompts[0])],
            n,
            temperature=temp,
            top_p=top_p,
            eos_id=tok.eos_id,
            generator=g,
            vocab_limit=min(tok.vocab_size, config.vocab_size),
        )[0]
        samples.append(
            {
                "label": label,
                "temperature": temp,
                "top_p": top_p,
                "tokens": len(ids),
                "stopped_at_eos": len(ids) < n,
                "text": s.prompts[0] + tok.decode(ids),
            }
        )
    md = "\n".join(
        f"**{x['label']}** (temperature {x['temperature']}, top-p {x['top_p']}, {x['tokens']} tokens"
        f"{', stopped at <|endoftext|>' if x['stopped_at_eos'] else ''}):\n\n"
        + "\n".join("> " + line for line in x["text"].splitlines())
        + "\n"
        for x in samples
    )
    return {"table": md, "plots": [], "results": samples, "best_step": header.get("step")}


# ------------------------------------------------------------------------------------------ §2.7


_HANDOUT_TS_VOCAB = 10_000
_SAMPLE_BYTES = 16 << 20


def exp_tokenizer(ctx: Context, gpt2_dir: str | None = None) -> dict[str, Any]:
    """Compression (bytes/token) of the run's BPE, a 10K TinyStories BPE (the handout's) and
    GPT-2's on both splits, the longest token, single-process encoding throughput and the time to
    encode 825 GB (handout §2.7). Each split is sampled by its first 16 MiB.

    Raises:
        ValueError: ``gpt2_dir`` is given but lacks ``gpt2_vocab.json`` or ``gpt2_merges.txt``.
    """
    from flm.runs import train_tokenizer
    from flm.tokenizer import EOS_TOKEN

    gpt2 = None if gpt2_dir is None else Path(gpt2_dir)
    if gpt2 is not None:  # a comparison asked for is never dropped silently
        missing = [n for n in ("gpt2_vocab.json", "gpt2_merges.txt") if not (gpt2 / n).is_file()]
        if missing:
            raise ValueError(f"gpt2_dir {gpt2_dir} has no {' or '.join(missing)}: cannot compare with GPT-2")
    toks = {f"run BPE ({ctx.tokenizer.vocab_size:,})": ctx.tokenizer}
    if ctx.tokenizer.vocab_size != _HANDOUT_TS_VOCAB and "train" in ctx.data:
        # The handout's TinyStories tokenizer has 10K tokens; train it in memory (seconds on the excerpt).
        ts = train_tokenizer(ctx.data["train"], _HANDOUT_TS_VOCAB, train_bytes=ctx.cfg.data.train_bytes, progress=False)
        toks[f"TinyStories BPE ({ts.vocab_size:,})"] = ts  # fewer than 10K if the text runs out of pairs
    if gpt2 is not None:
        toks["GPT-2 (50,257)"] = Tokenizer.from_files(gpt2 / "gpt2_vocab.json", gpt2 / "gpt2_merges.txt", [EOS_TOKEN])
    rows, results = [], []
    for name, tok in toks.items():
        longest = max((b for b in tok.vocab.values() if b.decode("utf-8", "replace") != EOS_TOKEN), key=len)
        for split, path in ctx.data.items():
            with open(path, "rb") as f:  # a sample: the first few MB of each split are plenty
                text = f.read(_SAMPLE_BYTES).decode("utf-8", errors="ignore")
            raw = len(text.encode("utf-8"))
            tok.encode(text[:1000])
            t0 = time.perf_counter()
            n = len(tok.encode(text))
            secs = time.perf_counter() - t0
            mbps = raw / secs / 1e6
            rows.append([name, split, raw, n, raw / n, mbps, 825e9 / (raw / secs) / 86400])
            results.append(
                {
                    "tokenizer": name,
                    "split": split,
                    "bytes": raw,
                    "tokens": n,
                    "bytes_per_token": raw / n,
                    "mb_per_s": mbps,
                    "longest_token": longest.decode("utf-8", "replace"),
                    "longest_token_bytes": len(longest),
                }
            )
    head = ["tokenizer", "split", "bytes", "tokens", "bytes/token", "MB/s (1 process)", "days for 825 GB (1 process)"]
    longest = "\n".join(
        f"- {r['tokenizer']}: longest token {r['longest_token'][:40]!r}"
        f"{'…' if len(r['longest_token']) > 40 else ''} ({r['longest_token_bytes']} bytes)"
        for r in results[:: len(ctx.data)]
    )
    return {"table": markdown_table(head, rows) + "\n" + longest + "\n", "plots": [], "results": results}


EXPERIMENTS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "lr": exp_lr,
    "batch-size": exp_batch_size,
    "ablations": exp_ablations,
    "tie": exp_tie,
    "generate": exp_generate,
    "tokenizer": exp_tokenizer,
}


def run_experiment(ctx: Context, name: str, command: str, **kw: Any) -> dict[str, Any]:
    """Run one experiment and write ``OUT/<name>/report.md`` and ``results.json``.

    Args:
        ctx: the shared context.
        name: a key of :data:`EXPERIMENTS`.
        command: the command line that ran it (recorded in the report).
        **kw: passed to the experiment function.

    Returns:
        The experiment's results, with ``wall_time`` and ``machine``.

    Raises:
        ValueError: an unknown experiment.
        flm.manifest.ForeignFilesError: a directory it would replace holds files flm did not write.
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {sorted(EXPERIMENTS)}")
    d = ctx.out / name.replace("-", "_")
    manifest.claim(d)
    t0 = time.perf_counter()
    res = EXPERIMENTS[name](ctx, **kw)
    res["wall_time"] = time.perf_counter() - t0
    res["machine"] = machine()
    res["command"] = command
    plots = "".join(f"![{p}]({p})\n\n" for p in res["plots"])
    md = (
        f"# {name}\n\n`{command}`\n\nWall time {res['wall_time'] / 60:.1f} min on {res['machine']}.\n\n"
        f"{res['table']}\n{plots}"
    )
    atomic_write_text(d / "report.md", md)
    atomic_write_json(d / "results.json", {k: v for k, v in res.items() if k != "table"})
    ctx.log(md)
    return res
