"""flm._compat: the answers to questions torch has no public, version-stable API for.

Each function is checked outside any transform, inside ``vmap``, ``grad``, ``jvp``, ``jacrev``
(and nested), and under ``torch.compile`` (one tiny ``fullgraph=True`` call with the ``eager``
backend); ``is_compile_error`` against real dynamo errors. These run on every torch that
``pyproject.toml`` allows, so a torch release that moves the private probes fails here first.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch.func import grad, jacrev, jvp, vmap

from flm import _compat
from flm._compat import checks_enabled, is_compile_error, is_compiling, is_transformed, is_vmapped


def _probe(x: torch.Tensor, closed: torch.Tensor) -> dict[str, bool]:
    return {
        "compiling": is_compiling(),
        "arg_transformed": is_transformed(x),
        "closed_transformed": is_transformed(closed),
        "nested_transformed": is_transformed([closed, {"a": (1, "b", x)}]),
        "arg_vmapped": is_vmapped(x),
        "closed_vmapped": is_vmapped(closed),
        "checks": checks_enabled(x),
        "checks_closed": checks_enabled(closed, 3, None),
    }


def _seen(transform) -> dict[str, bool]:
    """Run ``_probe`` once inside ``transform(f)(x)`` and return what it answered."""
    closed = torch.ones(3)
    seen = {}

    def f(x):
        seen.update(_probe(x, closed))
        return (x * x).sum()

    transform(f)
    return seen


EAGER = {
    "compiling": False,
    "arg_transformed": False,
    "closed_transformed": False,
    "nested_transformed": False,
    "arg_vmapped": False,
    "closed_vmapped": False,
    "checks": True,
    "checks_closed": True,
}
x0 = torch.arange(6.0).reshape(2, 3)


@pytest.mark.parametrize(
    ("transform", "vmapped"),
    [
        pytest.param(lambda f: f(x0), None, id="eager"),
        pytest.param(lambda f: vmap(f)(x0), True, id="vmap"),
        pytest.param(lambda f: grad(f)(x0), False, id="grad"),
        pytest.param(lambda f: jvp(f, (x0,), (torch.ones_like(x0),)), False, id="jvp"),
        # jacrev runs f once under its vjp; the vmap is over the backward pass only.
        pytest.param(lambda f: jacrev(f)(x0), False, id="jacrev"),
        pytest.param(lambda f: vmap(grad(f))(x0), True, id="vmap(grad)"),
        pytest.param(lambda f: grad(lambda x: vmap(f)(x).sum())(x0), True, id="grad(vmap)"),
    ],
)
def test_transforms_are_seen(transform, vmapped):
    """Outside transforms everything is plain and checks run; inside any transform its argument
    is seen as transformed (checks off), tensors it closes over are not, and only ``vmap``'s
    batched tensors (also under another wrapper) count as vmapped."""
    seen = _seen(transform)
    if vmapped is None:
        assert seen == EAGER
        return
    assert seen == {
        **EAGER,
        "arg_transformed": True,
        "nested_transformed": True,
        "arg_vmapped": vmapped,
        "checks": False,
    }


def test_vmap_in_dims_none_is_not_batched():
    """An argument that ``vmap`` does not batch (``in_dims=None``) is left a plain tensor."""
    seen = {}

    def f(x, y):
        seen["x"], seen["y"] = (is_vmapped(x), is_transformed(x)), (is_vmapped(y), is_transformed(y))
        return x + y

    vmap(f, in_dims=(0, None))(x0, torch.ones(3))
    assert seen == {"x": (True, True), "y": (False, False)}


def test_non_tensors_and_empty():
    """Non-tensor values are ignored; no values at all are not transformed."""
    assert not is_transformed()
    assert not is_transformed(1, "a", None, [2.0], {"k": (None,)})
    assert checks_enabled()


def test_under_compile():
    """``torch.compile(fullgraph=True)``: ``is_compiling`` is true and checks are off, in one graph."""

    def f(x):
        if is_compiling() and not checks_enabled(x):
            return x + 1
        return x - 1

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    x = torch.zeros(3)
    torch.testing.assert_close(compiled(x), x + 1)
    torch.testing.assert_close(f(x), x - 1)
    assert not is_compiling() and checks_enabled(x)


def test_is_compile_error_on_real_dynamo_errors():
    """A graph break under ``fullgraph=True`` and a failing backend are compile errors; an error
    of the program itself, or any ordinary exception, is not."""

    @torch.compiler.disable
    def opaque(x):
        return x * 2

    def breaks(x):
        return opaque(x) + 1

    with pytest.raises(Exception) as info:
        torch.compile(breaks, fullgraph=True, backend="eager")(torch.ones(2))
    assert is_compile_error(info.value), repr(info.value)

    def failing_backend(gm, example_inputs):
        raise RuntimeError("backend gave up")

    with pytest.raises(Exception) as info:
        torch.compile(lambda x: x.sin() + 1, backend=failing_backend)(torch.ones(2))
    assert is_compile_error(info.value), repr(info.value)

    # Cholesky of a matrix that is not positive definite fails when the compiled program runs
    # (tracing on fake tensors cannot see values). A shape error, by contrast, is found while
    # tracing and reported by dynamo as its own TorchRuntimeError: a compile error.
    with pytest.raises(RuntimeError) as info:
        torch.compile(lambda x: torch.linalg.cholesky(x) + 1, backend="eager")(-torch.eye(2))
    assert not is_compile_error(info.value), repr(info.value)
    assert not is_compile_error(ValueError("x")) and not is_compile_error(RuntimeError("x"))


# --------------------------------------------------------------------------------------------
# torch._foreach_* aliases: each form flm.optim calls, against per-tensor ops
# --------------------------------------------------------------------------------------------


def _lists(n: int = 3) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    shapes = [(3,), (2, 5), ()]
    return [[torch.rand(s, generator=g, dtype=torch.float32) + 0.5 for s in shapes] for _ in range(n)]


_HALF = torch.tensor(0.5)
# name -> [(call on lists a, b, c; per-tensor reference on one triple x, y, z)]; in-place forms
# (trailing "_") are checked on what they leave in ``a``.
FOREACH = {
    "foreach_add": [
        (lambda a, b, c: _compat.foreach_add(a, b), lambda x, y, z: x + y),
        (lambda a, b, c: _compat.foreach_add(a, b, alpha=-0.25), lambda x, y, z: x - 0.25 * y),
    ],
    "foreach_add_": [
        (lambda a, b, c: _compat.foreach_add_(a, b), lambda x, y, z: x + y),
        (lambda a, b, c: _compat.foreach_add_(a, b, alpha=3.0), lambda x, y, z: x + 3.0 * y),
        (lambda a, b, c: _compat.foreach_add_(a, 1e-3), lambda x, y, z: x + 1e-3),
        (lambda a, b, c: _compat.foreach_add_(a, _HALF), lambda x, y, z: x + 0.5),
    ],
    "foreach_addcmul_": [(lambda a, b, c: _compat.foreach_addcmul_(a, b, c, 0.1), lambda x, y, z: x + 0.1 * y * z)],
    "foreach_div": [(lambda a, b, c: _compat.foreach_div(a, b), lambda x, y, z: x / y)],
    "foreach_lerp": [(lambda a, b, c: _compat.foreach_lerp(a, b, 0.1), lambda x, y, z: x.lerp(y, 0.1))],
    "foreach_lerp_": [(lambda a, b, c: _compat.foreach_lerp_(a, b, 0.1), lambda x, y, z: x.lerp(y, 0.1))],
    "foreach_mul": [
        (lambda a, b, c: _compat.foreach_mul(a, 0.9), lambda x, y, z: x * 0.9),
        (lambda a, b, c: _compat.foreach_mul(a, _HALF), lambda x, y, z: x * 0.5),
    ],
    "foreach_mul_": [
        (lambda a, b, c: _compat.foreach_mul_(a, 0.9), lambda x, y, z: x * 0.9),
        (lambda a, b, c: _compat.foreach_mul_(a, _HALF), lambda x, y, z: x * 0.5),
    ],
    "foreach_norm": [
        (lambda a, b, c: _compat.foreach_norm(a), lambda x, y, z: torch.linalg.vector_norm(x)),
        (
            lambda a, b, c: _compat.foreach_norm([t.bfloat16() for t in a], dtype=torch.float32),
            lambda x, y, z: torch.linalg.vector_norm(x.bfloat16(), dtype=torch.float32),
        ),
    ],
    "foreach_sqrt": [(lambda a, b, c: _compat.foreach_sqrt(a), lambda x, y, z: x.sqrt())],
}


def test_every_foreach_alias_is_tested_and_is_torchs_own_function():
    """Plain aliases (no wrapper, no call overhead), one entry above per alias in ``__all__``."""
    names = {n for n in _compat.__all__ if n.startswith("foreach_")}
    assert names == set(FOREACH)
    for name in names:
        assert getattr(_compat, name) is getattr(torch, f"_{name}")


@pytest.mark.parametrize("name", sorted(FOREACH))
def test_foreach_alias_equals_per_tensor_ops(name):
    for call, reference in FOREACH[name]:
        a, b, c = _lists()
        want = [reference(x, y, z) for x, y, z in zip(a, b, c)]
        out = call(a, b, c)
        got = a if name.endswith("_") else out
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
            torch.testing.assert_close(g, w)


_GROUP_RELEASE_SCRIPT = """
import os, socket, sys
import torch
import torch.distributed as dist
import flm  # what a user's script does first: imports torch.distributed.nn.functional (see below)
from flm._compat import all_gather_autograd

def threads():
    return len(os.listdir("/proc/self/task"))

before = threads()
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
joined = threads()
x = torch.ones(3, requires_grad=True)
all_gather_autograd(x).square().sum().backward()  # imports torch._dynamo, which imports torch.distributed.nn.functional
import torch._dynamo  # noqa: E402,F401  (and a user's own late import)
dist.destroy_process_group()
print(before, joined, threads())
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc (Linux)")
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")
def test_destroying_the_process_group_joins_gloo_threads_after_all_gather_autograd():
    """Regression (bench/shard.py aborted in CI, exit -6): torch.distributed.nn.functional imported
    after init_process_group pins the default group in its functions' default arguments, so
    destroy_process_group left gloo's worker threads running into interpreter finalization. flm
    imports that module before any group exists; without that the last count stays at `joined`."""
    out = subprocess.run(
        [sys.executable, "-c", _GROUP_RELEASE_SCRIPT], capture_output=True, text=True, timeout=120, check=True
    )
    before, joined, after = map(int, out.stdout.split())
    assert joined > before  # gloo started worker threads: the check below can fail
    assert after == before, f"{after - before} gloo thread(s) outlived destroy_process_group"


def test_the_cuda_graph_probes_mark_buffers_and_scope_the_strict_option():
    """What a CUDA-graph train step asks of dynamo and inductor, on every supported torch: buffers
    marked static (unguarded) once, the skip counter readable, and the raise-instead-of-skip
    option set only inside its block."""
    from torch._inductor import config as inductor_config

    from flm._compat import cudagraph_skips, cudagraphs_or_error, mark_static_buffers

    a, b = torch.zeros(2), torch.ones(3)
    mark_static_buffers([a, b])
    mark_static_buffers([a])  # already marked: left as it is
    assert a._dynamo_static_input_type == b._dynamo_static_input_type == "unguarded"
    assert isinstance(cudagraph_skips(), int) and cudagraph_skips() >= 0
    before = getattr(inductor_config.triton, "cudagraph_or_error", None)
    with cudagraphs_or_error():
        inside = getattr(inductor_config.triton, "cudagraph_or_error", None)
    assert getattr(inductor_config.triton, "cudagraph_or_error", None) == before
    assert inside is (None if before is None else True)
