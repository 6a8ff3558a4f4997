"""Shared benchmark helpers: device sync, timing, machine info, tables and JSON.

Every bench script builds its command line with :func:`make_parser`, times its rows with
:func:`measure` (one function) or :func:`measure_interleaved` (several functions timed in turn, so
load from other processes on a shared machine hits every side of a comparison alike), prints a
table with :func:`print_table` and returns/writes :func:`make_result`'s dict through :func:`finish`.
Targets are dicts made by :func:`target` from their name ("... ≤ 1.15" or "... ≥ 1.3").

Timing rules:

* warm-up calls first (allocator, kernel selection, lazy init; a ``torch.compile``\\d function
  compiles there, and the compile time is reported as its own row, never inside a timed row);
* on CUDA each call is bracketed by CUDA events and ``torch.cuda.synchronize``; on MPS by
  ``torch.mps.synchronize``; on CPU by ``time.perf_counter``;
* a row reports the median, min, max and inter-quartile range of ``repeats`` calls, and the
  1-minute load average when it was taken; with ``cpu=True`` also the median CPU seconds of this
  process and its finished child processes (see :func:`cpu_seconds`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flm._io import atomic_write_text

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
}


# ------------------------------------------------------------------------------------------
# Machine and device
# ------------------------------------------------------------------------------------------


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (``None`` where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def cpu_model() -> str:
    """The CPU's model name (from ``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Where and when a result was taken: machine, CPU, device, torch version, threads, load."""
    device = torch.device(device)
    info = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{platform.system()} {platform.machine()}",
        "hostname": platform.node(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "load_avg": load_average(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"}
    if malloc:
        info["malloc_env"] = malloc
    return info


def sync(device: torch.device | str) -> None:
    """Wait for all queued work on ``device`` (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def shared_data_dir() -> Path:
    """The shared data folder: ``$FLM_SHARED_DATA``, else ``../shared/data`` or ``shared/data``
    relative to the repository root.

    Raises:
        SystemExit: none of them exists (``run_all`` records the line and goes on).
    """
    env = os.environ.get("FLM_SHARED_DATA")
    for c in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "data", ROOT / "shared" / "data"]:
        if c.is_dir():
            return c
    raise SystemExit("shared data not found: set FLM_SHARED_DATA or place it at ../shared/data")


def resolve_dtype(name: str) -> torch.dtype:
    """``"float32"``/``"bf16"``/... → ``torch.dtype``."""
    try:
        return DTYPES[name]
    except KeyError:
        raise SystemExit(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}") from None


# ------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------


def _timed_call(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its finished, waited-for children.

    A worker pool's processes count once they have exited, so a call that starts and joins a pool
    is measured whole. On a busy machine CPU time shows the work apart from the waiting for a core.
    """
    try:
        import resource

        ch = resource.getrusage(resource.RUSAGE_CHILDREN)
        children = ch.ru_utime + ch.ru_stime
    except ImportError:  # not POSIX
        children = 0.0
    return time.process_time() + children


def summarize(times: Sequence[float]) -> dict[str, Any]:
    """Median, min, max, inter-quartile range and count of a list of seconds."""
    ts = sorted(times)
    if len(ts) >= 4:
        q = statistics.quantiles(ts, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = ts[-1] - ts[0]
    return {
        "median": statistics.median(ts),
        "min": ts[0],
        "max": ts[-1],
        "iqr": iqr,
        "n": len(ts),
        "times": list(times),
    }


def measure(
    fn: Callable[[], object],
    *,
    device: torch.device | str = "cpu",
    repeats: int = 5,
    warmup: int = 1,
    cpu: bool = False,
) -> dict[str, Any]:
    """Time ``fn()`` ``repeats`` times after ``warmup`` untimed calls.

    Returns:
        :func:`summarize`'s dict plus ``load_avg_1m`` (taken after the timed calls) and, with
        ``cpu``, ``cpu`` (median CPU seconds per call, :func:`cpu_seconds`) and ``cpu_times``.
    """
    return measure_interleaved({"fn": fn}, device=device, repeats=repeats, warmup=warmup, cpu=cpu)["fn"]


def measure_interleaved(
    fns: Mapping[str, Callable[[], object]],
    *,
    device: torch.device | str = "cpu",
    repeats: int = 5,
    warmup: int = 1,
    cpu: bool = False,
) -> dict[str, dict[str, Any]]:
    """Time several functions in turn (a, b, c, a, b, c, ...), so background load hits all alike.

    Returns:
        ``{name: stats}`` as :func:`measure`; the ``times`` lists are aligned (the i-th time of
        each function was taken in the same round), so paired differences are meaningful.
    """
    device = torch.device(device)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu_times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, repeats)):
        for k, fn in fns.items():
            c0 = cpu_seconds() if cpu else 0.0
            times[k].append(_timed_call(fn, device))
            if cpu:
                cpu_times[k].append(cpu_seconds() - c0)
    load = (load_average() or [None])[0]
    out = {}
    for k, t in times.items():
        out[k] = {**summarize(t), "load_avg_1m": load}
        if cpu:
            out[k].update(cpu=statistics.median(cpu_times[k]), cpu_times=cpu_times[k])
    return out


def time_once(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Seconds of a single synchronised call (e.g. the first, compiling call of a compiled step)."""
    return _timed_call(fn, torch.device(device))


def measure_first_call(fn: Callable[[], object], device: torch.device | str = "cpu") -> dict[str, Any]:
    """A stats dict (as :func:`measure`'s) for one call of ``fn``, marked ``compile_row``.

    For the first call of a ``torch.compile``\\d function (compilation + one step): reported as a
    row of its own, never inside a timed row.
    """
    t = time_once(fn, device)
    return {
        "median": t,
        "min": t,
        "max": t,
        "iqr": 0.0,
        "n": 1,
        "times": [t],
        "load_avg_1m": (load_average() or [None])[0],
        "compile_row": True,
    }


def matmul_peak_flops(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5
) -> dict[str, Any]:
    """Measured matmul throughput of the device: the median time of an ``n×n @ n×n`` product.

    Returns:
        ``{"n", "dtype", "seconds", "flops_per_s"}`` with ``2·n³`` FLOPs per product (the best of
        ``repeats``, as a peak).
    """
    device = torch.device(device)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    stats = measure(lambda: torch.mm(a, b, out=out), device=device, repeats=repeats, warmup=2)
    return {
        "n": n,
        "dtype": str(dtype).removeprefix("torch."),
        "seconds": stats["min"],
        "flops_per_s": 2 * n**3 / stats["min"],
        "load_avg_1m": stats["load_avg_1m"],
    }


# ------------------------------------------------------------------------------------------
# Command line, tables, JSON
# ------------------------------------------------------------------------------------------


def make_parser(
    description: str, *, dtype: bool = True, device: bool = True, repeats: int = 5
) -> argparse.ArgumentParser:
    """The flags every bench shares: ``--json --quick --repeats --warmup``, and ``--device``/``--dtype``
    unless the bench runs on the CPU only / has no dtype to choose."""
    ap = argparse.ArgumentParser(description=description)
    if device:
        ap.add_argument("--device", default="cpu", help="cpu, cuda or mps (default cpu)")
    if dtype:
        ap.add_argument("--dtype", default="float32", help="parameter/compute dtype (default float32)")
    ap.add_argument("--json", default=None, help="also write the results here as JSON")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one timed iteration (smoke test)")
    ap.add_argument("--repeats", type=int, default=repeats, help=f"timed runs per row (default {repeats})")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (default 1)")
    return ap


def check_device(device: str) -> torch.device:
    """Validate ``--device`` (exit with a clear line when it is not available)."""
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if d.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise SystemExit("--device mps: MPS is not available")
    return d


def fmt(x: Any, digits: int = 3) -> str:
    """A compact string for a table cell (floats to ``digits`` significant figures)."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 1e5 or abs(x) < 1e-3:
            return f"{x:.{digits - 1}e}"
        return f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.0f}"
    if isinstance(x, (list, tuple)):
        return "×".join(str(v) for v in x)
    return str(x)


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> None:
    """Print ``rows`` as a fixed-width table; ``columns`` are ``(key, header)`` pairs."""
    cells = [[fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h) in enumerate(columns)]
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, ((_, h), w) in enumerate(zip(columns, widths))))
    for c in cells:
        print("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(c, widths))), flush=True)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]] | None = None) -> str:
    """``rows`` as a GitHub markdown table (all scalar keys, in first-seen order, by default)."""
    if columns is None:
        keys: list[str] = []
        for r in rows:
            for k, v in r.items():
                short_list = isinstance(v, (list, tuple)) and len(v) <= 4 and not k.endswith("times")
                if k not in keys and (short_list or not isinstance(v, (dict, list, tuple))):
                    keys.append(k)
        columns = [(k, k) for k in keys]
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON atomically (:func:`flm._io.atomic_write_text`), creating the
    directory; values JSON cannot encode (dtypes, paths) are written as their ``str``."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps(data, indent=2, default=str) + "\n")


_TARGET = re.compile(r"(≤|<=|≥|>=)\s*([-+0-9.eE]+)\s*$")


def target(name: str, value: float | None) -> dict[str, Any]:
    """A target entry: ``name`` ends in its threshold, ``"... ≤ 1.15"`` or ``"... ≥ 1.3"`` (``<=``/``>=``
    too); a name without one (e.g. ``"... (info)"``) is informational.

    Returns:
        ``{"value", "op", "threshold", "met"}``: ``op`` is ``"≤"``/``"≥"`` or ``None``; ``met`` is
        ``value ≤/≥ threshold``, or ``None`` when informational or ``value`` is ``None``.
    """
    m = _TARGET.search(name)
    if m is None:
        return {"value": value, "op": None, "threshold": None, "met": None}
    op = "≤" if m.group(1) in ("≤", "<=") else "≥"
    threshold = float(m.group(2))
    met = None if value is None else (value <= threshold if op == "≤" else value >= threshold)
    return {"value": value, "op": op, "threshold": threshold, "met": met}


def format_target(name: str, entry: Mapping[str, Any]) -> str:
    """``"target <name>: <value> -> met|MISSED"`` (no verdict for an informational target)."""
    value = entry.get("value")
    met = entry.get("met")
    text = f"target {name}: " + ("–" if value is None else f"{value:.3f}")
    return text + ("" if met is None else f" -> {'met' if met else 'MISSED'}")


def make_result(bench: str, args: argparse.Namespace, rows: list[dict], notes: list[str], **extra: Any) -> dict:
    """The dict every bench returns: ``{"bench", "machine", "args", "rows", "notes", ...}``."""
    return {
        "bench": bench,
        "machine": machine_info(getattr(args, "device", "cpu")),
        "args": vars(args),
        "rows": rows,
        "notes": notes,
        **extra,
    }


def finish(result: dict, args: argparse.Namespace) -> dict:
    """Print the targets, notes and machine line, write ``--json`` if asked, return ``result``."""
    for name, entry in (result.get("targets") or {}).items():
        print(format_target(name, entry))
    for n in result["notes"]:
        print("note:", n)
    m = result["machine"]
    print(
        f"machine: {m['cpu']} ({m['cpu_count']} CPUs, {m['torch_threads']} torch threads), torch {m['torch']}, "
        f"{m['date']}, load avg {m['load_avg']}"
    )
    if args.json:
        write_json(args.json, result)
    return result
