"""Many models in one step: ``flm.tree.stack``/``unstack`` and ``make_vmapped_train_step``.

K models trained separately with ``make_train_step`` and together with one vmapped step must end
at the same parameters (float64, several steps, clipping + cosine schedule + per-model learning
rate and weight decay), with a shared batch and with one batch per model.
"""

import pytest
import torch

from flm import optim
from flm.model import TransformerConfig, init_params
from flm.train import decay_mask, init_vmapped, make_train_step, make_vmapped_train_step
from flm.tree import stack, tree_leaves, unstack

CFG = TransformerConfig(vocab_size=37, context_length=8, d_model=16, num_layers=2, num_heads=2, d_ff=24)
LRS = [1e-3, 3e-3, 1e-2]
WDS = [0.0, 0.1, 0.3]
SEEDS = [0, 1, 2]
STEPS = 5


def make_tx(h):
    """One model's optimiser from its hyperparameters (floats or, inside vmap, 0-d tensors)."""
    lr = h["lr"]
    schedule = optim.cosine_schedule(lr, 0.1 * lr, 2, STEPS)
    adam = optim.adamw(schedule, betas=(0.9, 0.95), weight_decay=h["weight_decay"], mask=decay_mask)
    # A small threshold so clipping is active on these random-init gradients.
    return optim.chain(optim.clip_by_global_norm(0.05), adam)


def _batches(k: int, shared: bool, steps: int, batch: int = 4):
    g = torch.Generator().manual_seed(123)
    shape = (steps, batch, CFG.context_length + 1) if shared else (steps, k, batch, CFG.context_length + 1)
    w = torch.randint(0, CFG.vocab_size, shape, generator=g)
    return w[..., :-1], w[..., 1:]


def _max_rel(a, b) -> float:
    return max(
        float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)) for x, y in zip(tree_leaves(a), tree_leaves(b))
    )


@pytest.mark.parametrize("shared", [True, False], ids=["shared-batch", "per-model-batch"])
def test_vmapped_equals_separate_runs(shared):
    k = len(LRS)
    hp = {"lr": torch.tensor(LRS, dtype=torch.float64), "weight_decay": torch.tensor(WDS, dtype=torch.float64)}
    xs, ys = _batches(k, shared, STEPS)

    # Separately: one make_train_step per model, float hyperparameters.
    finals, lrs_seen = [], []
    for i in range(k):
        tx = make_tx({"lr": LRS[i], "weight_decay": WDS[i]})
        step = make_train_step(CFG, tx)
        p = init_params(CFG, torch.Generator().manual_seed(SEEDS[i]), dtype=torch.float64)
        s = tx.init(p)
        seen = []
        for t in range(STEPS):
            x, y = (xs[t], ys[t]) if shared else (xs[t, i], ys[t, i])
            p, s, m = step(p, s, x, y)
            seen.append(float(m["lr"]))
        finals.append(p)
        lrs_seen.append(seen)

    # Together: stacked params/state, per-model tensor hyperparameters.
    vparams, vstate = init_vmapped(CFG, make_tx, hp, SEEDS, dtype=torch.float64)
    vstep = make_vmapped_train_step(CFG, make_tx, shared_batch=shared)
    for t in range(STEPS):
        vparams, vstate, vm = vstep(vparams, vstate, hp, xs[t], ys[t])
        assert vm["loss"].shape == (k,) and vm["grad_norm"].shape == (k,) and vm["lr"].shape == (k,)
        torch.testing.assert_close(vm["lr"], torch.tensor([lrs_seen[i][t] for i in range(k)], dtype=torch.float64))

    for i, p in enumerate(unstack(vparams)):
        assert _max_rel(p, finals[i]) <= 1e-12, f"model {i} differs"
    # The models really differ (different seeds / lrs): no accidental sharing.
    assert _max_rel(finals[0], finals[1]) > 1e-3
    # Optimiser state too: step counts and moments.
    for st in unstack(vstate):
        assert int(optim.step_count(st)) == STEPS
        assert all(leaf.dtype in (torch.float64, torch.int64) for leaf in tree_leaves(st))


def test_vmapped_step_rejects_sdpa_attention():
    import dataclasses

    cfg = dataclasses.replace(CFG, attention="sdpa")
    with pytest.raises(ValueError, match="attention"):
        make_vmapped_train_step(cfg, make_tx)


def test_init_vmapped_checks_hparam_lengths():
    with pytest.raises(ValueError, match="lr"):
        init_vmapped(CFG, make_tx, {"lr": torch.tensor([1e-3, 2e-3]), "weight_decay": torch.zeros(3)}, SEEDS)


def test_stack_unstack_roundtrip_and_errors():
    trees = [init_params(CFG, torch.Generator().manual_seed(s)) for s in SEEDS]
    stacked = stack(trees)
    for a, b in zip(tree_leaves(stacked), tree_leaves(trees[0])):
        assert a.shape == (len(SEEDS), *b.shape)
    back = unstack(stacked)
    assert len(back) == len(SEEDS)
    for t, u in zip(trees, back):
        for a, b in zip(tree_leaves(t), tree_leaves(u)):
            assert torch.equal(a, b)

    with pytest.raises(ValueError, match="at least one"):
        stack([])
    with pytest.raises(ValueError):  # different structures
        stack([{"a": torch.zeros(2)}, {"b": torch.zeros(2)}])
    with pytest.raises(ValueError, match="no leaves"):
        unstack({})
    with pytest.raises(ValueError, match="leading"):
        unstack({"a": torch.zeros(2, 3), "b": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="leading"):
        unstack({"a": torch.zeros(2), "b": torch.tensor(1.0)})


def test_vmapped_metrics_match_per_model_losses():
    """Step-0 losses of the vmapped step equal each model's own loss on its batch."""
    from flm.train import make_loss_fn

    hp = {"lr": torch.tensor(LRS), "weight_decay": torch.tensor(WDS)}
    params, state = init_vmapped(CFG, make_tx, hp, SEEDS)
    xs, ys = _batches(len(LRS), False, 1)
    _, _, m = make_vmapped_train_step(CFG, make_tx)(params, state, hp, xs[0], ys[0])
    loss_fn = make_loss_fn(CFG)
    want = torch.stack([loss_fn(p, xs[0, i], ys[0, i]) for i, p in enumerate(unstack(params))])
    torch.testing.assert_close(m["loss"], want, rtol=1e-5, atol=1e-6)
    assert bool((m["grad_norm"] > 0.05).all())  # the clipping in make_tx is active
