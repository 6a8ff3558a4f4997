"""Hypothesis properties of flm's building blocks that the per-module tests check only at fixed
points: low-precision softmax, attention over random masks with fewer queries than keys, KV-cache
decoding at any prefill/decode split, batch-row independence of the LM, RoPE's group law,
AdamW's pure decay at zero gradient and the continuity of the cosine schedule.

Tiny shapes, float64 wherever the property is exact (so the tolerances are round-off), and
``torch.nn.functional`` / ``torch.softmax`` in float64 as the oracles. The hypothesis profile
(``ci``: 25 examples, derandomised) comes from ``conftest.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from flm import nn, optim
from flm.generate import decode_step, prefill
from flm.model import TransformerConfig, init_params, transformer_lm
from flm.tree import tree_leaves, tree_map

F64 = dict(rtol=1e-10, atol=1e-12)  # float64 against float64: only the order of operations differs
SEEDS = st.integers(0, 2**31 - 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)


# =============================================================================================
# softmax in bfloat16 / float16
# =============================================================================================


@st.composite
def _low_precision_logits(draw):
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16]))
    rows, cols = draw(st.integers(1, 3)), draw(st.integers(1, 8))
    # up to the dtype's largest finite value: the naive exp overflows long before
    scale = draw(st.sampled_from([1.0, 30.0, 1e3, torch.finfo(dtype).max]))
    vals = draw(st.lists(st.floats(-1.0, 1.0), min_size=rows * cols, max_size=rows * cols))
    x = (torch.tensor(vals, dtype=torch.float64).reshape(rows, cols) * scale).to(dtype)  # the rounded inputs
    return x, dtype


@given(case=_low_precision_logits())
def test_softmax_low_precision_matches_float64_on_the_same_inputs(case):
    """bf16/fp16 softmax = the float64 softmax of the same (rounded) inputs, to one rounding of the
    output (relative ε of the dtype, plus one subnormal step); rows sum to 1; no NaN or inf."""
    x, dtype = case
    p = nn.softmax(x, dim=-1)
    assert p.dtype == dtype
    assert torch.isfinite(p).all() and (p >= 0).all()
    fi = torch.finfo(dtype)
    atol = fi.smallest_normal * fi.eps  # the spacing of the subnormals
    ref = torch.softmax(x.double(), dim=-1)
    torch.testing.assert_close(p.double(), ref, rtol=fi.eps, atol=atol)
    sums = p.double().sum(-1)
    assert ((sums - 1).abs() <= fi.eps + x.shape[-1] * atol).all(), sums


# =============================================================================================
# attention = torch.nn.functional.scaled_dot_product_attention
# =============================================================================================


@st.composite
def _attention_case(draw):
    lead = tuple(draw(st.lists(st.integers(1, 2), max_size=2)))
    nq = draw(st.integers(1, 5))
    nk = draw(st.integers(nq, 8))  # as many keys or more: the KV-cache case
    dk, dv = draw(st.integers(1, 6)), draw(st.integers(1, 5))
    mask_shape = draw(st.sampled_from([(nq, nk), (*lead, nq, nk)]))
    bits = draw(st.lists(st.booleans(), min_size=math.prod(mask_shape), max_size=math.prod(mask_shape)))
    mask = torch.tensor(bits, dtype=torch.bool).reshape(mask_shape)
    keep = torch.tensor(draw(st.lists(st.integers(0, nk - 1), min_size=nq, max_size=nq)))
    mask[..., torch.arange(nq), keep] = True  # every query attends to some key (else both give NaN)
    seed = draw(SEEDS)
    q, k, v = (
        _randn(*lead, nq, dk, seed=seed),
        _randn(*lead, nk, dk, seed=seed + 1),
        _randn(*lead, nk, dv, seed=seed + 2),
    )
    return q, k, v, mask


@given(case=_attention_case())
def test_attention_equals_F_sdpa_over_random_masks(case):
    """flm's attention (and each implementation of dot_product_attention) equals PyTorch's, forward
    and gradients, for any boolean mask and any number of queries ≤ keys."""
    q, k, v, mask = case
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = nn.scaled_dot_product_attention(q, k, v, mask)
    torch.testing.assert_close(got, want, **F64)
    for impl in ("flm", "sdpa", "auto"):
        torch.testing.assert_close(nn.dot_product_attention(q, k, v, mask, implementation=impl), want, **F64)
    cot = _randn(*want.shape, seed=7)
    g_want = torch.func.vjp(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), q, k, v)[1](cot)
    g_got = torch.func.vjp(lambda q, k, v: nn.scaled_dot_product_attention(q, k, v, mask), q, k, v)[1](cot)
    torch.testing.assert_close(g_got, g_want, **F64)


@given(case=_attention_case())
def test_causal_attention_is_bottom_right_aligned_for_fewer_queries(case):
    """causal=True with nq < nk: the queries are the last nq positions (j ≤ i + nk − nq), i.e.
    PyTorch's attention with an explicit bottom-right triangle (its is_causal is top-left)."""
    q, k, v, _ = case
    nq, nk = q.shape[-2], k.shape[-2]
    tri = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=tri)
    for impl in ("flm", "sdpa", "auto"):
        torch.testing.assert_close(nn.dot_product_attention(q, k, v, causal=True, implementation=impl), want, **F64)


# =============================================================================================
# The LM: KV-cache decoding and batch-row independence
# =============================================================================================

LM = TransformerConfig(vocab_size=29, context_length=12, d_model=16, num_layers=2, num_heads=2, d_ff=24)
_LM_PARAMS = init_params(LM, _gen(0), dtype=torch.float64)
_VARIANTS = st.fixed_dictionaries(
    {"attention": st.sampled_from(["flm", "sdpa"]), "position": st.sampled_from(["rope", "nope"])}
)


@given(variant=_VARIANTS, data=st.data(), batch=st.integers(1, 2), seed=SEEDS)
def test_kv_cache_decoding_equals_recompute_for_any_split(variant, data, batch, seed):
    """prefill(x[:, :p]) then one decode_step per remaining token gives the full forward's logits at
    every position, for any length, split point p and cache capacity."""
    cfg = LM.replace(**variant)
    s = data.draw(st.integers(2, cfg.context_length), label="seq_len")
    p = data.draw(st.integers(1, s - 1), label="prefill")
    capacity = data.draw(st.integers(s, cfg.context_length), label="capacity")
    x = torch.randint(0, cfg.vocab_size, (batch, s), generator=_gen(seed))
    ref = transformer_lm(_LM_PARAMS, x, cfg)
    logits, cache = prefill(_LM_PARAMS, cfg, x[:, :p], capacity=capacity)
    torch.testing.assert_close(logits, ref[:, :p], **F64)
    for t in range(p, s):
        logits, cache = decode_step(_LM_PARAMS, cfg, x[:, t], cache)
        torch.testing.assert_close(logits[:, 0], ref[:, t], **F64)
    assert cache.length == s


@given(variant=_VARIANTS, data=st.data(), seed=SEEDS)
def test_lm_rows_are_independent(variant, data, seed):
    """Changing row j of a batch leaves every other row's logits unchanged, and each row's logits
    are those of the row run alone."""
    cfg = LM.replace(**variant)
    batch = data.draw(st.integers(2, 4), label="batch")
    s = data.draw(st.integers(1, cfg.context_length), label="seq_len")
    j = data.draw(st.integers(0, batch - 1), label="changed row")
    g = _gen(seed)
    x = torch.randint(0, cfg.vocab_size, (batch, s), generator=g)
    y = x.clone()
    y[j] = (x[j] + torch.randint(1, cfg.vocab_size, (s,), generator=g)) % cfg.vocab_size  # every token differs
    a, b = transformer_lm(_LM_PARAMS, x, cfg), transformer_lm(_LM_PARAMS, y, cfg)
    others = [i for i in range(batch) if i != j]
    torch.testing.assert_close(b[others], a[others], **F64)
    assert not torch.allclose(b[j], a[j])
    for i in range(batch):
        torch.testing.assert_close(a[i], transformer_lm(_LM_PARAMS, x[i : i + 1], cfg)[0], **F64)


# =============================================================================================
# RoPE: rotations compose, R(m) R(n) = R(m + n), and R(−m) = R(m)⁻¹
# =============================================================================================


@given(
    lead=st.lists(st.integers(1, 2), max_size=2).map(tuple),
    s=st.integers(1, 5),
    half=st.integers(1, 4),
    theta=st.sampled_from([10.0, 10000.0, 500000.0]),
    data=st.data(),
    seed=SEEDS,
)
def test_rope_rotations_compose_and_invert(lead, s, half, theta, data, seed):
    x = _randn(*lead, s, 2 * half, seed=seed)
    positions = st.lists(st.integers(-4096, 4096), min_size=s, max_size=s).map(torch.tensor)
    m, n = data.draw(positions, label="m"), data.draw(positions, label="n")
    # angles reach 8192 rad: float64 cos/sin of them are good to ~1e-12
    tol = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(nn.rope(nn.rope(x, m, theta), n, theta), nn.rope(x, m + n, theta), **tol)
    torch.testing.assert_close(nn.rope(nn.rope(x, m, theta), -m, theta), x, **tol)


# =============================================================================================
# AdamW at zero gradient: pure decoupled weight decay
# =============================================================================================


@given(
    shapes=st.lists(st.lists(st.integers(1, 4), max_size=2).map(tuple), min_size=1, max_size=4),
    lr=st.floats(1e-4, 0.5),
    weight_decay=st.floats(0.0, 1.0),
    betas=st.tuples(st.floats(0.0, 0.99), st.floats(0.0, 0.9999)),
    eps=st.floats(1e-12, 1e-3),
    steps=st.integers(1, 4),
    schedule=st.booleans(),
    inplace=st.booleans(),
    data=st.data(),
    seed=SEEDS,
)
def test_adamw_with_zero_gradient_is_pure_decay(
    shapes, lr, weight_decay, betas, eps, steps, schedule, inplace, data, seed
):
    """With g = 0 the moments stay 0 and Adam's direction is exactly 0, so each step is
    θ ← θ(1 − α_t λ) on the decayed leaves and leaves the masked-out ones unchanged."""
    g = _gen(seed)
    params = {f"p{i}": torch.randn(s, generator=g, dtype=torch.float64) for i, s in enumerate(shapes)}
    mask = {k: data.draw(st.booleans(), label=f"decay {k}") for k in params}
    lr_arg = optim.cosine_schedule(lr, lr / 10, 2, 5) if schedule else lr
    tx = optim.adamw(lr_arg, betas=betas, eps=eps, weight_decay=weight_decay, mask=mask, inplace=inplace)
    state = tx.init(params)
    expect, p = dict(params), params
    for t in range(steps):
        alpha = float(lr_arg(t)) if schedule else lr
        updates, state = tx.update(tree_map(torch.zeros_like, p), state, p)
        p = optim.apply_updates(p, updates)
        expect = {k: v * (1 - alpha * weight_decay) if mask[k] else v for k, v in expect.items()}
    for k in params:
        torch.testing.assert_close(p[k], expect[k], rtol=1e-14, atol=1e-15)
    assert all(not m.any() for m in tree_leaves(state[0].m)) and all(not v.any() for v in tree_leaves(state[0].v))


# =============================================================================================
# The cosine schedule: continuous at the end of warm-up and of the cycle
# =============================================================================================


@given(
    a_max=st.floats(1e-5, 1.0),
    frac=st.floats(0.0, 1.0),
    t_w=st.integers(0, 200),
    cycle=st.integers(1, 2000),
    delta=st.one_of(st.floats(1e-9, 1.0), st.floats(1e-6, 50.0)),
    data=st.data(),
)
def test_cosine_schedule_is_continuous_with_bounded_slope(a_max, frac, t_w, cycle, delta, data):
    """The schedule is Lipschitz with the larger of its two slopes, α_max/T_w (warm-up) and
    π(α_max − α_min)/(2(T_c − T_w)) (cosine): no jump at T_w or at T_c (for T_c > T_w), and it
    reaches α_max at T_w and α_min at T_c exactly."""
    a_min, t_c = a_max * frac, t_w + cycle
    s = optim.cosine_schedule(a_max, a_min, t_w, t_c)
    slope = max(a_max / t_w if t_w else 0.0, math.pi / 2 * (a_max - a_min) / (t_c - t_w))
    ulp = 4 * math.ulp(a_max)

    def at(t: float) -> float:
        return float(s(torch.tensor(t, dtype=torch.float64)))

    assert abs(at(t_w) - a_max) <= ulp and abs(at(t_c) - a_min) <= ulp
    anchor = data.draw(st.sampled_from([t_w, t_c, data.draw(st.floats(0, 2 * t_c), label="t")]), label="anchor")
    for t in (anchor - delta, anchor + delta):
        if t >= 0:
            assert abs(at(t) - at(anchor)) <= slope * delta + ulp, (t, anchor)
    # integer steps too: one step changes α by at most one slope
    i = data.draw(st.integers(0, t_c + 2), label="step")
    assert abs(float(s(i + 1)) - float(s(i))) <= slope + ulp
