"""Composability with ``torch.func`` as a tested contract: every public tensor function × every transform.

The table is ``ROWS`` (the public tensor functions of ``flm.nn``, ``flm.rope``, ``flm.model``,
``flm.loss`` and ``flm.sampling``) × ``TRANSFORMS``; each cell is a hypothesis property on tiny
float64 inputs, with test ids ``<module.function>-<transform>``:

- ``vmap_inputs``: ``vmap`` over a stack of inputs equals a Python loop over them.
- ``vmap_params``: ``vmap`` over stacked parameter trees equals a loop over the trees.
- ``grad``: ``torch.func.grad`` of ``<f(x), w>`` (a fixed random ``w``) agrees with central
  finite differences along a random direction.
- ``jacrev``: the reverse-mode Jacobian, contracted with a random direction, agrees with finite
  differences of ``f``.
- ``jvp``: ``torch.func.jvp``'s tangent agrees with finite differences of ``f``.
- ``grad_of_grad``: ``grad(<grad(<f, w>), u>)`` (a Hessian-vector product) agrees with finite
  differences of the (separately checked) gradient.

A cell that has no meaning (no parameters to stack, an integer- or bool-valued output that has no
derivative) is skipped with its reason; one that is meaningful but unsupported is a strict xfail
with its reason. ``test_table_covers_the_public_api`` keeps the table complete: a new public
function must get a row or an entry in ``OUT_OF_SCOPE``.

At the end: per-example gradients of the whole LM loss (``vmap`` of ``grad_and_value`` and of
``torch.func.grad``) equal a loop over the examples, and a user's loss with the default id check
works under ``vmap``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import optree
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import flm.loss
import flm.model
import flm.nn
import flm.rope
import flm.sampling
from flm.model import TransformerConfig, init_params, transformer_lm
from flm.train.step import grad_and_value, make_loss_fn
from flm.tree import stack

D = torch.float64
func = torch.func

# --------------------------------------------------------------------------------------------
# Rows: how to build a case and call the function
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One call: a parameter tree (or ``None``), positional tensor inputs and static keywords."""

    params: Any
    inputs: tuple[torch.Tensor, ...]
    static: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Row:
    """A public function under test.

    Attributes:
        name: ``module.function`` (the first half of the test id).
        fn: the function itself (checked against the module's ``__all__``).
        call: ``call(params, inputs, static) -> tensor or tuple of tensors``.
        make: ``make(generator, n) -> Case`` with shapes depending only on ``n``.
        diff: indices of the inputs to differentiate (besides the parameters).
        output: ``"float"``, ``"bool"`` or ``"int"``.
        fd_h: finite-difference step; ``tol``: relative tolerance of the finite-difference checks.
        randomness: ``vmap``'s randomness mode for the ``vmap_*`` cells.
        params: whether the function takes a parameter tree (the ``vmap_params`` cell).
    """

    name: str
    fn: Callable[..., Any]
    call: Callable[[Any, tuple, dict], Any]
    make: Callable[[torch.Generator, int], Case]
    diff: tuple[int, ...] = ()
    output: str = "float"
    fd_h: float = 1e-6
    tol: float = 1e-6
    randomness: str = "error"
    params: bool = True


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=D)


def _ids(g: torch.Generator, high: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=g)


def _probs(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.softmax(2 * _randn(g, *shape), dim=-1)


def _f64(tree: Any) -> Any:
    return optree.tree_map(lambda t: t.to(D), tree, namespace="")


D_MODEL, D_FF, HEADS, THETA = 4, 6, 2, 100.0
BLOCK = flm.nn.BlockConfig(num_heads=HEADS, rope_theta=THETA)
LM = TransformerConfig(vocab_size=7, context_length=4, d_model=D_MODEL, num_layers=1, num_heads=HEADS, d_ff=D_FF)
LM_FLM = LM.replace(attention="flm")  # flm's attention: what jvp and grad of grad need


def _attn_params(g: torch.Generator) -> dict[str, Any]:
    return _f64(flm.nn.init_multihead_self_attention(D_MODEL, generator=g))


def _qkv(g: torch.Generator, n: int) -> Case:
    return Case(None, (_randn(g, 2, n, 4), _randn(g, 2, n + 1, 4), _randn(g, 2, n + 1, 3)))


def _sdpa_case(g: torch.Generator, n: int) -> Case:
    mask = torch.rand(n, n + 1, generator=g) < 0.6
    mask[:, 0] = True  # every query attends somewhere
    return Case(None, (*_qkv(g, n).inputs, mask))


def _causal_case(g: torch.Generator, n: int) -> Case:
    # (batch, heads, seq, d_head) as attention_qkv makes them: 4-d inputs are what PyTorch's
    # fused CPU (flash) kernel takes.
    return Case(None, tuple(_randn(g, 2, 2, n, 4) for _ in range(3)))


def _top_p_case(g: torch.Generator, n: int) -> Case:
    probs = _probs(g, n, 6)
    top_p = float(torch.rand((), generator=g, dtype=D)) * 0.9 + 0.05
    # Keep the nucleus away from its boundary, where the mask (a step function) would jump
    # between the finite-difference evaluations.
    mass_before = probs.sort(dim=-1, descending=True).values.cumsum(-1)
    assume(float((mass_before - top_p).abs().min()) > 1e-3)
    return Case(None, (probs,), {"top_p": top_p})


def _sample_case(g: torch.Generator, n: int) -> Case:
    greedy = bool(torch.rand((), generator=g) < 0.5)
    # Greedy (temperature 0) or sampling from a one-token nucleus (top_k=1): deterministic, so a
    # vmapped call and a loop must agree token for token.
    static = {"temperature": 0.0} if greedy else {"temperature": 0.8, "top_k": 1}
    return Case(None, (_randn(g, n, 6),), static)


def _sample(p: Any, xs: tuple, s: dict) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return flm.sampling.sample_next_token(xs[0], generator=gen, **s)


ROWS: list[Row] = [
    # flm.nn ---------------------------------------------------------------------------------
    Row(
        "nn.linear",
        flm.nn.linear,
        lambda p, xs, s: flm.nn.linear(p, xs[0]),
        lambda g, n: Case({"weight": _randn(g, 3, 4)}, (_randn(g, n, 4),)),
        diff=(0,),
    ),
    Row(
        "nn.embedding",
        flm.nn.embedding,
        lambda p, xs, s: flm.nn.embedding(p, xs[0]),
        lambda g, n: Case({"weight": _randn(g, 5, 3)}, (_ids(g, 5, n, 2),)),
    ),
    Row(
        "nn.rms_norm",
        flm.nn.rms_norm,
        lambda p, xs, s: flm.nn.rms_norm(p, xs[0]),
        lambda g, n: Case({"weight": _randn(g, 4)}, (_randn(g, n, 4),)),
        diff=(0,),
    ),
    Row("nn.silu", flm.nn.silu, lambda p, xs, s: flm.nn.silu(xs[0]), lambda g, n: Case(None, (_randn(g, n, 3),)), (0,)),
    Row(
        "nn.swiglu",
        flm.nn.swiglu,
        lambda p, xs, s: flm.nn.swiglu(p, xs[0]),
        lambda g, n: Case(_f64(flm.nn.init_swiglu(4, 5, generator=g)), (_randn(g, n, 4),)),
        diff=(0,),
    ),
    Row(
        "nn.silu_ffn",
        flm.nn.silu_ffn,
        lambda p, xs, s: flm.nn.silu_ffn(p, xs[0]),
        lambda g, n: Case(_f64(flm.nn.init_silu_ffn(4, 5, generator=g)), (_randn(g, n, 4),)),
        diff=(0,),
    ),
    Row(
        "nn.softmax",
        flm.nn.softmax,
        lambda p, xs, s: flm.nn.softmax(xs[0], dim=-1),
        lambda g, n: Case(None, (_randn(g, n, 4),)),
        diff=(0,),
    ),
    Row(
        "nn.scaled_dot_product_attention",
        flm.nn.scaled_dot_product_attention,
        lambda p, xs, s: flm.nn.scaled_dot_product_attention(*xs),
        _sdpa_case,
        diff=(0, 1, 2),
    ),
    Row(
        "nn.dot_product_attention[auto]",
        flm.nn.dot_product_attention,
        lambda p, xs, s: flm.nn.dot_product_attention(*xs, causal=True),
        _causal_case,
        diff=(0, 1, 2),
    ),
    Row(
        "nn.dot_product_attention[sdpa]",
        flm.nn.dot_product_attention,
        lambda p, xs, s: flm.nn.dot_product_attention(*xs, causal=True, implementation="sdpa"),
        _causal_case,
        diff=(0, 1, 2),
    ),
    Row(
        "nn.dot_product_attention[flm]",
        flm.nn.dot_product_attention,
        lambda p, xs, s: flm.nn.dot_product_attention(*xs, causal=True, implementation="flm"),
        _causal_case,
        diff=(0, 1, 2),
    ),
    Row(
        "nn.attention_qkv",
        flm.nn.attention_qkv,
        lambda p, xs, s: flm.nn.attention_qkv(p, xs[0], HEADS, THETA, xs[1]),
        lambda g, n: Case(_attn_params(g), (_randn(g, n, D_MODEL), _ids(g, 50, n))),
        diff=(0,),
    ),
    Row(
        "nn.multihead_self_attention",
        flm.nn.multihead_self_attention,
        lambda p, xs, s: flm.nn.multihead_self_attention(p, xs[0], HEADS, THETA, xs[1]),
        # (batch, seq, d_model): batched inputs make 4-d heads, which the fused CPU kernel takes.
        lambda g, n: Case(_attn_params(g), (_randn(g, 2, n, D_MODEL), _ids(g, 50, n))),
        diff=(0,),
    ),
    Row(
        "nn.transformer_block",
        flm.nn.transformer_block,
        lambda p, xs, s: flm.nn.transformer_block(p, xs[0], BLOCK),
        lambda g, n: Case(_f64(flm.nn.init_transformer_block(D_MODEL, D_FF, generator=g)), (_randn(g, 2, n, D_MODEL),)),
        diff=(0,),
    ),
    Row(
        "nn.attention_rope_tables",
        flm.nn.attention_rope_tables,
        lambda p, xs, s: flm.nn.attention_rope_tables(xs[0], HEADS, THETA, xs[1]),
        # x gives only the shape and dtype; the tables are differentiable in float positions.
        lambda g, n: Case(None, (_randn(g, 2, n, D_MODEL), 10 * torch.rand(n, generator=g, dtype=D))),
        diff=(1,),
    ),
    # flm.rope (re-exported by flm.nn: rope, rope_tables) -------------------------------------
    Row(
        "rope.rope",
        flm.rope.rope,
        lambda p, xs, s: flm.rope.rope(xs[0], xs[1], THETA),
        lambda g, n: Case(None, (_randn(g, 2, n, 4), _ids(g, 50, n))),
        diff=(0,),
    ),
    Row(
        "rope.rope_tables",
        flm.rope.rope_tables,
        lambda p, xs, s: flm.rope.rope_tables(xs[0], 4, THETA, dtype=D),
        lambda g, n: Case(None, (10 * torch.rand(n, generator=g, dtype=D),)),  # float positions
        diff=(0,),
    ),
    Row(
        "rope.apply_rope",
        flm.rope.apply_rope,
        lambda p, xs, s: flm.rope.apply_rope(*xs),
        lambda g, n: Case(None, (_randn(g, 2, n, 4), _randn(g, n, 2), _randn(g, n, 2))),
        diff=(0, 1, 2),
    ),
    # flm.model --------------------------------------------------------------------------------
    Row(
        "model.transformer_lm",
        flm.model.transformer_lm,
        lambda p, xs, s: transformer_lm(p, xs[0], LM),
        lambda g, n: Case(init_params(LM, g, dtype=D), (_ids(g, LM.vocab_size, 2, n),)),
    ),
    Row(
        "model.transformer_lm[flm]",
        flm.model.transformer_lm,
        lambda p, xs, s: transformer_lm(p, xs[0], LM_FLM),
        lambda g, n: Case(init_params(LM_FLM, g, dtype=D), (_ids(g, LM.vocab_size, 2, n),)),
    ),
    # flm.loss ---------------------------------------------------------------------------------
    Row(
        "loss.token_cross_entropy",
        flm.loss.token_cross_entropy,
        lambda p, xs, s: flm.loss.token_cross_entropy(*xs),
        lambda g, n: Case(None, (_randn(g, n, 5), _ids(g, 5, n))),
        diff=(0,),
    ),
    Row(
        "loss.token_linear_cross_entropy",
        flm.loss.token_linear_cross_entropy,
        lambda p, xs, s: flm.loss.token_linear_cross_entropy(*xs, chunk_rows=2),
        lambda g, n: Case(None, (_randn(g, n, 3), _randn(g, 5, 3), _ids(g, 5, n))),
        diff=(0, 1),
    ),
    Row(
        "loss.cross_entropy",
        flm.loss.cross_entropy,
        lambda p, xs, s: flm.loss.cross_entropy(*xs),
        lambda g, n: Case(None, (_randn(g, n, 5), _ids(g, 5, n))),
        diff=(0,),
    ),
    Row(
        "loss.perplexity",
        flm.loss.perplexity,
        lambda p, xs, s: flm.loss.perplexity(xs[0]),
        lambda g, n: Case(None, (torch.rand(n, generator=g, dtype=D) + 0.5,)),
        diff=(0,),
        # perplexity returns float32 (documented), so the finite differences see float32 rounding.
        fd_h=1e-3,
        tol=1e-3,
    ),
    # flm.sampling -----------------------------------------------------------------------------
    Row(
        "sampling.top_p_mask",
        flm.sampling.top_p_mask,
        lambda p, xs, s: flm.sampling.top_p_mask(xs[0], **s),
        _top_p_case,
        output="bool",
    ),
    Row(
        "sampling.top_p_filter",
        flm.sampling.top_p_filter,
        lambda p, xs, s: flm.sampling.top_p_filter(xs[0], **s),
        _top_p_case,
        diff=(0,),
    ),
    Row(
        "sampling.top_k_mask",
        flm.sampling.top_k_mask,
        lambda p, xs, s: flm.sampling.top_k_mask(xs[0], 2),
        lambda g, n: Case(None, (_randn(g, n, 6),)),
        output="bool",
    ),
    Row(
        "sampling.sample_next_token",
        flm.sampling.sample_next_token,
        _sample,
        _sample_case,
        output="int",
        # vmap's default randomness="error" rejects torch.multinomial; "different" is what a
        # batch of independent samples means.
        randomness="different",
    ),
]
# The rows whose function takes no parameter tree (their ``vmap_params`` cell has nothing to stack).
_NO_PARAMS = {r.name for r in ROWS if r.name.split(".")[0] in ("rope", "loss", "sampling")} | {
    "nn.silu",
    "nn.softmax",
    "nn.attention_rope_tables",
    "nn.scaled_dot_product_attention",
    "nn.dot_product_attention[auto]",
    "nn.dot_product_attention[sdpa]",
    "nn.dot_product_attention[flm]",
}
ROWS = [dataclasses.replace(r, params=False) if r.name in _NO_PARAMS else r for r in ROWS]
ROW = {r.name: r for r in ROWS}

# Public names that are not tensor functions to transform, with the reason.
OUT_OF_SCOPE = {
    "flm.nn.ATTENTION_IMPLEMENTATIONS": "a tuple of names",
    "flm.nn.BLOCK_CHOICES": "a dict of tuples of names",
    "flm.model.CHOICES": "a dict of tuples of names",
    "flm.nn.BlockConfig": "a config dataclass",
    "flm.nn.causal_mask": "no tensor input: sizes in, a bool mask out",
    "flm.nn.truncated_normal": "an initialiser: shapes and a generator in, random draws out",
    "flm.nn.init_linear": "an initialiser",
    "flm.nn.init_embedding": "an initialiser",
    "flm.nn.init_rms_norm": "an initialiser",
    "flm.nn.init_swiglu": "an initialiser",
    "flm.nn.init_silu_ffn": "an initialiser",
    "flm.nn.init_multihead_self_attention": "an initialiser",
    "flm.nn.init_transformer_block": "an initialiser",
    "flm.rope.check_rope": "argument validation (ints and floats, no tensors)",
    "flm.sampling.check_sampling": "argument validation (numbers, no tensors)",
    "flm.model.TransformerConfig": "a config dataclass",
    "flm.model.init_params": "an initialiser",
    "flm.model.param_template": "shapes on the meta device, no values",
    "flm.model.check_params": "shape validation of a tree, no numerical output",
    "flm.model.check_token_ids": "eager-only data validation (reads values back to the host)",
    # Accounting helpers (defined in flm.accounting, re-exported by flm.model): arithmetic on a
    # config, not tensor functions.
    "flm.model.count_params": "accounting on a config",
    "flm.model.forward_flops": "accounting on a config",
    "flm.model.train_step_flops": "accounting on a config",
    "flm.model.training_memory": "accounting on a config",
    "flm.model.adamw_step_flops": "accounting on a config",
    "flm.model.max_batch_size": "accounting on a config",
}

TRANSFORMS = ("vmap_inputs", "vmap_params", "grad", "jacrev", "jvp", "grad_of_grad")
DIFFERENTIABLE = ("grad", "jacrev", "jvp", "grad_of_grad")

_SDPA_JVP = (
    "PyTorch's fused CPU attention (aten::_scaled_dot_product_flash_attention_for_cpu) has no "
    "forward-mode derivative: attention='auto' takes flm's there, 'sdpa' asks for the fused kernel"
)
_SDPA_GRADGRAD = (
    "PyTorch's fused CPU attention backward (aten::_scaled_dot_product_flash_attention_for_cpu_backward), "
    "which attention='auto' takes outside vmap and forward mode, is not differentiable: use attention='flm'"
)

# (row, transform) -> ("skip" | "xfail" | "xfail-nonstrict", reason) for the cells that do not pass.
MARKS: dict[tuple[str, str], tuple[str, str]] = {}
# attention="auto" (the default) takes the fused kernel everywhere but under vmap and forward-mode
# AD; reverse-over-reverse cannot be detected, so grad of grad needs attention="flm". The [flm]
# rows show the same functions composing fully with attention="flm".
MARKS[("nn.dot_product_attention[sdpa]", "jvp")] = ("xfail", _SDPA_JVP)
for _name in (
    "nn.dot_product_attention[sdpa]",
    "nn.dot_product_attention[auto]",
    "nn.multihead_self_attention",
    "nn.transformer_block",
    "model.transformer_lm",
):
    MARKS[(_name, "grad_of_grad")] = ("xfail", _SDPA_GRADGRAD)
for _row in ROWS:
    if _row.output != "float":
        for _t in DIFFERENTIABLE:
            MARKS[(_row.name, _t)] = (
                "skip",
                f"{_row.output}-valued output ({_row.name.split('.')[-1]} returns "
                f"{'token ids' if _row.output == 'int' else 'a mask'}): no derivative to take",
            )
    if not _row.params:
        MARKS[(_row.name, "vmap_params")] = ("skip", "no parameters: a function of its inputs only")


def _cells():
    for row in ROWS:
        for t in TRANSFORMS:
            marks = []
            kind, reason = MARKS.get((row.name, t), (None, None))
            if kind == "skip":
                marks.append(pytest.mark.skip(reason=reason))
            elif kind == "xfail":
                # raises: the unsupported-operation error, not a numerical mismatch.
                marks.append(pytest.mark.xfail(reason=reason, strict=True, raises=RuntimeError))
            elif kind == "xfail-nonstrict":
                marks.append(pytest.mark.xfail(reason=reason, strict=False))
            # vmap (also inside jacrev) of the fused kernel works through PyTorch's slow
            # per-example fallback, which says so: expected here.
            marks.append(pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"))
            yield pytest.param(row.name, t, id=f"{row.name}-{t}", marks=marks)


# --------------------------------------------------------------------------------------------
# The cells
# --------------------------------------------------------------------------------------------


def _leaves(tree: Any) -> list[torch.Tensor]:
    return optree.tree_leaves(tree, namespace="")


def _assert_trees_close(actual: Any, expected: Any, **tol: Any) -> None:
    a, spec_a = optree.tree_flatten(actual, namespace="")
    e, spec_e = optree.tree_flatten(expected, namespace="")
    assert spec_a == spec_e, f"{spec_a} != {spec_e}"
    for x, y in zip(a, e):
        torch.testing.assert_close(x, y, **tol)


def _dot(a: Any, b: Any) -> torch.Tensor:
    return sum((x.to(D) * y.to(D)).sum() for x, y in zip(_leaves(a), _leaves(b)))


def _axpy(h: float, v: Any, x: Any) -> Any:
    return optree.tree_map(lambda vi, xi: xi + h * vi, v, x, namespace="")


def _like(g: torch.Generator, tree: Any) -> Any:
    return optree.tree_map(lambda t: torch.randn(t.shape, generator=g, dtype=t.dtype), tree, namespace="")


def _close(actual: torch.Tensor, expected: torch.Tensor, row: Row, scale: Any) -> None:
    atol = row.tol * (1.0 + float(max((t.abs().max() for t in _leaves(scale)), default=0.0)))
    torch.testing.assert_close(actual.to(D), expected.to(D), rtol=row.tol, atol=atol)


def _differentiable(row: Row, case: Case) -> tuple[Callable[[Any], Any], Any]:
    """``f(primals) -> output`` with ``primals = (params, diff inputs...)``, and the primals."""

    with_params = case.params is not None

    def f(primals: Any) -> Any:
        params, diff = (primals[0], primals[1:]) if with_params else (None, primals)
        xs = list(case.inputs)
        for i, x in zip(row.diff, diff):
            xs[i] = x
        return row.call(params, tuple(xs), case.static)

    diff = tuple(case.inputs[i] for i in row.diff)
    return f, ((case.params, *diff) if with_params else diff)


def _check_cell(row: Row, transform: str, seed: int, n: int) -> None:
    g = torch.Generator().manual_seed(seed)
    case = row.make(g, n)

    if transform == "vmap_inputs":
        others = [case] + [row.make(g, n) for _ in range(2)]
        batched = tuple(torch.stack(xs) for xs in zip(*(c.inputs for c in others)))
        got = func.vmap(lambda *xs: row.call(case.params, xs, case.static), randomness=row.randomness)(*batched)
        want = [row.call(case.params, c.inputs, case.static) for c in others]
        _assert_trees_close(got, optree.tree_map(lambda *o: torch.stack(o), *want, namespace=""))
        return

    if transform == "vmap_params":
        trees = [case.params] + [row.make(g, n).params for _ in range(2)]
        got = func.vmap(lambda p: row.call(p, case.inputs, case.static), randomness=row.randomness)(stack(trees))
        want = [row.call(p, case.inputs, case.static) for p in trees]
        _assert_trees_close(got, optree.tree_map(lambda *o: torch.stack(o), *want, namespace=""))
        return

    f, primals = _differentiable(row, case)
    w = _like(g, f(primals))  # weights of the scalarised output
    v = _like(g, primals)  # a direction in the primals
    h = row.fd_h

    def scalar(p: Any) -> torch.Tensor:
        return _dot(f(p), w)

    def fd(fn: Callable[[Any], Any]) -> Any:  # central difference of fn along v
        plus, minus = fn(_axpy(h, v, primals)), fn(_axpy(-h, v, primals))
        return optree.tree_map(lambda a, b: (a.to(D) - b.to(D)) / (2 * h), plus, minus, namespace="")

    if transform == "grad":
        grads = func.grad(scalar)(primals)
        _close(_dot(grads, v), fd(scalar), row, grads)
    elif transform == "jacrev":
        jac = func.jacrev(f)(primals)
        out = f(primals)
        # Contract each output leaf's Jacobian (out.shape + leaf.shape) with the direction.
        outs, _ = optree.tree_flatten(out, namespace="")
        jacs = jac if isinstance(out, tuple) else (jac,)
        jv = tuple(
            sum(
                torch.tensordot(j.to(D), vi.to(D), dims=vi.dim()) if vi.dim() else j.to(D) * vi
                for j, vi in zip(_leaves(jo), _leaves(v))
            )
            for jo in jacs
        )
        _close_tree(jv, tuple(_leaves(fd(f))), row, outs)
    elif transform == "jvp":
        out, tangent = func.jvp(f, (primals,), (v,))
        _close_tree(tuple(_leaves(tangent)), tuple(_leaves(fd(f))), row, out)
    elif transform == "grad_of_grad":
        u = _like(g, primals)

        def grad_dot_u(p: Any) -> torch.Tensor:
            return _dot(func.grad(scalar)(p), u)

        hvp = func.grad(grad_dot_u)(primals)
        _close(_dot(hvp, v), fd(grad_dot_u), row, hvp)
    else:  # pragma: no cover
        raise AssertionError(transform)


def _close_tree(actual: tuple, expected: tuple, row: Row, scale: Any) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        _close(a, e, row, scale)


# Heavier rows (a whole block or model per example) draw fewer examples so that the table stays
# within a minute under the CI profile.
_HEAVY = {
    "nn.transformer_block",
    "model.transformer_lm",
    "model.transformer_lm[flm]",
    "nn.multihead_self_attention",
    "nn.attention_qkv",
}


def _budgeted(test: Callable) -> Callable:
    light = given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 3))(test)
    heavy = settings(max_examples=min(settings().max_examples, 10))(light)

    def run(row: str, transform: str) -> None:
        if MARKS.get((row, transform), ("",))[0].startswith("xfail"):
            # An expected failure needs one example, not hypothesis's search and shrinking.
            test(row=row, transform=transform, seed=0, n=2)
            return
        (heavy if row in _HEAVY else light)(row=row, transform=transform)

    run.__name__ = test.__name__
    run.__doc__ = test.__doc__
    return run


@pytest.mark.parametrize(("row", "transform"), list(_cells()))
@_budgeted
def test_cell(row: str, transform: str, seed: int, n: int) -> None:
    """One cell of the table: ``row``'s function under ``transform`` (see the module docstring)."""
    _check_cell(ROW[row], transform, seed, n)


def test_table_covers_the_public_api() -> None:
    """Every public name of the five modules has a row or a reasoned ``OUT_OF_SCOPE`` entry."""
    covered = {id(r.fn) for r in ROWS}
    missing = []
    for module in (flm.nn, flm.rope, flm.model, flm.loss, flm.sampling):
        for name in module.__all__:
            obj = getattr(module, name)
            qual = f"{module.__name__}.{name}"
            if id(obj) in covered or qual in OUT_OF_SCOPE:
                continue
            missing.append(qual)
    assert not missing, f"public functions without a row in the composability table: {missing}"
    stale = [q for q in OUT_OF_SCOPE if not hasattr(__import__(q.rsplit(".", 1)[0], fromlist=["_"]), q.rsplit(".")[-1])]
    assert not stale, stale


# --------------------------------------------------------------------------------------------
# Per-example gradients of the whole LM loss
# --------------------------------------------------------------------------------------------

PER_EXAMPLE = TransformerConfig(vocab_size=11, context_length=5, d_model=8, num_layers=2, num_heads=2, d_ff=12)


def _user_loss(params: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """A user's LM loss with every default: id and target checks on."""
    return flm.loss.cross_entropy(transformer_lm(params, x, PER_EXAMPLE), y)


def _lm_batch(seed: int, batch: int, seq: int) -> tuple[Any, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    params = init_params(PER_EXAMPLE, g, dtype=D)
    w = torch.randint(0, PER_EXAMPLE.vocab_size, (batch, seq + 1), generator=g)
    return params, w[:, :-1], w[:, 1:]


@settings(max_examples=min(settings().max_examples, 10))
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), seq=st.integers(1, 5))
@pytest.mark.parametrize("loss", ["make_loss_fn", "user_loss"])
def test_per_example_grads_equal_a_loop(loss: str, seed: int, batch: int, seq: int) -> None:
    """``vmap(grad_and_value(loss), in_dims=(None, 0, 0))`` and ``vmap(grad(loss))`` over examples
    (each a batch of one) equal a Python loop over the examples, for flm's loss and a user's."""
    params, x, y = _lm_batch(seed, batch, seq)
    loss_fn = make_loss_fn(PER_EXAMPLE) if loss == "make_loss_fn" else _user_loss

    def one(p: Any, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return loss_fn(p, xi[None], yi[None])

    grads, values = func.vmap(grad_and_value(one), in_dims=(None, 0, 0))(params, x, y)
    grads_only = func.vmap(func.grad(one), in_dims=(None, 0, 0))(params, x, y)
    loop = [grad_and_value(one)(params, x[i], y[i]) for i in range(batch)]
    want_grads = optree.tree_map(lambda *gs: torch.stack(gs), *(g for g, _ in loop), namespace="")
    torch.testing.assert_close(values, torch.stack([v for _, v in loop]), rtol=1e-12, atol=1e-12)
    _assert_trees_close(grads, want_grads, rtol=1e-10, atol=1e-12)
    _assert_trees_close(grads_only, want_grads, rtol=1e-10, atol=1e-12)
    # The per-example gradients average to the batch gradient.
    batch_grads, _ = grad_and_value(loss_fn)(params, x, y)
    _assert_trees_close(optree.tree_map(lambda t: t.mean(0), grads, namespace=""), batch_grads, rtol=1e-10, atol=1e-12)


def test_vmap_of_a_loss_with_default_checks() -> None:
    """``vmap(lambda xi, yi: loss(params, xi[None], yi[None]))`` works with ``transformer_lm``'s
    default ``check_ids=True`` (the check is skipped for batched ids) and equals the loop, while an
    eager call still rejects an out-of-range id."""
    params, x, y = _lm_batch(0, 3, 4)
    got = func.vmap(lambda xi, yi: _user_loss(params, xi[None], yi[None]))(x, y)
    want = torch.stack([_user_loss(params, x[i : i + 1], y[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    bad = x.clone()
    bad[0, 0] = PER_EXAMPLE.vocab_size
    with pytest.raises(ValueError, match="outside"):
        _user_loss(params, bad, y)
    # torch.func.grad wraps every tensor argument, so ids passed in are not checked (the lookup
    # itself then fails); ids the function closes over stay plain and are checked.
    with pytest.raises(ValueError, match="outside"):
        func.grad(lambda p: _user_loss(p, bad, y))(params)
    with pytest.raises(IndexError):
        func.grad(_user_loss)(params, bad, y)
