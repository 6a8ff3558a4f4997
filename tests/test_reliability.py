"""Nothing a user does destroys a run, and every failure is one clear line (issue 10).

Each test reproduces one way a run was lost, resumed wrongly, gave a silently wrong result, hung or
ended in a traceback, and checks the fix: the run survives, ``--resume`` continues from the last
good checkpoint, and the command prints ``error: …`` on one line with exit code 2 (usage) or 1
(runtime), or 130 for Ctrl-C.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import multiprocessing
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import train_argv
from safetensors.torch import load_file, save_file

import flm.train.loop
from flm.checkpoint import list_checkpoints, load_checkpoint, read_header, save_checkpoint
from flm.cli import main
from flm.model import TransformerConfig
from flm.train import NonFiniteLossError, TrainConfig, plot_metrics, read_metrics, train_loop
from flm.tree import all_finite, tree_leaves

ROOT = Path(__file__).resolve().parent.parent


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and p.name != ".lock"}


# ----------------------------------------------------------------- 1. resume before the first evaluation

CFG = TransformerConfig(vocab_size=48, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32)


@pytest.fixture
def tokens():
    rng = np.random.default_rng(0)
    return rng.integers(0, 48, 2000).astype(np.uint16), rng.integers(0, 48, 400).astype(np.uint16)


def _loop(**kw):
    base = dict(
        batch_size=4,
        max_iters=12,
        lr=1e-2,
        min_lr=1e-3,
        warmup_iters=2,
        eval_interval=8,
        checkpoint_interval=4,
        log_interval=5,
        keep_checkpoints=5,
        device="cpu",
    )
    return TrainConfig(**{**base, **kw})


def _interrupt_at(monkeypatch, n):
    real, calls = flm.train.loop.get_batch, {"n": 0}

    def interrupting(*a, **k):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(flm.train.loop, "get_batch", interrupting)
    return real


@pytest.mark.parametrize("kw", [{}, {"eval_interval": 0}])
def test_ctrl_c_before_the_first_eval_and_log_then_resume(tokens, tmp_path, monkeypatch, kw):
    """Regression: --resume crashed on best_val_loss=None; plotting crashed without metrics.jsonl."""
    real = _interrupt_at(monkeypatch, 4)  # 3 steps done: no log line, no evaluation yet
    s = train_loop(CFG, _loop(**kw), *tokens, tmp_path, log=lambda m: None)
    assert s["status"] == "interrupted" and s["step"] == 3 and read_metrics(tmp_path / "metrics.jsonl") == []
    assert plot_metrics(tmp_path / "missing.jsonl", tmp_path / "x.png") is False
    assert read_header(tmp_path / "ckpt_0000003.safetensors")["metadata"]["best_val_loss"] is None
    monkeypatch.setattr(flm.train.loop, "get_batch", real)
    s = train_loop(CFG, _loop(**kw), *tokens, tmp_path, resume=True, log=lambda m: None)
    assert s["status"] == "done" and s["step"] == 12


def test_ctrl_c_exits_130_with_a_checkpoint_and_the_hint(texts, tmp_path, monkeypatch, capsys):
    _interrupt_at(monkeypatch, 3)
    out = tmp_path / "run"
    assert main(train_argv(texts, out)) == 130
    captured = capsys.readouterr()
    assert "continue with: flm train --resume" in captured.out and captured.err.strip() == "error: interrupted"
    assert (out / "ckpt_0000002.safetensors").exists()


def test_resume_after_a_nan_stop_starts_from_the_last_good_checkpoint(tokens, tmp_path, monkeypatch):
    real_step = flm.train.loop.make_train_step

    def poisoned(*a, **kw):
        step, calls = real_step(*a, **kw), {"n": 0}

        def wrapped(params, opt_state, x, y):
            params, opt_state, m = step(params, opt_state, x, y)
            calls["n"] += 1
            if calls["n"] == 6:  # the update of step 6 makes the params NaN; its loss is still finite
                params = {**params, "lm_head": {"weight": params["lm_head"]["weight"] * float("nan")}}
            return params, opt_state, m

        return wrapped

    monkeypatch.setattr(flm.train.loop, "make_train_step", poisoned)
    with pytest.raises(NonFiniteLossError) as err:
        train_loop(CFG, _loop(log_interval=1), *tokens, tmp_path, log=lambda m: None)
    # Step 7's loss is NaN; the checkpoint at step 8 is never written; the message names step 4's.
    assert "step 7" in str(err.value) and "ckpt_0000004.safetensors" in str(err.value)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_0000004.safetensors"]
    monkeypatch.setattr(flm.train.loop, "make_train_step", real_step)
    s = train_loop(CFG, _loop(log_interval=1), *tokens, tmp_path, resume=True, log=lambda m: None)
    assert s["status"] == "done" and all_finite(load_checkpoint(list_checkpoints(tmp_path)[-1]).params)


def test_non_finite_params_are_never_checkpointed(tokens, tmp_path, monkeypatch):
    """Regression: the loss is computed before the update, so a NaN update was saved at a checkpoint
    step with a finite loss, and --resume picked it."""
    real_step = flm.train.loop.make_train_step

    def poisoned(*a, **kw):
        step, calls = real_step(*a, **kw), {"n": 0}

        def wrapped(params, opt_state, x, y):
            params, opt_state, m = step(params, opt_state, x, y)
            calls["n"] += 1
            if calls["n"] == 8:  # NaN params exactly at the checkpoint step
                params = {**params, "lm_head": {"weight": params["lm_head"]["weight"] * float("nan")}}
            return params, opt_state, m

        return wrapped

    monkeypatch.setattr(flm.train.loop, "make_train_step", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"by step 8.*ckpt_0000004"):
        train_loop(CFG, _loop(), *tokens, tmp_path, log=lambda m: None)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_0000004.safetensors"]


def test_resume_skips_a_corrupt_or_non_finite_newest_checkpoint(tokens, tmp_path):
    train_loop(CFG, _loop(max_iters=8), *tokens, tmp_path, log=lambda m: None)
    newest = tmp_path / "ckpt_0000008.safetensors"
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0xFF  # a flipped data byte: caught by the checksum
    newest.write_bytes(bytes(data))
    logs = []
    s = train_loop(CFG, _loop(max_iters=8), *tokens, tmp_path, resume=True, log=logs.append)
    assert any("skipping ckpt_0000008" in m and "checksum" in m for m in logs)
    assert any("resumed from ckpt_0000004" in m for m in logs) and s["step"] == 8


# ----------------------------------------------------------------- 2./3. nothing saved is lost


def test_a_new_run_refuses_a_run_dir_that_holds_a_run(tiny_run, texts, tmp_path, capsys):
    """Regression: a run without --resume deleted every *.safetensors (best included) first."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = snapshot(run)
    assert main(train_argv(texts, run)) == 2
    assert "already holds a run" in one_line_error(capsys) and snapshot(run) == before


def test_overwrite_says_what_it_removes(tiny_run, texts, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    assert main(train_argv(texts, run, "--overwrite", "--max-iters", "5")) == 0
    out = capsys.readouterr().out
    assert "--overwrite: removing" in out and "best.safetensors" in out
    assert [p.name for p in list_checkpoints(run)] == ["ckpt_0000005.safetensors"]
    assert main(train_argv(texts, run, "--overwrite", "--resume")) == 2
    assert "not both" in one_line_error(capsys)


def test_a_new_run_refuses_files_it_did_not_write(texts, tmp_path, capsys):
    """Regression: a directory with the user's own vocab.json/config.json (no checkpoints yet) was
    silently overwritten. A file at a name flm writes is refused with or without --overwrite (issue
    18, case 5); other files block a new run unless --overwrite, which starts beside them and keeps them."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "vocab.json").write_text('{"mine": 0}')
    (run / "notes.txt").write_text("keep me")
    before = snapshot(run)
    for extra in ([], ["--overwrite"]):
        assert main(train_argv(texts, run, "--max-iters", "2", *extra)) == 2
        err = one_line_error(capsys)
        assert "holds vocab.json, which flm did not write" in err and "move them" in err and snapshot(run) == before
    (run / "vocab.json").unlink()
    assert main(train_argv(texts, run, "--max-iters", "2")) == 2
    assert "files flm did not write (notes.txt)" in one_line_error(capsys)
    assert main(train_argv(texts, run, "--max-iters", "2", "--overwrite")) == 0
    assert (run / "notes.txt").read_text() == "keep me" and (run / "tokenizer.stamp.json").exists()
    assert main(train_argv(texts, run, "--max-iters", "4", "--overwrite")) == 0  # flm's own files: fine


def test_tokenize_train_never_replaces_a_runs_tokenizer(tiny_run, texts, tmp_path, capsys):
    """Regression: ``flm tokenize train … --out-dir RUN`` overwrote a trained run's vocab.json and
    merges.txt, and every later command refused the run."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = snapshot(run)
    argv = ["tokenize", "train", str(texts[0]), "--vocab-size", "300", "--out-dir", str(run)]
    assert main(argv) == 2
    assert "holds a trained run" in one_line_error(capsys) and snapshot(run) == before
    assert main([*argv, "--overwrite"]) == 2 and snapshot(run) == before
    capsys.readouterr()
    fresh = tmp_path / "tok"
    argv[-1] = str(fresh)
    assert main(argv) == 0
    assert main(argv) == 2 and "pass --overwrite" in one_line_error(capsys)
    assert main([*argv, "--overwrite"]) == 0


def test_an_experiment_refuses_a_training_runs_directory(tiny_run, texts, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = snapshot(run)
    argv = ["experiment", "generate", "--preset", "tiny", "--train-text", str(texts[0])]
    assert main([*argv, "--valid-text", str(texts[1]), "--out-dir", str(run)]) == 2
    assert "holds a training run" in one_line_error(capsys) and snapshot(run) == before


@pytest.mark.parametrize("change", [["--vocab-size", "320"], ["--num-heads", "4"], ["--d-ff", "96"]])
def test_a_failed_resume_writes_nothing(tiny_run, texts, tmp_path, capsys, change):
    """Regression: a resume with another --vocab-size overwrote vocab.json, merges.txt, the token
    files and config.json before failing on the shapes."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = snapshot(run)
    assert main(train_argv(texts, run, "--resume", *change)) == 2
    err = one_line_error(capsys)
    assert "other model settings" in err and change[0][2:].replace("-", "_") in err
    assert snapshot(run) == before


def test_a_resume_that_would_retrain_the_tokenizer_writes_nothing(tiny_run, texts, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    other = tmp_path / "other.txt"
    other.write_text(texts[0].read_text()[:50_000])
    before = snapshot(run)
    assert main(train_argv((other, texts[1]), run, "--resume")) == 2
    assert "tokenizer would be retrained" in one_line_error(capsys) and snapshot(run) == before


# ----------------------------------------------------------------- 5. one process per run directory


def _hold_lock(path, ready, release):
    from flm._io import run_lock

    with run_lock(path):
        ready.set()
        release.wait(60)


def test_a_second_process_on_the_same_run_dir_fails_naming_the_holder(texts, tmp_path, capsys):
    run = tmp_path / "run"
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(run), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        assert main(train_argv(texts, run)) == 1
        err = one_line_error(capsys)
        assert f"pid {holder.pid}" in err and "in use" in err
        assert not (run / "metrics.jsonl").exists() and not list_checkpoints(run)
    finally:
        release.set()
        holder.join(60)


def test_a_finished_run_leaves_no_lock_file(tiny_run):
    """Regression: ``RUN/.lock`` (holding a pid) stayed behind after a finished run (issue 21, 13)."""
    assert not (tiny_run / ".lock").exists()
    assert (tiny_run / "results.json").is_file()


def test_the_lock_file_of_another_holder_is_never_removed(tmp_path, monkeypatch):
    """The lock file is removed only by its holder, while it holds it: a process refused by the
    lock leaves the holder's file as it is (same inode, same pid); a process that locked a file
    its holder had removed meanwhile (it opened ``.lock`` before the removal) sees that the name
    is gone and starts over on the current file, so it never holds a lock beside the real holder;
    the holder removes its file when it lets go."""
    import flm._io
    from flm._io import RunLockedError, run_lock

    run = tmp_path / "run"
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(run), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        inode = (run / ".lock").stat().st_ino
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            with run_lock(run):
                pass
        assert (run / ".lock").stat().st_ino == inode and (run / ".lock").read_text() == str(holder.pid)
        # A file opened before its holder removed it: here an unlinked file stands in for it.
        (run / "removed").write_text("")
        stale = os.open(run / "removed", os.O_RDWR)
        (run / "removed").unlink()
        real_open, opened = os.open, []

        def open_(path, flags, mode=0o777, **kw):
            if Path(path).name == ".lock" and not opened:
                opened.append(path)
                return os.dup(stale)
            return real_open(path, flags, mode, **kw)

        monkeypatch.setattr(flm._io.os, "open", open_)
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            with run_lock(run):
                pass
        monkeypatch.undo()
        os.close(stale)
        assert opened and (run / ".lock").stat().st_ino == inode
    finally:
        release.set()
        holder.join(60)
    assert holder.exitcode == 0 and not (run / ".lock").exists()
    with run_lock(run):  # free again: taken, and removed when released
        assert (run / ".lock").read_text() == str(os.getpid())
    assert not (run / ".lock").exists()


# ----------------------------------------------------------------- 6. checked up front


@pytest.mark.parametrize(
    "valid", ["", "tiny", "Once upon a time there was a cat."]
)  # the last: ≥ 33 bytes, < 33 tokens
def test_a_too_short_validation_text_fails_before_anything_is_written(texts, tmp_path, capsys, valid):
    v = tmp_path / "valid.txt"
    v.write_text(valid)
    run = tmp_path / "run"
    assert main(train_argv((texts[0], v), run)) == 2
    assert "context_length + 1" in one_line_error(capsys)
    assert not run.exists() or not any(run.iterdir())


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--eval-batches", "0"], "--eval-batches"),
        (["--grad-clip", "-1"], "--grad-clip"),
        (["--tokens", "-100"], "--tokens"),
        (["--tokens", "10"], "less than one step"),
        (["--tokens", "1e5", "--max-iters", "3"], "not both"),
        (["--batch-size", "6", "--grad-accum-steps", "4"], "--grad-accum-steps"),
        (["--lr", "nan"], "--lr"),
        (["--max-new-tokens", "99999999999"], "--max-new-tokens"),
        (["--device", "cuda"], "CUDA is not available"),
        (["--device", "tpu7"], "--device"),
        (["--betas", "0.9", "1.5"], "--betas"),
        (["--top-p", "0"], "--top-p"),
    ],
)
def test_bad_settings_are_one_line_usage_errors_before_any_work(texts, tmp_path, capsys, flags, match):
    if "--device" in flags and flags[1] == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    run = tmp_path / "run"
    assert main(train_argv(texts, run, *flags)) == 2
    assert match in one_line_error(capsys)
    assert not run.exists()  # the device is checked before the tokenizer stage, everything before any write


def test_missing_texts_and_bad_out_dir(texts, tmp_path, capsys):
    assert main(train_argv((tmp_path / "nope.txt", texts[1]), tmp_path / "r")) == 2
    assert "no such file" in one_line_error(capsys)
    f = tmp_path / "file"
    f.write_text("x")
    assert main(train_argv(texts, f)) == 2
    assert "not a directory" in one_line_error(capsys)
    assert main(["train", "--preset", "tiny", "--train-text", str(texts[0])]) == 2
    assert "both" in one_line_error(capsys)


# ----------------------------------------------------------------- 7.–9. checkpoints are checked


def _rewrite_config(path: Path, edit) -> None:
    """Change the config stored in a checkpoint's header, keeping its tensors (and checksum)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    header = json.loads(meta["flm"])
    edit(header["config"]["model"])
    save_file(load_file(str(path)), str(path), metadata={"flm": json.dumps(header)})


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.update(vocab_size=500), "the config implies (500, 32)"),
        (lambda m: m.update(d_ff=96), "implies (96, 32)"),
        (lambda m: m.update(num_layers=3), "'layers.2."),
        (lambda m: m.update(context_length=2**40), "context_length"),
        (lambda m: m.update(d_model=10**9), "implies (1000000000"),
        (lambda m: m.update(bogus=1), "bogus"),
    ],
)
def test_a_checkpoint_whose_config_does_not_match_its_tensors_is_refused(tiny_run, tmp_path, capsys, edit, match):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    _rewrite_config(run / "best.safetensors", edit)
    assert main(["generate", str(run), "--max-new-tokens", "3"]) == 1
    assert match in one_line_error(capsys)


def test_another_runs_tokenizer_is_refused(tiny_run, texts, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    other = tmp_path / "other"
    assert main(["tokenize", "train", str(texts[1]), "--vocab-size", "300", "--out-dir", str(other)]) == 0
    for name in ("vocab.json", "merges.txt"):  # copied over by hand: same size, other merges
        shutil.copy(other / name, run / name)
    capsys.readouterr()
    assert main(["generate", str(run), "--max-new-tokens", "3"]) == 1
    assert "not the one best.safetensors was trained with" in one_line_error(capsys)


def test_flipped_data_bytes_are_caught_by_the_checksum(tiny_run, tmp_path, capsys):
    path = tmp_path / "best.safetensors"
    shutil.copy(tiny_run / "best.safetensors", path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    load_checkpoint(path)  # the library default does not verify (see its docstring for the cost)
    with pytest.raises(ValueError, match="checksum"):
        load_checkpoint(path, verify=True)
    shutil.copy(tiny_run / "vocab.json", tmp_path)
    shutil.copy(tiny_run / "merges.txt", tmp_path)
    assert main(["generate", str(path), "--max-new-tokens", "2"]) == 1
    assert "corrupt" in one_line_error(capsys)


# ----------------------------------------------------------------- 13. one line, never a traceback


def test_user_errors_in_every_subcommand_are_one_line(tiny_run, tmp_path, capsys):
    bad_vocab = tmp_path / "badtok"
    shutil.copytree(tiny_run, bad_vocab)
    (bad_vocab / "vocab.json").write_text("{not json")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 100)
    cases = [
        (["generate", str(tmp_path / "missing")], 2, "does not exist"),
        (["generate", str(garbage)], 1, "not a valid safetensors"),
        (["generate", str(bad_vocab)], 1, "vocab.json"),
        (["generate", str(tiny_run), "--top-p", "2"], 2, "top-p"),
        (["generate", str(tiny_run), "--max-new-tokens", "5000000"], 2, "--max-new-tokens"),
        (["eval", str(tiny_run), "--text", str(tmp_path / "none.txt")], 2, "no such file"),
        (["export-hf", str(tiny_run), "--out", str(tiny_run)], 2, "not an empty directory"),
        (["tokenize", "encode", str(tmp_path / "none.txt"), "o", "--tokenizer", str(tiny_run)], 2, "no such file"),
        (
            ["tokenize", "train", str(tiny_run / "config.json"), "--vocab-size", "10", "--out-dir", str(tmp_path)],
            2,
            "--vocab-size 10 is smaller than",
        ),
        (["train", "--config", str(tmp_path / "none.toml")], 2, "cannot read config file"),
        (["train", "--preset", "nope"], 2, "unknown preset"),
        (["train", "--d-model"], 2, "expected one argument"),
        (["frobnicate"], 2, "invalid choice"),
    ]
    for argv, code, match in cases:
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own usage errors
            rc = e.code
        assert rc == code, (argv, capsys.readouterr())
        assert match in one_line_error(capsys), argv


def test_debug_shows_the_traceback(tiny_run, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="does not exist"):
        main(["generate", str(tmp_path / "missing"), "--debug"])
    monkeypatch.setenv("FLM_DEBUG", "1")
    with pytest.raises(ValueError):
        main(["generate", str(tmp_path / "missing")])


def test_an_unwritable_run_dir_is_one_line(texts, tmp_path, capsys, monkeypatch):
    """A run directory the user cannot write: one line naming the file (simulated, since the test
    may run as root, whom permissions do not stop)."""
    import flm._fs

    run = tmp_path / "ro"
    real = flm._fs.tempfile.mkstemp

    def denied(*a, dir=None, **k):
        if dir is not None and Path(dir).resolve() == run.resolve():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(run))
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(flm._fs.tempfile, "mkstemp", denied)
    assert main(train_argv(texts, run)) == 1
    err = one_line_error(capsys)
    assert "permission denied" in err and str(run) in err and "check the permissions" in err


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tiny_run, texts, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    import flm._fs

    real = flm._fs.os.replace

    def full(src, dst):
        if str(dst).endswith(".safetensors"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real(src, dst)

    monkeypatch.setattr(flm._fs.os, "replace", full)
    assert main(train_argv(texts, run, "--resume", "--max-iters", "60")) == 1
    err = one_line_error(capsys)
    assert "no space left on device" in err and "free some space" in err
    assert load_checkpoint(run / "ckpt_0000040.safetensors", verify=True).step == 40
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_a_torn_metrics_line_is_dropped_on_resume_with_a_warning(tiny_run, texts, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "ckpt_0000040.safetensors").unlink()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 45, "train_lo')  # killed mid-write
    assert main(train_argv(texts, run, "--resume")) == 0
    err = capsys.readouterr().err
    assert "metrics.jsonl" in err and "torn last line" in err
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(5, 41, 5))


def test_garbage_bytes_in_metrics_do_not_block_resume(tiny_run, texts, tmp_path, capsys):
    """Regression (issue 18): garbage bytes at the end of metrics.jsonl (what a crash can leave)
    made --resume fail with "'utf-8' codec can't decode byte 0x87", naming no file; the garbled
    tail is now dropped with a warning naming the file, since the checkpoint is the source of truth."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "ckpt_0000040.safetensors").unlink()
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 45, "tr\x87\x00\xff\n\x00\x00\x87garbage\n\xfe{"step": 5')
    assert main(train_argv(texts, run, "--resume")) == 0
    err = capsys.readouterr().err
    assert f"{run / 'metrics.jsonl'}: dropping a garbled tail" in err and "codec" not in err
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == list(range(5, 41, 5))


def test_corrupt_metrics_lines_name_the_file_and_resume_drops_them(tmp_path):
    from flm.train.metrics import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n\x87\x87\n{"step": 2}\n[3]\n{"step": 4}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: corrupt metrics line \(not UTF-8"):
        read_metrics(path)
    warnings = []
    assert [r["step"] for r in read_metrics(path, warn=warnings.append, skip_corrupt=True)] == [1, 2, 4]
    assert len(warnings) == 2 and all(str(path) in w for w in warnings)
    truncate_metrics(path, 2)
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


# ----------------------------------------------------------------- 14. housekeeping


def test_orphan_temp_files_are_removed_and_files_get_ordinary_permissions(tiny_run, texts, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    orphan = run / ".ckpt_0000060.safetensors.abc123.tmp"
    orphan.write_bytes(b"half a checkpoint")
    rust_tmp = run / ".tmpHAOWn2"  # safetensors' writer (Rust tempfile) killed mid-checkpoint
    rust_tmp.write_bytes(b"half a checkpoint")
    parts = run / ".train.tokens.parts.x1y2.tmp"  # a killed encode_file's work directory
    parts.mkdir()
    (parts / "000000.bin").write_bytes(b"\0" * 64)
    keep = run / ".notes.txt"
    keep.write_text("mine")
    assert main(train_argv(texts, run, "--resume")) == 0
    assert not orphan.exists() and "removed .ckpt_0000060" in capsys.readouterr().out
    assert not parts.exists() and not rust_tmp.exists() and keep.read_text() == "mine"
    fresh = tmp_path / "fresh"
    old = os.umask(0o022)
    try:
        assert main(train_argv(texts, fresh, "--max-iters", "2")) == 0
    finally:
        os.umask(old)
    for name in ("vocab.json", "merges.txt", "train.tokens", "train.tokens.json", "config.json", "best.safetensors"):
        assert stat.S_IMODE((fresh / name).stat().st_mode) == 0o644, name


def test_a_killed_train_leaves_a_resumable_run(texts, tmp_path):
    """A real SIGKILL mid-training (no Python cleanup at all): the next --resume continues."""
    run = tmp_path / "run"
    code = (
        "import sys, flm.train.loop as L\n"
        "from flm.cli import main\n"
        "real = L.get_batch\n"
        "n = {'c': 0}\n"
        "def kill(*a, **k):\n"
        "    n['c'] += 1\n"
        "    if n['c'] == 25:\n"
        "        import os, signal; os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(*a, **k)\n"
        "L.get_batch = kill\n"
        f"main({train_argv(texts, run)!r})\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=300)
    assert r.returncode == -9
    assert [p.name for p in list_checkpoints(run)] == ["ckpt_0000020.safetensors"]
    assert main(train_argv(texts, run, "--resume")) == 0
    assert load_checkpoint(list_checkpoints(run)[-1]).step == 40


def test_save_checkpoint_writes_nan_only_when_asked_and_checkpointer_refuses_nan(tmp_path):
    """The low-level save writes NaN only with allow_nonfinite=True; the training loop's Checkpointer
    refuses it with the step's own message."""
    from flm.train.checkpointer import Checkpointer

    save_checkpoint(tmp_path / "raw.safetensors", params={"w": torch.tensor([float("nan")])}, allow_nonfinite=True)
    c = Checkpointer(tmp_path, interval=1, keep=1, run_config={})
    with pytest.raises(NonFiniteLossError, match="no checkpoint was written yet"):
        c.save(1, {"w": torch.tensor([float("nan")])}, ())
    assert not list_checkpoints(tmp_path)


@pytest.mark.parametrize("best", [b"\x10\x00\x00\x00\x00\x00\x00\x00{not json", {"val_loss": [1.0]}])
def test_resume_warns_about_a_corrupt_best_checkpoint_and_names_it(tmp_path, best):
    """Regression (issue 20 item 8): a corrupt best.safetensors header, or one whose val_loss is
    not a number, was silently ignored on resume; it is still ignored, with a warning naming it."""
    from flm.train.checkpointer import BEST_NAME, Checkpointer

    params = {"w": torch.ones(2)}
    c = Checkpointer(tmp_path, interval=1, keep=1, run_config={})
    c.save_best(1, params, 2.5)
    c.save(2, params, ())
    if isinstance(best, bytes):
        (tmp_path / BEST_NAME).write_bytes(best)
    else:
        save_checkpoint(tmp_path / BEST_NAME, params=params, step=1, metadata=best)
    logged: list[str] = []
    r = Checkpointer(tmp_path, interval=1, keep=1, run_config={}, log=logged.append)
    assert r.resume({"params": params, "opt_state": ()}, CFG).step == 2
    assert r.best_loss == 2.5 and r.best_step == 1  # from the periodic checkpoint's own record
    warnings = [m for m in logged if m.startswith("warning:")]
    assert len(warnings) == 1 and f"not counting {tmp_path / BEST_NAME}'s validation loss" in warnings[0]


def test_the_resume_plan_and_the_loop_take_the_same_checkpoint(tmp_path):
    """``newest_loadable`` is the one rule of ``flm train --resume``'s plan and of
    ``Checkpointer.resume``: newest first, it skips an unreadable header, a failed checksum and
    NaN values (each with its reason), stops at what ``check`` raises, and takes the first good one."""
    from flm.train.checkpointer import newest_loadable

    good = {"w": torch.ones(3)}
    save_checkpoint(tmp_path / "ckpt_0000001.safetensors", params=good, step=1)
    save_checkpoint(tmp_path / "ckpt_0000002.safetensors", params=good, step=2)
    data = bytearray((tmp_path / "ckpt_0000002.safetensors").read_bytes())
    data[-1] ^= 0xFF  # a flipped data byte: the header reads, the checksum fails
    (tmp_path / "ckpt_0000002.safetensors").write_bytes(bytes(data))
    save_checkpoint(
        tmp_path / "ckpt_0000003.safetensors",
        params={"w": torch.full((3,), float("nan"))},
        step=3,
        allow_nonfinite=True,
    )
    (tmp_path / "ckpt_0000004.safetensors").write_bytes(b"\x05" + b"\x00" * 7 + b"{oops")
    paths = list_checkpoints(tmp_path)
    skipped: list[tuple[str, str]] = []
    checked: list[int] = []
    found = newest_loadable(
        paths,
        check=lambda p, h: checked.append(h["step"]),
        skip=lambda p, why: skipped.append((p.name, why)),
    )
    assert found is not None and found[0].name == "ckpt_0000001.safetensors" and found[1]["step"] == 1
    assert torch.equal(found[2].params["w"], good["w"]) and checked == [3, 2, 1]
    assert [n for n, _ in skipped] == [f"ckpt_000000{i}.safetensors" for i in (4, 3, 2)]
    assert "NaN/inf" in skipped[1][1] and "checksum" in skipped[2][1].lower()

    def refuse(p: Path, h: dict) -> None:
        raise ValueError(f"other model: {p.name}")

    with pytest.raises(ValueError, match="other model: ckpt_0000003"):
        newest_loadable(paths, check=refuse, skip=lambda p, why: None)
    assert newest_loadable(paths[1:], skip=lambda p, why: None) is None


def test_the_printed_resume_hint_continues_the_run_as_configured(texts, tmp_path, monkeypatch, capsys):
    """Regression: ``flm train --resume --out-dir RUN`` (the hint Ctrl-C prints) rebuilt the settings
    from the default preset, so it refused the run or silently cut it short; it now starts from
    RUN/config.json, and flags still override it."""
    out = tmp_path / "run"
    real = _interrupt_at(monkeypatch, 6)
    assert main(train_argv(texts, out, "--max-iters", "30", "--lr", "0.004", "--eval-interval", "10")) == 130
    hint = next(line for line in capsys.readouterr().out.splitlines() if "continue with:" in line)
    argv = hint.split("continue with: flm ", 1)[1].split()
    assert argv == ["train", "--resume", "--out-dir", str(out)]
    monkeypatch.setattr(flm.train.loop, "get_batch", real)
    assert main(argv + ["--num-workers", "1"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["preset"] == "tiny" and cfg["train"]["max_iters"] == 30 and cfg["train"]["lr"] == 0.004
    assert json.loads((out / "results.json").read_text())["steps"] == 30


_KILLER = """
import os, random, signal, sys, threading
import flm.train.loop as L
from flm.cli import main
real, calls, at = L.get_batch, {"n": 0}, int(sys.argv[1])
def batch(*a, **k):
    calls["n"] += 1
    if calls["n"] == at:  # then die a random moment later: mid-step, mid-checkpoint-write, anywhere
        delay = random.Random(at * 7919 + len(sys.argv)).uniform(0.0, 0.05)
        threading.Timer(delay, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    return real(*a, **k)
L.get_batch = batch
sys.exit(main(sys.argv[2:]))
"""

_KEYS = ("step", "tokens", "train_loss", "lr", "grad_norm", "val_loss")


def _metrics(run):
    return [{k: r.get(k) for k in _KEYS} for r in read_metrics(run / "metrics.jsonl")]


@pytest.mark.parametrize("kills", [3, pytest.param(12, marks=pytest.mark.slow)])
def test_kill_9_at_random_points_then_resume_equals_the_uninterrupted_run(texts, tmp_path, kills):
    """The kill -9 loop: checkpoints every step, SIGKILL at random points (including mid-write),
    ``--resume`` after each; the finished run's parameters, optimizer state and metrics equal an
    uninterrupted run's bitwise. Bounded to 3 kills; ``FLM_SLOW=1`` runs 12."""
    flags = ("--max-iters", "24", "--checkpoint-interval", "1", "--keep-checkpoints", "2", "--eval-interval", "8")
    ref = tmp_path / "ref"
    assert main(train_argv(texts, ref, "--log-interval", "1", *flags)) == 0
    run, rng, killed = tmp_path / "run", np.random.default_rng(kills), 0
    for i in range(kills):
        argv = train_argv(texts, run, "--log-interval", "1", *flags, *(["--resume"] if i else []))
        at = int(rng.integers(2, 9))
        r = subprocess.run([sys.executable, "-c", _KILLER, str(at), *argv], cwd=ROOT, capture_output=True, timeout=120)
        assert r.returncode in (-9, 0), r.stderr.decode()[-2000:]
        if r.returncode == 0:
            break
        killed += 1
    assert killed >= min(kills, 2)
    assert main(train_argv(texts, run, "--log-interval", "1", *flags, "--resume")) == 0
    a, b = load_checkpoint(list_checkpoints(ref)[-1]), load_checkpoint(list_checkpoints(run)[-1])
    assert a.step == b.step == 24
    for x, y in zip(tree_leaves((a.params, a.opt_state)), tree_leaves((b.params, b.opt_state)), strict=True):
        assert torch.equal(x, y)
    assert _metrics(run) == _metrics(ref)
    assert not [p.name for p in run.iterdir() if p.name.startswith(".") and p.name != ".lock"]


@pytest.mark.parametrize("flag", [["--tensorboard"], ["--wandb", "proj"]])
def test_a_missing_metrics_package_fails_before_anything_is_written(texts, tmp_path, capsys, flag):
    """Regression: a missing tensorboard/wandb failed after the tokenizer, token files, config.json
    and an empty metrics.jsonl were written, and that empty file then blocked a plain restart."""
    package = flag[0].lstrip("-")
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed")
    run = tmp_path / "run"
    assert main(train_argv(texts, run, *flag)) == 2
    assert f"needs the {package} package" in one_line_error(capsys) and not run.exists()


def test_an_empty_prompt_starts_a_new_document_instead_of_failing_after_training(texts, tmp_path):
    """Regression: ``--prompts ""`` failed after all training and evaluation, with no results.json."""
    run = tmp_path / "run"
    assert main(train_argv(texts, run, "--max-iters", "3", "--prompts", "", "Once")) == 0
    samples = json.loads((run / "results.json").read_text())["samples"]
    assert len(samples) == 2 and samples[1].startswith("Once")


def test_a_text_that_is_not_a_regular_file_is_named_as_such(texts, tmp_path, capsys):
    argv = train_argv(texts, tmp_path / "run")
    argv[argv.index("--valid-text") + 1] = str(tmp_path)
    assert main(argv) == 2
    assert "--valid-text" in (err := one_line_error(capsys)) and "not a regular file" in err


# ----------------------------------------------------------------- issue 18: SIGTERM and SIGUSR1

_SIGNALLER = """
import os, signal, sys
import flm.train.loop as L
from flm.cli import main
real, calls, at, sig = L.get_batch, {"n": 0}, int(sys.argv[1]), getattr(signal, sys.argv[2])
def batch(*a, **k):
    calls["n"] += 1
    if calls["n"] == at:  # a real signal, delivered while step `at` is being prepared
        os.kill(os.getpid(), sig)
    return real(*a, **k)
L.get_batch = batch
sys.exit(main(sys.argv[3:]))
"""

_SIGNAL_FLAGS = (
    "--log-interval", "1", "--max-iters", "24", "--checkpoint-interval", "8", "--keep-checkpoints", "10",
    "--eval-interval", "8", "--max-new-tokens", "0",
)  # fmt: skip


@pytest.fixture(scope="module")
def signal_ref(texts, tmp_path_factory):
    """An uninterrupted run with the flags the signal tests use."""
    ref = tmp_path_factory.mktemp("sigref") / "ref"
    assert main(train_argv(texts, ref, *_SIGNAL_FLAGS)) == 0
    return ref


def _assert_same_run(ref: Path, run: Path) -> None:
    a, b = load_checkpoint(list_checkpoints(ref)[-1]), load_checkpoint(list_checkpoints(run)[-1])
    assert a.step == b.step == 24
    for x, y in zip(tree_leaves((a.params, a.opt_state)), tree_leaves((b.params, b.opt_state)), strict=True):
        assert torch.equal(x, y)
    assert _metrics(run) == _metrics(ref)


def _signalled(texts, run: Path, at: int, sig: str) -> subprocess.CompletedProcess:
    argv = train_argv(texts, run, *_SIGNAL_FLAGS)
    return subprocess.run(
        [sys.executable, "-c", _SIGNALLER, str(at), sig, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_finishes_the_step_checkpoints_and_exits_143_then_resumes_bitwise(texts, tmp_path, signal_ref):
    """Regression (issue 18): SIGTERM (what schedulers and container runtimes send) killed the run
    without a checkpoint, losing up to --checkpoint-interval steps."""
    run = tmp_path / "run"
    r = _signalled(texts, run, 11, "SIGTERM")
    assert r.returncode == 143, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == "error: terminated (SIGTERM)"
    assert f"continue with: flm train --resume --out-dir {run}" in r.stdout and "SIGTERM at step 11" in r.stdout
    assert [p.name for p in list_checkpoints(run)] == ["ckpt_0000008.safetensors", "ckpt_0000011.safetensors"]
    assert not (run / "results.json").exists()
    assert main(train_argv(texts, run, *_SIGNAL_FLAGS, "--resume")) == 0
    _assert_same_run(signal_ref, run)


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGUSR1"), reason="POSIX signals")
def test_sigusr1_checkpoints_and_continues_and_that_checkpoint_resumes_bitwise(texts, tmp_path, signal_ref):
    """Regression (issue 18): SIGUSR1 (SLURM's warning before the time limit) killed the run."""
    run = tmp_path / "run"
    r = _signalled(texts, run, 11, "SIGUSR1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "SIGUSR1 at step 11: saving a checkpoint and continuing" in r.stdout
    assert "ckpt_0000011.safetensors" in [p.name for p in list_checkpoints(run)]
    _assert_same_run(signal_ref, run)  # the extra checkpoint changed nothing
    for p in list_checkpoints(run):  # then as if the job had been killed right after SIGUSR1
        if read_header(p)["step"] > 11:
            p.unlink()
    assert main(train_argv(texts, run, *_SIGNAL_FLAGS, "--resume")) == 0
    _assert_same_run(signal_ref, run)


# ----------------------------------------------------------------- issue 18: out of memory


@pytest.mark.parametrize(
    "flags, driver",
    [
        (["--batch-size", "2000000"], "--batch-size 2000000 drives it: lower it, or raise --grad-accum-steps"),
        (["--vocab-size", "40000000"], "--vocab-size 40000000 drives it: lower it"),
        (["--d-model", "65536"], "--d-model 65536 drives it: lower it"),
    ],
)
def test_a_run_that_cannot_fit_in_memory_is_refused_naming_the_setting(
    texts, tmp_path, capsys, monkeypatch, flags, driver
):
    """Regression (issue 18): under a 4 GB limit these settings ended in ``internal error:
    RuntimeError: [enforce fail at alloc_cpu.cpp:127] …`` after the tokenizer stage; the plan now
    estimates the step's memory and refuses, naming the setting, before anything is written."""
    import flm.cli.memory

    monkeypatch.setattr(flm.cli.memory, "available_memory", lambda device: (4 * 10**9, "available RAM"))
    run = tmp_path / "run"
    assert main(train_argv(texts, run, *flags)) == 2
    err = one_line_error(capsys)
    assert "this run needs about" in err and "but 4.0 GB is available (available RAM)" in err and driver in err
    assert not run.exists()


def test_the_plan_states_the_step_memory(texts, tmp_path, capsys):
    assert main(train_argv(texts, tmp_path / "run", "--max-iters", "1")) == 0
    assert "memory: about" in capsys.readouterr().out


_ALLOC_FAILED = (
    "[enforce fail at alloc_cpu.cpp:127] data. DefaultCPUAllocator: not enough memory: "
    "you tried to allocate 82000000000 bytes."
)


def test_a_memory_error_in_the_training_step_names_the_allocation(texts, tmp_path, capsys, monkeypatch):
    def no_memory(*a, **k):
        raise RuntimeError(_ALLOC_FAILED)

    monkeypatch.setattr(flm.train.loop, "get_batch", no_memory)
    assert main(train_argv(texts, tmp_path / "run")) == 1
    err = one_line_error(capsys)
    assert "out of memory in the training step: could not allocate 82.0 GB" in err and "--batch-size" in err
    assert "internal error" not in err


def test_a_memory_error_from_the_text_never_advises_a_smaller_batch(texts, tmp_path, capsys, monkeypatch):
    """A pathological text (one enormous pre-token) exhausts memory in the tokenizer: the message
    names the text, not the batch."""
    import flm.cli.train_data

    def no_memory(*a, **k):
        raise MemoryError

    monkeypatch.setattr(flm.cli.train_data, "train_tokenizer", no_memory)
    assert main(train_argv(texts, tmp_path / "run")) == 1
    err = one_line_error(capsys)
    assert f"out of memory while tokenizing {texts[0]}" in err and "the text, not the batch" in err
    assert "batch-size" not in err and "grad-accum" not in err


def test_a_memory_error_in_tokenize_encode_is_one_line_without_batch_advice(
    tiny_run, texts, tmp_path, capsys, monkeypatch
):
    import flm.tokenizer

    def no_memory(*a, **k):
        raise RuntimeError(_ALLOC_FAILED)

    monkeypatch.setattr(flm.tokenizer, "encode_file", no_memory)
    argv = ["tokenize", "encode", str(texts[1]), str(tmp_path / "v.tokens"), "--tokenizer", str(tiny_run)]
    assert main(argv) == 1
    err = one_line_error(capsys)
    assert "out of memory: could not allocate 82.0 GB" in err and "batch" not in err


# ----------------------------------------------------------------- issue 18: a full disk


@pytest.fixture
def small_tmpfs(tmp_path, request):
    """A tmpfs of ``request.param`` bytes (needs root and a kernel that allows it; else skipped)."""
    d = tmp_path / "tmpfs"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={request.param}", "tmpfs", str(d)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.mark.parametrize("small_tmpfs", [100_000, 1_000_000], indirect=True)  # token files; a checkpoint
def test_a_full_disk_says_so_and_where(texts, small_tmpfs, capsys):
    """Regression (issue 18): a full disk printed ``error: 65693 requested and 24576 written``,
    ``no space left on device:`` with no file, or ``internal error: SafetensorError``."""
    run = small_tmpfs / "run"
    assert main(train_argv(texts, run)) == 1
    err = one_line_error(capsys)
    assert f"the disk is full: cannot write {run}/" in err and "free some space" in err
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("small_tmpfs", [60_000], indirect=True)
def test_tokenize_encode_on_a_full_disk_says_so_and_where(tiny_run, texts, small_tmpfs, capsys):
    out = small_tmpfs / "train.tokens"
    assert main(["tokenize", "encode", str(texts[0]), str(out), "--tokenizer", str(tiny_run)]) == 1
    assert f"the disk is full: cannot write {out} (no space left on device" in one_line_error(capsys)


def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a write reports it: no file name


def test_a_full_disk_names_the_token_file(texts, tmp_path, capsys, monkeypatch):
    """ENOSPC injected (for machines that cannot mount a tmpfs): the token file is named."""
    import importlib

    encode_module = importlib.import_module("flm.tokenizer.encode_file")  # the package exports the function
    monkeypatch.setattr(encode_module.shutil, "copyfileobj", _enospc)
    run = tmp_path / "run"
    assert main(train_argv(texts, run)) == 1
    assert f"the disk is full: cannot write {run / 'train.tokens'} (" in one_line_error(capsys)


def test_a_full_disk_names_the_checkpoint_and_the_metrics_file(texts, tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    import flm.checkpoint
    import flm.train.metrics

    def full(*a, **k):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(flm.checkpoint, "st_save_file", full)
    run = tmp_path / "run"
    assert main(train_argv(texts, run)) == 1
    assert f"the disk is full: cannot write {run / 'best.safetensors'} (" in one_line_error(capsys)
    monkeypatch.undo()

    class FullFile:
        def __init__(self, *a, **k):
            pass

        write = flush = _enospc

        def close(self):
            _enospc()

    monkeypatch.setattr(flm.train.metrics, "open", lambda *a, **k: FullFile(), raising=False)
    assert main(train_argv(texts, run, "--overwrite")) == 1
    assert f"the disk is full: cannot write {run / 'metrics.jsonl'} (" in one_line_error(capsys)


# ----------------------------------------------------------------- issue 18: one wording, exit 2


@pytest.mark.parametrize(
    "extra, text",
    [
        (["--lr", "0"], "--lr must be a finite positive number, got 0.0"),  # was "--lr must be positive"
        (["--lr", "nan"], "--lr must be a finite positive number, got nan"),
        (["--lr", "-1"], "--lr must be a finite positive number, got -1.0"),  # was "a finite number ≥ 0"
        (["--min-lr", "5"], "need --min-lr ≤ --lr, got --min-lr=5.0, --lr=0.003"),  # was "--need min_lr ≤ lr"
        (["--d-model", "33"], "--d-model=33 is not divisible by --num-heads=2"),
        (["--vocab-size", "100"], "--vocab-size 100 is smaller than 256 bytes + 1 special token = 257"),  # was exit 1
        (["--train-bytes", "10"], "--train-bytes 10 is less than context_length + 1 = 33"),  # was exit 1 after work
    ],
)
def test_train_usage_errors_exit_2_with_one_wording_per_flag(texts, tmp_path, capsys, extra, text):
    """Regression (issue 18): ``--lr`` had two wordings, config messages gained a stray ``--``
    (``--need min_lr``) or kept field names, and some usage errors exited 1 after the tokenizer stage."""
    run = tmp_path / "run"
    assert main(train_argv(texts, run, *extra)) == 2
    assert text in one_line_error(capsys) and not run.exists()


def test_no_stray_dashes_before_config_field_names(texts, capsys):
    """Regression (issue 18): ``error: --give both train_text and valid_text`` (DataConfig's message)."""
    assert main(["train", "--preset", "tiny", "--train-text", str(texts[0])]) == 2
    err = one_line_error(capsys)
    assert err == "error: give both --train-text and --valid-text, or neither (to download the data set)"


def test_other_subcommands_usage_errors_exit_2_with_the_flag_wording(tiny_run, texts, tmp_path, capsys):
    cases = [  # each exited 1, or worded the same flag differently from flm train
        (
            ["tokenize", "train", str(texts[1]), "--vocab-size", "10", "--out-dir", str(tmp_path / "tok")],
            "--vocab-size 10 is smaller than 256 bytes + 1 special token(s) = 257",
        ),
        (["eval", str(tiny_run), "--text", str(texts[1]), "--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
        (
            ["sweep", "--preset", "tiny", "--train-text", str(texts[0]), "--valid-text", str(texts[1]),
             "--lrs", "0.01", "0.01", "--out-dir", str(tmp_path / "sweep")],
            "--lrs: 0.01 given more than once",
        ),
    ]  # fmt: skip
    for argv, text in cases:
        assert main(argv) == 2, argv
        assert text in one_line_error(capsys), argv
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "tok").exists()
