"""Data parallelism on CPU: 2 gloo processes (``torch.multiprocessing.spawn``) on 127.0.0.1.

(a) ``all_reduce_mean`` over a pytree is the mean (several buckets, mixed dtypes, input untouched);
(b) one data-parallel step over two half-batches equals one single-process step over the whole
    batch (float64), and both ranks hold identical parameters;
(c) a 2-process ``train_loop`` run that crashed after step 10 and resumed ends at the same
    parameters as an uninterrupted one, and only rank 0 wrote files;
(d) the global batch does not depend on the world size: 2 ranks read exactly the batches one
    process draws, the losses and gradient norms agree within float rounding, and a checkpoint
    saved at world 2 resumes at world 1 and the reverse, continuing the uninterrupted run;
    a checkpoint from before (per-rank sampler states) resumes from rank 0's and says so.

Each spawn group does all of its work in one go (process start-up dominates the run time), under
a timeout.
"""

import base64
import json
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from flm import optim
from flm.model import TransformerConfig, init_params
from flm.train import TrainConfig, decay_mask, make_train_step
from flm.tree import tree_leaves

WORLD = 2
CFG = TransformerConfig(vocab_size=50, context_length=8, d_model=16, num_layers=2, num_heads=2, d_ff=32)

if not dist.is_available() or not dist.is_gloo_available():  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)


SPAWN_TIMEOUT = 240


def _spawn(fn, *args) -> None:
    """Run ``fn(rank, port, *args)`` on ``WORLD`` processes; fail (killing them) after ``SPAWN_TIMEOUT`` s."""
    ctx = mp.spawn(fn, args=(_free_port(), *args), nprocs=WORLD, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT
    try:
        while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"{fn.__name__}: the {WORLD} processes did not finish within {SPAWN_TIMEOUT} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(10)


def _tree(rank: int) -> dict:
    """A rank-dependent tree with float32/float64/float16 leaves of assorted sizes."""
    g = torch.Generator().manual_seed(0)
    base = {
        "a": torch.randn(3, 5, generator=g),
        "b": [torch.randn(7, generator=g, dtype=torch.float64), torch.randn(2, 2, generator=g)],
        "c": {"d": torch.randn(11, generator=g).half(), "e": torch.randn((), generator=g, dtype=torch.float64)},
        "f": torch.randn(40, generator=g),
    }
    return {k: _scale(v, rank) for k, v in base.items()}


def _scale(node, rank):
    if isinstance(node, torch.Tensor):
        return node * (rank + 1) + rank
    if isinstance(node, list):
        return [_scale(x, rank) for x in node]
    return {k: _scale(v, rank) for k, v in node.items()}


def _tx():
    adam = optim.adamw(optim.cosine_schedule(1e-2, 1e-3, 0, 10), betas=(0.9, 0.95), weight_decay=0.1, mask=decay_mask)
    return optim.chain(optim.clip_by_global_norm(0.5), adam)


def _batch(batch=8):
    w = torch.randint(0, CFG.vocab_size, (batch, CFG.context_length + 1), generator=torch.Generator().manual_seed(9))
    return w[:, :-1], w[:, 1:]


def _collectives_worker(rank: int, port: int, out: str) -> None:
    from flm.distributed import all_reduce_mean

    _join(rank, port)
    try:
        # (a) mean over ranks, with tiny buckets (many collectives) and the default (one per dtype).
        tree = _tree(rank)
        before = [t.clone() for t in tree_leaves(tree)]
        small = all_reduce_mean(tree, bucket_bytes=48)
        default = all_reduce_mean(tree)
        assert all(torch.equal(a, b) for a, b in zip(tree_leaves(tree), before)), "input modified"
        # (b) one data-parallel step on this rank's half of the batch.
        x, y = _batch()
        half = x.shape[0] // WORLD
        tx = _tx()
        params = init_params(CFG, torch.Generator().manual_seed(0), dtype=torch.float64)
        step = make_train_step(CFG, tx, grad_reduce=all_reduce_mean)
        state = tx.init(params)
        for _ in range(2):
            params, state, metrics = step(
                params, state, x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
            )
        torch.save(
            {"small": small, "default": default, "params": params, "grad_norm": metrics["grad_norm"]},
            f"{out}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def test_all_reduce_mean_and_data_parallel_step(tmp_path):
    _spawn(_collectives_worker, str(tmp_path))
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    # (a) every rank holds the mean, leaf dtypes and structure preserved.
    trees = [_tree(r) for r in range(WORLD)]
    for res in results:
        for key in ("small", "default"):
            got, want = tree_leaves(res[key]), [sum(ls) / WORLD for ls in zip(*map(tree_leaves, trees))]
            assert len(got) == len(want)
            for g, w in zip(got, want):
                assert g.dtype == w.dtype and g.shape == w.shape
                tol = 1e-3 if g.dtype == torch.float16 else 1e-6
                torch.testing.assert_close(g, w, rtol=tol, atol=tol)

    # (b) identical replicas equal to the single-process full-batch step.
    tx = _tx()
    params = init_params(CFG, torch.Generator().manual_seed(0), dtype=torch.float64)
    state = tx.init(params)
    step = make_train_step(CFG, tx)
    x, y = _batch()
    for _ in range(2):
        params, state, m = step(params, state, x, y)
    r0, r1 = results
    assert all(torch.equal(a, b) for a, b in zip(tree_leaves(r0["params"]), tree_leaves(r1["params"])))
    torch.testing.assert_close(r0["grad_norm"], m["grad_norm"], rtol=1e-12, atol=0)
    for a, b in zip(tree_leaves(r0["params"]), tree_leaves(params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


# ------------------------------------------------------------------------------------------------
# (c) train_loop under 2 processes: crash after step 10, resume, compare with an uninterrupted run
# ------------------------------------------------------------------------------------------------

LOOP = TrainConfig(
    batch_size=8,
    max_iters=20,
    lr=3e-3,
    min_lr=3e-4,
    warmup_iters=3,
    eval_interval=5,
    eval_batches=2,
    checkpoint_interval=5,
    keep_checkpoints=10,
    log_interval=5,
    seed=1,
)


def _loop_worker(rank: int, port: int, root: str) -> None:
    import flm.train
    import flm.train.checkpointer
    import flm.train.loop
    import flm.train.metrics
    from flm.distributed import DistInfo

    _join(rank, port)
    writes: list[str] = []
    if rank != 0:  # record any attempt by rank 1 to write a file
        real_save, real_sink, real_plot = (
            flm.train.checkpointer.save_checkpoint,
            flm.train.metrics.JsonlSink.__init__,
            flm.train.loop.plot_metrics,
        )
        flm.train.checkpointer.save_checkpoint = lambda path, *a, **k: (
            writes.append(str(path)),
            real_save(path, *a, **k),
        )[1]
        flm.train.metrics.JsonlSink.__init__ = lambda self, path: (writes.append(str(path)), real_sink(self, path))[1]
        flm.train.loop.plot_metrics = lambda m, png: (writes.append(str(png)), real_plot(m, png))[1]
    try:
        rng = np.random.default_rng(0)
        train = rng.integers(0, CFG.vocab_size, 4000).astype(np.uint16)
        valid = rng.integers(0, CFG.vocab_size, 600).astype(np.uint16)
        info = DistInfo(rank=rank, world_size=WORLD, local_rank=rank, device="cpu")
        full, crashed = Path(root, "full"), Path(root, "crashed")
        s_full = flm.train.train_loop(CFG, LOOP, train, valid, full, log=lambda _m: None, dist_info=info)
        dist.barrier()
        if rank == 0:  # "crash" after step 10: the later checkpoints and metric lines never happened
            shutil.copytree(full, crashed)
            for name in ("ckpt_0000015.safetensors", "ckpt_0000020.safetensors"):
                (crashed / name).unlink()
        dist.barrier()
        s_resumed = flm.train.train_loop(
            CFG, LOOP, train, valid, crashed, resume=True, log=lambda _m: None, dist_info=info
        )
        torch.save({"writes": writes, "full": s_full, "resumed": s_resumed}, f"{root}/loop_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_train_loop_resume_matches_uninterrupted(tmp_path):
    from flm.checkpoint import load_checkpoint
    from flm.train import list_checkpoints, read_metrics

    _spawn(_loop_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"loop_rank{r}.pt", weights_only=False) for r in range(WORLD))
    assert r1["writes"] == [], f"rank 1 wrote files: {r1['writes']}"
    assert r0["full"]["step"] == r0["resumed"]["step"] == LOOP.max_iters
    assert r0["full"]["status"] == r0["resumed"]["status"] == "done"

    full, crashed = tmp_path / "full", tmp_path / "crashed"
    assert [p.name for p in list_checkpoints(full)] == [f"ckpt_{s:07d}.safetensors" for s in (5, 10, 15, 20)]
    assert [p.name for p in list_checkpoints(crashed)][-1] == "ckpt_0000020.safetensors"
    a, b = load_checkpoint(full / "ckpt_0000020.safetensors"), load_checkpoint(crashed / "ckpt_0000020.safetensors")
    for x, y in zip(tree_leaves(a.params), tree_leaves(b.params)):
        assert torch.equal(x, y), "resumed params differ from the uninterrupted run"
    for x, y in zip(tree_leaves(a.opt_state), tree_leaves(b.opt_state)):
        assert torch.equal(x, y)
    # The metrics agree step by step (wall time and throughput aside).
    keys = ("step", "tokens", "train_loss", "val_loss", "lr", "grad_norm")
    ma, mb = read_metrics(full / "metrics.jsonl"), read_metrics(crashed / "metrics.jsonl")
    assert [m["step"] for m in ma] == [5, 10, 15, 20]
    assert [{k: m[k] for k in keys} for m in ma] == [{k: m[k] for k in keys} for m in mb]
    assert r0["full"]["final_val_loss"] == r0["resumed"]["final_val_loss"]
    # Only rank 0's files exist: no per-rank artefacts.
    assert sorted(p.name for p in full.iterdir()) == sorted(
        ["flm-manifest.json", "metrics.jsonl", "loss.png", "best.safetensors"]
        + [p.name for p in list_checkpoints(full)]
    )
    assert not any(p.name.startswith("rank") for p in full.iterdir())
    assert os.path.getsize(full / "loss.png") > 0


def test_torchrun_flm_train_prints_the_plan_once_and_leaves_no_lock(texts, tmp_path):
    """``torchrun --nproc_per_node 2 -m flm train …`` (the README's command) on CPU/gloo: every rank
    printed the plan (issue 21 item 11); only rank 0 does now, as it alone logs the run. The run
    finishes with rank 0's files only, and no ``.lock`` left behind (item 13)."""
    import subprocess
    import sys

    from helpers import train_argv

    out = tmp_path / "run"
    argv = train_argv(texts, out, "--max-iters", "4", "--eval-interval", "0", "--max-new-tokens", "0")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", "-m", "flm"]
    done = subprocess.run(cmd + argv, capture_output=True, text=True, timeout=300, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert output.count("plan: preset tiny") == 1, output
    assert json.loads((out / "results.json").read_text())["steps"] == 4
    assert not (out / ".lock").exists()
    assert not any(p.name.startswith("rank") for p in out.iterdir())


# ------------------------------------------------------------------------------------------------
# (d) the global batch depends on the step only: world 2 against world 1, resumes across them
# ------------------------------------------------------------------------------------------------

GLOBAL = TrainConfig(
    batch_size=8,
    max_iters=8,
    lr=3e-3,
    min_lr=3e-4,
    warmup_iters=2,
    eval_interval=0,
    checkpoint_interval=4,
    keep_checkpoints=10,
    log_interval=1,
    seed=3,
)
CUT = 4  # the "crash": the checkpoint at this step survives, the later ones never happened


def _tokens() -> np.ndarray:
    return np.random.default_rng(1).integers(0, CFG.vocab_size, 3000).astype(np.uint16)


def _recorded_run(out: Path, *, resume: bool = False, info=None, cfg: TrainConfig = GLOBAL) -> dict:
    """``train_loop`` on :func:`_tokens`, recording the batches this process read and its per-step
    losses (the logged ``train_loss`` is rank 0's share only)."""
    import flm.train
    import flm.train.loop

    batches: list[torch.Tensor] = []
    losses: list[float] = []
    real_get, real_add = flm.train.loop.get_batch, flm.train.loop.StepMeter.add

    def get_batch(*a, **k):
        batch = real_get(*a, **k)
        batches.append(batch[0].clone())
        return batch

    def add(self, m):
        losses.append(float(m["loss"]))
        return real_add(self, m)

    lines: list[str] = []
    flm.train.loop.get_batch, flm.train.loop.StepMeter.add = get_batch, add
    try:
        summary = flm.train.train_loop(CFG, cfg, _tokens(), None, out, resume=resume, log=lines.append, dist_info=info)
    finally:
        flm.train.loop.get_batch, flm.train.loop.StepMeter.add = real_get, real_add
    return {"summary": summary, "batches": batches, "losses": losses, "log": lines}


def _cut(run: Path, to: Path) -> None:
    """A copy of ``run`` as if it had been killed after step ``CUT``."""
    shutil.copytree(run, to)
    for p in to.glob("ckpt_*.safetensors"):
        if int(p.stem.split("_")[1]) > CUT:
            p.unlink()


def _world2_worker(rank: int, port: int, root: str) -> None:
    from flm.distributed import DistInfo

    _join(rank, port)
    try:
        info = DistInfo(rank=rank, world_size=WORLD, local_rank=rank, device="cpu")
        res = {"full": _recorded_run(Path(root, "w2_full"), info=info)}
        dist.barrier()
        if rank == 0:
            _cut(Path(root, "w2_full"), Path(root, "w2_cut"))
        dist.barrier()
        res["from_w1"] = _recorded_run(Path(root, "w1_cut"), resume=True, info=info)  # saved at world 1
        torch.save(res, f"{root}/world2_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    """World 1 in this process, world 2 in a spawn group; each resumes the other's checkpoint."""
    root = tmp_path_factory.mktemp("worlds")
    w1 = _recorded_run(root / "w1_full")
    _cut(root / "w1_full", root / "w1_cut")
    _spawn(_world2_worker, str(root))
    w2 = [torch.load(root / f"world2_rank{r}.pt", weights_only=False) for r in range(WORLD)]
    from_w2 = _recorded_run(root / "w2_cut", resume=True)  # saved at world 2, resumed at world 1
    return {"root": root, "w1": w1, "w2": w2, "from_w2": from_w2}


def _close(a, b) -> None:
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=1e-5, atol=0)


def _metric(run: Path, key: str) -> list[float]:
    from flm.train import read_metrics

    return [m[key] for m in read_metrics(run / "metrics.jsonl")]


@pytest.mark.distributed
def test_two_ranks_read_the_global_batch_one_process_draws(worlds):
    w1, (r0, r1) = worlds["w1"], worlds["w2"]
    n = GLOBAL.max_iters
    assert len(w1["batches"]) == len(r0["full"]["batches"]) == len(r1["full"]["batches"]) == n
    for step in range(n):
        assert r0["full"]["batches"][step].shape[0] == GLOBAL.batch_size // WORLD
        both = torch.cat([r0["full"]["batches"][step], r1["full"]["batches"][step]])
        assert torch.equal(both, w1["batches"][step]), f"step {step + 1}: the ranks' rows are not the global batch"
    # The same global batch gives the same training, up to the float rounding of the gradient average:
    # the mean of the two half-batch losses is the whole batch's loss, the gradient norm is global.
    _close([(a + b) / 2 for a, b in zip(r0["full"]["losses"], r1["full"]["losses"])], w1["losses"])
    root = worlds["root"]
    _close(_metric(root / "w2_full", "grad_norm"), _metric(root / "w1_full", "grad_norm"))
    _close(_metric(root / "w2_full", "train_loss"), r0["full"]["losses"])  # rank 0's share is logged


def test_a_single_process_draws_what_it_drew_before(worlds):
    """World 1 reads the batches of one ``seed + 1`` sampler drawing ``batch_size`` windows per step,
    as before the global sampler: its losses are bitwise unchanged."""
    from flm.data import get_batch

    g = torch.Generator().manual_seed(GLOBAL.seed + 1)
    want = [get_batch(_tokens(), GLOBAL.batch_size, CFG.context_length, "cpu", g)[0] for _ in range(GLOBAL.max_iters)]
    assert all(torch.equal(a, b) for a, b in zip(worlds["w1"]["batches"], want, strict=True))


@pytest.mark.distributed
def test_a_checkpoint_resumes_at_another_world_size(worlds):
    from flm.checkpoint import load_checkpoint

    root, w1, (r0, r1), from_w2 = worlds["root"], worlds["w1"], worlds["w2"], worlds["from_w2"]
    later = slice(CUT, GLOBAL.max_iters)
    # Saved at world 2, resumed at world 1: the global batches and losses of the uninterrupted run.
    assert any(line.startswith(f"resumed from ckpt_{CUT:07d}") for line in from_w2["log"])
    assert all(torch.equal(a, b) for a, b in zip(from_w2["batches"], w1["batches"][later], strict=True))
    _close(from_w2["losses"], w1["losses"][later])
    _close(_metric(root / "w2_cut", "train_loss")[later], _metric(root / "w1_full", "train_loss")[later])
    # Saved at world 1, resumed at world 2: each rank reads its rows of the same global batches.
    for rank, r in enumerate((r0, r1)):
        k = GLOBAL.batch_size // WORLD
        rows = [b[rank * k : (rank + 1) * k] for b in w1["batches"][later]]
        assert all(torch.equal(a, b) for a, b in zip(r["from_w1"]["batches"], rows, strict=True))
    _close([(a + b) / 2 for a, b in zip(r0["from_w1"]["losses"], r1["from_w1"]["losses"])], w1["losses"][later])
    _close(_metric(root / "w1_cut", "train_loss")[later], r0["full"]["losses"][later])
    # Both end where the uninterrupted runs end, up to float rounding.
    last = f"ckpt_{GLOBAL.max_iters:07d}.safetensors"
    for resumed, ref in (("w2_cut", "w1_full"), ("w1_cut", "w2_full")):
        a, b = load_checkpoint(root / resumed / last), load_checkpoint(root / ref / last)
        for x, y in zip(tree_leaves(a.params), tree_leaves(b.params), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
        assert torch.equal(a.rng_state, b.rng_state)  # one sampler state, whatever the world size


def test_a_checkpoint_with_per_rank_sampler_states_resumes_from_rank_0s(tmp_path):
    """A data-parallel checkpoint saved before the global sampler lists every rank's sampler state
    (``rng_states``): it resumes from rank 0's and the log says the batches differ from the
    original run's."""
    from flm.checkpoint import load_checkpoint, save_checkpoint

    full = tmp_path / "full"
    ref = _recorded_run(full)
    _cut(full, tmp_path / "old")
    path = tmp_path / "old" / f"ckpt_{CUT:07d}.safetensors"
    ck = load_checkpoint(path)

    def encode(g: torch.Generator) -> str:
        return base64.b64encode(g.get_state().numpy().tobytes()).decode()

    rank0 = torch.Generator()
    rank0.set_state(ck.rng_state)
    other = torch.Generator().manual_seed(12345)  # rank 1's, and a single-process field that must not win
    meta = {**ck.metadata, "rng_states": [encode(rank0), encode(other)]}
    save_checkpoint(
        path, params=ck.params, opt_state=ck.opt_state, step=ck.step, config=ck.config, metadata=meta, generator=other
    )

    old = _recorded_run(tmp_path / "old", resume=True)
    said = [line for line in old["log"] if "per-rank sampler states" in line]
    assert len(said) == 1 and "continuing from rank 0's" in said[0] and "differ" in said[0], old["log"]
    assert all(torch.equal(a, b) for a, b in zip(old["batches"], ref["batches"][CUT:], strict=True))
    assert old["losses"] == ref["losses"][CUT:]
    # A checkpoint of today's kind says nothing of the kind.
    _cut(full, tmp_path / "new")
    new = _recorded_run(tmp_path / "new", resume=True)
    assert not any("per-rank" in line for line in new["log"]) and new["losses"] == ref["losses"][CUT:]
