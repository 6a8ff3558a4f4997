"""``flm experiment``: every experiment of handout §7 (and §2.7) runs end to end at the tiny scale
and writes its report, plots and results; the time budget stops a run and keeps its best model."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from flm.cli import main
from flm.model import TransformerConfig
from flm.train import TrainConfig, train_loop


@pytest.fixture(scope="module")
def experiments(texts, tmp_path_factory):
    """``flm experiment all`` at the tiny scale on generated text (the GPT-2 comparison of the
    tokenizer experiment, which needs GPT-2's files, is tested on its own below)."""
    out = tmp_path_factory.mktemp("exp") / "exps"
    argv = [
        "experiment",
        "all",
        "--preset",
        "tiny",
        "--train-text",
        str(texts[0]),
        "--valid-text",
        str(texts[1]),
        "--out-dir",
        str(out),
        "--max-iters",
        "12",
        "--eval-interval",
        "4",
        "--log-interval",
        "4",
        "--lrs",
        "1e-3",
        "1e-2",
        "1e4",
        "--batch-sizes",
        "2",
        "8",
        "--num-workers",
        "1",
        "--max-new-tokens",
        "16",
    ]
    with warnings.catch_warnings():  # the tiny text runs out of pairs before the 10K tokenizer's size
        warnings.filterwarnings("ignore", "BPE training stopped")
        assert main(argv) == 0
    return out


@pytest.mark.parametrize("name", ["lr", "batch_size", "ablations", "tie", "generate", "tokenizer"])
def test_every_experiment_writes_a_report(experiments, name):
    d = experiments / name
    report = (d / "report.md").read_text()
    results = json.loads((d / "results.json").read_text())
    assert report.startswith(f"# {name.replace('_', '-')}") and "flm experiment all" in report and "Wall time" in report
    assert results["wall_time"] >= 0 and "cores" in results["machine"]
    for plot in results["plots"]:
        assert (d / plot).stat().st_size > 0


def test_lr_sweep_marks_divergence_and_picks_the_best(experiments):
    res = json.loads((experiments / "lr" / "results.json").read_text())
    by_lr = {r["lr"]: r for r in res["results"]}
    assert by_lr[1e4]["diverged"] and by_lr[1e4]["final_val_loss"] is None  # lr 10,000: NaN
    assert res["smallest_diverging_lr"] == 1e4 and res["best_lr"] in (1e-3, 1e-2)
    assert "| yes |" in (experiments / "lr" / "report.md").read_text()


def test_ablations_and_tying_compare_against_one_baseline(experiments):
    abl = json.loads((experiments / "ablations" / "results.json").read_text())
    labels = [r["label"] for r in abl["results"]]
    assert labels[0] == "baseline" and {"post_norm", "nope", "silu"} <= set(labels)
    assert sum(label.startswith("no_norm") for label in labels) == 3
    assert abs(abl["params"]["silu"] - abl["params"]["baseline"]) / abl["params"]["baseline"] < 0.15  # d_ff = 4 d_model
    tie = json.loads((experiments / "tie" / "results.json").read_text())
    assert tie["results"][0] == abl["results"][0]  # the shared baseline ran once
    assert tie["params"]["tied"] < tie["params"]["baseline"]


def test_batch_size_retunes_lr_and_keeps_the_token_budget(experiments):
    res = json.loads((experiments / "batch_size" / "results.json").read_text())
    runs = {r["batch_size"]: r for r in res["results"]}
    assert runs[2]["steps"] * 2 == runs[8]["steps"] * 8 == 12 * 8
    assert res["memory_limit_batch"] > 8


def test_generate_and_tokenizer_reports(experiments):
    gen = json.loads((experiments / "generate" / "results.json").read_text())
    assert [s["label"] for s in gen["results"]] == ["chosen", "greedy", "hot"]
    assert all(s["text"].startswith("Once upon a time") for s in gen["results"])
    tok = json.loads((experiments / "tokenizer" / "results.json").read_text())
    rows = {(r["tokenizer"], r["split"]): r for r in tok["results"]}
    names = sorted({name for name, _ in rows})
    assert [n.split(" (")[0] for n in names] == ["TinyStories BPE", "run BPE"], names
    assert all(r["bytes_per_token"] > 1 for r in tok["results"])
    big, run = names
    for split in ("train", "valid"):
        # The 10K merges extend the run's smaller merge list (same data), so they never need more tokens.
        assert rows[(big, split)]["tokens"] <= rows[(run, split)]["tokens"]


def test_tokenizer_experiment_compares_with_gpt2(texts, shared_data, tmp_path):
    """``--gpt2-dir`` adds GPT-2's tokenizer (the shared fixture's files) to the comparison."""
    argv = ["experiment", "tokenizer", "--preset", "tiny", "--train-text", str(texts[0])]
    argv += ["--valid-text", str(texts[1]), "--out-dir", str(tmp_path / "exps"), "--num-workers", "1"]
    with warnings.catch_warnings():  # the tiny text runs out of pairs before the 10K tokenizer's size
        warnings.filterwarnings("ignore", "BPE training stopped")
        assert main([*argv, "--gpt2-dir", str(shared_data / "bpe")]) == 0
    tok = json.loads((tmp_path / "exps" / "tokenizer" / "results.json").read_text())
    rows = {(r["tokenizer"], r["split"]): r for r in tok["results"]}
    names = sorted({name for name, _ in rows})
    assert [n.split(" (")[0] for n in names] == ["GPT-2", "TinyStories BPE", "run BPE"], names
    assert names[0] == "GPT-2 (50,257)" and all(r["bytes_per_token"] > 1 for r in tok["results"])


def test_time_budget_stops_early_and_keeps_the_best_model(tmp_path):
    cfg = TransformerConfig(vocab_size=48, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    rng = np.random.default_rng(0)
    train, valid = rng.integers(0, 48, 4000).astype(np.uint16), rng.integers(0, 48, 400).astype(np.uint16)
    loop = TrainConfig(
        batch_size=4,
        max_iters=100_000,
        lr=1e-2,
        min_lr=1e-3,
        warmup_iters=2,
        eval_interval=5,
        checkpoint_interval=50,
        log_interval=5,
        time_budget=0.02,
        device="cpu",
    )  # 1.2 s
    s = train_loop(cfg, loop, train, valid, tmp_path, log=lambda m: None)
    assert s["status"] == "time_budget" and 0 < s["step"] < 100_000
    assert s["wall_time"] < 0.02 * 60 + 5 and s["final_val_loss"] is not None
    assert (tmp_path / "best.safetensors").exists() and (tmp_path / f"ckpt_{s['step']:07d}.safetensors").exists()


def test_diverged_means_no_finite_loss_or_clearly_worse_than_uniform():
    import math

    from flm.experiments.vmapped import diverged

    assert diverged(None, 100) and diverged(float("nan"), 100) and diverged(float("inf"), 100)
    assert diverged(1.11 * math.log(100), 100) and diverged(9.0, 100)
    assert not diverged(math.log(100), 100) and not diverged(2.0, 100)  # learned little, or well
