"""Command line: train a BPE tokenizer, or encode a text file to a token file.

    python -m flm.tokenizer train INPUT --vocab-size 10000 --out-dir tok/ [--special "<|endoftext|>"]
    python -m flm.tokenizer encode INPUT OUTPUT --vocab tok/vocab.json --merges tok/merges.txt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from flm.tokenizer.bpe import train_bpe
from flm.tokenizer.encode_file import encode_file
from flm.tokenizer.tokenizer import EOS_TOKEN, Tokenizer


def main(argv: list[str] | None = None) -> int:
    """Run the ``train`` or ``encode`` sub-command.

    Args:
        argv: arguments (default ``sys.argv[1:]``).

    Returns:
        the exit status (0).
    """
    ap = argparse.ArgumentParser(prog="python -m flm.tokenizer", description="byte-level BPE tokenizer")
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train on a UTF-8 text file; writes vocab.json and merges.txt")
    tr.add_argument("input")
    tr.add_argument("--vocab-size", type=int, required=True)
    tr.add_argument("--out-dir", required=True)
    en = sub.add_parser("encode", help="encode a UTF-8 text file to a uint16/uint32 token file + .json sidecar")
    en.add_argument("input")
    en.add_argument("output")
    en.add_argument("--vocab", required=True)
    en.add_argument("--merges", required=True)
    for p in (tr, en):
        p.add_argument("--special", action="append", help=f"special token (repeatable; default {EOS_TOKEN})")
        p.add_argument("--workers", type=int, default=None, help="processes (default: automatic)")
    args = ap.parse_args(argv)
    specials = args.special if args.special is not None else [EOS_TOKEN]
    t0 = time.perf_counter()
    if args.cmd == "train":
        vocab, merges = train_bpe(args.input, args.vocab_size, specials, num_workers=args.workers, progress=None)
        out = Path(args.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        Tokenizer(vocab, merges, specials).save(out / "vocab.json", out / "merges.txt")
        print(f"{len(vocab)} tokens, {len(merges)} merges -> {out} ({time.perf_counter() - t0:.2f} s)", file=sys.stderr)
    else:
        tok = Tokenizer.from_files(args.vocab, args.merges, specials)
        n = encode_file(tok, args.input, args.output, num_workers=args.workers)
        print(f"{n} tokens -> {args.output} ({time.perf_counter() - t0:.2f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
