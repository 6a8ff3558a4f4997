"""Decoding speed: flm's KV-cached ``generate`` vs recomputing the whole prefix every token.

Greedy decoding (no EOS) of ``--new-tokens`` tokens (default 256) after prompts of 16, 64 and 128
tokens on the handout model (vocab 10,000, d_model 512, 4 layers, 16 heads, d_ff 1,344) with
context_length 512, so prompt + 256 generated tokens fit and neither side slides its window: the
comparison is at exactly 256 generated tokens. The peer is the plain decoder of handout §6: call
``transformer_lm`` on the full sequence and take the last position's argmax. Each timing is the
median of ``--repeats`` runs after one warm-up, the two sides timed alternately so load from other
processes on a shared machine hits both (the 1-minute load average is recorded per row); both
sides run under ``torch.no_grad``.

    python bench/generate.py [--device cpu] [--json out.json] [--quick] [--repeats 3]

``--quick``: a tiny model, one repetition, a few tokens (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flm.generate import generate  # noqa: E402
from flm.model import TransformerConfig, init_params, transformer_lm  # noqa: E402

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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _interleaved_medians(
    fns: Sequence[Callable[[], object]], repeats: int, device: torch.device
) -> tuple[list[float], list[object]]:
    """Median seconds of each function, timing them alternately so shared-machine load hits both."""
    times: list[list[float]] = [[] for _ in fns]
    results: list[object] = [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            _sync(device)
            t0 = time.perf_counter()
            results[i] = fn()
            _sync(device)
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times], results


def _write_json_atomic(path: str, data: dict) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, target)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, print a table and optionally write JSON.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        ``{"config", "device", "threads", "new_tokens", "repeats", "results": [{"prompt_len",
        "cached_tok_s", "recompute_tok_s", "speedup", "tokens_match"}, ...]}``.
    """
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--quick", action="store_true", help="tiny model, one repetition (smoke test)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-lengths", type=int, nargs="+", default=[16, 64, 128])
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    config = QUICK if args.quick else HANDOUT
    repeats = 1 if args.quick else args.repeats
    new_tokens = min(args.new_tokens, 16) if args.quick else args.new_tokens
    prompt_lengths = [4, 8] if args.quick else args.prompt_lengths
    params = init_params(config, torch.Generator().manual_seed(0), device=device)
    g = torch.Generator().manual_seed(1)

    results = []
    print(f"device={device} threads={torch.get_num_threads()} new_tokens={new_tokens} repeats={repeats} (median)")
    print(f"{'prompt':>6} {'cached tok/s':>13} {'recompute tok/s':>16} {'speedup':>8}  match")
    for plen in prompt_lengths:
        if plen + new_tokens > config.context_length:
            raise SystemExit(f"prompt {plen} + {new_tokens} new tokens exceed context_length {config.context_length}")
        prompt = torch.randint(0, config.vocab_size, (1, plen), generator=g).to(device)

        def cached(n: int = new_tokens, prompt: torch.Tensor = prompt) -> list[int]:
            return generate(params, config, prompt, n, temperature=0.0)[0]

        def naive(n: int = new_tokens, prompt: torch.Tensor = prompt) -> list[int]:
            return recompute_greedy(params, config, prompt, n)

        cached(8), naive(8)  # warm-up (allocator, kernels)
        (t_cached, t_naive), (out_cached, out_naive) = _interleaved_medians([cached, naive], repeats, device)
        row = {
            "prompt_len": plen,
            "cached_tok_s": new_tokens / t_cached,
            "recompute_tok_s": new_tokens / t_naive,
            "speedup": t_naive / t_cached,
            "tokens_match": out_cached == out_naive,
            "load_avg_1m": os.getloadavg()[0],
        }
        results.append(row)
        print(
            f"{plen:>6} {row['cached_tok_s']:>13.1f} {row['recompute_tok_s']:>16.1f} {row['speedup']:>7.1f}x  "
            f"{row['tokens_match']}  (load {row['load_avg_1m']:.1f})",
            flush=True,
        )
    out = {
        "config": config.to_dict(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "new_tokens": new_tokens,
        "repeats": repeats,
        "torch": torch.__version__,
        "results": results,
    }
    if args.json:
        _write_json_atomic(args.json, out)
    return out


if __name__ == "__main__":
    main()
