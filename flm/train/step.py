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
from flm._compat import is_compiling, is_transformed
from flm.loss import cross_entropy
from flm.model import TransformerConfig, init_params, transformer_lm
from flm.tree import stack, tree_map

__all__ = [
    "make_loss_fn",
    "grad_and_value",
    "step_body",
    "make_train_step",
    "make_vmapped_train_step",
    "init_vmapped",
    "TrainStep",
]

PyTree = Any
TrainStep = Callable[[PyTree, Any, torch.Tensor, torch.Tensor], tuple[PyTree, Any, dict[str, torch.Tensor]]]


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
        donate: update ``params`` in place.
        norm_fn: the gradient norm reported when ``tx`` records none (default
            :func:`flm.optim.global_norm`).

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
    updates, opt_state = tx.update(grads, opt_state, params)
    metrics = {"loss": loss.detach(), "grad_norm": norm if norm is not None else optim.recorded_grad_norm(opt_state)}
    if lr is not None:
        metrics["lr"] = lr
    return optim.apply_updates(params, updates, inplace=donate), opt_state, metrics


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
        donate: update the incoming params in place (their buffers are donated: the caller must
            not use the old ``params`` again). Off by default, so the step is pure.
        compile_kwargs: extra ``torch.compile`` arguments (e.g. ``{"backend": "aot_eager"}`` on
            MPS, or ``{"mode": "max-autotune"}`` on CUDA).
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

    Source: handout §4–§5; ``torch.func.grad_and_value``.
    """
    if grad_accum_steps < 1:
        raise ValueError(f"make_train_step: grad_accum_steps must be ≥ 1, got {grad_accum_steps}")
    if compile not in (True, False, "blocks"):
        raise ValueError(f"make_train_step: compile must be True, False or 'blocks', got {compile!r}")
    block_fn = None
    if compile == "blocks":
        # One compiled block, shared by every layer (same shapes, so one graph); the step runs
        # eagerly around it and differentiates with torch.autograd (grad_and_value's eager path).
        block_fn = torch.compile(nn.transformer_block, **{"fullgraph": True, **(compile_kwargs or {})})
    loss_and_grad = grad_and_value(make_loss_fn(config, compute_dtype=compute_dtype, block_fn=block_fn))

    def step(
        params: PyTree, opt_state: Any, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[PyTree, Any, dict[str, torch.Tensor]]:
        return step_body(tx, loss_and_grad, params, opt_state, inputs, targets, grad_accum_steps, grad_reduce, donate)

    if compile is True:
        return torch.compile(step, **{"fullgraph": True, **(compile_kwargs or {})})
    return step


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
