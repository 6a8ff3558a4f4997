"""Tests for flm.accounting, the model's resource accounting (handout §3.6 transformer_accounting
and §4.3 adamwAccounting): parameter counts, forward FLOPs by component (also measured with
torch.utils.flop_counter on a real forward), AdamW training memory and the 80 GB batch size; and
flm.model's re-exports of them (their old import path)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import flm.accounting
import flm.model
from flm.accounting import (
    adamw_step_flops,
    count_params,
    forward_flops,
    max_batch_size,
    train_step_flops,
    training_memory,
)
from flm.model import TransformerConfig, init_params, transformer_lm
from flm.tree import num_elements

# Tolerances: counts are integers and compared exactly; proportions are compared to 3 decimals
# (ABS_SHARE); the measured-FLOP check is exact for flm's own attention.
ABS_SHARE = 5e-4

V, CTX = 50_257, 1_024
GPT2 = {  # (num_layers, d_model, num_heads); d_ff = 4·d_model
    "small": (12, 768, 12),
    "medium": (24, 1024, 16),
    "large": (36, 1280, 20),
    "xl": (48, 1600, 25),
}


def gpt2(name: str, **changes) -> TransformerConfig:
    L, d, h = GPT2[name]
    return TransformerConfig(
        vocab_size=V, context_length=CTX, d_model=d, num_layers=L, num_heads=h, d_ff=4 * d
    ).replace(**changes)


XL = gpt2("xl")
TINYSTORIES = TransformerConfig(
    vocab_size=10_000, context_length=256, d_model=512, num_layers=4, num_heads=16, d_ff=1_344
)


def shares(cfg: TransformerConfig, seq_len: int | None = None) -> dict[str, float]:
    f = forward_flops(cfg, seq_len)
    return {k: v / f["total"] for k, v in f.items() if k != "total"}


# =============================================================================================
# Parameters
# =============================================================================================


def test_gpt2_xl_param_count():
    assert XL.d_ff == 6_400
    assert count_params(XL) == 2_127_057_600
    assert count_params(XL) * 4 / 1e9 == pytest.approx(8.51, abs=0.005)  # GB in float32
    # written out: 2·V·d (embedding + LM head) + L·(4d² + 3·d·d_ff + 2d) + d
    d, L = 1_600, 48
    assert count_params(XL) == 2 * V * d + L * (4 * d * d + 3 * d * 6_400 + 2 * d) + d


def test_tinystories_param_count():
    p = count_params(TINYSTORIES)
    assert p == 22_696_448
    non_embedding = p - TINYSTORIES.vocab_size * TINYSTORIES.d_model  # all but the input embedding table
    assert non_embedding == 17_576_448  # the handout's "about 17M non-embedding parameters"
    assert num_elements(init_params(TINYSTORIES.replace(num_layers=1))) == count_params(
        TINYSTORIES.replace(num_layers=1)
    )


def test_count_params_variants():
    base = count_params(TINYSTORIES)
    d, f, L, v = 512, 1_344, 4, 10_000
    assert count_params(TINYSTORIES.replace(tie_embeddings=True)) == base - v * d
    assert count_params(TINYSTORIES.replace(ffn="silu")) == base - L * d * f
    assert count_params(TINYSTORIES.replace(norm="none")) == base - (2 * L + 1) * d
    assert count_params(TINYSTORIES.replace(position="nope")) == base  # RoPE has no parameters
    assert count_params(TINYSTORIES.replace(norm="post")) == base


# =============================================================================================
# Forward FLOPs
# =============================================================================================


def test_gpt2_xl_forward_flops():
    f = forward_flops(XL)
    s, d, L, dff = CTX, 1_600, 48, 6_400
    assert f == {
        "attention_projections": L * 4 * 2 * s * d * d,  # Q, K, V, O: (s×d)(d×d) each
        "attention_scores": L * 2 * s * s * d,  # Q Kᵀ over all heads
        "attention_values": L * 2 * s * s * d,  # softmax(·) V
        "ffn": L * 3 * 2 * s * d * dff,  # W1, W3 (s×d)(d×d_ff), W2 (s×d_ff)(d_ff×d)
        "lm_head": 2 * s * d * V,
        "total": f["total"],
    }
    assert f["total"] == sum(v for k, v in f.items() if k != "total")
    assert f["total"] == 4_513_336_524_800
    assert f["total"] == pytest.approx(4.513e12, rel=1e-3)
    assert forward_flops(XL, seq_len=CTX) == f
    # FFN is the largest part (~2/3), then the attention projections (~22%)
    sh = shares(XL)
    assert max(sh, key=sh.get) == "ffn"
    assert sh["ffn"] == pytest.approx(0.669, abs=ABS_SHARE)
    assert sh["attention_projections"] == pytest.approx(0.223, abs=ABS_SHARE)


# handout (d): proportions for GPT-2 small / medium / large / XL (d_ff = 4·d_model, SwiGLU, ctx 1024)
EXPECTED_SHARES = {
    "small": dict(
        attention_projections=0.166, attention_scores=0.055, attention_values=0.055, ffn=0.498, lm_head=0.226
    ),
    "medium": dict(
        attention_projections=0.200, attention_scores=0.050, attention_values=0.050, ffn=0.599, lm_head=0.102
    ),
    "large": dict(
        attention_projections=0.214, attention_scores=0.043, attention_values=0.043, ffn=0.642, lm_head=0.058
    ),
    "xl": dict(attention_projections=0.223, attention_scores=0.036, attention_values=0.036, ffn=0.669, lm_head=0.036),
}


@pytest.mark.parametrize("name", list(EXPECTED_SHARES))
def test_gpt2_family_flop_shares(name):
    sh = shares(gpt2(name))
    for k, v in EXPECTED_SHARES[name].items():
        assert sh[k] == pytest.approx(v, abs=ABS_SHARE + 5e-4), k  # table is rounded to 3 decimals
    assert max(sh, key=sh.get) == "ffn"


def test_gpt2_family_trends():
    order = ["small", "medium", "large", "xl"]
    sh = [shares(gpt2(n)) for n in order]
    for a, b in zip(sh, sh[1:]):
        assert b["ffn"] > a["ffn"]  # FFN and projections (∝ d²) grow with width...
        assert b["attention_projections"] > a["attention_projections"]
        assert b["lm_head"] < a["lm_head"]  # ...the LM head (∝ d·V) and scores (∝ s²·d) shrink
        assert b["attention_scores"] < a["attention_scores"]


def test_long_context_attention_share():
    f1, f16 = forward_flops(XL), forward_flops(XL, seq_len=16_384)
    assert forward_flops(XL.replace(context_length=16_384)) == f16
    assert f16["total"] / f1["total"] == pytest.approx(33.13, abs=0.01)  # ≈ 33× the FLOPs for 16× the tokens
    s1, s16 = shares(XL), shares(XL, 16_384)
    assert s16["attention_scores"] == pytest.approx(0.276, abs=ABS_SHARE)
    assert s16["attention_scores"] > 7 * s1["attention_scores"]  # 3.6% → 27.6%
    assert s16["attention_scores"] + s16["attention_values"] > 0.55  # attention now dominates
    assert s16["ffn"] < s1["ffn"] / 2
    # linear parts scale with s, the score parts with s²
    assert f16["ffn"] == 16 * f1["ffn"] and f16["attention_scores"] == 256 * f1["attention_scores"]


def test_silu_ffn_flops():
    assert forward_flops(XL.replace(ffn="silu"))["ffn"] == 2 * forward_flops(XL)["ffn"] // 3


def test_train_and_adamw_flops():
    assert train_step_flops(XL, 1024) == 3 * 1024 * 4_513_336_524_800
    assert train_step_flops(XL, 2, seq_len=10) == 3 * 2 * forward_flops(XL, 10)["total"]
    assert adamw_step_flops(XL) == 15 * 2_127_057_600


@pytest.mark.parametrize("changes", [dict(), dict(ffn="silu", tie_embeddings=True), dict(norm="post", position="nope")])
@pytest.mark.parametrize("batch,seq", [(1, 16), (3, 7)])
def test_forward_flops_match_flop_counter(changes, batch, seq):
    """torch's FlopCounterMode on a real forward (flm attention: every matmul is an mm/bmm)
    counts exactly forward_flops per sequence × batch."""
    cfg = TransformerConfig(
        vocab_size=37, context_length=16, d_model=16, num_layers=2, num_heads=4, d_ff=24, attention="flm", **changes
    )
    params = init_params(cfg)
    ids = torch.randint(0, 37, (batch, seq), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        transformer_lm(params, ids, cfg)
    assert counter.get_total_flops() == batch * forward_flops(cfg, seq)["total"]
    # the matmuls with a weight (mm) are everything but the two attention products (bmm)
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    f = forward_flops(cfg, seq)
    assert counts["aten.bmm"] == batch * (f["attention_scores"] + f["attention_values"])
    assert counts["aten.mm"] == batch * (f["attention_projections"] + f["ffn"] + f["lm_head"])


# =============================================================================================
# Training memory (AdamW, float32)
# =============================================================================================


def _handout_activations(cfg: TransformerConfig, B: int) -> int:
    """Handout closed form (d_ff = 4d, W1/SiLU/W2 FFN), in bytes: 4·B·[L(16sd + 2hs²) + sd + 2sV]."""
    s, d, h, L, v = cfg.context_length, cfg.d_model, cfg.num_heads, cfg.num_layers, cfg.vocab_size
    return 4 * B * (L * (16 * s * d + 2 * h * s * s) + s * d + 2 * s * v)


XL_SILU = XL.replace(ffn="silu")  # the handout's adamwAccounting model: W1, SiLU, W2 with d_ff = 4d


@pytest.mark.parametrize("B", [0, 1, 2, 7])
def test_training_memory_matches_handout_closed_form(B):
    m = training_memory(XL_SILU, B)
    P = count_params(XL_SILU)
    assert P == 1_635_537_600
    assert m["activations"] == _handout_activations(XL_SILU, B)
    assert m["parameters"] == m["gradients"] == 4 * P
    assert m["optimizer_state"] == 2 * 4 * P  # AdamW m and v
    assert m["total"] == 16 * P + _handout_activations(XL_SILU, B)


@given(
    L=st.integers(1, 4),
    h=st.integers(1, 4),
    d_head=st.integers(1, 8),
    s=st.integers(1, 64),
    v=st.integers(1, 100),
    B=st.integers(0, 5),
)
def test_training_memory_closed_form_any_shape(L, h, d_head, s, v, B):
    d = h * d_head * 2
    cfg = TransformerConfig(
        vocab_size=v, context_length=s, d_model=d, num_layers=L, num_heads=h, d_ff=4 * d, ffn="silu"
    )
    assert training_memory(cfg, B)["activations"] == _handout_activations(cfg, B)
    # SwiGLU stores two more (s × d_ff) tensors per layer: the W3 output and the gated product
    swiglu = cfg.replace(ffn="swiglu")
    extra = training_memory(swiglu, B)["activations"] - training_memory(cfg, B)["activations"]
    assert extra == 4 * B * L * 2 * s * 4 * d
    assert training_memory(cfg, B, bytes_per_element=2)["total"] * 2 == training_memory(cfg, B)["total"]


def test_gpt2_xl_max_batch_size_80gb():
    """Handout (b): total = a·B + b bytes. For XL with the W1/SiLU/W2 FFN:
    a = 15,517,753,344 (≈ 15.5 GB of activations per sequence), b = 16·P = 26,168,601,600 (≈ 26.2 GB
    for params, grads and AdamW m, v); (80e9 − b) / a ≈ 3.47, so the largest batch is 3."""
    b = training_memory(XL_SILU, 0)["total"]
    a = training_memory(XL_SILU, 1)["total"] - b
    assert (a, b) == (15_517_753_344, 26_168_601_600)
    assert training_memory(XL_SILU, 5)["total"] == 5 * a + b
    assert max_batch_size(XL_SILU, 80e9) == 3
    assert training_memory(XL_SILU, 3)["total"] <= 80e9 < training_memory(XL_SILU, 4)["total"]
    # the SwiGLU XL (2.13B params, more FFN activations) fits only 2
    assert max_batch_size(XL, 80e9) == 2
    assert max_batch_size(XL_SILU, 10e9) == 0  # the weights and optimizer state alone exceed 10 GB


def test_flm_model_re_exports_the_accounting():
    """Every accounting function keeps its old import path ``flm.model.<name>`` (the same object),
    and ``flm.model`` is the model: it defines none of them itself."""
    names = [n for n in flm.accounting.__all__ if n != "ModelShape"]
    assert names == [
        "count_params",
        "forward_flops",
        "train_step_flops",
        "training_memory",
        "adamw_step_flops",
        "max_batch_size",
    ]
    for name in names:
        assert getattr(flm.model, name) is getattr(flm.accounting, name), name
        assert name in flm.model.__all__, name
        assert getattr(flm.model, name).__module__ == "flm.accounting", name
