"""torch.compile on every supported torch, and the per-device fast defaults (dtype/compile "auto").

Every test here that compiles is marked ``compile``; ``.ci/run`` also runs them on the oldest torch
that ``pyproject.toml`` allows (2.11), in a venv with flm's runtime dependencies only, so this
module imports nothing beyond them (plus pytest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flm import optim
from flm.cli.train import describe, make_plan
from flm.config import RunConfig
from flm.model import TransformerConfig, init_params
from flm.train import make_train_step
from flm.train.config import DeviceCapabilities, TrainConfig, compile_mode_problem, resolve_auto, tf32_matmuls
from flm.tree import tree_leaves

CFG = TransformerConfig(vocab_size=32, context_length=8, d_model=16, num_layers=2, num_heads=2, d_ff=32)
ROOT = Path(__file__).resolve().parent.parent


def _batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, CFG.vocab_size, (4, CFG.context_length + 1), generator=g)
    return w[:, :-1], w[:, 1:]


# ------------------------------------------------------------------------------------------------
# compile=True on this torch: fullgraph (zero graph breaks), equal to eager.
# ------------------------------------------------------------------------------------------------


@pytest.mark.compile
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_whole_step_compiles_fullgraph_on_this_torch(compute_dtype):
    """The crash on torch 2.11 (dynamo could not trace apply_updates' PyTreeSpec comparison) is
    gone: the clipped AdamW step compiles with fullgraph=True and equals the eager step."""
    torch._dynamo.reset()
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(optim.cosine_schedule(1e-2, 1e-3, 2, 10)))
    eager = make_train_step(CFG, tx, compute_dtype=compute_dtype)
    compiled = make_train_step(
        CFG, tx, compile=True, compute_dtype=compute_dtype, compile_kwargs={"backend": "aot_eager"}
    )
    p = init_params(CFG, torch.Generator().manual_seed(0))
    pe, se = p, tx.init(p)
    pc, sc = {k: v for k, v in p.items()}, tx.init(p)
    for seed in range(2):
        x, y = _batch(seed)
        pe, se, me = eager(pe, se, x, y)
        pc, sc, mc = compiled(pc, sc, x, y)
        tol = dict(rtol=1e-5, atol=1e-6) if compute_dtype is None else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(mc["loss"], me["loss"], **tol)
    for a, b in zip(tree_leaves(pc), tree_leaves(pe)):
        assert a.dtype == torch.float32  # master params stay float32 under bf16
        torch.testing.assert_close(
            a, b, **(dict(rtol=1e-5, atol=1e-6) if compute_dtype is None else dict(rtol=0.05, atol=0.01))
        )


DEEP = TransformerConfig(vocab_size=32, context_length=8, d_model=16, num_layers=4, num_heads=2, d_ff=32)


@pytest.mark.compile
@pytest.mark.parametrize("compute_dtype", [None, torch.bfloat16])
def test_compile_blocks_equals_eager_with_one_graph_for_every_layer(compute_dtype):
    """compile="blocks" compiles one Transformer block and reuses it for all four layers (the
    backend sees one graph, so compile time does not grow with depth) and trains like eager."""
    torch._dynamo.reset()
    graphs = []

    def counting_aot_eager(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1))
    eager = make_train_step(DEEP, tx, compute_dtype=compute_dtype)
    blocks = make_train_step(
        DEEP, tx, compile="blocks", compute_dtype=compute_dtype, compile_kwargs={"backend": counting_aot_eager}
    )
    p = init_params(DEEP, torch.Generator().manual_seed(0))
    pe, se, pb, sb = p, tx.init(p), p, tx.init(p)
    for seed in range(3):
        x, y = _batch(seed)
        pe, se, me = eager(pe, se, x, y)
        pb, sb, mb = blocks(pb, sb, x, y)
        tol = dict(rtol=1e-5, atol=1e-6) if compute_dtype is None else dict(rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(mb["loss"], me["loss"], **tol)
        torch.testing.assert_close(mb["grad_norm"], me["grad_norm"], **tol)
    assert len(graphs) == 1, f"{len(graphs)} graphs for {DEEP.num_layers} layers"
    for a, b in zip(tree_leaves(pb), tree_leaves(pe)):
        assert a.dtype == torch.float32
        torch.testing.assert_close(
            a, b, **(dict(rtol=1e-5, atol=1e-6) if compute_dtype is None else dict(rtol=0.05, atol=0.01))
        )


def test_make_train_step_rejects_an_unknown_compile_mode():
    tx = optim.adamw(1e-3)
    with pytest.raises(ValueError, match="compile must be True, False or 'blocks', got 'regional'"):
        make_train_step(CFG, tx, compile="regional")


@pytest.mark.compile
def test_apply_updates_traces_and_still_checks_eagerly():
    torch._dynamo.reset()
    params = {"a": torch.ones(3), "b": [torch.zeros(2)]}
    updates = {"a": torch.full((3,), 0.5), "b": [torch.ones(2)]}
    f = torch.compile(optim.apply_updates, fullgraph=True, backend="aot_eager")
    out = f(params, updates)
    torch.testing.assert_close(out["a"], torch.full((3,), 1.5))
    with pytest.raises(ValueError, match="different tree structures"):
        optim.apply_updates(params, {"a": torch.ones(3), "c": [torch.ones(2)]})


@pytest.mark.compile
def test_a_compile_failure_is_one_line_naming_no_compile(generated_texts, tmp_path, monkeypatch, capsys):
    """A failing torch.compile stops the run with one line that names --no-compile (never a silent
    eager fallback), and the CLI exits 1 without a traceback."""
    import flm.train.loop as loop
    from flm.cli import main

    def broken_backend(gm, example_inputs):
        raise RuntimeError("the backend refused")

    real = loop.make_train_step

    def with_broken_backend(*args, **kwargs):
        return real(*args, **{**kwargs, "compile_kwargs": {"backend": broken_backend}})

    monkeypatch.setattr(loop, "make_train_step", with_broken_backend)
    torch._dynamo.reset()
    train, valid = generated_texts
    argv = ["train", "--preset", "tiny", "--train-text", str(train), "--valid-text", str(valid)]
    code = main([*argv, "--out-dir", str(tmp_path / "run"), "--compile", "--max-iters", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("error: torch.compile failed on the train step")
    assert "--no-compile" in err[-1] and "Traceback" not in "\n".join(err)


@pytest.mark.compile
def test_flm_train_compile_scope_blocks_trains_like_eager(generated_texts, tmp_path, monkeypatch, capsys):
    """--compile --compile-scope blocks: the plan says so, config.json records it, and the run's
    validation loss equals the eager run's (the block on the aot_eager backend: the same math, no
    codegen; AdamW's compiled per-leaf kernel on inductor, for every leaf)."""
    import flm.train.loop as loop
    from flm.cli import main
    from flm.optim import optimizers

    real = loop.make_train_step
    scopes = []

    def aot_eager(*args, **kwargs):
        scopes.append(kwargs.get("compile"))
        return real(*args, **{**kwargs, "compile_kwargs": {"backend": "aot_eager"}})

    monkeypatch.setattr(loop, "make_train_step", aot_eager)
    monkeypatch.setattr(optimizers, "_COMPILED_MIN_NUMEL", 0)  # the tiny model's leaves take AdamW's compiled kernel
    torch._dynamo.reset()
    train, valid = generated_texts
    argv = ["train", "--preset", "tiny", "--train-text", str(train), "--valid-text", str(valid), "--device", "cpu"]
    argv += ["--max-iters", "6", "--dtype", "float32", "--max-new-tokens", "2"]
    assert main([*argv, "--out-dir", str(tmp_path / "eager"), "--no-compile"]) == 0
    assert main([*argv, "--out-dir", str(tmp_path / "blocks"), "--compile", "--compile-scope", "blocks"]) == 0
    assert scopes == [False, "blocks"]
    assert "compiled (one block reused per layer; AdamW one leaf update)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "blocks" / "config.json").read_text())["train"]
    assert saved["compile"] is True and saved["compile_scope"] == "blocks"
    eager, blocks = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("eager", "blocks"))
    assert blocks["val_loss"] == pytest.approx(eager["val_loss"], abs=1e-4)


def test_compile_scope_is_validated():
    with pytest.raises(ValueError, match="compile_scope"):
        TrainConfig(compile_scope="layers")


def test_compile_mode_is_validated_against_the_scope_and_the_device():
    with pytest.raises(ValueError, match="compile_mode must be default, reduce-overhead, max-autotune or"):
        TrainConfig(compile_mode="fast")
    with pytest.raises(ValueError, match="compile_scope 'step'"):
        TrainConfig(compile=True, compile_scope="blocks", compile_mode="max-autotune")
    graphs = TrainConfig(compile=True, compile_mode="reduce-overhead", dtype="bf16", tf32=True)
    assert compile_mode_problem(graphs, "cuda") is None
    assert "need a CUDA device; this run is on cpu" in compile_mode_problem(graphs, "cpu")
    assert compile_mode_problem(graphs.replace(compile_mode="max-autotune"), "cpu") is None  # tunes CPU kernels too
    off, _ = resolve_auto(TrainConfig(compile_mode="max-autotune"), capabilities=DeviceCapabilities("cpu"))
    assert "compile is off for this run; add --compile" in compile_mode_problem(off, "cpu")
    explicit = TrainConfig(compile=False, compile_mode="reduce-overhead", dtype="float32", tf32=False)
    assert "compile is off" in compile_mode_problem(explicit, "cuda")


def test_flm_train_refuses_cuda_graphs_off_cuda_before_writing_anything(generated_texts, tmp_path, capsys):
    from flm.cli import main

    train, valid = generated_texts
    argv = ["train", "--preset", "tiny", "--train-text", str(train), "--valid-text", str(valid), "--device", "cpu"]
    out = tmp_path / "run"
    for flags, says in (
        (["--compile", "--compile-mode", "reduce-overhead"], "'reduce-overhead' is CUDA graphs, which need a CUDA"),
        (["--compile-mode", "max-autotune"], "needs the step compiled, but compile is off"),
        (["--no-compile", "--compile-mode", "max-autotune"], "needs the step compiled, but compile is off"),
        (["--compile", "--compile-scope", "blocks", "--compile-mode", "max-autotune"], "needs --compile-scope 'step'"),
    ):
        code = main([*argv, "--out-dir", str(out), *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and says in err[0], (flags, err)
        assert not out.exists()


def test_a_cuda_graphs_skip_is_one_line_naming_the_default_mode():
    """Where inductor cannot capture the step as CUDA graphs, the run stops with one line that
    names --compile-mode default (the remedy), as a compile failure names --no-compile."""
    import types

    import flm.train.loop as loop

    def skipping(*args):
        raise RuntimeError("skipping cudagraphs due to mutated inputs (1 instances)")

    run = types.SimpleNamespace(log=lambda msg: None, step_fn=skipping, params={}, opt_state=(), step=0)
    with pytest.raises(loop.CompileError, match="skipping cudagraphs due to mutated inputs.*--compile-mode default$"):
        loop._compile_first_step(run, torch.zeros(1), torch.zeros(1))


def _train(texts, out, *flags, timeout=900):
    train, valid = texts
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "flm", "train", "--preset", "tiny", "--train-text", str(train)]
    cmd += ["--valid-text", str(valid), "--out-dir", str(out), "--device", "cpu", "--max-new-tokens", "4", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, json.loads((out / "results.json").read_text())


@pytest.mark.compile
def test_flm_train_bf16_compile_reaches_the_float32_eager_loss(generated_texts, tmp_path):
    """The GPU default (bf16 mixed precision + inductor) on the tiny preset, on this CPU: the same
    validation loss as float32 eager within 0.02, the compile announced and timed, and left out of
    the throughput."""
    _, ref = _train(generated_texts, tmp_path / "eager", "--dtype", "float32", "--no-compile")
    proc, fast = _train(generated_texts, tmp_path / "fast", "--dtype", "bf16", "--compile")
    assert abs(fast["val_loss"] - ref["val_loss"]) <= 0.02, (fast["val_loss"], ref["val_loss"])
    log = proc.stderr + proc.stdout
    assert "compiling the train step…" in log and "compiled the train step in" in log
    assert "bf16 mixed precision, compiled" in log
    saved = json.loads((tmp_path / "fast" / "config.json").read_text())["train"]
    assert saved["dtype"] == "bf16" and saved["compile"] is True


# ------------------------------------------------------------------------------------------------
# "auto": one function decides per device; the plan says what and why.
# ------------------------------------------------------------------------------------------------

H200 = DeviceCapabilities("cuda", bf16=True, triton=True, name="NVIDIA H200")


def test_auto_on_a_cuda_gpu_with_bf16_and_triton_is_bf16_compiled_tf32():
    cfg, reasons = resolve_auto(TrainConfig(), capabilities=H200)
    assert (cfg.dtype, cfg.compile, cfg.tf32) == ("bf16", True, True)
    assert cfg.compute_dtype == torch.bfloat16 and cfg.is_resolved
    assert any("CUDA with triton" in r for r in reasons)


def test_auto_without_triton_stays_eager_and_says_why():
    cfg, reasons = resolve_auto(TrainConfig(), capabilities=DeviceCapabilities("cuda", bf16=True, triton=False))
    assert (cfg.dtype, cfg.compile) == ("bf16", False)
    assert any("triton does not import" in r for r in reasons)


def test_auto_on_an_old_gpu_keeps_float32_without_tf32():
    cfg, _ = resolve_auto(TrainConfig(), capabilities=DeviceCapabilities("cuda", bf16=False, triton=True))
    assert (cfg.dtype, cfg.compile, cfg.tf32) == ("float32", True, False)


@pytest.mark.parametrize("device", ["cpu", "mps"])
def test_auto_on_cpu_and_mps_is_float32_eager(device):
    cfg, reasons = resolve_auto(TrainConfig(), capabilities=DeviceCapabilities(device))
    assert (cfg.dtype, cfg.compile, cfg.tf32) == ("float32", False, False)
    if device == "mps":
        assert all("not measured" in r for r in reasons)


def test_explicit_settings_are_kept():
    given = TrainConfig(dtype="float32", compile=False, tf32=False)
    cfg, reasons = resolve_auto(given, capabilities=H200)
    assert cfg == given and reasons == []


def test_auto_values_are_rejected_where_a_concrete_one_is_needed():
    with pytest.raises(ValueError, match="resolve_auto"):
        TrainConfig().compute_dtype  # noqa: B018
    with pytest.raises(ValueError, match="compile must be true, false or auto"):
        TrainConfig(compile="yes")


def test_the_plan_on_a_faked_cuda_machine_chooses_bf16_and_compile(generated_texts, tmp_path, monkeypatch):
    import flm.cli.memory
    import flm.cli.train as cli_train

    monkeypatch.setattr(cli_train, "pick_device", lambda device: "cuda")
    monkeypatch.setattr(DeviceCapabilities, "probe", classmethod(lambda cls, device: H200))
    monkeypatch.setattr(cli_train, "device_peak_flops", lambda device, dtype=None: 989e12)
    monkeypatch.setattr(flm.cli.memory, "available_memory", lambda device: (141 << 30, "free memory on NVIDIA H200"))
    train, valid = generated_texts
    cfg = RunConfig.resolve("tiny", {"data": {"train_text": str(train), "valid_text": str(valid)}})
    plan = make_plan(cfg, tmp_path / "run", resume=False, overwrite=False)
    t = plan.config.train
    assert (t.device, t.dtype, t.compile, t.tf32) == ("cuda", "bf16", True, True)
    lines = describe(plan)
    assert "device cuda, bf16 mixed precision, compiled, TF32 matmuls" in lines[0]
    assert any(line.strip().startswith("auto: dtype bf16") for line in lines)
    assert set(plan.auto) == {"dtype", "compile", "tf32"}
    graphs = RunConfig.resolve(
        "tiny",
        {"data": {"train_text": str(train), "valid_text": str(valid)}, "train": {"compile_mode": "reduce-overhead"}},
    )
    plan = make_plan(graphs, tmp_path / "graphs", resume=False, overwrite=False)
    assert "bf16 mixed precision, compiled (mode reduce-overhead), TF32 matmuls" in describe(plan)[0]


def test_print_config_and_config_json_record_the_resolved_values(generated_texts, tmp_path, capsys):
    from flm.cli import main

    train, valid = generated_texts
    assert main(["train", "--preset", "tiny", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["train"]["dtype"] == "float32" and printed["train"]["compile"] is False
    assert set(printed["auto"]) == {"dtype", "compile"}
    out = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--train-text", str(train), "--valid-text", str(valid), "--out-dir", str(out)]
    assert main([*argv, "--max-iters", "2", "--max-new-tokens", "2"]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["dtype"] == "float32" and saved["train"]["compile"] is False
    assert "dtype" in saved["auto"]
    # --resume starts from config.json: concrete values, so nothing is resolved again.
    resumed = RunConfig.from_dict(saved)
    assert resumed.train.is_resolved


def test_tf32_is_on_only_inside_the_block_and_never_at_import():
    code = "import torch, flm, flm.train, flm.cli; print(torch.get_float32_matmul_precision())"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.strip() == "highest", out.stderr
    before = torch.get_float32_matmul_precision()
    with tf32_matmuls(True):
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before
    with pytest.raises(KeyError), tf32_matmuls(True):
        raise KeyError("restored on errors too")
    assert torch.get_float32_matmul_precision() == before
