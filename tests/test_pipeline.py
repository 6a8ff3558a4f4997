"""End-to-end smoke tests on a slice of the shared TinyStories data: the main script's pipeline
(files, falling loss, cached stages, crash + ``--resume``), ``flm.generate`` on its run dir, and the
vmapped learning-rate sweep ``examples/sweep_lr.py``."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from flm import pipeline
from flm.checkpoint import load_checkpoint
from flm.train import read_metrics
from flm.tree import tree_leaves

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = {"step", "wall_time", "tokens", "train_loss", "val_loss", "lr", "grad_norm"}


@pytest.fixture(scope="module")
def texts(shared_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    src = shared_data / "tinystories"
    train, valid = d / "train.txt", d / "valid.txt"
    train.write_text((src / "train.txt").read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    valid.write_text((src / "valid.txt").read_text(encoding="utf-8")[:10_000], encoding="utf-8")
    return train, valid


def _argv(texts, out, *extra):
    train, valid = texts
    return ["--preset", "tiny", "--train-text", str(train), "--valid-text", str(valid), "--out-dir", str(out),
            "--device", "cpu", "--num-workers", "1", "--max-new-tokens", "12", *extra]


def _run(argv):
    logs: list[str] = []
    result = pipeline.run(pipeline.parse_args(argv), log=logs.append)
    return result, logs


@pytest.fixture(scope="module")
def tiny_run(texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "tiny"
    result, logs = _run(_argv(texts, out))
    return out, result, logs


def test_pipeline_writes_every_artefact_and_learns(tiny_run):
    out, result, _ = tiny_run
    for name in ("config.json", "metrics.jsonl", "loss.png", "best.safetensors", "vocab.json", "merges.txt",
                 "samples.txt", "results.json", "train.tokens", "valid.tokens"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    ckpts = sorted(out.glob("ckpt_*.safetensors"))
    assert [p.name for p in ckpts] == ["ckpt_0000020.safetensors", "ckpt_0000040.safetensors"]
    rows = read_metrics(out / "metrics.jsonl")
    assert rows and all(REQUIRED <= set(r) for r in rows)
    assert [r["step"] for r in rows] == list(range(5, 41, 5))
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.5
    assert any(r["val_loss"] is not None for r in rows)
    saved = json.loads((out / "results.json").read_text())
    assert saved["steps"] == 40 and saved["val_loss"] < 6.0 and len(saved["samples"]) == len(pipeline.PROMPTS)
    assert result["val_loss"] == saved["val_loss"]
    assert json.loads((out / "config.json").read_text())["train"]["grad_accum_steps"] == 1


def test_second_run_is_cached(tiny_run, texts):
    out, first, _ = tiny_run
    result, logs = _run(_argv(texts, out))
    text = "\n".join(logs)
    for stage in ("tokenizer: cached", "encode train: cached", "encode valid: cached", "train: cached"):
        assert stage in text, stage
    assert result["val_loss"] == first["val_loss"]


def test_crash_and_resume_matches_uninterrupted(tiny_run, texts, tmp_path):
    out, first, _ = tiny_run
    crashed = tmp_path / "crashed"
    shutil.copytree(out, crashed)
    # A crash after step 20: the step-40 checkpoint, summary and results were never written.
    for name in ("ckpt_0000040.safetensors", "train_summary.json", "results.json", "samples.txt"):
        (crashed / name).unlink()
    result, logs = _run(_argv(texts, crashed, "--resume"))
    assert any("resumed from ckpt_0000020" in line for line in logs)
    a = load_checkpoint(out / "ckpt_0000040.safetensors")
    b = load_checkpoint(crashed / "ckpt_0000040.safetensors")
    assert a.step == b.step == 40
    for x, y in zip(tree_leaves(a.params), tree_leaves(b.params)):
        assert torch.equal(x, y)
    keys = ("step", "tokens", "train_loss", "val_loss", "lr", "grad_norm")
    ra, rb = read_metrics(out / "metrics.jsonl"), read_metrics(crashed / "metrics.jsonl")
    assert [{k: r[k] for k in keys} for r in ra] == [{k: r[k] for k in keys} for r in rb]
    assert result["val_loss"] == pytest.approx(first["val_loss"], rel=1e-12)


def test_grad_accum_flag_reaches_the_train_config(texts, tmp_path):
    args = pipeline.parse_args(_argv(texts, tmp_path / "x", "--grad-accum-steps", "4"))
    _, train = pipeline.build_configs(args)
    assert train.grad_accum_steps == 4
    with pytest.raises(ValueError, match="grad_accum_steps"):
        pipeline.build_configs(pipeline.parse_args(_argv(texts, tmp_path / "x", "--grad-accum-steps", "0")))


def test_generate_cli_on_the_run(tiny_run, capsys):
    from flm import generate

    out, _, _ = tiny_run
    texts = generate.main(["--checkpoint", str(out / "best.safetensors"), "--prompt", "Once upon a time",
                           "--max-new-tokens", "10", "--seed", "1"])
    assert len(texts) == 1 and isinstance(texts[0], str)


def _load_sweep():
    spec = importlib.util.spec_from_file_location("sweep_lr", ROOT / "examples" / "sweep_lr.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_sweep_lr_smoke(texts, tmp_path, tiny_run):
    sweep = _load_sweep()
    train, valid = texts
    out = tmp_path / "sweep"
    run_dir = tiny_run[0]
    out.mkdir()
    for name in ("vocab.json", "merges.txt", "train.tokens", "valid.tokens", "train.tokens.json", "valid.tokens.json",
                 "tokenizer.stamp.json", "train.stamp.json", "valid.stamp.json"):  # reuse the pipeline run's tokenizer and token files (same stamps)
        shutil.copy2(run_dir / name, out / name)
    result = sweep.main(["--train-text", str(train), "--valid-text", str(valid), "--out-dir", str(out),
                         "--lrs", "1e-3,1e-2", "--max-iters", "10", "--batch-size", "4", "--preset", "tiny",
                         "--eval-interval", "5", "--num-workers", "1"])
    assert result["lrs"] == [1e-3, 1e-2] and len(result["final_val_loss"]) == 2
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [5, 10]
    for r in rows:
        assert len(r["train_loss"]) == len(r["lrs"]) == len(r["val_loss"]) == 2
    assert rows[-1]["lrs"][1] > rows[-1]["lrs"][0]
    assert (out / "sweep.png").stat().st_size > 0
    # The higher lr learns faster over 10 steps on this data.
    assert rows[-1]["val_loss"][1] < rows[-1]["val_loss"][0]
