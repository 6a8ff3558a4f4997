"""The pure ``torch.func`` train step: loss, gradients, optimiser update — one function, no host syncs.

``make_train_step`` differentiates ``cross_entropy(transformer_lm(params, x), y)`` with
``torch.func.grad_and_value`` and applies a :class:`flm.optim.GradientTransformation`; the whole
step is a pure function ``(params, opt_state, inputs, targets) -> (params, opt_state, metrics)``
that never reads values back to the host, so ``torch.compile`` turns it into one graph.
``make_vmapped_train_step`` trains K models at once with ``torch.func.vmap``.

Source: CS336 assignment 1 handout §4–§5; design notes in ``shared/design.md``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import optree
import torch

from flm import nn, optim
from flm._compat import cudagraph_skips, cudagraphs_or_error, is_compiling, is_transformed, mark_static_buffers
from flm.loss import cross_entropy
from flm.model import TransformerConfig, init_params, transformer_lm
from flm.tree import stack, tree_map

__all__ = [
    "make_loss_fn",
    "grad_and_value",
    "step_body",
    "hand_back",
    "make_train_step",
    "make_vmapped_train_step",
    "init_vmapped",
    "TrainStep",
    "COMPILE_MODES",
    "CUDA_GRAPH_MODES",
]

PyTree = Any
TrainStep = Callable[[PyTree, Any, torch.Tensor, torch.Tensor], tuple[PyTree, Any, dict[str, torch.Tensor]]]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
"""``torch.compile``'s ``mode`` values."""
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
"""The modes in which inductor captures CUDA graphs (on CUDA tensors; elsewhere they compile as usual)."""


def make_loss_fn(
    config: TransformerConfig,
    *,
    compute_dtype: torch.dtype | None = None,
    block_fn: Callable[..., torch.Tensor] | None = None,
) -> Callable[[PyTree, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Return ``loss(params, inputs, targets) -> mean cross-entropy`` for ``config``'s LM.

    Args:
        config: the model's hyperparameters.
        compute_dtype: mixed precision: cast the (float32 master) parameters to this dtype
            (e.g. ``torch.bfloat16``) inside the loss, so matmuls run in it while gradients
            flow back to the masters in their own dtype; norms, softmax and the loss stay
            float32 (they upcast internally).
        block_fn: what runs each Transformer block (see :func:`flm.model.transformer_lm`).

    Returns:
        A pure function of ``params``, ``inputs (..., seq_len)`` and ``targets (..., seq_len)``
        returning a 0-d float32 loss in nats/token. Token ids are not value-checked (check
        them where data enters, e.g. ``flm.data.get_batch(..., vocab_size=...)``).

    Source: handout §4.1, eq. (16).
    """

    def loss_fn(params: PyTree, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if compute_dtype is not None:
            params = tree_map(lambda p: p.to(compute_dtype), params)
        logits = transformer_lm(params, inputs, config, check_ids=False, block_fn=block_fn)
        return cross_entropy(logits, targets, check=False)

    return loss_fn


def grad_and_value(loss_fn: Callable[..., torch.Tensor]) -> Callable[..., tuple[PyTree, torch.Tensor]]:
    """``torch.func.grad_and_value(loss_fn)`` (w.r.t. the first argument), with a faster eager path.

    Inside ``torch.func`` transforms (e.g. ``vmap``) and under ``torch.compile`` it *is*
    ``torch.func.grad_and_value``. Called eagerly on plain tensors it computes the same gradients
    with ``torch.autograd.grad`` on detached leaves that require grad (the caller's tensors are
    neither marked nor changed), which skips the transform's per-operation wrapping: on the
    handout model at batch 4 × 128 the forward + backward takes ~6 % less time (measured in
    ``bench/train_step.py``'s notes). Both paths are tested equal (``tests/test_train_step.py``).

    Args:
        loss_fn: ``loss_fn(params, *args) -> 0-d tensor``, a pure function.

    Returns:
        ``f(params, *args) -> (grads, loss)`` with ``grads`` shaped like ``params`` and ``loss``
        detached.

    Source: ``torch.func.grad_and_value``; ``torch.autograd.grad``.
    """
    functional = torch.func.grad_and_value(loss_fn)

    def grads_and_loss(params: PyTree, *args: Any) -> tuple[PyTree, torch.Tensor]:
        leaves, spec = optree.tree_flatten(params, namespace="")
        if is_compiling() or is_transformed(leaves, args) or not torch.is_grad_enabled():
            return functional(params, *args)
        leaf_vars = [t.detach().requires_grad_() for t in leaves]
        loss = loss_fn(optree.tree_unflatten(spec, leaf_vars), *args)
        grads = torch.autograd.grad(loss, leaf_vars)
        return optree.tree_unflatten(spec, list(grads)), loss.detach()

    return grads_and_loss


def _accumulated_grads(
    loss_and_grad: Callable, params: PyTree, inputs: torch.Tensor, targets: torch.Tensor, steps: int
):
    if steps == 1:
        return loss_and_grad(params, inputs, targets)
    if inputs.shape[0] % steps:
        raise ValueError(f"train step: batch of {inputs.shape[0]} does not split into {steps} equal micro-batches")
    micro_x, micro_y = inputs.chunk(steps), targets.chunk(steps)
    grads, loss = loss_and_grad(params, micro_x[0], micro_y[0])
    for x, y in zip(micro_x[1:], micro_y[1:]):
        g, l_i = loss_and_grad(params, x, y)
        grads = tree_map(torch.add, grads, g)
        loss = loss + l_i
    return tree_map(lambda g: g / steps, grads), loss / steps


def step_body(
    tx: optim.GradientTransformation,
    loss_and_grad: Callable,
    params: PyTree,
    opt_state: Any,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    grad_accum_steps: int = 1,
    grad_reduce: Callable[[PyTree], PyTree] | None = None,
    donate: bool = False,
    norm_fn: Callable[[PyTree], torch.Tensor] | None = None,
    keep_buffers: bool | None = None,
) -> tuple[PyTree, Any, dict[str, torch.Tensor]]:
    """One train step's body: gradients (accumulated, reduced) → metrics → optimiser update → new params.

    Shared by :func:`make_train_step`, :func:`make_vmapped_train_step` and
    :func:`flm.shard.make_sharded_train_step`, which differ only in ``loss_and_grad``.

    Args:
        tx: the optimiser.
        loss_and_grad: ``(params, inputs, targets) -> (grads, loss)``.
        params, opt_state: the state before the step.
        inputs, targets: ``(batch, seq_len)`` int64.
        grad_accum_steps: micro-batches (see :func:`make_train_step`).
        grad_reduce: applied to the gradients first (e.g. the data-parallel all-reduce).
        donate: update ``params`` in place (the transformations' own ``inplace`` donates the
            state's moments).
        norm_fn: the gradient norm reported when ``tx`` records none (default
            :func:`flm.optim.global_norm`).
        keep_buffers: also return ``opt_state``'s own tensors, every leaf the transformations
            returned as a new tensor written into its old buffer (:func:`hand_back`); default
            ``donate``. :func:`make_train_step` turns it off inside a plain whole-step compile.

    Returns:
        ``(params, opt_state, metrics)`` as :func:`make_train_step`'s step.
    """
    lr = optim.learning_rate_at(tx, opt_state)
    grads, loss = _accumulated_grads(loss_and_grad, params, inputs, targets, grad_accum_steps)
    if grad_reduce is not None:
        grads = grad_reduce(grads)
    # A clipping transformation computes the global norm anyway and records it in its state; only
    # without one does the step compute it (before the update, which may scale grads in place).
    norm = None if optim.recorded_grad_norm(opt_state) is not None else (norm_fn or optim.global_norm)(grads)
    old_state = opt_state
    updates, opt_state = tx.update(grads, opt_state, params)
    metrics = {"loss": loss.detach(), "grad_norm": norm if norm is not None else optim.recorded_grad_norm(opt_state)}
    if lr is not None:
        metrics["lr"] = lr
    if donate if keep_buffers is None else keep_buffers:
        opt_state = hand_back(old_state, opt_state)
    return optim.apply_updates(params, updates, inplace=donate), opt_state, metrics


def hand_back(old: PyTree, new: PyTree) -> PyTree:
    """``new`` written into ``old``'s buffers: each leaf of ``new`` that is not already the matching
    leaf of ``old`` is copied into it, so the result holds ``old``'s tensor objects.

    A donating step (``donate=True``) returns the very tensors it was given. The transformations
    return some state leaves as new tensors (step counts, the recorded gradient norm, momentum
    buffers; inside ``torch.func`` transforms also the moments); handing them back keeps every
    buffer at one address for the life of a run, which CUDA graphs need (their static inputs). Under ``torch.compile`` the copies become input
    mutations that inductor writes in place, but tracing this function costs dynamo seconds
    (the trees' flattening: +7 s on the 4-layer handout model's first call), so a plain
    whole-step compile leaves it out (its moments are written in place anyway; its step counts
    and recorded norm come back as new tensors).

    Args:
        old: the state before the step, donated.
        new: the state the transformations returned, structured like ``old``.

    Returns:
        A tree like ``new`` whose leaves are ``old``'s tensors, holding ``new``'s values. A leaf
        whose shape, dtype or device changed, that is another leaf's old buffer, or whose buffer
        appears twice in ``old``, stays ``new``'s.
    """
    old_leaves = optree.tree_leaves(old, namespace="")
    new_leaves, spec = optree.tree_flatten(new, namespace="")
    if len(old_leaves) != len(new_leaves):
        return new
    # An old buffer that appears twice cannot hold two values: its second leaf stays new. (The old
    # leaves are the step's inputs, so dynamo can take their id() too.)
    seen: set[int] = set()
    twice = []
    for o in old_leaves:
        twice.append(id(o) in seen)
        seen.add(id(o))
    if is_compiling():
        # Tracing an identity test against every old leaf costs dynamo ~1 ms a pair, and torch
        # 2.11 takes no id() of a tensor made in the graph: every new value is read first (a clone,
        # which inductor fuses into the write), so no copy can read a buffer another one wrote.
        sources = [n if n is o else n.clone() for o, n in zip(old_leaves, new_leaves)]
        moved = [False] * len(new_leaves)
    else:  # a new leaf that is another leaf's old buffer is left as it is (no clone in eager)
        sources = new_leaves
        moved = [id(n) in seen for n in new_leaves]
    out = []
    for o, n, src, dup, mv in zip(old_leaves, new_leaves, sources, twice, moved):
        if n is o or dup or mv or o.shape != n.shape or o.dtype != n.dtype or o.device != n.device:
            out.append(n)
        else:
            out.append(o.copy_(src))
    return optree.tree_unflatten(spec, out)


def make_train_step(
    config: TransformerConfig,
    tx: optim.GradientTransformation,
    *,
    compile: bool | str = False,
    donate: bool = False,
    compile_kwargs: dict[str, Any] | None = None,
    compute_dtype: torch.dtype | None = None,
    grad_accum_steps: int = 1,
    grad_reduce: Callable[[PyTree], PyTree] | None = None,
) -> TrainStep:
    """Build ``step(params, opt_state, inputs, targets) -> (params, opt_state, metrics)``.

    One step: ``(grads, loss) = grad_and_value(loss_fn)(params, inputs, targets)``; the global
    gradient norm (before any clipping in ``tx``); ``updates, opt_state = tx.update(grads,
    opt_state, params)``; ``params = apply_updates(params, updates)``.

    Args:
        config: the model's hyperparameters.
        tx: the optimiser, e.g. ``chain(clip_by_global_norm(1.0), adamw(cosine_schedule(...)))``.
        compile: wrap the whole step in ``torch.compile(fullgraph=True)`` (one graph: forward,
            backward, clipping and the optimiser; compile the outermost function, never
            ``grad(compile(f))``). The first call compiles; a new input shape recompiles.
            ``"blocks"``: compile one Transformer block and run it for every layer, the rest of
            the step (embedding, head, loss, backward glue) eager: the first call compiles in a
            time independent of depth (dynamo unrolls the whole step's layer loop, so its
            compile time grows with ``num_layers``). Pair it with ``adamw(kernel="compiled")``
            (what :func:`flm.train.make_optimizer` does for ``compile_scope="blocks"``), whose
            per-leaf update is also compiled once whatever the depth; ``bench/compile_time.py``
            measures both modes. Not usable inside ``torch.func`` transforms.
        donate: update the incoming params and optimiser state in place (their buffers are
            donated: the caller must not use the old ones again) and return those same tensors
            (:func:`hand_back`); under a plain ``compile=True`` (no CUDA graphs) the returned
            state's step counts and recorded norm are new tensors. Off by default, so the step is pure.
        compile_kwargs: extra ``torch.compile`` arguments (e.g. ``{"backend": "aot_eager"}`` on
            MPS). ``{"mode": "reduce-overhead"}`` (or ``"max-autotune"``) captures the whole
            step as CUDA graphs on CUDA, replayed with one launch, for steps whose time is kernel
            launches (small models): it needs ``compile=True`` and ``donate=True``, whose buffers
            become the graphs' static inputs (see :func:`_with_cuda_graphs`).
        compute_dtype: mixed precision (see :func:`make_loss_fn`); params and optimiser state
            stay in their own (float32) dtype.
        grad_accum_steps: split the batch into this many equal micro-batches, run them one
            after another and average their gradients (the same gradient as the whole batch,
            with a fraction of the activation memory).
        grad_reduce: applied to the gradients before clipping and the optimiser, e.g.
            :func:`flm.distributed.all_reduce_mean` for data parallelism.

    Returns:
        ``step``. ``inputs``/``targets`` are ``(batch, seq_len)`` int64; ``metrics`` holds 0-d
        tensors ``loss`` (float32, nats/token), ``grad_norm`` (before clipping) and, when ``tx``
        has a schedule, ``lr`` (the learning rate this step used). Nothing is synced to the host.

    Raises:
        ValueError: ``grad_accum_steps`` < 1, an unknown ``compile``, or a CUDA-graph mode without
            ``compile=True`` and ``donate=True``.

    Source: handout §4–§5; ``torch.func.grad_and_value``.
    """
    if grad_accum_steps < 1:
        raise ValueError(f"make_train_step: grad_accum_steps must be ≥ 1, got {grad_accum_steps}")
    if compile not in (True, False, "blocks"):
        raise ValueError(f"make_train_step: compile must be True, False or 'blocks', got {compile!r}")
    mode = (compile_kwargs or {}).get("mode")
    if mode in CUDA_GRAPH_MODES and not (compile is True and donate):
        raise ValueError(
            f"make_train_step: mode={mode!r} captures CUDA graphs of the whole step, which needs compile=True "
            f"(got {compile!r}) and donate=True (got {donate!r}): the graphs replay on fixed buffers"
        )
    block_fn = None
    if compile == "blocks":
        # One compiled block, shared by every layer (same shapes, so one graph); the step runs
        # eagerly around it and differentiates with torch.autograd (grad_and_value's eager path).
        block_fn = torch.compile(nn.transformer_block, **{"fullgraph": True, **(compile_kwargs or {})})
    loss_and_grad = grad_and_value(make_loss_fn(config, compute_dtype=compute_dtype, block_fn=block_fn))
    keep = donate and (compile is not True or mode in CUDA_GRAPH_MODES)  # see hand_back on its trace cost

    def step(
        params: PyTree, opt_state: Any, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[PyTree, Any, dict[str, torch.Tensor]]:
        return step_body(
            tx,
            loss_and_grad,
            params,
            opt_state,
            inputs,
            targets,
            grad_accum_steps,
            grad_reduce,
            donate,
            keep_buffers=keep,
        )

    if compile is True:
        compiled = torch.compile(step, **{"fullgraph": True, **(compile_kwargs or {})})
        return _with_cuda_graphs(compiled, mode) if mode in CUDA_GRAPH_MODES else compiled
    return step


CUDA_GRAPH_SKIPPED = "skipping cudagraphs"
"""How inductor's reason starts when it cannot capture a graph (``torch._inductor.cudagraph_utils``)."""


def _with_cuda_graphs(compiled: TrainStep, mode: str) -> TrainStep:
    """Run a step compiled with a CUDA-graph ``mode`` so that its graphs are captured once and replayed.

    Inductor's CUDA-graph trees replay a captured step on fixed memory: inputs they may mutate
    must be static (their addresses baked into the graph), and outputs live in the graphs' pool,
    overwritten by the next replay. So each call

    - marks every params and optimiser-state leaf a static input
      (``torch._dynamo.mark_static_address(guard=False)``: the donating step updates them in
      place and hands them back, :func:`hand_back`, so they keep their addresses all run long);
    - starts a new step for the trees (``torch.compiler.cudagraph_mark_step_begin``), since the
      step has no autograd backward by which they could tell;
    - returns clones of the metrics, which the caller keeps across steps (a loop reads them back
      only at its log interval).

    The batch is the one non-static input: each replay copies it into the graph's buffer. When
    inductor cannot capture the step on CUDA (its reason starts ``"skipping cudagraphs"``), the
    first call raises that instead of falling back silently; on other devices the mode compiles
    as usual.

    Args:
        compiled: the ``torch.compile``'d donating step.
        mode: the CUDA-graph mode it was compiled with, for the error message.

    Returns:
        A step with :func:`make_train_step`'s signature.

    Raises:
        RuntimeError: on the first call on CUDA, when inductor skips CUDA graphs for this step.

    Source: PyTorch, "CUDAGraph Trees" (``torch._inductor.cudagraph_trees``).
    """
    first = [True]

    def step(params: PyTree, opt_state: Any, inputs: torch.Tensor, targets: torch.Tensor):
        leaves = optree.tree_leaves((params, opt_state), namespace="")
        mark_static_buffers(leaves)
        torch.compiler.cudagraph_mark_step_begin()
        if first[0] and any(leaf.is_cuda for leaf in leaves):
            params, opt_state, metrics = _first_graphed_call(compiled, mode, params, opt_state, inputs, targets)
        else:
            params, opt_state, metrics = compiled(params, opt_state, inputs, targets)
        first[0] = False
        return params, opt_state, {k: v.clone() for k, v in metrics.items()}

    return step


def _first_graphed_call(compiled: TrainStep, mode: str, *args: Any) -> tuple[PyTree, Any, dict[str, torch.Tensor]]:
    """The first (compiling) call of :func:`_with_cuda_graphs`'s step on CUDA, with inductor told
    to raise where it would skip CUDA graphs (where torch has that option) and its skip counter
    checked where it has not."""
    skips = cudagraph_skips()
    with cudagraphs_or_error():
        out = compiled(*args)
    if cudagraph_skips() > skips:
        raise RuntimeError(
            f"{CUDA_GRAPH_SKIPPED}: inductor could not capture the train step as CUDA graphs (mode={mode!r}); "
            "set TORCH_LOGS=cudagraphs for its reason"
        )
    return out


def make_vmapped_train_step(
    config: TransformerConfig,
    make_tx: Callable[[dict[str, torch.Tensor]], optim.GradientTransformation],
    *,
    shared_batch: bool = False,
    compile: bool = False,
    compile_kwargs: dict[str, Any] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> Callable[..., tuple[PyTree, Any, dict[str, torch.Tensor]]]:
    """Train K independent models in one call by ``torch.func.vmap`` over a leading model axis.

    ``step(params, opt_state, hparams, inputs, targets) -> (params, opt_state, metrics)`` where
    every leaf of ``params`` and ``opt_state`` has a leading axis of size K (build them with
    :func:`flm.tree.stack`, or :func:`init_vmapped`), ``hparams`` is a dict of ``(K,)`` tensors
    (e.g. ``{"lr": ..., "weight_decay": ...}``) that ``make_tx`` turns into each model's
    optimiser (inside ``vmap`` each value is that model's 0-d tensor), and the metrics have shape
    ``(K,)``. Attention runs flm's own kernel (``"auto"`` resolves to ``"flm"`` here: PyTorch's
    fused CPU attention has no vmap batching rule). Each model computes exactly what
    :func:`make_train_step` would compute for it.

    Args:
        config: the (shared) model shape.
        make_tx: ``hparams -> GradientTransformation``, e.g. ``lambda h: chain(clip_by_global_norm(1.0),
            adamw(cosine_schedule(h["lr"], 0.1 * h["lr"], 100, 1000), weight_decay=h["weight_decay"]))``.
        shared_batch: all models see the same ``(batch, seq_len)`` batch; otherwise ``inputs`` and
            ``targets`` are ``(K, batch, seq_len)``, one batch per model.
        compile: ``torch.compile`` the vmapped step (``fullgraph=True``).
        compile_kwargs: extra ``torch.compile`` arguments.
        compute_dtype: mixed precision (see :func:`make_loss_fn`).

    Returns:
        The vmapped step.

    Raises:
        ValueError: if ``config.attention`` is ``"sdpa"``.

    Source: ``torch.func.vmap``; handout §7.2 (learning-rate sweeps).
    """
    if config.attention == "sdpa":
        raise ValueError(
            "make_vmapped_train_step: attention='sdpa' has no vmap batching rule (a slow per-model loop); "
            "use 'auto' or 'flm'"
        )
    config = dataclasses.replace(config, attention="flm")  # what "auto" picks inside vmap, also under compile
    loss_and_grad = torch.func.grad_and_value(make_loss_fn(config, compute_dtype=compute_dtype))

    def single(
        params: PyTree, opt_state: Any, hparams: dict[str, torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor
    ):
        return step_body(make_tx(hparams), loss_and_grad, params, opt_state, inputs, targets)

    batch_dim = None if shared_batch else 0
    step = torch.func.vmap(single, in_dims=(0, 0, 0, batch_dim, batch_dim))
    if compile:
        return torch.compile(step, **{"fullgraph": True, **(compile_kwargs or {})})
    return step


def init_vmapped(
    config: TransformerConfig,
    make_tx: Callable[[dict[str, torch.Tensor]], optim.GradientTransformation],
    hparams: dict[str, torch.Tensor],
    seeds: list[int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[PyTree, Any]:
    """Stacked parameters and optimiser states of K models, one seed each.

    Args:
        config: the model shape.
        make_tx: as in :func:`make_vmapped_train_step`.
        hparams: dict of ``(K,)`` tensors.
        seeds: K init seeds.
        device: where to place the stacks.
        dtype: parameter dtype.

    Returns:
        ``(params, opt_state)`` with a leading model axis of size K on every leaf.

    Raises:
        ValueError: if the number of seeds and the hyperparameter lengths differ.
    """
    k = len(seeds)
    for name, value in hparams.items():
        if value.shape != (k,):
            raise ValueError(f"init_vmapped: hparams[{name!r}] has shape {tuple(value.shape)}, expected ({k},)")
    models = [init_params(config, torch.Generator().manual_seed(s), device=device, dtype=dtype) for s in seeds]
    states = [make_tx({n: v[i] for n, v in hparams.items()}).init(p) for i, p in enumerate(models)]
    return stack(models), stack(states)
