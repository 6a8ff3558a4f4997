"""Tests for flm.model: the LM against an nn.Module Llama-style reference written here, gradients
(torch.func vs autograd), fused vs own attention, causality, config ablations and validation,
initialisation.

The reference loads flm's parameters with ``load_state_dict(flm.flatten(params))`` (strict), so
its state-dict keys are checked to be exactly flm's flattened keys.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn as tnn

import flm
from flm import nn
from flm.loss import cross_entropy
from flm.model import TransformerConfig, count_params, init_params, transformer_lm
from flm.tree import num_elements

# ---------------------------------------------------------------------------------------------
# Tolerances (assert_close rtol/atol) used throughout this file.
# ---------------------------------------------------------------------------------------------
F64 = dict(rtol=1e-9, atol=1e-10)  # float64 flm vs float64 reference (forward and gradients)
F32 = dict(rtol=1e-4, atol=1e-5)  # float32 attention="sdpa" vs attention="flm"
BF16_REL = 0.05  # bfloat16 LM logits vs float32: max error ≤ 5% of the logits' max magnitude
EXACT = dict(rtol=0.0, atol=0.0)

TINY = TransformerConfig(vocab_size=37, context_length=16, d_model=16, num_layers=2, num_heads=4, d_ff=24)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ids(*shape: int, vocab: int = TINY.vocab_size, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=_gen(seed))


def _perturbed_params(config: TransformerConfig, seed: int = 0, dtype=torch.float64):
    """init_params, with the RMSNorm gains randomised too (so a swapped gain would show)."""
    params = init_params(config, _gen(seed), dtype=dtype)
    g = _gen(seed + 1000)
    return flm.tree.tree_map(
        lambda t: t + 0.1 * torch.randn(t.shape, generator=g, dtype=torch.float64).to(dtype) if t.dim() == 1 else t,
        params,
    )


# =============================================================================================
# The reference: a Llama-style nn.Module, written independently of flm
# =============================================================================================


class RefRMSNorm(tnn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = tnn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def ref_rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE on interleaved pairs (x0, x1), (x2, x3), ... at positions 0..seq-1; x: (..., seq, d)."""
    s, d = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.outer(torch.arange(s, dtype=torch.float64), inv_freq)
    c, sn = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * c - odd * sn, even * sn + odd * c), dim=-1).flatten(-2)


class RefAttention(tnn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d = cfg.d_model
        self.q_proj, self.k_proj, self.v_proj, self.output_proj = (tnn.Linear(d, d, bias=False) for _ in range(4))
        self.h = cfg.num_heads
        self.theta = cfg.rope_theta if cfg.position == "rope" else None

    def forward(self, x):  # (b, s, d)
        b, s, d = x.shape
        q, k, v = (
            p(x).view(b, s, self.h, d // self.h).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        if self.theta is not None:
            q, k = ref_rope(q, self.theta), ref_rope(k, self.theta)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.output_proj(o.transpose(1, 2).reshape(b, s, d))


class RefFFN(tnn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.w1 = tnn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w2 = tnn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.gated = cfg.ffn == "swiglu"
        if self.gated:
            self.w3 = tnn.Linear(cfg.d_model, cfg.d_ff, bias=False)

    def forward(self, x):
        hidden = F.silu(self.w1(x))
        return self.w2(hidden * self.w3(x) if self.gated else hidden)


class RefBlock(tnn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.norm = cfg.norm
        if cfg.norm != "none":
            self.ln1 = RefRMSNorm(cfg.d_model, cfg.eps)
        self.attn = RefAttention(cfg)
        if cfg.norm != "none":
            self.ln2 = RefRMSNorm(cfg.d_model, cfg.eps)
        self.ffn = RefFFN(cfg)

    def forward(self, x):
        if self.norm == "pre":  # handout eq. (15)
            x = x + self.attn(self.ln1(x))
            return x + self.ffn(self.ln2(x))
        if self.norm == "post":  # handout §7.3
            x = self.ln1(x + self.attn(x))
            return self.ln2(x + self.ffn(x))
        x = x + self.attn(x)
        return x + self.ffn(x)


class RefLM(tnn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embeddings = tnn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = tnn.ModuleList(RefBlock(cfg) for _ in range(cfg.num_layers))
        if cfg.norm != "none":
            self.ln_final = RefRMSNorm(cfg.d_model, cfg.eps)
        if not cfg.tie_embeddings:
            self.lm_head = tnn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, ids):  # (..., s)
        lead, s = ids.shape[:-1], ids.shape[-1]
        x = self.token_embeddings(ids.reshape(-1, s))
        for layer in self.layers:
            x = layer(x)
        if self.cfg.norm != "none":
            x = self.ln_final(x)
        w = self.token_embeddings.weight if self.cfg.tie_embeddings else self.lm_head.weight
        return F.linear(x, w).reshape(*lead, s, -1)


def _reference(cfg: TransformerConfig, params) -> RefLM:
    ref = RefLM(cfg).to(torch.float64)
    ref.load_state_dict(flm.flatten(params), strict=True)
    return ref


# =============================================================================================
# Parameter keys
# =============================================================================================


def test_flattened_keys_are_the_reference_state_dict_keys():
    cfg = TINY.replace(num_layers=1)
    keys = set(flm.flatten(init_params(cfg)))
    assert keys == {
        "token_embeddings.weight",
        "layers.0.ln1.weight",
        "layers.0.attn.q_proj.weight",
        "layers.0.attn.k_proj.weight",
        "layers.0.attn.v_proj.weight",
        "layers.0.attn.output_proj.weight",
        "layers.0.ln2.weight",
        "layers.0.ffn.w1.weight",
        "layers.0.ffn.w2.weight",
        "layers.0.ffn.w3.weight",
        "ln_final.weight",
        "lm_head.weight",
    }
    for variant in (cfg, cfg.replace(norm="none", ffn="silu", tie_embeddings=True, num_layers=3)):
        assert set(flm.flatten(init_params(variant))) == set(RefLM(variant).state_dict())


def test_param_shapes():
    p = flm.flatten(init_params(TINY))
    d, f, v = TINY.d_model, TINY.d_ff, TINY.vocab_size
    assert p["token_embeddings.weight"].shape == (v, d)
    assert p["lm_head.weight"].shape == (v, d)
    assert p["layers.1.attn.q_proj.weight"].shape == (d, d)
    assert p["layers.1.ffn.w1.weight"].shape == (f, d)
    assert p["layers.1.ffn.w2.weight"].shape == (d, f)
    assert p["layers.1.ffn.w3.weight"].shape == (f, d)
    assert p["ln_final.weight"].shape == (d,)


# =============================================================================================
# The LM against the reference (float64)
# =============================================================================================

VARIANTS = [
    dict(),
    dict(norm="post"),
    dict(norm="none"),
    dict(ffn="silu"),
    dict(position="nope"),
    dict(tie_embeddings=True),
    dict(attention="sdpa"),
    dict(norm="post", ffn="silu", position="nope", tie_embeddings=True),
]


@pytest.mark.parametrize("changes", VARIANTS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_lm_matches_reference(changes):
    cfg = TINY.replace(**changes)
    params = _perturbed_params(cfg)
    ids = _ids(2, 9)
    logits = transformer_lm(params, ids, cfg)
    assert logits.shape == (2, 9, cfg.vocab_size) and logits.dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(logits, _reference(cfg, params)(ids), **F64)


@pytest.mark.parametrize("changes", [dict(), dict(norm="post", ffn="silu"), dict(norm="none", position="nope")])
def test_block_matches_reference_block(changes):
    cfg = TINY.replace(**changes)
    block = _perturbed_params(cfg)["layers"][1]
    ref = RefBlock(cfg).to(torch.float64)
    ref.load_state_dict(flm.flatten(block), strict=True)
    x = torch.randn(3, 7, cfg.d_model, dtype=torch.float64, generator=_gen(5))
    with torch.no_grad():
        torch.testing.assert_close(nn.transformer_block(block, x, cfg.block), ref(x), **F64)


@pytest.mark.parametrize("shape", [(9,), (3, 9), (2, 3, 9), (1, 1)])
def test_lm_any_leading_dims(shape):
    params = _perturbed_params(TINY)
    ids = _ids(*shape)
    logits = transformer_lm(params, ids, TINY)
    assert logits.shape == (*shape, TINY.vocab_size)
    flat = transformer_lm(params, ids.reshape(-1, shape[-1]), TINY)
    torch.testing.assert_close(logits.reshape(flat.shape), flat, **F64)
    with torch.no_grad():
        torch.testing.assert_close(logits, _reference(TINY, params)(ids), **F64)
    torch.testing.assert_close(transformer_lm(params, ids, TINY.replace(attention="sdpa")), logits, **F64)


def test_full_context_length():
    params = _perturbed_params(TINY)
    ids = _ids(2, TINY.context_length)
    with torch.no_grad():
        torch.testing.assert_close(transformer_lm(params, ids, TINY), _reference(TINY, params)(ids), **F64)


def _lm_loss(params, x, y, cfg):
    return cross_entropy(transformer_lm(params, x, cfg, check_ids=False), y)


@pytest.mark.parametrize(
    "changes", [dict(), dict(tie_embeddings=True, norm="post", ffn="silu")], ids=["default", "variant"]
)
def test_func_grad_equals_autograd_float64(changes):
    cfg = TINY.replace(**changes)
    params = _perturbed_params(cfg)
    x, y = _ids(2, 8, seed=1), _ids(2, 8, seed=2)
    grads = torch.func.grad(_lm_loss)(params, x, y, cfg)
    # autograd on leaf tensors, same function
    leaves = flm.tree.tree_map(lambda t: t.detach().clone().requires_grad_(True), params)
    _lm_loss(leaves, x, y, cfg).backward()
    torch.testing.assert_close(grads, flm.tree.tree_map(lambda t: t.grad, leaves), **F64)
    # autograd through the independent reference module and F.cross_entropy
    ref = _reference(cfg, params)
    F.cross_entropy(ref(x).reshape(-1, cfg.vocab_size), y.reshape(-1)).backward()
    ref_grads = {k: p.grad for k, p in ref.named_parameters()}
    assert set(ref_grads) == set(flm.flatten(grads))
    torch.testing.assert_close(flm.flatten(grads), ref_grads, **F64)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, F32), (torch.float64, F64)])
def test_sdpa_equals_flm_attention_lm_forward_and_grad(dtype, tol):
    params = _perturbed_params(TINY, dtype=dtype)
    x, y = _ids(3, 10, seed=3), _ids(3, 10, seed=4)
    sdpa = TINY.replace(attention="sdpa")
    torch.testing.assert_close(transformer_lm(params, x, sdpa), transformer_lm(params, x, TINY), **tol)
    g_flm = torch.func.grad_and_value(_lm_loss)(params, x, y, TINY)
    g_sdpa = torch.func.grad_and_value(_lm_loss)(params, x, y, sdpa)
    torch.testing.assert_close(g_sdpa, g_flm, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_lm_dtypes(dtype):
    params64 = _perturbed_params(TINY)
    params = flm.tree.tree_map(lambda t: t.to(dtype), params64)
    ids = _ids(2, 8)
    logits = transformer_lm(params, ids, TINY)
    assert logits.dtype == dtype
    assert torch.isfinite(logits).all()
    ref = transformer_lm(flm.tree.tree_map(lambda t: t.float(), params), ids, TINY)
    err = (logits.float() - ref).abs().max().item()
    bound = {torch.float32: 0.0, torch.bfloat16: BF16_REL, torch.float64: 1e-5}[dtype] * ref.abs().max().item()
    assert err <= bound, (dtype, err, bound)
    assert cross_entropy(logits, ids).dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


# =============================================================================================
# Properties: causality, RoPE relativity, NoPE, post-norm formula
# =============================================================================================


_PARAMS_TINY = {"rope": _perturbed_params(TINY), "nope": _perturbed_params(TINY.replace(position="nope"))}


@given(
    s=st.integers(2, TINY.context_length),
    data=st.data(),
    attention=st.sampled_from(["flm", "sdpa"]),
    position=st.sampled_from(["rope", "nope"]),
)
def test_lm_is_causal(s, data, attention, position):
    cfg = TINY.replace(attention=attention, position=position)
    params = _PARAMS_TINY[position]
    t = data.draw(st.integers(0, s - 2))
    ids = torch.tensor(data.draw(st.lists(st.integers(0, cfg.vocab_size - 1), min_size=s, max_size=s)))
    other = ids.clone()
    deltas = data.draw(st.lists(st.integers(1, cfg.vocab_size - 1), min_size=s - t - 1, max_size=s - t - 1))
    other[t + 1 :] = (ids[t + 1 :] + torch.tensor(deltas)) % cfg.vocab_size  # every later token changes
    a, b = transformer_lm(params, ids, cfg), transformer_lm(params, other, cfg)
    torch.testing.assert_close(a[: t + 1], b[: t + 1], **F64)
    assert not torch.allclose(a[t + 1 :], b[t + 1 :])  # the later positions do see the change


@given(shift=st.integers(1, 5000), s=st.integers(1, 8), seed=st.integers(0, 1000))
def test_rope_lm_depends_only_on_relative_positions(shift, s, seed):
    """Shifting all positions by a constant leaves RoPE attention (hence the logits) unchanged."""
    ids = _ids(2, s, seed=seed)
    pos = torch.arange(s)
    a = transformer_lm(_PARAMS_TINY["rope"], ids, TINY, pos)
    b = transformer_lm(_PARAMS_TINY["rope"], ids, TINY, pos + shift)
    torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-8)


def test_nope_ignores_positions_and_rope_does_not():
    ids = _ids(2, 6)
    nope = TINY.replace(position="nope")
    pos = torch.tensor([3, 1, 4, 1, 5, 9])
    a = transformer_lm(_PARAMS_TINY["nope"], ids, nope)
    torch.testing.assert_close(transformer_lm(_PARAMS_TINY["nope"], ids, nope, pos), a, **EXACT)
    r = transformer_lm(_PARAMS_TINY["rope"], ids, TINY)
    assert not torch.allclose(transformer_lm(_PARAMS_TINY["rope"], ids, TINY, pos), r)


def _rms(g, x, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g


@pytest.mark.parametrize("norm", ["pre", "post", "none"])
@pytest.mark.parametrize("ffn", ["swiglu", "silu"])
def test_block_matches_handout_formulas(norm, ffn):
    """Handout eq. (15) (pre-norm) and §7.3 (post-norm: z = RMSNorm(x + MHA(x)),
    y = RMSNorm(z + FFN(z)); and the SiLU FFN W2·SiLU(W1 x)), written out directly."""
    cfg = TINY.replace(norm=norm, ffn=ffn)
    block = _perturbed_params(cfg)["layers"][0]
    x = torch.randn(2, 5, cfg.d_model, dtype=torch.float64, generator=_gen(7))

    def mha(h):
        return nn.multihead_self_attention(block["attn"], h, cfg.num_heads, cfg.rope_theta)

    def ffn_(h):
        w = block["ffn"]
        a = F.silu(h @ w["w1"]["weight"].T)
        if ffn == "swiglu":
            a = a * (h @ w["w3"]["weight"].T)
        return a @ w["w2"]["weight"].T

    if norm == "pre":
        z = x + mha(_rms(block["ln1"]["weight"], x, cfg.eps))
        y = z + ffn_(_rms(block["ln2"]["weight"], z, cfg.eps))
    elif norm == "post":
        z = _rms(block["ln1"]["weight"], x + mha(x), cfg.eps)
        y = _rms(block["ln2"]["weight"], z + ffn_(z), cfg.eps)
    else:
        z = x + mha(x)
        y = z + ffn_(z)
    torch.testing.assert_close(nn.transformer_block(block, x, cfg.block), y, **F64)
    if norm == "post":  # post-norm outputs are normalised: RMS = gain (here the gains are ≈ 1 ± 0.1·noise)
        torch.testing.assert_close(
            y / block["ln2"]["weight"], _rms(1.0, y / block["ln2"]["weight"], 0.0), rtol=1e-4, atol=1e-4
        )


# =============================================================================================
# Errors
# =============================================================================================


def test_lm_input_errors():
    params = init_params(TINY)
    with pytest.raises(ValueError, match="seq_len=17 exceeds context_length=16"):
        transformer_lm(params, _ids(2, 17), TINY)
    with pytest.raises(ValueError, match="seq_len"):
        transformer_lm(params, torch.zeros(2, 0, dtype=torch.long), TINY)
    with pytest.raises(ValueError, match="seq_len"):
        transformer_lm(params, torch.tensor(3), TINY)
    bad = _ids(2, 5)
    bad[1, 3] = 37
    with pytest.raises(ValueError, match=r"token id 37 .*vocab_size=37"):
        transformer_lm(params, bad, TINY)
    bad[1, 3] = -2
    with pytest.raises(ValueError, match=r"token id -2 .*vocab_size=37"):
        transformer_lm(params, bad, TINY)
    with pytest.raises(ValueError, match="integer"):
        transformer_lm(params, torch.zeros(2, 5), TINY)
    with pytest.raises(ValueError, match="token_positions has 4 positions"):
        transformer_lm(params, _ids(2, 5), TINY, torch.arange(4))


def test_check_ids_false_skips_the_value_check(monkeypatch):
    calls = []
    monkeypatch.setattr(flm.model, "check_token_ids", lambda ids, v: calls.append(v))
    params = init_params(TINY)
    transformer_lm(params, _ids(2, 5), TINY, check_ids=False)
    assert calls == []
    transformer_lm(params, _ids(2, 5), TINY)
    assert calls == [TINY.vocab_size]


def test_check_token_ids():
    flm.model.check_token_ids(torch.tensor([0, 36]), 37)
    flm.model.check_token_ids(torch.zeros(0, dtype=torch.long), 37)
    with pytest.raises(ValueError, match="token id 99 is outside \\[0, vocab_size=37\\)"):
        flm.model.check_token_ids(torch.tensor([[1, 99], [100, 2]]), 37)


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(d_model=18, num_heads=4), "d_model=18 is not divisible by num_heads=4"),
        (dict(d_model=12, num_heads=4), "even head dimension"),  # d_head = 3 with RoPE
        (dict(norm="layer"), "norm must be one of"),
        (dict(ffn="gelu"), "ffn must be one of"),
        (dict(position="alibi"), "position must be one of"),
        (dict(attention="flash"), "attention must be one of"),
        (dict(vocab_size=0), "vocab_size must be a positive int"),
        (dict(context_length=-1), "context_length must be a positive int"),
        (dict(d_model=0), "d_model must be a positive int"),
        (dict(num_layers=0), "num_layers must be a positive int"),
        (dict(num_heads=0), "num_heads must be a positive int"),
        (dict(d_ff=0), "d_ff must be a positive int"),
        (dict(d_ff=2.5), "d_ff must be a positive int"),
        (dict(num_layers=True), "num_layers must be a positive int"),
        (dict(rope_theta=0.0), "rope_theta must be positive"),
        (dict(eps=0.0), "eps must be positive"),
    ],
)
def test_config_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        TINY.replace(**changes)
    with pytest.raises(ValueError, match=match):
        TransformerConfig(**{**TINY.to_dict(), **changes})


def test_config_odd_head_dim_allowed_with_nope_and_round_trips():
    cfg = TINY.replace(d_model=12, num_heads=4, position="nope")
    assert cfg.d_head == 3
    transformer_lm(init_params(cfg), _ids(1, 4), cfg)
    assert TransformerConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        TransformerConfig.from_dict({**cfg.to_dict(), "dropout": 0.1})


# =============================================================================================
# Config ablations: parameter keys and count_params (hypothesis over small valid configs)
# =============================================================================================


@st.composite
def _configs(draw):
    heads = draw(st.integers(1, 3))
    d_head = draw(st.integers(1, 3)) * 2
    return TransformerConfig(
        vocab_size=draw(st.integers(1, 20)),
        context_length=draw(st.integers(1, 8)),
        d_model=heads * d_head,
        num_layers=draw(st.integers(1, 3)),
        num_heads=heads,
        d_ff=draw(st.integers(1, 10)),
        norm=draw(st.sampled_from(["pre", "post", "none"])),
        ffn=draw(st.sampled_from(["swiglu", "silu"])),
        position=draw(st.sampled_from(["rope", "nope"])),
        tie_embeddings=draw(st.booleans()),
    )


@given(cfg=_configs())
def test_ablation_configs_run_and_count_params(cfg):
    params = init_params(cfg)
    assert count_params(cfg) == num_elements(params)
    keys = set(flm.flatten(params))
    assert ("lm_head.weight" in keys) == (not cfg.tie_embeddings)
    assert ("ln_final.weight" in keys) == (cfg.norm != "none")
    for i in range(cfg.num_layers):
        assert (f"layers.{i}.ln1.weight" in keys) == (cfg.norm != "none")
        assert (f"layers.{i}.ln2.weight" in keys) == (cfg.norm != "none")
        assert (f"layers.{i}.ffn.w3.weight" in keys) == (cfg.ffn == "swiglu")
        assert f"layers.{i}.ffn.w1.weight" in keys and f"layers.{i}.attn.output_proj.weight" in keys
    assert f"layers.{cfg.num_layers}.attn.q_proj.weight" not in keys
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.context_length), generator=_gen(0))
    logits = transformer_lm(params, ids, cfg)
    assert logits.shape == (2, cfg.context_length, cfg.vocab_size)
    assert torch.isfinite(logits).all()


# =============================================================================================
# init_params (handout §3.4.1)
# =============================================================================================


def test_init_params_seeds_dtype_device():
    a, b = init_params(TINY, _gen(1)), init_params(TINY, _gen(1))
    c = init_params(TINY, _gen(2))
    fa, fb, fc = flm.flatten(a), flm.flatten(b), flm.flatten(c)
    assert all(torch.equal(fa[k], fb[k]) for k in fa)
    assert all(
        not torch.equal(fa[k], fc[k]) for k in fa if not k.endswith(("ln1.weight", "ln2.weight", "ln_final.weight"))
    )
    # no generator: a fixed default seed, so a plain call is reproducible
    d1, d2 = flm.flatten(init_params(TINY)), flm.flatten(init_params(TINY))
    assert all(torch.equal(d1[k], d2[k]) for k in d1)
    # layers are distinct draws
    assert not torch.equal(fa["layers.0.attn.q_proj.weight"], fa["layers.1.attn.q_proj.weight"])
    for dtype in (torch.float64, torch.bfloat16):
        p = flm.flatten(init_params(TINY, _gen(1), device="cpu", dtype=dtype))
        assert all(t.dtype == dtype and t.device.type == "cpu" for t in p.values())
        assert torch.equal(p["layers.0.ffn.w2.weight"], fa["layers.0.ffn.w2.weight"].to(dtype))
    assert all(t.dtype == torch.float32 for t in fa.values())


def test_init_params_distribution():
    cfg = TransformerConfig(vocab_size=500, context_length=8, d_model=128, num_layers=1, num_heads=4, d_ff=344)
    p = flm.flatten(init_params(cfg, _gen(0)))
    emb = p["token_embeddings.weight"]
    assert emb.abs().max() <= 3.0 and emb.std().item() == pytest.approx(0.986, abs=0.02)
    for key, (d_in, d_out) in {
        "layers.0.attn.q_proj.weight": (128, 128),
        "layers.0.ffn.w1.weight": (128, 344),
        "layers.0.ffn.w2.weight": (344, 128),
        "lm_head.weight": (128, 500),
    }.items():
        sigma = math.sqrt(2.0 / (d_in + d_out))
        w = p[key]
        assert w.abs().max() <= 3 * sigma * (1 + 1e-6), key
        assert w.std().item() == pytest.approx(0.986 * sigma, rel=0.05), key
    for key in ("layers.0.ln1.weight", "layers.0.ln2.weight", "ln_final.weight"):
        assert torch.equal(p[key], torch.ones(128))
    tied = flm.flatten(init_params(cfg.replace(tie_embeddings=True), _gen(0)))["token_embeddings.weight"]
    assert tied.std().item() == pytest.approx(0.986 / math.sqrt(128), rel=0.05)  # 1/√d_model for a shared table


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_init_and_forward_match_cpu():
    """Same seed → same parameters on every device (drawn on the generator's device, then moved)."""
    cpu = init_params(TINY, _gen(3))
    gpu = init_params(TINY, _gen(3), device="cuda")
    for k, t in flm.flatten(gpu).items():
        assert t.device.type == "cuda"
        torch.testing.assert_close(t.cpu(), flm.flatten(cpu)[k], **EXACT)
    ids = _ids(2, 9)
    for attention in ("flm", "sdpa"):
        cfg = TINY.replace(attention=attention)
        out = transformer_lm(gpu, ids.cuda(), cfg)
        torch.testing.assert_close(out.cpu(), transformer_lm(cpu, ids, cfg), rtol=1e-3, atol=1e-3)  # TF32 matmuls


# =============================================================================================
# RoPE tables: built once per forward and shared by every layer (issue 20 item 6)
# =============================================================================================

DEEP3 = TINY.replace(num_layers=3)


def _count_rope_tables(monkeypatch) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    """Wrap ``flm.nn.rope_tables`` (what attention calls) to record each construction's dtype and shape."""
    calls: list[tuple[torch.dtype, tuple[int, ...]]] = []
    real = nn.rope_tables

    def counting(*args, **kwargs):
        cos, sin = real(*args, **kwargs)
        calls.append((cos.dtype, tuple(cos.shape)))
        return cos, sin

    monkeypatch.setattr(nn, "rope_tables", counting)
    return calls


def _per_layer_tables_lm(params, ids, config, positions=None):
    """The forward as it was before issue 20 item 6: each block builds its own tables."""
    x = nn.embedding(params["token_embeddings"], ids)
    for layer in params["layers"]:
        x = nn.transformer_block(layer, x, config.block, positions, rope_cache=None)
    x = nn.rms_norm(params["ln_final"], x, config.eps)
    return nn.linear(params["lm_head"], x)


@pytest.mark.parametrize("positions", [None, "shared", "per-row"])
def test_rope_tables_are_built_once_per_forward_and_the_logits_are_unchanged(monkeypatch, positions):
    """A 3-layer forward builds RoPE's tables once (the per-layer forward builds them 3 times) and
    gives bitwise the same logits, with default, shared and per-row positions."""
    params = init_params(DEEP3, _gen(0), dtype=torch.float64)
    ids = _ids(2, 7)
    pos = {
        None: None,
        "shared": torch.tensor([3, 4, 5, 6, 7, 8, 9]),
        "per-row": torch.tensor([[0, 1, 2, 3, 4, 5, 6], [9, 10, 11, 12, 13, 14, 15]]),
    }[positions]
    calls = _count_rope_tables(monkeypatch)
    before = _per_layer_tables_lm(params, ids, DEEP3, pos)
    assert len(calls) == DEEP3.num_layers  # the counter sees every construction
    calls.clear()
    after = transformer_lm(params, ids, DEEP3, pos)
    assert len(calls) == 1, f"{len(calls)} RoPE table constructions for one forward"
    torch.testing.assert_close(after, before, **EXACT)


@pytest.mark.parametrize(
    ("param_dtype", "table_dtype"),
    [(torch.bfloat16, torch.float32), (torch.float32, torch.float32), (torch.float64, torch.float64)],
)
def test_rope_tables_are_built_in_the_compute_dtype(monkeypatch, param_dtype, table_dtype):
    """The shared tables are float32 for bf16/float32 activations and float64 for float64 (as each
    layer built them), shaped ``(..., 1, seq_len, d_head/2)`` to broadcast over heads, and every
    block receives that one pair."""
    params = init_params(DEEP3, _gen(0), dtype=param_dtype)
    calls = _count_rope_tables(monkeypatch)
    received = []

    def block_fn(layer, x, block, token_positions, *, attend=None, rope_cache=None):
        received.append(rope_cache)
        return nn.transformer_block(layer, x, block, token_positions, attend=attend, rope_cache=rope_cache)

    out = transformer_lm(params, _ids(2, 5), DEEP3, block_fn=block_fn)
    assert calls == [(table_dtype, (1, 5, DEEP3.d_head // 2))]
    assert len(received) == DEEP3.num_layers and all(r is received[0] for r in received)
    assert received[0][0].dtype == table_dtype and out.dtype == param_dtype


def test_nope_builds_no_rope_tables(monkeypatch):
    """position="nope": no tables are built and the blocks receive ``rope_cache=None``."""
    nope = DEEP3.replace(position="nope")
    calls = _count_rope_tables(monkeypatch)
    received = []

    def block_fn(layer, x, block, token_positions, *, attend=None, rope_cache=None):
        received.append(rope_cache)
        return nn.transformer_block(layer, x, block, token_positions, attend=attend, rope_cache=rope_cache)

    transformer_lm(init_params(nope, _gen(0)), _ids(1, 4), nope, block_fn=block_fn)
    assert calls == [] and received == [None] * nope.num_layers


def test_a_rope_cache_that_does_not_fit_is_refused():
    """Tables for another sequence length or head size, or tables for a NoPE block, are a ValueError."""
    params = init_params(TINY, _gen(0))
    layer, x = params["layers"][0], torch.randn(2, 5, TINY.d_model, generator=_gen(1))
    wrong_len = nn.attention_rope_tables(x[:, :4], TINY.num_heads, TINY.rope_theta)
    with pytest.raises(ValueError, match=r"rope_cache's cos table has shape \(1, 4, 2\), expected .*\(\.\.\., 5, 2\)"):
        nn.transformer_block(layer, x, TINY.block, rope_cache=wrong_len)
    wrong_head = nn.attention_rope_tables(x, TINY.num_heads // 2, TINY.rope_theta)
    with pytest.raises(ValueError, match=r"rope_cache's cos table has shape \(1, 5, 4\)"):
        nn.multihead_self_attention(layer["attn"], x, TINY.num_heads, TINY.rope_theta, rope_cache=wrong_head)
    fits = nn.attention_rope_tables(x, TINY.num_heads, TINY.rope_theta)
    with pytest.raises(ValueError, match="rope_cache given but rope_theta is None"):
        nn.attention_qkv(layer["attn"], x, TINY.num_heads, None, rope_cache=fits)
