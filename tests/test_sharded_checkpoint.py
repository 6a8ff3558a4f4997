"""Tests for flm.sharded_checkpoint and the sharded mode of flm.train.Checkpointer: per-rank files
plus an index committed last, resharding on load (save at 4, load at 2 and 1), kills mid-save, CRC
checks, rotation under the manifest's rules, and the readers (load_run, flm generate / eval /
export-hf / consolidate) on a sharded run directory.

Ranks are simulated in one process: a loop over ranks for the functions, threads (with a
``threading.Barrier`` as the barrier and the all-reduce) for the Checkpointer, which calls them."""

from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open

import flm.sharded_checkpoint as sc
from flm import manifest, optim
from flm.checkpoint import load_checkpoint, save_checkpoint
from flm.cli import main
from flm.model import TransformerConfig, init_params
from flm.shard import shard_tree, unshard_tree
from flm.train.checkpointer import Checkpointer, NonFiniteLossError, ShardSpec
from flm.tree import flatten, tree_leaves, tree_map

CFG = TransformerConfig(vocab_size=30, context_length=8, d_model=16, num_layers=2, num_heads=2, d_ff=24)
RUN_CONFIG = {"model": CFG.to_dict()}


def _equal(a, b) -> bool:
    la, lb = tree_leaves(a), tree_leaves(b)
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y) for x, y in zip(la, lb)
    )


def _state(seed: int = 0, steps: int = 2):
    """Full parameters and an AdamW (+ clipping) state after ``steps`` updates: nonzero moments."""
    torch.manual_seed(seed)
    params = init_params(CFG)
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2))
    state = tx.init(params)
    for _ in range(steps):
        updates, state = tx.update(tree_map(torch.randn_like, params), state, params)
        params = tree_map(lambda p, u: p + u, params, updates)
    return params, state


def _save(
    directory: Path, params, state, world: int, step: int = 10, generation: int = 0, config=RUN_CONFIG, **kw
) -> None:
    for r in range(world):
        sc.save_shard(
            directory,
            r,
            world,
            shard_tree(params, r, world),
            None if state is None else shard_tree(state, r, world),
            generation=generation,
        )
    like = {"params": params, "opt_state": state}
    sc.commit(directory, world, step, like=like, config=config, generation=generation, **kw)


# ------------------------------------------------------------------------------- the format


def test_round_trip_at_the_same_world_size_is_bitwise_the_saved_shards(tmp_path):
    params, state = _state()
    gen = torch.Generator().manual_seed(5)
    torch.rand(3, generator=gen)
    d = tmp_path / "ckpt_0000010.shards"
    _save(d, params, state, 4, metadata={"best_val_loss": 1.5}, generator=gen)
    names = sorted(p.name for p in d.iterdir())
    assert names == ["flm-manifest.json", "index.json"] + [sc.rank_file_name(r, 4) for r in range(4)]
    assert manifest.owned(d)  # every file recorded: rotation may remove the directory
    for r in range(4):
        like = {"params": shard_tree(params, r, 4), "opt_state": shard_tree(state, r, 4)}
        got = sc.load_sharded(d, r, 4, like=like)
        assert _equal(got.params, like["params"]) and _equal(got.opt_state, like["opt_state"])
        assert got.step == 10 and got.metadata == {"best_val_loss": 1.5} and got.config == RUN_CONFIG
        assert torch.equal(got.rng_state, gen.get_state())
        # without a template: the optimiser state comes back with flm's NamedTuples, as saved
        bare = sc.load_sharded(d, r, 4)
        assert type(bare.opt_state[0]) is type(state[0]) and _equal(bare.opt_state, like["opt_state"])


@pytest.mark.parametrize("load_world", [1, 2, 3, 4, 6])
def test_save_at_4_load_at_any_world_size_equals_the_saved_state_once_consolidated(tmp_path, load_world):
    params, state = _state(seed=1)
    d = tmp_path / "ckpt_0000010.shards"
    _save(d, params, state, 4)
    shards = [sc.load_sharded(d, r, load_world) for r in range(load_world)]
    for r, got in enumerate(shards):  # each rank: exactly flm.shard's layout at the new world size
        assert _equal(got.params, shard_tree(params, r, load_world))
        assert _equal(got.opt_state, shard_tree(state, r, load_world))
    assert _equal(unshard_tree([s.params for s in shards], params), params)
    assert _equal(unshard_tree([s.opt_state for s in shards], state), state)
    adam = state[1][0]  # ScaleByAdamState: the 0-d step, both moments
    assert int(adam.step) == 2 and all(_equal(s.opt_state[1][0].step, adam.step) for s in shards)  # replicated
    full = sc.consolidate(d)
    assert _equal(full.params, params) and _equal(full.opt_state, state)


def test_odd_first_dimensions_and_fewer_rows_than_ranks(tmp_path):
    torch.manual_seed(0)
    tree = {"a": torch.randn(7, 3), "b": torch.randn(3), "c": torch.randn(1, 2, 2), "s": torch.tensor(4.0)}
    d = tmp_path / "x.shards"
    for r in range(8):  # 8 ranks: ranks ≥ 3 hold only padding of "b", ranks ≥ 1 of "c"
        sc.save_shard(d, r, 8, shard_tree(tree, r, 8))
    sc.commit(d, 8, 3, like={"params": tree})
    idx = sc.read_index(d)
    assert idx["tensors"]["params.b"] == {"shape": [3], "dtype": "float32", "sharded": True}
    assert idx["tensors"]["params.s"] == {"shape": [], "dtype": "float32", "sharded": False}
    for world in (1, 2, 3, 5, 8, 9):
        for r in range(world):
            assert _equal(sc.load_sharded(d, r, world).params, shard_tree(tree, r, world)), (world, r)
    assert sc.consolidate(d).opt_state is None


@given(
    shapes=st.lists(
        st.tuples(st.integers(1, 9), st.integers(0, 3)), min_size=1, max_size=4
    ),  # (d0, trailing size; 0 = a 1-d leaf)
    saved=st.integers(1, 6),
    loaded=st.integers(1, 6),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.int64]),
)
def test_property_resharding_equals_sharding_the_whole_leaf(tmp_path_factory, shapes, saved, loaded, dtype):
    g = torch.Generator().manual_seed(len(shapes) * 31 + saved)
    tree = {
        f"w{i}": (torch.randn((d0, k) if k else (d0,), generator=g) * 100).to(dtype) for i, (d0, k) in enumerate(shapes)
    }
    tree["zero_d"] = torch.tensor(3, dtype=torch.int64)
    d = tmp_path_factory.mktemp("prop") / "p.shards"
    for r in range(saved):
        sc.save_shard(d, r, saved, shard_tree(tree, r, saved))
    sc.commit(d, saved, 0, like={"params": tree})
    for r in range(loaded):
        assert _equal(sc.load_sharded(d, r, loaded).params, shard_tree(tree, r, loaded))


def test_commit_refuses_a_missing_rank_and_shapes_that_do_not_match(tmp_path):
    params, _ = _state()
    d = tmp_path / "ckpt_0000001.shards"
    for r in (0, 1, 3):
        sc.save_shard(d, r, 4, shard_tree(params, r, 4))
    with pytest.raises(ValueError, match="rank 2's file rank-00002-of-00004.safetensors is missing"):
        sc.commit(d, 4, 1, like={"params": params})
    assert not sc.is_complete(d)
    sc.save_shard(d, 2, 4, shard_tree(params, 2, 3))  # a 3-way shard where a 4-way one belongs
    with pytest.raises(ValueError, match="4-way shard"):
        sc.commit(d, 4, 1, like={"params": params})
    with pytest.raises(ValueError, match="incomplete: no index.json"):
        sc.load_sharded(d, 0, 1)


def test_crc_corruption_and_a_missing_rank_file_are_detected(tmp_path):
    params, state = _state()
    d = tmp_path / "ckpt_0000010.shards"
    _save(d, params, state, 2)
    victim = d / sc.rank_file_name(1, 2)
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0x10  # a byte of the last tensor's data: still a valid safetensors file
    victim.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"rank-00001-of-00002.safetensors is corrupt: .*checksum"):
        sc.consolidate(d)
    sc.load_sharded(d, 0, 2)  # rank 0 reads only its own file at the saved world size
    assert sc.load_sharded(d, 1, 2, verify=False).step == 10
    victim.unlink()
    with pytest.raises(ValueError, match="rank 1's file rank-00001-of-00002.safetensors is missing"):
        sc.consolidate(d)


def test_a_file_of_another_save_is_refused_by_the_index_checksum(tmp_path):
    params, state = _state()
    d = tmp_path / "ckpt_0000010.shards"
    _save(d, params, state, 2)
    other, _ = _state(seed=9)
    sc.save_shard(d, 1, 2, shard_tree(other, 1, 2), shard_tree(state, 1, 2))  # rewritten after the commit
    with pytest.raises(ValueError, match="the index"):
        sc.consolidate(d)


def test_no_pickle_anywhere(tmp_path):
    params, state = _state()
    d = tmp_path / "ckpt_0000010.shards"
    _save(d, params, state, 2)
    for p in d.iterdir():
        assert b"\x80\x04" not in p.read_bytes()[:2] and not p.name.endswith((".pt", ".pkl"))
    with safe_open(str(d / sc.rank_file_name(0, 2)), framework="pt") as f:
        assert set(f.keys()) == {f"params.{k}" for k in flatten(params)} | {f"opt_state.{k}" for k in flatten(state)}


# -------------------------------------------------------------------- the Checkpointer, sharded


class Group:
    """W simulated ranks as threads: a barrier and an all-reduce (AND) of a flag."""

    def __init__(self, world: int) -> None:
        self.world, self.flags = world, [True] * world
        self.bar = threading.Barrier(world, timeout=60)

    def barrier(self) -> None:
        self.bar.wait()

    def agree(self, rank: int, flag: bool) -> bool:
        self.flags[rank] = bool(flag)
        self.bar.wait()
        result = all(self.flags)
        self.bar.wait()
        return result

    def run(self, fn):
        """``fn(rank)`` on every rank at once; the results in rank order (an error is re-raised)."""
        results, errors = [None] * self.world, [None] * self.world

        def target(r: int) -> None:
            try:
                results[r] = fn(r)
            except BaseException as err:
                errors[r] = err
                self.bar.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        real = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
        if real or any(errors):
            raise (real or [e for e in errors if e is not None])[0]
        return results


def _checkpointers(out: Path, group: Group, params, state, *, keep: int = 3, logs: list | None = None):
    full = {"params": params, "opt_state": state}
    return [
        Checkpointer(
            out,
            interval=10,
            keep=keep,
            run_config=RUN_CONFIG,
            tokenizer_fingerprint="fp",
            log=(logs.append if logs is not None else None),
            shard=ShardSpec(r, group.world, full, group.barrier, lambda f, r=r: group.agree(r, f)),
        )
        for r in range(group.world)
    ]


def _like(params, state, r, world):
    return {"params": shard_tree(params, r, world), "opt_state": shard_tree(state, r, world)}


def test_checkpointer_saves_and_resumes_at_the_same_and_other_world_sizes(tmp_path):
    out = tmp_path / "run"
    manifest.claim(out)
    params, state = _state()
    g4 = Group(4)
    cps = _checkpointers(out, g4, params, state)
    sampler = torch.Generator().manual_seed(3)
    paths = g4.run(lambda r: cps[r].save(10, *_like(params, state, r, 4).values(), sampler=sampler))
    assert paths == [out / "ckpt_0000010.shards"] * 4 and sc.is_complete(paths[0])
    assert all(cp.last_good == paths[0] for cp in cps)
    assert g4.run(lambda r: cps[r].save_best(10, shard_tree(params, r, 4), 2.5)) == [True] * 4
    assert sc.read_sharded_header(out / "best.shards")["metadata"]["val_loss"] == 2.5

    for world in (4, 2, 1):  # resume at the same world size, at 2 and at 1
        g = Group(world)
        fresh = _checkpointers(out, g, params, state)
        got = g.run(lambda r, w=world, fresh=fresh: fresh[r].resume(_like(params, state, r, w), CFG))
        assert all(c.step == 10 and torch.equal(c.rng_state, sampler.get_state()) for c in got)
        for r, c in enumerate(got):
            assert _equal(c.params, shard_tree(params, r, world)) and _equal(c.opt_state, shard_tree(state, r, world))
        assert all(cp.best_loss == 2.5 and cp.best_step == 10 for cp in fresh)

    # an unsharded run resumes from the sharded checkpoint too (world size 1, whole tensors)
    plain = Checkpointer(out, interval=10, keep=3, run_config=RUN_CONFIG, tokenizer_fingerprint="fp")
    whole = plain.resume({"params": params, "opt_state": state}, CFG)
    assert _equal(whole.params, params) and _equal(whole.opt_state, state)


def test_sharded_resume_reshards_an_unsharded_checkpoint(tmp_path):
    out = tmp_path / "run"
    params, state = _state()
    save_checkpoint(out / "ckpt_0000020.safetensors", params=params, opt_state=state, step=20, config=RUN_CONFIG)
    g = Group(3)
    cps = _checkpointers(out, g, params, state)
    got = g.run(lambda r: cps[r].resume(_like(params, state, r, 3), CFG))
    for r, c in enumerate(got):
        assert (
            c.step == 20 and _equal(c.params, shard_tree(params, r, 3)) and _equal(c.opt_state, shard_tree(state, r, 3))
        )


def test_a_kill_mid_save_leaves_the_previous_checkpoint_resumable(tmp_path):
    out = tmp_path / "run"
    manifest.claim(out)
    params, state = _state()
    g = Group(2)
    cps = _checkpointers(out, g, params, state)
    g.run(lambda r: cps[r].save(10, *_like(params, state, r, 2).values()))
    later, later_state = _state(seed=4)
    partial = out / "ckpt_0000020.shards"
    sc.save_shard(partial, 0, 2, shard_tree(later, 0, 2), shard_tree(later_state, 0, 2))  # rank 1 killed
    assert not sc.is_complete(partial)

    from flm.runs import find_checkpoint, run_state

    state_now = run_state(out)
    assert state_now.checkpoints == [out / "ckpt_0000010.shards"] and partial in state_now.outputs
    assert state_now.last_step == 10 and find_checkpoint(out) == out / "ckpt_0000010.shards"
    fresh = _checkpointers(out, g, params, state)
    got = g.run(lambda r: fresh[r].resume(_like(params, state, r, 2), CFG))
    assert all(c.step == 10 for c in got) and _equal(got[1].params, shard_tree(params, 1, 2))
    # the next save (step 30) removes the killed save's directory: flm wrote everything in it
    g.run(lambda r: fresh[r].save(30, *_like(params, state, r, 2).values()))
    assert not partial.exists() and sc.is_complete(out / "ckpt_0000030.shards")


def test_best_model_survives_a_kill_at_any_point_of_its_replacement(tmp_path):
    out = tmp_path / "run"
    manifest.claim(out)
    old, _ = _state(seed=1)
    new, _ = _state(seed=2)
    g = Group(2)
    cps = _checkpointers(out, g, old, None)
    best = out / "best.shards"
    g.run(lambda r: cps[r].save_best(10, shard_tree(old, r, 2), 3.0))
    # killed while the ranks wrote the next generation (one file written, no index): the old one loads
    sc.save_shard(best, 0, 2, shard_tree(new, 0, 2), generation=sc.next_generation(best))
    assert sc.next_generation(best) == 1
    assert _equal(sc.consolidate(best).params, old)
    # a whole save later: its index names the new generation, the old files are gone
    g.run(lambda r: cps[r].save_best(20, shard_tree(new, r, 2), 2.0))
    assert _equal(sc.consolidate(best).params, new) and sc.read_index(best)["generation"] == 1
    assert sorted(p.name for p in best.iterdir()) == sorted(
        ["index.json", manifest.MANIFEST_NAME] + [sc.rank_file_name(r, 2, 1) for r in range(2)]
    )
    # killed after the index was replaced but before the old files were removed: the new one loads
    newer, _ = _state(seed=3)
    for r in range(2):
        sc.save_shard(best, r, 2, shard_tree(newer, r, 2), generation=2)
    index_before = (best / "index.json").read_text()
    assert _equal(sc.consolidate(best).params, new)  # the index still names generation 1
    sc.commit(best, 2, 30, like={"params": newer}, generation=2)
    assert _equal(sc.consolidate(best).params, newer) and (best / "index.json").read_text() != index_before
    assert manifest.owned(best)


def test_non_finite_state_on_one_rank_writes_nothing_on_any_rank(tmp_path):
    out = tmp_path / "run"
    params, state = _state()
    g = Group(2)
    cps = _checkpointers(out, g, params, state)

    def save(r):
        like = _like(params, state, r, 2)
        if r == 1:
            like["params"]["ln_final"]["weight"][0] = math.nan
        with pytest.raises(NonFiniteLossError, match="no checkpoint was written yet"):
            cps[r].save(10, like["params"], like["opt_state"])
        return cps[r].save_best(10, like["params"], 1.0)

    assert g.run(save) == [True, True]  # the best loss counts, the model is not written
    assert not (out / "ckpt_0000010.shards").exists() and not (out / "best.shards").exists()


def test_rotation_removes_only_shard_directories_flm_wrote(tmp_path):
    out = tmp_path / "run"
    manifest.claim(out)
    params, state = _state()
    g = Group(2)
    logs: list[str] = []
    cps = _checkpointers(out, g, params, state, keep=2, logs=logs)
    for step in (10, 20):
        g.run(lambda r, step=step: cps[r].save(step, *_like(params, state, r, 2).values()))
    (out / "ckpt_0000010.shards" / "notes.txt").write_text("mine")  # the user's file inside one
    save_checkpoint(out / "ckpt_0000005.safetensors", params=params, step=5)  # an older unsharded one
    for step in (30, 40):
        g.run(lambda r, step=step: cps[r].save(step, *_like(params, state, r, 2).values()))
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("ckpt_"))
    assert names == ["ckpt_0000010.shards", "ckpt_0000030.shards", "ckpt_0000040.shards"]
    assert (out / "ckpt_0000010.shards" / "notes.txt").read_text() == "mine"
    assert any("keeping ckpt_0000010.shards" in m and "notes.txt" in m for m in logs)
    assert json.loads((out / manifest.MANIFEST_NAME).read_text())["files"].get("ckpt_0000005.safetensors") is None


# ------------------------------------------------------------------------------- the readers


@pytest.fixture
def sharded_run(tiny_run, tmp_path):
    """A copy of the tiny run whose models are sharded: best.shards (3 ranks) and
    ckpt_0000040.shards (2 ranks), no .safetensors checkpoints."""
    run = tmp_path / "sharded"
    shutil.copytree(tiny_run, run, symlinks=True)
    best = load_checkpoint(tiny_run / "best.safetensors")
    last = load_checkpoint(tiny_run / "ckpt_0000040.safetensors")
    for p in run.glob("*.safetensors"):
        manifest.remove(p)
    sampler = torch.Generator()
    sampler.set_state(last.rng_state)
    _save(
        run / "ckpt_0000040.shards",
        last.params,
        last.opt_state,
        2,
        step=40,
        config=last.config,
        metadata=last.metadata,
        generator=sampler,
    )
    d = run / "best.shards"
    for r in range(3):
        sc.save_shard(d, r, 3, shard_tree(best.params, r, 3))
    sc.commit(d, 3, best.step, like={"params": best.params}, config=best.config, metadata=best.metadata)
    return run


def test_load_run_generate_eval_export_and_consolidate_read_a_sharded_run(
    sharded_run, tiny_run, texts, tmp_path, capsys
):
    import flm

    params, config, tok = flm.load_run(sharded_run)
    want, _, _ = flm.load_run(tiny_run)
    assert _equal(params, want) and config == CFG.__class__(**config.to_dict())

    gen = ["--prompt", "Once upon a time", "--max-new-tokens", "8", "--seed", "1", "--device", "cpu"]
    assert main(["generate", str(tiny_run), *gen]) == 0
    expected = capsys.readouterr().out
    assert main(["generate", str(sharded_run), *gen]) == 0 and capsys.readouterr().out == expected
    assert main(["generate", str(sharded_run / "ckpt_0000040.shards"), *gen]) == 0

    assert main(["eval", str(tiny_run), "--text", str(texts[1]), "--json", "--device", "cpu"]) == 0
    loss = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"]
    assert main(["eval", str(sharded_run), "--text", str(texts[1]), "--json", "--device", "cpu"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["loss"] == loss and res["checkpoint"].endswith("best.shards")

    assert main(["export-hf", str(sharded_run), "--out", str(tmp_path / "hf")]) == 0
    assert main(["export-hf", str(tiny_run), "--out", str(tmp_path / "hf0")]) == 0
    a, b = (tmp_path / "hf" / "model.safetensors").read_bytes(), (tmp_path / "hf0" / "model.safetensors").read_bytes()
    assert a == b

    assert main(["consolidate", str(sharded_run)]) == 0
    out = sharded_run / "best.safetensors"
    assert _equal(load_checkpoint(out, verify=True).params, load_checkpoint(tiny_run / "best.safetensors").params)
    assert manifest.owned(out)  # recorded in the run's manifest: a later run may replace it
    assert main(["consolidate", str(sharded_run / "ckpt_0000040.shards")]) == 0
    whole = load_checkpoint(sharded_run / "ckpt_0000040.safetensors", verify=True)
    ref = load_checkpoint(tiny_run / "ckpt_0000040.safetensors")
    assert _equal(whole.params, ref.params) and _equal(whole.opt_state, ref.opt_state) and whole.step == 40
    assert torch.equal(whole.rng_state, ref.rng_state) and whole.metadata == ref.metadata


def test_consolidate_without_a_best_model_takes_the_newest_periodic_checkpoint(sharded_run, tmp_path):
    manifest.remove(sharded_run / "best.shards")
    assert main(["consolidate", str(sharded_run), "--out", str(tmp_path / "x.safetensors")]) == 0
    assert load_checkpoint(tmp_path / "x.safetensors").opt_state is not None  # --out: everything
    assert main(["consolidate", str(sharded_run)]) == 0
    best = load_checkpoint(sharded_run / "best.safetensors", verify=True)
    assert best.step == 40 and best.opt_state is None  # best.safetensors: parameters only


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_consolidate_errors_are_one_line(sharded_run, tmp_path, capsys):
    assert main(["consolidate", str(tmp_path / "missing")]) == 2
    assert "does not exist" in _error(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["consolidate", str(empty)]) == 2
    assert "no complete sharded checkpoint" in _error(capsys)

    best = sharded_run / "best.shards"
    victim = best / sc.rank_file_name(2, 3)
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    assert main(["consolidate", str(sharded_run)]) == 1
    assert "rank-00002-of-00003.safetensors is corrupt" in _error(capsys)
    victim.unlink()
    assert main(["consolidate", str(best)]) == 1
    assert "rank 2's file rank-00002-of-00003.safetensors is missing" in _error(capsys)
    (best / "index.json").unlink()
    assert main(["consolidate", str(best)]) == 1
    assert "incomplete: no index.json" in _error(capsys)
    assert main(["generate", str(best), "--device", "cpu"]) == 2
    assert "incomplete" in _error(capsys)
    assert not (sharded_run / "best.safetensors").exists()


def test_run_state_counts_sharded_checkpoints_and_overwrite_removes_them(sharded_run):
    from flm.runs import run_state
    from flm.train.checkpointer import newest_loadable

    partial = sharded_run / "ckpt_0000050.shards"
    sc.save_shard(partial, 0, 2, {"w": torch.ones(2)})  # a killed save: listed for removal, not resumed
    state = run_state(sharded_run)
    assert state.checkpoints == [sharded_run / "ckpt_0000040.shards"] and state.last_step == 40
    assert {sharded_run / "best.shards", partial} <= set(state.outputs) and state.has_run
    assert state.foreign == [] and state.refused == []
    skipped = []
    found = newest_loadable(state.checkpoints, skip=lambda p, why: skipped.append(why))  # flm train --resume's plan
    assert found is not None and found[0] == sharded_run / "ckpt_0000040.shards" and found[2].step == 40
    for p in state.removable:  # what --overwrite does
        manifest.remove(p)
    assert not any(p.name.endswith(".shards") for p in sharded_run.iterdir())


def test_rotation_works_in_a_run_directory_without_a_manifest(tmp_path):
    """The .shards directory records its own files, so a library user's untracked directory rotates too."""
    out = tmp_path / "plain"
    params, state = _state()
    g = Group(2)
    logs: list[str] = []
    cps = _checkpointers(out, g, params, state, keep=1, logs=logs)
    for step in (10, 20):
        g.run(lambda r, step=step: cps[r].save(step, *_like(params, state, r, 2).values()))
    assert [p.name for p in out.iterdir()] == ["ckpt_0000020.shards"] and logs == []
    assert not manifest.has_manifest(out)
