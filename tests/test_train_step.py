"""Tests for flm.train: make_loss_fn, make_train_step (eager, donate, compiled) and evaluate."""

from __future__ import annotations

import math

import numpy as np
import optree
import pytest
import torch

from flm import optim
from flm.loss import token_cross_entropy
from flm.model import TransformerConfig, init_params, transformer_lm
from flm.train import evaluate, make_loss_fn, make_train_step
from flm.tree import tree_leaves, tree_map

CFG = TransformerConfig(vocab_size=32, context_length=8, d_model=16, num_layers=2, num_heads=2, d_ff=32)


def _params(cfg=CFG, dtype=torch.float64, seed=0):
    return init_params(cfg, torch.Generator().manual_seed(seed), dtype=dtype)


def _batch(cfg=CFG, batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length + 1), generator=g)
    return w[:, :-1], w[:, 1:]


def _clone(tree):
    return tree_map(lambda t: t.clone(), tree)


def _equal(a, b):
    return all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(tree_leaves(a), tree_leaves(b)))


def test_loss_fn_is_mean_token_cross_entropy():
    p = _params()
    x, y = _batch()
    loss = make_loss_fn(CFG)(p, x, y)
    ref = torch.nn.functional.cross_entropy(transformer_lm(p, x, CFG).reshape(-1, CFG.vocab_size), y.reshape(-1))
    assert loss.dim() == 0 and loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=1e-14, atol=0)


def test_grad_and_value_equals_classic_autograd():
    p = _params()
    x, y = _batch()
    loss_fn = make_loss_fn(CFG)
    grads, loss = torch.func.grad_and_value(loss_fn)(p, x, y)
    leaves, spec = optree.tree_flatten(p, namespace="")
    t_leaves = [t.clone().requires_grad_(True) for t in leaves]
    t_loss = loss_fn(optree.tree_unflatten(spec, t_leaves), x, y)
    t_loss.backward()
    assert torch.equal(loss, t_loss.detach())
    for g, t in zip(tree_leaves(grads), t_leaves):
        torch.testing.assert_close(g, t.grad, rtol=1e-13, atol=1e-15)


def test_train_step_matches_manual_step_and_reports_metrics():
    sched = optim.cosine_schedule(1e-2, 1e-3, 2, 10)
    tx = optim.chain(optim.clip_by_global_norm(0.5), optim.adamw(sched, weight_decay=0.1))
    step = make_train_step(CFG, tx)
    p = _params()
    state = tx.init(p)
    x, y = _batch()
    p_snap, s_snap = _clone(p), _clone(state)
    for t in range(4):
        new_p, new_state, metrics = step(p, state, x, y)
        assert _equal(p, p_snap) and _equal(state, s_snap)  # pure without donate
        grads, loss = torch.func.grad_and_value(make_loss_fn(CFG))(p, x, y)
        updates, ref_state = tx.update(grads, state, p)
        ref_p = optim.apply_updates(p, updates)
        assert _equal(new_p, ref_p) and _equal(new_state, ref_state)
        assert set(metrics) == {"loss", "grad_norm", "lr"}
        assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in metrics.values())
        assert torch.equal(metrics["loss"], loss)
        assert torch.equal(metrics["grad_norm"], optim.global_norm(grads))  # before clipping
        assert float(metrics["lr"]) == float(sched(t))
        if t == 0:
            assert float(metrics["grad_norm"]) > 0.5  # clipping is active, so "before" is meaningful
        p, state = new_p, new_state
        p_snap, s_snap = _clone(p), _clone(state)
    # no schedule → no lr metric
    plain = make_train_step(CFG, optim.clip_by_global_norm(1.0))
    _, _, m = plain(p, (optim.EmptyState(),), x, y)
    assert set(m) == {"loss", "grad_norm"}


def test_train_step_donate_gives_same_numbers():
    tx = optim.adamw(1e-2)
    p = _params()
    state = tx.init(p)
    x, y = _batch()
    pure, donating = make_train_step(CFG, tx), make_train_step(CFG, tx, donate=True)
    p_a, s_a, m_a = pure(p, state, x, y)
    p_b_in = _clone(p)
    p_b, s_b, m_b = donating(p_b_in, state, x, y)
    assert all(a is b for a, b in zip(tree_leaves(p_b), tree_leaves(p_b_in)))  # updated in place
    assert _equal(p_a, p_b) and _equal(s_a, s_b) and torch.equal(m_a["loss"], m_b["loss"])


OVERFIT_STEPS = 100  # measured: loss ≈ 0.02 after 50 steps, ≈ 0.006 after 100


def test_tiny_model_overfits_one_batch():
    """float32, seeded: loss starts near ln V and falls below 0.05 within OVERFIT_STEPS."""
    torch.manual_seed(0)
    p = _params(dtype=torch.float32)
    tx = optim.adamw(1e-2, weight_decay=0.0)
    state = tx.init(p)
    x, y = _batch(batch=4, seed=2)
    step = make_train_step(CFG, tx)
    losses = []
    for _ in range(OVERFIT_STEPS):
        p, state, m = step(p, state, x, y)
        losses.append(float(m["loss"]))
    print(
        f"\noverfit one batch: loss {losses[0]:.3f} → {losses[-1]:.4f} in {OVERFIT_STEPS} steps (ln V = {math.log(CFG.vocab_size):.3f})"
    )
    assert abs(losses[0] - math.log(CFG.vocab_size)) < 1.5
    assert losses[-1] < 0.05


CCFG = TransformerConfig(vocab_size=32, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32)


@pytest.mark.compile
def test_compiled_step_fullgraph_equals_eager():
    """compile=True wraps the whole step in torch.compile(fullgraph=True): any graph break (e.g.
    a host sync such as .item()) would raise. aot_eager captures forward+backward+optimiser
    without C++ codegen, keeping CI fast."""
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(optim.cosine_schedule(1e-2, 1e-3, 2, 10)))
    eager = make_train_step(CCFG, tx)
    compiled = make_train_step(CCFG, tx, compile=True, compile_kwargs={"backend": "aot_eager"})
    torch._dynamo.reset()
    p = _params(CCFG, dtype=torch.float32)
    state = tx.init(p)
    pe, se, pc, sc = p, state, _clone(p), _clone(state)
    for seed in range(3):
        x, y = _batch(CCFG, seed=seed)
        pe, se, me = eager(pe, se, x, y)
        pc, sc, mc = compiled(pc, sc, x, y)
        for k in me:
            torch.testing.assert_close(mc[k], me[k], rtol=1e-5, atol=1e-6)
    for a, b in zip(tree_leaves(pc), tree_leaves(pe)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.equal(optim.step_count(sc), optim.step_count(se))


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------


def _direct_eval(p, tokens, T, starts):
    """Mean cross-entropy over windows tokens[s : s + T + 1], computed window by window."""
    losses = []
    for s in starts:
        w = torch.as_tensor(np.asarray(tokens[s : s + T + 1]), dtype=torch.int64)
        logits = transformer_lm(p, w[None, :-1], CFG)
        losses.append(token_cross_entropy(logits, w[None, 1:]).double().reshape(-1))
    return float(torch.cat(losses).mean())


def _every_prediction(p, tokens, T):
    """The mean loss over every predicted token 1 … n − 1, one forward pass per token: token ``t``
    is predicted from its window's start (``T · ⌊(t − 1) / T⌋``), or, for the ``(n − 1) mod T``
    tokens after the last whole window, from the sequence's last ``T + 1`` tokens (``n − 1 − T``)."""
    n = len(tokens)
    whole = (n - 1) // T * T
    ids = torch.as_tensor(np.asarray(tokens).astype(np.int64))
    losses = []
    for t in range(1, n):
        start = (t - 1) // T * T if t <= whole else n - 1 - T
        logits = transformer_lm(p, ids[None, start:t], CFG)[:, -1]
        losses.append(token_cross_entropy(logits, ids[None, t]).double())
    return float(torch.cat(losses).mean()), len(losses)


@pytest.mark.parametrize("n_tokens", [8 * 7 + 1, 8 * 7 + 5, 8 + 2])
def test_evaluate_equals_direct_computation(n_tokens):
    """Covered: consecutive windows of T + 1 tokens sharing their boundary token, and (issue 21
    item 14: "every validation token" evaluated only whole windows) the tail: when n − 1 is not a
    multiple of T, the leftover tokens are predicted too, so the mean is over all n − 1 predicted
    tokens, equal to predicting each token with its own forward pass."""
    p = _params()
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, n_tokens).astype(np.uint16)
    T = 8
    out = evaluate(p, CFG, tokens, batch_size=3, context_length=T)
    direct, predicted = _every_prediction(p, tokens, T)
    assert out["tokens"] == predicted == n_tokens - 1
    assert out["loss"] == pytest.approx(direct, rel=1e-6)
    if (n_tokens - 1) % T == 0:  # whole windows only: the window-by-window sum, to the last bit
        starts = range(0, n_tokens - 1, T)
        assert out["loss"] == pytest.approx(_direct_eval(p, tokens, T, starts), rel=1e-12)
    assert out["perplexity"] == pytest.approx(math.exp(out["loss"]), rel=1e-12)
    # a torch tensor of tokens, another batch size and a shorter context give consistent results too
    out_t = evaluate(p, CFG, torch.from_numpy(tokens.astype(np.int64)), batch_size=7, context_length=T)
    assert out_t["loss"] == pytest.approx(out["loss"], rel=1e-12) and out_t["tokens"] == out["tokens"]
    out1 = evaluate(p, CFG, tokens, batch_size=1, context_length=T)
    assert out1["loss"] == pytest.approx(out["loss"], rel=1e-12)
    out4 = evaluate(p, CFG, tokens, batch_size=2, context_length=4)
    assert out4["tokens"] == n_tokens - 1
    assert out4["loss"] == pytest.approx(_every_prediction(p, tokens, 4)[0], rel=1e-6)


def test_evaluate_perplexity_of_a_nan_loss_is_nan():
    """evaluate's perplexity is flm.loss.perplexity's (issue 20): NaN weights give a NaN loss and a
    NaN perplexity (the hand-written ``exp(l) if l < 700 else inf`` gave inf)."""
    p = tree_map(lambda x: torch.full_like(x, math.nan), _params())
    tokens = np.arange(17, dtype=np.uint16) % CFG.vocab_size
    out = evaluate(p, CFG, tokens, batch_size=2, context_length=8)
    assert math.isnan(out["loss"]) and math.isnan(out["perplexity"])


def test_evaluate_num_batches_subsets_windows():
    p = _params()
    T, n_windows = 8, 20
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, n_windows * T + 1)
    out = evaluate(p, CFG, tokens, batch_size=2, context_length=T, num_batches=3)
    assert out["tokens"] == 6 * T
    starts = np.arange(n_windows)[np.linspace(0, n_windows - 1, 6).round().astype(int)] * T
    assert out["loss"] == pytest.approx(_direct_eval(p, tokens, T, starts), rel=1e-12)
    # more batches than windows: everything, same as num_batches=None
    full = evaluate(p, CFG, tokens, batch_size=2, context_length=T)
    everything = evaluate(p, CFG, tokens, batch_size=2, context_length=T, num_batches=100)
    assert everything == full and full["tokens"] == n_windows * T
    # with a tail: a subset is whole windows only; covering every window is everything, tail too
    tail = np.append(tokens, [1, 2, 3])
    assert evaluate(p, CFG, tail, batch_size=2, context_length=T, num_batches=3)["tokens"] == 6 * T
    everything = evaluate(p, CFG, tail, batch_size=2, context_length=T, num_batches=100)
    assert everything == evaluate(p, CFG, tail, batch_size=2, context_length=T)
    assert everything["tokens"] == len(tail) - 1


def test_evaluate_rejects_bad_inputs():
    p = _params()
    with pytest.raises(ValueError, match="at least"):
        evaluate(p, CFG, np.zeros(8, dtype=np.int64), batch_size=1, context_length=8)
    evaluate(p, CFG, np.zeros(9, dtype=np.int64), batch_size=1, context_length=8)  # exactly one window
    with pytest.raises(ValueError):
        evaluate(p, CFG, np.zeros((2, 9), dtype=np.int64), batch_size=1, context_length=8)
    with pytest.raises(ValueError):
        evaluate(p, CFG, np.zeros(100, dtype=np.int64), batch_size=1, context_length=9)  # > model context
    for kw in (dict(batch_size=0), dict(num_batches=0), dict(num_batches=-1), dict(context_length=0)):
        args = {"batch_size": 1, "context_length": 8, **kw}
        with pytest.raises(ValueError):
            evaluate(p, CFG, np.zeros(100, dtype=np.int64), **args)
    with pytest.raises(ValueError):
        evaluate(p, CFG, np.full(100, CFG.vocab_size, dtype=np.int64), batch_size=1, context_length=8)


def test_eager_autograd_path_equals_torch_func_grad_and_value():
    """flm.train.step.grad_and_value: torch.autograd.grad on plain eager tensors, torch.func inside
    transforms; the gradients and losses agree, and the caller's tensors are not marked or changed."""
    from flm.train.step import grad_and_value

    p = _params()
    x, y = _batch()
    loss_fn = make_loss_fn(CFG)
    snap = _clone(p)
    g_eager, l_eager = grad_and_value(loss_fn)(p, x, y)
    g_func, l_func = torch.func.grad_and_value(loss_fn)(p, x, y)
    assert _equal(p, snap) and not any(t.requires_grad for t in tree_leaves(p))
    assert not l_eager.requires_grad and torch.equal(l_eager, l_func)
    for a, b in zip(tree_leaves(g_eager), tree_leaves(g_func), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-16)
    # inside vmap (wrapped tensors) it is torch.func.grad_and_value
    stacked = tree_map(lambda t: torch.stack([t, t]), p)
    g_vmap, _ = torch.func.vmap(grad_and_value(loss_fn), in_dims=(0, None, None))(stacked, x, y)
    for a, b in zip(tree_leaves(g_vmap), tree_leaves(g_func), strict=True):
        torch.testing.assert_close(a[1], b, rtol=1e-12, atol=1e-14)
