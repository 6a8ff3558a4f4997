"""Training-step throughput: flm's torch.func step vs an equivalent ``torch.nn.Module`` + ``torch.optim.AdamW``.

One full step = forward, backward, global-norm clipping (1.0) and AdamW (lr 1e-3, weight decay 0.01) on
the handout's TinyStories model (vocab 10,000, context 256, d_model 512, 4 layers, 16 heads, d_ff 1,344;
22.7M parameters), batch ``--batch-size`` × ``--seq-len`` (default 8 × 256 on CPU). Rows:

* ``flm eager``: ``flm.train.make_train_step`` (pure: new params and optimiser state every step);
* ``flm eager donate``: ``make_train_step(donate=True)`` + ``adamw(..., inplace=True)``;
* ``torch nn.Module``: the reference written here with the same math (RMSNorm in float32, SwiGLU,
  interleaved RoPE, causal attention as an explicit masked softmax — not SDPA), ``F.cross_entropy``,
  ``loss.backward()``, ``clip_grad_norm_`` and ``torch.optim.AdamW(foreach=True)``; it is
  initialised with flm's weights and its first loss is checked against flm's;
* the same two with ``attention="sdpa"`` (PyTorch's fused attention on both sides);
* ``HF LlamaForCausalLM`` at the same size (if ``transformers`` is installed; its own RoPE layout);
* ``flm compile=True`` (``torch.compile`` of the whole step), timed after compilation; the
  compilation (first call) is its own row.

Eager rows are timed alternately (one step of each in turn) so load from other processes hits all of
them alike. ``MFU`` = ``flm.model.train_step_flops`` / time / the measured float32 matmul peak of the
device (a 2048² matmul timed here). ``ratio`` = row time / reference time (lower is better).

    python bench/train_step.py [--device cpu] [--dtype float32] [--batch-size 8] [--json out.json] [--quick]
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from flm import optim  # noqa: E402
from flm.model import TransformerConfig, count_params, init_params, train_step_flops  # noqa: E402
from flm.train import make_train_step  # noqa: E402
from flm.tree import flatten  # noqa: E402

HANDOUT = TransformerConfig(vocab_size=10_000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344)
QUICK = TransformerConfig(vocab_size=256, context_length=32, d_model=64, num_layers=2, num_heads=4, d_ff=96)
LR, WD, CLIP = 1e-3, 0.01, 1.0


# ------------------------------------------------------------------------------------------
# The reference nn.Module (same math as flm)
# ------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.q_proj, self.k_proj, self.v_proj, self.output_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.h, self.sdpa = cfg.num_heads, cfg.attention == "sdpa"
        dh = cfg.d_head
        inv_freq = cfg.rope_theta ** (-torch.arange(0, dh, 2, dtype=torch.float32) / dh)
        angles = torch.arange(cfg.context_length, dtype=torch.float32)[:, None] * inv_freq
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        mask = torch.ones(cfg.context_length, cfg.context_length, dtype=torch.bool).tril()
        self.register_buffer("mask", mask, persistent=False)

    def rope(self, x: torch.Tensor) -> torch.Tensor:  # interleaved pairs (x_2k, x_2k+1)
        s = x.shape[-2]
        cos, sin = self.cos[:s], self.sin[:s]
        pairs = x.float().unflatten(-1, (-1, 2))
        xe, xo = pairs[..., 0], pairs[..., 1]
        return torch.stack((xe * cos - xo * sin, xe * sin + xo * cos), dim=-1).flatten(-2).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = (p(x).view(b, s, self.h, d // self.h).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.rope(q), self.rope(k)
        if self.sdpa:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
            scores = scores.masked_fill(~self.mask[:s, :s], float("-inf")).float()
            e = (scores - scores.amax(-1, keepdim=True)).exp()
            out = (e / e.sum(-1, keepdim=True)).to(v.dtype) @ v
        return self.output_proj(out.transpose(1, 2).reshape(b, s, d))


class SwiGLU(nn.Module):
    def __init__(self, d: int, d_ff: int) -> None:
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(d, d_ff, bias=False), nn.Linear(d_ff, d, bias=False), nn.Linear(d, d_ff, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.w1(x)
        return self.w2(a * torch.sigmoid(a) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.ln1, self.attn = RMSNorm(cfg.d_model, cfg.eps), Attention(cfg)
        self.ln2, self.ffn = RMSNorm(cfg.d_model, cfg.eps), SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ffn(self.ln2(x))


class ReferenceLM(nn.Module):
    """Pre-norm Transformer LM with flm's parameter names (so ``flm.flatten(params)`` loads into it)."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.token_embeddings = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_final = RMSNorm(cfg.d_model, cfg.eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embeddings(ids)
        for block in self.layers:
            x = block(x)
        return self.lm_head(self.ln_final(x))


def reference_step_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, fused: bool = False):
    """``step() -> loss``: forward, backward, ``clip_grad_norm_``, ``torch.optim.AdamW`` step."""
    kw = {"fused": True} if fused else {"foreach": True}
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, **kw)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, -2).float(), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP, foreach=True)
        opt.step()
        return loss.detach()

    return step


def hf_llama(cfg: TransformerConfig, device: torch.device, dtype: torch.dtype, attn: str):
    """``transformers``' LlamaForCausalLM at ``cfg``'s size, or ``None`` if not installed."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    hc = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
                     num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                     num_key_value_heads=cfg.num_heads, max_position_embeddings=cfg.context_length,
                     rms_norm_eps=cfg.eps, rope_theta=cfg.rope_theta, tie_word_embeddings=False,
                     attention_bias=False, mlp_bias=False, use_cache=False, attn_implementation=attn)
    torch.manual_seed(0)
    model = LlamaForCausalLM(hc).to(device=device, dtype=dtype)
    model.train()

    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=ids, use_cache=False).logits

    return Wrapped()


# ------------------------------------------------------------------------------------------
# flm side
# ------------------------------------------------------------------------------------------


def flm_step_fn(cfg, params, x, y, *, donate: bool = False, compile: bool = False):
    """``step() -> loss`` closing over flm's params/state (replaced each call, as a user's loop does)."""
    tx = optim.chain(optim.clip_by_global_norm(CLIP), optim.adamw(LR, weight_decay=WD, inplace=donate))
    state = {"params": params, "opt": tx.init(params)}
    train_step = make_train_step(cfg, tx, donate=donate, compile=compile)

    def step() -> torch.Tensor:
        state["params"], state["opt"], metrics = train_step(state["params"], state["opt"], x, y)
        return metrics["loss"]

    return step


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table, return (and with ``--json`` write) the results."""
    ap = common.make_parser(__doc__.splitlines()[0], repeats=5)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=None, help="default: the context length (256)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--compile", action="store_true", help="run the compile rows even with --quick")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' LlamaForCausalLM")
    ap.add_argument("--no-sdpa", action="store_true", help="skip the SDPA rows")
    args = ap.parse_args(argv)
    device, dtype = common.check_device(args.device), common.resolve_dtype(args.dtype)
    cfg = QUICK if args.quick else HANDOUT
    batch = 2 if args.quick else args.batch_size
    seq = args.seq_len or cfg.context_length
    repeats = 1 if args.quick else args.repeats
    do_compile = not args.no_compile and (args.compile or not args.quick)
    notes: list[str] = []

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    y = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    flops = train_step_flops(cfg, batch, seq)
    peak = common.matmul_peak_flops(device, dtype, n=512 if args.quick else 2048)
    print(f"model: {count_params(cfg) / 1e6:.1f}M params, batch {batch}×{seq}, {flops / 1e9:.1f} GFLOP/step; "
          f"matmul peak {peak['flops_per_s'] / 1e9:.0f} GFLOP/s ({peak['n']}² {peak['dtype']})", flush=True)

    def fresh_params(c: TransformerConfig):
        return init_params(c, torch.Generator().manual_seed(0), device=device, dtype=dtype)

    def reference(c: TransformerConfig) -> nn.Module:
        m = ReferenceLM(c).to(device=device, dtype=dtype)
        m.load_state_dict({k: v.detach().clone() for k, v in flatten(fresh_params(c)).items()}, strict=True)
        return m

    fns: dict[str, object] = {}
    fns["flm eager"] = flm_step_fn(cfg, fresh_params(cfg), x, y)
    fns["flm eager donate+inplace"] = flm_step_fn(cfg, fresh_params(cfg), x, y, donate=True)
    fns["torch nn.Module"] = reference_step_fn(reference(cfg), x, y)
    if not args.no_sdpa:
        sd = cfg.replace(attention="sdpa")
        fns["flm eager (sdpa)"] = flm_step_fn(sd, fresh_params(sd), x, y)
        fns["torch nn.Module (sdpa)"] = reference_step_fn(reference(sd), x, y)
    if not args.no_hf:
        for attn in ("eager", "sdpa"):
            hf = hf_llama(cfg, device, dtype, attn)
            if hf is None:
                notes.append("transformers not installed: HF LlamaForCausalLM rows skipped (pip install -e '.[bench]')")
                break
            fns[f"HF LlamaForCausalLM ({attn} attn)"] = reference_step_fn(hf, x, y)

    # Same weights, same batch: the first losses must agree (a like-for-like check, not timed).
    l_flm, l_ref = float(fns["flm eager"]()), float(fns["torch nn.Module"]())
    notes.append(f"first-step loss flm {l_flm:.6f} vs nn.Module {l_ref:.6f} (|diff| {abs(l_flm - l_ref):.1e})")
    if abs(l_flm - l_ref) > 1e-3 * max(1.0, abs(l_ref)):
        notes.append("WARNING: flm and the reference disagree; the comparison is not like-for-like")

    print(f"timing {len(fns)} eager rows alternately, {repeats} steps each after {args.warmup} warm-up", flush=True)
    stats = common.measure_interleaved(fns, device=device, repeats=repeats, warmup=args.warmup)

    if do_compile:
        for name, c in (("flm compile=True", cfg),):
            fn = flm_step_fn(c, fresh_params(c), x, y, compile=True)
            print(f"compiling {name} ...", flush=True)
            t_compile = common.time_once(fn, device)
            stats[name] = common.measure(fn, device=device, repeats=repeats, warmup=args.warmup)
            stats[f"{name}: compilation (first call)"] = {"median": t_compile, "min": t_compile, "max": t_compile,
                                                          "iqr": 0.0, "n": 1, "load_avg_1m": common.load_average()[0],
                                                          "compile_row": True}
    elif not args.no_compile:
        notes.append("--quick: compile rows skipped (pass --compile to include them)")

    ref_t = {"": stats["torch nn.Module"]["median"], "(sdpa)": stats.get("torch nn.Module (sdpa)", {}).get("median")}
    rows = []
    for name, s in stats.items():
        is_compile = s.get("compile_row", False)
        peer_name = "torch nn.Module (sdpa)" if "sdpa" in name and ref_t["(sdpa)"] else "torch nn.Module"
        peer = stats[peer_name]["median"]
        rows.append({
            "row": name,
            "shape": [batch, seq],
            "median_s": s["median"],
            "min_s": s["min"],
            "max_s": s["max"],
            "iqr_s": s["iqr"],
            "n": s["n"],
            "tokens_per_s": None if is_compile else batch * seq / s["median"],
            "mfu": None if is_compile else flops / s["median"] / peak["flops_per_s"],
            "peer": None if is_compile or name == peer_name else peer_name,
            "peer_s": None if is_compile or name == peer_name else peer,
            "ratio": None if is_compile or name == peer_name else s["median"] / peer,
            "load_1m": s["load_avg_1m"],
        })
    common.print_table(rows, [("row", "row"), ("shape", "batch×seq"), ("median_s", "median s"), ("min_s", "min"),
                              ("max_s", "max"), ("tokens_per_s", "tok/s"), ("mfu", "MFU"), ("peer_s", "peer s"),
                              ("ratio", "ratio"), ("load_1m", "load")])
    targets = {"flm eager / nn.Module ≤ 1.2": stats["flm eager"]["median"] / stats["torch nn.Module"]["median"]}
    if "flm compile=True" in stats:
        targets["flm compiled / nn.Module eager ≤ 1.0"] = stats["flm compile=True"]["median"] / stats["torch nn.Module"]["median"]
    for k, v in targets.items():
        limit = float(k.rsplit(" ", 1)[1])
        print(f"target {k}: {v:.3f} -> {'met' if v <= limit else 'MISSED'}")
    result = common.make_result("train_step", args, rows, notes, config=cfg.to_dict(), params=count_params(cfg),
                                flops_per_step=flops, matmul_peak=peak,
                                targets={k: {"value": v, "met": v <= float(k.rsplit(' ', 1)[1])} for k, v in targets.items()})
    return common.finish(result, args)


if __name__ == "__main__":
    main()
