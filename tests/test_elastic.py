"""Elastic restarts (issue 22 item 4): ``flm train --resume auto`` and ``torchrun --max-restarts``.

(a) ``--resume auto`` decides from the run directory, in process: an empty directory starts
    (the plan says "starting: no checkpoint to resume"), a directory with a checkpoint resumes
    (the plan says from which), a run killed before its first checkpoint starts over — removing
    only the files the manifest shows flm wrote —, a user's file there is refused and kept, and a
    finished run without a checkpoint is refused; ``--resume`` alone is unchanged and any other
    value is a usage error.
(b) Under ``torchrun --standalone --nproc_per_node 2 --max-restarts 2`` (gloo, CPU) one rank is
    killed with SIGKILL once a checkpoint exists: torchrun restarts the group, which resumes from
    the newest complete checkpoint by itself and ends at the same parameters as an uninterrupted
    run, bitwise.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import train_argv

from flm.checkpoint import list_checkpoints, load_checkpoint
from flm.cli import main
from flm.train import read_metrics
from flm.tree import tree_leaves

SHORT = ("--max-iters", "4", "--eval-interval", "0", "--max-new-tokens", "0")


def test_resume_auto_starts_in_an_empty_directory_then_resumes(texts, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(texts, out, "--resume", "auto", *SHORT)) == 0
    said = capsys.readouterr().out
    assert f"--resume auto: starting: no checkpoint to resume in {out}" in said
    assert json.loads((out / "results.json").read_text())["steps"] == 4
    # The same command with more steps (as a torchrun restart reruns it): resumes.
    assert main(train_argv(texts, out, "--resume", "auto", *SHORT, "--max-iters", "6")) == 0
    said = capsys.readouterr().out
    assert "resume from ckpt_0000004.safetensors (step 4)" in said and "resumed from ckpt_0000004" in said
    assert "starting" not in said
    assert json.loads((out / "results.json").read_text())["steps"] == 6


def _killed_before_first_checkpoint(texts, root: Path) -> tuple[Path, Path]:
    """A finished 4-step run, and a copy as a run killed before its first checkpoint left it
    (metrics, best model, config, tokenizer and tokens; no checkpoint, results or samples)."""
    done = root / "done"
    assert main(train_argv(texts, done, *SHORT, "--eval-interval", "2")) == 0
    killed = root / "killed"
    shutil.copytree(done, killed)
    for p in [*list_checkpoints(killed), killed / "results.json"]:
        p.unlink()
    assert (killed / "metrics.jsonl").exists() and (killed / "best.safetensors").exists()
    return done, killed


def test_resume_auto_starts_over_a_run_killed_before_its_first_checkpoint(texts, tmp_path, capsys):
    done, killed = _killed_before_first_checkpoint(texts, tmp_path)
    capsys.readouterr()
    assert main(train_argv(texts, killed, *SHORT, "--eval-interval", "2")) == 2  # without it: refused
    assert "already holds a run" in capsys.readouterr().err
    assert main(train_argv(texts, killed, "--resume", "auto", *SHORT, "--eval-interval", "2")) == 0
    said = capsys.readouterr().out
    assert "--resume auto: starting over: no checkpoint to resume" in said
    assert "--resume auto: removing 4 file(s) of the previous run: metrics.jsonl, loss.png, best.safetensors" in said
    # A run from step 0, equal to the uninterrupted one (the old metrics were removed, not appended to).
    assert [m["step"] for m in read_metrics(killed / "metrics.jsonl")] == [2, 4]
    a, b = load_checkpoint(done / "ckpt_0000004.safetensors"), load_checkpoint(killed / "ckpt_0000004.safetensors")
    for x, y in zip(tree_leaves(a.params), tree_leaves(b.params), strict=True):
        assert torch.equal(x, y)


def test_resume_auto_never_removes_a_users_file_nor_a_finished_run(texts, tmp_path, capsys):
    done, killed = _killed_before_first_checkpoint(texts, tmp_path)
    (killed / "metrics.jsonl").write_text("my notes\n")  # the user's file now: not the one flm wrote
    mine = (killed / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert main(train_argv(texts, killed, "--resume", "auto", *SHORT)) == 2
    assert "metrics.jsonl" in capsys.readouterr().err
    assert (killed / "metrics.jsonl").read_bytes() == mine and not list_checkpoints(killed)
    # A finished run whose checkpoints are gone: nothing to resume, and its results are not thrown away.
    for p in list_checkpoints(done):
        p.unlink()
    assert main(train_argv(texts, done, "--resume", "auto", *SHORT)) == 2
    assert "holds a finished run (results.json) but no checkpoint" in capsys.readouterr().err
    assert (done / "results.json").exists()


def test_resume_takes_no_value_but_auto(texts, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(train_argv(texts, tmp_path / "run", "--resume", "yes"))
    assert exc.value.code == 2
    assert "expected nothing or 'auto', got 'yes'" in capsys.readouterr().err
    # --resume alone keeps its meaning: an empty directory has nothing to resume.
    assert main(train_argv(texts, tmp_path / "run", "--resume", *SHORT)) == 2
    assert "holds no checkpoint to resume from" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# (b) torchrun --max-restarts: a SIGKILLed rank, a restart, a resume.

N, EVERY = 120, 5
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# torch >= 2.5 shares torchrun's rendezvous store with the workers by default, and a restarted
# group can read the previous attempt's gloo addresses from it (pytorch/pytorch#135712): the
# restart then fails to connect or hangs. A store per attempt avoids it (README: the command).
ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def _rank(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


def _torchrun(texts, out: Path, log: Path) -> subprocess.Popen:
    """The README's elastic command (``--max-restarts``, ``--resume auto``), output to ``log``."""
    argv = train_argv(texts, out, "--resume", "auto", "--max-iters", str(N), "--checkpoint-interval", str(EVERY))
    argv += ["--eval-interval", "0", "--max-new-tokens", "0", "--log-interval", str(EVERY)]
    with open(log, "w") as f:
        return subprocess.Popen(
            [*TORCHRUN, "--max-restarts=2", "--monitor-interval=0.1", "-m", "flm", *argv],
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, **ENV},
        )


@pytest.mark.distributed
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the ranks through /proc")
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_torchrun_restarts_a_killed_rank_and_resumes_bitwise(texts, tmp_path):
    full, elastic = tmp_path / "full", tmp_path / "elastic"
    procs: list[subprocess.Popen] = []
    try:
        ref = _torchrun(texts, full, tmp_path / "full.log")
        procs.append(ref)
        p = _torchrun(texts, elastic, tmp_path / "elastic.log")
        procs.append(p)
        deadline = time.monotonic() + 60
        while not (elastic / f"ckpt_{EVERY:07d}.safetensors").exists():
            assert p.poll() is None, (tmp_path / "elastic.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 60 s"
            time.sleep(0.01)
        ranks = {}
        while len(ranks) < 2 and time.monotonic() < deadline:
            ranks = {_rank(c): c for c in _children(p.pid)}
        os.kill(ranks[1], signal.SIGKILL)
        assert p.wait(timeout=90) == 0, (tmp_path / "elastic.log").read_text()[-4000:]
        assert ref.wait(timeout=90) == 0, (tmp_path / "full.log").read_text()[-4000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                for c in _children(proc.pid):
                    os.kill(c, signal.SIGKILL)
                proc.kill()
                proc.wait(timeout=30)
    log = (tmp_path / "elastic.log").read_text()
    assert "starting: no checkpoint to resume" in log  # the first attempt
    resumed = [line for line in log.splitlines() if line.startswith("resumed from ckpt_")]
    assert len(resumed) == 1, log[-4000:]  # one restart, by torchrun, resuming a checkpoint
    step = int(resumed[0].split()[-1])
    assert EVERY <= step < N
    assert json.loads((elastic / "results.json").read_text())["steps"] == N
    assert [m["step"] for m in read_metrics(elastic / "metrics.jsonl")] == list(range(EVERY, N + 1, EVERY))
    last = f"ckpt_{N:07d}.safetensors"
    a, b = load_checkpoint(full / last), load_checkpoint(elastic / last)
    for x, y in zip(tree_leaves(a.params), tree_leaves(b.params), strict=True):
        assert torch.equal(x, y), "the restarted run's parameters differ from the uninterrupted run's"
    for x, y in zip(tree_leaves(a.opt_state), tree_leaves(b.opt_state), strict=True):
        assert torch.equal(x, y)
    keys = ("step", "tokens", "train_loss", "lr", "grad_norm")
    ma, mb = read_metrics(full / "metrics.jsonl"), read_metrics(elastic / "metrics.jsonl")
    assert [{k: m[k] for k in keys} for m in ma] == [{k: m[k] for k in keys} for m in mb]
