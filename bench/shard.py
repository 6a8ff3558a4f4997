"""Sharded (``--shard``, ZeRO-3/FSDP) vs replicated data parallelism (DDP-style all-reduce) on CPU with gloo.

Each (mode, world size) runs in a fresh group of processes (``torch.multiprocessing`` spawn, one
torch thread each), so every rank's memory starts from the same baseline. Per rank: the baseline
is the process's peak RSS after importing torch and joining the group, before the model is built;
two train steps of the same mode on a tiny model come first (what a mode initialises or pages in
on first use is not model memory); the row's memory is the highest rank's peak RSS above its baseline over building the model and
optimiser state and ``--steps`` train steps (the peak, so it includes the gathered part's whole
weights and gradients, activations and the allocator's slack). Both modes train the same model
from the same seed on the same global batches (each rank its rows), with the train loop's
optimiser (clip 1.0 → AdamW on a cosine schedule, in place); ``loss`` is the global batch's mean
loss at the last step, which the two modes must agree on to float rounding.

Rows: ``replicated`` (every rank holds the whole model, gradients averaged by a bucketed
all-reduce: ``flm.distributed.all_reduce_mean``) and ``sharded`` (``flm.shard``). Targets, per world
size: sharded memory ≤ 1.1 × replicated / world + the largest gathered part's weights and
gradients (the issue's bound), and the step-time ratio sharded / replicated (informational).

    python bench/shard.py [--worlds 2 4] [--steps 50] [--quick] [--json PATH]
"""

from __future__ import annotations

import gc
import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from flm import distributed, optim
from flm.model import TransformerConfig, init_params, param_template
from flm.shard import init_sharded_params, make_sharded_train_step, sharded_global_norm
from flm.train import decay_mask, make_train_step
from flm.tree import tree_leaves

MODEL = dict(vocab_size=8192, context_length=128, d_model=256, num_layers=4, num_heads=8, d_ff=688)
QUICK = dict(vocab_size=256, context_length=16, d_model=32, num_layers=2, num_heads=2, d_ff=64)


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _tx(steps: int, norm_fn=None) -> optim.GradientTransformation:
    schedule = optim.cosine_schedule(1e-3, 1e-4, max(1, steps // 10), steps)
    adam = optim.adamw(schedule, betas=(0.9, 0.95), weight_decay=0.1, mask=decay_mask, inplace=True)
    return optim.chain(optim.clip_by_global_norm(1.0, inplace=True, norm_fn=norm_fn), adam)


def _train(model: dict, mode: str, rank: int, world: int, batch: int, steps: int):
    """Build ``model`` in ``mode`` and train it ``steps`` steps on seeded global batches (this rank's
    rows); yields ``(step seconds, loss, bytes of parameters held)`` after each step."""
    cfg = TransformerConfig(**model)
    if mode == "sharded":
        params = init_sharded_params(cfg, torch.Generator().manual_seed(0), rank, world)
        tx = _tx(steps, sharded_global_norm)
        step = make_sharded_train_step(cfg, tx, world_size=world, donate=True)
    else:
        params = init_params(cfg, torch.Generator().manual_seed(0))
        tx = _tx(steps)
        step = make_train_step(cfg, tx, donate=True, grad_reduce=distributed.all_reduce_mean)
    state = tx.init(params)
    held = sum(t.numel() * t.element_size() for t in tree_leaves(params))
    sampler = torch.Generator().manual_seed(1)
    local = batch // world
    for _ in range(steps):
        w = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length + 1), generator=sampler)
        mine = w[rank * local : (rank + 1) * local]
        t = time.perf_counter()
        params, state, m = step(params, state, mine[:, :-1], mine[:, 1:])
        yield time.perf_counter() - t, m["loss"], held


def _worker(rank: int, port: int, world: int, mode: str, model: dict, batch: int, steps: int, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # What a mode sets up or touches on first use is not model memory: the first
        # autograd-aware collective alone adds ~75 MiB of RSS whatever its size, and the first
        # step pages in ~11 MiB of libtorch code its kernels live in (counted in RSS). So each
        # rank first runs two steps of its own mode on a tiny model, then takes its baseline.
        for _ in _train(QUICK, mode, rank, world, batch, steps=2):
            pass
        gc.collect()
        baseline = _peak_bytes()
        times, loss, held = [], None, 0
        for dt, last_loss, held_bytes in _train(model, mode, rank, world, batch, steps):
            times.append(dt)
            loss, held = last_loss, held_bytes
        total = loss.detach().clone()
        dist.all_reduce(total)
        peak = torch.tensor([float(_peak_bytes() - baseline)])
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        step_s = torch.tensor([statistics.median(times[min(2, steps - 1) :])])
        dist.all_reduce(step_s, op=dist.ReduceOp.MAX)
        if rank == 0:
            out.put(
                {
                    "loss": float(total) / world,
                    "peak_MiB": float(peak) / 2**20,
                    "step_s": float(step_s),
                    "params_MiB": held / 2**20,
                }
            )
        # Every rank is done before the group goes. (A rank once aborted at exit, SIGABRT in 1 of 3
        # to 1 of 15 runs: a default group pinned by a late import kept gloo's threads alive into
        # interpreter shutdown; `import flm` above prevents it, see flm._compat._UNPIN_DEFAULT_GROUP.)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(world: int, mode: str, model: dict, batch: int, steps: int, timeout: float = 600) -> dict:
    """One (mode, world) row in fresh processes; returns rank 0's report."""
    # glibc raises its mmap threshold after a large block is freed, and later large blocks then stay
    # in the heap after being freed: RSS would measure fragmentation, not live memory. A fixed
    # threshold (read at process start, so set before spawning) returns large blocks on free.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, world, mode, model, batch, steps, out)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        res = out.get(timeout=timeout)
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError(f"{mode} at world {world}: exit codes {[p.exitcode for p in procs]}")
    return res


def _largest_part_bytes(model: dict) -> int:
    """The largest part the sharded forward gathers whole (embedding, a block, norm + head), weights + gradients."""
    like = param_template(TransformerConfig(**model))
    parts = [like["token_embeddings"], *like["layers"], {k: like[k] for k in ("ln_final", "lm_head") if k in like}]
    return max(2 * 4 * sum(t.numel() for t in tree_leaves(p)) for p in parts)


def main(argv: list[str] | None = None) -> dict:
    ap = common.make_parser(__doc__.splitlines()[0], dtype=False, device=False, repeats=1)
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4], help="world sizes (default 2 4)")
    ap.add_argument("--steps", type=int, default=50, help="train steps per row (default 50)")
    ap.add_argument("--batch", type=int, default=8, help="global batch (default 8)")
    args = ap.parse_args(argv)
    model = QUICK if args.quick else MODEL
    steps = 3 if args.quick else args.steps
    worlds = [2] if args.quick else args.worlds
    part = _largest_part_bytes(model) / 2**20
    rows, targets = [], {}
    for world in worlds:
        res = {mode: run_group(world, mode, model, args.batch, steps) for mode in ("replicated", "sharded")}
        rep, sh = res["replicated"], res["sharded"]
        for mode, r in res.items():
            rows.append(
                {
                    "world": world,
                    "mode": mode,
                    "peak MiB": r["peak_MiB"],
                    "held params MiB": r["params_MiB"],
                    "step (ms)": 1e3 * r["step_s"],
                    f"loss at step {steps}": r["loss"],
                }
            )
        bound = 1.1 * rep["peak_MiB"] / world + part
        targets[f"world {world}: sharded peak / (1.1 × replicated / {world} + largest part {part:.1f} MiB) ≤ 1.0"] = (
            common.target("≤ 1.0", sh["peak_MiB"] / bound)
        )
        targets[f"world {world}: sharded step time / replicated (info)"] = common.target(
            "(info)", sh["step_s"] / rep["step_s"]
        )
        targets[f"world {world}: |loss sharded − replicated| at step {steps} ≤ 1e-4"] = common.target(
            "≤ 1e-4", abs(sh["loss"] - rep["loss"])
        )
    cols = [
        ("world", "world"),
        ("mode", "mode"),
        ("peak MiB", "peak MiB"),
        ("held params MiB", "params MiB"),
        ("step (ms)", "step ms"),
        (f"loss at step {steps}", "loss"),
    ]
    common.print_table(rows, cols)
    notes = [
        f"model {model}, global batch {args.batch}, {steps} steps, gloo on CPU, one torch thread per rank; "
        "memory = the highest rank's peak RSS above its own baseline (taken after import, joining the group and "
        "two steps of the same mode on a tiny model, so first-use initialisation and paged-in library code are "
        "not counted as model memory)",
        "sharded recomputes each block and the head in the backward (their gathered weights are not kept), "
        "so it runs one more forward per step than the replicated run",
        "children run with MALLOC_MMAP_THRESHOLD_=65536 (glibc's dynamic threshold otherwise keeps freed large "
        "blocks in the heap, and RSS measures fragmentation)",
    ]
    return common.finish(common.make_result("shard", args, rows, notes, targets=targets), args)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
