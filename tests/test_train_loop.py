"""train_loop's failure paths: a NaN loss stops the run naming the step and keeps the last good
checkpoint; Ctrl-C saves a checkpoint that --resume continues from exactly."""

import traceback

import numpy as np
import pytest
import torch

import flm.data
import flm.optim._kernels
import flm.train
import flm.train.loop
import flm.tree
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


def test_step_meter_summarises_the_interval_once_per_model():
    from flm.train.metrics import StepMeter

    meter = StepMeter(3)
    assert [s for s in range(1, 10) if meter.due(s)] == [3, 6, 9] and not StepMeter(0).due(5)
    meter.add({"loss": torch.tensor(1.0), "grad_norm": torch.tensor(0.5), "lr": torch.tensor(0.1)})
    meter.add({"loss": torch.tensor(3.0), "grad_norm": torch.tensor(0.25), "lr": torch.tensor(0.2)})
    s = meter.summarise()
    assert s["losses"].tolist() == [1.0, 3.0] and float(s["train_loss"]) == 2.0
    assert float(s["lr"]) == pytest.approx(0.2) and float(s["grad_norm"]) == 0.25
    with pytest.raises(ValueError, match="no step"):  # summarise started a new interval
        meter.summarise()
    # K models: the mean is per model, and a NaN step spoils only its own model's mean.
    meter.add({"loss": torch.tensor([1.0, float("nan")]), "grad_norm": torch.tensor([1.0, 2.0])})
    meter.add({"loss": torch.tensor([2.0, 1.0]), "grad_norm": torch.tensor([3.0, 4.0])})
    s = meter.summarise()
    assert s["losses"].shape == (2, 2) and s["train_loss"][0] == 1.5 and s["train_loss"][1].isnan()
    assert s["lr"] is None and s["grad_norm"].tolist() == [3.0, 4.0]
    with pytest.raises(ValueError, match="-1"):
        StepMeter(-1)


def test_metrics_record_has_the_documented_fields_in_order_and_rounds():
    from flm.train.metrics import metrics_record

    r = metrics_record(
        4,
        wall_time=1.23456,
        tokens=128,
        train_loss=2.5,
        lr=None,
        grad_norm=0.5,
        val_loss=None,
        val_perplexity=None,
        tokens_per_sec=1234.5678,
        mfu=0.123456,
    )
    assert list(r) == [
        "step",
        "wall_time",
        "tokens",
        "train_loss",
        "lr",
        "grad_norm",
        "val_loss",
        "val_perplexity",
        "tokens_per_sec",
        "mfu",
    ]
    assert (r["wall_time"], r["tokens_per_sec"], r["mfu"]) == (1.235, 1234.6, 0.1235)


def test_clock_counts_tokens_since_the_last_tick_and_leaves_pauses_out(monkeypatch):
    import time

    from flm.train.clock import Clock
    from flm.train.metrics import Throughput

    now = {"t": 100.0}
    monkeypatch.setattr(time, "perf_counter", lambda: now["t"])
    clock = Clock(Throughput(6.0, 60.0, smoothing=1.0), tokens_per_step=10, max_iters=20, offset=5.0, budget_minutes=1)
    assert clock.elapsed() == 5.0 and clock.eta(0) is None  # the resumed run's time counts; no rate yet
    now["t"] += 2.0  # two steps of 1 s
    assert clock.tick(2) == 10.0 and clock.throughput.mfu == 1.0  # 20 tokens / 2 s; 10 tok/s × 6 FLOP / 60
    assert clock.eta(2) == 18.0 and clock.eta(2, rate=20.0) == 9.0  # 18 steps × 10 tokens / rate
    with clock.aside():  # an evaluation: out of tokens/s, and 1.5× its time in the reserve
        now["t"] += 4.0
    clock.skip(3.0, 3)  # a compiling step 3: neither its time nor its tokens count
    now["t"] += 3.0 + 1.0
    assert clock.tick(4) == 10.0  # step 4 alone: 10 tokens in 1 s
    assert clock.reserve == 6.0 and not clock.over_budget()  # 15 s elapsed + 6 s reserve < 60 s
    now["t"] += 39.0
    assert clock.over_budget() and not Clock(Throughput(1.0, None), tokens_per_step=1, max_iters=1).over_budget()
    with pytest.raises(ValueError, match="offset=-1"):
        Clock(Throughput(1.0, None), tokens_per_step=1, max_iters=1, offset=-1)


def test_a_one_model_sweep_writes_the_lines_train_loop_writes(tokens, tmp_path):
    """vmapped_train and train_loop share their components: the same metrics lines (fields in the
    same order, logged and evaluated at the same steps, the same numbers up to float rounding)."""
    from flm.config import RunConfig
    from flm.experiments.vmapped import vmapped_train

    cfg = _cfg(max_iters=8, checkpoint_interval=0, device="cpu")
    single = train_loop(CONFIG, cfg, *tokens, tmp_path / "single", log=lambda s: None)
    (swept,) = vmapped_train(
        RunConfig(model=CONFIG, train=cfg), *tokens, tmp_path, [{"label": "one"}], log=lambda s: None
    )
    a, b = read_metrics(tmp_path / "single" / "metrics.jsonl"), read_metrics(tmp_path / "one" / "metrics.jsonl")
    assert [list(r) for r in a] == [list(r) for r in b] and [r["step"] for r in b] == [2, 4, 6, 8]
    for x, y in zip(a, b):
        for key in ("step", "tokens", "train_loss", "lr", "grad_norm", "val_loss", "val_perplexity"):
            assert (x[key] is None) == (y[key] is None), (x["step"], key)
            assert x[key] is None or x[key] == pytest.approx(y[key], rel=1e-5), (x["step"], key)
    assert swept["best_val_loss"] == pytest.approx(single["best_val_loss"], rel=1e-5)


def test_evaluator_each_skips_diverged_models(tokens):
    from flm.model import init_params
    from flm.train import Evaluator

    ev = Evaluator(tokens[1], CONFIG, 4, 2, 0)
    good = init_params(CONFIG, torch.Generator().manual_seed(0))
    bad = flm.tree.tree_map(lambda t: torch.full_like(t, float("nan")), good)
    losses = ev.each([good, bad, good], step=3)
    assert losses[0] == losses[2] == ev(good, 3)["loss"] and losses[1] is None and ev.last[0] == 3


# What reads a tensor's value back to the host (a device sync on CUDA/MPS).
_HOST_READS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")


@pytest.mark.parametrize(
    "compiled", [False, pytest.param(True, marks=pytest.mark.compile, id="compile-blocks")], ids=["eager", None]
)
def test_between_records_the_loop_reads_no_tensor_back_to_the_host(tokens, tmp_path, monkeypatch, compiled):
    """No host sync in the step or the data path (issue 17 item 5): between two interval records
    (the log line's one summary, evaluations, checkpoints) nothing in the loop reads a tensor's
    value, so on a GPU the next batch is drawn, pinned and copied while the step still runs.
    Checked device-independently: every value-reading Tensor method is counted outside ``record``,
    with the optimiser's CPU-only shortcut (Python-float scalars when every leaf is on the CPU,
    ``_kernels.host_scalars``) answering as it does on an accelerator. The one read allowed is
    ``get_batch``'s of the start offsets, drawn by the CPU generator on every device."""
    reads: list[str] = []
    inside = {"steps": False, "record": False}

    def flagged(method, flag):
        def run(self, *args):
            inside[flag] = True
            try:
                return method(self, *args)
            finally:
                inside[flag] = False

        return run

    monkeypatch.setattr(flm.train.loop._Run, "steps", flagged(flm.train.loop._Run.steps, "steps"))
    monkeypatch.setattr(flm.train.loop._Run, "record", flagged(flm.train.loop._Run.record, "record"))

    def counting(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kw):
            if inside["steps"] and not inside["record"]:
                if any(
                    "/torch/_inductor/" in f.filename or "/torch/_dynamo/" in f.filename
                    for f in traceback.extract_stack()
                ):
                    return real(self, *args, **kw)  # compiling (the first step): not the step's own reads
                callers = traceback.extract_stack(limit=6)[:-1]
                if callers[-1].name == "get_batch" and self.device.type == "cpu":
                    return real(self, *args, **kw)
                reads.append(f"Tensor.{name} in " + " <- ".join(f"{f.name}:{f.lineno}" for f in reversed(callers)))
            return real(self, *args, **kw)

        return read

    for name in _HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    monkeypatch.setattr(flm.optim._kernels, "host_scalars", lambda leaves, *scalars: False)
    kw = dict(compile=True, compile_scope="blocks") if compiled else dict(compile=False)
    cfg = _cfg(max_iters=6, log_interval=3, eval_interval=6, checkpoint_interval=6, **kw)
    summary = train_loop(CONFIG, cfg, *tokens, tmp_path, log=lambda s: None)
    assert summary["status"] == "done" and summary["step"] == 6
    assert not reads, "host reads inside the step loop:\n" + "\n".join(reads)
