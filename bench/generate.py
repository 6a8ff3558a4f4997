"""Decoding speed: flm's KV-cached ``generate`` vs recomputing the whole prefix every token.

Greedy decoding (no EOS) of ``--new-tokens`` tokens (default 256) after prompts of 16, 64 and 128
tokens on the handout model (vocab 10,000, d_model 512, 4 layers, 16 heads, d_ff 1,344) with
context_length 512, so prompt + 256 generated tokens fit and neither side slides its window: the
comparison is at exactly 256 generated tokens. The peer is the plain decoder of handout §6: call
``transformer_lm`` on the full sequence and take the last position's argmax. Each timing is the
median of ``--repeats`` runs after ``--warmup`` short (8-token) warm-up runs, the two sides timed
alternately (``common.measure_interleaved``) so load from other processes on a shared machine hits
both (the 1-minute load average is recorded per row); both sides run under ``torch.no_grad``, and
the tokens of the last timed run of each are compared (``match``).

    python bench/generate.py [--device cpu] [--json out.json] [--quick] [--repeats 3] [--new-tokens 256]

``--quick``: a tiny model, one repetition, a few tokens (a smoke test).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from flm.generate import generate
from flm.model import TransformerConfig, init_params, transformer_lm

HANDOUT = TransformerConfig(
    vocab_size=10_000, context_length=512, d_model=512, num_layers=4, num_heads=16, d_ff=1344, rope_theta=10000.0
)
QUICK = TransformerConfig(vocab_size=256, context_length=64, d_model=64, num_layers=2, num_heads=4, d_ff=96)


@torch.no_grad()
def recompute_greedy(params: dict, config: TransformerConfig, prompt: torch.Tensor, n: int) -> list[int]:
    """The naive decoder: one full ``transformer_lm`` forward over the whole sequence per token.

    Args:
        params: model parameters.
        config: the model's hyperparameters.
        prompt: ``(1, prompt_len)`` int64 ids.
        n: tokens to generate (``prompt_len + n ≤ context_length``).

    Returns:
        The ``n`` generated ids.
    """
    seq = prompt
    for _ in range(n):
        logits = transformer_lm(params, seq, config, check_ids=False)
        seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, prompt.shape[1] :].tolist()


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, print a table and optionally write JSON.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        :func:`common.make_result`'s dict; its ``rows`` are ``{"prompt_len", "new_tokens",
        "cached_s", "cached_min_s", "cached_max_s", "cached_tok_s", "recompute_s", ...,
        "recompute_tok_s", "speedup", "tokens_match", "load_avg_1m"}``, plus ``config``,
        ``new_tokens`` and ``repeats``.
    """
    ap = common.make_parser(__doc__.splitlines()[0], dtype=False, repeats=3)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-lengths", type=int, nargs="+", default=[16, 64, 128])
    args = ap.parse_args(argv)

    device = common.check_device(args.device)
    config = QUICK if args.quick else HANDOUT
    repeats = 1 if args.quick else args.repeats
    new_tokens = min(args.new_tokens, 16) if args.quick else args.new_tokens
    prompt_lengths = [4, 8] if args.quick else args.prompt_lengths
    for plen in prompt_lengths:
        if plen + new_tokens > config.context_length:
            raise SystemExit(f"prompt {plen} + {new_tokens} new tokens exceed context_length {config.context_length}")
    params = init_params(config, torch.Generator().manual_seed(0), device=device)
    g = torch.Generator().manual_seed(1)

    rows = []
    print(
        f"device={device} threads={torch.get_num_threads()} new_tokens={new_tokens} repeats={repeats} (median)",
        flush=True,
    )
    for plen in prompt_lengths:
        prompt = torch.randint(0, config.vocab_size, (1, plen), generator=g).to(device)
        outs: dict[str, list[int]] = {}  # the last run's tokens of each side (compared, not timed)

        def cached(n: int = new_tokens, prompt: torch.Tensor = prompt, outs: dict = outs) -> None:
            outs["cached"] = generate(params, config, prompt, n, temperature=0.0)[0]

        def naive(n: int = new_tokens, prompt: torch.Tensor = prompt, outs: dict = outs) -> None:
            outs["recompute"] = recompute_greedy(params, config, prompt, n)

        for _ in range(args.warmup):  # short warm-up runs (allocator, kernels): 8 tokens each
            cached(8), naive(8)
        st = common.measure_interleaved(
            {"cached": cached, "recompute": naive}, device=device, repeats=repeats, warmup=0
        )
        c, r = st["cached"], st["recompute"]
        print(f"prompt {plen}: cached {c['median']:.3f} s, recompute {r['median']:.3f} s", flush=True)
        rows.append(
            {
                "prompt_len": plen,
                "new_tokens": new_tokens,
                "cached_s": c["median"],
                "cached_min_s": c["min"],
                "cached_max_s": c["max"],
                "cached_tok_s": new_tokens / c["median"],
                "recompute_s": r["median"],
                "recompute_min_s": r["min"],
                "recompute_max_s": r["max"],
                "recompute_tok_s": new_tokens / r["median"],
                "speedup": r["median"] / c["median"],
                "tokens_match": outs["cached"] == outs["recompute"],
                "load_avg_1m": c["load_avg_1m"],
            }
        )
    common.print_table(
        rows,
        [
            ("prompt_len", "prompt"),
            ("cached_s", "cached s"),
            ("cached_tok_s", "cached tok/s"),
            ("recompute_s", "recompute s"),
            ("recompute_tok_s", "recompute tok/s"),
            ("speedup", "speedup"),
            ("tokens_match", "match"),
            ("load_avg_1m", "load"),
        ],
    )
    notes = []
    if not all(r["tokens_match"] for r in rows):
        notes.append("WARNING: the cached and recomputing decoders produced different tokens")
    result = common.make_result(
        "generate", args, rows, notes, config=config.to_dict(), new_tokens=new_tokens, repeats=repeats
    )
    return common.finish(result, args)


if __name__ == "__main__":
    main()
