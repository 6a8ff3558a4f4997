"""AdamW update speed: ``flm.optim.adamw`` (+ ``apply_updates``) vs ``torch.optim.AdamW`` on the handout model's parameters.

The parameter tree of the handout's TinyStories model (vocab 10,000, context 256, d_model 512, 4 layers,
16 heads, d_ff 1,344: 22.7M float32 parameters in 39 tensors) and one fixed random gradient tree; one
call = one AdamW step (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01) that leaves new
parameters. Rows, timed alternately (one step of each in turn):

* ``flm pure``: ``updates, state = tx.update(grads, state, params); params = apply_updates(params,
  updates)`` — the default: new m, v, updates and params every step, the caller's tensors untouched;
* ``flm inplace``: ``adamw(..., inplace=True)`` + ``apply_updates(..., inplace=True)`` (donation);
* ``flm composed``: the same inplace step through ``chain(scale_by_adam(inplace=True),
  add_decayed_weights, scale_by_learning_rate)`` — the transformations ``adamw`` is defined as,
  each a foreach pass of its own, without ``adamw``'s fused kernel (shows what the fusion buys);
* ``flm compiled``: ``torch.compile`` of the pure update + apply (timed after compilation; the
  compilation is its own row);
* peers ``torch foreach`` (``torch.optim.AdamW(foreach=True)``), ``torch fused`` (``fused=True``, on
  CPU too in recent torch; skipped with a line if it fails) and ``torch for-loop`` (``foreach=False``).

``ratio`` = row time / ``torch foreach``'s. All rows run with ``torch.set_num_threads(--threads)``
(default 1), so the comparison is single-thread unless asked otherwise.

Memory: AdamW's state (m + v) is 2× the parameters' bytes for both libraries; the pure form also
allocates new m, v, updates and params (4× the parameter bytes) every step, which glibc returns to
the OS on free, so each step page-faults fresh memory. Unless ``--no-malloc-compare``, the whole
table is measured a second time in a child process with ``MALLOC_MMAP_THRESHOLD_=1000000000
MALLOC_TRIM_THRESHOLD_=10000000000`` (glibc keeps freed memory for reuse); those rows end in
``[malloc env]``.

    python bench/optimizer.py [--device cpu] [--dtype float32] [--json out.json] [--quick] [--no-compile] [--threads 1]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from flm import optim
from flm.model import TransformerConfig, init_params
from flm.tree import tree_leaves, tree_map

HANDOUT = TransformerConfig(vocab_size=10_000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344)
QUICK = TransformerConfig(vocab_size=256, context_length=32, d_model=64, num_layers=2, num_heads=4, d_ff=96)
LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.01
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1000000000", "MALLOC_TRIM_THRESHOLD_": "10000000000"}


def flm_step_fn(params, grads, *, inplace: bool = False, compile: bool = False, composed: bool = False):
    """``step()``: one flm AdamW update + apply, carrying params and state between calls.

    ``composed``: the unfused chain ``adamw`` is defined as, instead of ``adamw`` itself.
    """
    if composed:
        tx = optim.chain(
            optim.scale_by_adam(*BETAS, EPS, inplace=inplace),
            optim.add_decayed_weights(WD),
            optim.scale_by_learning_rate(LR),
        )
    else:
        tx = optim.adamw(LR, BETAS, EPS, WD, inplace=inplace)
    state = {"p": params, "s": tx.init(params)}

    def update(g, s, p):
        upd, s = tx.update(g, s, p)
        return optim.apply_updates(p, upd, inplace=inplace), s

    fn = torch.compile(update, fullgraph=True) if compile else update

    def step() -> None:
        state["p"], state["s"] = fn(grads, state["s"], state["p"])

    return step


def torch_step_fn(params, grads, **kw):
    """``step()``: ``torch.optim.AdamW(**kw).step()`` with the gradients attached once."""
    ps = [torch.nn.Parameter(p.detach().clone()) for p in tree_leaves(params)]
    for p, g in zip(ps, tree_leaves(grads)):
        p.grad = g.clone()
    opt = torch.optim.AdamW(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **kw)
    return opt.step


def _malloc_child(args) -> list[dict]:
    """Run this bench again in a child process with glibc's malloc env set; return its rows."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        cmd = [
            sys.executable,
            __file__,
            "--no-malloc-compare",
            "--no-compile",
            "--json",
            str(out),
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--repeats",
            str(args.repeats),
            "--warmup",
            str(args.warmup),
            "--threads",
            str(args.threads),
        ]
        print("re-running in a child with " + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()), flush=True)
        subprocess.run(cmd, env={**os.environ, **MALLOC_ENV}, check=True, stdout=subprocess.DEVNULL)
        rows = json.loads(out.read_text())["rows"]
    for r in rows:
        r["row"] += " [malloc env]"
    return rows


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table, return (and with ``--json`` write) the results."""
    ap = common.make_parser(__doc__.splitlines()[0], repeats=20)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    ap.add_argument("--compile", action="store_true", help="run the compile row even with --quick")
    ap.add_argument("--no-malloc-compare", action="store_true", help="skip the child run with glibc's malloc env")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: single-thread comparison)")
    args = ap.parse_args(argv)
    if args.threads < 1:
        raise SystemExit(f"--threads must be ≥ 1, got {args.threads}")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)  # run_all runs the next bench in this process


def _run(args) -> dict:
    """The bench proper, under ``--threads`` torch threads."""
    device, dtype = common.check_device(args.device), common.resolve_dtype(args.dtype)
    cfg = QUICK if args.quick else HANDOUT
    repeats = 1 if args.quick else args.repeats
    notes: list[str] = []

    params = init_params(cfg, torch.Generator().manual_seed(0), device=device, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    grads = tree_map(lambda p: (torch.randn(p.shape, generator=g) * 1e-2).to(device=device, dtype=dtype), params)
    leaves = tree_leaves(params)
    n_params = sum(p.numel() for p in leaves)
    param_bytes = sum(p.numel() * p.element_size() for p in leaves)
    adam_state = optim.adamw(LR).init(params)[0]  # (ScaleByAdamState, EmptyState, ScaleByLearningRateState)
    state_bytes = sum(t.numel() * t.element_size() for t in tree_leaves(adam_state.m) + tree_leaves(adam_state.v))
    print(
        f"{n_params / 1e6:.1f}M params in {len(leaves)} tensors ({param_bytes / 2**20:.1f} MiB); "
        f"AdamW m+v {state_bytes / 2**20:.1f} MiB = {state_bytes / param_bytes:.1f}× params",
        flush=True,
    )

    def copy(tree):
        return tree_map(lambda t: t.clone(), tree)

    fns = {
        "flm pure": flm_step_fn(copy(params), grads),
        "flm inplace": flm_step_fn(copy(params), grads, inplace=True),
        "flm composed": flm_step_fn(copy(params), grads, inplace=True, composed=True),
        "torch foreach": torch_step_fn(params, grads, foreach=True),
        "torch for-loop": torch_step_fn(params, grads, foreach=False),
    }
    try:
        fused = torch_step_fn(params, grads, fused=True)
        fused()
        fns["torch fused"] = fused
    except (RuntimeError, TypeError, ValueError) as e:
        notes.append(f"torch.optim.AdamW(fused=True) unavailable on {device}: {str(e).splitlines()[0]}")
    stats = common.measure_interleaved(fns, device=device, repeats=repeats, warmup=args.warmup)

    if not args.no_compile and (args.compile or not args.quick):
        fn = flm_step_fn(copy(params), grads, compile=True)
        print("compiling flm update+apply ...", flush=True)
        first = common.measure_first_call(fn, device)
        stats["flm compiled"] = common.measure(fn, device=device, repeats=repeats, warmup=args.warmup)
        stats["flm compiled: compilation (first call)"] = first
    elif not args.no_compile:
        notes.append("--quick: compile row skipped (pass --compile to include it)")

    peer = stats["torch foreach"]["median"]
    rows = []
    for name, s in stats.items():
        timed = not s.get("compile_row")
        rows.append(
            {
                "row": name,
                "params": n_params,
                "median_s": s["median"],
                "min_s": s["min"],
                "max_s": s["max"],
                "iqr_s": s["iqr"],
                "n": s["n"],
                "GB_per_s_params": param_bytes / s["median"] / 1e9 if timed else None,
                "peer": "torch foreach" if timed and name != "torch foreach" else None,
                "peer_s": peer if timed and name != "torch foreach" else None,
                "ratio": s["median"] / peer if timed and name != "torch foreach" else None,
                "load_1m": s["load_avg_1m"],
            }
        )
    if not args.quick and not args.no_malloc_compare and not any(k in os.environ for k in MALLOC_ENV):
        rows += _malloc_child(args)
    common.print_table(
        rows,
        [
            ("row", "row"),
            ("median_s", "median s"),
            ("min_s", "min"),
            ("max_s", "max"),
            ("iqr_s", "IQR"),
            ("peer_s", "foreach s"),
            ("ratio", "ratio"),
            ("load_1m", "load"),
        ],
    )
    targets = {
        name: common.target(name, stats[row]["median"] / peer)
        for name, row in (
            ("flm inplace / torch foreach ≤ 1.15", "flm inplace"),
            ("flm pure / torch foreach (info)", "flm pure"),
        )
    }
    memory = {
        "param_bytes": param_bytes,
        "adamw_state_bytes": state_bytes,
        "state_over_params": state_bytes / param_bytes,
        "pure_step_new_bytes": 4 * param_bytes,
    }
    notes.append(
        f"memory: params {param_bytes / 2**20:.1f} MiB, m+v {state_bytes / 2**20:.1f} MiB "
        f"({state_bytes / param_bytes:.1f}× params, same for torch.optim.AdamW); "
        f"the pure step allocates ~{4 * param_bytes / 2**20:.0f} MiB of new tensors per step"
    )
    result = common.make_result("optimizer", args, rows, notes, memory=memory, targets=targets)
    return common.finish(result, args)


if __name__ == "__main__":
    main()
