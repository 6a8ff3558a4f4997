"""train_loop's failure paths: a NaN loss stops the run naming the step and keeps the last good
checkpoint; Ctrl-C saves a checkpoint that --resume continues from exactly."""

import numpy as np
import pytest
import torch

import flm.data
import flm.train
import flm.train.loop
from flm.checkpoint import load_checkpoint
from flm.model import TransformerConfig
from flm.train import NonFiniteLossError, TrainConfig, list_checkpoints, read_metrics, train_loop

CONFIG = TransformerConfig(vocab_size=48, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32)


def _cfg(**kw):
    base = dict(
        batch_size=4,
        max_iters=12,
        lr=1e-2,
        min_lr=1e-3,
        warmup_iters=2,
        eval_interval=4,
        checkpoint_interval=4,
        log_interval=2,
        keep_checkpoints=5,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def tokens():
    rng = np.random.default_rng(0)
    return rng.integers(0, CONFIG.vocab_size, 2000).astype(np.uint16), rng.integers(0, CONFIG.vocab_size, 400).astype(
        np.uint16
    )


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tokens, tmp_path, monkeypatch):
    real = flm.train.loop.make_train_step

    def poisoned(*args, **kw):
        step = real(*args, **kw)
        calls = {"n": 0}

        def wrapped(params, opt_state, x, y):
            params, opt_state, m = step(params, opt_state, x, y)
            calls["n"] += 1
            if calls["n"] == 7:  # the 7th step's loss is NaN
                m = {**m, "loss": torch.tensor(float("nan"))}
            return params, opt_state, m

        return wrapped

    monkeypatch.setattr(flm.train.loop, "make_train_step", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 7"):
        train_loop(CONFIG, _cfg(), *tokens, tmp_path, log=lambda s: None)
    ckpts = list_checkpoints(tmp_path)
    assert [p.name for p in ckpts] == ["ckpt_0000004.safetensors"]  # step 8's was never written
    assert load_checkpoint(ckpts[-1]).step == 4
    assert max(r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")) == 6


def test_ctrl_c_saves_and_resume_matches_an_uninterrupted_run(tokens, tmp_path, monkeypatch):
    straight = train_loop(CONFIG, _cfg(), *tokens, tmp_path / "straight", log=lambda s: None)
    assert straight["status"] == "done"

    real_get_batch = flm.train.loop.get_batch
    calls = {"n": 0}

    def interrupting(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 6:  # Ctrl-C while drawing the 6th batch: 5 steps are done
            raise KeyboardInterrupt
        return real_get_batch(*args, **kw)

    monkeypatch.setattr(flm.train.loop, "get_batch", interrupting)
    run = tmp_path / "interrupted"
    summary = train_loop(CONFIG, _cfg(), *tokens, run, log=lambda s: None)
    assert summary["status"] == "interrupted" and summary["step"] == 5
    assert (run / "ckpt_0000005.safetensors").exists()

    monkeypatch.setattr(flm.train.loop, "get_batch", real_get_batch)
    resumed = train_loop(CONFIG, _cfg(), *tokens, run, resume=True, log=lambda s: None)
    assert resumed["status"] == "done" and resumed["step"] == 12
    a = load_checkpoint(tmp_path / "straight" / "ckpt_0000012.safetensors")
    b = load_checkpoint(run / "ckpt_0000012.safetensors")
    for key, value in flm.flatten(a.params).items():
        assert torch.equal(value, flm.flatten(b.params)[key]), key
    # The line at step 6 averages steps 5–6 in the straight run but only step 6 after the resume
    # (step 5 was never logged before the interrupt); every later line is identical.
    losses = lambda d: [
        (r["step"], r["train_loss"], r["val_loss"]) for r in read_metrics(d / "metrics.jsonl") if r["step"] != 6
    ]
    assert losses(run) == losses(tmp_path / "straight")
