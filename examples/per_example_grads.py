#!/usr/bin/env python
"""Per-example gradient norms of a Transformer LM with ``torch.func.vmap(torch.func.grad(...))``.

One vectorised call gives the gradient of every sequence in a batch separately (the quantity
behind DP-SGD's per-example clipping, gradient-noise-scale estimates and data attribution).
flm's model is a pure function of its parameter dict, so this is three lines:

    def example_loss(params, x, y):                  # one sequence: (seq_len,) ids
        return loss_fn(params, x[None], y[None])
    grads = vmap(grad(example_loss), in_dims=(None, 0, 0))(params, inputs, targets)

The script checks the result against a plain Python loop over the examples (and their mean
against the batch gradient), printing both. It trains a tiny byte-level BPE tokenizer on the
TinyStories excerpt in ``../shared/data`` (or ``$FLM_SHARED_DATA``) when it is there, and on
generated stories otherwise, so it runs anywhere in a few seconds on a CPU:

    python examples/per_example_grads.py
    python examples/per_example_grads.py --batch-size 16 --device cuda
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import torch
from torch.func import grad, vmap

from flm.data import get_batch
from flm.model import TransformerConfig, init_params
from flm.optim import global_norm
from flm.tokenizer import Tokenizer, count_pretokens, train_bpe_from_counts
from flm.train.step import grad_and_value, make_loss_fn
from flm.tree import tree_leaves, tree_map

EOT = "<|endoftext|>"


def load_text(text: str | None, max_chars: int) -> tuple[str, str]:
    """(text, where it came from): a file, the shared TinyStories excerpt, or generated stories."""
    if text is None:  # the shared data folder, found as the tests find it ("none" turns it off)
        env = os.environ.get("FLM_SHARED_DATA", "")
        shared = Path(env) if env else Path(__file__).resolve().parent.parent.parent / "shared" / "data"
        path = shared / "tinystories" / "train.txt"
        text = str(path) if env.lower() != "none" and path.is_file() else "generated"
    if text != "generated":
        with open(text, encoding="utf-8") as f:
            return f.read(max_chars), text
    rng = random.Random(0)  # simple English-like stories, seeded
    names, things = ["Lily", "Tom", "Ben", "Mia"], ["ball", "tree", "kite", "cake", "dog", "boat"]
    stories = []
    while sum(map(len, stories)) < max_chars:
        name = rng.choice(names)
        said = [f"{name} saw a {rng.choice(['big', 'red', 'happy'])} {rng.choice(things)}." for _ in range(3)]
        stories.append(f"Once upon a time, there was a girl named {name}. {' '.join(said)} The end.")
    return f"\n{EOT}\n".join(stories)[:max_chars], "generated stories"


def timed(f, *args):
    """(f(*args), seconds of a second call): the first call sets torch.func up (~2 s on a CPU)."""
    f(*args)
    t0 = time.perf_counter()
    out = f(*args)
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    """Compute per-example gradient norms with vmap(grad) and check them against a loop.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``); see ``--help``.

    Returns:
        0 (an ``AssertionError`` is raised when the two disagree).
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--context-length", type=int, default=32)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=320, help="BPE vocabulary (≥ 257)")
    p.add_argument("--text", default=None, help="a UTF-8 file, or 'generated' (default: shared TinyStories if found)")
    p.add_argument("--max-chars", type=int, default=20_000, help="characters of text to tokenise")
    args = p.parse_args(argv)

    # data: a tiny byte-level BPE, trained and applied on a few KB of text
    text, source = load_text(args.text, args.max_chars)
    vocab, merges = train_bpe_from_counts(count_pretokens(text, [EOT]), args.vocab_size, [EOT])
    tokenizer = Tokenizer(vocab, merges, [EOT])
    data = torch.tensor(tokenizer.encode(text))
    config = TransformerConfig(
        vocab_size=tokenizer.vocab_size,
        context_length=args.context_length,
        d_model=args.d_model,
        num_layers=args.num_layers,
        num_heads=max(1, args.d_model // 16),
        d_ff=4 * args.d_model,
    )
    gen = torch.Generator().manual_seed(args.seed)
    params = init_params(config, gen, device=args.device)
    x, y = get_batch(data, args.batch_size, config.context_length, args.device, gen)
    print(f"{len(text):,} chars of {source} -> {len(data):,} tokens; batch {tuple(x.shape)}")

    # per-example gradients: one vmapped call
    loss_fn = make_loss_fn(config)  # loss(params, inputs (..., seq), targets (..., seq)) -> mean nats/token

    def example_loss(params, x, y):  # one sequence (seq_len,) -> a batch of one
        return loss_fn(params, x[None], y[None])

    per_example_grads = vmap(grad(example_loss), in_dims=(None, 0, 0))  # every leaf: (batch, *shape)
    grads, t_vmap = timed(per_example_grads, params, x, y)
    norms = vmap(global_norm)(grads)  # (batch,)

    # the same with a Python loop, one example at a time
    value_and_grad = grad_and_value(loss_fn)

    def loop_grads(params, x, y):
        return [value_and_grad(params, x[i : i + 1], y[i : i + 1])[0] for i in range(len(x))]

    loop, t_loop = timed(loop_grads, params, x, y)
    loop_norms = torch.stack([global_norm(g) for g in loop])

    print(f"{'example':>7}  {'vmap(grad) norm':>15}  {'loop norm':>10}")
    for i, (a, b) in enumerate(zip(norms.tolist(), loop_norms.tolist())):
        print(f"{i:>7}  {a:>15.6f}  {b:>10.6f}")
    leaves = zip(tree_leaves(grads), *(tree_leaves(g) for g in loop))
    max_diff = max(float((v - torch.stack(per_ex)).abs().max()) for v, *per_ex in leaves)
    print(f"max |vmap − loop| over every gradient entry: {max_diff:.2e}  ({t_vmap:.2f} s vs {t_loop:.2f} s)")
    torch.testing.assert_close(norms, loop_norms, rtol=1e-4, atol=1e-6)
    assert max_diff <= 1e-5, max_diff

    # and their mean is the gradient of the batch's mean loss (every sequence has seq_len tokens)
    batch_grads, _ = value_and_grad(params, x, y)
    mean_diff = float(global_norm(tree_map(lambda g, b: g.mean(0) - b, grads, batch_grads)))
    print(f"‖mean of per-example grads − batch grad‖ = {mean_diff:.2e}")
    assert mean_diff <= 1e-5 * float(global_norm(batch_grads)) + 1e-7, mean_diff
    return 0


if __name__ == "__main__":
    sys.exit(main())
