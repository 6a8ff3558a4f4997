"""Cross-entropy at a 50K vocabulary: flm's chunked loss vs its whole-batch loss vs ``torch.nn.functional.cross_entropy``.

Forward + backward of the mean loss over ``(tokens, vocab)`` logits (default 2,048 × 50,304, the
GPT-2 vocabulary padded as in the GPU issue; a batch of 2 × 1,024) in ``--dtype`` (default bf16,
what the LM head gives under mixed precision). Rows:

* ``flm chunked (default)``: ``flm.loss.cross_entropy`` as the train step calls it (logits this
  large are processed about 2²⁴ elements at a time);
* ``flm whole``: the same with ``chunk_rows`` = all rows (one float32 upcast of the whole logits);
* ``F.cross_entropy (float32)``: the peer, ``F.cross_entropy(logits.float(), targets)`` (what a
  PyTorch user writes for bf16 logits; the gradient flows back through the upcast).

``speed`` = peer time / row time (> 1: faster than the peer). ``peak extra memory`` = memory the
call needs beyond its inputs: on CUDA ``max_memory_allocated`` above the inputs; on the CPU the
peak RSS (``VmHWM``) of a fresh process running one call, above its peak with the inputs made.

    python bench/cross_entropy.py [--device cpu] [--dtype bf16] [--tokens 2048] [--vocab 50304] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from flm.loss import cross_entropy

ROWS = ("flm chunked (default)", "flm whole", "F.cross_entropy (float32)")


def _inputs(tokens: int, vocab: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator().manual_seed(0)
    # made in its own dtype and scaled in place: no temporary as large as the logits (the CPU
    # child measures the peak above what the inputs took, so a larger earlier peak would hide it)
    logits = torch.randn(tokens, vocab, generator=g, dtype=dtype).mul_(3).to(device).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    return logits, targets


def _call(row: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if row == ROWS[0]:
        loss = cross_entropy(logits, targets, check=False)
    elif row == ROWS[1]:
        loss = cross_entropy(logits, targets, check=False, chunk_rows=targets.numel())
    else:
        loss = F.cross_entropy(logits.float(), targets)
    (grad,) = torch.autograd.grad(loss, logits)
    return grad


def _status_bytes(field: str) -> int:
    """``VmRSS``/``VmHWM`` of this process from ``/proc/self/status`` (Linux). ``VmHWM`` is the
    peak of this process image alone: ``ru_maxrss`` would carry over a forking parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise SystemExit(f"cross_entropy: no {field} in /proc/self/status (the CPU memory column needs Linux)")


def child(row: str, tokens: int, vocab: int, dtype: str) -> int:
    """Peak RSS growth (bytes) of one call in this fresh process, above the RSS with the inputs made."""
    logits, targets = _inputs(tokens, vocab, common.resolve_dtype(dtype), torch.device("cpu"))
    base = max(_status_bytes("VmRSS"), _status_bytes("VmHWM"))
    _call(row, logits, targets)
    return max(0, _status_bytes("VmHWM") - base)


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table, return (and with ``--json`` write) the results."""
    ap = common.make_parser(__doc__.splitlines()[0], repeats=5)
    ap.set_defaults(dtype="bf16")
    ap.add_argument("--tokens", type=int, default=2048, help="rows of the logits (default 2048)")
    ap.add_argument("--vocab", type=int, default=50_304, help="vocabulary size (default 50304)")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        row, tokens, vocab, dtype = args.child
        print(json.dumps(child(row, int(tokens), int(vocab), dtype)))
        return {}
    device = common.check_device(args.device)
    tokens, vocab = (256, 8192) if args.quick else (args.tokens, args.vocab)
    repeats = 1 if args.quick else args.repeats
    dtype = common.resolve_dtype(args.dtype)
    logits, targets = _inputs(tokens, vocab, dtype, device)
    torch.testing.assert_close(_call(ROWS[0], logits, targets), _call(ROWS[2], logits, targets).to(dtype))
    stats = common.measure_interleaved(
        {r: (lambda r=r: _call(r, logits, targets)) for r in ROWS}, device=device, repeats=repeats, warmup=1
    )
    peaks = {}
    for r in ROWS:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            _call(r, logits, targets)
            peaks[r] = torch.cuda.max_memory_allocated(device) - base
        else:
            cmd = [sys.executable, __file__, "--child", r, str(tokens), str(vocab), args.dtype]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            peaks[r] = int(out.stdout.strip().splitlines()[-1])
    peer = stats[ROWS[2]]["median"]
    logit_bytes = logits.numel() * logits.element_size()
    rows = [
        {
            "row": r,
            "shape": f"{tokens}×{vocab} {args.dtype}",
            "median (ms)": stats[r]["median"] * 1e3,
            "min (ms)": stats[r]["min"] * 1e3,
            "speed": peer / stats[r]["median"],
            "peak extra memory (MiB)": peaks[r] / 2**20,
            "× logits size": peaks[r] / logit_bytes,
        }
        for r in ROWS
    ]
    common.print_table(rows, [(k, k) for k in rows[0]])
    name = "peak extra memory of flm chunked / F.cross_entropy (float32) ≤ 0.5"
    ratio = peaks[ROWS[0]] / max(peaks[ROWS[2]], 1)
    notes = [
        "chunked equals the peer's gradient (checked before timing); logits "
        f"{logit_bytes / 2**20:.0f} MiB; the gradient itself (same size) is part of every row's peak"
    ]
    result = common.make_result("cross_entropy", args, rows, notes, targets={name: common.target(name, ratio)})
    return common.finish(result, args)


if __name__ == "__main__":
    main()
