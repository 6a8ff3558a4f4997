"""Tests for flm.tree: flatten/unflatten (the handout's state-dict keys), stack/unstack, tree_map
and friends; hypothesis round trips over random nested dict/list trees."""

from __future__ import annotations

from typing import NamedTuple

import optree
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import flm
from flm import tree
from flm.model import TransformerConfig, init_params


def _same(a, b) -> bool:
    """Structural equality of trees of dicts/lists with tensor (or other) leaves."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


# =============================================================================================
# flatten / unflatten
# =============================================================================================

CFG12 = TransformerConfig(vocab_size=7, context_length=4, d_model=4, num_layers=12, num_heads=1, d_ff=4)


def test_flatten_keys_and_order_with_many_layers():
    params = init_params(CFG12)
    flat = flm.flatten(params)
    assert len(flat) == 2 + 12 * 9 + 1
    assert {"token_embeddings.weight", "ln_final.weight", "lm_head.weight"} <= set(flat)
    for i in range(12):
        for name in (
            "ln1",
            "ln2",
            "attn.q_proj",
            "attn.k_proj",
            "attn.v_proj",
            "attn.output_proj",
            "ffn.w1",
            "ffn.w2",
            "ffn.w3",
        ):
            assert f"layers.{i}.{name}.weight" in flat
    # layers are a list: they flatten in numeric order, '9' before '10'
    layer_order = [int(k.split(".")[1]) for k in flat if k.startswith("layers.") and k.endswith("q_proj.weight")]
    assert layer_order == list(range(12))
    # the flat dict's values are the tree's own tensors (no copies)
    assert flat["layers.10.attn.q_proj.weight"] is params["layers"][10]["attn"]["q_proj"]["weight"]


def test_flatten_unflatten_round_trip_many_layers():
    params = init_params(CFG12)
    back = flm.unflatten(flm.flatten(params))
    assert _same(back, params)
    assert isinstance(back["layers"], list) and len(back["layers"]) == 12
    assert back["layers"][10]["ffn"]["w2"]["weight"] is params["layers"][10]["ffn"]["w2"]["weight"]
    # insertion order of the flat dict does not matter (e.g. a state dict sorted as strings)
    shuffled = dict(sorted(flm.flatten(params).items()))  # 'layers.10' < 'layers.2' as strings
    assert _same(flm.unflatten(shuffled), params)


def test_flatten_tuples_and_namedtuples():
    class State(NamedTuple):
        m: dict
        step: torch.Tensor

    t = {"opt": State(m={"w": torch.ones(2)}, step=torch.tensor(3)), "pair": (torch.zeros(1), torch.ones(1))}
    flat = flm.flatten(t)
    assert set(flat) == {"opt.m.w", "opt.step", "pair.0", "pair.1"}  # NamedTuple fields by name
    assert list(flat) == tree.tree_leaves(tree.path_names(t))
    restored = optree.tree_unflatten(tree.tree_structure(t), list(flat.values()))
    assert isinstance(restored["opt"], State) and torch.equal(restored["opt"].m["w"], torch.ones(2))
    back = flm.unflatten(flat)  # tuples come back as lists
    assert _same(back["pair"], [torch.zeros(1), torch.ones(1)])


def test_flatten_rejects_dotted_keys():
    with pytest.raises(ValueError, match="'a.b' contains '.'"):
        flm.flatten({"a.b": torch.zeros(1)})


@pytest.mark.parametrize(
    "flat,match",
    [
        ({"a.0": 1, "a.2": 2}, r"list indices under 'a' are \[0, 2\]"),
        ({"a.1": 1}, r"list indices under 'a' are \[1\]"),
        ({"0": 1, "2": 2}, "under '<root>'"),
        ({"x.layers.0.w": 1, "x.layers.3.w": 2}, "under 'x.layers'"),
        ({"a": 1, "a.b": 2}, "'a' is both a leaf and a subtree"),
        ({"a.b": 2, "a": 1}, "'a' is both a leaf and a subtree"),
        ({"a.b.c": 2, "a.b": 1}, "'a.b' is both a leaf and a subtree"),
        ({"a.01": 1, "a.0": 2}, "plain integers"),
        ({"a.00": 1}, "plain integers"),
    ],
)
def test_unflatten_errors(flat, match):
    with pytest.raises(ValueError, match=match):
        flm.unflatten(flat)


def test_unflatten_mixed_digit_and_name_keys_stay_a_dict():
    assert flm.unflatten({"a.0": 1, "a.x": 2}) == {"a": {"0": 1, "x": 2}}
    assert flm.unflatten({}) == {}


# hypothesis: random nested dict/list trees (non-empty containers; dict keys are names without
# '.' or digits, so that they cannot be mistaken for list indices)
_keys = st.text(alphabet="abcxyz_", min_size=1, max_size=4)
_leaves = st.builds(lambda n, v: torch.full((n,), float(v)), st.integers(0, 3), st.integers(-5, 5))
_trees = st.recursive(
    _leaves,
    lambda children: (
        st.lists(children, min_size=1, max_size=3) | st.dictionaries(_keys, children, min_size=1, max_size=3)
    ),
    max_leaves=12,
)
_roots = st.dictionaries(_keys, _trees, min_size=1, max_size=3) | st.lists(_trees, min_size=1, max_size=12)


@given(t=_roots)
def test_flatten_unflatten_round_trip_random_trees(t):
    flat = flm.flatten(t)
    assert len(flat) == len(tree.tree_leaves(t))
    back = flm.unflatten(flat)
    if isinstance(t, list):  # a root list comes back as a list too (its keys are 0..n-1)
        assert isinstance(back, list)
    assert _same(back, t)
    assert list(flm.flatten(back)) == list(flat)
    # path_names gives the same dotted names, in the same structure
    names = tree.path_names(t)
    assert tree.tree_leaves(names) == list(flat)


@given(t=_roots)
def test_stack_unstack_round_trip_random_trees(t):
    trees = [tree.tree_map(lambda x, i=i: x + i, t) for i in range(3)]
    stacked = tree.stack(trees)
    assert all(leaf.shape[0] == 3 for leaf in tree.tree_leaves(stacked))
    back = tree.unstack(stacked)
    assert len(back) == 3
    for a, b in zip(back, trees):
        assert _same(a, b)


# =============================================================================================
# stack / unstack, tree_map and helpers
# =============================================================================================


def test_stack_unstack_params():
    models = [init_params(CFG12.replace(num_layers=2), torch.Generator().manual_seed(s)) for s in range(4)]
    stacked = tree.stack(models)
    assert stacked["layers"][1]["attn"]["q_proj"]["weight"].shape == (4, 4, 4)
    for a, b in zip(tree.unstack(stacked), models):
        assert _same(a, b)


def test_stack_unstack_errors():
    with pytest.raises(ValueError, match="at least one"):
        tree.stack([])
    with pytest.raises(ValueError, match="same structure"):
        tree.stack([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])
    with pytest.raises(ValueError, match="leading sizes"):
        tree.unstack({"a": torch.zeros(2, 3), "b": torch.zeros(3)})
    with pytest.raises(ValueError, match="leading sizes"):
        tree.unstack({"a": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="no leaves"):
        tree.unstack({})


def test_tree_map_zeros_like_num_elements_path_names():
    t = {"b": [torch.ones(2, 3), torch.ones(4)], "a": {"w": torch.ones(5, dtype=torch.float64)}}
    doubled = tree.tree_map(lambda x: 2 * x, t)
    assert _same(
        doubled, {"b": [2 * torch.ones(2, 3), 2 * torch.ones(4)], "a": {"w": 2 * torch.ones(5, dtype=torch.float64)}}
    )
    summed = tree.tree_map(lambda x, y: x + y, t, doubled)
    assert torch.equal(summed["b"][0], 3 * torch.ones(2, 3))
    with pytest.raises(ValueError, match="same structure"):
        tree.tree_map(lambda x, y: x, t, {"a": t["a"]})
    z = tree.zeros_like(t, dtype=torch.bfloat16)
    assert all(leaf.dtype == torch.bfloat16 and not leaf.any() for leaf in tree.tree_leaves(z))
    assert tree.num_elements(t) == 6 + 4 + 5
    assert tree.path_names(t) == {"b": ["b.0", "b.1"], "a": {"w": "a.w"}}
    # canonical order: dict keys sorted, list items in order
    assert [x.numel() for x in tree.tree_leaves(t)] == [5, 6, 4]
    assert tree.num_elements(init_params(CFG12)) == flm.model.count_params(CFG12)
