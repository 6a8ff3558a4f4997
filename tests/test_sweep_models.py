"""``flm sweep`` keeps its models (issue 21 item 7): each ``OUT/lr_<lr>/`` is a run directory that
``flm generate``, ``flm eval`` and ``flm.load_run`` read and ``flm train --resume`` continues, as a
single run with that model's config would; a diverged model writes no NaN checkpoint."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

import flm
import flm.cli.sweep as sweep_cli
import flm.experiments.vmapped as vmapped
from flm.checkpoint import list_checkpoints, load_checkpoint, read_header
from flm.cli import main
from flm.config import RunConfig
from flm.model import TransformerConfig
from flm.train import TrainConfig, read_metrics
from flm.tree import tree_leaves, tree_structure, unstack

LRS = ("1e-3", "1e-2", "1e4")  # 1e4 diverges: NaN by step 10


def _sweep_argv(texts, out, *extra):
    train, valid = texts
    return [
        "sweep",
        "--preset",
        "tiny",
        "--train-text",
        str(train),
        "--valid-text",
        str(valid),
        "--out-dir",
        str(out),
        "--device",
        "cpu",
        "--num-workers",
        "1",
        "--max-iters",
        "10",
        "--eval-interval",
        "5",
        "--lrs",
        *LRS,
        *extra,
    ]


@pytest.fixture(scope="module")
def sweep(texts, tmp_path_factory):
    """A finished 10-step sweep of three learning rates, and the stacked final parameters and
    optimiser state the sweep held in memory (spied on as they are saved)."""
    out = tmp_path_factory.mktemp("sweep") / "sw"
    held = {}
    real = vmapped._save_final

    def spy(ckpts, labels, params, opt_state, *args, **kw):
        held.update(labels=list(labels), params=params, opt_state=opt_state)
        return real(ckpts, labels, params, opt_state, *args, **kw)

    lines = held["log"] = []
    real_log = sweep_cli.log

    def log(msg):
        lines.append(msg)
        real_log(msg)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(vmapped, "_save_final", spy)
        mp.setattr(sweep_cli, "log", log)
        assert main(_sweep_argv(texts, out)) == 0
    return out, held


def test_each_model_directory_is_a_run_that_generate_eval_and_load_run_read(sweep, texts, capsys):
    out, held = sweep
    results = {r["label"]: r for r in json.loads((out / "sweep.json").read_text())["results"]}
    assert list(results) == held["labels"] == ["lr_0.001", "lr_0.01", "lr_10000"]
    for i, label in enumerate(held["labels"][:2]):
        d = out / label
        r = results[label]
        assert r["checkpoint"] == "ckpt_0000010.safetensors" and r["best_checkpoint"] == "best.safetensors"
        # config.json is a valid single-run config with this model's lr (min_lr at the base ratio).
        cfg = RunConfig.from_dict(json.loads((d / "config.json").read_text()))
        base = RunConfig.resolve("tiny").train
        assert cfg.train.lr == r["lr"] and cfg.train.min_lr == pytest.approx(r["lr"] * base.min_lr / base.lr)
        # load_run gives this model's final parameters (its best is the final step here), bitwise.
        params, config, tok = flm.load_run(d)
        assert config == cfg.model and tok.vocab_size <= config.vocab_size
        final = unstack(held["params"])[i]
        assert tree_structure(params) == tree_structure(final)
        assert all(torch.equal(a, b) for a, b in zip(tree_leaves(params), tree_leaves(final), strict=True))
        # The final checkpoint holds its own slice of the stacked optimiser state, in a single run's structure.
        ckpt = load_checkpoint(d / "ckpt_0000010.safetensors")
        state = unstack(held["opt_state"])[i]
        single = flm.train.make_optimizer(cfg.train).init(params)
        assert tree_structure(ckpt.opt_state) == tree_structure(state) == tree_structure(single)
        assert all(torch.equal(a, b) for a, b in zip(tree_leaves(ckpt.opt_state), tree_leaves(state), strict=True))
        assert ckpt.rng_state is not None and ckpt.metadata["tokenizer_fingerprint"] == tok.fingerprint()
        capsys.readouterr()
        assert main(["generate", str(d), "--max-new-tokens", "5", "--device", "cpu", "--no-stream"]) == 0
        assert main(["eval", str(d), "--text", str(texts[1]), "--device", "cpu", "--json"]) == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["checkpoint"] == str(d / "best.safetensors") and np.isfinite(res["loss"])


def test_a_diverged_model_writes_no_nan_checkpoint_and_says_so(sweep, capsys):
    """lr 1e4 is NaN by step 10 (its step-5 evaluation was still finite): no final checkpoint, its
    step-5 best kept (generate reads it), and --resume says there is nothing to continue."""
    out, held = sweep
    assert (
        "| lr_10000 |" in held["log"][-1] and "best.safetensors only (diverged: no final checkpoint)" in held["log"][-1]
    )
    r = json.loads((out / "sweep.json").read_text())["results"][2]
    d = out / r["label"]
    assert r["diverged"] and r["checkpoint"] is None and not list_checkpoints(d)
    assert r["best_checkpoint"] == "best.safetensors" and r["best_step"] == 5
    assert flm.tree.all_finite(load_checkpoint(d / "best.safetensors").params)
    assert main(["generate", str(d), "--max-new-tokens", "3", "--device", "cpu", "--no-stream"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--out-dir", str(d), "--max-iters", "12"]) == 2
    assert "holds no checkpoint to resume from" in capsys.readouterr().err


def test_resume_continues_a_sweep_model_as_a_single_run_would(sweep, texts, tmp_path, capsys, monkeypatch):
    """``flm train --resume --out-dir OUT/lr_0.01 --max-iters 12`` continues at step 10 and gives what
    a single run with that model's config.json gives, trained 10 steps and resumed to 12. Not
    bitwise: the vmapped step batches each matmul over the models and always runs flm's attention
    kernel (the single run's "auto" may pick PyTorch's fused one), so sums round differently (we
    measured relative differences below 1e-6 in the losses)."""
    out, _ = sweep
    saved = json.loads((out / "lr_0.01" / "config.json").read_text())
    assert saved["data"]["train_text"] == os.path.relpath(texts[0], os.path.realpath(out / "lr_0.01"))
    swept = tmp_path / "lr_0.01"
    shutil.copytree(out / "lr_0.01", swept)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # resumed from another working directory
    capsys.readouterr()
    assert main(["train", "--resume", "--out-dir", str(swept), "--max-iters", "12", "--max-new-tokens", "0"]) == 0
    assert "resumed from ckpt_0000010.safetensors at step 10" in capsys.readouterr().out
    single = tmp_path / "single"
    config = str(out / "lr_0.01" / "config.json")
    assert main(["train", "--config", config, "--out-dir", str(single), "--max-new-tokens", "0"]) == 0
    assert main(["train", "--resume", "--out-dir", str(single), "--max-iters", "12", "--max-new-tokens", "0"]) == 0
    a, b = read_metrics(swept / "metrics.jsonl"), read_metrics(single / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] and a[-1]["step"] == 12
    for x, y in zip(a, b, strict=True):
        for key in ("tokens", "train_loss", "lr", "grad_norm", "val_loss"):
            assert (x[key] is None) == (y[key] is None) and (
                x[key] is None or x[key] == pytest.approx(y[key], rel=1e-5)
            )
    pa, pb = load_checkpoint(swept / "ckpt_0000012.safetensors"), load_checkpoint(single / "ckpt_0000012.safetensors")
    assert pa.step == pb.step == 12
    for x, y in zip(tree_leaves(pa.params), tree_leaves(pb.params), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


CONFIG = TransformerConfig(vocab_size=48, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32)


def test_a_model_that_diverges_after_its_best_keeps_its_best(tmp_path, monkeypatch):
    """vmapped_train: model 1's parameters turn NaN at step 6, after its step-4 evaluation; it keeps
    best.safetensors from step 4, writes no final checkpoint, and the summary and log say so."""
    real = vmapped.make_vmapped_train_step
    calls = {"n": 0}

    def poisoned(*args, **kw):
        step = real(*args, **kw)

        def wrapped(params, opt_state, *rest):
            params, opt_state, m = step(params, opt_state, *rest)
            calls["n"] += 1
            if calls["n"] == 6:
                params = flm.tree.tree_map(lambda t: torch.cat([t[:1], torch.full_like(t[1:], float("nan"))]), params)
            return params, opt_state, m

        return wrapped

    monkeypatch.setattr(vmapped, "make_vmapped_train_step", poisoned)
    rng = np.random.default_rng(0)
    tokens = [rng.integers(0, CONFIG.vocab_size, n).astype(np.uint16) for n in (2000, 400)]
    train = TrainConfig(batch_size=4, max_iters=8, lr=1e-2, min_lr=1e-3, warmup_iters=2, eval_interval=4, device="cpu")
    lines = []
    res = vmapped.vmapped_train(
        RunConfig(model=CONFIG, train=train), *tokens, tmp_path, [{"label": "a"}, {"label": "b"}], log=lines.append
    )
    assert [r["checkpoint"] for r in res] == ["ckpt_0000008.safetensors", None]
    assert res[1]["best_checkpoint"] == "best.safetensors" and res[1]["best_step"] == 4 and res[1]["diverged"]
    assert read_header(tmp_path / "b" / "best.safetensors")["step"] == 4 and not list_checkpoints(tmp_path / "b")
    assert any("b: diverged" in s and "best.safetensors (step 4) is kept" in s for s in lines)


def test_sweep_resume_names_the_per_model_resume(texts, tmp_path, capsys):
    """A sweep does not resume as a whole; the error names how to continue one of its models."""
    assert main([*_sweep_argv(texts, tmp_path / "sw"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"flm train --resume --out-dir {tmp_path / 'sw'}/lr_0.001 --max-iters N" in err
    assert not (tmp_path / "sw").exists()


def test_without_hard_links_a_resume_encodes_the_tokens_again(texts, tmp_path, capsys, monkeypatch):
    """A file system that refuses hard links: the model's directory gets no token files (a warning
    says so) and flm train --resume encodes them again from the texts."""

    def refuse(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(sweep_cli.os, "link", refuse)
    argv = _sweep_argv(texts, tmp_path / "sw")
    argv[argv.index("--lrs") + 1 :] = ["1e-2"]
    argv[argv.index("--max-iters") + 1] = "2"
    assert main(argv) == 0
    d = tmp_path / "sw" / "lr_0.01"
    assert "no links to the train token files" in capsys.readouterr().out
    assert not list(d.glob("*.tokens*")) and [p.name for p in d.glob("*.stamp.json")] == ["tokenizer.stamp.json"]
    assert main(["train", "--resume", "--out-dir", str(d), "--max-iters", "3", "--max-new-tokens", "0"]) == 0
    out = capsys.readouterr().out
    assert "encode train: " in out and "encode train: cached" not in out and "resumed from ckpt_0000002" in out


def test_the_vmapped_sweep_refuses_cuda_graph_modes_before_writing(tmp_path):
    """CUDA graphs need a donating step, which the vmapped sweep does not have: a graph mode is
    refused up front (nothing written), as is a mode for an uncompiled step."""
    rng = np.random.default_rng(0)
    tokens = [rng.integers(0, CONFIG.vocab_size, n).astype(np.uint16) for n in (2000, 400)]
    base = dict(batch_size=4, max_iters=2, warmup_iters=0, device="cpu", dtype="float32", tf32=False)
    out = tmp_path / "sw"
    for train, says in (
        (TrainConfig(compile=True, compile_mode="reduce-overhead", **base), "needs a donating step"),
        (TrainConfig(compile=False, compile_mode="max-autotune-no-cudagraphs", **base), "compile is off"),
    ):
        with pytest.raises(ValueError, match=says):
            vmapped.vmapped_train(RunConfig(model=CONFIG, train=train), *tokens, out, [{"label": "a"}])
        assert not out.exists()
