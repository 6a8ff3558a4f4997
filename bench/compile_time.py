"""Compile time against depth: whole-step ``compile=True`` vs ``compile="blocks"`` (one compiled block reused per layer).

Each (mode, depth) runs in a fresh Python process with inductor's caches off
(``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1``), so the first call is a cold compile, as a user's first
``flm train --compile`` is. Rows: the first call (compile + one step), then the median step time
after it; the eager step of the same model in the same child is the peer (``speed`` = eager time /
row time, > 1 means the compiled step is faster). Depth ratio = first call at the deepest depth /
at the shallowest (target ≤ 1.5 for ``blocks``: compile time independent of depth).

The optimiser is the train loop's: ``clip_by_global_norm(1.0)`` + ``adamw(1e-3, weight_decay=0.01)``,
in place with donated params; with ``blocks`` AdamW's compiled per-leaf kernel (``kernel="compiled"``),
as ``make_optimizer`` pairs them.

    python bench/compile_time.py [--depths 2 12] [--d-model 64] [--shape 4x32] [--modes whole blocks] [--quick]

``--quick`` (the smoke test) uses depths 1 and 2 and the ``aot_eager`` backend (no code generation).
    python bench/compile_time.py --d-model 512 --shape 4x128 --depths 4   # the handout model's width
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from flm import optim
from flm.model import TransformerConfig, init_params

MODES = {"whole": True, "blocks": "blocks"}


def _config(d_model: int, num_layers: int, seq: int, vocab: int) -> TransformerConfig:
    heads = max(d_model // 32, 1)
    return TransformerConfig(
        vocab_size=vocab,
        context_length=max(seq, 32),
        d_model=d_model,
        num_layers=num_layers,
        num_heads=heads,
        d_ff=max(8, int(d_model * 8 / 3) // 8 * 8),
    )


def child(
    mode: str, depth: int, d_model: int, batch: int, seq: int, vocab: int, repeats: int, backend: str = "inductor"
) -> dict:
    """One cold measurement in this process: the first call and ``repeats`` steps of ``mode``, and
    the eager step of the same model (alternating with the compiled one after the first call)."""
    from flm.train import make_train_step

    cfg = _config(d_model, depth, seq, vocab)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, vocab, (batch, seq), generator=g), torch.randint(0, vocab, (batch, seq), generator=g)

    def setup(compile_mode):
        # What make_optimizer builds: blocks pairs the compiled block with the compiled per-leaf AdamW.
        kernel = "compiled" if compile_mode == "blocks" else "foreach"
        tx = optim.chain(
            optim.clip_by_global_norm(1.0, inplace=True),
            optim.adamw(1e-3, weight_decay=0.01, inplace=True, kernel=kernel),
        )
        params = init_params(cfg, torch.Generator().manual_seed(0))
        kw = {"compile_kwargs": {"backend": backend}} if compile_mode else {}
        return [make_train_step(cfg, tx, donate=True, compile=compile_mode, **kw), params, tx.init(params)]

    comp, eager = setup(MODES[mode]), setup(False)

    def run(s):
        s[1], s[2], m = s[0](s[1], s[2], x, y)
        return float(m["loss"])  # a sync, so the time is the step's

    t0 = time.perf_counter()
    run(comp)
    first = time.perf_counter() - t0
    run(comp), run(eager), run(eager)  # warm-up: the second call may still specialise
    tc, te = [], []
    for _ in range(repeats):
        for s, out in ((comp, tc), (eager, te)):
            t0 = time.perf_counter()
            loss = run(s)
            out.append(time.perf_counter() - t0)
    return {
        "first_s": first,
        "step_ms": statistics.median(tc) * 1e3,
        "eager_ms": statistics.median(te) * 1e3,
        "loss": loss,
    }


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table, return (and with ``--json`` write) the results."""
    ap = common.make_parser(__doc__.splitlines()[0], dtype=False, device=False, repeats=5)
    ap.add_argument("--depths", type=int, nargs="+", default=[2, 12], help="numbers of layers (default 2 12)")
    ap.add_argument("--d-model", type=int, default=64, help="width (default 64: compile time, not step time)")
    ap.add_argument("--shape", default="4x32", help="batch x seq (default 4x32)")
    ap.add_argument("--vocab", type=int, default=256, help="vocabulary size (default 256)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument(
        "--backend", default="inductor", help="torch.compile backend (default inductor; --quick: aot_eager)"
    )
    ap.add_argument("--child", nargs=8, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        mode, *nums, backend = args.child
        print(json.dumps(child(mode, *map(int, nums), backend=backend)))
        return {}
    batch, seq = (int(v) for v in args.shape.lower().split("x"))
    depths = [1, 2] if args.quick else args.depths
    repeats = 1 if args.quick else args.repeats
    backend = "aot_eager" if args.quick and args.backend == "inductor" else args.backend
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    rows = []
    for mode in args.modes:
        for depth in depths:
            cmd = [sys.executable, __file__, "--child", mode, str(depth), str(args.d_model), str(batch), str(seq)]
            cmd += [str(args.vocab), str(repeats), backend]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"compile_time: {mode} at {depth} layers failed:\n{out.stderr[-2000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            row = {
                "mode": f"compile={MODES[mode]!r}",
                "layers": depth,
                "shape": f"{batch}×{seq}",
                "first call (s)": r["first_s"],
                "step (ms)": r["step_ms"],
                "eager step (ms)": r["eager_ms"],
                "speed vs eager": r["eager_ms"] / r["step_ms"],
            }
            rows.append(row)
            print(common.markdown_table([row]).splitlines()[-1], flush=True)
    common.print_table(rows, [(k, k) for k in rows[0]])
    targets = {}
    for mode in args.modes:
        mine = [r for r in rows if r["mode"] == f"compile={MODES[mode]!r}"]
        if len(mine) > 1:
            ratio = mine[-1]["first call (s)"] / mine[0]["first call (s)"]
            name = f"{mode}: first call at {mine[-1]['layers']} layers / at {mine[0]['layers']} layers ≤ 1.5"
            targets[name] = common.target(name, ratio)
    notes = [
        f"d_model {args.d_model}, vocab {args.vocab}, backend {backend}, cold inductor caches, a fresh process per row; "
        "eager step measured in the same child, alternating with the compiled step"
    ]
    result = common.make_result("compile_time", args, rows, notes, targets=targets)
    return common.finish(result, args)


if __name__ == "__main__":
    main()
