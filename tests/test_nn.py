"""Tests for flm.nn: each layer against a PyTorch oracle, hypothesis properties, shapes, dtypes,
error messages and initialisers.

Oracles are computed in the test with ``torch.nn.functional`` (and, for RoPE, the handout's
explicit block-diagonal rotation matrix, eqs. (8)–(9)).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from flm import nn

# ---------------------------------------------------------------------------------------------
# Tolerances (assert_close rtol/atol) used throughout this file.
# ---------------------------------------------------------------------------------------------
F64 = dict(rtol=1e-10, atol=1e-12)  # float64 oracle comparisons: only summation order differs
F32 = dict(rtol=1e-5, atol=1e-5)  # float32 vs float32 (fused SDPA vs flm attention, etc.)
F32_VS_F64 = dict(rtol=1e-4, atol=1e-5)  # a float32 run against the same computation in float64
BF16 = dict(rtol=3e-2, atol=3e-2)  # bfloat16 (8-bit mantissa, ~4e-3 relative per op) vs float32
EXACT = dict(rtol=0.0, atol=0.0)

DTYPES = [torch.float32, torch.bfloat16, torch.float64]
LEADING = [(), (2,), (2, 3), (2, 1, 3)]  # 0, 1, 2 and 3 leading batch dims


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64).to(dtype)


def _tensor(draw, shape: tuple[int, ...], lo: float = -10.0, hi: float = 10.0) -> torch.Tensor:
    """Draw a float64 tensor of ``shape`` from a hypothesis seed (fast: one draw per tensor)."""
    seed = draw(st.integers(0, 2**31 - 1))
    return torch.empty(shape, dtype=torch.float64).uniform_(lo, hi, generator=_gen(seed))


# =============================================================================================
# Oracles
# =============================================================================================


@pytest.mark.parametrize("lead", LEADING)
def test_linear_matches_F_linear(lead):
    w = _randn(5, 7, seed=1)
    x = _randn(*lead, 7, seed=2)
    torch.testing.assert_close(nn.linear({"weight": w}, x), F.linear(x, w), **F64)


@pytest.mark.parametrize("shape", [(), (4,), (2, 4), (2, 3, 4)])
def test_embedding_matches_F_embedding(shape):
    w = _randn(11, 6)
    ids = torch.randint(0, 11, shape, generator=_gen(3))
    out = nn.embedding({"weight": w}, ids)
    assert out.shape == (*shape, 6)
    torch.testing.assert_close(out, F.embedding(ids, w), **EXACT)


@pytest.mark.parametrize("lead", LEADING)
@pytest.mark.parametrize("eps", [1e-5, 1e-2])
def test_rms_norm_matches_F_rms_norm(lead, eps):
    x = _randn(*lead, 8, seed=4)
    g = _randn(8, seed=5)
    torch.testing.assert_close(nn.rms_norm({"weight": g}, x, eps), F.rms_norm(x, (8,), g, eps), **F64)
    # handout eq. (4) written out
    direct = x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps) * g
    torch.testing.assert_close(nn.rms_norm({"weight": g}, x, eps), direct, **F64)


def test_silu_matches_F_silu():
    x = _randn(3, 17) * 5
    torch.testing.assert_close(nn.silu(x), F.silu(x), **F64)


@pytest.mark.parametrize("lead", LEADING)
def test_swiglu_and_silu_ffn_match_formula(lead):
    d, f = 6, 10
    w1, w2, w3 = _randn(f, d, seed=1), _randn(d, f, seed=2), _randn(f, d, seed=3)
    x = _randn(*lead, d, seed=4)
    p = {"w1": {"weight": w1}, "w2": {"weight": w2}, "w3": {"weight": w3}}
    expected = F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)  # handout eq. (7)
    torch.testing.assert_close(nn.swiglu(p, x), expected, **F64)
    expected_silu = F.linear(F.silu(F.linear(x, w1)), w2)  # handout eq. (25)
    torch.testing.assert_close(nn.silu_ffn({"w1": p["w1"], "w2": p["w2"]}, x), expected_silu, **F64)


@pytest.mark.parametrize("dim", [0, 1, -1, -2])
def test_softmax_matches_F_softmax(dim):
    x = _randn(3, 4, 5) * 20
    torch.testing.assert_close(nn.softmax(x, dim), F.softmax(x, dim), **F64)


def _random_mask(shape, seed):
    """A random bool mask in which every query row attends to at least one key (key 0)."""
    m = torch.rand(shape, generator=_gen(seed)) < 0.6
    m[..., 0] = True
    return m


@pytest.mark.parametrize(
    "q_shape,mask_shape",
    [
        ((2, 4, 8), None),  # 3-D (batch, queries, d_k)
        ((2, 4, 8), (4, 5)),  # 3-D with a (queries, keys) mask broadcast over the batch
        ((2, 4, 8), (2, 4, 5)),
        ((2, 3, 4, 8), (2, 3, 4, 5)),  # 4-D (batch, heads, queries, d_k)
        ((2, 3, 4, 8), (2, 1, 4, 5)),  # mask broadcast over heads
        ((2, 3, 4, 8), (4, 5)),
    ],
)
def test_attention_matches_F_sdpa(q_shape, mask_shape):
    n_keys, d_v = 5, 7
    q = _randn(*q_shape, seed=1)
    k = _randn(*q_shape[:-2], n_keys, q_shape[-1], seed=2)
    v = _randn(*q_shape[:-2], n_keys, d_v, seed=3)
    mask = None if mask_shape is None else _random_mask(mask_shape, 4)
    out = nn.scaled_dot_product_attention(q, k, v, mask)
    assert out.shape == (*q_shape[:-1], d_v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), **F64)


def test_attention_causal_matches_F_sdpa_is_causal():
    q, k, v = _randn(2, 3, 6, 4, seed=1), _randn(2, 3, 6, 4, seed=2), _randn(2, 3, 6, 4, seed=3)
    out = nn.scaled_dot_product_attention(q, k, v, nn.causal_mask(6))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), **F64)


@pytest.mark.parametrize("nq,nk", [(1, 1), (4, 4), (3, 7)])
def test_causal_mask(nq, nk):
    m = nn.causal_mask(nq, nk)
    assert m.dtype == torch.bool and m.shape == (nq, nk)
    # query i is the (nk - nq + i)-th position of the key sequence
    assert torch.equal(m, torch.ones(nq, nk, dtype=torch.bool).tril(diagonal=nk - nq))
    assert torch.equal(nn.causal_mask(nq), torch.ones(nq, nq, dtype=torch.bool).tril())


def _rope_matrix(i: int, d: int, theta: float) -> torch.Tensor:
    """The handout's R^i (eqs. 8–9): block-diagonal, block k rotates (x_{2k-1}, x_{2k}) by
    θ_{i,k} = i / Θ^{(2k-2)/d}, k = 1..d/2 (the standard RoPE frequencies), in float64."""
    r = torch.zeros(d, d, dtype=torch.float64)
    for k in range(1, d // 2 + 1):
        a = i / theta ** ((2 * k - 2) / d)
        c, s = math.cos(a), math.sin(a)
        j = 2 * (k - 1)
        r[j : j + 2, j : j + 2] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    return r


@pytest.mark.parametrize("theta", [10000.0, 100.0])
@pytest.mark.parametrize("d", [2, 8, 16])
def test_rope_matches_explicit_rotation_matrix(theta, d):
    positions = torch.tensor([0, 1, 2, 7, 100, 1023])
    x = _randn(3, len(positions), d, seed=d)
    out = nn.rope(x, positions, theta)
    expected = torch.stack(
        [torch.einsum("ij,bj->bi", _rope_matrix(int(p), d, theta), x[:, t]) for t, p in enumerate(positions)], dim=1
    )
    torch.testing.assert_close(out, expected, **F64)
    # float32 input: computed in float32, close to the float64 oracle
    out32 = nn.rope(x.float(), positions, theta)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), expected, rtol=1e-4, atol=2e-4)  # angles up to 1023 rad in fp32


def _ref_rope(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Interleaved-pair RoPE written independently (strided slices, not einops)."""
    d = x.shape[-1]
    ang = pos.to(torch.float64)[..., None] * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    c, s = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    out = torch.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
    out[..., 1::2] = x[..., 0::2] * s + x[..., 1::2] * c
    return out


def _mha_params(d: int, seed: int = 0, dtype=torch.float64):
    return {
        name: {"weight": _randn(d, d, seed=seed + i, dtype=dtype) / math.sqrt(d)}
        for i, name in enumerate(("q_proj", "k_proj", "v_proj", "output_proj"))
    }


def _ref_mha(p, x, h, theta, pos):
    """Causal MHA with F.linear, strided RoPE and F.scaled_dot_product_attention(is_causal=True)."""
    *lead, s, d = x.shape

    def split(t):
        return t.reshape(*lead, s, h, d // h).transpose(-2, -3)

    q, k, v = (split(F.linear(x, p[n]["weight"])) for n in ("q_proj", "k_proj", "v_proj"))
    if theta is not None:
        q, k = _ref_rope(q, pos, theta), _ref_rope(k, pos, theta)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.linear(o.transpose(-2, -3).reshape(*lead, s, d), p["output_proj"]["weight"])


@pytest.mark.parametrize("lead", LEADING)
@pytest.mark.parametrize("theta", [None, 10000.0])
def test_multihead_self_attention_matches_reference(lead, theta):
    d, h, s = 12, 3, 5
    p = _mha_params(d)
    x = _randn(*lead, s, d, seed=9)
    pos = torch.arange(s)
    expected = _ref_mha(p, x, h, theta, pos)
    torch.testing.assert_close(nn.multihead_self_attention(p, x, h, theta), expected, **F64)
    torch.testing.assert_close(nn.multihead_self_attention(p, x, h, theta, pos), expected, **F64)
    torch.testing.assert_close(nn.multihead_self_attention(p, x, h, theta, attention="sdpa"), expected, **F64)


def test_multihead_self_attention_custom_positions():
    """Per-sequence positions (batch, seq) shift each sequence's rotation independently."""
    d, h, s = 8, 2, 4
    p = _mha_params(d)
    x = _randn(2, s, d, seed=3)
    pos = torch.tensor([[0, 1, 2, 3], [10, 11, 12, 13]])
    out = nn.multihead_self_attention(p, x, h, 10000.0, pos)
    for b in range(2):
        torch.testing.assert_close(out[b], _ref_mha(p, x[b], h, 10000.0, pos[b]), **F64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_attention_given_rope_tables_equals_attention_that_builds_them(dtype):
    """``rope_cache=attention_rope_tables(x, h, θ, pos)`` (built once, shared by layers) gives
    exactly the attention that builds its own tables from ``pos``; the tables are in the compute
    dtype (float32 for bf16) and broadcast over heads."""
    d, h, s = 8, 2, 4
    p = _mha_params(d, dtype=dtype)
    x = _randn(2, s, d, seed=3).to(dtype)
    pos = torch.tensor([[0, 1, 2, 3], [10, 11, 12, 13]])
    cos, sin = nn.attention_rope_tables(x, h, 10000.0, pos)
    assert cos.shape == sin.shape == (2, 1, s, d // h // 2)
    assert cos.dtype == torch.promote_types(dtype, torch.float32)
    own = nn.multihead_self_attention(p, x, h, 10000.0, pos)
    given = nn.multihead_self_attention(p, x, h, 10000.0, rope_cache=(cos, sin))
    torch.testing.assert_close(given, own, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# attention="sdpa" (PyTorch's fused kernels) equals attention="flm": forward and gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float32, F32), (torch.float64, F64)])
@pytest.mark.parametrize("lead", [(), (2,), (2, 2)])
def test_sdpa_equals_flm_attention_forward_and_grad(dtype, tol, lead):
    d, h, s = 16, 4, 7
    p = _mha_params(d, dtype=dtype)
    x = _randn(*lead, s, d, seed=5, dtype=dtype)

    def loss(params, x, attention):
        return nn.multihead_self_attention(params, x, h, 10000.0, attention=attention).square().sum()

    out_flm = nn.multihead_self_attention(p, x, h, 10000.0, attention="flm")
    out_sdpa = nn.multihead_self_attention(p, x, h, 10000.0, attention="sdpa")
    torch.testing.assert_close(out_sdpa, out_flm, **tol)
    g_flm = torch.func.grad(loss, argnums=(0, 1))(p, x, "flm")
    g_sdpa = torch.func.grad(loss, argnums=(0, 1))(p, x, "sdpa")
    torch.testing.assert_close(g_sdpa, g_flm, **tol)


@pytest.mark.parametrize("impl", ["auto", "flm", "sdpa"])
@pytest.mark.parametrize("queries,keys", [(5, 5), (1, 6), (3, 6)])
def test_dot_product_attention_implementations_agree(impl, queries, keys):
    """Every implementation equals flm's reference, with an explicit mask and with causal=True,
    also when the queries are the last positions of a longer key sequence (the KV-cache case)."""
    q, k, v = _randn(2, queries, 4, seed=1), _randn(2, keys, 4, seed=2), _randn(2, keys, 4, seed=3)
    m = nn.causal_mask(queries, keys)
    want = nn.scaled_dot_product_attention(q, k, v, m)
    torch.testing.assert_close(nn.dot_product_attention(q, k, v, m, implementation=impl), want, **F64)
    torch.testing.assert_close(nn.dot_product_attention(q, k, v, causal=True, implementation=impl), want, **F64)
    torch.testing.assert_close(
        nn.dot_product_attention(q, k, v, implementation=impl), nn.scaled_dot_product_attention(q, k, v), **F64
    )


def test_auto_attention_uses_flm_under_vmap_without_the_slow_fallback_warning(recwarn):
    """Under vmap "auto" picks flm's attention (the fused CPU kernel has no batching rule and
    warns about a slow fallback); outside vmap it picks the fused kernel (same values)."""
    import warnings

    q = _randn(3, 2, 6, 4, seed=4)
    warnings.simplefilter("always")
    batched = torch.func.vmap(lambda x: nn.dot_product_attention(x, x, x, causal=True))(q)
    assert not [w for w in recwarn if "batching rule" in str(w.message)]
    torch.testing.assert_close(batched, nn.dot_product_attention(q, q, q, causal=True, implementation="flm"), **F64)
    assert nn._use_fused("auto", q) and not torch.func.vmap(lambda x: torch.tensor(nn._use_fused("auto", x)))(q).any()
    with pytest.raises(ValueError, match="not both"):
        nn.dot_product_attention(q, q, q, nn.causal_mask(6), causal=True)


# =============================================================================================
# Hypothesis properties
# =============================================================================================


@st.composite
def _matrix(draw, lo=-10.0, hi=10.0):
    rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    return _tensor(draw, (rows, cols), lo, hi)


@given(x=_matrix(-50.0, 50.0), c=st.floats(-1e3, 1e3))
def test_softmax_sums_to_one_and_is_shift_invariant(x, c):
    p = nn.softmax(x, dim=-1)
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(x.shape[0], dtype=x.dtype), **F64)
    torch.testing.assert_close(nn.softmax(x + c, dim=-1), p, rtol=1e-9, atol=1e-12)


@given(x=_matrix(-1.0, 1.0), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_softmax_finite_for_huge_inputs(x, dtype):
    big = (torch.sign(x) * 1e4 + x).to(dtype)  # entries near ±1e4: naive exp overflows
    p = nn.softmax(big, dim=-1)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.double().sum(-1), torch.ones(x.shape[0], dtype=torch.float64), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(p.double(), F.softmax(big.double(), -1), rtol=1e-5, atol=1e-6)


@given(x=_matrix(), data=st.data())
def test_softmax_minus_inf_gets_exactly_zero(x, data):
    drop = torch.tensor(data.draw(st.lists(st.booleans(), min_size=x.shape[1], max_size=x.shape[1])))
    drop[0] = False  # keep one finite entry per row
    p = nn.softmax(x.masked_fill(drop, float("-inf")), dim=-1)
    assert (p[:, drop] == 0).all()
    torch.testing.assert_close(p[:, ~drop], nn.softmax(x[:, ~drop], dim=-1), **F64)


@st.composite
def _attention_case(draw):
    lead = tuple(draw(st.lists(st.integers(1, 2), max_size=2)))
    nq, nk, dk = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 4))
    q = _tensor(draw, (*lead, nq, dk), -3, 3)
    k = _tensor(draw, (*lead, nk, dk), -3, 3)
    bits = draw(st.lists(st.booleans(), min_size=nq * nk, max_size=nq * nk))
    mask = torch.tensor(bits, dtype=torch.bool).reshape(nq, nk)
    mask[:, draw(st.integers(0, nk - 1))] = True  # every query attends somewhere
    return q, k, mask


@given(case=_attention_case(), seed=st.integers(0, 2**31 - 1))
def test_attention_masked_keys_get_zero_weight_and_do_not_matter(case, seed):
    q, k, mask = case
    nk = k.shape[-2]
    # with V = I the output rows are the attention weights themselves
    eye = torch.eye(nk, dtype=q.dtype).expand(*k.shape[:-2], nk, nk)
    weights = nn.scaled_dot_product_attention(q, k, eye, mask)
    assert (weights[..., ~mask] == 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1], dtype=q.dtype), **F64)
    # for each query, replace the keys and values it may not see by anything: its output row is
    # bit-identical
    g = _gen(seed)
    v = torch.randn(*k.shape[:-1], 3, dtype=q.dtype, generator=g)
    out = nn.scaled_dot_product_attention(q, k, v, mask)
    for i in range(q.shape[-2]):
        hidden = ~mask[i]
        k2, v2 = k.clone(), v.clone()
        k2[..., hidden, :] = torch.randn(k2[..., hidden, :].shape, dtype=q.dtype, generator=g) * 100
        v2[..., hidden, :] = torch.randn(v2[..., hidden, :].shape, dtype=q.dtype, generator=g) * 100
        out2 = nn.scaled_dot_product_attention(q, k2, v2, mask)
        torch.testing.assert_close(out2[..., i, :], out[..., i, :], **EXACT)


@given(
    lead=st.lists(st.integers(1, 3), max_size=3).map(tuple),
    s=st.integers(1, 5),
    half=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    start=st.integers(0, 5000),
)
def test_rope_properties(lead, s, half, seed, start):
    d = 2 * half
    x = torch.randn(*lead, s, d, dtype=torch.float64, generator=_gen(seed))
    pos = torch.arange(start, start + s)
    y = nn.rope(x, pos, 10000.0)
    assert y.shape == x.shape and y.dtype == x.dtype
    # a rotation: every pair (hence the vector) keeps its norm
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), **F64)
    # position 0 is the identity
    torch.testing.assert_close(nn.rope(x, torch.zeros(s, dtype=torch.long), 10000.0), x, **EXACT)
    # broadcasting positions over the batch equals giving them per batch element (to round-off:
    # the complex multiply may take a vectorised path for one layout and not the other)
    torch.testing.assert_close(nn.rope(x, pos.expand(*lead, s), 10000.0), y, rtol=1e-15, atol=1e-15)


@given(
    m=st.integers(0, 2000),
    n=st.integers(0, 2000),
    shift=st.integers(-2000, 2000),
    half=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_rope_inner_product_depends_only_on_offset(m, n, shift, half, seed):
    d = 2 * half
    g = _gen(seed)
    q, k = torch.randn(1, d, dtype=torch.float64, generator=g), torch.randn(1, d, dtype=torch.float64, generator=g)
    shift = max(shift, -min(m, n))  # keep positions non-negative

    def dot(a, b):
        return (nn.rope(q, torch.tensor([a]), 10000.0) * nn.rope(k, torch.tensor([b]), 10000.0)).sum()

    torch.testing.assert_close(dot(m + shift, n + shift), dot(m, n), rtol=1e-9, atol=1e-9)


@given(x=_matrix(-10, 10), c=st.floats(1e-2, 1e3), eps=st.sampled_from([1e-5, 1e-2, 1.0]))
def test_rms_norm_scale_invariance(x, c, eps):
    ms = x.square().mean(-1, keepdim=True)
    g = {"weight": torch.linspace(0.5, 2.0, x.shape[-1], dtype=x.dtype)}
    # exact identity: RMSNorm(c·x; eps) = RMSNorm(x; eps/c²)
    torch.testing.assert_close(nn.rms_norm(g, c * x, eps), nn.rms_norm(g, x, eps / c**2), rtol=1e-9, atol=1e-9)
    # hence ≈ RMSNorm(x) up to eps: relative change bounded by the eps terms
    a, b = nn.rms_norm(g, c * x, eps), nn.rms_norm(g, x, eps)
    bound = (eps / (c**2 * ms) + eps / ms) * (b.abs() + 1e-12)
    assert (a - b).abs().le(bound + 1e-9).all()


# =============================================================================================
# Shapes, dtypes
# =============================================================================================


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lead", LEADING)
def test_layers_any_leading_dims_and_dtype(dtype, lead):
    d, h, s = 8, 2, 3
    x64 = _randn(*lead, s, d, seed=1)
    x = x64.to(dtype)
    p = _mha_params(d, dtype=dtype)
    ffn = {
        "w1": {"weight": _randn(12, d, seed=1, dtype=dtype)},
        "w2": {"weight": _randn(d, 12, seed=2, dtype=dtype)},
        "w3": {"weight": _randn(12, d, seed=3, dtype=dtype)},
    }
    g = {"weight": torch.ones(d, dtype=dtype)}
    outputs = {
        "linear": nn.linear(p["q_proj"], x),
        "rms_norm": nn.rms_norm(g, x),
        "softmax": nn.softmax(x, -1),
        "silu": nn.silu(x),
        "swiglu": nn.swiglu(ffn, x),
        "rope": nn.rope(x, torch.arange(s), 10000.0),
        "mha": nn.multihead_self_attention(p, x, h, 10000.0),
    }
    for name, out in outputs.items():
        assert out.shape == (*lead, s, d), name
        assert out.dtype == dtype, name
    if dtype == torch.float32 or dtype == torch.bfloat16:
        p32 = _mha_params(d, dtype=torch.float32) if dtype == torch.bfloat16 else p
        x32 = x.float()
        ref = {
            "rms_norm": nn.rms_norm({"weight": torch.ones(d)}, x32),
            "softmax": nn.softmax(x32, -1),
            "silu": nn.silu(x32),
            "rope": nn.rope(x32, torch.arange(s), 10000.0),
            "mha": nn.multihead_self_attention(p32, x32, h, 10000.0),
        }
        tol = BF16 if dtype == torch.bfloat16 else EXACT
        for name, r in ref.items():
            torch.testing.assert_close(outputs[name].float(), r, **tol, msg=lambda m, name=name: f"{name}: {m}")


def test_attention_any_leading_dims():
    for lead in LEADING:
        q = _randn(*lead, 3, 4)
        out = nn.scaled_dot_product_attention(q, q, q, nn.causal_mask(3))
        assert out.shape == q.shape
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, q, q, is_causal=True), **F64)


def test_empty_batch():
    x = torch.zeros(0, 3, 8)
    assert nn.multihead_self_attention(_mha_params(8, dtype=torch.float32), x, 2, 10000.0).shape == (0, 3, 8)
    assert nn.rms_norm({"weight": torch.ones(8)}, x).shape == (0, 3, 8)


# =============================================================================================
# Bad input raises ValueError
# =============================================================================================


def test_errors():
    w = {"weight": torch.zeros(4, 3)}
    with pytest.raises(ValueError, match="linear.*last dimension 5"):
        nn.linear(w, torch.zeros(2, 5))
    with pytest.raises(ValueError, match="rms_norm.*4.*3"):
        nn.rms_norm({"weight": torch.ones(3)}, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="integer"):
        nn.embedding(w, torch.zeros(2))
    q = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="d_k=4.*d_k=5"):
        nn.scaled_dot_product_attention(q, torch.zeros(2, 3, 5), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="3 keys but 2 values"):
        nn.scaled_dot_product_attention(q, q, torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match="bool"):
        nn.scaled_dot_product_attention(q, q, q, torch.ones(3, 3))
    with pytest.raises(ValueError, match="broadcast"):
        nn.scaled_dot_product_attention(q, q, q, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="broadcast"):  # broadcasts, but to a larger shape than the scores
        nn.scaled_dot_product_attention(q, q, q, torch.ones(5, 2, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="d_k=5 must be even"):
        nn.rope(torch.zeros(3, 5), torch.arange(3), 10000.0)
    with pytest.raises(ValueError, match="theta"):
        nn.rope(torch.zeros(3, 4), torch.arange(3), 0.0)
    with pytest.raises(ValueError, match="2 positions"):
        nn.rope(torch.zeros(3, 4), torch.arange(2), 10000.0)
    p = _mha_params(6, dtype=torch.float32)
    with pytest.raises(ValueError, match="num_heads=4"):
        nn.multihead_self_attention(p, torch.zeros(2, 6), 4)
    with pytest.raises(ValueError, match="num_heads=0"):
        nn.multihead_self_attention(p, torch.zeros(2, 6), 0)
    with pytest.raises(ValueError, match="'fast'"):
        nn.multihead_self_attention(p, torch.zeros(2, 6), 2, attention="fast")


# =============================================================================================
# Initialisers (handout §3.4.1)
# =============================================================================================

TRUNC_STD = 0.986  # std of N(0, 1) truncated to [-3, 3]: sqrt(1 - 6φ(3)/(1 - 2Φ(-3))) ≈ 0.9866


@pytest.mark.parametrize("d_in,d_out", [(256, 512), (1000, 24)])
def test_init_linear(d_in, d_out):
    w = nn.init_linear(d_in, d_out, generator=_gen(0))["weight"]
    sigma = math.sqrt(2.0 / (d_in + d_out))
    assert w.shape == (d_out, d_in) and w.dtype == torch.float32
    assert w.abs().max() <= 3 * sigma * (1 + 1e-6)
    assert abs(w.mean().item()) < 0.1 * sigma
    assert w.std().item() == pytest.approx(TRUNC_STD * sigma, rel=0.02)


def test_init_embedding_and_rms_norm():
    w = nn.init_embedding(1000, 200, generator=_gen(0))["weight"]
    assert w.shape == (1000, 200)
    assert w.abs().max() <= 3.0
    assert w.abs().max() > 2.5  # the tails are actually sampled
    assert w.std().item() == pytest.approx(TRUNC_STD, abs=0.01)
    g = nn.init_rms_norm(7, dtype=torch.float64)["weight"]
    assert torch.equal(g, torch.ones(7, dtype=torch.float64))


def test_truncated_normal_matches_torch_trunc_normal_distribution():
    """Same distribution as torch.nn.init.trunc_normal_ (compare a few quantiles)."""
    ours = nn.truncated_normal((200_000,), 2.0, generator=_gen(1))
    theirs = torch.nn.init.trunc_normal_(torch.empty(200_000), std=2.0, a=-6.0, b=6.0, generator=_gen(2))
    qs = torch.tensor([0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99])
    torch.testing.assert_close(ours.quantile(qs), theirs.quantile(qs), rtol=0, atol=0.05)


def test_init_seeds_dtype_device():
    a = nn.init_swiglu(8, 12, generator=_gen(3))
    b = nn.init_swiglu(8, 12, generator=_gen(3))
    c = nn.init_swiglu(8, 12, generator=_gen(4))
    for key in ("w1", "w2", "w3"):
        assert torch.equal(a[key]["weight"], b[key]["weight"])
        assert not torch.equal(a[key]["weight"], c[key]["weight"])
    assert a["w1"]["weight"].shape == (12, 8) and a["w2"]["weight"].shape == (8, 12)
    assert set(nn.init_silu_ffn(8, 12)) == {"w1", "w2"}
    assert set(nn.init_multihead_self_attention(8)) == {"q_proj", "k_proj", "v_proj", "output_proj"}
    p = nn.init_multihead_self_attention(8, generator=_gen(3), dtype=torch.bfloat16, device="cpu")
    p32 = nn.init_multihead_self_attention(8, generator=_gen(3))
    for key in p:
        assert p[key]["weight"].dtype == torch.bfloat16 and p[key]["weight"].device.type == "cpu"
        # same draw, only rounded: a seed gives the same model in every dtype
        torch.testing.assert_close(p[key]["weight"], p32[key]["weight"].bfloat16(), **EXACT)


def test_embedding_gradient_accumulates_repeated_ids_like_autograd_of_indexing():
    w = torch.randn(9, 4, dtype=torch.float64)
    ids = torch.tensor([[1, 1, 3], [8, 1, 0]])
    up = torch.randn(2, 3, 4, dtype=torch.float64)
    got = torch.func.grad(lambda w: (nn.embedding({"weight": w}, ids) * up).sum())(w)
    ref = w.clone().requires_grad_()
    (ref[ids] * up).sum().backward()
    torch.testing.assert_close(got, ref.grad, rtol=0, atol=1e-15)
    batched = torch.func.vmap(torch.func.grad(lambda w, i: nn.embedding({"weight": w}, i).sum()))(
        torch.stack([w, w]), torch.stack([ids, ids])
    )
    torch.testing.assert_close(batched[1], torch.func.grad(lambda w: nn.embedding({"weight": w}, ids).sum())(w))


@pytest.mark.compile
def test_rope_complex_eager_path_equals_the_real_compiled_path():
    """Eager rope multiplies complex numbers; under torch.compile the real form runs (inductor
    has no complex codegen). Both must give the same rotation and gradient."""
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    pos = torch.arange(5)

    def f(x):
        return (nn.rope(x, pos, 10000.0) * torch.linspace(-1, 1, 8, dtype=torch.float64)).sum()

    eager = torch.func.grad_and_value(f)(x)
    compiled = torch.compile(torch.func.grad_and_value(f), fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-14, atol=1e-14)
