"""Training-step throughput: flm's torch.func step against Hugging Face ``LlamaForCausalLM`` and a
``torch.nn.Module`` reference, in the same process.

One full step = forward, backward, global-norm clipping (1.0) and AdamW (lr 1e-3, weight decay 0.01)
on the handout's TinyStories model (vocab 10,000, context 256, d_model 512, 4 layers, 16 heads,
d_ff 1,344; 22.7M parameters), at each ``--shapes`` batch×sequence (default 4×128 and 8×256). Rows:

* ``flm default (train loop)``: what ``flm train`` runs: ``make_train_step(donate=True)`` with
  ``clip_by_global_norm(inplace=True)`` + ``adamw(inplace=True)``, attention "auto" (fused SDPA);
* ``flm make_train_step (pure)``: the library default: new params and optimiser state every step;
* ``flm attention=flm``: flm's own masked-softmax attention (the reference kernel);
* ``flm compile=True``: the train-loop step under ``torch.compile`` (timed after compilation; the
  compilation is its own row);
* ``flm compile='blocks'``: the same step with one compiled Transformer block reused by every
  layer and the rest eager (compile time independent of depth; its compilation is its own row);
* ``HF LlamaForCausalLM``: ``transformers``' Llama at the same size, SDPA attention,
  ``F.cross_entropy``, ``loss.backward()``, ``clip_grad_norm_`` and ``torch.optim.AdamW(foreach=True)``
  (the peer of every row: ``speed`` = peer time / row time, > 1 means flm is faster);
* ``torch nn.Module``: a reference written here with flm's math (explicit masked-softmax
  attention, interleaved RoPE), initialised with flm's weights; its first loss is checked against flm's.

Eager rows are timed alternately (one step of each in turn) so load from other processes hits all
of them alike. ``MFU`` = ``flm.model.train_step_flops`` / time / the measured float32 matmul peak
of the device (a 2048² matmul timed here).

    python bench/train_step.py [--device cpu] [--dtype auto] [--shapes 4x128 8x256] [--json out.json] [--quick]

On CUDA the defaults are a GPU user's: ``--dtype auto`` = bf16 mixed precision (float32 weights;
flm's ``compute_dtype``, the torch peers under ``torch.autocast``), the shapes
``handout:128x256`` and ``gpt2-small:16x1024`` (d_model 768, 12 layers, 12 heads, d_ff 2,048,
vocab 50,304), the peer with ``torch.optim.AdamW(fused=True)``, and in the compiled rows the peer
is ``torch.compile(model)``; MFU is against the GPU's datasheet peak (989 TFLOP/s bf16 on
H100/H200 SXM).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

from flm import optim
from flm.model import TransformerConfig, count_params, init_params, train_step_flops
from flm.train import make_train_step
from flm.tree import flatten

HANDOUT = TransformerConfig(vocab_size=10_000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1344)
QUICK = TransformerConfig(vocab_size=256, context_length=32, d_model=64, num_layers=2, num_heads=4, d_ff=96)
# A GPT-2-small-sized Llama (124M-class: d_model 768, 12 layers, 12 heads; vocab padded to 50,304).
GPT2_SMALL = TransformerConfig(
    vocab_size=50_304, context_length=1024, d_model=768, num_layers=12, num_heads=12, d_ff=2048
)
# The cpu-small preset's model (what flm train runs without a GPU): d_model 256, 4 layers, vocab 4,096.
CPU_SMALL = TransformerConfig(vocab_size=4096, context_length=128, d_model=256, num_layers=4, num_heads=8, d_ff=704)
MODELS = {"handout": HANDOUT, "gpt2-small": GPT2_SMALL, "cpu-small": CPU_SMALL, "quick": QUICK}
# On a GPU: the handout model at its own batch, and GPT-2 small at 16 x 1,024 (issue "Fast on a GPU").
CUDA_SHAPES = ["handout:128x256", "gpt2-small:16x1024"]
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
        q, k, v = (
            p(x).view(b, s, self.h, d // self.h).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
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
        self.w1, self.w2, self.w3 = (
            nn.Linear(d, d_ff, bias=False),
            nn.Linear(d_ff, d, bias=False),
            nn.Linear(d, d_ff, bias=False),
        )

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


def reference_step_fn(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, fused: bool = False, autocast: torch.dtype | None = None
):
    """``step() -> loss``: forward, backward, ``clip_grad_norm_``, ``torch.optim.AdamW`` step;
    ``autocast`` runs the forward under ``torch.autocast`` (mixed precision, float32 weights)."""
    kw = {"fused": True} if fused else {"foreach": True}
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, **kw)
    device_type = x.device.type

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=autocast or torch.float32, enabled=autocast is not None):
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
    hc = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.context_length,
        rms_norm_eps=cfg.eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        use_cache=False,
        attn_implementation=attn,
    )
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


def flm_step_fn(cfg, params, x, y, *, donate: bool = False, compile: bool | str = False, compute_dtype=None):
    """``step() -> loss`` closing over flm's params/state (replaced each call, as a user's loop does);
    ``donate`` is the training loop's setting (clip and AdamW in place, donated params);
    ``compute_dtype`` bf16 is ``flm train``'s mixed precision (float32 params)."""
    tx = optim.chain(optim.clip_by_global_norm(CLIP, inplace=donate), optim.adamw(LR, weight_decay=WD, inplace=donate))
    state = {"params": params, "opt": tx.init(params)}
    train_step = make_train_step(cfg, tx, donate=donate, compile=compile, compute_dtype=compute_dtype)

    def step() -> torch.Tensor:
        state["params"], state["opt"], metrics = train_step(state["params"], state["opt"], x, y)
        return metrics["loss"]

    return step


PEER = "HF LlamaForCausalLM (sdpa) + AdamW"
PEER_COMPILED = "HF LlamaForCausalLM compiled (torch.compile(model))"
BLOCKS = "flm compile='blocks'"
DEFAULT = "flm default (train loop)"


def _shape(text: str, default: TransformerConfig = HANDOUT) -> tuple[TransformerConfig, int, int]:
    """``"[model:]BxS"`` → (model config, batch, seq), e.g. ``gpt2-small:16x1024``."""
    model, _, shape = text.lower().rpartition(":")
    if model and model not in MODELS:
        raise SystemExit(f"unknown model {model!r} in --shapes {text!r}; choose from {sorted(MODELS)}")
    b, s = shape.split("x")
    return (MODELS[model] if model else default), int(b), int(s)


def _name(cfg: TransformerConfig) -> str:
    """The name of a bench model (``handout``, ``gpt2-small``, …)."""
    return next((k for k, v in MODELS.items() if v == cfg), "custom")


def run_shape(cfg, batch: int, seq: int, device, dtype, args, peak: dict, notes: list[str]) -> list[dict]:
    """All rows at one batch×seq; returns table rows. ``dtype`` ``"bf16-mixed"`` keeps float32
    weights and runs bf16 matmuls (flm ``compute_dtype``; the torch peers under ``torch.autocast``)."""
    mixed = dtype == "bf16-mixed"
    compute_dtype = torch.bfloat16 if mixed else None
    dtype = torch.float32 if mixed else dtype
    fused_adam = device.type == "cuda"  # the peer's fastest optimiser on a GPU
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    y = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    flops = train_step_flops(cfg, batch, seq)
    repeats = 1 if args.quick else args.repeats

    def fresh_params(c: TransformerConfig):
        return init_params(c, torch.Generator().manual_seed(0), device=device, dtype=dtype)

    fns: dict[str, object] = {}
    fns[DEFAULT] = flm_step_fn(cfg, fresh_params(cfg), x, y, donate=True, compute_dtype=compute_dtype)
    fns["flm make_train_step (pure)"] = flm_step_fn(cfg, fresh_params(cfg), x, y, compute_dtype=compute_dtype)
    ref_cfg = cfg.replace(attention="flm")
    fns["flm attention=flm"] = flm_step_fn(
        ref_cfg, fresh_params(ref_cfg), x, y, donate=True, compute_dtype=compute_dtype
    )
    ref = ReferenceLM(ref_cfg).to(device=device, dtype=dtype)
    ref.load_state_dict({k: v.detach().clone() for k, v in flatten(fresh_params(ref_cfg)).items()}, strict=True)
    fns["torch nn.Module (flm's math)"] = reference_step_fn(ref, x, y, autocast=compute_dtype)
    hf = None if args.no_hf else hf_llama(cfg, device, dtype, "sdpa")
    if hf is not None:
        fns[PEER] = reference_step_fn(hf, x, y, fused=fused_adam, autocast=compute_dtype)
    elif not args.no_hf:
        notes.append("transformers not installed: HF rows skipped (pip install -e '.[bench]')")
    # Same weights, same batch: the first losses must agree (a like-for-like check, not timed).
    l_flm, l_ref = float(fns["flm attention=flm"]()), float(fns["torch nn.Module (flm's math)"]())
    notes.append(
        f"{batch}x{seq}: first-step loss flm {l_flm:.6f} vs nn.Module {l_ref:.6f} (|diff| {abs(l_flm - l_ref):.1e})"
    )
    print(
        f"{batch}x{seq}: timing {len(fns)} eager rows alternately, {repeats} steps each after {args.warmup} warm-up",
        flush=True,
    )
    stats = common.measure_interleaved(fns, device=device, repeats=repeats, warmup=args.warmup)
    if not args.no_compile and (args.compile or not args.quick):
        fn = flm_step_fn(cfg, fresh_params(cfg), x, y, donate=True, compile=True, compute_dtype=compute_dtype)
        print(f"{batch}x{seq}: compiling ...", flush=True)
        first = common.measure_first_call(fn, device)
        blocks = flm_step_fn(cfg, fresh_params(cfg), x, y, donate=True, compile="blocks", compute_dtype=compute_dtype)
        first_blocks = common.measure_first_call(blocks, device)
        both = {"flm compile=True": fn, BLOCKS: blocks}
        if PEER in fns and device.type == "cuda":
            # On a GPU the peer is compiled too (torch.compile(model)), as a GPU user would run it.
            peer_c = reference_step_fn(torch.compile(hf), x, y, fused=fused_adam, autocast=compute_dtype)
            stats[f"{PEER_COMPILED}: compilation (first call)"] = common.measure_first_call(peer_c, device)
            both[PEER_COMPILED] = peer_c
        elif PEER in fns:
            both[PEER] = fns[PEER]
        # timed alternately with the peer again, so both see the same load
        again = common.measure_interleaved(both, device=device, repeats=repeats, warmup=args.warmup)
        stats["flm compile=True"] = again["flm compile=True"]
        stats[BLOCKS] = again[BLOCKS]
        if PEER_COMPILED in again:
            stats[PEER_COMPILED] = again[PEER_COMPILED]
        elif PEER in again:
            stats[f"{PEER} (timed with compile)"] = again[PEER]
        stats["flm compile=True: compilation (first call)"] = first
        stats[f"{BLOCKS}: compilation (first call)"] = first_blocks
    rows = []
    for name, s in stats.items():
        is_compile = s.get("compile_row", False)
        peer_name = PEER
        if name in ("flm compile=True", BLOCKS):
            peer_name = next((p for p in (PEER_COMPILED, f"{PEER} (timed with compile)") if p in stats), PEER)
        peer = stats.get(peer_name, {}).get("median")
        is_peer = name.startswith(PEER)
        rows.append(
            {
                "row": name,
                "model": _name(cfg),
                "shape": [batch, seq],
                "median_s": s["median"],
                "min_s": s["min"],
                "max_s": s["max"],
                "iqr_s": s["iqr"],
                "n": s["n"],
                "tokens_per_s": None if is_compile else batch * seq / s["median"],
                "mfu": None if is_compile else flops / s["median"] / peak["flops_per_s"],
                "peer": None if is_compile or is_peer or peer is None else peer_name,
                "peer_s": None if is_compile or is_peer else peer,
                "speed_vs_peer": None if is_compile or is_peer or peer is None else peer / s["median"],
                "load_1m": s["load_avg_1m"],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark, print the table, return (and with ``--json`` write) the results."""
    ap = common.make_parser(__doc__.splitlines()[0], repeats=7)
    ap.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        help="[model:]batch x sequence length, e.g. 4x128 or gpt2-small:16x1024 (models: handout, gpt2-small; "
        f"default 4x128 8x256 on the CPU, {' '.join(CUDA_SHAPES)} on CUDA)",
    )
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--compile", action="store_true", help="run the compile rows even with --quick")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers' LlamaForCausalLM")
    ap.set_defaults(dtype="auto")
    args = ap.parse_args(argv)
    device = common.check_device(args.device)
    if args.dtype == "auto":  # what flm train picks: bf16 mixed precision on CUDA, float32 elsewhere
        args.dtype = "bf16-mixed" if device.type == "cuda" else "float32"
    dtype = "bf16-mixed" if args.dtype == "bf16-mixed" else common.resolve_dtype(args.dtype)
    cfg = QUICK if args.quick else HANDOUT
    if args.quick:
        shapes = [(QUICK, 2, 16)]
    else:
        shapes = [_shape(t) for t in (args.shapes or (CUDA_SHAPES if device.type == "cuda" else ["4x128", "8x256"]))]
    notes: list[str] = []
    matmul_dtype = torch.bfloat16 if dtype == "bf16-mixed" else dtype
    peak = common.matmul_peak_flops(device, matmul_dtype, n=512 if args.quick else 2048)
    if device.type == "cuda":
        from flm.train.metrics import device_peak_flops

        sheet = device_peak_flops(device, matmul_dtype)
        if sheet:  # MFU against the datasheet peak (989e12 dense bf16 on H100/H200 SXM), as the field reports it
            notes.append(
                f"MFU against the datasheet peak {sheet / 1e12:.0f} TFLOP/s; measured matmul peak {peak['flops_per_s'] / 1e12:.0f}"
            )
            peak = {**peak, "flops_per_s": sheet}
    print(
        "models: "
        + ", ".join(sorted({f"{_name(c)} {count_params(c) / 1e6:.1f}M params" for c, _, _ in shapes}))
        + f"; matmul peak {peak['flops_per_s'] / 1e9:.0f} GFLOP/s "
        f"({peak['n']}² {peak['dtype']})",
        flush=True,
    )
    rows = [r for c, b, s in shapes for r in run_shape(c, b, s, device, dtype, args, peak, notes)]
    common.print_table(
        rows,
        [
            ("row", "row"),
            ("model", "model"),
            ("shape", "batch×seq"),
            ("median_s", "median s"),
            ("min_s", "min"),
            ("max_s", "max"),
            ("tokens_per_s", "tok/s"),
            ("mfu", "MFU"),
            ("peer_s", "HF s"),
            ("speed_vs_peer", "speed vs HF"),
            ("load_1m", "load"),
        ],
    )
    targets = {}  # speed = HF time / flm time: higher is better
    for r in rows:
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        if r["row"] == DEFAULT and r["speed_vs_peer"] is not None:
            name = f"{shape} speed of flm default eager vs HF eager ≥ 1.0"
            targets[name] = common.target(name, r["speed_vs_peer"])
        if r["row"] == "flm compile=True" and r["speed_vs_peer"] is not None:
            if r["peer"] == PEER_COMPILED:  # the GPU targets of the issue "Fast on a GPU"
                goal = 1.5 if r["model"] == "handout" else 1.4
                name = f"{r['model']} {shape} speed of flm compile=True vs HF compiled ≥ {goal}"
            else:
                name = f"{shape} speed of flm compile=True vs HF eager ≥ 1.3"
            targets[name] = common.target(name, r["speed_vs_peer"])
    result = common.make_result(
        "train_step",
        args,
        rows,
        notes,
        config=cfg.to_dict(),
        params=count_params(cfg),
        matmul_peak=peak,
        targets=targets,
    )
    return common.finish(result, args)


if __name__ == "__main__":
    main()
