"""K models in one vmapped train step vs K sequential train steps (tokens/s).

K independent models (the same shape, different learning rates / weight decays, as in a
learning-rate sweep) each take one full training step — forward, backward, global-norm clipping and
AdamW on a cosine schedule — on their own ``batch × seq_len`` batch. Rows per K:

* ``sequential``: K calls of ``flm.train.make_train_step`` (one per model, float hyperparameters);
* ``vmapped``: one call of ``flm.train.make_vmapped_train_step`` over the stacked params/states;
* with ``--compile``: the same two under ``torch.compile`` (timed after compiling; the compile
  time — the first call — is its own row).

The eager rows of one K are timed alternately (``common.measure_interleaved``) so load from other
processes hits both alike. ``tokens/s`` counts ``K · batch · seq_len`` tokens per round;
``speedup`` = sequential time / row time.

    python bench/vmap.py [--device cpu] [--json out.json] [--quick] [--ks 2 4 8] [--compile]
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # puts the repository root on sys.path

from flm import optim
from flm.model import TransformerConfig, count_params, init_params
from flm.train import decay_mask, init_vmapped, make_train_step, make_vmapped_train_step

# A sweep-sized model (the "tiny"-to-"cpu-small" range a CPU sweep would use).
SMALL = TransformerConfig(vocab_size=1024, context_length=64, d_model=128, num_layers=2, num_heads=4, d_ff=352)
QUICK = TransformerConfig(vocab_size=128, context_length=16, d_model=32, num_layers=1, num_heads=2, d_ff=64)


def make_tx(h):
    schedule = optim.cosine_schedule(h["lr"], 0.1 * h["lr"], 10, 1000)
    adam = optim.adamw(schedule, betas=(0.9, 0.95), weight_decay=h["weight_decay"], mask=decay_mask)
    return optim.chain(optim.clip_by_global_norm(1.0), adam)


def _setup(cfg: TransformerConfig, k: int, batch: int, device: torch.device, dtype: torch.dtype):
    lrs = [1e-3 * 2**i for i in range(k)]
    hp = {
        "lr": torch.tensor(lrs, dtype=torch.float64, device=device),
        "weight_decay": torch.full((k,), 0.1, dtype=torch.float64, device=device),
    }
    g = torch.Generator().manual_seed(0)
    w = torch.randint(0, cfg.vocab_size, (k, batch, cfg.context_length + 1), generator=g).to(device)
    x, y = w[..., :-1].contiguous(), w[..., 1:].contiguous()
    seq = []
    for i in range(k):
        tx = make_tx({"lr": lrs[i], "weight_decay": 0.1})
        p = init_params(cfg, torch.Generator().manual_seed(i), device=device, dtype=dtype)
        seq.append((tx, p, tx.init(p)))
    vparams, vstate = init_vmapped(
        cfg, make_tx, {n: v.cpu() for n, v in hp.items()}, list(range(k)), device=device, dtype=dtype
    )
    return seq, (vparams, vstate, hp), x, y


def _runners(cfg, seq, vec, x, y, compile: bool):
    steps = [make_train_step(cfg, tx, compile=compile) for tx, _, _ in seq]
    vstep = make_vmapped_train_step(cfg, make_tx, compile=compile)
    state = {"seq": [(p, s) for _, p, s in seq], "vec": vec[:2]}

    def sequential():
        out = []
        for i, (step, (p, s)) in enumerate(zip(steps, state["seq"])):
            p, s, _ = step(p, s, x[i], y[i])
            out.append((p, s))
        state["seq"] = out

    def vmapped():
        p, s, _ = vstep(*state["vec"], vec[2], x, y)
        state["vec"] = (p, s)

    return sequential, vmapped


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, print the table, return (and with ``--json`` write) the results."""
    ap = common.make_parser(__doc__.splitlines()[0], repeats=7)
    ap.add_argument("--ks", type=int, nargs="+", default=None, help="numbers of models (default 2 4 8)")
    ap.add_argument("--batch-size", type=int, default=None, help="sequences per model per step (default 8)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd steps (slow to compile on CPU)")
    args = ap.parse_args(argv)
    device = common.check_device(args.device)
    dtype = common.resolve_dtype(args.dtype)
    cfg = QUICK if args.quick else SMALL
    ks = args.ks or ([2] if args.quick else [2, 4, 8])
    batch = args.batch_size or (2 if args.quick else 8)
    repeats = 1 if args.quick else args.repeats
    rows: list[dict] = []
    notes = [
        (
            f"model: {count_params(cfg):,} params (d_model {cfg.d_model}, {cfg.num_layers} layers, "
            f"ctx {cfg.context_length}), batch {batch} per model, {dtype}, torch threads {torch.get_num_threads()}"
        ),
    ]
    for k in ks:
        tokens = k * batch * cfg.context_length
        seq, vec, x, y = _setup(cfg, k, batch, device, dtype)
        variants = [(False, "")] + ([(True, " compiled")] if args.compile else [])
        for compile, suffix in variants:
            sequential, vmapped = _runners(cfg, seq, vec, x, y, compile)
            if compile:  # the first calls compile: report them as their own rows
                for name, fn in (("sequential", sequential), ("vmapped", vmapped)):
                    first = common.measure_first_call(fn, device)
                    rows.append(
                        {
                            "name": f"{name} compile (first call)",
                            "K": k,
                            "median_s": first["median"],
                            "load_avg_1m": first["load_avg_1m"],
                        }
                    )
            stats = common.measure_interleaved(
                {"sequential": sequential, "vmapped": vmapped}, device=device, repeats=repeats, warmup=args.warmup
            )
            base = stats["sequential"]["median"]
            for name, st in stats.items():
                rows.append(
                    {
                        "name": name + suffix,
                        "K": k,
                        "median_s": st["median"],
                        "iqr_s": st["iqr"],
                        "min_s": st["min"],
                        "max_s": st["max"],
                        "tokens_per_s": tokens / st["median"],
                        "speedup": base / st["median"],
                        "load_avg_1m": st["load_avg_1m"],
                    }
                )
        del seq, vec
    common.print_table(
        rows,
        [
            ("name", "step"),
            ("K", "K"),
            ("median_s", "median s"),
            ("iqr_s", "IQR s"),
            ("min_s", "min s"),
            ("max_s", "max s"),
            ("tokens_per_s", "tok/s"),
            ("speedup", "speedup"),
            ("load_avg_1m", "load 1m"),
        ],
    )
    return common.finish(common.make_result("vmap", args, rows, notes), args)


if __name__ == "__main__":
    main()
