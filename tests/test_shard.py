"""Sharded parameters (``flm.shard``, ``--shard``): the layout, and the sharded step against the
replicated one.

(a) shard/unshard round-trips any leaf for any world size (a hypothesis property), padding rows
    are zeros; ``init_sharded_params`` draws exactly ``init_params``'s values;
(b) without a process group (world 1) the sharded step equals ``make_train_step``;
(c) 2 and 4 gloo processes (``torch.multiprocessing.spawn``): each rank's batch is its share of
    one global batch; after 3 steps (float64, clipping active, weight decay, gradient
    accumulation at world 2) the consolidated shards, AdamW's moments, the losses and the global
    gradient norms equal one single-process step over the whole batch; the sharded forward's
    logits equal ``transformer_lm``'s; a bf16 mixed-precision step stays close to the replicated
    one.
"""

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import optree
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import train_argv
from hypothesis import given, settings
from hypothesis import strategies as st

import flm.shard
from flm import optim
from flm.cli import main
from flm.model import TransformerConfig, init_params, transformer_lm
from flm.shard import (
    gather_tree,
    init_sharded_params,
    make_sharded_train_step,
    shard_rows,
    shard_tree,
    sharded_global_norm,
    sharded_transformer_lm,
    unshard_rows,
    unshard_tree,
)
from flm.train import decay_mask, make_train_step, read_metrics
from flm.tree import tree_leaves, tree_map

CFG = TransformerConfig(vocab_size=37, context_length=8, d_model=16, num_layers=2, num_heads=2, d_ff=24)
TIED = TransformerConfig(
    vocab_size=37, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=24, tie_embeddings=True
)
BATCH = 8
STEPS = 3


def _tx(norm_fn=None):
    adam = optim.adamw(optim.cosine_schedule(1e-2, 1e-3, 1, 10), betas=(0.9, 0.95), weight_decay=0.1, mask=decay_mask)
    return optim.chain(optim.clip_by_global_norm(0.5, norm_fn=norm_fn), adam)


def _batches(cfg, steps=STEPS, batch=BATCH):
    g = torch.Generator().manual_seed(5)
    out = []
    for _ in range(steps):
        w = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length + 1), generator=g)
        out.append((w[:, :-1], w[:, 1:]))
    return out


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    world=st.integers(1, 6),
)
def test_shard_unshard_round_trip(shape, world):
    full = torch.randn(*shape, dtype=torch.float64)
    shards = [shard_rows(full, r, world) for r in range(world)]
    c = -(-shape[0] // world)
    assert all(s.shape == (c, *shape[1:]) for s in shards)
    assert torch.equal(unshard_rows(shards, shape[0]), full)
    padding = torch.cat(shards)[shape[0] :]
    assert not padding.any()
    full[0] += 1  # shards are copies, not views of the caller's tensor
    assert not torch.equal(unshard_rows(shards, shape[0]), full)


def test_bad_shard_arguments():
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        shard_rows(torch.zeros(3), 2, 2)
    with pytest.raises(ValueError, match="different shapes"):
        unshard_rows([torch.zeros(2), torch.zeros(3)], 4)
    with pytest.raises(ValueError, match="cannot hold 5 rows"):
        unshard_rows([torch.zeros(2), torch.zeros(2)], 5)


@pytest.mark.parametrize("world", [1, 3, 4])
def test_init_sharded_params_draws_init_params_values(world):
    full = init_params(CFG, torch.Generator().manual_seed(3))
    for rank in range(world):
        mine = init_sharded_params(CFG, torch.Generator().manual_seed(3), rank, world)
        for a, b in zip(tree_leaves(mine), tree_leaves(shard_tree(full, rank, world))):
            assert torch.equal(a, b)
    parts = [init_sharded_params(CFG, torch.Generator().manual_seed(3), r, world) for r in range(world)]
    for a, b in zip(tree_leaves(unshard_tree(parts, full)), tree_leaves(full)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("chunk_rows", [None, 5], ids=["one-chunk", "5-row-chunks"])
@pytest.mark.parametrize("cfg", [CFG, TIED], ids=["untied", "tied"])
def test_world_one_equals_the_plain_step(cfg, chunk_rows, monkeypatch):
    if chunk_rows is not None:  # the loss in uneven row chunks (64 rows per batch): the same step
        monkeypatch.setattr(flm.shard, "_LOSS_CHUNK_VALUES", chunk_rows * cfg.vocab_size)
    params = init_params(cfg, torch.Generator().manual_seed(0), dtype=torch.float64)
    ref_step = make_train_step(cfg, _tx())
    sh_step = make_sharded_train_step(cfg, _tx(sharded_global_norm), world_size=1)
    p_ref, s_ref = params, _tx().init(params)
    p_sh, s_sh = tree_map(torch.clone, params), _tx().init(params)
    for x, y in _batches(cfg):
        p_ref, s_ref, m_ref = ref_step(p_ref, s_ref, x, y)
        p_sh, s_sh, m_sh = sh_step(p_sh, s_sh, x, y)
        torch.testing.assert_close(m_sh["loss"], m_ref["loss"], rtol=1e-12, atol=0)
        torch.testing.assert_close(m_sh["grad_norm"], m_ref["grad_norm"], rtol=1e-12, atol=0)
    for a, b in zip(tree_leaves(p_sh), tree_leaves(p_ref)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    logits = sharded_transformer_lm(p_sh, _batches(cfg)[0][0], cfg, world_size=1)
    torch.testing.assert_close(logits, transformer_lm(p_sh, _batches(cfg)[0][0], cfg), rtol=0, atol=0)


def test_gather_tree_refuses_mixed_dtypes():
    shards = {"a": torch.zeros(2), "b": torch.zeros(2, dtype=torch.float64)}
    with pytest.raises(ValueError, match="one dtype"):
        gather_tree(shards, shards, 2)


@settings(max_examples=30, deadline=None)
@given(
    world=st.integers(1, 4),
    d0s=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    rest=st.sampled_from([(), (2,), (3, 2)]),
    unused=st.booleans(),
)
def test_unpacking_a_gathered_buffer_and_its_gradient(world, d0s, rest, unused):
    """What gather_tree does after the all-gather, checked without processes: the leaves cut out
    of a rank-major ``(world, n)`` buffer of padded shards are the whole leaves, and the gradient
    written back into one buffer equals autograd of the plain slicing (zero in the padding), with
    or without padding, for one leaf (returned as a view) or several, and with an unused leaf."""
    gen = torch.Generator().manual_seed(len(d0s) * 7 + world)
    leaves = [torch.randn(d0, *rest, dtype=torch.float64, generator=gen) for d0 in d0s]
    shards = [[shard_rows(t, r, world) for t in leaves] for r in range(world)]
    buffer = torch.stack([torch.cat([s.reshape(-1) for s in per_rank]) for per_rank in shards])
    layout = tuple((tuple(s.shape), t.shape[0]) for s, t in zip(shards[0], leaves))
    got_in = buffer.clone().requires_grad_()
    outs = flm.shard._Unpack.apply(got_in, layout)
    for out, t in zip(outs, leaves):
        assert torch.equal(out, t)
    ups = [torch.randn(t.shape, dtype=torch.float64, generator=gen) for t in leaves]
    used = range(len(leaves) - 1) if unused and len(leaves) > 1 else range(len(leaves))
    (got,) = torch.autograd.grad(sum((outs[i] * ups[i]).sum() for i in used), got_in)
    ref_in = buffer.clone().requires_grad_()
    ref_outs, offset = [], 0
    for shape, d0 in layout:
        n = math.prod(shape)
        ref_outs.append(ref_in[:, offset : offset + n].reshape(world * shape[0], *shape[1:])[:d0])
        offset += n
    (expected,) = torch.autograd.grad(sum((ref_outs[i] * ups[i]).sum() for i in used), ref_in)
    assert torch.equal(got, expected)


# ---- real processes ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _replicated(cfg, accum):
    """The single-process reference: whole batch, whole model, float64."""
    params = init_params(cfg, torch.Generator().manual_seed(0), dtype=torch.float64)
    step = make_train_step(cfg, _tx(), grad_accum_steps=accum)
    state = _tx().init(params)
    losses, norms = [], []
    for x, y in _batches(cfg):
        params, state, m = step(params, state, x, y)
        losses.append(m["loss"])
        norms.append(m["grad_norm"])
    return params, state, losses, norms


def _worker(rank, port, world, results):
    torch.set_num_threads(1)
    flm.shard._LOSS_CHUNK_VALUES = 5 * CFG.vocab_size  # the loss in uneven chunks of 5 rows
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = {}
        accum = 2 if world == 2 else 1
        for name, cfg in (("untied", CFG), ("tied", TIED)):
            params = shard_tree(init_params(cfg, torch.Generator().manual_seed(0), dtype=torch.float64), rank, world)
            tx = _tx(sharded_global_norm)
            state = tx.init(params)
            step = make_sharded_train_step(cfg, tx, world_size=world, grad_accum_steps=accum)
            local = BATCH // world
            losses, norms = [], []
            for x, y in _batches(cfg):
                mine = slice(rank * local, (rank + 1) * local)
                params, state, m = step(params, state, x[mine], y[mine])
                both = torch.stack([m["loss"], m["grad_norm"]])
                gathered = [torch.empty_like(both) for _ in range(world)]
                dist.all_gather(gathered, both)
                losses.append(torch.stack([g[0] for g in gathered]).mean())  # the global batch's loss
                norms.append(m["grad_norm"])
            with torch.no_grad():
                logits = sharded_transformer_lm(params, _batches(cfg)[0][0], cfg, world_size=world)
            everyone = [None] * world
            dist.all_gather_object(everyone, (params, state))
            out[name] = (everyone, losses, norms, logits)
        # bf16 mixed precision: gathered weights cast to bf16, gradients reduced in float32.
        params = shard_tree(init_params(CFG, torch.Generator().manual_seed(0)), rank, world)
        tx = _tx(sharded_global_norm)
        step = make_sharded_train_step(CFG, tx, world_size=world, compute_dtype=torch.bfloat16)
        x, y = _batches(CFG)[0]
        local = BATCH // world
        params, _, m = step(params, tx.init(params), x[rank * local : (rank + 1) * local], y[rank * local :][:local])
        everyone = [None] * world
        dist.all_gather_object(everyone, params)
        out["bf16"] = (everyone, m["grad_norm"])
        if rank == 0:  # numpy arrays travel by value (a queued tensor is shared memory the sender owns)
            results.put(optree.tree_map(lambda t: t.numpy(), out, namespace=""))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.parametrize("world", [2, 4])
def test_sharded_steps_equal_the_replicated_step(world):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, world, results)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        out = optree.tree_map(torch.from_numpy, results.get(timeout=240), namespace="")
    finally:
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    for name, cfg in (("untied", CFG), ("tied", TIED)):
        everyone, losses, norms, logits = out[name]
        ref_params, ref_state, ref_losses, ref_norms = _replicated(cfg, 2 if world == 2 else 1)
        params = unshard_tree([p for p, _ in everyone], ref_params)
        for a, b in zip(tree_leaves(params), tree_leaves(ref_params)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        state = unshard_tree([s for _, s in everyone], ref_state)
        for a, b in zip(tree_leaves(state), tree_leaves(ref_state)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        for a, b in zip(losses, ref_losses):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
        for a, b in zip(norms, ref_norms):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=0)
        torch.testing.assert_close(logits, transformer_lm(ref_params, _batches(cfg)[0][0], cfg), rtol=1e-10, atol=1e-12)
    everyone, norm = out["bf16"]
    params = init_params(CFG, torch.Generator().manual_seed(0))
    ref_step = make_train_step(CFG, _tx(), compute_dtype=torch.bfloat16)
    x, y = _batches(CFG)[0]
    ref, _, m = ref_step(params, _tx().init(params), x, y)
    torch.testing.assert_close(norm, m["grad_norm"], rtol=2e-2, atol=0)
    for a, b in zip(tree_leaves(unshard_tree(everyone, ref)), tree_leaves(ref)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=1e-3)


# ---- flm train --shard under torchrun -----------------------------------------------------------


def _torchrun(nproc: int, argv: list[str], log: Path) -> None:
    """``torchrun --standalone --nproc_per_node N -m flm …`` on CPU (gloo), under a timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "flm"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    with open(log, "w") as f:
        rc = subprocess.run([*cmd, *argv], stdout=f, stderr=subprocess.STDOUT, env=env, timeout=300).returncode
    assert rc == 0, log.read_text()[-3000:]


def _norms(out: Path) -> dict[int, float]:
    return {r["step"]: r["grad_norm"] for r in read_metrics(out / "metrics.jsonl") if r.get("grad_norm") is not None}


@pytest.mark.distributed
def test_flm_train_shard_saves_at_4_resumes_at_2_and_1(texts, tmp_path):
    """``flm train --shard`` at world 4 for 8 steps (sharded checkpoints at 4 and 8), then resumed
    from its step-4 checkpoint sharded at world 2 and at world 1: every step's global gradient norm
    and the best validation loss equal an uninterrupted replicated run at world 2 (same global
    batches: they depend on the step only); the run directory holds sharded checkpoints and a
    sharded best model, which ``flm generate`` reads and ``flm consolidate`` turns into
    ``best.safetensors``."""
    common = ["--eval-interval", "4", "--checkpoint-interval", "4", "--log-interval", "1", "--max-new-tokens", "0"]
    common += ["--max-iters", "8"]
    ref = tmp_path / "replicated"
    _torchrun(2, train_argv(texts, ref, *common), tmp_path / "ref.log")
    sharded = tmp_path / "sharded"
    _torchrun(4, train_argv(texts, sharded, *common, "--shard"), tmp_path / "s4.log")
    assert (sharded / "ckpt_0000004.shards" / "index.json").exists()
    assert (sharded / "best.shards" / "index.json").exists()
    assert not list(sharded.glob("*.safetensors"))
    at2, at1 = tmp_path / "at2", tmp_path / "at1"
    for copy in (at2, at1):
        shutil.copytree(sharded, copy)
        shutil.rmtree(copy / "ckpt_0000008.shards")  # resume from step 4's, saved at world 4
    _torchrun(2, train_argv(texts, at2, *common, "--shard", "--resume"), tmp_path / "s2.log")
    assert main(train_argv(texts, at1, *common, "--shard", "--resume")) == 0
    assert "resumed from ckpt_0000004.shards at step 4" in (tmp_path / "s2.log").read_text()
    want = _norms(ref)
    ref_final = json.loads((ref / "results.json").read_text())
    for out in (sharded, at2, at1):
        got = _norms(out)
        assert sorted(got) == list(range(1, 9))
        for step in range(1, 9):
            assert got[step] == pytest.approx(want[step], rel=1e-5), (out.name, step)
        final = json.loads((out / "results.json").read_text())
        assert final["val_loss"] == pytest.approx(ref_final["val_loss"], rel=1e-5)
        assert final["best_step"] == ref_final["best_step"]
    assert main(["generate", str(sharded), "--prompt", "Once", "--max-new-tokens", "4", "--seed", "0"]) == 0
    assert main(["consolidate", str(sharded)]) == 0
    assert (sharded / "best.safetensors").exists()


def test_cli_refuses_what_does_not_combine_with_shard_in_one_line(texts, tmp_path, capsys):
    """``--shard`` with ``--compile`` (flm train) and with the vmapped sweep: one ``error:`` line,
    a non-zero exit, nothing written."""
    assert main(train_argv(texts, tmp_path / "run", "--shard", "--compile")) != 0
    err = capsys.readouterr().err
    assert "error:" in err and "shard does not combine with compile" in err and "Traceback" not in err
    sweep = ["sweep", "--preset", "tiny", "--train-text", str(texts[0]), "--valid-text", str(texts[1])]
    assert main([*sweep, "--out-dir", str(tmp_path / "sweep"), "--lrs", "1e-3", "1e-2", "--shard"]) != 0
    err = capsys.readouterr().err
    assert "error: --shard does not combine with the vmapped sweep" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "sweep").exists()


def test_auto_compile_resolves_off_under_shard():
    from flm.train.config import TrainConfig, resolve_auto

    cfg, reasons = resolve_auto(TrainConfig(shard=True), torch.device("cpu"))
    assert cfg.compile is False and any("sharded step is not compiled" in r for r in reasons)
