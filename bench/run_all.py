"""Run every bench and write one JSON and a markdown table (the README's results section).

Runs, in order, ``tokenizer``, ``generate``, ``train_step``, ``attention``, ``cross_entropy``,
``optimizer``, ``vmap`` and ``checkpoint`` (each that exists under ``bench/``), each through its ``main(argv) -> dict`` in
this process, and writes ``<out-dir>/results.json`` (every bench's full result) and
``<out-dir>/RESULTS.md`` (machine, torch version, date, load average, one table per bench, the
targets with their verdicts). A bench that fails is recorded with its error and the others still run.

    python bench/run_all.py [--quick] [--device cpu] [--only train_step optimizer] [--out-dir bench/results]
    python bench/run_all.py --device cuda        # every accelerator bench in ≤ 5 min, into bench/results/cuda/

``--quick`` passes through to every bench (tiny sizes, one iteration: the smoke test) and writes to
a temporary directory unless ``--out-dir`` is given. Results are written after each bench, so a
stopped run keeps what finished; ``--timeout`` (60 s per bench on CUDA, 3x for train_step) stops a
bench that runs long and records it as timed out.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

HERE = Path(__file__).resolve().parent
BENCHES = ["tokenizer", "generate", "train_step", "attention", "cross_entropy", "optimizer", "vmap", "checkpoint"]
# Benches that take --device (tokenizer and checkpoint run on the CPU only).
DEVICE_AWARE = {"generate", "train_step", "attention", "cross_entropy", "optimizer", "vmap"}
# Benches with torch.compile rows (they take --no-compile).
COMPILING = {"train_step", "optimizer"}
# Default repetitions, chosen so the full run stays under ~15 min on 2 CPU cores.
FULL_ARGS = {
    "tokenizer": ["--repeats", "3"],
    "generate": ["--repeats", "3"],
    "train_step": ["--repeats", "5"],
    "attention": ["--repeats", "5"],
    "cross_entropy": ["--repeats", "5"],
    "optimizer": ["--repeats", "20"],
    "vmap": [],
    "checkpoint": ["--repeats", "5"],
}

# Columns shown in RESULTS.md per bench: (key, header). Benches not listed get every scalar column.
COLUMNS = {
    "tokenizer": [
        ("task", "task"),
        ("size_MB", "MB"),
        ("flm_s", "flm s"),
        ("flm_min_s", "min"),
        ("flm_max_s", "max"),
        ("flm_cpu_s", "flm cpu s"),
        ("flm_MBps", "flm MB/s"),
        ("peer", "peer"),
        ("peer_s", "peer s"),
        ("peer_MBps", "peer MB/s"),
        ("ratio", "ratio"),
        ("ratio_cpu", "cpu ratio"),
        ("load", "load 1m"),
    ],
    "generate": [
        ("prompt_len", "prompt"),
        ("new_tokens", "new tokens"),
        ("cached_s", "cached s"),
        ("cached_tok_s", "cached tok/s"),
        ("recompute_s", "recompute s"),
        ("recompute_tok_s", "recompute tok/s"),
        ("speedup", "speedup"),
        ("tokens_match", "tokens_match"),
        ("load_avg_1m", "load 1m"),
    ],
    "train_step": [
        ("row", "row"),
        ("shape", "batch×seq"),
        ("median_s", "median s"),
        ("min_s", "min s"),
        ("max_s", "max s"),
        ("tokens_per_s", "tokens/s"),
        ("mfu", "MFU"),
        ("peer_s", "HF s"),
        ("speed_vs_peer", "speed vs HF"),
        ("load_1m", "load 1m"),
    ],
    "attention": [
        ("shape", "b×h×s×d"),
        ("flm_s", "flm s"),
        ("flm_min_s", "min"),
        ("flm_max_s", "max"),
        ("peer_s", "SDPA s"),
        ("ratio", "ratio"),
        ("flm_gflops", "flm GFLOP/s"),
        ("peer_gflops", "SDPA GFLOP/s"),
        ("load_1m", "load 1m"),
    ],
    "optimizer": [
        ("row", "row"),
        ("median_s", "median s"),
        ("min_s", "min s"),
        ("max_s", "max s"),
        ("iqr_s", "IQR s"),
        ("peer_s", "torch foreach s"),
        ("ratio", "ratio"),
        ("load_1m", "load 1m"),
    ],
    "checkpoint": [
        ("row", "row"),
        ("MB", "file MB"),
        ("median_s", "median s"),
        ("min_s", "min s"),
        ("max_s", "max s"),
        ("MB_per_s", "MB/s"),
        ("torch_s", "torch s"),
        ("ratio_torch", "ratio vs torch"),
        ("safetensors_s", "safetensors s"),
        ("ratio_safetensors", "ratio vs safetensors"),
        ("verify_overhead", "verify overhead"),
        ("load_1m", "load 1m"),
    ],
}
# How each bench compares with its peer, for RESULTS.md (benches not listed: see their columns).
READING = {
    "tokenizer": "`ratio` = flm time / peer time (lower is better); `cpu ratio` the same in CPU seconds.",
    "generate": "`speedup` = recompute time / KV-cached time (higher is better); `tokens_match`: both decoders "
    "produced the same tokens.",
    "train_step": "`speed vs HF` = HF LlamaForCausalLM's time / the row's time, timed in the same round "
    "(higher is better; > 1: flm is faster).",
    "attention": "`ratio` = flm time / SDPA time (lower is better).",
    "optimizer": "`ratio` = row time / torch.optim.AdamW(foreach=True) time (lower is better).",
    "vmap": "`speedup` = K sequential steps' time / the row's time (higher is better).",
    "checkpoint": "`ratio vs …` = flm time / the peer's time (lower is better); `verify overhead` = extra time of "
    "verify=True / the verify=False load time.",
}


def target_line(name: str, entry: dict) -> str:
    """One RESULTS.md line for a target: value and verdict.

    ``met`` is taken from the bench's entry; an entry without one is judged here from the threshold
    at the end of its name (``≤ x`` or ``≥ x``; :func:`common.target`). Informational targets get no verdict.
    """
    met = entry.get("met")
    value = entry.get("value")
    if met is None and value is not None:
        met = common.target(name, value)["met"]
    text = f"- target {name}: " + ("–" if value is None else f"**{value:.3f}**")
    return text + ("" if met is None else (" — met" if met else " — MISSED"))


def _rows(result: dict) -> list[dict]:
    for key in ("rows", "results"):
        if isinstance(result.get(key), list):
            return result[key]
    return []


def run_bench(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Import ``bench/<name>.py`` and run its ``main`` with the pass-through flags."""
    argv = ["--quick"] if args.quick else list(FULL_ARGS.get(name, []))
    if name in DEVICE_AWARE:
        argv += ["--device", args.device]
    if args.no_compile and name in COMPILING:
        argv += ["--no-compile"]
    module = importlib.import_module(name)
    return module.main(argv)


def render_markdown(results: dict[str, Any], machine: dict, total_s: float, quick: bool) -> str:
    """The RESULTS.md text: machine line, one table per bench, targets and notes."""
    out = [
        "# flm benchmark results",
        "",
        f"Generated by `python bench/run_all.py{' --quick' if quick else ''}` — do not edit by hand.",
        "",
        f"- date: {machine['date']}",
        (
            f"- machine: {machine['machine']}, {machine['cpu']}, {machine['cpu_count']} CPUs, "
            f"{machine['torch_threads']} torch threads"
        ),
        f"- torch {machine['torch']}, Python {machine['python']}, device {machine['device']}",
        f"- load average (1/5/15 min) at start: {machine['load_avg']}; at end: {common.load_average()}",
        f"- total wall time: {total_s / 60:.1f} min",
        "",
        (
            "Times are medians after warm-up, the rows of a comparison timed in turn in the same process; "
            "`load 1m` is the 1-minute load average when the row was timed (above the CPU count means other "
            "processes shared the cores). How to read each table's comparison column is given under it."
        ),
    ]
    for name, res in results.items():
        out += ["", f"## {name}", ""]
        if "error" in res:
            out.append(f"**failed**: `{res['error']}`")
            continue
        rows = _rows(res)
        if rows:
            out.append(common.markdown_table(rows, COLUMNS.get(name)))
        if name in READING:
            out.append(f"- {READING[name]}")
        for k, v in (res.get("targets") or {}).items():
            out.append(target_line(k, v))
        if res.get("matmul_peak"):
            p = res["matmul_peak"]
            out.append(f"- measured matmul peak: {p['flops_per_s'] / 1e9:.0f} GFLOP/s ({p['n']}² {p['dtype']})")
        for n in res.get("notes") or []:
            out.append(f"- {n}")
        if res.get("_seconds"):
            out.append(f"- bench wall time: {res['_seconds']:.0f} s")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> dict:
    """Run the benches; return ``{"machine", "benches": {name: result}}`` and write the files."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="pass --quick to every bench (smoke test)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", nargs="+", default=None, help="run only these benches")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile rows")
    ap.add_argument(
        "--out-dir",
        default=None,
        help="where results.json and RESULTS.md go (default: bench/results on the CPU, bench/results/<device> "
        "elsewhere; with --quick a temporary directory, so a smoke test never replaces committed results)",
    )
    ap.add_argument(
        "--timeout", type=float, default=None, help="seconds per bench before it is stopped and recorded as timed out"
    )
    args = ap.parse_args(argv)
    device_type = args.device.split(":")[0]
    if args.out_dir is None:
        if args.quick:
            import tempfile

            args.out_dir = tempfile.mkdtemp(prefix="flm-bench-quick-")
        else:
            args.out_dir = str(HERE / "results" if device_type == "cpu" else HERE / "results" / device_type)
    if args.timeout is None and device_type == "cuda":
        args.timeout = 60.0  # 7 benches in ≤ 5 minutes on one GPU (the train_step bench gets 3x)
    names = [n for n in (args.only or BENCHES) if (HERE / f"{n}.py").exists()]
    machine = common.machine_info(args.device)
    t_start = time.perf_counter()
    results: dict[str, Any] = {}
    for name in names:
        print(f"\n===== {name} (load {common.load_average()}) =====", flush=True)
        t0 = time.perf_counter()
        limit = None if args.timeout is None else args.timeout * (3 if name == "train_step" else 1)
        try:
            with _time_limit(limit):
                res = run_bench(name, args)
        except SystemExit as e:  # a bench that cannot run here (e.g. missing shared data)
            res = {"error": f"SystemExit: {e}"}
        except BenchTimeout:
            res = {"error": f"timed out after {limit:.0f} s (--timeout)"}
        except Exception as e:
            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}"}
        res["_seconds"] = time.perf_counter() - t0
        results[name] = res
        _write(Path(args.out_dir), machine, results, time.perf_counter() - t_start, args.quick)  # row by row
    total = time.perf_counter() - t_start
    out_dir = Path(args.out_dir)
    out = _write(out_dir, machine, results, total, args.quick)
    print(f"\nwrote {out_dir / 'results.json'} and {out_dir / 'RESULTS.md'} ({total / 60:.1f} min)")
    return out


class BenchTimeout(Exception):
    """A bench ran past ``--timeout``."""


@contextlib.contextmanager
def _time_limit(seconds: float | None):
    """Raise :class:`BenchTimeout` in the main thread after ``seconds`` (SIGALRM; no limit if ``None``)."""
    if not seconds or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise BenchTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _write(out_dir: Path, machine: dict, results: dict[str, Any], total: float, quick: bool) -> dict:
    """Write results.json and RESULTS.md (atomically) with the benches finished so far."""
    out = {
        "machine": machine,
        "load_avg_end": common.load_average(),
        "total_seconds": total,
        "quick": quick,
        "benches": results,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    common.write_json(out_dir / "results.json", out)
    tmp = out_dir / "RESULTS.md.tmp"
    tmp.write_text(render_markdown(results, machine, total, quick), encoding="utf-8")
    tmp.replace(out_dir / "RESULTS.md")
    return out


if __name__ == "__main__":
    main()
