"""Checkpoint save/load speed: ``flm.checkpoint`` vs ``torch.save``/``torch.load`` and plain safetensors.

The state is the handout's TinyStories model (vocab 10,000, context 256, d_model 512, 4 layers, 16
heads, d_ff 1,344; 22.7M float32 parameters) plus the AdamW state of
``flm.optim.adamw(1e-3).init(params)`` (m and v: 2x the parameters), 272 MB in all. Rows:

* save, timed in turn (one call of each, then again, ...):

  - ``flm save_checkpoint``: flatten the trees, CRC-32 of every tensor (always computed on save),
    ``safetensors.torch.save`` to bytes, then an atomic write (temp file, ``fsync``, rename,
    ``fsync`` of the directory; ``flm._io``);
  - peer ``torch.save`` of ``{"params": flatten(params), "opt_state": flatten(opt_state)}`` (no fsync);
  - peer ``safetensors.torch.save_file`` of the same tensors as one flat dict (no fsync);
  - peer ``safetensors save + atomic write``: ``safetensors.torch.save`` + ``flm._io.atomic_write_bytes``,
    flm's durability without its checksum and trees (what the CRC and flattening cost on top);

* load, timed in turn:

  - ``flm load_checkpoint verify=False`` and ``verify=True`` (the CRC-32 of every tensor's bytes
    checked against the header; hashed on several threads above 16 MiB), both with
    ``like={"params": ..., "opt_state": ...}`` templates;
  - peer ``torch.load(weights_only=True)`` of the ``torch.save`` file;
  - peer ``safetensors.torch.load_file`` of the flat file.

Every loaded state is compared with the saved one once (untimed). ``ratio vs torch`` / ``ratio vs
safetensors`` = flm time / the peer's time (lower is better). The verify overhead is the median of
the paired differences (verify=True − verify=False, taken in the same round) over the median
verify=False load time. Files go to ``--dir`` (default: the system temp directory) and are read back
from the page cache right after being written, so the load rows measure deserialisation and
copying, not the disk.

    python bench/checkpoint.py [--json out.json] [--quick] [--repeats 5] [--warmup 1] [--dir /tmp]

``--quick``: a tiny model, one timed run per row (a smoke test).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from flm import optim
from flm._io import atomic_write_bytes
from flm.checkpoint import load_checkpoint, save_checkpoint
from flm.model import TransformerConfig, count_params, init_params
from flm.tree import flatten

HANDOUT = TransformerConfig(vocab_size=10_000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344)
QUICK = TransformerConfig(vocab_size=256, context_length=32, d_model=64, num_layers=2, num_heads=4, d_ff=96)

FLM_SAVE, TORCH_SAVE, ST_SAVE, ST_ATOMIC = (
    "flm save_checkpoint",
    "torch.save",
    "safetensors save_file",
    "safetensors save + atomic write",
)
FLM_LOAD, FLM_VERIFY, TORCH_LOAD, ST_LOAD = (
    "flm load_checkpoint verify=False",
    "flm load_checkpoint verify=True",
    "torch.load(weights_only=True)",
    "safetensors load_file",
)
COLUMNS = [
    ("row", "row"),
    ("MB", "file MB"),
    ("median_s", "median s"),
    ("min_s", "min"),
    ("max_s", "max"),
    ("MB_per_s", "MB/s"),
    ("torch_s", "torch s"),
    ("ratio_torch", "ratio vs torch"),
    ("safetensors_s", "safetensors s"),
    ("ratio_safetensors", "ratio vs safetensors"),
    ("verify_overhead", "verify overhead"),
    ("load_1m", "load"),
]


def state_dicts(params: Any, opt_state: Any) -> dict[str, dict[str, torch.Tensor]]:
    """``{"params": {dotted path: tensor}, "opt_state": {...}}``: what the torch.save peer writes."""
    return {"params": flatten(params), "opt_state": flatten(opt_state)}


def flat_tensors(params: Any, opt_state: Any) -> dict[str, torch.Tensor]:
    """One flat ``{"params.<path>" | "opt_state.<path>": tensor}`` dict (flm's key layout) for safetensors.

    Tensors that share storage are copied (safetensors refuses shared storage, as flm does)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for prefix, tree in state_dicts(params, opt_state).items():
        for key, t in tree.items():
            t = t.detach().contiguous()
            if t.numel() and t.untyped_storage().data_ptr() in seen:
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            out[f"{prefix}.{key}"] = t
    return out


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table, return (and with ``--json`` write) the results.

    Args:
        argv: command-line arguments (default ``sys.argv[1:]``).

    Returns:
        :func:`common.make_result`'s dict plus ``config``, ``params``, ``state_bytes`` and ``targets``
        (the verify overhead, informational).

    Raises:
        SystemExit: ``--dir`` is not a directory, or a loaded state differs from the saved one.
    """
    ap = common.make_parser(__doc__.splitlines()[0], dtype=False, device=False, repeats=5)
    ap.add_argument("--dir", default=None, help="where the files are written (default: the system temp directory)")
    args = ap.parse_args(argv)
    if args.dir is not None and not Path(args.dir).is_dir():
        raise SystemExit(f"--dir {args.dir!r} is not a directory")
    from safetensors.torch import load_file, save_file
    from safetensors.torch import save as st_save

    cfg = QUICK if args.quick else HANDOUT
    repeats = 1 if args.quick else args.repeats
    params = init_params(cfg, torch.Generator().manual_seed(0))
    opt_state = optim.adamw(1e-3).init(params)
    dicts = state_dicts(params, opt_state)
    flat = flat_tensors(params, opt_state)
    like = {"params": params, "opt_state": opt_state}
    state_bytes = sum(t.numel() * t.element_size() for t in flat.values())
    print(
        f"model: {count_params(cfg) / 1e6:.1f}M params; params + AdamW state {state_bytes / 1e6:.0f} MB "
        f"in {len(flat)} tensors",
        flush=True,
    )
    notes = [
        (
            f"state: {count_params(cfg):,} params + AdamW m, v (flm.optim.adamw(1e-3).init): "
            f"{state_bytes / 1e6:.1f} MB in {len(flat)} tensors; torch threads {torch.get_num_threads()}"
        )
    ]

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        d = Path(tmp)
        paths = {
            FLM_SAVE: d / "flm.safetensors",
            TORCH_SAVE: d / "state.pt",
            ST_SAVE: d / "flat.safetensors",
            ST_ATOMIC: d / "flat_atomic.safetensors",
        }
        saves = {
            FLM_SAVE: lambda: save_checkpoint(paths[FLM_SAVE], params=params, opt_state=opt_state, step=1, config=cfg),
            TORCH_SAVE: lambda: torch.save(dicts, paths[TORCH_SAVE]),
            ST_SAVE: lambda: save_file(flat, str(paths[ST_SAVE])),
            ST_ATOMIC: lambda: atomic_write_bytes(paths[ST_ATOMIC], st_save(flat)),
        }
        print(f"save: {len(saves)} rows in turn, {repeats} runs each after {args.warmup} warm-up", flush=True)
        save_st = common.measure_interleaved(saves, repeats=repeats, warmup=args.warmup)
        if args.warmup == 0:  # the files must exist for the loads
            for fn in saves.values():
                fn()
        sizes = {k: p.stat().st_size for k, p in paths.items()}

        loads = {
            FLM_LOAD: lambda: load_checkpoint(paths[FLM_SAVE], like=like, verify=False),
            FLM_VERIFY: lambda: load_checkpoint(paths[FLM_SAVE], like=like, verify=True),
            TORCH_LOAD: lambda: torch.load(paths[TORCH_SAVE], weights_only=True, map_location="cpu"),
            ST_LOAD: lambda: load_file(str(paths[ST_SAVE])),
        }
        # Like for like: every reader gets back exactly what was saved (checked once, untimed).
        for name, fn in loads.items():
            got = fn()
            if name in (FLM_LOAD, FLM_VERIFY):
                got = state_dicts(got.params, got.opt_state)
            ok = all(_same(dicts[k], got[k]) for k in dicts) if name != ST_LOAD else _same(flat, got)
            if not ok:
                raise SystemExit(f"{name}: the loaded state differs from the saved one")
            del got
        print(f"load: {len(loads)} rows in turn, {repeats} runs each after {args.warmup} warm-up", flush=True)
        load_st = common.measure_interleaved(loads, repeats=repeats, warmup=args.warmup)

    plain, verified = load_st[FLM_LOAD], load_st[FLM_VERIFY]
    extra = statistics.median(v - p for v, p in zip(verified["times"], plain["times"]))
    overhead = extra / plain["median"]
    rows = []
    file_of = {FLM_LOAD: FLM_SAVE, FLM_VERIFY: FLM_SAVE, TORCH_LOAD: TORCH_SAVE, ST_LOAD: ST_SAVE}
    for op, stats, torch_row, st_row in (
        ("save", save_st, TORCH_SAVE, ST_SAVE),
        ("load", load_st, TORCH_LOAD, ST_LOAD),
    ):
        for name, s in stats.items():
            nbytes = sizes[file_of.get(name, name)]
            is_flm = name.startswith("flm")
            rows.append(
                {
                    "row": name,
                    "op": op,
                    "bytes": nbytes,
                    "MB": nbytes / 1e6,
                    "median_s": s["median"],
                    "min_s": s["min"],
                    "max_s": s["max"],
                    "iqr_s": s["iqr"],
                    "n": s["n"],
                    "MB_per_s": nbytes / s["median"] / 1e6,
                    "torch_s": stats[torch_row]["median"] if is_flm else None,
                    "ratio_torch": s["median"] / stats[torch_row]["median"] if is_flm else None,
                    "safetensors_s": stats[st_row]["median"] if is_flm else None,
                    "ratio_safetensors": s["median"] / stats[st_row]["median"] if is_flm else None,
                    "verify_overhead": overhead if name == FLM_VERIFY else None,
                    "load_1m": s["load_avg_1m"],
                }
            )
    common.print_table(rows, COLUMNS)
    name = "flm load verify=True extra time / verify=False load time (info)"
    targets = {name: common.target(name, overhead)}
    notes.append(
        f"verify=True adds {extra * 1e3:.1f} ms to a {plain['median'] * 1e3:.1f} ms load "
        f"({100 * overhead:.0f} %; median of paired differences)"
    )
    notes.append(
        "flm's save fsyncs the file and its directory (atomic write); torch.save and save_file do not "
        "(the 'safetensors save + atomic write' row has flm's durability without its checksum)"
    )
    result = common.make_result(
        "checkpoint",
        args,
        rows,
        notes,
        config=cfg.to_dict(),
        params=count_params(cfg),
        state_bytes=state_bytes,
        targets=targets,
    )
    return common.finish(result, args)


if __name__ == "__main__":
    main()
