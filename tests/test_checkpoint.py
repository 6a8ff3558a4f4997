"""Tests for flm.checkpoint: round trips, key layout, no pickle, atomic writes, corrupt files, and
bitwise-exact resume of training (in a fresh process)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import flm.checkpoint as ckpt_mod
from flm import optim
from flm._fs import safetensors_metadata
from flm.checkpoint import Checkpoint, load_checkpoint, read_header, save_checkpoint
from flm.model import TransformerConfig, init_params
from flm.tree import leaf_paths, tree_leaves, tree_map, tree_structure

CFG = TransformerConfig(vocab_size=32, context_length=8, d_model=16, num_layers=2, num_heads=2, d_ff=32)
ROOT = Path(__file__).resolve().parent.parent


def _tx():
    return optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(optim.cosine_schedule(1e-2, 1e-3, 2, 20)))


def _state_after_steps(params, n=2):
    tx = _tx()
    state = tx.init(params)
    for i in range(n):
        g = tree_map(lambda t, v=0.1 * (i + 1): torch.full_like(t, v), params)
        _, state = tx.update(g, state, params)
    return tx, state


def _equal(a, b):
    la, lb = tree_leaves(a), tree_leaves(b)
    return len(la) == len(lb) and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y) for x, y in zip(la, lb)
    )


def _full(**kw):
    params = init_params(CFG)
    tx, state = _state_after_steps(params)
    gen = torch.Generator().manual_seed(123)
    torch.randint(0, 10, (5,), generator=gen)  # advance it: not the seed state
    args = dict(
        params=params, opt_state=state, step=17, config=CFG, metadata={"run": "t", "val": [1.5, 2]}, generator=gen
    )
    args.update(kw)
    return args, tx


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dest", ["path", "bytesio"])
def test_round_trip_with_like(tmp_path, dest):
    args, tx = _full()
    target = tmp_path / "c.safetensors" if dest == "path" else io.BytesIO()
    save_checkpoint(target, **args)
    if dest == "bytesio":
        target.seek(0)
    like = {"params": init_params(CFG, torch.Generator().manual_seed(9)), "opt_state": tx.init(init_params(CFG))}
    ck = load_checkpoint(target, like=like)
    assert isinstance(ck, Checkpoint)
    assert _equal(ck.params, args["params"]) and _equal(ck.opt_state, args["opt_state"])
    # NamedTuples and their types come back exactly
    assert isinstance(ck.opt_state, tuple) and isinstance(ck.opt_state[0], optim.ClipState)
    assert isinstance(ck.opt_state[1][0], optim.ScaleByAdamState) and isinstance(
        ck.opt_state[1][2], optim.ScaleByLearningRateState
    )
    assert ck.opt_state[1][0].step.dtype == torch.int64 and int(ck.opt_state[1][0].step) == 2
    assert ck.step == 17 and isinstance(ck.step, int)
    assert ck.config == CFG.to_dict() and TransformerConfig.from_dict(ck.config) == CFG
    assert ck.metadata == {"run": "t", "val": [1.5, 2]}
    assert torch.equal(ck.rng_state, args["generator"].get_state())
    # the restored generator continues the same stream
    g2 = torch.Generator()
    g2.set_state(ck.rng_state)
    assert torch.equal(
        torch.randint(0, 1000, (8,), generator=g2), torch.randint(0, 1000, (8,), generator=args["generator"])
    )
    # a Checkpoint works as a template too
    again = load_checkpoint(tmp_path / "c.safetensors" if dest == "path" else io.BytesIO(target.getvalue()), like=ck)
    assert _equal(again.opt_state, ck.opt_state) and isinstance(again.opt_state[1][0], optim.ScaleByAdamState)


def test_round_trip_dtypes_with_like(tmp_path):
    params = {
        "a": torch.randn(3, dtype=torch.bfloat16),
        "b": [torch.randn(2, 2, dtype=torch.float64)],
        "c": torch.arange(4),
    }
    path = tmp_path / "d.safetensors"
    save_checkpoint(path, params=params)
    ck = load_checkpoint(path, like={"params": tree_map(torch.zeros_like, params)})
    assert _equal(ck.params, params)
    raw = load_checkpoint(path)  # without like: stored dtypes are kept as well
    assert _equal(raw.params, params) and isinstance(raw.params["b"], list)
    assert (
        raw.opt_state is None and raw.step == 0 and raw.config is None and raw.metadata == {} and raw.rng_state is None
    )


def _without_structure_record(path: Path) -> None:
    """Rewrite ``path`` as a checkpoint written before the optimiser-state structure was recorded."""
    from safetensors.torch import load_file, save_file

    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata()
    header = json.loads(meta["flm"])
    del header["opt_state_tree"]
    save_file(load_file(os.fspath(path)), os.fspath(path), metadata={"flm": json.dumps(header)})


def test_old_checkpoint_without_like_gives_nested_dicts_and_lists(tmp_path):
    """A checkpoint without the ``opt_state_tree`` record (written by an older flm) loads as before."""
    args, _ = _full()
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, **args)
    _without_structure_record(path)
    ck = load_checkpoint(path, verify=True)
    assert isinstance(ck.params["layers"], list) and len(ck.params["layers"]) == CFG.num_layers
    assert _equal(ck.params, args["params"])
    # chain state: list; the stateless parts come back as None, NamedTuples as dicts by field name
    assert isinstance(ck.opt_state, list) and set(ck.opt_state[0]) == {"grad_norm"}
    adam, decay, lr_state = ck.opt_state[1]
    assert set(adam) == {"step", "m", "v"} and adam["step"].dtype == torch.int64
    assert decay is None and set(lr_state) == {"step"}
    assert _equal(adam["m"], args["opt_state"][1][0].m) and _equal(adam["v"], args["opt_state"][1][0].v)


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: optim.adamw(1e-2, weight_decay=0.1),
        _tx,
        lambda: optim.chain(optim.clip_by_global_norm(0.5), optim.sgd(1e-2, momentum=0.9)),
    ],
    ids=["adamw", "chain-clip-adamw", "chain-clip-sgd-momentum"],
)
def test_round_trip_without_like_restores_the_optimizer_state_structure(tmp_path, make_tx):
    """Regression: without ``like=`` the state came back as lists/dicts that ``tx.update`` rejected
    (``adamw: state must be (ScaleByAdamState, …), got list``). The checkpoint records the
    structure (flm's state NamedTuples by name), so the loaded state is the saved one, and the
    next update is bitwise the same as after a load with ``like=``."""
    params = init_params(CFG, torch.Generator().manual_seed(0))
    tx = make_tx()
    state = tx.init(params)
    for i in range(2):
        g = tree_map(lambda t, v=0.1 * (i + 1): torch.full_like(t, v), params)
        _, state = tx.update(g, state, params)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, params=params, opt_state=state, step=2)
    bare = load_checkpoint(path, verify=True)
    templated = load_checkpoint(path, like={"params": params, "opt_state": state}, verify=True)
    assert tree_structure(bare.opt_state) == tree_structure(state)
    assert repr(tree_structure(bare.opt_state)) == repr(tree_structure(state))  # NamedTuple classes too
    g = tree_map(lambda t: torch.randn(t.shape, generator=torch.Generator().manual_seed(7)), params)
    u1, s1 = tx.update(g, bare.opt_state, bare.params)
    u2, s2 = tx.update(g, templated.opt_state, templated.params)
    assert _equal(u1, u2) and _equal(s1, s2)
    for a, b in zip(tree_leaves(u1), tree_leaves(u2)):
        assert torch.equal(a, b)  # bitwise


def test_recorded_structure_never_names_a_class_outside_flm_state_classes(tmp_path):
    """A file naming another class (``os.system``, a NamedTuple elsewhere) is refused, not imported."""
    from safetensors.torch import save_file

    path = tmp_path / "c.safetensors"
    params = {"w": torch.ones(2)}
    save_checkpoint(path, params=params, opt_state=optim.adamw(1e-2).init(params))
    with safe_open(os.fspath(path), framework="pt") as f:
        header = json.loads(f.metadata()["flm"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    desc = header["opt_state_tree"]
    assert "flm.optim.transforms.ScaleByAdamState" in json.dumps(desc)
    header["opt_state_tree"] = json.loads(
        json.dumps(desc).replace("flm.optim.transforms.ScaleByAdamState", "os.system")
    )
    save_file(tensors, os.fspath(path), metadata={"flm": json.dumps(header)})
    with pytest.raises(ValueError, match=r"'os\.system', not one of flm's state classes"):
        load_checkpoint(path)
    # a NamedTuple outside the allow-list is not recorded: that state loads as dicts/lists, as before
    from collections import namedtuple

    Other = namedtuple("Other", ["x"])
    save_checkpoint(path, params=params, opt_state=Other(torch.ones(2)))
    loaded = load_checkpoint(path).opt_state
    assert isinstance(loaded, dict) and set(loaded) == {"x"} and torch.equal(loaded["x"], torch.ones(2))


def test_config_as_dict_and_step_tensor(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, params={"w": torch.ones(2)}, step=torch.tensor(5), config={"lr": 1e-3, "name": "x"})
    ck = load_checkpoint(path)
    assert ck.step == 5 and ck.config == {"lr": 1e-3, "name": "x"}
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(path, params={"w": torch.ones(2)}, metadata={"bad": object()})
    with pytest.raises(ValueError):
        save_checkpoint(path, params={"w": torch.ones(2)}, config=object())
    with pytest.raises(ValueError, match="params.w"):
        save_checkpoint(path, params={"w": 3.0})


# --------------------------------------------------------------------------------------------
# File format: keys, header, no pickle
# --------------------------------------------------------------------------------------------


def test_keys_are_dotted_paths_and_format_is_plain_safetensors(tmp_path):
    args, _ = _full()
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, **args)
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    expected = {f"params.{k}" for k in leaf_paths(args["params"])} | {
        f"opt_state.{k}" for k in leaf_paths(args["opt_state"])
    }
    assert keys == expected
    assert "params.layers.0.attn.q_proj.weight" in keys and "params.lm_head.weight" in keys
    assert (
        "opt_state.1.0.step" in keys
        and "opt_state.1.0.m.layers.1.ffn.w2.weight" in keys
        and "opt_state.1.2.step" in keys
    )
    header = json.loads(meta["flm"])
    assert header["step"] == 17 and header["format_version"] == ckpt_mod.FORMAT_VERSION
    # safetensors layout: 8-byte little-endian header length, then a JSON header, then raw bytes
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert 0 < n < len(data) and data[8:9] == b"{"
    json.loads(data[8 : 8 + n])
    assert b"\x80\x04" not in data[:2] and not data.startswith(b"PK")  # not a pickle / torch zip


def test_no_pickle_in_checkpoint_module():
    src = (ROOT / "flm" / "checkpoint.py").read_text()
    assert not re.search(r"\bimport pickle\b|\bpickle\.|torch\.load\(|torch\.save\(|weights_only", src)


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


def _leftovers(d: Path, name: str):
    return [p.name for p in d.iterdir() if p.name != name]


def test_failed_replace_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, params={"w": torch.ones(3)}, step=1)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_mod.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, params={"w": torch.zeros(3)}, step=2)
    assert path.read_bytes() == before and load_checkpoint(path).step == 1
    assert _leftovers(tmp_path, path.name) == []


def test_failed_write_midway_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, params={"w": torch.ones(3)}, step=1)
    before = path.read_bytes()
    real_save_file = ckpt_mod.st_save_file

    def half_then_interrupt(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise KeyboardInterrupt  # interrupted midway (BaseException, not just OSError)

    monkeypatch.setattr(ckpt_mod, "st_save_file", half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, params={"w": torch.zeros(3)}, step=2)
    assert path.read_bytes() == before
    assert _leftovers(tmp_path, path.name) == []


def test_save_creates_parent_dirs_and_overwrites(tmp_path):
    path = tmp_path / "a" / "b" / "c.safetensors"
    save_checkpoint(path, params={"w": torch.ones(1)}, step=1)
    save_checkpoint(path, params={"w": torch.ones(1)}, step=2)
    assert load_checkpoint(str(path)).step == 2 and os.listdir(path.parent) == ["c.safetensors"]


# --------------------------------------------------------------------------------------------
# Corrupt and mismatched files: ValueError naming the file (and the key)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def good(tmp_path):
    args, tx = _full()
    path = tmp_path / "good.safetensors"
    save_checkpoint(path, **args)
    return path, args, tx


def _broken(tmp_path, data: bytes) -> Path:
    p = tmp_path / "broken.safetensors"
    p.write_bytes(data)
    return p


@pytest.mark.parametrize(
    "mangle",
    [
        lambda d: d[: len(d) // 2],  # truncated in the data
        lambda d: d[:100],  # truncated in the header
        lambda d: d[:5],  # shorter than the length prefix
        lambda d: b"",
        lambda d: d[:8] + b"#" + d[9:],  # corrupted JSON header
        lambda d: (10**12).to_bytes(8, "little") + d[8:],  # absurd header length
        lambda d: np.random.default_rng(0).bytes(len(d)),  # random bytes
    ],
    ids=["trunc-data", "trunc-header", "trunc-prefix", "empty", "bad-json", "bad-length", "random"],
)
def test_corrupt_file_raises_value_error_naming_file(good, tmp_path, mangle):
    """From a path, from a file object, and (when the header is hit) through read_header."""
    path, _, _ = good
    data = path.read_bytes()
    bad = _broken(tmp_path, mangle(data))
    with pytest.raises(ValueError, match="broken.safetensors"):
        load_checkpoint(bad)
    with open(bad, "rb") as f, pytest.raises(ValueError, match="broken.safetensors"):
        load_checkpoint(f)
    end = 8 + int.from_bytes(data[:8], "little")
    if bad.read_bytes()[:end] == data[:end]:  # only the tensor data is hurt: read_header does not read it
        assert read_header(bad) == read_header(path)
    else:
        with pytest.raises(ValueError, match="broken.safetensors"):
            read_header(bad)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (b"[1, 2]", "JSON list, not an object"),
        (b'{"__metadata__": [1]}', "__metadata__ is a JSON list"),
        (b'{"__metadata__": {"flm": "{not json"}}', "corrupt flm metadata"),
        (b"{}", "no flm metadata"),
    ],
)
def test_a_bad_header_raises_value_error_naming_file_in_both_readers(tmp_path, header, message):
    """One safetensors header reader serves read_header (a path) and load_checkpoint of a file object."""
    bad = _broken(tmp_path, len(header).to_bytes(8, "little") + header)
    with pytest.raises(ValueError, match=f"broken.safetensors.*{message}"):
        read_header(bad)
    with open(bad, "rb") as f, pytest.raises(ValueError, match="broken.safetensors"):
        load_checkpoint(f)


def test_the_shared_header_reader_bounds_the_length_before_reading():
    """``flm._fs.safetensors_metadata`` (of the checkpoint and the manifest) refuses a length beyond
    the file or ``max_header`` without reading the header, and returns ``{}`` without metadata."""
    body = b'{"__metadata__": {"flm": "{}"}}'
    data = len(body).to_bytes(8, "little") + body
    assert safetensors_metadata(io.BytesIO(data), len(data)) == {"flm": "{}"}
    assert safetensors_metadata(io.BytesIO(data), len(data), max_header=len(body)) == {"flm": "{}"}
    empty = (2).to_bytes(8, "little") + b"{}"
    assert safetensors_metadata(io.BytesIO(empty), len(empty)) == {}

    class Unread(io.BytesIO):
        def read(self, n: int = -1) -> bytes:  # only the 8-byte length may be read
            assert n == 8
            return super().read(n)

    with pytest.raises(ValueError, match=f"header length {len(body)} exceeds the {len(body) - 1} bytes"):
        safetensors_metadata(Unread(data), len(data), max_header=len(body) - 1)
    with pytest.raises(ValueError, match=f"header length {len(body)} exceeds the file size {len(data) - 1}"):
        safetensors_metadata(Unread(data), len(data) - 1)


def test_missing_file_raises_value_error(tmp_path):
    with pytest.raises(ValueError, match="nope.safetensors"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_missing_key_against_like(good):
    path, args, tx = good
    params = init_params(CFG)
    params["extra"] = torch.zeros(2)
    with pytest.raises(ValueError, match=r"good\.safetensors.*params\.extra"):
        load_checkpoint(path, like={"params": params})


def test_unexpected_key_against_like(good):
    path, _, _ = good
    params = init_params(CFG)
    del params["lm_head"]
    with pytest.raises(ValueError, match=r"good\.safetensors.*params\.lm_head\.weight"):
        load_checkpoint(path, like={"params": params})


def test_shape_mismatch_against_like(good):
    path, _, tx = good
    other = init_params(CFG.replace(vocab_size=64))
    with pytest.raises(ValueError, match=r"good\.safetensors.*params\.lm_head\.weight"):
        load_checkpoint(path, like={"params": other})
    # optimiser-state shape mismatch names the opt_state key
    with pytest.raises(ValueError, match=r"good\.safetensors.*opt_state\.1\.0\.m\."):
        load_checkpoint(path, like={"opt_state": tx.init(other)})


def test_unexpected_prefix_and_non_flm_files(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "plain.safetensors"
    save_file({"weight": torch.ones(2)}, str(p))
    with pytest.raises(ValueError, match="plain.safetensors"):
        load_checkpoint(p)  # no flm metadata
    q = tmp_path / "odd.safetensors"
    save_file(
        {"params.w": torch.ones(2), "junk.x": torch.ones(1)},
        str(q),
        metadata={"flm": json.dumps({"format_version": 1})},
    )
    with pytest.raises(ValueError, match=r"odd\.safetensors.*junk\.x"):
        load_checkpoint(q)
    r = tmp_path / "future.safetensors"
    save_file({"params.w": torch.ones(2)}, str(r), metadata={"flm": json.dumps({"format_version": 99})})
    with pytest.raises(ValueError, match="format_version"):
        load_checkpoint(r)
    with pytest.raises(ValueError):
        load_checkpoint(q, like={"model": {}})


# --------------------------------------------------------------------------------------------
# Exact resume
# --------------------------------------------------------------------------------------------

RESUME_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, torch
    torch.set_num_threads(1)
    from flm import optim
    from flm.checkpoint import save_checkpoint, load_checkpoint
    from flm.data import get_batch
    from flm.model import TransformerConfig, init_params
    from flm.train import make_train_step

    mode, path, out, N, k = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    cfg = TransformerConfig(vocab_size=32, context_length=8, d_model=16, num_layers=2, num_heads=2, d_ff=32)
    dataset = np.random.default_rng(7).integers(0, cfg.vocab_size, 2000).astype(np.uint16)
    tx = optim.chain(optim.clip_by_global_norm(1.0),
                     optim.adamw(optim.cosine_schedule(1e-2, 1e-3, 3, N), weight_decay=0.1))
    step = make_train_step(cfg, tx)

    def run(params, state, g, start, stop):
        for _ in range(start, stop):
            x, y = get_batch(dataset, 4, cfg.context_length, "cpu", generator=g)
            params, state, _ = step(params, state, x, y)
        return params, state

    if mode in ("straight", "first"):
        g = torch.Generator().manual_seed(1234)
        params = init_params(cfg, torch.Generator().manual_seed(0))
        state = tx.init(params)
        params, state = run(params, state, g, 0, N if mode == "straight" else k)
        if mode == "first":
            save_checkpoint(path, params=params, opt_state=state, step=k, config=cfg, generator=g)
            sys.exit(0)
    else:  # "resume": a fresh process with fresh objects
        ck = load_checkpoint(path, like={"params": init_params(cfg), "opt_state": tx.init(init_params(cfg))})
        assert ck.step == k
        g = torch.Generator()
        g.set_state(ck.rng_state)
        params, state = run(ck.params, ck.opt_state, g, k, N)
    save_checkpoint(out, params=params, opt_state=state, step=N)
    """
)


def test_exact_resume_in_fresh_process_is_bitwise(tmp_path):
    """N steps straight == k steps, save, load in a new process, N − k more steps: bitwise."""
    N, k = 12, 5
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    ck, straight, resumed = (
        str(tmp_path / n) for n in ("k.safetensors", "straight.safetensors", "resumed.safetensors")
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def run(*a):
        subprocess.run([sys.executable, str(script), *a, str(N), str(k)], check=True, env=env, cwd=ROOT, timeout=300)

    # the straight run and the first half are independent: run them concurrently
    procs = [
        subprocess.Popen([sys.executable, str(script), m, ck, o, str(N), str(k)], env=env, cwd=ROOT)
        for m, o in (("straight", straight), ("first", "-"))
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    run("resume", ck, resumed)
    a, b = load_checkpoint(straight), load_checkpoint(resumed)
    assert a.step == b.step == N
    assert _equal(a.params, b.params) and _equal(a.opt_state, b.opt_state)
    assert int(b.opt_state[1][0].step) == N  # the saved NamedTuples come back (no like= needed)
    # and the run did train (params moved from init)
    init = init_params(CFG)
    assert not torch.equal(a.params["lm_head"]["weight"], init["lm_head"]["weight"])


def test_exact_resume_in_process_with_bytesio():
    """Same property with fresh Python objects in this process and a file object."""
    from flm.data import get_batch
    from flm.train import make_train_step

    N, k = 8, 3
    dataset = np.random.default_rng(3).integers(0, CFG.vocab_size, 1000).astype(np.int64)
    tx = optim.adamw(optim.cosine_schedule(1e-2, 1e-3, 2, N), weight_decay=0.1)
    step = make_train_step(CFG, tx)

    def run(params, state, g, n):
        for _ in range(n):
            x, y = get_batch(dataset, 2, CFG.context_length, "cpu", generator=g)
            params, state, _ = step(params, state, x, y)
        return params, state

    g = torch.Generator().manual_seed(5)
    p_straight, s_straight = run(init_params(CFG), tx.init(init_params(CFG)), g, N)
    g = torch.Generator().manual_seed(5)
    p, s = run(init_params(CFG), tx.init(init_params(CFG)), g, k)
    buf = io.BytesIO()
    save_checkpoint(buf, params=p, opt_state=s, step=k, generator=g)
    del p, s, g
    ck = load_checkpoint(
        io.BytesIO(buf.getvalue()), like={"params": init_params(CFG), "opt_state": tx.init(init_params(CFG))}
    )
    g2 = torch.Generator()
    g2.set_state(ck.rng_state)
    p_res, s_res = run(ck.params, ck.opt_state, g2, N - k)
    assert _equal(p_res, p_straight) and _equal(s_res, s_straight)
