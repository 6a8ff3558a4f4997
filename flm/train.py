"""Training: the ``torch.func`` train step and evaluation on held-out tokens.

``make_train_step`` differentiates ``cross_entropy(transformer_lm(params, x), y)`` with
``torch.func.grad_and_value`` and applies a :class:`flm.optim.GradientTransformation`; the whole
step is a pure function ``(params, opt_state, inputs, targets) -> (params, opt_state, metrics)``
that never reads values back to the host, so ``torch.compile`` turns it into one graph.

Source: CS336 assignment 1 handout §4–§5 (training loop), design notes in ``shared/design.md``.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flm import optim
from flm.loss import cross_entropy, token_cross_entropy
from flm.model import TransformerConfig, transformer_lm
from flm.progress import format_duration
from flm.tree import tree_leaves, tree_map

__all__ = [
    "make_loss_fn",
    "make_train_step",
    "make_vmapped_train_step",
    "init_vmapped",
    "evaluate",
    "TrainConfig",
    "make_optimizer",
    "decay_mask",
    "train_loop",
    "list_checkpoints",
    "read_metrics",
    "plot_metrics",
    "NonFiniteLossError",
]

PyTree = Any
TrainStep = Callable[[PyTree, Any, torch.Tensor, torch.Tensor], tuple[PyTree, Any, dict[str, torch.Tensor]]]


def make_loss_fn(
    config: TransformerConfig, *, compute_dtype: torch.dtype | None = None
) -> Callable[[PyTree, torch.Tensor, torch.Tensor], torch.Tensor]:
    """Return ``loss(params, inputs, targets) -> mean cross-entropy`` for ``config``'s LM.

    Args:
        config: the model's hyperparameters.
        compute_dtype: mixed precision: cast the (float32 master) parameters to this dtype
            (e.g. ``torch.bfloat16``) inside the loss, so matmuls run in it while gradients
            flow back to the masters in their own dtype; norms, softmax and the loss stay
            float32 (they upcast internally).

    Returns:
        A pure function of ``params``, ``inputs (..., seq_len)`` and ``targets (..., seq_len)``
        returning a 0-d float32 loss in nats/token. Token ids are not value-checked (check
        them where data enters, e.g. ``flm.data.get_batch(..., vocab_size=...)``).

    Source: handout §4.1, eq. (16).
    """

    def loss_fn(params: PyTree, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if compute_dtype is not None:
            params = tree_map(lambda p: p.to(compute_dtype), params)
        return cross_entropy(transformer_lm(params, inputs, config, check_ids=False), targets)

    return loss_fn


def _accumulated_grads(loss_and_grad: Callable, params: PyTree, inputs: torch.Tensor, targets: torch.Tensor, steps: int):
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


def _step_body(
    tx: optim.GradientTransformation,
    loss_and_grad: Callable,
    params: PyTree,
    opt_state: Any,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    grad_accum_steps: int = 1,
    grad_reduce: Callable[[PyTree], PyTree] | None = None,
    donate: bool = False,
) -> tuple[PyTree, Any, dict[str, torch.Tensor]]:
    """Gradients (accumulated, reduced) → metrics → optimiser update → new params."""
    lr = optim.learning_rate_at(tx, opt_state)
    grads, loss = _accumulated_grads(loss_and_grad, params, inputs, targets, grad_accum_steps)
    if grad_reduce is not None:
        grads = grad_reduce(grads)
    metrics = {"loss": loss.detach(), "grad_norm": optim.global_norm(grads)}
    if lr is not None:
        metrics["lr"] = lr
    updates, opt_state = tx.update(grads, opt_state, params)
    return optim.apply_updates(params, updates, inplace=donate), opt_state, metrics


def make_train_step(
    config: TransformerConfig,
    tx: optim.GradientTransformation,
    *,
    compile: bool = False,
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
    loss_and_grad = torch.func.grad_and_value(make_loss_fn(config, compute_dtype=compute_dtype))

    def step(
        params: PyTree, opt_state: Any, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[PyTree, Any, dict[str, torch.Tensor]]:
        return _step_body(tx, loss_and_grad, params, opt_state, inputs, targets, grad_accum_steps, grad_reduce, donate)

    if compile:
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
    ``(K,)``. The models must use ``attention="flm"``: PyTorch's fused attention has no batching
    rule. Each model computes exactly what :func:`make_train_step` would compute for it.

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
        ValueError: if ``config.attention`` is not ``"flm"``.

    Source: ``torch.func.vmap``; handout §7.2 (learning-rate sweeps).
    """
    if config.attention != "flm":
        raise ValueError(f"make_vmapped_train_step: use attention='flm' inside vmap, got {config.attention!r}")
    loss_and_grad = torch.func.grad_and_value(make_loss_fn(config, compute_dtype=compute_dtype))

    def single(params: PyTree, opt_state: Any, hparams: dict[str, torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor):
        return _step_body(make_tx(hparams), loss_and_grad, params, opt_state, inputs, targets)

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
    from flm.model import init_params
    from flm.tree import stack

    k = len(seeds)
    for name, value in hparams.items():
        if value.shape != (k,):
            raise ValueError(f"init_vmapped: hparams[{name!r}] has shape {tuple(value.shape)}, expected ({k},)")
    models = [init_params(config, torch.Generator().manual_seed(s), device=device, dtype=dtype) for s in seeds]
    states = [make_tx({n: v[i] for n, v in hparams.items()}).init(p) for i, p in enumerate(models)]
    return stack(models), stack(states)


def _as_tensor_1d(tokens: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    if tokens.ndim != 1:
        raise ValueError(f"evaluate: tokens must be a 1-D array, got shape {tuple(tokens.shape)}")
    return tokens


@torch.no_grad()
def evaluate(
    params: PyTree,
    config: TransformerConfig,
    tokens: np.ndarray | torch.Tensor,
    batch_size: int,
    context_length: int,
    num_batches: int | None = None,
    *,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Mean per-token loss and perplexity of the model on a token sequence.

    The tokens are cut into consecutive, non-overlapping windows of ``context_length + 1``
    tokens (inputs and shifted targets; windows share their boundary token), so every token
    after the first is predicted exactly once, with ``context_length`` tokens of context at most.
    With ``num_batches=None`` all windows are evaluated, in order; otherwise ``num_batches ·
    batch_size`` windows evenly spaced over the sequence (a cheaper estimate).

    Args:
        params: the parameter tree.
        config: the model's hyperparameters.
        tokens: ``(num_tokens,)`` integer ids (e.g. an ``np.memmap`` from ``flm.data.load_tokens``).
        batch_size: windows per forward pass.
        context_length: tokens per window (≤ ``config.context_length``).
        num_batches: evaluate only this many batches (``None``: everything).
        device: where to run (default: the parameters' device).

    Returns:
        ``{"loss": nats/token, "perplexity": exp(loss), "tokens": number of predicted tokens}``.

    Raises:
        ValueError: for fewer than ``context_length + 1`` tokens or bad sizes.

    Source: handout §4.1 eqs. (16), (18); §5.3.
    """
    tokens = _as_tensor_1d(tokens)
    n = int(tokens.shape[0])
    if batch_size <= 0 or context_length <= 0:
        raise ValueError(f"evaluate: batch_size and context_length must be positive, got {batch_size}, {context_length}")
    if context_length > config.context_length:
        raise ValueError(f"evaluate: context_length={context_length} exceeds the model's {config.context_length}")
    if num_batches is not None and num_batches <= 0:  # 0 would evaluate nothing and divide by zero
        raise ValueError(f"evaluate: num_batches must be positive or None, got {num_batches}")
    num_windows = (n - 1) // context_length
    if num_windows == 0:
        raise ValueError(f"evaluate: need at least context_length + 1 = {context_length + 1} tokens, got {n}")
    starts = np.arange(num_windows, dtype=np.int64) * context_length
    if num_batches is not None:
        wanted = min(num_windows, num_batches * batch_size)
        starts = starts[np.linspace(0, num_windows - 1, wanted).round().astype(np.int64)]
    if device is None:
        device = tree_leaves(params)[0].device
    offsets = np.arange(context_length + 1, dtype=np.int64)
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    for i in range(0, len(starts), batch_size):
        idx = starts[i : i + batch_size, None] + offsets
        window = tokens[idx] if isinstance(tokens, torch.Tensor) else torch.from_numpy(np.asarray(tokens[idx]).astype(np.int64))
        window = window.to(device=device, dtype=torch.int64)
        logits = transformer_lm(params, window[:, :-1], config)
        total += token_cross_entropy(logits, window[:, 1:]).double().sum()
        count += window.shape[0] * context_length
    loss = float(total) / count
    return {"loss": loss, "perplexity": math.exp(loss) if loss < 700 else math.inf, "tokens": count}


# --------------------------------------------------------------------------------------------
# The training loop: batches, logging, evaluation, checkpoints, resume (handout §5.3, §7.1)
# --------------------------------------------------------------------------------------------


_DTYPES = {"float32": None, "fp32": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser and loop settings of a training run (everything but the model).

    Attributes:
        batch_size: sequences per step.
        max_iters: optimiser steps in total; the cosine schedule ends exactly here.
        lr: peak learning rate α_max.
        min_lr: final learning rate α_min.
        warmup_iters: linear warm-up steps T_w.
        weight_decay: AdamW λ (not applied to RMSNorm gains).
        betas: AdamW (β1, β2).
        eps: AdamW ε.
        grad_clip: global-norm clipping threshold (0 disables).
        eval_interval: evaluate on the validation tokens every this many steps (0: only at the end).
        eval_batches: batches per periodic evaluation (``None``: the whole validation set).
        checkpoint_interval: save ``ckpt_<step>.safetensors`` every this many steps (0: only at the end).
        keep_checkpoints: how many periodic checkpoints to keep (the newest).
        log_interval: write a metrics line every this many steps (each one is a host sync).
        seed: seeds the parameter init and (separately) the batch sampler.
        device: ``"cpu"``, ``"cuda"``, ``"mps"`` …
        compile: ``torch.compile`` the whole train step.
        dtype: compute dtype, ``"float32"`` or ``"bfloat16"`` (mixed precision: float32 master
            params and optimiser state, bf16 matmuls, float32 norms/softmax/loss).
        grad_accum_steps: split each (per-rank) batch into this many equal micro-batches and
            average their gradients: the same update with a fraction of the activation memory.
    """

    batch_size: int = 32
    max_iters: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_interval: int = 100
    eval_batches: int | None = None
    checkpoint_interval: int = 500
    keep_checkpoints: int = 2
    log_interval: int = 10
    seed: int = 0
    device: str = "cpu"
    compile: bool = False
    dtype: str = "float32"
    grad_accum_steps: int = 1

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_iters", "log_interval", "grad_accum_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig: {name} must be positive, got {getattr(self, name)!r}")
        for name in ("warmup_iters", "eval_interval", "checkpoint_interval", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig: {name} must be ≥ 0, got {getattr(self, name)!r}")
        if self.warmup_iters > self.max_iters:
            raise ValueError(f"TrainConfig: warmup_iters={self.warmup_iters} exceeds max_iters={self.max_iters}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"TrainConfig: dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"TrainConfig: need 0 ≤ min_lr ≤ lr, got min_lr={self.min_lr}, lr={self.lr}")

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


def decay_mask(params: PyTree) -> PyTree:
    """Weight-decay mask: decay matrices (ndim ≥ 2), not RMSNorm gains (ndim 1)."""
    return tree_map(lambda p: p.dim() >= 2, params)


def make_optimizer(cfg: TrainConfig) -> optim.GradientTransformation:
    """The handout's optimiser: global-norm clipping → AdamW on a warm-up + cosine schedule.

    Source: handout §4.3–4.5, §7.2.
    """
    schedule = optim.cosine_schedule(cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.max_iters)
    adam = optim.adamw(schedule, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask)
    return optim.chain(optim.clip_by_global_norm(cfg.grad_clip), adam) if cfg.grad_clip > 0 else adam


_CKPT = re.compile(r"^ckpt_(\d+)\.safetensors$")


def list_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Periodic checkpoints ``ckpt_<step>.safetensors`` in ``out_dir``, oldest first."""
    d = Path(out_dir)
    found = [(int(m.group(1)), p) for p in d.glob("ckpt_*.safetensors") if (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


class NonFiniteLossError(RuntimeError):
    """Raised when the training loss becomes NaN or infinite; names the step."""


def _tensorboard_writer(out: Path) -> Any:
    """A TensorBoard ``SummaryWriter`` on ``out/tensorboard`` when tensorboard is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop metric lines past ``last_step`` (written after the checkpoint we resume from)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` file into a list of dicts."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_metrics(metrics_path: str | os.PathLike, out_png: str | os.PathLike) -> bool:
    """Plot train and validation loss against steps and wall-clock time to ``out_png``.

    Needs matplotlib (the ``plot`` extra); returns ``False`` without it.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = read_metrics(metrics_path)
    train = [r for r in rows if r.get("train_loss") is not None]
    val = [r for r in rows if r.get("val_loss") is not None]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "step", "step"), (axes[1], "wall_time", "wall-clock time (s)")):
        ax.plot([r[key] for r in train], [r["train_loss"] for r in train], label="train", lw=1)
        ax.plot([r[key] for r in val], [r["val_loss"] for r in val], "o-", label="validation", ms=3)
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = Path(out_png).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_png)
    return True


def train_loop(
    model_config: TransformerConfig,
    cfg: TrainConfig,
    train_tokens: np.ndarray,
    valid_tokens: np.ndarray | None,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    run_config: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    dist_info: Any = None,
) -> dict[str, Any]:
    """Train a model on memory-mapped tokens, with logging, evaluation, checkpoints and resume.

    Every ``log_interval`` steps one metrics line is appended to ``out_dir/metrics.jsonl``
    (``step``, ``wall_time``, ``tokens``, ``train_loss``, ``val_loss`` (null unless evaluated),
    ``val_perplexity``, ``lr``, ``grad_norm``, ``tokens_per_sec``) and a log line printed with
    ETA (and written to TensorBoard under ``out_dir/tensorboard`` when tensorboard is
    installed). Every ``eval_interval`` steps the validation loss is computed; the best model by
    validation loss is saved as ``best.safetensors``. Every ``checkpoint_interval`` steps and at
    the end ``ckpt_<step>.safetensors`` is written (params, optimiser state, step, sampler RNG),
    keeping the newest ``keep_checkpoints``. With ``resume`` the newest checkpoint is loaded and
    training continues at the same schedule position with the same sampler state, so the result
    equals an uninterrupted run. Ctrl-C saves a checkpoint and returns; a non-finite loss raises
    :class:`NonFiniteLossError` naming the step (the last good checkpoint stays).

    Args:
        model_config: the model.
        cfg: optimiser and loop settings.
        train_tokens: ``(n,)`` training ids (e.g. ``flm.data.load_tokens``).
        valid_tokens: ``(m,)`` validation ids, or ``None``.
        out_dir: the run directory.
        resume: continue from the newest checkpoint in ``out_dir`` if there is one.
        run_config: the whole run's settings, stored in checkpoints (default: model + train).
        log: where log lines go.
        dist_info: a :class:`flm.distributed.DistInfo` for data parallelism: ``batch_size`` is
            the global batch, each rank draws ``batch_size / world_size`` sequences from its own
            rank-seeded sampler, gradients are averaged with a bucketed all-reduce, and only
            rank 0 logs, evaluates and writes files (checkpoints hold every rank's sampler state).

    Returns:
        A summary: ``step``, ``status`` ("done" | "interrupted"), ``best_val_loss``,
        ``final_val_loss``, ``wall_time``, ``tokens``, ``tokens_per_sec``.

    Raises:
        NonFiniteLossError: on a NaN/inf training loss.

    Source: handout §5.3 (training_together), §7.1 (experiment_log).
    """
    from flm import distributed
    from flm.checkpoint import load_checkpoint, save_checkpoint
    from flm.data import get_batch
    from flm.model import init_params

    dist_info = dist_info or distributed.DistInfo(device=cfg.device)
    rank, world, main = dist_info.rank, dist_info.world_size, dist_info.is_main
    if cfg.batch_size % world:
        raise ValueError(f"train_loop: batch_size={cfg.batch_size} does not divide over {world} ranks")
    local_batch = cfg.batch_size // world
    if local_batch % cfg.grad_accum_steps:
        raise ValueError(
            f"train_loop: the per-rank batch of {local_batch} does not split into {cfg.grad_accum_steps} micro-batches"
        )
    if not main:
        log = lambda _msg: None  # noqa: E731  (only rank 0 speaks)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    run_config = run_config or {"model": model_config.to_dict(), "train": cfg.to_dict()}
    device = torch.device(dist_info.device if dist_info.enabled else cfg.device)
    tx = make_optimizer(cfg)
    params = init_params(model_config, torch.Generator().manual_seed(cfg.seed), device=device)
    opt_state = tx.init(params)
    sampler = torch.Generator().manual_seed(cfg.seed + 1 + 1_000_003 * rank)
    start, wall_offset, best = 0, 0.0, math.inf

    existing = list_checkpoints(out) if resume else []
    if existing:
        ckpt = load_checkpoint(existing[-1], like={"params": params, "opt_state": opt_state})
        params, opt_state, start = ckpt.params, ckpt.opt_state, ckpt.step
        states = ckpt.metadata.get("rng_states")
        if world > 1 and states and len(states) == world:
            sampler.set_state(torch.frombuffer(bytearray(base64.b64decode(states[rank])), dtype=torch.uint8))
        elif ckpt.rng_state is not None and rank == 0:
            sampler.set_state(ckpt.rng_state)
        wall_offset = float(ckpt.metadata.get("wall_time", 0.0))
        best = float(ckpt.metadata.get("best_val_loss", math.inf))
        _truncate_metrics(metrics_path, start)
        log(f"resumed from {existing[-1].name} at step {start}")
    elif metrics_path.exists() and main:
        metrics_path.unlink()

    step_fn = make_train_step(
        model_config,
        tx,
        compile=cfg.compile,
        compute_dtype=_DTYPES[cfg.dtype],
        grad_accum_steps=cfg.grad_accum_steps,
        grad_reduce=distributed.all_reduce_mean if dist_info.enabled else None,
    )
    tokens_per_step = cfg.batch_size * model_config.context_length
    t0 = time.perf_counter() - wall_offset
    last_log_time, last_log_step = time.perf_counter(), start
    pending: list[dict[str, torch.Tensor]] = []
    step = start
    final_val: float | None = None
    last_eval: tuple[int, float] | None = None

    def checkpoint(path: Path, at_step: int, rng_states: list[str] | None = None) -> None:
        if not main:
            return
        meta = {"wall_time": time.perf_counter() - t0, "best_val_loss": best if math.isfinite(best) else None}
        if rng_states:
            meta["rng_states"] = rng_states
        save_checkpoint(path, params=params, opt_state=opt_state, step=at_step, config=run_config, generator=sampler, metadata=meta)

    def periodic_checkpoint(at_step: int, gather: bool = True) -> None:
        states = None
        if dist_info.enabled and gather:  # a collective: every rank takes part
            states = [base64.b64encode(t.numpy().tobytes()).decode() for t in distributed.all_gather_bytes(sampler.get_state())]
        if not main:
            return
        checkpoint(out / f"ckpt_{at_step:07d}.safetensors", at_step, states)
        for old in list_checkpoints(out)[: -max(1, cfg.keep_checkpoints)]:
            old.unlink()

    def run_eval() -> tuple[float, float]:
        res = evaluate(params, model_config, valid_tokens, cfg.batch_size, model_config.context_length, cfg.eval_batches)
        return res["loss"], res["perplexity"]

    tb = _tensorboard_writer(out) if main else None
    status = "done"
    try:
        while step < cfg.max_iters:
            inputs, targets = get_batch(train_tokens, local_batch, model_config.context_length, device, sampler)
            params, opt_state, m = step_fn(params, opt_state, inputs, targets)
            step += 1
            pending.append(m)
            at_eval = main and valid_tokens is not None and cfg.eval_interval > 0 and step % cfg.eval_interval == 0
            at_ckpt = cfg.checkpoint_interval > 0 and step % cfg.checkpoint_interval == 0
            if step % cfg.log_interval and not at_eval and not at_ckpt and step != cfg.max_iters:
                continue
            # One host sync per logged interval: find the first non-finite loss since the last one.
            losses = torch.stack([p["loss"] for p in pending]).cpu()
            bad = (~torch.isfinite(losses)).nonzero()
            if len(bad):
                raise NonFiniteLossError(
                    f"training loss became {losses[int(bad[0])].item()} at step {step - len(pending) + int(bad[0]) + 1}; "
                    f"stopping (the last good checkpoint is kept)"
                )
            now = time.perf_counter()
            rate = (step - last_log_step) * tokens_per_step / max(now - last_log_time, 1e-9)
            last_log_time, last_log_step = now, step
            record: dict[str, Any] = {
                "step": step,
                "wall_time": round(now - t0, 3),
                "tokens": step * tokens_per_step,
                "train_loss": float(losses.mean()),
                "val_loss": None,
                "val_perplexity": None,
                "lr": float(pending[-1]["lr"]),
                "grad_norm": float(pending[-1]["grad_norm"]),
                "tokens_per_sec": round(rate, 1),
            }
            pending.clear()
            if at_eval:
                val_loss, val_ppl = run_eval()
                last_eval = (step, val_loss)
                record["val_loss"], record["val_perplexity"] = val_loss, val_ppl
                if val_loss < best:
                    best = val_loss
                    checkpoint(out / "best.safetensors", step)
            if main:
                _append_jsonl(metrics_path, record)
                if tb is not None:
                    for key in ("train_loss", "val_loss", "lr", "grad_norm", "tokens_per_sec"):
                        if record[key] is not None:
                            tb.add_scalar(key, record[key], step, walltime=None)
            eta = (cfg.max_iters - step) * tokens_per_step / max(rate, 1e-9)
            val_text = f" | val {record['val_loss']:.4f} (ppl {record['val_perplexity']:.2f})" if at_eval else ""
            log(
                f"step {step:6d}/{cfg.max_iters} | loss {record['train_loss']:.4f} | lr {record['lr']:.2e} | "
                f"grad norm {record['grad_norm']:.3f} | {rate:,.0f} tok/s | ETA {format_duration(eta)}{val_text}"
            )
            if at_ckpt:
                periodic_checkpoint(step)
    except KeyboardInterrupt:
        status = "interrupted"
        log(f"interrupted at step {step}: saving a checkpoint")
        periodic_checkpoint(step, gather=False)  # other ranks may be gone: no collective here
    if status == "done":
        if valid_tokens is not None and main:
            final_val = last_eval[1] if last_eval and last_eval[0] == step else run_eval()[0]
            if final_val < best:
                best = final_val
                checkpoint(out / "best.safetensors", step)
        if not (cfg.checkpoint_interval > 0 and step % cfg.checkpoint_interval == 0 and step > start):
            periodic_checkpoint(step)  # the loop has not just saved this step
    if tb is not None:
        tb.close()
    if main:
        plot_metrics(metrics_path, out / "loss.png")
    wall = time.perf_counter() - t0
    trained = (step - start) * tokens_per_step
    return {
        "step": step,
        "status": status,
        "best_val_loss": best if math.isfinite(best) else None,
        "final_val_loss": final_val,
        "wall_time": wall,
        "tokens": step * tokens_per_step,
        "tokens_per_sec": trained / max(wall - wall_offset, 1e-9),
    }
