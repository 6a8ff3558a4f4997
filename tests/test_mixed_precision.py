"""Mixed precision (bf16 compute, float32 masters) and gradient accumulation in ``make_train_step``."""

import pytest
import torch

from flm import optim
from flm.model import TransformerConfig, init_params
from flm.train import decay_mask, make_loss_fn, make_train_step
from flm.tree import tree_leaves

CFG = TransformerConfig(vocab_size=64, context_length=16, d_model=32, num_layers=2, num_heads=2, d_ff=64)


def _tx(lr=3e-3, steps=100):
    adam = optim.adamw(
        optim.cosine_schedule(lr, lr / 10, 5, steps), betas=(0.9, 0.95), weight_decay=0.1, mask=decay_mask
    )
    return optim.chain(optim.clip_by_global_norm(1.0), adam)


def _batch(batch=8, seed=0, length=CFG.context_length):
    w = torch.randint(0, CFG.vocab_size, (batch, length + 1), generator=torch.Generator().manual_seed(seed))
    return w[:, :-1], w[:, 1:]


def _params(dtype=torch.float32, seed=0):
    return init_params(CFG, torch.Generator().manual_seed(seed), dtype=dtype)


def test_bf16_step_keeps_float32_masters_and_state():
    tx = _tx()
    params = _params()
    state = tx.init(params)
    x, y = _batch()
    step = make_train_step(CFG, tx, compute_dtype=torch.bfloat16)
    new_params, new_state, m = step(params, state, x, y)  # lr is 0 at step 0 (warm-up) …
    new_params, new_state, m = step(new_params, new_state, x, y)  # … so take a second step
    assert all(p.dtype == torch.float32 for p in tree_leaves(new_params))
    float_leaves = [t for t in tree_leaves(new_state) if t.is_floating_point()]
    assert float_leaves and all(t.dtype == torch.float32 for t in float_leaves)
    assert m["loss"].dtype == torch.float32 and torch.isfinite(m["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(tree_leaves(new_params), tree_leaves(params)))


def test_bf16_loss_and_gradient_close_to_float32():
    params = _params()
    x, y = _batch()
    loss32, grads32 = make_loss_fn(CFG)(params, x, y), torch.func.grad(make_loss_fn(CFG))(params, x, y)
    lossbf = make_loss_fn(CFG, compute_dtype=torch.bfloat16)(params, x, y)
    gradsbf = torch.func.grad(make_loss_fn(CFG, compute_dtype=torch.bfloat16))(params, x, y)
    assert lossbf.dtype == torch.float32  # the loss is computed in float32
    torch.testing.assert_close(lossbf, loss32, rtol=2e-2, atol=2e-2)
    assert all(g.dtype == torch.float32 for g in tree_leaves(gradsbf))  # grads land in the masters' dtype
    g32 = torch.cat([g.reshape(-1) for g in tree_leaves(grads32)])
    gbf = torch.cat([g.reshape(-1) for g in tree_leaves(gradsbf)])
    rel = float((gbf - g32).norm() / g32.norm())
    cos = float(torch.nn.functional.cosine_similarity(gbf, g32, dim=0))
    assert rel < 0.05, rel  # bf16 has ~3 significant digits
    assert cos > 0.995, cos


def test_bf16_training_reduces_loss():
    torch.manual_seed(0)
    steps = 40
    tx = _tx(lr=1e-2, steps=steps)
    params = _params()
    state = tx.init(params)
    step = make_train_step(CFG, tx, compute_dtype=torch.bfloat16)
    # A learnable stream: a repeated random sequence of 17 tokens.
    pattern = torch.randint(0, CFG.vocab_size, (17,), generator=torch.Generator().manual_seed(5))
    data = pattern.repeat(40)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - CFG.context_length - 1, (8,), generator=g)
        w = torch.stack([data[s : s + CFG.context_length + 1] for s in starts])
        params, state, m = step(params, state, w[:, :-1], w[:, 1:])
        losses.append(float(m["loss"]))
    assert all(map(lambda v: v == v, losses))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses


@pytest.mark.parametrize("accum", [2, 4])
def test_grad_accumulation_equals_full_batch(accum):
    tx = _tx()
    params = _params(torch.float64)
    state = tx.init(params)
    x, y = _batch(batch=8, seed=3)
    p1, s1, m1 = make_train_step(CFG, tx)(params, state, x, y)
    p2, s2, m2 = make_train_step(CFG, tx, grad_accum_steps=accum)(params, state, x, y)
    torch.testing.assert_close(m2["loss"], m1["loss"], rtol=1e-12, atol=0)
    torch.testing.assert_close(m2["grad_norm"], m1["grad_norm"], rtol=1e-12, atol=0)
    for a, b in zip(tree_leaves(p2), tree_leaves(p1)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    for a, b in zip(tree_leaves(s2), tree_leaves(s1)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def test_grad_accumulation_rejects_uneven_split_and_bad_counts():
    tx = _tx()
    params = _params()
    x, y = _batch(batch=6)
    with pytest.raises(ValueError, match="split"):
        make_train_step(CFG, tx, grad_accum_steps=4)(params, tx.init(params), x, y)
    with pytest.raises(ValueError, match="grad_accum_steps"):
        make_train_step(CFG, tx, grad_accum_steps=0)


def test_train_config_grad_accum_validation():
    from flm.train import TrainConfig

    with pytest.raises(ValueError, match="grad_accum_steps"):
        TrainConfig(grad_accum_steps=0)
    assert TrainConfig(grad_accum_steps=4).to_dict()["grad_accum_steps"] == 4


def _lm_loss(params, x, y, *, ckpt: bool):
    """transformer_lm's composition (handout Figure 1), optionally checkpointing every block."""
    from torch.utils.checkpoint import checkpoint

    from flm import nn
    from flm.loss import cross_entropy

    h = nn.embedding(params["token_embeddings"], x)
    for block in params["layers"]:
        if ckpt:
            h = checkpoint(nn.transformer_block, block, h, CFG.block, None, use_reentrant=False)
        else:
            h = nn.transformer_block(block, h, CFG.block, None)
    h = nn.rms_norm(params["ln_final"], h, CFG.eps)
    return cross_entropy(nn.linear(params["lm_head"], h), y)


def test_activation_checkpointing_composes_with_torch_func_grad():
    """torch.utils.checkpoint(use_reentrant=False) per block inside torch.func.grad should give
    the same loss and gradient as the plain model (float64) — where torch supports it."""
    params = _params(torch.float64)
    x, y = _batch(batch=4, seed=7)
    plain = torch.func.grad_and_value(lambda p: _lm_loss(p, x, y, ckpt=False))(params)
    ref = make_loss_fn(CFG)(params, x, y)
    torch.testing.assert_close(plain[1], ref, rtol=1e-12, atol=0)  # the re-composition is the model
    try:
        g_ck, l_ck = torch.func.grad_and_value(lambda p: _lm_loss(p, x, y, ckpt=True))(params)
    except RuntimeError as err:
        # torch 2.x: checkpoint's saved-tensor hooks are not supported under torch.func.grad/vjp,
        # so flm does not offer per-block checkpointing; this xfail flips when torch adds it.
        if "saved tensor hooks" not in str(err):
            raise
        pytest.xfail(f"activation checkpointing does not compose with torch.func.grad: {err}")
    torch.testing.assert_close(l_ck, ref, rtol=1e-12, atol=0)
    for a, b in zip(tree_leaves(g_ck), tree_leaves(plain[0])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
