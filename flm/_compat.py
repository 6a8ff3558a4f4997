"""The one place flm asks torch questions that have no public, version-stable answer.

Every use of a private or version-dependent torch API lives here, so a new torch release is
checked in one file (``tests/test_compat.py`` runs on every torch that ``pyproject.toml``
allows). The questions:

- :func:`is_compiling`: is this code being traced by ``torch.compile`` (dynamo)?
- :func:`is_transformed`: is any of these tensors wrapped by a ``torch.func`` transform
  (``vmap``, ``grad``, ``jvp``, ``jacrev``, …)? There is no public API for it; the probe is
  ``torch._C._functorch.is_functorch_wrapped_tensor``.
- :func:`is_vmapped`: is a tensor (or what it wraps) a ``vmap`` batched tensor?
- :func:`in_forward_mode`: is forward-mode AD active (a ``torch.func`` ``jvp``/``jacfwd``/``hessian``
  transform, or a ``torch.autograd.forward_ad`` dual tensor)? The transform probe is
  ``torch._functorch.pyfunctorch``'s interpreter stack.
- :func:`is_compile_error`: did ``torch.compile`` itself fail (not the compiled program)?
- :func:`checks_enabled`: may a data-dependent check (one that reads tensor values back to the
  host, such as "every token id < vocab_size") run here? Only in eager, untransformed calls.
- :func:`mark_static_buffers`, :func:`cudagraph_skips` and :func:`cudagraphs_or_error`: what a
  train step captured as CUDA graphs (``compile_mode="reduce-overhead"``) needs from dynamo and
  inductor: its donated buffers marked static inputs (``torch._dynamo.mark_static_address``), and
  a capture inductor would skip made visible (its skip counter, ``triton.cudagraph_or_error``).
- :func:`all_gather_autograd`: an all-gather that autograd differentiates (its backward a
  reduce-scatter), what ``--shard`` gathers a layer's parameters with. The public
  ``torch.distributed.nn.functional.all_gather`` is deprecated in favour of the private
  ``torch.distributed._functional_collectives`` functions, whose name changed between releases.

Importing this module also imports ``torch.distributed.nn.functional`` (when torch has
``torch.distributed``), so that it is imported before any process group exists; see
:data:`_UNPIN_DEFAULT_GROUP` for why.

And the private kernels flm calls: ``foreach_add``, ``foreach_add_``, ``foreach_mul``,
``foreach_mul_``, ``foreach_div``, ``foreach_sqrt``, ``foreach_lerp``, ``foreach_lerp_``,
``foreach_addcmul_`` and ``foreach_norm`` are ``torch._foreach_*`` (one kernel launch for a list
of tensors, what ``torch.optim`` runs on; no public equivalent), as plain aliases, so a call costs
exactly what the torch function costs. :mod:`flm.optim` uses them on eager, untransformed leaves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

__all__ = [
    "all_gather_autograd",
    "cudagraph_skips",
    "cudagraphs_or_error",
    "mark_static_buffers",
    "checks_enabled",
    "in_forward_mode",
    "is_compile_error",
    "is_compiling",
    "is_transformed",
    "is_vmapped",
    "foreach_add",
    "foreach_add_",
    "foreach_addcmul_",
    "foreach_div",
    "foreach_lerp",
    "foreach_lerp_",
    "foreach_mul",
    "foreach_mul_",
    "foreach_norm",
    "foreach_sqrt",
]

_functorch = torch._C._functorch

# torch.distributed.nn.functional's collectives take ``group=group.WORLD`` as a default argument,
# evaluated when that module is imported. Imported after ``init_process_group`` (torch._dynamo
# imports it, and the functional collectives import torch._dynamo lazily, on the first
# all_gather_autograd), those defaults hold the default process group for the life of the
# process: ``destroy_process_group`` then never frees it, gloo's worker threads are never joined,
# and one of them can touch a Python-owned tensor while the interpreter finalizes, which aborts the
# process (SIGABRT, "terminate called without an active exception"; torch 2.11 and 2.13). Imported
# first, with no group yet, the defaults are None. Any ``import flm`` runs this before a group
# can be joined through flm (flm.distributed imports this module).
_UNPIN_DEFAULT_GROUP = torch.distributed.is_available()
if _UNPIN_DEFAULT_GROUP:
    import torch.distributed.nn.functional  # imported for its side effect, above

# torch._foreach_*: list-of-tensors kernels (private; torch.optim's fast path). Plain aliases, not
# wrappers: no call overhead. Each is tested against per-tensor ops in tests/test_compat.py.
foreach_add = torch._foreach_add
foreach_add_ = torch._foreach_add_
foreach_addcmul_ = torch._foreach_addcmul_
foreach_div = torch._foreach_div
foreach_lerp = torch._foreach_lerp
foreach_lerp_ = torch._foreach_lerp_
foreach_mul = torch._foreach_mul
foreach_mul_ = torch._foreach_mul_
foreach_norm = torch._foreach_norm
foreach_sqrt = torch._foreach_sqrt


def is_compiling() -> bool:
    """Whether the caller is being traced by ``torch.compile`` (dynamo).

    Returns:
        ``True`` while dynamo traces the code, ``False`` in eager calls.

    Source: ``torch.compiler.is_compiling`` (public since torch 2.3).
    """
    return torch.compiler.is_compiling()


def _tensors(values: Iterable[Any]) -> Iterable[torch.Tensor]:
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from _tensors(value)
        elif isinstance(value, dict):
            yield from _tensors(value.values())


def is_transformed(*values: Any) -> bool:
    """Whether any tensor among ``values`` is wrapped by a ``torch.func`` transform.

    Args:
        *values: tensors, or (nested) lists, tuples and dicts of them; other values are ignored.
            Look at every input that a transform may have wrapped (parameters *and* batched
            inputs): under ``vmap(grad(f), in_dims=(None, 0))`` only the inputs are batched.

    Returns:
        ``True`` if any of them is a functorch-wrapped tensor (inside ``vmap``, ``grad``,
        ``jvp``, ``jacrev``, ``jacfwd``, …).

    Source: ``torch._C._functorch.is_functorch_wrapped_tensor`` (private; no public equivalent).
    """
    wrapped = _functorch.is_functorch_wrapped_tensor
    return any(wrapped(t) for t in _tensors(values))


def is_vmapped(x: torch.Tensor) -> bool:
    """Whether ``x`` is, or wraps, a ``torch.func.vmap`` batched tensor.

    Args:
        x: any tensor.

    Returns:
        ``True`` inside ``vmap`` for a tensor that carries a batch dimension.

    Source: ``torch._C._functorch.is_batchedtensor`` / ``get_unwrapped`` (private).
    """
    while _functorch.is_functorch_wrapped_tensor(x):
        if _functorch.is_batchedtensor(x):
            return True
        x = _functorch.get_unwrapped(x)
    return False


def in_forward_mode(*values: Any) -> bool:
    """Whether forward-mode AD is active: a ``torch.func`` forward-mode transform (``jvp``,
    ``jacfwd``, ``hessian``) on the stack, or a ``torch.autograd.forward_ad`` dual among ``values``.

    A custom ``torch.autograd.Function`` needs a ``jvp`` for forward mode, which dynamo cannot
    trace, and torch runs it with forward-mode AD off, so an enclosing forward-mode level sees
    nothing of it (``jacfwd(jacfwd(f))`` is silently 0, torch 2.13). Code with a custom Function
    asks this to use plain differentiable ops instead.

    Args:
        *values: tensors, or (nested) lists, tuples and dicts of them, that may carry a
            ``forward_ad`` tangent.

    Returns:
        ``True`` in forward mode; ``False`` otherwise and under ``torch.compile`` (eager-only probe).

    Source: ``torch._functorch.pyfunctorch.retrieve_all_functorch_interpreters`` and
    ``torch._C._functorch.TransformType.Jvp`` (private; no public equivalent);
    ``torch.autograd.forward_ad.unpack_dual`` (public).
    """
    if is_compiling():
        return False
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    jvp = _functorch.TransformType.Jvp
    if any(i.key() == jvp for i in retrieve_all_functorch_interpreters()):
        return True
    unpack = torch.autograd.forward_ad.unpack_dual
    return any(unpack(t).tangent is not None for t in _tensors(values))


def checks_enabled(*values: Any) -> bool:
    """Whether a data-dependent check on ``values`` may run: eager and untransformed only.

    Such checks read tensor values back to the host (a sync), which ``torch.compile`` would break
    the graph for and ``vmap`` cannot do at all; inside those they are skipped, so the caller's
    docstring must say that the check is eager-only.

    Args:
        *values: the tensors the check would read (and any others a transform may wrap).

    Returns:
        ``False`` under ``torch.compile`` or inside a ``torch.func`` transform, else ``True``.
    """
    return not (is_compiling() or is_transformed(*values))


def is_compile_error(err: BaseException) -> bool:
    """Whether ``err`` was raised by ``torch.compile`` itself (dynamo tracing or a backend such as
    inductor failing), as opposed to an error of the compiled program.

    Args:
        err: an exception caught around a call of a compiled function.

    Returns:
        ``True`` for dynamo's and inductor's own exceptions.

    Source: ``torch._dynamo.exc.TorchDynamoException`` (private; the base of
    ``BackendCompilerFailed``, ``InternalTorchDynamoError``, ``Unsupported``, …).
    """
    from torch._dynamo import exc

    return isinstance(err, exc.TorchDynamoException)


def all_gather_autograd(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0, differentiably: the gradient of the result
    reaches each rank's ``x`` summed over ranks (a reduce-scatter).

    Args:
        x: ``(rows, *rest)``, the same shape on every rank.
        group: the process group (default: the whole job).

    Returns:
        ``(world_size * rows, *rest)``, rank ``r``'s ``x`` at rows ``[r * rows, (r + 1) * rows)``.

    Source: ``torch.distributed._functional_collectives.all_gather_single_autograd`` (torch ≥ 2.13;
    ``all_gather_tensor_autograd`` before, deprecated since), private.
    """
    import torch.distributed as dist
    import torch.distributed._functional_collectives as fc

    group = dist.group.WORLD if group is None else group
    gather = getattr(fc, "all_gather_single_autograd", None)
    if gather is not None:
        out = gather(x, 0, group)
    else:
        out = fc.all_gather_tensor_autograd(x, 0, group)
    return fc.wait_tensor(out) if isinstance(out, fc.AsyncCollectiveTensor) else out


def mark_static_buffers(tensors: Iterable[torch.Tensor]) -> None:
    """Mark tensors as static inputs of compiled functions: CUDA graphs bake their addresses in
    instead of copying them in on every replay, and may mutate them in place.

    Unguarded (``guard=False``): passing other tensors later re-records the graphs rather than
    recompiling. A tensor already marked is left as it is.

    Args:
        tensors: the buffers (e.g. a donating train step's params and optimiser state).

    Source: ``torch._dynamo.mark_static_address`` (private; present in torch 2.11–2.14).
    """
    for t in tensors:
        if getattr(t, "_dynamo_static_input_type", None) is None:
            torch._dynamo.mark_static_address(t, guard=False)


def cudagraph_skips() -> int:
    """How many times inductor has decided not to capture a compiled graph as CUDA graphs in this
    process (each time with a reason it logs under ``TORCH_LOGS=cudagraphs``).

    Source: ``torch._dynamo.utils.counters["inductor"]["cudagraph_skips"]`` (private).
    """
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


@contextlib.contextmanager
def cudagraphs_or_error() -> Iterator[None]:
    """Inside the block, inductor raises (``RuntimeError("skipping cudagraphs due to …")``) where
    it would otherwise skip CUDA graphs silently; without that option, nothing changes.

    Source: ``torch._inductor.config.triton.cudagraph_or_error`` (private).
    """
    from torch._inductor import config as inductor_config

    if not hasattr(inductor_config.triton, "cudagraph_or_error"):
        yield
        return
    with inductor_config.patch({"triton.cudagraph_or_error": True}):
        yield
