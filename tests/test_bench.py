"""Smoke test of the benchmarks: every bench imports and runs once on a tiny size (``--quick``).

Keeps ``bench/`` from rotting: ``run_all.py --quick`` runs all of them (tokenizer, generate,
train_step, attention, optimizer, vmap) in one process and writes results.json and RESULTS.md.
Peers that are not installed are skipped inside the benches with a note; the tokenizer bench
needs the shared data and is allowed to report that it is missing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))


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
    assert st["n"] == 3 and st["median"] >= 0


def test_run_all_quick(tmp_path):
    import run_all
    from conftest import shared_data_dir

    out = run_all.main(["--quick", "--out-dir", str(tmp_path)])
    benches = out["benches"]
    expected = [n for n in run_all.BENCHES if (BENCH / f"{n}.py").exists()]
    assert list(benches) == expected
    for name, res in benches.items():
        if name == "tokenizer" and shared_data_dir() is None:
            assert "shared data not found" in res.get("error", ""), res.get("error")
            continue
        assert "error" not in res, f"{name}: {res.get('error')}"
        assert run_all._rows(res), f"{name} returned no rows"
    train = {r["row"]: r for r in benches["train_step"]["rows"]}
    assert {"flm eager", "flm eager donate+inplace", "torch nn.Module"} <= set(train)
    assert train["flm eager"]["tokens_per_s"] > 0 and train["flm eager"]["ratio"] > 0
    assert any("first-step loss" in n and "WARNING" not in n for n in benches["train_step"]["notes"])
    assert {"flm pure", "flm inplace", "torch foreach"} <= {r["row"] for r in benches["optimizer"]["rows"]}
    assert json.loads((tmp_path / "results.json").read_text())["benches"].keys() == benches.keys()
    md = (tmp_path / "RESULTS.md").read_text()
    assert all(f"## {n}" in md for n in expected) and "torch" in md


def test_bench_json_flag(tmp_path):
    import optimizer

    res = optimizer.main(["--quick", "--json", str(tmp_path / "opt.json")])
    on_disk = json.loads((tmp_path / "opt.json").read_text())
    assert on_disk["bench"] == "optimizer" and len(on_disk["rows"]) == len(res["rows"])
    assert on_disk["memory"]["state_over_params"] == pytest.approx(2.0)
