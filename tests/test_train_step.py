"""Tests for flm.train: make_loss_fn, make_train_step (eager, donate, compiled) and evaluate."""

from __future__ import annotations

import math

import numpy as np
import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flm import optim
from flm.loss import token_cross_entropy
from flm.model import TransformerConfig, init_params, transformer_lm
from flm.train import evaluate, make_loss_fn, make_train_step
from flm.train.step import hand_back
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


def _donation_cases():
    schedule = optim.cosine_schedule(1e-2, 1e-3, 1, 10)
    return {
        "clip+adamw": optim.chain(
            optim.clip_by_global_norm(1.0, inplace=True), optim.adamw(schedule, weight_decay=0.1, inplace=True)
        ),
        "sgd momentum": optim.sgd(schedule, momentum=0.9),  # its trace buffers come back as new tensors
    }


@pytest.mark.parametrize("name", list(_donation_cases()))
def test_a_donating_step_hands_back_the_callers_tensors_updated_in_place(name):
    """donate=True returns the very params and optimiser-state tensors it was given (step counts,
    the recorded norm and momentum buffers included, which the transformations return as new
    tensors): the buffers keep their addresses all run long, as CUDA graphs need. The numbers
    are the pure step's, and the metrics are tensors of their own, not state buffers."""
    tx = _donation_cases()[name]
    pure, donating = make_train_step(CFG, tx), make_train_step(CFG, tx, donate=True)
    p_ref = _params()
    s_ref = tx.init(p_ref)
    p, s = _clone(p_ref), _clone(s_ref)
    buffers = tree_leaves((p, s))
    for seed in range(3):
        x, y = _batch(seed=seed)
        p_ref, s_ref, m_ref = pure(p_ref, s_ref, x, y)
        p, s, m = donating(p, s, x, y)
        assert all(a is b for a, b in zip(tree_leaves((p, s)), buffers, strict=True))
        assert _equal(p, p_ref) and _equal(s, s_ref)
        assert all(torch.equal(m[k], m_ref[k]) for k in m_ref)
        assert not any(v is b for v in m.values() for b in buffers)
    assert int(optim.step_count(s)) == 3


def test_hand_back_copies_new_leaves_into_the_old_buffers_and_leaves_unsafe_ones_alone():
    a, b, same, shared = torch.zeros(2), torch.zeros(3), torch.ones(()), torch.zeros(2)
    old = {"a": a, "b": b, "c": same, "d1": shared, "d2": shared}
    new = {"a": torch.full((2,), 5.0), "b": torch.ones(4), "c": same, "d1": torch.full((2,), 7.0), "d2": torch.ones(2)}
    out = hand_back(old, new)
    assert out["a"] is a and torch.equal(a, torch.full((2,), 5.0))
    assert out["b"] is new["b"] and torch.equal(b, torch.zeros(3))  # another shape: not copied
    assert out["c"] is same
    assert out["d1"] is shared and torch.equal(shared, torch.full((2,), 7.0))
    assert out["d2"] is new["d2"]  # one buffer cannot hold two values
    x, y = torch.tensor([1.0]), torch.tensor([2.0])
    swapped = hand_back([x, y], [y, x])  # copying y into x first would lose x's value
    assert swapped[0] is y and swapped[1] is x and float(x) == 1.0 and float(y) == 2.0
    assert hand_back([a], [a, b]) == [a, b]  # another structure: returned as it is


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), max_size=3), min_size=1, max_size=6), st.data())
def test_hand_back_property_every_fresh_leaf_lands_in_its_old_buffer(shapes, data):
    old = [torch.zeros(s) for s in shapes]
    fresh = [data.draw(st.booleans()) for _ in shapes]
    new = [torch.randn(s) if f else o for s, f, o in zip(shapes, fresh, old)]
    values = [n.clone() for n in new]
    out = hand_back(old, new)
    assert len(out) == len(old) and all(o is r for o, r in zip(old, out))
    assert all(torch.equal(r, v) for r, v in zip(out, values))


def test_cuda_graph_modes_need_the_donating_whole_step():
    tx = optim.adamw(1e-3)
    with pytest.raises(ValueError, match="donate=True"):
        make_train_step(CFG, tx, compile=True, compile_kwargs={"mode": "reduce-overhead"})
    with pytest.raises(ValueError, match="compile=True"):
        make_train_step(CFG, tx, compile="blocks", donate=True, compile_kwargs={"mode": "max-autotune"})


def test_the_first_graphed_call_raises_where_inductor_would_skip_cuda_graphs():
    """On CUDA the first call of a CUDA-graph step runs with inductor told to raise instead of
    skipping graphs, and a skip it still counts becomes an error (never a silent slow run)."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config

    from flm.train.step import CUDA_GRAPH_SKIPPED, _first_graphed_call

    seen = []

    def compiled(*args):
        seen.append(getattr(inductor_config.triton, "cudagraph_or_error", True))
        return args

    assert _first_graphed_call(compiled, "reduce-overhead", 1, 2) == (1, 2) and seen == [True]

    def skipping(*args):
        counters["inductor"]["cudagraph_skips"] += 1
        return args

    with pytest.raises(RuntimeError, match=f"^{CUDA_GRAPH_SKIPPED}: .*mode='reduce-overhead'"):
        _first_graphed_call(skipping, "reduce-overhead", 1, 2)


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


def _beside_eager(compile_kwargs, steps=3, device="cpu", tol=None):
    """Run the eager donating clip+AdamW step and a compiled one side by side on CCFG; check every
    step's metrics (read only at the end, as a loop's log interval does) and the final state
    equal. Returns the compiled side's buffers before the first step and its final params/state."""
    torch._dynamo.reset()
    tol = tol or dict(rtol=1e-5, atol=1e-6)
    tx = _donation_cases()["clip+adamw"]
    eager = make_train_step(CCFG, tx, donate=True)
    compiled = make_train_step(CCFG, tx, compile=True, donate=True, compile_kwargs=compile_kwargs)
    pe = init_params(CCFG, torch.Generator().manual_seed(0), device=device)
    se = tx.init(pe)
    pc, sc = _clone(pe), _clone(se)
    buffers = tree_leaves((pc, sc))
    kept, expected = [], []
    for seed in range(steps):
        x, y = (t.to(device) for t in _batch(CCFG, seed=seed))
        pe, se, me = eager(pe, se, x, y)
        pc, sc, mc = compiled(pc, sc, x, y)
        kept.append(mc)
        expected.append(me)
    for mc, me in zip(kept, expected):
        for k in me:
            torch.testing.assert_close(mc[k], me[k], **tol)
    for a, b in zip(tree_leaves((pc, sc)), tree_leaves((pe, se))):
        torch.testing.assert_close(a, b, **tol)
    return buffers, (pc, sc)


@pytest.mark.compile
def test_the_plain_compiled_donating_step_updates_params_in_place_and_equals_eager():
    """Under a plain whole-step compile the donated params and AdamW moments are updated in place
    (the same tensors come back: AdamW's per-leaf path writes them in place under compile) and
    everything equals the eager donating step; the step counts and the recorded norm are not
    handed back there (its trace cost), only under CUDA graphs (next test)."""
    buffers, (params, state) = _beside_eager({"backend": "aot_eager"})
    adam = state[1][0]
    kept = tree_leaves((params, adam.m, adam.v))
    assert len(kept) == 3 * len(tree_leaves(params))
    assert all(any(a is b for b in buffers) for a in kept)


@pytest.mark.compile
def test_reduce_overhead_mode_marks_static_buffers_and_returns_metrics_of_their_own():
    """mode="reduce-overhead" (CUDA graphs on CUDA; inductor compiles as usual on a CPU): every
    param and state leaf is marked a static input and handed back (the compiled copies into the
    old buffers; runs on every supported torch, whose dynamo must trace them), the step is the
    eager step's to float32 round-off, and each step's metrics stay readable after later steps
    (on CUDA the graphs' own outputs are overwritten by the next replay, so the step returns
    clones)."""
    buffers, state = _beside_eager({"mode": "reduce-overhead"})
    assert all(a is b for a, b in zip(tree_leaves(state), buffers, strict=True))
    assert all(getattr(b, "_dynamo_static_input_type", None) == "unguarded" for b in buffers)


@pytest.mark.compile
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_reduce_overhead_on_cuda_replays_graphs_equal_to_eager():
    """On a GPU: the donating step under mode="reduce-overhead" is captured (no graph skipped),
    equals the eager step, and every step's metrics stay readable after later replays."""
    from flm._compat import cudagraph_skips

    skips = cudagraph_skips()
    _beside_eager({"mode": "reduce-overhead"}, steps=5, device="cuda", tol=dict(rtol=1e-4, atol=1e-5))
    assert cudagraph_skips() == skips


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
