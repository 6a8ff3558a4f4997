"""Causal attention forward+backward: flm's masked-softmax attention vs ``F.scaled_dot_product_attention``.

For each sequence length (default 128, 256, 512, 1024, 2048) with ``--batch-size`` (default 2) × 16
heads × d_head 32, one call = forward of ``flm.nn.scaled_dot_product_attention(q, k, v,
causal_mask(s))`` (or PyTorch's SDPA with ``is_causal=True``, the peer) and backward of
``out.sum()`` into q, k and v. The two sides are timed alternately; ``ratio`` = flm time / SDPA
time. Also reported: attention FLOPs (4·b·h·s²·d forward, ×3 with backward, the causal half not
subtracted) and the achieved GFLOP/s.

    python bench/attention.py [--device cpu] [--dtype float32] [--seq-lens 128 256 ...] [--json out.json] [--quick]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from flm.nn import causal_mask, scaled_dot_product_attention


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table, return (and with ``--json`` write) the results."""
    ap = common.make_parser(__doc__.splitlines()[0], repeats=5)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--d-head", type=int, default=32)
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    args = ap.parse_args(argv)
    device, dtype = common.check_device(args.device), common.resolve_dtype(args.dtype)
    seq_lens = [32, 64] if args.quick else args.seq_lens
    b, h, d = (1, 2, 8) if args.quick else (args.batch_size, args.heads, args.d_head)
    repeats = 1 if args.quick else args.repeats
    rows: list[dict] = []
    notes: list[str] = []
    cols = [
        ("shape", "b×h×s×d"),
        ("flm_s", "flm s"),
        ("flm_min_s", "min"),
        ("flm_max_s", "max"),
        ("peer_s", "sdpa s"),
        ("ratio", "ratio"),
        ("flm_gflops", "flm GF/s"),
        ("peer_gflops", "sdpa GF/s"),
        ("max_abs_err", "max|Δout|"),
        ("load_1m", "load"),
    ]
    for s in seq_lens:
        g = torch.Generator().manual_seed(s)
        q, k, v = (
            torch.randn(b, h, s, d, generator=g).to(device=device, dtype=dtype).requires_grad_() for _ in range(3)
        )
        mask = causal_mask(s, device=device)

        def flm_fb(q=q, k=k, v=v, mask=mask) -> None:
            out = scaled_dot_product_attention(q, k, v, mask)
            torch.autograd.grad(out.sum(), (q, k, v))

        def sdpa_fb(q=q, k=k, v=v) -> None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            torch.autograd.grad(out.sum(), (q, k, v))

        with torch.no_grad():
            err = (
                (scaled_dot_product_attention(q, k, v, mask) - F.scaled_dot_product_attention(q, k, v, is_causal=True))
                .abs()
                .max()
            )
        st = common.measure_interleaved(
            {"flm": flm_fb, "sdpa": sdpa_fb}, device=device, repeats=repeats, warmup=args.warmup
        )
        flops = 3 * 4 * b * h * s * s * d
        row = {
            "seq_len": s,
            "shape": [b, h, s, d],
            "flm_s": st["flm"]["median"],
            "flm_min_s": st["flm"]["min"],
            "flm_max_s": st["flm"]["max"],
            "flm_iqr_s": st["flm"]["iqr"],
            "peer": "F.scaled_dot_product_attention",
            "peer_s": st["sdpa"]["median"],
            "peer_min_s": st["sdpa"]["min"],
            "peer_max_s": st["sdpa"]["max"],
            "ratio": st["flm"]["median"] / st["sdpa"]["median"],
            "flm_gflops": flops / st["flm"]["median"] / 1e9,
            "peer_gflops": flops / st["sdpa"]["median"] / 1e9,
            "max_abs_err": float(err),
            "n": st["flm"]["n"],
            "load_1m": st["flm"]["load_avg_1m"],
        }
        rows.append(row)
        print(f"seq {s}: flm {row['flm_s']:.4f} s, sdpa {row['peer_s']:.4f} s", flush=True)
    common.print_table(rows, cols)
    notes.append(
        "flm materialises the (s × s) score and probability matrices per head (memory O(b·h·s²)); "
        "SDPA on CPU uses a blocked flash-style kernel"
    )
    return common.finish(common.make_result("attention", args, rows, notes), args)


if __name__ == "__main__":
    main()
