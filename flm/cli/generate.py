"""``flm generate``: sample text from a trained run, streamed to stdout as it is sampled.

    flm generate runs/cpu-small --prompt "Once upon a time" --temperature 0.8 --top-p 0.9

The model is the run's ``best.safetensors`` (or a given checkpoint); the tokenizer is the one
beside it, checked against the fingerprint the checkpoint recorded. Decoding settings default to
the run's ``sample`` settings. The device is picked as training picks it (cuda > mps > cpu).

Source: CS336 assignment 1 handout §6.
"""

from __future__ import annotations

import argparse
import codecs
import sys
from typing import Any

import torch

from flm.cli.common import UsageError, checkpoint_arg, for_terminal, pick_device
from flm.config import SampleConfig

__all__ = ["add_parser", "run"]


def add_parser(sub: Any, argv: list[str]) -> None:
    """Register ``flm generate``."""
    p = sub.add_parser(
        "generate", help="sample text from a trained run or checkpoint", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "run",
        metavar="RUN_OR_CHECKPOINT",
        nargs="?",
        help="a run directory (its best.safetensors) or a checkpoint file",
    )
    p.add_argument("--checkpoint", help="the same as RUN_OR_CHECKPOINT (the older spelling)")
    p.add_argument("--prompt", default=None, help="text to continue (default: start from <|endoftext|>)")
    p.add_argument("--max-new-tokens", type=int, help="most tokens per sample (default: the run's, else 256)")
    p.add_argument("--temperature", type=float, help="softmax temperature ≥ 0; 0 = greedy (default: the run's)")
    p.add_argument("--top-p", type=float, help="nucleus threshold in (0, 1] (default: the run's)")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens, 0 = off (default: the run's)")
    p.add_argument("--num-samples", type=int, default=1, help="samples to draw (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default: 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default: auto)")
    p.add_argument("--no-stream", action="store_true", help="print each sample when it is complete")
    p.set_defaults(handler=run)


def sample_settings(args: argparse.Namespace, saved: dict[str, Any] | None) -> SampleConfig:
    """The decoding settings: flags, else the run's ``sample`` section, else the defaults.

    Raises:
        UsageError: a value out of range (naming it).
    """
    base = {k: v for k, v in (saved or {}).items() if k in SampleConfig.__dataclass_fields__ and k != "prompts"}
    for name in ("max_new_tokens", "temperature", "top_p", "top_k"):
        if getattr(args, name) is not None:
            base[name] = getattr(args, name)
    try:
        return SampleConfig(**base)
    except (TypeError, ValueError) as err:
        raise UsageError(str(err).replace("SampleConfig: ", "--").replace("_", "-")) from None


def _write(text: str) -> None:
    """Write sampled text to stdout: exact to a file or a pipe, control characters escaped on a
    terminal (a small model's ESC or shift-out bytes would otherwise drive it): see
    :func:`flm.cli.common.for_terminal`."""
    sys.stdout.write(for_terminal(text, sys.stdout))


def run(args: argparse.Namespace) -> int:
    """Load the run, then stream ``--num-samples`` continuations of ``--prompt`` to stdout
    (control characters escaped when stdout is a terminal)."""
    from flm.generate import generate_stream
    from flm.runs import encode_prompt, load_model, load_tokenizer_beside
    from flm.tree import all_finite

    args.run = args.checkpoint or args.run
    if args.run is None:
        raise UsageError("give a run directory or a checkpoint file")
    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be ≥ 1, got {args.num_samples}")
    ckpt = checkpoint_arg(args.run)
    device = pick_device(args.device)
    params, config, header = load_model(ckpt, device=device)
    if not all_finite(params):
        raise ValueError(
            f"{ckpt} holds NaN/inf parameters (step {header.get('step', '?')}), so it cannot generate text; "
            "generate from an earlier checkpoint of the run, or retrain (e.g. with a lower --lr)"
        )
    tokenizer = load_tokenizer_beside(ckpt, header)
    s = sample_settings(args, (header.get("config") or {}).get("sample"))
    prompt = args.prompt or ""
    try:
        ids = encode_prompt(tokenizer, prompt)
    except ValueError as err:
        raise UsageError(f"--prompt: {err}") from None
    if max(ids) >= config.vocab_size:
        raise UsageError(
            f"the prompt encodes to token {max(ids)}, outside the model's vocabulary of {config.vocab_size}"
        )
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {i + 1} ---", flush=True)
        gen = torch.Generator(device=device).manual_seed(args.seed + i)
        stream = generate_stream(
            params,
            config,
            [ids],
            s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k or None,
            eos_id=tokenizer.eos_id,
            generator=gen,
            vocab_limit=min(tokenizer.vocab_size, config.vocab_size),  # BPE may stop short of vocab_size
        )
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        out = [prompt]
        _write(prompt)
        for step in stream:
            if step[0] is None:
                break
            piece = decoder.decode(tokenizer.decode_bytes([step[0]]))
            out.append(piece)
            if not args.no_stream:
                _write(piece)
                sys.stdout.flush()
        tail = decoder.decode(b"", final=True)
        if args.no_stream:
            _write("".join(out[1:]))
        _write(tail + "\n")
        sys.stdout.flush()
    return 0
