"""The ``flm`` command: ``flm <subcommand> …`` (also ``python -m flm``).

    flm train       a tokenizer and a model end to end (the main job)
    flm sweep       a learning-rate sweep as one vmapped run
    flm experiment  the handout's §7 experiments (sweeps, ablations, generation, tokenizer)
    flm generate    sample from a trained run
    flm eval        loss and perplexity of a run on any text file
    flm tokenize    train a BPE tokenizer / encode a text file
    flm download    fetch TinyStories or the OpenWebText sample (resumable, verified)
    flm export-hf   write a run as a Hugging Face Llama directory
    flm consolidate write a sharded checkpoint (--shard) as one .safetensors file

Every subcommand prints ``error: …`` on one line and exits 2 (usage) or 1 (runtime) for anything
a user can cause; ``--debug`` (or ``FLM_DEBUG=1``) shows the traceback. See :mod:`flm.cli.common`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from flm.cli.common import ArgumentParser, run_command, setup_logging, warnings_to_log

__all__ = ["main", "build_parser"]


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The ``flm`` parser; ``argv`` is pre-scanned so ``--help`` shows the chosen preset's defaults."""
    from flm import __version__
    from flm.cli import experiment, generate, sweep, tools, train

    argv = list(argv)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback on errors (or set FLM_DEBUG=1)",
    )
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="only warnings and errors")
    parser = ArgumentParser(
        prog="flm",
        parents=[common],
        description="flm: train small language models with pure functions over parameter trees.",
    )
    parser.add_argument("--version", action="version", version=f"flm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=ArgumentParser)
    original = sub.add_parser

    def add_parser(name: str, **kw: object) -> argparse.ArgumentParser:
        kw.setdefault("parents", [common])
        return original(name, **kw)

    sub.add_parser = add_parser  # every subcommand takes --debug/--quiet too
    rest = argv[1:] if argv else []
    train.add_parser(sub, rest)
    sweep.add_parser(sub, rest)
    experiment.add_parser(sub, rest)
    generate.add_parser(sub, rest)
    tools.add_parsers(sub, rest)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``flm`` command line; returns the exit code (0 success, 1 runtime error, 2 usage, 130 Ctrl-C, 143 SIGTERM)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    args.command_line = "flm " + shlex.join(argv)  # for reports that record how they were made
    setup_logging(quiet=getattr(args, "quiet", False))
    with warnings_to_log():
        return run_command(args.handler, args)
