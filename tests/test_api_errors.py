"""Misuse of flm's Python API gets flm's own error naming the argument, the value and the valid
range, not a NaN, a zero tensor or a torch error from deep inside a kernel (issue 18, item 9 and
the API bullet). Data-dependent checks run only in eager, untransformed calls: under ``vmap``
and with ``check=False`` nothing is read back to the host."""

from __future__ import annotations

import pytest
import torch

from flm import nn, optim
from flm.loss import cross_entropy, token_cross_entropy
from flm.model import TransformerConfig, init_params
from flm.sampling import sample_next_token
from flm.train.step import make_loss_fn


# ------------------------------------------------------------------------------------ item 9
def test_cross_entropy_on_empty_tensors_raises_instead_of_nan():
    with pytest.raises(ValueError, match=r"cross_entropy: targets \(0,\) is empty"):
        cross_entropy(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"cross_entropy: targets \(2, 0\) is empty"):
        cross_entropy(torch.zeros(2, 0, 5), torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match=r"no classes"):
        cross_entropy(torch.zeros(3, 0), torch.zeros(3, dtype=torch.long))
    # Per-token losses of nothing are simply empty (no mean is taken).
    assert token_cross_entropy(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long)).shape == (0,)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_softmax_of_a_non_float_tensor_raises_type_error(dtype):
    x = torch.tensor([[1, 2, 3]]).to(dtype)
    with pytest.raises(TypeError, match=rf"softmax: x must be a floating-point tensor, got {dtype}"):
        nn.softmax(x, dim=-1)
    assert torch.allclose(nn.softmax(x.float(), dim=-1).sum(-1), torch.ones(1))


def test_cross_entropy_of_integer_logits_raises_type_error():
    with pytest.raises(TypeError, match=r"logits must be a floating-point tensor, got torch.int64"):
        cross_entropy(torch.ones(2, 4, dtype=torch.long), torch.zeros(2, dtype=torch.long))


# ------------------------------------------------------------------------------- API bullet
def test_cross_entropy_target_out_of_range_names_value_and_range():
    logits = torch.randn(4, 50)
    for bad in (50, -1, 1000):
        targets = torch.tensor([0, 1, bad, 2])
        with pytest.raises(ValueError, match=rf"cross_entropy: targets holds the class id {bad}, outside .*\[0, 50\)"):
            cross_entropy(logits, targets)
        with pytest.raises(ValueError, match=rf"class id {bad}"):
            token_cross_entropy(logits, targets)
    ok = torch.tensor([0, 1, 49, 2])
    assert torch.isfinite(cross_entropy(logits, ok))


def test_embedding_id_out_of_range_names_value_and_range():
    params = {"weight": torch.randn(10, 4)}
    for bad in (10, -3):
        with pytest.raises(ValueError, match=rf"embedding: token_ids holds the id {bad}, outside .*\[0, 10\)"):
            nn.embedding(params, torch.tensor([[1, bad]]))
    assert nn.embedding(params, torch.tensor([[0, 9]])).shape == (1, 2, 4)


@pytest.mark.parametrize(
    ("value", "what"), [(float("nan"), "NaN"), (float("inf"), r"\+inf"), (float("-inf"), "only -inf")]
)
@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_sample_next_token_with_nan_logits_names_the_row(value, what, temperature):
    logits = torch.randn(3, 8)
    if what == "only -inf":
        logits[1] = value
    else:
        logits[1, 5] = value
    with pytest.raises(ValueError, match=rf"sample_next_token: logits row 1 holds {what}"):
        sample_next_token(logits, temperature=temperature, generator=torch.Generator().manual_seed(0))
    logits[1] = 0.0
    logits[2, :7] = float("-inf")  # -inf entries are fine while one value is finite
    assert sample_next_token(logits, generator=torch.Generator().manual_seed(0))[2] == 7


@pytest.mark.parametrize("make", [lambda: optim.adamw(1e-3), lambda: optim.chain(optim.scale_by_adam())])
def test_adamw_update_with_a_wrongly_shaped_gradient_names_the_leaf(make):
    params = {"a": torch.zeros(16), "b": {"w": torch.zeros(3, 4)}}
    tx = make()
    state = tx.init(params)
    for grads, leaf, shape in (
        ({"a": torch.zeros(8), "b": {"w": torch.zeros(3, 4)}}, "a", r"\(8,\)"),
        ({"a": torch.zeros(1), "b": {"w": torch.zeros(3, 4)}}, "a", r"\(1,\)"),  # would broadcast silently
        ({"a": torch.zeros(16), "b": {"w": torch.zeros(4, 3)}}, "b.w", r"\(4, 3\)"),
    ):
        with pytest.raises(ValueError, match=rf"gradient leaf '{leaf}' has shape {shape}, but .* shape"):
            tx.update(grads, state, params)
    updates, _ = tx.update({"a": torch.ones(16), "b": {"w": torch.ones(3, 4)}}, state, params)
    assert updates["b"]["w"].shape == (3, 4)


def test_adamw_inplace_shape_error_leaves_the_state_untouched():
    params = {"a": torch.zeros(4)}
    tx = optim.adamw(1e-3, inplace=True)
    state = tx.init(params)
    with pytest.raises(ValueError, match="gradient leaf 'a'"):
        tx.update({"a": torch.ones(1)}, state, params)
    assert torch.equal(state[0].m["a"], torch.zeros(4)) and int(state[0].step) == 0


def test_data_checks_are_skipped_under_vmap_and_when_turned_off(monkeypatch):
    """Under vmap the checks cannot read values (and must not break the transform); with
    ``check=False`` (what the train step passes) they read nothing at all."""
    logits, targets = torch.randn(3, 2, 6), torch.randint(0, 6, (3, 2))
    per_model = torch.func.vmap(cross_entropy)(logits, targets)
    assert torch.allclose(per_model, torch.stack([cross_entropy(lg, t) for lg, t in zip(logits, targets)]))
    table = {"weight": torch.randn(3, 6, 4)}
    rows = torch.func.vmap(nn.embedding, in_dims=(0, None))(table, torch.tensor([0, 5]))
    assert rows.shape == (3, 2, 4)
    torch.func.vmap(lambda lg: sample_next_token(lg, temperature=0.0))(logits)

    # check=False never looks at the values: no .any() host read happens.
    import flm.loss as loss_mod
    import flm.nn as nn_mod

    def boom(*a, **k):
        raise AssertionError("a data-dependent check ran")

    monkeypatch.setattr(loss_mod, "_check_targets", boom)
    cross_entropy(logits[0], targets[0], check=False)
    monkeypatch.setattr(nn_mod, "checks_enabled", boom)
    nn.embedding({"weight": table["weight"][0]}, torch.tensor([1]), check=False)


def test_the_train_steps_loss_runs_no_data_check(monkeypatch):
    import flm.loss as loss_mod
    import flm.nn as nn_mod

    def boom(*a, **k):
        raise AssertionError("a data-dependent check ran inside the train step's loss")

    monkeypatch.setattr(loss_mod, "_check_targets", boom)
    monkeypatch.setattr(nn_mod, "checks_enabled", boom)
    cfg = TransformerConfig(vocab_size=32, context_length=8, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    params = init_params(cfg, torch.Generator().manual_seed(0))
    x = torch.randint(0, 32, (2, 8))
    loss = make_loss_fn(cfg)(params, x, x)
    assert torch.isfinite(loss)
