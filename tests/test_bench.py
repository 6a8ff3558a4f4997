"""Smoke test of the benchmarks: every bench imports and runs once on a tiny size (``--quick``).

Keeps ``bench/`` from rotting: ``run_all.py --quick`` runs all of them (tokenizer, generate,
train_step, attention, optimizer, vmap, checkpoint) in one process and writes results.json and
RESULTS.md. Peers that are not installed are skipped inside the benches with a note; the tokenizer
bench needs the shared data and is allowed to report that it is missing. No timing is asserted.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from helpers import MISSING_SHARED, shared_data_dir, shared_required

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(autouse=True)
def bench_on_path(monkeypatch):
    """The benches import each other as top-level modules (``import common``), as they do when run
    from ``bench/``; the path is restored after each test."""
    monkeypatch.syspath_prepend(str(BENCH))


def test_common_summary_and_tables(tmp_path):
    import common

    s = common.summarize([3.0, 1.0, 2.0, 4.0, 5.0])
    assert s["median"] == 3.0 and s["min"] == 1.0 and s["max"] == 5.0 and s["n"] == 5 and s["iqr"] > 0
    rows = [{"row": "a", "median_s": 0.5, "shape": [8, 256], "times": [1, 2, 3, 4, 5], "nested": {"x": 1}}]
    md = common.markdown_table(rows)
    assert md.splitlines()[0] == "| row | median_s | shape |" and "8×256" in md
    common.write_json(tmp_path / "x.json", {"rows": rows})
    assert json.loads((tmp_path / "x.json").read_text())["rows"][0]["row"] == "a"
    info = common.machine_info("cpu")
    assert {"date", "cpu", "torch", "torch_threads", "load_avg"} <= set(info)
    st = common.measure(lambda: None, repeats=3, warmup=1)
    assert st["n"] == 3 and st["median"] >= 0 and "cpu" not in st
    calls = []
    both = common.measure_interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=2, warmup=1, cpu=True
    )
    assert calls == ["a", "b"] * 3  # warm-up round, then the timed rounds in turn
    assert all(len(s["times"]) == len(s["cpu_times"]) == 2 and s["cpu"] >= 0 for s in both.values())


def test_common_targets_and_parser():
    import common

    assert common.target("flm / torch ≤ 1.15", 1.1) == {"value": 1.1, "op": "≤", "threshold": 1.15, "met": True}
    assert common.target("flm / torch ≤ 1.15", 1.2)["met"] is False
    assert common.target("speed vs HF ≥ 1.3", 1.4)["met"] is True
    assert common.target("speed vs HF ≥ 1.3", 1.2)["met"] is False
    assert common.target("speed vs HF >= 1.0", 1.0)["met"] is True
    assert common.target("overhead (info)", 0.2)["met"] is None
    assert common.format_target("speed vs HF ≥ 1.3", common.target("speed vs HF ≥ 1.3", 1.2)).endswith("MISSED")
    assert "--device" not in common.make_parser("x", device=False, dtype=False).format_help()
    args = common.make_parser("x").parse_args(["--quick", "--device", "cpu", "--dtype", "bf16"])
    assert args.quick and args.repeats == 5 and args.warmup == 1


def test_run_all_renders_both_target_directions():
    import run_all

    results = {
        "train_step": {
            "rows": [{"row": "flm default (train loop)", "speed_vs_peer": 1.2}],
            "targets": {
                "4x128 speed of flm default eager vs HF eager ≥ 1.0": {"value": 1.2},
                "8x256 speed of flm compile=True vs HF eager ≥ 1.3": {"value": 1.2},
            },
        },
        "optimizer": {
            "rows": [{"row": "flm inplace", "ratio": 1.2}],
            "targets": {
                "flm inplace / torch foreach ≤ 1.15": {"value": 1.2, "met": False},
                "flm pure / torch foreach (info)": {"value": 2.0, "met": None},
            },
        },
    }
    machine = {
        "date": "d",
        "machine": "m",
        "cpu": "c",
        "cpu_count": 2,
        "torch_threads": 2,
        "torch": "t",
        "python": "p",
        "device": "cpu",
        "load_avg": [1.0, 1.0, 1.0],
    }
    md = run_all.render_markdown(results, machine, 60.0, quick=True)
    assert "≥ 1.0: **1.200** — met" in md and "≥ 1.3: **1.200** — MISSED" in md
    assert "≤ 1.15: **1.200** — MISSED" in md and "(info): **2.000**\n" in md
    assert "| speed vs HF |" in md


def test_run_all_quick(tmp_path, monkeypatch):
    import common
    import run_all

    shared = shared_data_dir()
    if shared is None:
        if shared_required():
            pytest.fail(f"FLM_REQUIRE_SHARED=1: the tokenizer bench needs the shared data ({MISSING_SHARED})")

        def no_shared_data():  # the tests' lookup decides (FLM_SHARED_DATA=none turns it off here too)
            raise SystemExit("shared data not found: set FLM_SHARED_DATA or place it at ../shared/data")

        monkeypatch.setattr(common, "shared_data_dir", no_shared_data)
    else:
        monkeypatch.setattr(common, "shared_data_dir", lambda: shared)
    out = run_all.main(["--quick", "--out-dir", str(tmp_path)])
    benches = out["benches"]
    expected = [n for n in run_all.BENCHES if (BENCH / f"{n}.py").exists()]
    assert list(benches) == expected
    for name, res in benches.items():
        if name == "tokenizer" and shared is None:
            assert "shared data not found" in res.get("error", ""), res.get("error")
            continue
        assert "error" not in res, f"{name}: {res.get('error')}"
        assert run_all._rows(res), f"{name} returned no rows"
    train = {r["row"]: r for r in benches["train_step"]["rows"]}
    import train_step

    assert {
        train_step.DEFAULT,
        "flm make_train_step (pure)",
        "flm attention=flm",
        "torch nn.Module (flm's math)",
    } <= set(train)
    assert train[train_step.DEFAULT]["tokens_per_s"] > 0
    assert any("first-step loss" in n and "WARNING" not in n for n in benches["train_step"]["notes"])
    if importlib.util.find_spec("transformers") is not None:  # the peer of every train_step row
        assert train[train_step.DEFAULT]["speed_vs_peer"] > 0 and train[train_step.PEER]["speed_vs_peer"] is None
        assert all("≥" in k and isinstance(v["met"], bool) for k, v in benches["train_step"]["targets"].items())
        assert benches["train_step"]["targets"]
    assert {"flm pure", "flm inplace", "torch foreach"} <= {r["row"] for r in benches["optimizer"]["rows"]}
    gen = benches["generate"]["rows"]
    assert gen and all(r["tokens_match"] and r["speedup"] > 0 for r in gen)
    if "error" not in benches["tokenizer"]:
        tasks = [r["task"] for r in benches["tokenizer"]["rows"]]
        assert any(t.startswith("encode gpt2 (cold") for t in tasks) and any("no whitespace: mixed" in t for t in tasks)
        assert all(r["flm_cpu_s"] is not None for r in benches["tokenizer"]["rows"])
    import checkpoint

    ckpt = {r["row"]: r for r in benches["checkpoint"]["rows"]}
    assert set(ckpt) == {
        checkpoint.FLM_SAVE,
        checkpoint.TORCH_SAVE,
        checkpoint.ST_SAVE,
        checkpoint.ST_ATOMIC,
        checkpoint.FLM_LOAD,
        checkpoint.FLM_VERIFY,
        checkpoint.TORCH_LOAD,
        checkpoint.ST_LOAD,
    }
    assert ckpt[checkpoint.FLM_VERIFY]["verify_overhead"] is not None and ckpt[checkpoint.FLM_LOAD]["ratio_torch"] > 0
    assert json.loads((tmp_path / "results.json").read_text())["benches"].keys() == benches.keys()
    md = (tmp_path / "RESULTS.md").read_text()
    assert all(f"## {n}" in md for n in expected) and "torch" in md
    assert "speed vs HF" in md and "ratio vs safetensors" in md


def test_bench_json_flag(tmp_path):
    import optimizer

    res = optimizer.main(["--quick", "--json", str(tmp_path / "opt.json")])
    on_disk = json.loads((tmp_path / "opt.json").read_text())
    assert on_disk["bench"] == "optimizer" and len(on_disk["rows"]) == len(res["rows"])
    assert on_disk["memory"]["state_over_params"] == pytest.approx(2.0)


def test_checkpoint_bench_json(tmp_path):
    import checkpoint

    res = checkpoint.main(["--quick", "--warmup", "0", "--dir", str(tmp_path), "--json", str(tmp_path / "ckpt.json")])
    on_disk = json.loads((tmp_path / "ckpt.json").read_text())
    assert on_disk["bench"] == "checkpoint" and len(on_disk["rows"]) == len(res["rows"]) == 8
    params_bytes = 4 * on_disk["params"]
    assert on_disk["state_bytes"] >= 3 * params_bytes  # params + AdamW m and v
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.json"]  # the bench's files are removed


def test_quick_writes_to_a_temporary_directory_never_over_the_committed_results():
    import hashlib

    import run_all

    committed = BENCH / "results" / "results.json"
    before = hashlib.sha256(committed.read_bytes()).hexdigest() if committed.exists() else None
    out = run_all.main(["--quick", "--only", "checkpoint"])
    assert "checkpoint" in out["benches"]
    after = hashlib.sha256(committed.read_bytes()).hexdigest() if committed.exists() else None
    assert before == after


def test_a_bench_past_its_time_limit_is_stopped():
    import time

    import run_all

    with pytest.raises(run_all.BenchTimeout), run_all._time_limit(0.2):
        time.sleep(5)


def test_train_step_shapes_name_the_gpu_models_and_bf16_mixed_runs_on_the_cpu():
    """The GPU defaults' code paths, on the CPU: model-prefixed shapes, and bf16 mixed precision
    (flm's compute_dtype beside the torch peers under autocast) in a quick run."""
    import train_step

    assert train_step._shape("gpt2-small:16x1024") == (train_step.GPT2_SMALL, 16, 1024)
    assert train_step._shape("4x128") == (train_step.HANDOUT, 4, 128)
    assert train_step.GPT2_SMALL.d_model == 768 and train_step.GPT2_SMALL.num_layers == 12
    with pytest.raises(SystemExit, match="unknown model"):
        train_step._shape("gpt5:1x1")
    res = train_step.main(["--quick", "--dtype", "bf16-mixed", "--no-compile", "--no-hf"])
    rows = {r["row"]: r for r in res["rows"]}
    assert rows[train_step.DEFAULT]["tokens_per_s"] > 0


def test_compile_time_bench_quick_runs_fresh_processes_and_reports_the_depth_ratio():
    import compile_time

    res = compile_time.main(["--quick", "--modes", "blocks"])
    assert [r["layers"] for r in res["rows"]] == [1, 2]
    assert all(r["first call (s)"] > 0 and r["step (ms)"] > 0 for r in res["rows"])
    (name,) = res["targets"]
    assert name.startswith("blocks: first call at 2 layers / at 1 layers")


@pytest.mark.distributed
def test_shard_bench_quick_compares_sharded_and_replicated_in_fresh_processes():
    import shard

    res = shard.main(["--quick"])
    rows = {r["mode"]: r for r in res["rows"]}
    assert set(rows) == {"replicated", "sharded"}
    assert rows["sharded"]["held params MiB"] == pytest.approx(rows["replicated"]["held params MiB"] / 2, rel=0.1)
    # peak above the pre-model baseline: may be 0 at the smoke size (the start-up peak is higher)
    assert all(r["peak MiB"] >= 0 and r["step (ms)"] > 0 for r in rows.values())
    loss = next(k for k in res["targets"] if k.startswith("world 2: |loss"))
    assert res["targets"][loss]["met"]


def test_the_prepared_gpu_session_script_runs_its_steps_on_the_cpu(shared_data, tmp_path):
    """bench/gpu_session.sh (what a session lent a GPU runs through the device tool) on the CPU in
    its quick mode: every step runs and writes its file, and both flm train variants finish. On
    CUDA a third variant (``--compile-mode reduce-overhead``, refused off CUDA) adds one file, and
    the device tool brings back at most 8."""
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    env = {
        **os.environ,
        "OUT": str(out),
        "FLM_GPU_DEVICE": "cpu",
        "FLM_GPU_QUICK": "1",
        "FLM_SHARED_DATA": str(shared_data),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # python3 = this venv's
    }
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_session.sh"
    proc = subprocess.run(["bash", str(script), "run"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == [
        "bench.txt",
        "bench/RESULTS.md",
        "bench/results.json",
        "env.txt",
        "tests.txt",
        "train-auto.txt",
        "train-float32-eager.txt",
    ]
    assert len(files) + 1 <= 8  # with train-reduce-overhead.txt on CUDA
    assert "-- auto: exit 0" in proc.stdout and "-- float32-eager: exit 0" in proc.stdout
    assert "validation: loss" in (out / "train-auto.txt").read_text()
