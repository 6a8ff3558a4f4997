"""The end-to-end TinyStories / OpenWebText pipeline behind ``examples/train_tinystories.py``.

Stages, each cached in the run directory and skipped when its inputs have not changed:

1. data: download the data set when no ``--train-text``/``--valid-text`` is given;
2. tokenizer: train a byte-level BPE on the training text, save ``vocab.json``/``merges.txt``;
3. encode: the train/valid texts to ``train.tokens``/``valid.tokens`` (+ JSON sidecars);
4. train: :func:`flm.train.train_loop` (metrics, plots, checkpoints, resume);
5. evaluate: the best checkpoint on all validation tokens, next to the validation tokens'
   unigram entropy (the loss of a model that ignores context) → ``results.json``;
6. samples: stories from a few prompts → ``samples.txt``.

Source: CS336 assignment 1 handout §5–§7.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flm.model import TransformerConfig, count_params
from flm.tree import tree_map

__all__ = ["PRESETS", "parse_args", "build_configs", "unigram_entropy", "prepare_tokens", "run", "main"]

EOT = "<|endoftext|>"

# Named configurations. "handout" is the handout's TinyStories model and budget (§7.2):
# 128 × 10,000 steps × 256 tokens = 327.68M tokens. "cpu-small" trains in about 15 minutes on a
# 2-core CPU; "tiny" is the CI smoke test.
PRESETS: dict[str, dict[str, Any]] = {
    "handout": dict(
        vocab_size=10_000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344,
        rope_theta=10_000.0, batch_size=128, max_iters=10_000, lr=3e-3, min_lr=3e-4, warmup_iters=500,
        weight_decay=0.1, grad_clip=1.0, eval_interval=500, eval_batches=50, checkpoint_interval=1000,
        log_interval=50,
    ),
    "cpu-small": dict(
        vocab_size=4096, context_length=128, d_model=256, num_layers=4, num_heads=8, d_ff=704,
        rope_theta=10_000.0, batch_size=16, max_iters=600, lr=2e-3, min_lr=2e-4, warmup_iters=60,
        weight_decay=0.1, grad_clip=1.0, eval_interval=50, eval_batches=None, checkpoint_interval=200,
        log_interval=10,
    ),
    "tiny": dict(
        vocab_size=300, context_length=32, d_model=32, num_layers=2, num_heads=2, d_ff=64,
        rope_theta=10_000.0, batch_size=8, max_iters=40, lr=3e-3, min_lr=3e-4, warmup_iters=5,
        weight_decay=0.1, grad_clip=1.0, eval_interval=20, eval_batches=4, checkpoint_interval=20,
        log_interval=5,
    ),
}

PROMPTS = ("Once upon a time", "Lily and her dog", "One day, a little boy named Tom")


def default_device() -> str:
    """cuda > mps > cpu."""
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line of ``examples/train_tinystories.py`` (flags override the preset)."""
    p = argparse.ArgumentParser(
        prog="train_tinystories.py",
        description="Train a BPE tokenizer and a Transformer LM on TinyStories (or OWT) end to end, then sample.",
    )
    p.add_argument("--preset", choices=sorted(PRESETS), default="handout", help="named configuration (default: handout)")
    p.add_argument("--dataset", choices=("tinystories", "owt"), default="tinystories", help="data set to download when no text files are given")
    p.add_argument("--data-dir", default="data", help="where downloaded data sets go")
    p.add_argument("--train-text", help="training text (documents separated by <|endoftext|>)")
    p.add_argument("--valid-text", help="validation text")
    p.add_argument("--out-dir", help="run directory (default: runs/<preset>)")
    p.add_argument("--device", default=None, help="cuda | mps | cpu (default: the best available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "bf16", "fp32"), help="compute dtype")
    p.add_argument("--compile", action="store_true", help="torch.compile the whole train step")
    p.add_argument("--seed", type=int, default=0)
    for name, typ in (("vocab-size", int), ("context-length", int), ("d-model", int), ("num-layers", int),
                      ("num-heads", int), ("d-ff", int), ("rope-theta", float), ("batch-size", int), ("lr", float),
                      ("min-lr", float), ("warmup-iters", int), ("max-iters", int), ("weight-decay", float),
                      ("grad-clip", float), ("eval-interval", int), ("eval-batches", int),
                      ("checkpoint-interval", int), ("log-interval", int), ("grad-accum-steps", int)):
        p.add_argument(f"--{name}", type=typ, default=None)
    p.add_argument("--tokens", type=float, default=None, help="total training tokens (sets --max-iters)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out-dir")
    p.add_argument("--num-workers", type=int, default=None, help="processes for tokenizer training/encoding")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.9)
    return p.parse_args(argv)


def build_configs(args: argparse.Namespace) -> tuple[TransformerConfig, Any]:
    """Merge the preset with the command-line overrides into model and train configs.

    Raises:
        ValueError: for invalid combinations (from the configs' validation).
    """
    from flm.train import TrainConfig

    s = dict(PRESETS[args.preset])
    s.setdefault("grad_accum_steps", 1)
    for key in list(s) + ["eval_batches"]:
        value = getattr(args, key, None)
        if value is not None:
            s[key] = value
    if args.tokens is not None:
        s["max_iters"] = max(1, round(args.tokens / (s["batch_size"] * s["context_length"])))
    s["warmup_iters"] = min(s["warmup_iters"], s["max_iters"])
    model = TransformerConfig(
        vocab_size=s["vocab_size"], context_length=s["context_length"], d_model=s["d_model"],
        num_layers=s["num_layers"], num_heads=s["num_heads"], d_ff=s["d_ff"], rope_theta=s["rope_theta"],
    )
    train = TrainConfig(
        batch_size=s["batch_size"], max_iters=s["max_iters"], lr=s["lr"], min_lr=min(s["min_lr"], s["lr"]),
        warmup_iters=s["warmup_iters"], weight_decay=s["weight_decay"], grad_clip=s["grad_clip"],
        eval_interval=s["eval_interval"], eval_batches=s["eval_batches"], checkpoint_interval=s["checkpoint_interval"],
        log_interval=s["log_interval"], seed=args.seed, device=args.device or default_device(),
        compile=args.compile, dtype=args.dtype, grad_accum_steps=s["grad_accum_steps"],
    )
    return model, train


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy (nats) of the tokens' own unigram distribution: the loss floor of a context-free model."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _file_stamp(path: str | os.PathLike) -> dict[str, Any]:
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _cached(stamp_path: Path, stamp: dict[str, Any], outputs: Sequence[Path]) -> bool:
    if not stamp_path.exists() or not all(o.exists() for o in outputs):
        return False
    try:
        return json.loads(stamp_path.read_text()) == stamp
    except json.JSONDecodeError:
        return False


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def prepare_tokens(
    out: Path,
    train_text: str,
    valid_text: str,
    vocab_size: int,
    num_workers: int | None = None,
    *,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> tuple[Any, dict[str, np.ndarray]]:
    """Stages 2–3: train (or reuse) the BPE tokenizer and encode (or reuse) the token files.

    Each stage is skipped when its stamp (input file path/size/mtime, vocabulary size, tokenizer
    fingerprint) matches and its outputs exist.

    Args:
        out: the run directory (``vocab.json``, ``merges.txt``, ``{train,valid}.tokens`` + sidecars).
        train_text: training text file.
        valid_text: validation text file.
        vocab_size: BPE vocabulary size (special token included).
        num_workers: processes for pre-tokenisation and encoding (``None``: automatic).
        log: where progress lines go.
        progress: progress bars on stderr.

    Returns:
        ``(tokenizer, {"train": memmap, "valid": memmap})``.
    """
    from flm.data import load_tokens
    from flm.tokenizer import Tokenizer, encode_file, train_bpe

    vocab_path, merges_path = out / "vocab.json", out / "merges.txt"
    stamp = {"train_text": _file_stamp(train_text), "vocab_size": vocab_size, "special_tokens": [EOT]}
    if _cached(out / "tokenizer.stamp.json", stamp, [vocab_path, merges_path]):
        log("tokenizer: cached")
    else:
        t = time.perf_counter()
        vocab, merges = train_bpe(train_text, vocab_size, [EOT], num_workers=num_workers, progress=progress)
        Tokenizer(vocab, merges, [EOT]).save(vocab_path, merges_path)
        _write_json(out / "tokenizer.stamp.json", stamp)
        log(f"tokenizer: trained {len(vocab)} tokens in {time.perf_counter() - t:.1f}s")
    tokenizer = Tokenizer.from_files(vocab_path, merges_path, special_tokens=[EOT])
    tokens = {}
    for split, text in (("train", train_text), ("valid", valid_text)):
        tok_path = out / f"{split}.tokens"
        stamp = {"text": _file_stamp(text), "tokenizer": tokenizer.fingerprint()}
        if _cached(out / f"{split}.stamp.json", stamp, [tok_path, Path(f"{tok_path}.json")]):
            log(f"encode {split}: cached")
        else:
            t = time.perf_counter()
            n = encode_file(tokenizer, text, tok_path, num_workers=num_workers, progress=progress)
            _write_json(out / f"{split}.stamp.json", stamp)
            log(f"encode {split}: {n:,} tokens in {time.perf_counter() - t:.1f}s")
        tokens[split] = load_tokens(tok_path, vocab_size=vocab_size, tokenizer_fingerprint=tokenizer.fingerprint())
    return tokenizer, tokens


def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage for parsed ``args``; return the results written to ``results.json``."""
    from flm import distributed
    from flm.checkpoint import load_checkpoint
    from flm.data import download
    from flm.generate import generate
    from flm.train import evaluate, train_loop

    model_cfg, train_cfg = build_configs(args)
    out = Path(args.out_dir or f"runs/{args.preset}")
    out.mkdir(parents=True, exist_ok=True)
    # Under torchrun: rank 0 prepares data and tokenizer while the others wait, then all train.
    info = distributed.init_from_env(train_cfg.device)
    if not info.is_main:
        log = lambda _msg: None  # noqa: E731
        distributed.barrier()

    # 1. data
    if (args.train_text is None) != (args.valid_text is None):
        raise ValueError("give both --train-text and --valid-text, or neither (to download --dataset)")
    if args.train_text is None:
        paths = download(args.dataset, args.data_dir, progress=info.is_main)
        train_text, valid_text = str(paths["train"]), str(paths["valid"])
    else:
        train_text, valid_text = args.train_text, args.valid_text
    for path in (train_text, valid_text):
        if not os.path.isfile(path):
            raise ValueError(f"text file not found: {path}")

    run_config = {
        "model": model_cfg.to_dict(),
        "train": train_cfg.to_dict(),
        "data": {"train_text": os.path.abspath(train_text), "valid_text": os.path.abspath(valid_text)},
        "preset": args.preset,
        "num_params": count_params(model_cfg),
    }
    if info.is_main:
        _write_json(out / "config.json", run_config)
    log(f"model: {count_params(model_cfg):,} parameters; run dir {out}")

    # 2.–3. tokenizer and token files
    tokenizer, tokens = prepare_tokens(out, train_text, valid_text, model_cfg.vocab_size, args.num_workers, log=log)
    if info.is_main:
        distributed.barrier()  # release the other ranks: tokenizer and token files are ready

    # 4. train (skipped when a finished run with the same settings is already here)
    summary_path = out / "train_summary.json"
    finished = summary_path.exists() and json.loads(summary_path.read_text()).get("run_config") == run_config
    if finished and not args.resume and not info.enabled:
        log("train: cached (a finished run with these settings is in the run dir)")
        summary = json.loads(summary_path.read_text())["summary"]
    else:
        if not args.resume and info.is_main:
            for old in out.glob("*.safetensors"):
                old.unlink()
        distributed.barrier()
        summary = train_loop(
            model_cfg, train_cfg, tokens["train"], tokens["valid"], out,
            resume=args.resume, run_config=run_config, log=log, dist_info=info,
        )
        if not info.is_main:
            distributed.shutdown()
            return summary
        if summary["status"] != "done":
            log(f"stopped at step {summary['step']}; continue with --resume")
            return summary
        _write_json(summary_path, {"run_config": run_config, "summary": summary})

    # 5. evaluate the best checkpoint on every validation token
    best_path = out / "best.safetensors"
    ckpt = load_checkpoint(best_path if best_path.exists() else sorted(out.glob("ckpt_*.safetensors"))[-1])
    device = train_cfg.device
    params = tree_map(lambda p: p.to(device), ckpt.params)
    final = evaluate(params, model_cfg, tokens["valid"], train_cfg.batch_size, model_cfg.context_length)
    h1 = unigram_entropy(tokens["valid"], model_cfg.vocab_size)
    results = {
        "best_step": ckpt.step,
        "val_loss": final["loss"],
        "val_perplexity": final["perplexity"],
        "val_tokens": final["tokens"],
        "unigram_entropy": h1,
        "train_wall_time_s": summary["wall_time"],
        "train_tokens_per_sec": summary["tokens_per_sec"],
        "steps": summary["step"],
        "num_params": count_params(model_cfg),
    }
    log(f"validation: loss {final['loss']:.4f} nats/token (perplexity {final['perplexity']:.2f}) at best step {ckpt.step}; "
        f"unigram entropy {h1:.4f}")

    # 6. samples
    gen = torch.Generator(device=device).manual_seed(args.seed)
    prompts = [tokenizer.encode(p) for p in PROMPTS]
    outs = generate(params, model_cfg, prompts, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                    eos_id=tokenizer.eos_id, generator=gen)
    texts = [p + tokenizer.decode(o) for p, o in zip(PROMPTS, outs)]
    sep = "\n\n" + "-" * 72 + "\n\n"
    (out / "samples.txt").write_text(
        f"# {out.name}: best step {ckpt.step}, temperature {args.temperature}, top-p {args.top_p}\n\n" + sep.join(texts) + "\n"
    )
    log(sep.join(texts))
    results["samples"] = texts
    _write_json(out / "results.json", results)
    distributed.shutdown()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: parse, run, report errors in one line."""
    from flm.train import NonFiniteLossError

    args = parse_args(argv)
    try:
        run(args, log=lambda s: print(s, flush=True))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0

