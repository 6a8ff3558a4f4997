"""Tests for flm.optim: AdamW/SGD parity with torch.optim, clipping, schedules, combinators,
purity, state layout and vmap.

Lockstep design: both optimisers start from the same float64 init of a tiny LM; each step the
gradient of the real flm LM loss is taken by classic autograd on the torch side's leaf tensors
and fed to both (so the comparison isolates the optimisers). A separate test lets each side take
its own gradient (torch.func.grad on the flm side) — there rounding differences of one ulp in the
update formula (flm returns *updates*, torch writes parameters in place, so the two can never be
bitwise equal) are amplified by the training dynamics, which is measured and bounded too.
"""

from __future__ import annotations

import math

import optree
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flm import optim
from flm.model import TransformerConfig, init_params
from flm.train import make_loss_fn
from flm.tree import num_elements, tree_leaves, tree_map

CFG = TransformerConfig(vocab_size=32, context_length=8, d_model=16, num_layers=2, num_heads=2, d_ff=32)
LOCKSTEP_STEPS = 1000
VARIANT_STEPS = 500  # cosine / mask variants: half as long to keep CI time down
TOL = 1e-10


def _params64(seed: int = 0):
    return init_params(CFG, torch.Generator().manual_seed(seed), dtype=torch.float64)


def _batches(n: int = 8, seed: int = 1, batch: int = 4):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        w = torch.randint(0, CFG.vocab_size, (batch, CFG.context_length + 1), generator=g)
        out.append((w[:, :-1], w[:, 1:]))
    return out


def _rel_err(flm_params, torch_leaves) -> float:
    """Max over leaves of ‖a − b‖ / ‖b‖."""
    errs = [float((a - b.detach()).norm() / b.detach().norm()) for a, b in zip(tree_leaves(flm_params), torch_leaves)]
    return max(errs)


def _lockstep(tx, make_torch_opt, *, steps, schedule=None, own_grads=False):
    """Run flm ``tx`` and a torch optimiser side by side; return (max rel err, final flm params)."""
    loss_fn = make_loss_fn(CFG)
    grad_fn = torch.func.grad(loss_fn)
    p = _params64()
    leaves, spec = optree.tree_flatten(p, namespace="")
    t_leaves = [x.clone().requires_grad_(True) for x in leaves]
    t_tree = optree.tree_unflatten(spec, t_leaves)
    opt = make_torch_opt(t_leaves)
    state = tx.init(p)
    batches = _batches()
    worst = 0.0
    for i in range(steps):
        x, y = batches[i % len(batches)]
        if schedule is not None:
            for group in opt.param_groups:
                group["lr"] = float(schedule(i))
        opt.zero_grad(set_to_none=True)
        loss_fn(t_tree, x, y).backward()
        if own_grads:
            grads = grad_fn(p, x, y)
        else:
            grads = optree.tree_unflatten(spec, [t.grad.detach().clone() for t in t_leaves])
        opt.step()
        updates, state = tx.update(grads, state, p)
        p = optim.apply_updates(p, updates)
        if i % 100 == 99 or i == steps - 1:
            worst = max(worst, _rel_err(p, t_leaves))
    # the run must actually have moved the parameters (not a vacuous comparison)
    moved = _rel_err(p, [x for x in leaves])
    assert moved > 1e-3
    return worst, p


# --------------------------------------------------------------------------------------------
# AdamW vs torch.optim.AdamW
# --------------------------------------------------------------------------------------------


def test_adamw_matches_torch_lockstep_1000_steps():
    hp = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    tx = optim.adamw(hp["lr"], betas=hp["betas"], eps=hp["eps"], weight_decay=hp["weight_decay"])
    err, _ = _lockstep(tx, lambda ps: torch.optim.AdamW(ps, **hp), steps=LOCKSTEP_STEPS)
    print(f"\nAdamW vs torch.optim.AdamW, {LOCKSTEP_STEPS} float64 steps: max relative error {err:.3e}")
    assert err <= TOL


def test_adamw_matches_torch_with_cosine_schedule():
    sched = optim.cosine_schedule(1e-2, 1e-3, warmup_iters=50, cosine_cycle_iters=400)  # covers all 3 phases
    tx = optim.adamw(sched, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    make = lambda ps: torch.optim.AdamW(ps, lr=0.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)  # noqa: E731
    err, _ = _lockstep(tx, make, steps=VARIANT_STEPS, schedule=sched)
    print(f"\nAdamW + cosine schedule, {VARIANT_STEPS} float64 steps: max relative error {err:.3e}")
    assert err <= TOL


def test_adamw_matches_torch_with_weight_decay_mask():
    def decay_mask(params):  # decay matrices only; no decay for RMSNorm gains
        return tree_map(lambda t: t.dim() >= 2, params)

    tx = optim.adamw(5e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.5, mask=decay_mask)

    def make(ps):
        decay = [t for t in ps if t.dim() >= 2]
        no_decay = [t for t in ps if t.dim() < 2]
        assert decay and no_decay
        return torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.5}, {"params": no_decay, "weight_decay": 0.0}],
            lr=5e-3, betas=(0.9, 0.95), eps=1e-8,
        )

    err, _ = _lockstep(tx, make, steps=VARIANT_STEPS)
    print(f"\nAdamW + weight-decay mask (two torch param groups), {VARIANT_STEPS} steps: max relative error {err:.3e}")
    assert err <= TOL


def test_adamw_mask_as_tree_equals_mask_as_callable():
    p = _params64()
    g = tree_map(lambda t: torch.randn_like(t), p)
    mask_tree = tree_map(lambda t: t.dim() >= 2, p)
    a = optim.adamw(1e-2, weight_decay=0.3, mask=mask_tree)
    b = optim.adamw(1e-2, weight_decay=0.3, mask=lambda q: tree_map(lambda t: t.dim() >= 2, q))
    ua, _ = a.update(g, a.init(p), p)
    ub, _ = b.update(g, b.init(p), p)
    assert all(torch.equal(x, y) for x, y in zip(tree_leaves(ua), tree_leaves(ub)))
    with pytest.raises(ValueError, match="mask"):
        optim.adamw(1e-2, mask=[True]).update(g, a.init(p), p)


def test_adamw_own_gradients_trajectory_stays_close():
    """Each side differentiates its own parameters (flm: torch.func.grad; torch: autograd).

    Over 300 steps the trajectories agree to ≤ 1e-10; they are not bitwise equal because flm
    returns updates (θ + Δ) while torch writes θ in place, so 1-ulp differences appear at step 1
    and the (chaotic) dynamics amplify them slowly over much longer runs.
    """
    hp = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    tx = optim.adamw(hp["lr"], betas=hp["betas"], eps=hp["eps"], weight_decay=hp["weight_decay"])
    err, _ = _lockstep(tx, lambda ps: torch.optim.AdamW(ps, **hp), steps=300, own_grads=True)
    print(f"\nAdamW, independent gradients, 300 float64 steps: max relative error {err:.3e}")
    assert err <= TOL


# --------------------------------------------------------------------------------------------
# SGD vs torch.optim.SGD
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_matches_torch(momentum):
    tx = optim.sgd(0.05, momentum=momentum)
    err, _ = _lockstep(tx, lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=momentum), steps=200)
    print(f"\nSGD(momentum={momentum}) vs torch.optim.SGD, 200 steps: max relative error {err:.3e}")
    assert err <= TOL


def test_sgd_state_and_schedule():
    p = _params64()
    s0 = optim.sgd(0.1).init(p)
    assert s0.momentum == () and s0.step.dtype == torch.int64 and s0.step.dim() == 0
    s1 = optim.sgd(0.1, momentum=0.5).init(p)
    assert num_elements(s1.momentum) == num_elements(p)
    sched = optim.cosine_schedule(1.0, 0.0, 2, 10)
    tx = optim.sgd(sched)
    g = tree_map(torch.ones_like, p)
    state = tx.init(p)
    for t in range(4):
        u, state = tx.update(g, state, p)
        expected = -float(sched(t))
        assert all(torch.all(x == expected) for x in tree_leaves(u))
    assert int(state.step) == 4
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError):
            optim.sgd(0.1, momentum=bad)
    with pytest.raises(ValueError):
        optim.sgd(-1.0)


# --------------------------------------------------------------------------------------------
# AdamW state, purity, inplace, vmap, errors
# --------------------------------------------------------------------------------------------


def test_adamw_state_layout_and_memory():
    p = _params64()
    tx = optim.adamw(1e-3)
    state = tx.init(p)
    assert isinstance(state, optim.AdamWState) and state._fields == ("step", "m", "v")
    assert state.step.dtype == torch.int64 and state.step.dim() == 0 and int(state.step) == 0
    n = num_elements(p)
    assert num_elements(state.m) == n and num_elements(state.v) == n
    assert num_elements(state) == 2 * n + 1  # m, v and the step count: no hidden copies
    for tree in (state.m, state.v):
        assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(tree_leaves(tree), tree_leaves(p)))
    g = tree_map(torch.randn_like, p)
    _, state = tx.update(g, state, p)
    assert int(state.step) == 1 and state.step.dtype == torch.int64
    assert num_elements(state) == 2 * n + 1


def _clone(tree):
    return tree_map(lambda t: t.clone(), tree)


def _tree_equal(a, b) -> bool:
    la, lb = tree_leaves(a), tree_leaves(b)
    return len(la) == len(lb) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(la, lb))


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: optim.adamw(1e-2, weight_decay=0.1),
        lambda: optim.sgd(1e-2, momentum=0.9),
        lambda: optim.chain(optim.clip_by_global_norm(0.1), optim.adamw(optim.cosine_schedule(1e-2, 1e-3, 2, 5))),
    ],
    ids=["adamw", "sgd-momentum", "chain-clip-adamw"],
)
def test_update_is_pure(make_tx):
    tx = make_tx()
    p = _params64()
    state = tx.init(p)
    for i in range(3):
        g = tree_map(lambda t: torch.randn_like(t) * (i + 1), p)
        snap = (_clone(g), _clone(state), _clone(p))
        updates, new_state = tx.update(g, state, p)
        assert _tree_equal(g, snap[0]) and _tree_equal(state, snap[1]) and _tree_equal(p, snap[2])
        new_p = optim.apply_updates(p, updates)
        assert _tree_equal(p, snap[2])
        p, state = new_p, new_state


def test_adamw_inplace_gives_same_numbers():
    p_a = p_b = _params64()
    pure = optim.adamw(1e-2, betas=(0.8, 0.9), weight_decay=0.2)
    donating = optim.adamw(1e-2, betas=(0.8, 0.9), weight_decay=0.2, inplace=True)
    s_a, s_b = pure.init(p_a), donating.init(p_b)
    p_b = _clone(p_b)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        g = tree_map(lambda t: torch.randn(t.shape, generator=gen, dtype=t.dtype), p_a)
        u_a, s_a = pure.update(g, s_a, p_a)
        old_m_b = tree_leaves(s_b.m)
        u_b, s_b = donating.update(g, s_b, p_b)
        # donation: the new moments live in the old state's buffers
        assert all(x is y for x, y in zip(tree_leaves(s_b.m), old_m_b))
        p_a = optim.apply_updates(p_a, u_a)
        p_b = optim.apply_updates(p_b, u_b, inplace=True)
    assert _tree_equal(p_a, p_b) and _tree_equal(s_a, s_b)


def test_adamw_vmap_over_stacked_models_equals_separate_updates():
    K = 3
    models = [_params64(seed) for seed in range(K)]
    tx = optim.adamw(optim.cosine_schedule(1e-2, 1e-3, 1, 4), betas=(0.9, 0.95), weight_decay=0.1)
    states = [tx.init(m) for m in models]
    stack = lambda trees: tree_map(lambda *xs: torch.stack(xs), *trees)  # noqa: E731
    sp, ss = stack(models), stack(states)
    assert ss.step.shape == (K,)
    vupdate = torch.func.vmap(lambda g, s, p: tx.update(g, s, p))
    gen = torch.Generator().manual_seed(5)
    for _ in range(3):
        grads = [tree_map(lambda t: torch.randn(t.shape, generator=gen, dtype=t.dtype), m) for m in models]
        su, ss = vupdate(stack(grads), ss, sp)
        sp = optim.apply_updates(sp, su)
        for k in range(K):
            u, states[k] = tx.update(grads[k], states[k], models[k])
            models[k] = optim.apply_updates(models[k], u)
    for k in range(K):
        got = tree_map(lambda t: t[k], sp)
        for a, b in zip(tree_leaves(got), tree_leaves(models[k])):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
        assert torch.equal(ss.step[k], states[k].step)


def test_adamw_rejects_bad_hyperparameters_and_missing_params():
    for kw in (dict(betas=(1.0, 0.9)), dict(betas=(0.9, -0.1)), dict(eps=0.0), dict(weight_decay=-1.0)):
        with pytest.raises(ValueError):
            optim.adamw(1e-3, **kw)
    with pytest.raises(ValueError):
        optim.adamw(-1e-3)
    p = _params64()
    tx = optim.adamw(1e-3, weight_decay=0.1)
    with pytest.raises(ValueError, match="params"):
        tx.update(p, tx.init(p))
    # without weight decay params are not needed
    tx0 = optim.adamw(1e-3, weight_decay=0.0)
    tx0.update(p, tx0.init(p))


def test_adamw_first_step_is_signed_lr():
    """With m̂/√v̂ = g/|g| at t = 1, the first update is −lr·sign(g) (up to ε) − lr·λ·θ."""
    p = {"w": torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)}
    g = {"w": torch.tensor([0.5, -4.0, 1e-3], dtype=torch.float64)}
    tx = optim.adamw(0.1, weight_decay=0.0, eps=1e-12)
    u, _ = tx.update(g, tx.init(p), p)
    torch.testing.assert_close(u["w"], torch.tensor([-0.1, 0.1, -0.1], dtype=torch.float64), rtol=1e-8, atol=0)


# --------------------------------------------------------------------------------------------
# Clipping and global norm
# --------------------------------------------------------------------------------------------

shapes = st.lists(st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=5)


def _random_tree(shape_list, seed, scale, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return {f"p{i}": torch.randn(s, generator=g, dtype=dtype) * scale for i, s in enumerate(shape_list)}


@given(shapes, st.integers(0, 2**31 - 1), st.floats(1e-3, 1e3))
def test_global_norm_matches_vector_norm_of_concatenation(shape_list, seed, scale):
    tree = _random_tree(shape_list, seed, scale)
    expected = torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in tree_leaves(tree)]))
    got = optim.global_norm(tree)
    assert got.dtype == torch.float64 and got.dim() == 0
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)


def test_global_norm_empty_tree_is_zero():
    assert float(optim.global_norm({})) == 0.0


@given(shapes, st.integers(0, 2**31 - 1), st.floats(1e-3, 1e3), st.floats(1e-2, 1e2))
def test_clip_matches_torch_clip_grad_norm(shape_list, seed, scale, max_norm):
    grads = _random_tree(shape_list, seed, scale)
    clipped, state = optim.clip_by_global_norm(max_norm).update(grads, optim.EmptyState())
    assert state == optim.EmptyState()
    ts = [torch.zeros_like(t, requires_grad=True) for t in tree_leaves(grads)]
    for t, g in zip(ts, tree_leaves(grads)):
        t.grad = g.clone()
    norm_before = torch.nn.utils.clip_grad_norm_(ts, max_norm)
    torch.testing.assert_close(optim.global_norm(grads), norm_before, rtol=1e-14, atol=0)
    if float(norm_before) < max_norm:  # torch scales by min(1, M/(‖g‖+ε)); flm leaves g alone: same below M − ε
        assert all(torch.equal(a, b) for a, b in zip(tree_leaves(clipped), tree_leaves(grads)))
    for a, t in zip(tree_leaves(clipped), ts):
        torch.testing.assert_close(a, t.grad, rtol=1e-14, atol=0)


@given(shapes, st.integers(0, 2**31 - 1), st.floats(1e-6, 1e6), st.floats(1e-3, 1e3))
def test_clip_properties(shape_list, seed, scale, max_norm):
    grads = _random_tree(shape_list, seed, scale)
    snap = _clone(grads)
    clipped, _ = optim.clip_by_global_norm(max_norm).update(grads, optim.EmptyState())
    assert _tree_equal(grads, snap)  # pure
    before, after = float(optim.global_norm(grads)), float(optim.global_norm(clipped))
    assert after <= before * (1 + 1e-12)  # never increases the norm
    if before <= max_norm:
        assert _tree_equal(clipped, grads)  # exactly the identity below the threshold
    else:
        assert after <= max_norm * (1 + 1e-12)
        assert after >= max_norm * before / (before + 1e-6) * (1 - 1e-12)  # just under M: M·‖g‖/(‖g‖ + ε)
    assert all(a.dtype == b.dtype and a.shape == b.shape for a, b in zip(tree_leaves(clipped), tree_leaves(grads)))


def test_clip_large_gradient_float32_and_validation():
    g = {"a": torch.full((10,), 1e4), "b": [torch.full((3, 3), -1e4)]}
    clipped, _ = optim.clip_by_global_norm(1.0).update(g, optim.EmptyState())
    assert float(optim.global_norm(clipped)) <= 1.0 + 1e-6
    assert clipped["a"].dtype == torch.float32
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            optim.clip_by_global_norm(bad)
    assert optim.clip_by_global_norm(1.0).update({}, optim.EmptyState()) == ({}, optim.EmptyState())


# --------------------------------------------------------------------------------------------
# chain / identity / apply_updates
# --------------------------------------------------------------------------------------------


@given(shapes, st.integers(0, 2**31 - 1), st.integers(0, 4))
def test_chain_of_identities_is_identity(shape_list, seed, n):
    grads = _random_tree(shape_list, seed, 1.0)
    tx = optim.chain(*[optim.identity() for _ in range(n)])
    state = tx.init(grads)
    assert state == tuple(optim.EmptyState() for _ in range(n))
    out, new_state = tx.update(grads, state, grads)
    assert _tree_equal(out, grads) and new_state == state
    assert tx.learning_rate is None


@given(shapes, st.integers(0, 2**31 - 1), st.floats(1e-2, 1e2))
def test_chain_equals_sequential_application(shape_list, seed, scale):
    params = _random_tree(shape_list, seed, 1.0)
    a, b = optim.clip_by_global_norm(1.0), optim.adamw(1e-2, weight_decay=0.1)
    tx = optim.chain(a, b)
    state = tx.init(params)
    sa, sb = a.init(params), b.init(params)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        g = tree_map(lambda t: torch.randn(t.shape, generator=gen, dtype=t.dtype) * scale, params)
        u, state = tx.update(g, state, params)
        ua, sa = a.update(g, sa, params)
        ub, sb = b.update(ua, sb, params)
        assert _tree_equal(u, ub) and _tree_equal(state, (sa, sb))
    assert isinstance(state, tuple) and isinstance(state[1], optim.AdamWState)
    with pytest.raises(ValueError):
        tx.update(g, (sa,), params)


def test_chain_learning_rate_and_step_count():
    sched = optim.cosine_schedule(1.0, 0.1, 2, 6)
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(sched))
    assert tx.learning_rate is sched
    p = {"w": torch.ones(3)}
    state = tx.init(p)
    assert int(optim.step_count(state)) == 0
    assert float(optim.learning_rate_at(tx, state)) == 0.0
    _, state = tx.update(p, state, p)
    assert int(optim.step_count(state)) == 1
    assert float(optim.learning_rate_at(tx, state)) == 0.5
    assert optim.step_count(optim.EmptyState()) is None
    assert optim.learning_rate_at(optim.clip_by_global_norm(1.0), (optim.EmptyState(),)) is None


DTYPES = [torch.bfloat16, torch.float32, torch.float64]


@given(shapes, st.integers(0, 2**31 - 1), st.lists(st.sampled_from(DTYPES), min_size=5, max_size=5), st.sampled_from(DTYPES))
def test_apply_updates_preserves_structure_dtypes_and_inputs(shape_list, seed, p_dtypes, u_dtype):
    gen = torch.Generator().manual_seed(seed)
    params = {"a": [torch.randn(s, generator=gen).to(p_dtypes[i]) for i, s in enumerate(shape_list)]}
    updates = tree_map(lambda t: torch.randn(t.shape, generator=gen).to(u_dtype), params)
    p_snap, u_snap = _clone(params), _clone(updates)
    out = optim.apply_updates(params, updates)
    assert optree.tree_structure(out, namespace="") == optree.tree_structure(params, namespace="")
    for o, p, u in zip(tree_leaves(out), tree_leaves(params), tree_leaves(updates)):
        assert o.dtype == p.dtype and o.shape == p.shape and o is not p
        torch.testing.assert_close(o, p + u.to(p.dtype), rtol=0, atol=0)
    assert _tree_equal(params, p_snap) and _tree_equal(updates, u_snap)
    # inplace: the same tensors, now holding the sum
    same = optim.apply_updates(params, updates, inplace=True)
    assert all(x is y for x, y in zip(tree_leaves(same), tree_leaves(params)))
    assert _tree_equal(same, out)


def test_apply_updates_rejects_mismatched_structures():
    with pytest.raises(ValueError):
        optim.apply_updates({"a": torch.ones(2)}, {"b": torch.ones(2)})
    with pytest.raises(ValueError):
        optim.apply_updates([torch.ones(2)], [torch.ones(2), torch.ones(2)])


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------


def handout_lr(t, a_max, a_min, t_w, t_c):
    """Handout §4.4, transcribed literally."""
    if t < t_w:
        return t / t_w * a_max
    if t <= t_c:
        return a_min + 0.5 * (1 + math.cos((t - t_w) / (t_c - t_w) * math.pi)) * (a_max - a_min)
    return a_min


def test_cosine_schedule_boundaries():
    a_max, a_min, t_w, t_c = 1.0, 0.1, 7, 21
    s = optim.cosine_schedule(a_max, a_min, t_w, t_c)
    expect = {0: 0.0, t_w: a_max, t_c: a_min, t_c + 1: a_min, 10 * t_c: a_min, t_w - 1: (t_w - 1) / t_w}
    for t, v in expect.items():
        got = s(t)
        assert got.dtype == torch.float64 and got.dim() == 0
        assert float(got) == pytest.approx(v, rel=1e-15, abs=1e-15), t
        assert float(got) == pytest.approx(handout_lr(t, a_max, a_min, t_w, t_c), rel=1e-15, abs=1e-15)
    mid = (t_w + t_c) / 2
    assert float(s(torch.tensor(mid))) == pytest.approx((a_max + a_min) / 2, rel=1e-14)
    # a 0-d int64 step tensor (what the optimiser passes) gives the same as an int
    assert torch.equal(s(torch.tensor(9, dtype=torch.int64)), s(9))


@given(
    st.integers(0, 5000),
    st.floats(1e-6, 1.0),
    st.floats(0.0, 1.0),
    st.integers(1, 1000),
    st.integers(1, 4000),
)
def test_cosine_schedule_matches_handout_formula(t, a_max, frac, t_w, extra):
    a_min = a_max * frac
    t_c = t_w + extra
    s = optim.cosine_schedule(a_max, a_min, t_w, t_c)
    assert float(s(t)) == pytest.approx(handout_lr(t, a_max, a_min, t_w, t_c), rel=1e-12, abs=1e-18)


def test_cosine_schedule_degenerate_and_invalid():
    s = optim.cosine_schedule(1.0, 0.1, 0, 10)  # no warm-up: starts at α_max
    assert float(s(0)) == 1.0 and float(s(10)) == pytest.approx(0.1) and float(s(11)) == pytest.approx(0.1)
    s = optim.cosine_schedule(1.0, 0.1, 5, 5)  # no cosine phase
    assert float(s(4)) == pytest.approx(0.8) and float(s(5)) == 1.0 and float(s(6)) == pytest.approx(0.1)
    with pytest.raises(ValueError):
        optim.cosine_schedule(1.0, 0.1, -1, 10)
    with pytest.raises(ValueError):
        optim.cosine_schedule(1.0, 0.1, 10, 5)


def test_constant_schedule():
    s = optim.constant_schedule(3e-4)
    for t in (0, 1, 10**6, torch.tensor(5, dtype=torch.int64)):
        v = s(t)
        assert v.dtype == torch.float64 and v.dim() == 0 and float(v) == 3e-4
    assert optim.adamw(3e-4).learning_rate(torch.tensor(7)) == 3e-4


@pytest.mark.parametrize(
    "make_tx",
    [lambda: optim.clip_by_global_norm(1.0), lambda: optim.adamw(1e-2, weight_decay=0.1), lambda: optim.sgd(1e-2, momentum=0.9)],
    ids=["clip", "adamw", "sgd"],
)
def test_mixed_dtype_trees_keep_their_dtypes(make_tx):
    gen = torch.Generator().manual_seed(0)
    p = {"a": torch.randn(4, generator=gen), "b": torch.randn(3, generator=gen).bfloat16(), "c": torch.randn(2, generator=gen).double()}
    g = tree_map(lambda t: t * 100, p)
    tx = make_tx()
    u, state = tx.update(g, tx.init(p), p)
    assert {k: v.dtype for k, v in u.items()} == {k: v.dtype for k, v in p.items()}
    assert all(torch.isfinite(v.float()).all() for v in u.values())
    new = optim.apply_updates(p, u)
    assert {k: v.dtype for k, v in new.items()} == {k: v.dtype for k, v in p.items()}
