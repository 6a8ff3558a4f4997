"""The smaller ``flm`` subcommands: ``tokenize`` (train / encode), ``download``, ``eval``, ``export-hf``,
``consolidate``.

flm tokenize train INPUT --vocab-size 10000 --out-dir tok/
flm tokenize encode INPUT OUTPUT --tokenizer tok/
flm download tinystories data/
flm eval runs/cpu-small --text ../shared/data/tinystories/valid.txt
flm export-hf runs/cpu-small --out hf-model/
flm consolidate runs/sharded            (best.shards -> best.safetensors)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from flm import manifest
from flm.cli.common import UsageError, checkpoint_arg, log, pick_device

__all__ = ["add_parsers"]


def _input_file(path: str | Path, what: str) -> Path:
    """``path`` as an existing regular file, or a :class:`UsageError` saying what it is instead.

    Args:
        path: the file a flag or argument names.
        what: how to call it in the message (e.g. ``"--text x.txt"`` or the path itself).

    Raises:
        UsageError: it does not exist, is a directory, or is not a regular file.
    """
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{what}: is a directory, not a file")
    if not p.exists():
        raise UsageError(f"{what}: no such file")
    if not p.is_file():
        raise UsageError(f"{what}: not a regular file")
    return p


def add_parsers(sub: Any, argv: list[str]) -> None:
    """Register ``tokenize``, ``download``, ``eval``, ``export-hf`` and ``consolidate``."""
    from flm.download import DATASETS
    from flm.tokenizer import EOS_TOKEN

    tok = sub.add_parser("tokenize", help="train a BPE tokenizer, or encode a text file to a token file")
    tsub = tok.add_subparsers(dest="action", required=True, metavar="{train,encode}")
    tr = tsub.add_parser("train", help="train on a UTF-8 text file; writes vocab.json and merges.txt (GPT-2 format)")
    tr.add_argument("input", help="the training text")
    tr.add_argument("--vocab-size", type=int, required=True, help="final vocabulary size (≥ 256 + special tokens)")
    tr.add_argument("--out-dir", required=True, help="where vocab.json and merges.txt go")
    tr.add_argument("--max-bytes", type=int, help="train on the first N bytes only (cut at a document boundary)")
    tr.add_argument("--overwrite", action="store_true", help="replace an existing vocab.json/merges.txt in --out-dir")
    en = tsub.add_parser("encode", help="encode a UTF-8 text file to a uint16/uint32 token file + .json sidecar")
    en.add_argument("input", help="the text file")
    en.add_argument("output", help="the token file to write")
    en.add_argument("--tokenizer", help="a directory with vocab.json and merges.txt (e.g. a run dir)")
    en.add_argument("--vocab", help="the vocab.json (instead of --tokenizer)")
    en.add_argument("--merges", help="the merges.txt (instead of --tokenizer)")
    for p in (tr, en):
        p.add_argument("--special", action="append", help=f"special token (repeatable; default {EOS_TOKEN})")
        p.add_argument("--workers", type=int, help="processes (default: automatic)")
        p.set_defaults(handler=run_tokenize)

    dl = sub.add_parser("download", help="download a data set (resumes partial downloads, verifies size and SHA-256)")
    dl.add_argument("name", choices=sorted(DATASETS), help="which data set")
    dl.add_argument("dest", help="directory to save into")
    dl.add_argument("--base-url", help="a mirror's base URL (the file name is appended); still verified")
    dl.add_argument("--timeout", type=float, default=60.0, help="socket timeout in seconds (default: 60)")
    dl.add_argument(
        "--no-pins", action="store_true", help="skip the size/SHA-256 pins (e.g. for a changed upstream file)"
    )
    dl.add_argument("--no-progress", action="store_true", help="no progress bar")
    dl.set_defaults(handler=run_download)

    ev = sub.add_parser("eval", help="loss and perplexity of a trained run on any text file")
    ev.add_argument("run", metavar="RUN_OR_CHECKPOINT", help="a run directory (its best.safetensors) or a checkpoint")
    ev.add_argument("--text", required=True, help="a UTF-8 text file, encoded with the run's tokenizer")
    ev.add_argument("--batch-size", type=int, default=16, help="windows per forward pass (default: 16)")
    ev.add_argument("--max-batches", type=int, help="evaluate this many evenly spaced batches only (default: all)")
    ev.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default: auto)")
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    ev.set_defaults(handler=run_eval)

    ex = sub.add_parser("export-hf", help="write a run as a Hugging Face LlamaForCausalLM directory (+ tokenizer.json)")
    ex.add_argument("run", metavar="RUN_OR_CHECKPOINT", nargs="?", help="a run directory or a checkpoint file")
    ex.add_argument("--checkpoint", help="the checkpoint to export (same as the positional argument)")
    ex.add_argument("--out", required=True, help="the output directory (must be empty or new)")
    ex.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="store the weights in this dtype")
    ex.set_defaults(handler=run_export)

    co = sub.add_parser(
        "consolidate", help="write a sharded checkpoint (flm train --shard) as one ordinary .safetensors file"
    )
    co.add_argument(
        "src",
        metavar="RUN_OR_SHARDS",
        help="a run directory (its best.shards, else its newest ckpt_*.shards) or a .shards directory",
    )
    co.add_argument(
        "--out",
        help="the file to write (default: RUN/best.safetensors for a run directory, parameters only; "
        "DIR.safetensors beside a DIR.shards directory)",
    )
    co.set_defaults(handler=run_consolidate)


def run_tokenize(args: argparse.Namespace) -> int:
    """``flm tokenize train|encode``."""
    from flm.tokenizer import EOS_TOKEN, Tokenizer, encode_file, train_bpe

    specials = args.special if args.special is not None else [EOS_TOKEN]
    _input_file(args.input, args.input)
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be ≥ 1, got {args.workers}")
    t0 = time.perf_counter()
    if args.action == "train":
        if args.max_bytes is not None and args.max_bytes < 1:
            raise UsageError(f"--max-bytes must be ≥ 1, got {args.max_bytes}")
        if args.vocab_size < 256 + len(set(specials)):
            raise UsageError(
                f"--vocab-size {args.vocab_size} is smaller than 256 bytes + {len(set(specials))} special "
                f"token(s) = {256 + len(set(specials))}"
            )
        out = Path(args.out_dir)
        _check_tokenizer_dir(out, args.overwrite)
        vocab, merges = train_bpe(
            args.input, args.vocab_size, specials, num_workers=args.workers, progress=None, max_bytes=args.max_bytes
        )
        manifest.claim(out)  # recorded as flm's, so a later --overwrite may replace them
        Tokenizer(vocab, merges, specials).save(out / "vocab.json", out / "merges.txt")
        log(f"{len(vocab):,} tokens, {len(merges):,} merges -> {out} ({time.perf_counter() - t0:.2f} s)")
    else:
        if args.tokenizer:
            vocab, merges = Path(args.tokenizer) / "vocab.json", Path(args.tokenizer) / "merges.txt"
        elif args.vocab and args.merges:
            vocab, merges = Path(args.vocab), Path(args.merges)
        else:
            raise UsageError("give --tokenizer DIR, or --vocab and --merges")
        for f in (vocab, merges):
            _input_file(f, str(f))
        output = Path(args.output)
        refused = manifest.refused(output.parent, [output.name, f"{output.name}.json"])
        if refused:  # only a token file flm wrote (its sidecar says so) is replaced; never a link
            raise UsageError(manifest.refusal_message(refused, output.parent, flag="OUTPUT in"))
        tok = Tokenizer.from_files(vocab, merges, specials)
        manifest.expect(output)
        n = encode_file(tok, args.input, args.output, num_workers=args.workers, progress=None)
        manifest.record(output)
        log(f"{n:,} tokens -> {args.output} ({time.perf_counter() - t0:.2f} s)")
    return 0


def _check_tokenizer_dir(out: Path, overwrite: bool) -> None:
    """Refuse to replace a trained run's tokenizer (its checkpoints need it), a tokenizer flm
    did not write (with or without ``--overwrite``), or any existing tokenizer without ``--overwrite``.

    Raises:
        UsageError: naming the files and what to do.
    """
    from flm.runs import run_state

    try:
        state = run_state(out)
    except ValueError as err:
        raise UsageError(str(err).replace("--out-dir ", "")) from None
    if state.has_run:
        raise UsageError(f"{out} holds a trained run whose checkpoints need its tokenizer; write to another --out-dir")
    existing = [n for n in ("vocab.json", "merges.txt") if os.path.lexists(out / n)]
    refused = manifest.refused(out, existing)
    if refused:  # the user's own tokenizer (or a link): never replaced, --overwrite or not
        raise UsageError(manifest.refusal_message(refused, out))
    if existing and not overwrite:
        raise UsageError(f"{out} already holds {' and '.join(existing)}; pass --overwrite to replace them")


def run_download(args: argparse.Namespace) -> int:
    """``flm download``."""
    from flm.download import download

    paths = download(
        args.name,
        args.dest,
        base_url=args.base_url,
        progress=not args.no_progress,
        timeout=args.timeout,
        pins={} if args.no_pins else None,
    )
    for split, p in paths.items():
        print(f"{split}\t{p}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """``flm eval``: encode ``--text`` with the run's tokenizer and evaluate every window."""
    from flm.runs import load_model, load_tokenizer_beside
    from flm.train import evaluate

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be a positive integer, got {args.batch_size}")  # as flm train says
    if args.max_batches is not None and args.max_batches < 1:
        raise UsageError(f"--max-batches must be ≥ 1, got {args.max_batches}")
    _input_file(args.text, f"--text {args.text}")
    ckpt = checkpoint_arg(args.run)
    device = pick_device(args.device)
    params, config, header = load_model(ckpt, device=device)
    tokenizer = load_tokenizer_beside(ckpt, header)
    try:
        with open(args.text, encoding="utf-8") as f:
            ids = [i for chunk in tokenizer.encode_batches(iter(lambda: f.read(1 << 20), "")) for i in chunk]
    except UnicodeDecodeError as err:
        # A file's content, not the command line: a runtime error (exit 1), as in flm train.
        raise ValueError(f"--text {args.text} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if len(ids) < config.context_length + 1:
        raise UsageError(
            f"--text {args.text} encodes to {len(ids)} tokens; need context_length + 1 = {config.context_length + 1}"
        )
    res = evaluate(
        params,
        config,
        np.asarray(ids, dtype=np.int64),
        args.batch_size,
        config.context_length,
        args.max_batches,
        progress=True,
    )
    res["checkpoint"] = str(ckpt)
    res["text"] = args.text
    if args.json:
        print(json.dumps(res))
    else:
        print(
            f"{args.text}: loss {res['loss']:.4f} nats/token, perplexity {res['perplexity']:.2f} "
            f"({res['tokens']:,} tokens predicted, {res['checkpoint']})"
        )
    return 0


def run_export(args: argparse.Namespace) -> int:
    """``flm export-hf``: write a Hugging Face Llama directory with the run's tokenizer."""
    import torch

    from flm.interop import hf_config, save_hf
    from flm.runs import load_model, load_tokenizer_beside

    src = args.checkpoint or args.run
    if src is None:
        raise UsageError("give the run directory or --checkpoint")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--out {out} exists and is not an empty directory")
    ckpt = checkpoint_arg(src)
    params, config, header = load_model(ckpt)
    tokenizer = load_tokenizer_beside(ckpt, header)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        hf_config(config)  # a variant HF Llama cannot express (post-norm, SiLU FFN, NoPE) is a usage error
    except ValueError as err:
        raise UsageError(str(err)) from None
    save_hf(params, config, out, tokenizer, dtype=dtype)
    log(f"wrote {out}: LlamaForCausalLM.from_pretrained({str(out)!r}) and AutoTokenizer load it")
    return 0


def _consolidate_source(src: Path) -> tuple[Path, Path, bool]:
    """What ``flm consolidate SRC`` reads and writes by default: ``(shards directory, output file,
    parameters only)``.

    Raises:
        UsageError: a missing path, or a run directory without a complete sharded checkpoint.
    """
    from flm.sharded_checkpoint import BEST_SHARDS, is_complete, list_sharded_checkpoints

    if not src.exists():
        raise UsageError(f"{src} does not exist")
    if not src.is_dir():
        raise UsageError(f"{src} is a file; give a run directory or a .shards directory")
    if src.name.endswith(".shards"):
        return src, src.with_name(src.name[: -len(".shards")] + ".safetensors"), False
    if is_complete(src / BEST_SHARDS):
        return src / BEST_SHARDS, src / "best.safetensors", False
    periodic = [p for p in list_sharded_checkpoints(src) if is_complete(p)]
    if periodic:
        return periodic[-1], src / "best.safetensors", True
    partial = [p.name for p in (src / BEST_SHARDS, *list_sharded_checkpoints(src)) if p.is_dir()]
    what = f" ({', '.join(partial)} incomplete: a save that did not finish)" if partial else ""
    raise UsageError(f"{src} holds no complete sharded checkpoint (best.shards or ckpt_*.shards){what}")


def run_consolidate(args: argparse.Namespace) -> int:
    """``flm consolidate``: read every rank's shards (CRC-verified) and write one checkpoint file atomically."""
    from flm._io import run_lock
    from flm.sharded_checkpoint import write_consolidated

    source, out, params_only = _consolidate_source(Path(args.src))
    if args.out is not None:
        out, params_only = Path(args.out), False
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give the .safetensors file to write")
    if out.parent.is_dir() and manifest.has_manifest(out.parent):
        with run_lock(out.parent):  # a tracked directory: not while a run writes its manifest
            ckpt = write_consolidated(source, out, params_only=params_only)
    else:
        ckpt = write_consolidated(source, out, params_only=params_only)
    what = "parameters" if params_only or ckpt.opt_state is None else "parameters and optimiser state"
    log(f"wrote {out} (step {ckpt.step}, {what}) from {source}")
    return 0
