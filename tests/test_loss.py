"""Tests for flm.loss: cross-entropy against F.cross_entropy and the handout's formula
(logsumexp − target logit, eq. 17), stability for huge logits, perplexity = exp(mean) (eq. 18)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

from flm.loss import cross_entropy, perplexity, token_cross_entropy, token_linear_cross_entropy

# ---------------------------------------------------------------------------------------------
# Tolerances (assert_close rtol/atol) used throughout this file.
# ---------------------------------------------------------------------------------------------
F64 = dict(rtol=1e-10, atol=1e-10)  # float64 logits against a float64 oracle
F32 = dict(rtol=1e-5, atol=1e-5)  # float32 logits (loss computed in float32) against float64
BF16 = dict(rtol=1e-5, atol=1e-5)  # bf16 logits: computed exactly in float32 from the bf16 values


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("lead", [(5,), (2, 3), (2, 2, 3)])
def test_matches_F_cross_entropy(lead):
    v = 11
    logits = torch.randn(*lead, v, dtype=torch.float64, generator=_gen(0)) * 4
    y = torch.randint(0, v, lead, generator=_gen(1))
    expected = F.cross_entropy(logits.reshape(-1, v), y.reshape(-1), reduction="none").reshape(lead)
    torch.testing.assert_close(token_cross_entropy(logits, y), expected, **F64)
    torch.testing.assert_close(cross_entropy(logits, y), expected.mean(), **F64)
    assert cross_entropy(logits, y).shape == ()
    # float32 and bfloat16 logits: the loss is float32
    for dtype, tol in ((torch.float32, F32), (torch.bfloat16, BF16)):
        low = logits.to(dtype)
        out = cross_entropy(low, y)
        assert out.dtype == torch.float32
        ref = F.cross_entropy(low.double().reshape(-1, v), y.reshape(-1))
        torch.testing.assert_close(out.double(), ref, **tol)


def test_gradient_matches_F_cross_entropy():
    logits = torch.randn(4, 6, 9, dtype=torch.float64, generator=_gen(2))
    y = torch.randint(0, 9, (4, 6), generator=_gen(3))
    g = torch.func.grad(cross_entropy)(logits, y)
    a = logits.clone().requires_grad_(True)
    F.cross_entropy(a.reshape(-1, 9), y.reshape(-1)).backward()
    torch.testing.assert_close(g, a.grad, **F64)
    # d/do of the mean loss: (softmax(o) − onehot(y)) / N
    expected = (torch.softmax(logits, -1) - F.one_hot(y, 9)) / y.numel()
    torch.testing.assert_close(g, expected, **F64)


@st.composite
def _case(draw, scale: float = 10.0):
    n, v = draw(st.integers(1, 5)), draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    logits = (torch.rand(n, v, dtype=torch.float64, generator=_gen(seed)) * 2 - 1) * scale
    y = torch.tensor(draw(st.lists(st.integers(0, v - 1), min_size=n, max_size=n)))
    return logits, y


@given(case=_case(), c=st.floats(-100, 100))
def test_equals_logsumexp_minus_target_and_shift_invariant(case, c):
    logits, y = case
    expected = torch.logsumexp(logits, -1) - logits.gather(-1, y[:, None])[:, 0]
    loss = token_cross_entropy(logits, y)
    torch.testing.assert_close(loss, expected, **F64)
    assert (loss >= 0).all()
    torch.testing.assert_close(token_cross_entropy(logits + c, y), loss, rtol=1e-9, atol=1e-9)


def _oracle(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """float64 ``log Σ exp(o − o[target])`` of the (already rounded) logits: no cancellation of
    ``|o|``-sized terms (``logsumexp(o) − o[target]`` loses ulp(|o|) even in float64)."""
    x = logits.double()
    return torch.logsumexp(x - x.gather(-1, y[..., None]), -1)


@given(case=_case(scale=1.0), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_stable_for_huge_logits(case, dtype):
    small, y = case
    logits = (torch.sign(small) * 1e4 + small).to(dtype)  # exp(±1e4) overflows when done naively
    loss = token_cross_entropy(logits, y)
    assert torch.isfinite(loss).all()
    # relative to the loss only: the answer is accurate to float32 rounding, not to ulp(1e4) = 1e-3
    torch.testing.assert_close(loss.double(), _oracle(logits, y), rtol=1e-6, atol=1e-6)
    g = torch.func.grad(cross_entropy)(logits.double(), y)
    assert torch.isfinite(g).all()


def test_no_cancellation_at_the_largest_float32_logits():
    """Regression: ``(m + log Σ exp(o − m)) − o[target]`` gave 0.0 here (``3e38 + log 2`` rounds to
    ``3e38``); the answer is log 2, as torch's float32 ``F.cross_entropy`` says."""
    logits = torch.tensor([[3e38, 3e38, -3e38]], dtype=torch.float32)
    y = torch.tensor([0])
    loss = token_cross_entropy(logits, y)
    torch.testing.assert_close(loss, torch.tensor([math.log(2.0)]), rtol=1e-6, atol=0)
    torch.testing.assert_close(loss, F.cross_entropy(logits, y, reduction="none"), rtol=1e-6, atol=0)
    torch.testing.assert_close(loss.double(), _oracle(logits, y), rtol=1e-6, atol=0)


@given(case=_case(), c=st.floats(-1e4, 1e4))
@example(case=(torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64), torch.tensor([0])), c=1e4)
def test_float32_shift_invariance_against_a_float64_oracle(case, c):
    """Offsets up to 1e4 change nothing but the inputs' rounding: the float32 loss of the shifted,
    rounded logits equals the float64 oracle on those same float32 values to float32 precision
    (the old ``m + log Σ … − o[target]`` was off by up to ulp(1e4)/2 ≈ 5e-4)."""
    logits, y = case
    shifted = (logits + c).float()
    loss = token_cross_entropy(shifted, y)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), _oracle(shifted, y), rtol=1e-6, atol=1e-6)


@given(case=_case(scale=1.0), scale=st.sampled_from([1.0, 30.0, 1e4, 1e30]))
def test_gradient_rows_sum_to_zero_and_lie_in_minus_one_one(case, scale):
    """∂loss/∂o = softmax(o) − onehot(target): every row sums to 0 and every entry is in [−1, 1]."""
    logits, y = case
    x = (logits * scale).float()
    g = torch.func.grad(lambda x: token_cross_entropy(x, y).sum())(x)
    assert g.dtype == torch.float32 and torch.isfinite(g).all()
    assert ((g >= -1) & (g <= 1)).all()
    torch.testing.assert_close(g.double().sum(-1), torch.zeros(len(y), dtype=torch.float64), rtol=0, atol=1e-6)
    assert (g.gather(-1, y[:, None]) <= 0).all()  # the target's entry is p − 1 ≤ 0, the others p ≥ 0
    assert (g.scatter(-1, y[:, None], 0.0) >= 0).all()


def test_uniform_logits_give_log_vocab():
    logits = torch.zeros(3, 50)
    assert cross_entropy(logits, torch.tensor([0, 7, 49])).item() == pytest.approx(math.log(50), rel=1e-6)
    assert perplexity(cross_entropy(logits, torch.tensor([0, 7, 49]))).item() == pytest.approx(50.0, rel=1e-5)


@given(losses=st.lists(st.floats(0.0, 20.0), min_size=1, max_size=20))
def test_perplexity_is_exp_of_mean(losses):
    t = torch.tensor(losses, dtype=torch.float64)
    expected = math.exp(sum(losses) / len(losses))
    assert perplexity(t).item() == pytest.approx(expected, rel=1e-5)
    assert perplexity(t.mean()).item() == pytest.approx(expected, rel=1e-5)
    assert perplexity(sum(losses) / len(losses)).item() == pytest.approx(expected, rel=1e-5)
    assert perplexity(t).dtype == torch.float32 and perplexity(t).shape == ()
    assert perplexity(t, dtype=torch.float64).item() == pytest.approx(expected, rel=1e-12)


def test_perplexity_overflows_to_inf_and_keeps_nan():
    """The guard evaluate, runs and the vmapped sweep each wrote by hand (``exp(l) if l < 700 else inf``)
    is perplexity's own: a huge loss gives inf in either dtype, never an OverflowError."""
    assert perplexity(100.0).item() == math.inf  # float32 overflows above ~88.7
    assert perplexity(100.0, dtype=torch.float64).item() == pytest.approx(math.exp(100.0), rel=1e-12)
    assert perplexity(1000.0, dtype=torch.float64).item() == math.inf
    assert perplexity(torch.tensor([1e6, 1e6]), dtype=torch.float64).dtype == torch.float64
    assert math.isnan(perplexity(float("nan"), dtype=torch.float64).item())
    with pytest.raises(ValueError, match="torch.int64"):
        perplexity(1.0, dtype=torch.int64)


def test_errors():
    logits = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match=r"logits \(2, 3, 5\) and targets \(2, 4\)"):
        cross_entropy(logits, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="leading dims"):
        cross_entropy(logits, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        cross_entropy(logits, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="integer"):
        token_cross_entropy(logits, torch.zeros(2, 3, dtype=torch.bool))


# The hand-written gradient (flm.loss._CrossEntropy) against autograd of the plain formula.


@given(
    lead=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    vocab=st.integers(2, 40),
    seed=st.integers(0, 2**31 - 1),
    scale=st.sampled_from([1.0, 30.0, 1e4]),
)
def test_hand_written_gradient_equals_autograd_of_the_formula(lead, vocab, seed, scale):
    from flm.loss import _token_cross_entropy_autograd

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, vocab, dtype=torch.float64, generator=g) * scale
    t = torch.randint(0, vocab, tuple(lead), generator=g)
    w = torch.randn(*lead, dtype=torch.float64, generator=g)  # a non-uniform upstream gradient
    a = torch.func.grad(lambda x: (token_cross_entropy(x, t) * w).sum())(x)
    b = torch.func.grad(lambda x: (_token_cross_entropy_autograd(x, t) * w).sum())(x)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.compile
def test_hand_written_gradient_under_vmap_compile_and_backward():
    x = torch.randn(3, 4, 7, dtype=torch.float64)
    t = torch.randint(0, 7, (3, 4))

    def loss(x, t):
        return cross_entropy(x, t)

    per_model = torch.func.vmap(torch.func.grad(loss))(x, t)
    for i in range(3):
        torch.testing.assert_close(per_model[i], torch.func.grad(loss)(x[i], t[i]), rtol=0, atol=0)
    compiled = torch.compile(torch.func.grad(loss), fullgraph=True, backend="aot_eager")(x, t)
    torch.testing.assert_close(compiled, torch.func.grad(loss)(x, t), rtol=1e-15, atol=1e-15)
    xx = x.clone().requires_grad_()
    loss(xx, t).backward()
    oracle = x.clone().requires_grad_()
    F.cross_entropy(oracle.flatten(0, 1), t.flatten()).backward()
    torch.testing.assert_close(xx.grad, oracle.grad, rtol=1e-12, atol=1e-14)


# Second and higher derivatives: the hand-written backward is itself differentiable. Before, the
# backward read the saved exponentials as constants, so jacrev(jacrev(·)) and grad of grad were
# exactly 0, and jvp/jacfwd/hessian raised NotImplementedError (no jvp). Oracle: autograd of the
# plain formula, in float64.


def _plain(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(x, -1) - x.gather(-1, t[..., None])[..., 0]


def _second_order_case(lead, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, vocab, dtype=torch.float64, generator=g) * 3
    t = torch.randint(0, vocab, tuple(lead), generator=g)
    w = torch.randn(*lead, dtype=torch.float64, generator=g)  # weights: a non-uniform upstream gradient
    v = torch.randn(*lead, vocab, dtype=torch.float64, generator=g)  # a direction
    return x, t, w, v


SECOND = dict(rtol=1e-12, atol=1e-14)


@given(
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    vocab=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_second_derivatives_equal_autograd_of_the_formula(lead, vocab, seed):
    x, t, w, v = _second_order_case(lead, vocab, seed)

    def f(x):
        return (token_cross_entropy(x, t) * w).sum()

    def ref(x):
        return (_plain(x, t) * w).sum()

    jr, jf = torch.func.jacrev, torch.func.jacfwd
    expected_h = torch.func.hessian(ref)(x)
    torch.testing.assert_close(torch.func.hessian(f)(x), expected_h, **SECOND)  # jacfwd(jacrev)
    torch.testing.assert_close(jr(jr(f))(x), expected_h, **SECOND)
    torch.testing.assert_close(jf(jf(f))(x), expected_h, **SECOND)
    torch.testing.assert_close(jr(jf(f))(x), expected_h, **SECOND)
    # jvp (forward mode, first order) and its derivative
    torch.testing.assert_close(torch.func.jvp(f, (x,), (v,))[1], torch.func.jvp(ref, (x,), (v,))[1], **SECOND)
    # grad of a function of grad
    gg = torch.func.grad(lambda x: (torch.func.grad(f)(x) * v).sum())(x)
    torch.testing.assert_close(gg, torch.func.grad(lambda x: (torch.func.grad(ref)(x) * v).sum())(x), **SECOND)
    # Hessian-vector product by double backward (create_graph=True)
    hvps = []
    for fn in (f, ref):
        xx = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(xx), xx, create_graph=True)
        (hv,) = torch.autograd.grad((g * v).sum(), xx)
        hvps.append(hv)
    torch.testing.assert_close(hvps[0], hvps[1], **SECOND)
    # the Hessian of one row is w·(diag(p) − p pᵀ), p = softmax: not zero
    n = t.numel()
    p = torch.softmax(x, -1).reshape(n, vocab)[0]
    block = expected_h.reshape(n, vocab, n, vocab)[0, :, 0, :]
    torch.testing.assert_close(block, w.reshape(-1)[0] * (torch.diag(p) - torch.outer(p, p)), **SECOND)


def test_second_derivative_is_not_zero_regression():
    """The case of the report: a (1, 5) float64 input whose Hessian has entries up to ~0.22."""
    x = torch.tensor([[0.3, -1.2, 0.8, 0.1, -0.4]], dtype=torch.float64)
    t = torch.tensor([2])
    h = torch.func.jacrev(torch.func.jacrev(lambda x: token_cross_entropy(x, t).sum()))(x)
    expected = torch.func.hessian(lambda x: _plain(x, t).sum())(x)
    assert expected.abs().max() > 0.2
    torch.testing.assert_close(h, expected, **SECOND)


def test_third_derivatives_and_vmap_of_hessian():
    x, t, w, _ = _second_order_case((2,), 4, 0)
    jr, jf = torch.func.jacrev, torch.func.jacfwd

    def f(x):
        return (token_cross_entropy(x, t) * w).sum()

    def ref(x):
        return (_plain(x, t) * w).sum()

    for third in (lambda h: jr(jr(jr(h))), lambda h: jf(jr(jr(h))), lambda h: jr(jf(jr(h))), lambda h: jf(jf(jf(h)))):
        torch.testing.assert_close(third(f)(x), third(ref)(x), **SECOND)
    xs = torch.randn(3, 2, 4, dtype=torch.float64, generator=_gen(5))
    torch.testing.assert_close(
        torch.func.vmap(torch.func.hessian(f))(xs), torch.func.vmap(torch.func.hessian(ref))(xs), **SECOND
    )


def test_forward_ad_dual_tensors():
    """``torch.autograd.forward_ad`` (not torch.func) takes the plain formula too."""
    import torch.autograd.forward_ad as fwAD

    x, t, _, v = _second_order_case((3,), 5, 1)
    with fwAD.dual_level():
        out = fwAD.unpack_dual(token_cross_entropy(fwAD.make_dual(x, v), t)).tangent
    torch.testing.assert_close(out, torch.func.jvp(lambda x: _plain(x, t), (x,), (v,))[1], **SECOND)


# ---------------------------------------------------------------------------------------------
# Chunked cross-entropy: large logits are upcast and exponentiated a chunk of rows at a time.
# ---------------------------------------------------------------------------------------------


@given(
    n=st.integers(1, 12),
    v=st.integers(1, 9),
    chunk=st.integers(1, 13),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_chunked_equals_whole_loss_and_gradient(n, v, chunk, dtype, seed):
    """Any chunk size gives the loss and gradient of the whole computation (float64 exactly to
    round-off; bf16 logits: the gradient in bf16, rounded once from the same float32 values)."""
    g = _gen(seed)
    logits = ((torch.rand(2, n, v, generator=g, dtype=torch.float64) * 2 - 1) * 20).to(dtype)
    y = torch.randint(0, v, (2, n), generator=g)
    x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    whole = token_cross_entropy(x1, y, chunk_rows=2 * n)
    chunked = token_cross_entropy(x2, y, chunk_rows=chunk)
    tol = F64 if dtype == torch.float64 else F32
    torch.testing.assert_close(chunked, whole, **tol)
    w = torch.rand(2, n, generator=g, dtype=whole.dtype)  # an arbitrary upstream gradient
    (gw,) = torch.autograd.grad((whole * w).sum(), x1)
    (gc,) = torch.autograd.grad((chunked * w).sum(), x2)
    assert gc.dtype == dtype
    torch.testing.assert_close(gc, gw, **(tol if dtype != torch.bfloat16 else dict(rtol=1e-2, atol=1e-3)))


def test_chunked_matches_F_cross_entropy_in_float64():
    g = _gen(3)
    x = torch.randn(37, 50, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (37,), generator=g)
    loss = cross_entropy(x, y, chunk_rows=5)
    torch.testing.assert_close(loss, F.cross_entropy(x, y), **F64)
    (grad,) = torch.autograd.grad(loss, x)
    xr = x.detach().requires_grad_()
    (expected,) = torch.autograd.grad(F.cross_entropy(xr, y), xr)
    torch.testing.assert_close(grad, expected, **F64)


def test_large_bf16_logits_are_never_upcast_whole():
    """The point of chunking: with bf16 logits, no float32 tensor as large as the logits exists
    during the loss or its backward (every float32 allocation is at most one chunk)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestFloat32(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    LargestFloat32.largest = max(LargestFloat32.largest, t.numel())
            return out

    rows, v, chunk = 64, 500, 8
    x = torch.randn(rows, v, generator=_gen(0)).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, v, (rows,), generator=_gen(1))
    with LargestFloat32():
        loss = cross_entropy(x, y, chunk_rows=chunk)
        (grad,) = torch.autograd.grad(loss, x)
    assert grad.dtype == torch.bfloat16
    assert LargestFloat32.largest <= chunk * v, LargestFloat32.largest
    LargestFloat32.largest = 0
    with LargestFloat32():  # the unchunked path does upcast whole: the probe sees it
        cross_entropy(x, y, chunk_rows=rows)
    assert LargestFloat32.largest >= rows * v


def test_chunking_is_automatic_above_the_threshold(monkeypatch):
    import flm.loss

    assert flm.loss._chunk_rows(16 * 1024, 50_304, None) == 2**24 // 50_304  # GPT-2-small batch: chunked
    assert flm.loss._chunk_rows(4 * 128, 10_000, None) == 512  # the handout batch: whole
    monkeypatch.setattr(flm.loss, "_CHUNK_ELEMENTS", 40)
    x = torch.randn(30, 10, dtype=torch.float64, generator=_gen(2))
    y = torch.randint(0, 10, (30,), generator=_gen(3))
    calls = []
    monkeypatch.setattr(flm.loss._ChunkedCrossEntropy, "apply", staticmethod(lambda *a: calls.append(a[2]) or orig(*a)))
    orig = torch.autograd.Function.apply.__get__(flm.loss._ChunkedCrossEntropy)
    torch.testing.assert_close(cross_entropy(x, y), F.cross_entropy(x, y), **F64)
    assert calls == [4]


def test_chunked_second_order_equals_the_plain_formula():
    """create_graph=True through the chunked path: Hessian-vector products are exact."""
    g = _gen(5)
    x = torch.randn(6, 5, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 5, (6,), generator=g)
    vec = torch.randn(6, 5, dtype=torch.float64, generator=g)
    (gx,) = torch.autograd.grad(cross_entropy(x, y, chunk_rows=2), x, create_graph=True)
    (hvp,) = torch.autograd.grad((gx * vec).sum(), x)
    expected = torch.autograd.functional.hvp(lambda z: F.cross_entropy(z, y), x.detach(), vec)[1]
    torch.testing.assert_close(hvp, expected, **F64)


@pytest.mark.compile
def test_chunked_cross_entropy_compiles_fullgraph():
    x = torch.randn(10, 7, dtype=torch.float64, generator=_gen(6))
    y = torch.randint(0, 7, (10,), generator=_gen(7))

    def loss(x, y):
        return cross_entropy(x, y, chunk_rows=3)

    compiled = torch.compile(torch.func.grad_and_value(loss), fullgraph=True, backend="aot_eager")(x, y)
    eager = torch.func.grad_and_value(lambda x, y: cross_entropy(x, y, chunk_rows=10))(x, y)
    torch.testing.assert_close(compiled, eager, **F64)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_chunk_rows_must_be_a_positive_integer(bad):
    with pytest.raises(ValueError, match=f"chunk_rows must be a positive integer or None, got {bad!r}"):
        cross_entropy(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), chunk_rows=bad)


# --- token_linear_cross_entropy: the head fused into the loss ---------------------------------


@given(
    n=st.integers(1, 11),
    d=st.integers(1, 6),
    v=st.integers(1, 9),
    chunk=st.integers(1, 12),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_linear_cross_entropy_equals_the_loss_of_the_whole_logits(n, d, v, chunk, dtype, seed):
    """Any chunk size: the loss and the gradients of x and W equal autograd through
    ``token_cross_entropy(x @ Wᵀ)`` (float64 to round-off; bf16 within its rounding)."""
    g = _gen(seed)
    x = (torch.randn(2, n, d, generator=g, dtype=torch.float64) * 2).to(dtype)
    w = (torch.randn(v, d, generator=g, dtype=torch.float64) * 2).to(dtype)
    y = torch.randint(0, v, (2, n), generator=g)
    up = torch.rand(2, n, generator=g, dtype=torch.float64)  # an arbitrary upstream gradient
    x1, w1, x2, w2 = (t.clone().requires_grad_() for t in (x, w, x, w))
    whole = token_cross_entropy(x1 @ w1.mT, y)
    fused = token_linear_cross_entropy(x2, w2, y, chunk_rows=chunk)
    assert fused.dtype == whole.dtype and fused.shape == (2, n)
    tol = F64 if dtype == torch.float64 else F32 if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(fused, whole, **tol)
    expected = torch.autograd.grad((whole * up.to(whole.dtype)).sum(), (x1, w1))
    got = torch.autograd.grad((fused * up.to(fused.dtype)).sum(), (x2, w2))
    for a, b in zip(got, expected):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b, **(tol if dtype != torch.bfloat16 else dict(rtol=5e-2, atol=5e-2)))


def test_linear_cross_entropy_matches_F_linear_and_F_cross_entropy_in_float64():
    g = _gen(11)
    x = torch.randn(3, 13, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(50, 8, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 50, (3, 13), generator=g)
    loss = token_linear_cross_entropy(x, w, y, chunk_rows=4).mean()
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    ref = F.cross_entropy(F.linear(xr, wr).reshape(-1, 50), y.reshape(-1))
    torch.testing.assert_close(loss, ref, **F64)
    for a, b in zip(torch.autograd.grad(loss, (x, w)), torch.autograd.grad(ref, (xr, wr))):
        torch.testing.assert_close(a, b, **F64)


def test_linear_cross_entropy_never_holds_the_whole_logits_or_a_weight_gradient_per_chunk():
    """The point of fusing: during the forward and backward no tensor as large as the whole
    logits exists, and exactly one weight-sized gradient buffer is allocated (not one per chunk)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    rows, d, v, chunk = 64, 6, 40, 8
    sizes: list[tuple[int, ...]] = []
    weight_sized: set[int] = set()  # storages the size of W (views share one)

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    sizes.append(tuple(t.shape))
                    if t.untyped_storage().nbytes() == v * d * 4:
                        weight_sized.add(t.untyped_storage().data_ptr())
            return out

    x = torch.randn(rows, d, generator=_gen(12), requires_grad=True)
    w = torch.randn(v, d, generator=_gen(13), requires_grad=True)
    y = torch.randint(0, v, (rows,), generator=_gen(14))
    with Record():
        loss = token_linear_cross_entropy(x, w, y, chunk_rows=chunk).sum()
        torch.autograd.grad(loss, (x, w))
    assert max(math.prod(s) for s in sizes) < rows * v
    assert len(weight_sized - {w.untyped_storage().data_ptr()}) == 1  # the one accumulation buffer


def test_linear_cross_entropy_second_order_equals_the_plain_formula():
    g = _gen(15)
    x = torch.randn(6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 5, (6,), generator=g)
    vx, vw = torch.randn(6, 3, dtype=torch.float64, generator=g), torch.randn(5, 3, dtype=torch.float64, generator=g)
    gx, gw = torch.autograd.grad(token_linear_cross_entropy(x, w, y, chunk_rows=2).sum(), (x, w), create_graph=True)
    hvp = torch.autograd.grad((gx * vx).sum() + (gw * vw).sum(), (x, w))
    plain = lambda a, b: F.cross_entropy(a @ b.mT, y, reduction="sum")
    expected = torch.autograd.functional.hvp(plain, (x.detach(), w.detach()), (vx, vw))[1]
    for a, b in zip(hvp, expected):
        torch.testing.assert_close(a, b, **F64)


def test_linear_cross_entropy_under_torch_func_is_the_plain_loss():
    g = _gen(16)
    x, w = torch.randn(4, 7, 3, generator=g), torch.randn(6, 3, generator=g)
    y = torch.randint(0, 6, (4, 7), generator=g)
    got = torch.func.vmap(torch.func.grad(lambda w, x, y: token_linear_cross_entropy(x, w, y).mean()), (None, 0, 0))(
        w, x, y
    )
    expected = torch.stack(
        [torch.func.grad(lambda w, x, y: cross_entropy(x @ w.mT, y))(w, x[i], y[i]) for i in range(4)]
    )
    torch.testing.assert_close(got, expected, **F32)


def test_linear_cross_entropy_errors():
    x, w, y = torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"x \(2, 3, 4\) and weight \(5, 3\) disagree"):
        token_linear_cross_entropy(x, torch.zeros(5, 3), y)
    with pytest.raises(TypeError, match="x is torch.float32 but weight is torch.float64"):
        token_linear_cross_entropy(x, w.double(), y)
    with pytest.raises(ValueError, match="disagree on the leading dims"):
        token_linear_cross_entropy(x, w, y[:, :2])
    with pytest.raises(ValueError, match="class id 5, outside the valid range \\[0, 5\\)"):
        token_linear_cross_entropy(x, w, torch.full((2, 3), 5))
    with pytest.raises(ValueError, match="chunk_rows must be a positive integer"):
        token_linear_cross_entropy(x, w, y, chunk_rows=0)
    with pytest.raises(ValueError, match="integer class ids"):
        token_linear_cross_entropy(x, w, y.float())
    assert token_linear_cross_entropy(torch.zeros(0, 4), w, torch.zeros(0, dtype=torch.long)).shape == (0,)
