"""Tests for flm.optim: AdamW/SGD parity with torch.optim, the transformations AdamW is composed of
(scale_by_adam, add_decayed_weights, scale_by_learning_rate, trace) against hand-written float64
formulas, the fused AdamW kernel against its own chain, clipping, schedules, combinators, purity,
state layout and vmap.

Lockstep design: both optimisers start from the same float64 init of a tiny LM; each step the
gradient of the real flm LM loss is taken by classic autograd on the torch side's leaf tensors
and fed to both (so the comparison isolates the optimisers). A separate test lets each side take
its own gradient (torch.func.grad on the flm side) — there rounding differences of one ulp in the
update formula (flm returns *updates*, torch writes parameters in place, so the two can never be
bitwise equal) are amplified by the training dynamics, which is measured and bounded too.
"""

from __future__ import annotations

import math
import unittest.mock

import optree
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from flm import optim
from flm.model import TransformerConfig, init_params
from flm.optim import optimizers
from flm.train import make_loss_fn
from flm.tree import num_elements, tree_leaves, tree_map

CFG = TransformerConfig(vocab_size=32, context_length=8, d_model=16, num_layers=2, num_heads=2, d_ff=32)
LOCKSTEP_STEPS = 1000
VARIANT_STEPS = 500  # cosine / mask variants: half as long to keep CI time down
TOL = 1e-13  # measured: ≤ 3.6e-14 (1000 steps), the chaotic training dynamics amplify 1-ulp differences
FUSED_TOL = 1e-15  # fused adamw kernel vs its composed chain (measured ≤ 4e-16 per update)


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
    hp = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    tx = optim.adamw(hp["lr"], betas=hp["betas"], eps=hp["eps"], weight_decay=hp["weight_decay"])
    err, _ = _lockstep(tx, lambda ps: torch.optim.AdamW(ps, **hp), steps=LOCKSTEP_STEPS)
    print(f"\nAdamW vs torch.optim.AdamW, {LOCKSTEP_STEPS} float64 steps: max relative error {err:.3e}")
    assert err <= TOL


def test_adamw_matches_torch_with_cosine_schedule():
    sched = optim.cosine_schedule(1e-2, 1e-3, warmup_iters=50, cosine_cycle_iters=400)  # covers all 3 phases
    tx = optim.adamw(sched, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

    def make(ps):
        return torch.optim.AdamW(ps, lr=0.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

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
            lr=5e-3,
            betas=(0.9, 0.95),
            eps=1e-8,
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
    hp = {"lr": 1e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
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
    s0 = optim.sgd(0.1).init(p)  # chain(trace(0), scale_by_learning_rate(0.1))
    assert s0 == (optim.TraceState(()), optim.ScaleByLearningRateState(s0[1].step))
    assert s0[1].step.dtype == torch.int64 and s0[1].step.dim() == 0
    s1 = optim.sgd(0.1, momentum=0.5).init(p)
    assert isinstance(s1[0], optim.TraceState) and num_elements(s1) == num_elements(p) + 1
    sched = optim.cosine_schedule(1.0, 0.0, 2, 10)
    tx = optim.sgd(sched)
    g = tree_map(torch.ones_like, p)
    state = tx.init(p)
    for t in range(4):
        u, state = tx.update(g, state, p)
        expected = -float(sched(t))
        assert all(torch.all(x == expected) for x in tree_leaves(u))
    assert int(optim.step_count(state)) == 4
    assert float(optim.learning_rate_at(tx, state)) == float(sched(4))
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
    # literally the state of chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)
    assert isinstance(state, tuple) and [type(s) for s in state] == [
        optim.ScaleByAdamState,
        optim.EmptyState,
        optim.ScaleByLearningRateState,
    ]
    adam, _, lr_state = state
    assert adam._fields == ("step", "m", "v")
    for step in (adam.step, lr_state.step):
        assert step.dtype == torch.int64 and step.dim() == 0 and int(step) == 0
    n = num_elements(p)
    assert num_elements(adam.m) == n and num_elements(adam.v) == n
    assert num_elements(state) == 2 * n + 2  # m, v and two step counts: no hidden copies
    for tree in (adam.m, adam.v):
        assert all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(tree_leaves(tree), tree_leaves(p)))
    g = tree_map(torch.randn_like, p)
    _, state = tx.update(g, state, p)
    assert int(state[0].step) == int(state[2].step) == 1 and state[0].step.dtype == torch.int64
    assert num_elements(state) == 2 * n + 2
    assert int(optim.step_count(state)) == 1


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
        g = tree_map(lambda t, c=i + 1: torch.randn_like(t) * c, p)
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
        old_m_b = tree_leaves(s_b[0].m)
        u_b, s_b = donating.update(g, s_b, p_b)
        # donation: the new moments live in the old state's buffers
        assert all(x is y for x, y in zip(tree_leaves(s_b[0].m), old_m_b))
        p_a = optim.apply_updates(p_a, u_a)
        p_b = optim.apply_updates(p_b, u_b, inplace=True)
    assert _tree_equal(p_a, p_b) and _tree_equal(s_a, s_b)


def test_adamw_vmap_over_stacked_models_equals_separate_updates():
    K = 3
    models = [_params64(seed) for seed in range(K)]
    tx = optim.adamw(optim.cosine_schedule(1e-2, 1e-3, 1, 4), betas=(0.9, 0.95), weight_decay=0.1)
    states = [tx.init(m) for m in models]

    def stack(trees):
        return tree_map(lambda *xs: torch.stack(xs), *trees)

    sp, ss = stack(models), stack(states)
    assert ss[0].step.shape == (K,) and ss[2].step.shape == (K,)
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
        got = tree_map(lambda t, i=k: t[i], sp)
        for a, b in zip(tree_leaves(got), tree_leaves(models[k])):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
        assert torch.equal(optim.step_count(ss)[k], optim.step_count(states[k]))


def test_adamw_rejects_bad_hyperparameters_and_missing_params():
    for kw in ({"betas": (1.0, 0.9)}, {"betas": (0.9, -0.1)}, {"eps": 0.0}, {"weight_decay": -1.0}):
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
# adamw(kernel="compiled"): one compiled per-leaf update (what compile="blocks" trains with)
# --------------------------------------------------------------------------------------------


@pytest.mark.compile
@pytest.mark.parametrize("inplace", [False, True])
def test_compiled_adamw_kernel_matches_torch_with_mask_and_schedule(inplace):
    """Oracle: torch.optim.AdamW (two param groups for the decay mask, the lr set per step), fed
    the same float32 gradients for 30 steps; every leaf takes the compiled kernel."""
    sched = optim.cosine_schedule(1e-2, 1e-3, warmup_iters=5, cosine_cycle_iters=25)
    shapes = {"w": (6, 5), "b": (5,), "e": (3, 4, 2)}
    gen = torch.Generator().manual_seed(0)
    params = {k: torch.randn(sh, generator=gen) for k, sh in shapes.items()}
    mask = {k: len(sh) >= 2 for k, sh in shapes.items()}
    tx = optim.adamw(
        sched, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.3, mask=mask, inplace=inplace, kernel="compiled"
    )
    ref = {k: t.clone().requires_grad_() for k, t in params.items()}
    groups = [
        {"params": [ref[k] for k in shapes if mask[k]], "weight_decay": 0.3},
        {"params": [ref[k] for k in shapes if not mask[k]], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=0.0, betas=(0.9, 0.95), eps=1e-8)
    p, state = _clone(params), tx.init(params)
    calls = []
    real = optimizers._adamw_kernel
    with (
        unittest.mock.patch.object(optimizers, "_COMPILED_MIN_NUMEL", 0),  # these leaves are small
        unittest.mock.patch.object(optimizers, "_adamw_kernel", lambda *a, **k: calls.append(1) or real(*a, **k)),
    ):
        for i in range(30):
            grads = {k: torch.randn(sh, generator=gen) for k, sh in shapes.items()}
            for group in opt.param_groups:
                group["lr"] = float(sched(i))
            for k in shapes:
                ref[k].grad = grads[k].clone()
            opt.step()
            u, state = tx.update(grads, state, p)
            p = optim.apply_updates(p, u)
    assert not calls  # every leaf of every step took the compiled kernel, none the foreach one
    for k in shapes:
        torch.testing.assert_close(p[k], ref[k].detach(), rtol=1e-5, atol=1e-6)
        assert (p[k] - params[k]).abs().max() > 1e-2  # the parameters moved: not a vacuous check


_compiled_cases = st.tuples(
    st.lists(st.lists(st.integers(1, 6), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4),
    st.integers(0, 2**31 - 1),
    st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
    st.floats(0.0, 0.5),
    st.booleans(),
    st.sampled_from([0, 8, 1 << 16]),  # leaves below it take the foreach kernel: none, some, all
)


@pytest.mark.compile
@given(_compiled_cases)
def test_compiled_adamw_kernel_equals_the_foreach_kernel(case):
    """Property: any leaf shapes (0-d to 3-d), dtype, decay, in-place mode and split between the
    compiled per-leaf kernel and the foreach one (small and bf16 leaves), in one process (each dtype
    recompiles the leaf function): three updates of the compiled kernel equal the foreach
    kernel's up to rounding, and the in-place kernel writes the moments into the given buffers."""
    shape_list, seed, dtype, wd, inplace, min_numel = case
    params = _random_tree(shape_list, seed, 1.0, dtype)
    grads = [_random_tree(shape_list, seed + 1 + i, 1.0, dtype) for i in range(3)]
    out = {}
    for kernel in ("foreach", "compiled"):
        tx = optim.adamw(1e-2, weight_decay=wd, inplace=inplace, kernel=kernel)
        p, state = _clone(params), tx.init(params)
        m_buffers = tree_leaves(state[0].m)
        with unittest.mock.patch.object(optimizers, "_COMPILED_MIN_NUMEL", min_numel):
            for g in grads:
                u, state = tx.update(_clone(g), state, p)
                p = optim.apply_updates(p, u)
        if inplace:
            assert all(a is b for a, b in zip(tree_leaves(state[0].m), m_buffers))
        out[kernel] = tree_leaves(p), tree_leaves(state)
    tol = {torch.float64: (1e-12, 1e-14), torch.float32: (1e-5, 1e-6), torch.bfloat16: (0, 0)}[dtype]  # bf16: foreach
    for a, b in zip(out["foreach"][0] + out["foreach"][1], out["compiled"][0] + out["compiled"][1]):
        torch.testing.assert_close(b, a, rtol=tol[0], atol=tol[1])


def test_compiled_adamw_kernel_inside_vmap_runs_the_chain_and_bad_kernels_are_refused():
    tx_c, tx_f = optim.adamw(1e-2, kernel="compiled"), optim.adamw(1e-2)
    params = {"w": torch.randn(3, 4, 5, dtype=torch.float64)}  # 3 models of (4, 5)
    grads = {"w": torch.randn(3, 4, 5, dtype=torch.float64)}
    uc, _ = torch.func.vmap(lambda g, p: tx_c.update(g, tx_c.init(p), p))(grads, params)
    uf, _ = torch.func.vmap(lambda g, p: tx_f.update(g, tx_f.init(p), p))(grads, params)
    torch.testing.assert_close(uc, uf, rtol=0, atol=0)
    with pytest.raises(ValueError, match="kernel must be 'foreach' or 'compiled', got 'fused'"):
        optim.adamw(1e-3, kernel="fused")


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
    clip = optim.clip_by_global_norm(max_norm)
    clipped, state = clip.update(grads, clip.init(grads))
    assert isinstance(state, optim.ClipState)
    ts = [torch.zeros_like(t, requires_grad=True) for t in tree_leaves(grads)]
    for t, g in zip(ts, tree_leaves(grads)):
        t.grad = g.clone()
    norm_before = torch.nn.utils.clip_grad_norm_(ts, max_norm)
    torch.testing.assert_close(optim.global_norm(grads), norm_before, rtol=1e-14, atol=0)
    torch.testing.assert_close(state.grad_norm, norm_before, rtol=1e-14, atol=0)  # the norm before clipping
    assert optim.recorded_grad_norm((optim.EmptyState(), (state,))) is state.grad_norm
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


@given(shapes, st.integers(0, 2**31 - 1), st.floats(1e-6, 1e6), st.floats(1e-3, 1e3))
def test_clip_is_idempotent_and_keeps_direction(shape_list, seed, scale, max_norm):
    """Clipping twice is clipping once (the clipped norm is ≤ M, so the second pass is the exact
    identity), and the clipped tree is a non-negative multiple of the gradient: same direction."""
    grads = _random_tree(shape_list, seed, scale)
    clip = optim.clip_by_global_norm(max_norm)
    once, _ = clip.update(grads, optim.EmptyState())
    twice, _ = clip.update(once, optim.EmptyState())
    assert _tree_equal(twice, once)
    g = torch.cat([t.reshape(-1) for t in tree_leaves(grads)])
    c = torch.cat([t.reshape(-1) for t in tree_leaves(once)])
    k = (c @ g) / (g @ g)  # the least-squares multiple: c = k·g exactly, with 0 < k ≤ 1
    assert 0 < float(k) <= 1
    torch.testing.assert_close(c, k * g, rtol=1e-14, atol=0)


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("foreach", [True, False], ids=["foreach", "per-leaf"])
def test_clip_scales_each_leaf_of_a_mixed_dtype_tree_in_its_own_dtype(inplace, foreach, monkeypatch):
    """Regression: with a bf16 *first* leaf the foreach path scaled every leaf by ``scale.to(bf16)``,
    off by up to ~0.4% on the float32 and float64 leaves. Each leaf must be the float64 clipped
    value rounded once to its dtype (within that dtype's precision)."""
    if not foreach:
        monkeypatch.setattr(optim._kernels, "use_foreach", lambda leaves: False)
    gen = torch.Generator().manual_seed(3)
    grads = {
        "a": (torch.randn(64, generator=gen) * 100).bfloat16(),
        "b": torch.randn(33, generator=gen) * 100,
        "c": torch.randn(17, generator=gen, dtype=torch.float64) * 100,
    }
    g64 = {k: v.double() for k, v in grads.items()}
    norm64 = torch.sqrt(sum((v * v).sum() for v in g64.values()))
    max_norm = 1.0
    expected = {k: v * (max_norm / (norm64 + 1e-6)) for k, v in g64.items()}
    clip = optim.clip_by_global_norm(max_norm, inplace=inplace)
    out, state = clip.update({k: v.clone() for k, v in grads.items()}, clip.init(grads))
    torch.testing.assert_close(state.grad_norm.double(), norm64, rtol=1e-6, atol=0)
    tol = {
        torch.bfloat16: dict(rtol=2**-8, atol=0),
        torch.float32: dict(rtol=1e-6, atol=0),
        torch.float64: dict(rtol=1e-6, atol=0),
    }  # float64: the float32 leaf's norm limits the scale
    for k, v in out.items():
        assert v.dtype == grads[k].dtype
        torch.testing.assert_close(v.double(), expected[k], **tol[v.dtype])


def test_clip_large_gradient_float32_and_validation():
    g = {"a": torch.full((10,), 1e4), "b": [torch.full((3, 3), -1e4)]}
    clipped, _ = optim.clip_by_global_norm(1.0).update(g, optim.EmptyState())
    assert float(optim.global_norm(clipped)) <= 1.0 + 1e-6
    assert clipped["a"].dtype == torch.float32
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            optim.clip_by_global_norm(bad)
    out, state = optim.clip_by_global_norm(1.0).update({}, optim.clip_by_global_norm(1.0).init({}))
    assert out == {} and float(state.grad_norm) == 0.0


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
    assert isinstance(state, tuple) and isinstance(state[1][0], optim.ScaleByAdamState)
    with pytest.raises(ValueError):
        tx.update(g, (sa,), params)


def test_adamw_state_name_is_deprecated_and_still_the_moments_class():
    """``AdamWState`` named only the first part of adamw's 3-tuple state: it warns, naming the
    replacement, and is still ``ScaleByAdamState`` (so ``isinstance`` and checkpoints keep working)."""
    import flm.optim.transforms as transforms

    for module in (optim, transforms):
        with pytest.warns(DeprecationWarning, match="use ScaleByAdamState") as record:
            assert module.AdamWState is optim.ScaleByAdamState
        assert record[0].filename == __file__  # the warning names the caller's line
    with pytest.warns(DeprecationWarning):
        from flm.optim import AdamWState
    assert AdamWState is optim.ScaleByAdamState and "AdamWState" not in optim.__all__
    with pytest.raises(AttributeError, match="AdamWStat"):
        optim.AdamWStat  # noqa: B018


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


@given(
    shapes,
    st.integers(0, 2**31 - 1),
    st.lists(st.sampled_from(DTYPES), min_size=5, max_size=5),
    st.sampled_from(DTYPES),
)
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
    [
        lambda: optim.clip_by_global_norm(1.0),
        lambda: optim.adamw(1e-2, weight_decay=0.1),
        lambda: optim.sgd(1e-2, momentum=0.9),
    ],
    ids=["clip", "adamw", "sgd"],
)
def test_mixed_dtype_trees_keep_their_dtypes(make_tx):
    gen = torch.Generator().manual_seed(0)
    p = {  # the bf16 leaf first: the foreach clip once scaled every leaf in the first leaf's dtype
        "a": torch.randn(3, generator=gen).bfloat16(),
        "b": torch.randn(4, generator=gen),
        "c": torch.randn(2, generator=gen).double(),
    }
    g = tree_map(lambda t: t * 100, p)
    tx = make_tx()
    u, state = tx.update(g, tx.init(p), p)
    assert {k: v.dtype for k, v in u.items()} == {k: v.dtype for k, v in p.items()}
    if isinstance(state, optim.ClipState):  # values: the float64 clipped gradient, rounded once per leaf
        norm64 = torch.sqrt(sum((v.double() ** 2).sum() for v in g.values()))
        for k, v in u.items():
            expected = g[k].double() * (1.0 / (norm64 + 1e-6))
            rtol = 2**-8 if v.dtype == torch.bfloat16 else 1e-6
            torch.testing.assert_close(v.double(), expected, rtol=rtol, atol=0)
    assert all(torch.isfinite(v.float()).all() for v in u.values())
    new = optim.apply_updates(p, u)
    assert {k: v.dtype for k, v in new.items()} == {k: v.dtype for k, v in p.items()}


# --------------------------------------------------------------------------------------------
# The transformations AdamW and SGD are made of, each against its textbook formula
# --------------------------------------------------------------------------------------------

SMALL_SHAPES = [(3, 4), (5,), ()]


def _grad_seq(params, n, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [tree_map(lambda t: torch.randn(t.shape, generator=gen, dtype=t.dtype) * scale, params) for _ in range(n)]


@pytest.mark.parametrize("host", [True, False], ids=["host-scalars", "device-scalars"])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("scale", [1.0, 1e-7], ids=["g~1", "g~eps"])  # g ~ ε: where ε's placement shows
def test_scale_by_adam_matches_textbook_formula(inplace, scale, host, monkeypatch):
    """d = m̂ / (√v̂ + ε) with m̂ = m/(1 − β1ᵗ), v̂ = v/(1 − β2ᵗ) (Kingma & Ba, Algorithm 1), float64.
    ``device-scalars`` forces the tensor-scalar kernels used on accelerators."""
    if not host:
        monkeypatch.setattr(optim._kernels, "host_scalars", lambda *a: False)
    b1, b2, eps = 0.8, 0.95, 1e-6
    params = _random_tree(SMALL_SHAPES, 0, 1.0)
    tx = optim.scale_by_adam(b1, b2, eps, inplace=inplace)
    state = tx.init(params)
    assert isinstance(state, optim.ScaleByAdamState) and state.step.dtype == torch.int64 and int(state.step) == 0
    m = tree_map(torch.zeros_like, params)
    v = tree_map(torch.zeros_like, params)
    for t, g in enumerate(_grad_seq(params, 20, 1, scale), start=1):
        m = tree_map(lambda mi, gi: b1 * mi + (1 - b1) * gi, m, g)
        v = tree_map(lambda vi, gi: b2 * vi + (1 - b2) * gi * gi, v, g)
        c1, c2 = 1 - b1**t, 1 - b2**t
        expected = tree_map(lambda mi, vi, c1=c1, c2=c2: (mi / c1) / (torch.sqrt(vi / c2) + eps), m, v)
        old, snap = state, (_clone(g), _clone(state))
        d, state = tx.update(g, state, None)
        assert _tree_equal(g, snap[0])
        if inplace:  # donated: the new moments live in the old buffers
            assert all(x is y for x, y in zip(tree_leaves(state.m), tree_leaves(old.m)))
        else:  # pure: the old state is untouched
            assert _tree_equal(old, snap[1])
        assert int(state.step) == t
        for got, want in zip(
            tree_leaves(d) + tree_leaves(state.m) + tree_leaves(state.v),
            tree_leaves(expected) + tree_leaves(m) + tree_leaves(v),
        ):
            torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-14 * scale)


def test_scale_by_adam_per_leaf_path_equals_foreach_path_and_validates():
    """Inside vmap (per-leaf ops) scale_by_adam gives what the eager foreach kernels give."""
    params = _random_tree(SMALL_SHAPES, 2, 1.0)
    tx = optim.scale_by_adam(0.9, 0.99, 1e-8)
    s_eager, s_vmap = tx.init(params), tree_map(lambda t: t[None], tx.init(params))
    vupdate = torch.func.vmap(tx.update, in_dims=(0, 0, None))
    for g in _grad_seq(params, 5, 3):
        d_e, s_eager = tx.update(g, s_eager, None)
        d_v, s_vmap = vupdate(tree_map(lambda t: t[None], g), s_vmap, None)
        for a, b in zip(tree_leaves(d_v) + tree_leaves(s_vmap), tree_leaves(d_e) + tree_leaves(s_eager)):
            torch.testing.assert_close(a[0], b, rtol=1e-15, atol=0)
    for kw in ({"b1": 1.0}, {"b2": -0.1}, {"eps": 0.0}):
        with pytest.raises(ValueError, match="scale_by_adam"):
            optim.scale_by_adam(**kw)
    with pytest.raises(ValueError, match="leaves"):
        tx.update({"a": torch.ones(2)}, s_eager)
    empty = tx.init({})
    assert tx.update({}, empty) == ({}, optim.ScaleByAdamState(torch.tensor(1), {}, {}))


def test_add_decayed_weights_formula_mask_and_errors():
    params = _random_tree(SMALL_SHAPES, 4, 1.0)
    (u,) = _grad_seq(params, 1, 5)
    tx = optim.add_decayed_weights(0.3)
    assert tx.init(params) == optim.EmptyState() and tx.learning_rate is None
    out, state = tx.update(u, optim.EmptyState(), params)
    assert state == optim.EmptyState()
    for o, ui, pi in zip(tree_leaves(out), tree_leaves(u), tree_leaves(params)):
        torch.testing.assert_close(o, ui + 0.3 * pi, rtol=1e-15, atol=1e-15)
    # a 0-d tensor λ (per model under vmap) gives the same; under vmap too
    out_t, _ = optim.add_decayed_weights(torch.tensor(0.3, dtype=torch.float64)).update(u, optim.EmptyState(), params)
    assert _tree_equal(out_t, out)
    vm = torch.func.vmap(lambda lam, uu, pp: optim.add_decayed_weights(lam).update(uu, optim.EmptyState(), pp)[0])

    def lift(tree):
        return tree_map(lambda t: t[None], tree)

    out_v = vm(torch.tensor([0.3], dtype=torch.float64), lift(u), lift(params))
    for a, b in zip(tree_leaves(out_v), tree_leaves(out)):
        torch.testing.assert_close(a[0], b, rtol=1e-15, atol=1e-15)
    # mask as a tree or a callable; unmasked leaves pass through unchanged
    mask = {"p0": True, "p1": False, "p2": True}
    masked, _ = optim.add_decayed_weights(0.3, mask).update(u, optim.EmptyState(), params)
    by_name = optim.add_decayed_weights(0.3, lambda p: {k: k != "p1" for k in p})
    called, _ = by_name.update(u, optim.EmptyState(), params)
    assert _tree_equal(masked, called)
    assert torch.equal(masked["p1"], u["p1"])
    assert torch.equal(masked["p0"], out["p0"]) and torch.equal(masked["p2"], out["p2"])
    # λ = 0 (float) is the identity and needs no params
    zero = optim.add_decayed_weights(0.0)
    assert zero.update(u, zero.init(params))[0] is u
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight_decay"):
            optim.add_decayed_weights(bad)
    with pytest.raises(ValueError, match="params"):
        tx.update(u, optim.EmptyState())
    with pytest.raises(ValueError, match="mask"):
        optim.add_decayed_weights(0.3, [True]).update(u, optim.EmptyState(), params)
    with pytest.raises(ValueError, match="leaves"):
        tx.update(u, optim.EmptyState(), {"p0": params["p0"]})


@given(shapes, st.integers(0, 2**31 - 1), st.floats(0.0, 10.0), st.sampled_from(DTYPES))
def test_add_decayed_weights_with_all_false_mask_is_identity(shape_list, seed, lam, dtype):
    params = _random_tree(shape_list, seed, 1.0, dtype)
    u = _random_tree(shape_list, seed + 1, 1.0, dtype)
    out, state = optim.add_decayed_weights(lam, tree_map(lambda _: False, params)).update(u, optim.EmptyState(), params)
    assert _tree_equal(out, u) and state == optim.EmptyState()


@given(shapes, st.integers(0, 2**31 - 1), st.floats(0.0, 10.0), st.sampled_from(DTYPES), st.booleans())
def test_scale_by_learning_rate_with_constant_lr_scales_exactly(shape_list, seed, lr, dtype, as_tensor):
    u = _random_tree(shape_list, seed, 1.0, dtype)
    tx = optim.scale_by_learning_rate(torch.tensor(lr, dtype=torch.float64) if as_tensor else lr)
    state = tx.init(u)
    for t in range(3):
        out, state = tx.update(u, state)
        assert _tree_equal(out, tree_map(lambda x: x * -lr, u))  # −α·u, bitwise
        assert int(state.step) == t + 1 and state.step.dtype == torch.int64
    assert float(optim.learning_rate_at(tx, state)) == lr


def test_scale_by_learning_rate_follows_schedule_and_validates():
    sched = optim.cosine_schedule(1.0, 0.1, 2, 6)
    tx = optim.scale_by_learning_rate(sched)
    assert tx.learning_rate is sched
    u = _random_tree(SMALL_SHAPES, 6, 1.0)
    state = tx.init(u)
    assert isinstance(state, optim.ScaleByLearningRateState) and state.step.dim() == 0 and int(state.step) == 0
    for t in range(8):
        assert float(optim.learning_rate_at(tx, state)) == float(sched(t))
        out, state = tx.update(u, state)
        lr_t = sched(t)
        assert _tree_equal(out, tree_map(lambda x, a=lr_t: x * -a, u))
    assert tx.update({}, state) == ({}, optim.ScaleByLearningRateState(torch.tensor(9)))
    for bad in (-1e-3, "0.1"):
        with pytest.raises(ValueError, match="learning rate"):
            optim.scale_by_learning_rate(bad)


def test_trace_is_heavy_ball_momentum():
    params = _random_tree(SMALL_SHAPES, 7, 1.0)
    tx = optim.trace(0.9)
    state = tx.init(params)
    b = tree_map(torch.zeros_like, params)
    for g in _grad_seq(params, 5, 8):
        b = tree_map(lambda bi, gi: bi * 0.9 + gi, b, g)
        out, state = tx.update(g, state)
        assert _tree_equal(out, b) and _tree_equal(state.trace, b)
    flat = optim.trace(0.0)
    assert flat.init(params) == optim.TraceState(()) and flat.update(params, optim.TraceState(()))[0] is params
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="trace"):
            optim.trace(bad)


# --------------------------------------------------------------------------------------------
# adamw = chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate): fused kernel vs chain
# --------------------------------------------------------------------------------------------


def _composed(lr, betas, eps, wd, mask, inplace):
    return optim.chain(
        optim.scale_by_adam(*betas, eps, inplace=inplace),
        optim.add_decayed_weights(wd, mask),
        optim.scale_by_learning_rate(lr),
    )


def _leafwise_rel(a, b) -> float:
    return max(float((x - y).norm() / y.norm().clamp_min(1e-300)) for x, y in zip(tree_leaves(a), tree_leaves(b)))


def _matrices(params):
    return tree_map(lambda t: t.dim() >= 2, params)


FUSED_CASES = {
    "plain": {"lr": 3e-3, "wd": 0.0, "mask": None, "inplace": False},
    "decay": {"lr": 3e-3, "wd": 0.1, "mask": None, "inplace": False},
    "decay-mask-inplace": {"lr": 3e-3, "wd": 0.1, "mask": _matrices, "inplace": True},
    "cosine-decay-mask": {
        "lr": optim.cosine_schedule(1e-2, 1e-3, 10, 150),
        "wd": 0.1,
        "mask": _matrices,
        "inplace": False,
    },
    "cosine-inplace": {"lr": optim.cosine_schedule(1e-2, 1e-3, 10, 150), "wd": 0.0, "mask": None, "inplace": True},
    "tensor-hyper": {
        "lr": torch.tensor(3e-3, dtype=torch.float64),
        "wd": torch.tensor(0.1, dtype=torch.float64),
        "mask": None,
        "inplace": False,
    },
    "device-scalars": {
        "lr": optim.cosine_schedule(1e-2, 1e-3, 10, 150),
        "wd": 0.1,
        "mask": _matrices,
        "inplace": True,
        "host": False,
    },
}


@pytest.mark.parametrize("case", list(FUSED_CASES), ids=list(FUSED_CASES))
def test_adamw_fused_kernel_equals_its_chain(case, monkeypatch):
    """200 float64 steps: updates and params agree to ≤ 1e-15 relative, states are bitwise equal and
    have the same structure. ``device-scalars`` forces the tensor-scalar kernels used on GPUs."""
    kw = dict(FUSED_CASES[case])
    if not kw.pop("host", True):
        monkeypatch.setattr(optim._kernels, "host_scalars", lambda *a: False)
    betas, eps = (0.9, 0.95), 1e-8
    fused = optim.adamw(kw["lr"], betas, eps, kw["wd"], kw["mask"], inplace=kw["inplace"])
    chain = _composed(kw["lr"], betas, eps, kw["wd"], kw["mask"], kw["inplace"])
    p_a = _params64()
    p_b = _clone(p_a)
    s_a, s_b = fused.init(p_a), chain.init(p_b)
    assert optree.tree_structure(s_a, namespace="") == optree.tree_structure(s_b, namespace="")
    worst = 0.0
    for g in _grad_seq(p_a, 200, 9):
        u_a, s_a = fused.update(g, s_a, p_a)
        u_b, s_b = chain.update(g, s_b, p_b)
        worst = max(worst, _leafwise_rel(u_a, u_b))
        p_a, p_b = optim.apply_updates(p_a, u_a), optim.apply_updates(p_b, u_b)
    assert worst <= FUSED_TOL and _leafwise_rel(p_a, p_b) <= FUSED_TOL
    assert optree.tree_structure(s_a, namespace="") == optree.tree_structure(s_b, namespace="")
    assert [type(s) for s in s_a] == [type(s) for s in s_b] and _tree_equal(s_a, s_b)
    assert int(optim.step_count(s_a)) == 200 and _leafwise_rel(p_a, _params64()) > 1e-3


def test_adamw_under_vmap_runs_the_chain_and_matches_the_fused_kernel():
    """Inside vmap adamw runs its chain leaf by leaf; it agrees with the eager fused kernel."""
    tx = optim.adamw(optim.cosine_schedule(1e-2, 1e-3, 3, 40), (0.9, 0.95), 1e-8, 0.1, _matrices)
    p = _params64()
    vp, s, vs = tree_map(lambda t: t[None], p), tx.init(p), tree_map(lambda t: t[None], tx.init(p))
    vupdate = torch.func.vmap(tx.update)
    for g in _grad_seq(p, 40, 10):
        u, s = tx.update(g, s, p)
        vu, vs = vupdate(tree_map(lambda t: t[None], g), vs, vp)
        assert _leafwise_rel(tree_map(lambda t: t[0], vu), u) <= FUSED_TOL
        p, vp = optim.apply_updates(p, u), optim.apply_updates(vp, vu)
    assert _leafwise_rel(tree_map(lambda t: t[0], vp), p) <= FUSED_TOL
    assert _tree_equal(tree_map(lambda t: t[0], vs), s)


def test_adamw_fused_low_precision_dtypes_and_zero_lr():
    """float32/bfloat16/float16 leaves: the fused kernel (float16 takes its unfolded branch) agrees
    with the chain to the dtype's rounding; at a warm-up step with α = 0 both give exact zeros."""
    gen = torch.Generator().manual_seed(11)
    p = {
        "a": torch.randn(6, 5, generator=gen),
        "b": torch.randn(7, generator=gen).bfloat16(),
        "c": torch.randn(4, 3, generator=gen).half(),
    }
    sched = optim.cosine_schedule(1e-2, 1e-3, 2, 10)
    fused, chain = optim.adamw(sched, weight_decay=0.1), _composed(sched, (0.9, 0.999), 1e-8, 0.1, None, False)
    s_a, s_b = fused.init(p), chain.init(p)
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}
    for t in range(4):
        g = tree_map(lambda x: torch.randn(x.shape, generator=gen).to(x.dtype), p)
        u_a, s_a = fused.update(g, s_a, p)
        u_b, s_b = chain.update(g, s_b, p)
        for k, x in p.items():
            assert u_a[k].dtype == x.dtype
            if t == 0:
                assert not u_a[k].any() and not u_b[k].any()
            torch.testing.assert_close(u_a[k], u_b[k], rtol=tol[x.dtype], atol=tol[x.dtype] * 1e-2)
        assert _tree_equal(s_a, s_b)


_FLOAT_DTYPES = st.sampled_from([torch.float32, torch.float64])


@given(
    shapes,
    st.lists(_FLOAT_DTYPES, min_size=5, max_size=5),
    st.integers(0, 2**31 - 1),
    st.floats(1e-5, 1.0),
    st.floats(0.0, 0.99),
    st.floats(0.0, 0.9999),
    st.floats(1e-12, 1e-2),
    st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
    st.sampled_from(["float", "tensor"]),
    st.sampled_from(["none", "tree", "callable"]),
    st.lists(st.booleans(), min_size=5, max_size=5),
    st.booleans(),
    st.booleans(),
    st.integers(1, 5),
)
# a float32 leaf first, then a float64 one, with decay, on the device-scalar kernels: the fused
# kernel rounded the float64 leaf's −αλ to float32 (a 7e-9 relative error the chain does not make)
@example(
    [(), (3,)],
    [torch.float32, torch.float64] * 2 + [torch.float32],
    0,
    0.8,
    0.0,
    0.0,
    1e-2,
    1.0,
    "float",
    "none",
    [False] * 5,
    False,
    False,
    1,
)
def test_fused_adamw_equals_its_chain_for_random_trees_and_hyperparameters(
    shape_list, dtypes, seed, lr, b1, b2, eps, wd, hyper, mask_kind, bits, inplace, host, steps
):
    """The fused kernel is only a fast path of ``chain(scale_by_adam, add_decayed_weights,
    scale_by_learning_rate)``: over random float32/float64 trees, hyperparameters (floats or 0-d
    tensors), decay masks, ``inplace`` and the host-/device-scalar kernels, for several steps, its
    updates equal the chain's to a few ulps of their terms and its states bitwise (and it ran)."""
    gen = torch.Generator().manual_seed(seed)
    params = {f"p{i}": torch.randn(s, generator=gen, dtype=dtypes[i]) for i, s in enumerate(shape_list)}
    tree_mask = {k: bits[i] for i, k in enumerate(params)}
    mask = {"none": None, "tree": tree_mask, "callable": lambda p: {k: bits[i] for i, k in enumerate(p)}}[mask_kind]
    flags = tree_mask if mask is not None else dict.fromkeys(params, True)
    as_hyper = (lambda x: torch.tensor(x, dtype=torch.float64)) if hyper == "tensor" else (lambda x: x)
    fused = optim.adamw(as_hyper(lr), (b1, b2), eps, as_hyper(wd), mask, inplace=inplace)
    chain = _composed(as_hyper(lr), (b1, b2), eps, as_hyper(wd), mask, inplace)
    s_a, s_b = fused.init(params), chain.init(params)
    with (
        unittest.mock.patch.object(optimizers, "_adamw_kernel", wraps=optimizers._adamw_kernel) as kernel,
        unittest.mock.patch.object(optim._kernels, "host_scalars", optim._kernels.host_scalars if host else _never),
    ):
        for g in _grad_seq(params, steps, seed + 1):
            u_a, s_a = fused.update(g, s_a, params)
            u_b, s_b = chain.update(g, s_b, params)
            assert _tree_equal(s_a, s_b)
            for k, p in params.items():
                a, b = u_a[k], u_b[k]
                assert a.dtype == b.dtype == p.dtype and a.shape == b.shape == p.shape
                # a few ulps of the terms' size: |α d| + |αλθ| ≤ |u| + 2|αλθ| (no false alarms on cancellation)
                ulps = FUSED_TOL / torch.finfo(torch.float64).eps * torch.finfo(p.dtype).eps
                decay = 2 * lr * wd * p.abs() if flags[k] else 0.0
                assert ((a - b).abs() <= ulps * (b.abs() + decay)).all(), (k, p.dtype, (a - b).abs().max())
            params = optim.apply_updates(params, u_b)
    assert kernel.call_count == steps  # the fused path ran, not the chain behind it
    assert int(optim.step_count(s_a)) == steps


def _never(*args):
    """``host_scalars`` forced off: the tensor-scalar kernels accelerators use."""
    return False


def test_step_count_and_learning_rate_at_in_nested_chains():
    sched = optim.cosine_schedule(1.0, 0.1, 2, 6)
    p = {"w": torch.ones(3)}
    tx = optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(sched))
    state = tx.init(p)
    assert isinstance(state[0], optim.ClipState) and [type(s) for s in state[1]] == [
        optim.ScaleByAdamState,
        optim.EmptyState,
        optim.ScaleByLearningRateState,
    ]
    hand = optim.chain(
        optim.clip_by_global_norm(1.0), optim.chain(optim.scale_by_adam(), optim.scale_by_learning_rate(sched))
    )
    h_state = hand.init(p)
    for t in range(4):
        for x, s in ((tx, state), (hand, h_state)):
            assert int(optim.step_count(s)) == t and float(optim.learning_rate_at(x, s)) == float(sched(t))
        _, state = tx.update(p, state, p)
        _, h_state = hand.update(p, h_state, p)
    # only an Adam count, no schedule: step_count finds it, learning_rate_at has nothing to report
    adam_only = optim.scale_by_adam()
    s = adam_only.update(p, adam_only.init(p))[1]
    assert int(optim.step_count((optim.EmptyState(), s))) == 1 and optim.learning_rate_at(adam_only, s) is None
    assert optim.step_count(optim.TraceState(())) is None


def test_adamw_rejects_a_malformed_state_and_checks_before_donating():
    p = _params64()
    tx = optim.adamw(1e-3)
    with pytest.raises(ValueError, match="state"):
        tx.update(p, tx.init(p)[0], p)
    # bad input to an inplace adamw raises before any donated buffer is written, fused or composed
    for path in ("fused", "composed"):
        tx = optim.adamw(1e-3, weight_decay=0.1, mask=[True], inplace=True)
        state = tx.init(p)
        snap = _clone(state)
        g = tree_map(torch.ones_like, p) if path == "fused" else tree_map(lambda t: torch.ones_like(t)[None], p)
        s_in = state if path == "fused" else tree_map(lambda t: t[None], state)
        call = tx.update if path == "fused" else torch.func.vmap(tx.update, in_dims=(0, 0, None))
        with pytest.raises(ValueError, match="params"):
            call(g, s_in, None)
        with pytest.raises(ValueError, match="mask"):
            call(g, s_in, p)
        assert _tree_equal(state, snap)
    with pytest.raises(ValueError, match="betas"):
        optim.adamw(1e-3, betas=(0.9,))
