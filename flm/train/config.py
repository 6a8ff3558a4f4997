"""The settings of a training run (everything but the model) and the optimiser they describe.

Source: CS336 assignment 1 handout §4.3–4.5 (AdamW, schedule, clipping), §5.3, §7.2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from flm import optim
from flm.train.step import COMPILE_MODES
from flm.tree import tree_map

__all__ = [
    "TrainConfig",
    "make_optimizer",
    "decay_mask",
    "default_device",
    "COMPUTE_DTYPES",
    "COMPILE_SCOPES",
    "COMPILE_MODES",
    "compile_mode_problem",
    "DeviceCapabilities",
    "resolve_auto",
    "tf32_matmuls",
]

PyTree = Any
COMPUTE_DTYPES: dict[str, torch.dtype | None] = {
    "float32": None,
    "fp32": None,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}

# What TrainConfig.compile compiles: the whole step, or one block reused per layer
# (flm.train.make_train_step's compile=True / compile="blocks").
COMPILE_SCOPES = ("step", "blocks")


def default_device() -> str:
    """The best device here: ``"cuda"`` > ``"mps"`` > ``"cpu"``."""
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser and loop settings of a training run (everything but the model).

    Attributes:
        batch_size: sequences per optimiser step (the global batch under data parallelism).
        max_iters: optimiser steps in total; the cosine schedule ends exactly here.
        lr: peak learning rate α_max.
        min_lr: final learning rate α_min (≤ lr).
        warmup_iters: linear warm-up steps T_w (≤ max_iters).
        weight_decay: AdamW λ (not applied to RMSNorm gains).
        betas: AdamW (β1, β2), each in [0, 1).
        eps: AdamW ε > 0.
        grad_clip: global-norm clipping threshold (0 disables clipping).
        eval_interval: evaluate on the validation tokens every this many steps (0: only at the end).
        eval_batches: batches per periodic evaluation (None: the whole validation set).
        checkpoint_interval: save ckpt_<step>.safetensors every this many steps (0: only at the end).
        keep_checkpoints: how many periodic checkpoints to keep (the newest; ≥ 1).
        log_interval: write a metrics line every this many steps (each one is a host sync).
        seed: seeds the parameter init and (separately) the batch sampler.
        device: cpu, cuda, cuda:1, mps, or auto (the best available).
        compile: torch.compile the train step (auto: on with CUDA when triton is installed, off on CPU and MPS).
        compile_scope: what compile compiles: step (the whole step as one graph: fastest steps; compile time grows with num_layers) or blocks (one Transformer block reused by every layer and one AdamW leaf update, the glue eager: compile time independent of depth, for deep models).
        compile_mode: torch.compile's mode for compile_scope step: default, reduce-overhead (CUDA graphs: the whole step replayed with one launch, for small models whose steps are launch-bound; CUDA only), max-autotune (autotuned kernels, plus CUDA graphs on CUDA; a much longer first call) or max-autotune-no-cudagraphs.
        dtype: compute dtype, float32, bfloat16 (mixed precision: float32 master params and optimiser state, bf16 matmuls, float32 norms/softmax/loss) or auto (bf16 on a CUDA GPU that supports it, else float32).
        tf32: let float32 matmuls use TensorFloat-32 on CUDA for the run's duration (auto: on with CUDA; no effect elsewhere).
        shard: shard the parameters, gradients and AdamW state over the ranks (ZeRO-3/FSDP: each rank holds ~1/world of them and gathers one part of the model at a time; blocks are recomputed in the backward); not with compile or the vmapped sweep yet.
        grad_accum_steps: split each (per-rank) batch into this many equal micro-batches and average their gradients.
        time_budget: stop training after this many minutes of wall time (resumes included), keeping the longest evaluation/checkpoint pause seen in reserve so the last evaluation and checkpoint also fit (None: no limit). flm train's report afterwards (the best model on every validation token, samples) is not counted.
        peak_flops: the device's peak FLOP/s for the MFU column (None: a known GPU's datasheet value, or a short matmul measurement on the CPU).
        tensorboard: also write the metrics to RUN/tensorboard (needs the tensorboard package).
        wandb: also log the metrics to this Weights & Biases project (needs the wandb package).
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
    device: str = "auto"
    compile: bool | str = "auto"
    compile_scope: str = "step"
    compile_mode: str = "default"
    dtype: str = "auto"
    tf32: bool | str = "auto"
    shard: bool = False
    grad_accum_steps: int = 1
    time_budget: float | None = None
    peak_flops: float | None = None
    tensorboard: bool = False
    wandb: str | None = None

    def __post_init__(self) -> None:
        def bad(name: str, need: str) -> ValueError:
            return ValueError(f"TrainConfig: {name} must be {need}, got {getattr(self, name)!r}")

        for name in ("batch_size", "max_iters", "log_interval", "grad_accum_steps", "keep_checkpoints"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(name, "a positive integer")
        for name in ("warmup_iters", "eval_interval", "checkpoint_interval", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(name, "an integer ≥ 0")
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise bad(name, "a finite positive number" if name == "lr" else "a finite number ≥ 0")
        if not self.lr > 0:
            raise bad("lr", "a finite positive number")  # one wording for every bad lr
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0):
            raise bad("eps", "a finite positive number")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            raise bad("betas", "two numbers in [0, 1)")
        if self.eval_batches is not None and (not isinstance(self.eval_batches, int) or self.eval_batches < 1):
            raise bad("eval_batches", "an integer ≥ 1, or None for the whole validation set")
        if self.warmup_iters > self.max_iters:
            raise ValueError(f"TrainConfig: warmup_iters={self.warmup_iters} exceeds max_iters={self.max_iters}")
        if self.min_lr > self.lr:
            raise ValueError(f"TrainConfig: need min_lr ≤ lr, got min_lr={self.min_lr}, lr={self.lr}")
        if self.dtype != "auto" and self.dtype not in COMPUTE_DTYPES:
            raise bad("dtype", f"one of {sorted(COMPUTE_DTYPES)} or auto")
        if self.shard and self.compile is True:
            raise ValueError(
                "TrainConfig: shard does not combine with compile yet (the sharded step differentiates "
                "with torch.autograd around collectives, which torch.compile does not trace here); use --no-compile"
            )
        if self.compile_scope not in COMPILE_SCOPES:
            raise bad("compile_scope", " or ".join(COMPILE_SCOPES))
        if self.compile_mode not in COMPILE_MODES:
            raise bad("compile_mode", ", ".join(COMPILE_MODES[:-1]) + " or " + COMPILE_MODES[-1])
        if self.compile_mode != "default" and self.compile_scope != "step":  # compile off: compile_mode_problem
            raise ValueError(
                f"TrainConfig: compile_mode={self.compile_mode!r} applies to the compiled whole step; it needs "
                f"compile_scope 'step', got {self.compile_scope!r}"
            )
        for name in ("compile", "tf32"):
            if getattr(self, name) not in (True, False, "auto"):
                raise bad(name, "true, false or auto")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(
                f"TrainConfig: batch_size={self.batch_size} does not split into grad_accum_steps="
                f"{self.grad_accum_steps} equal micro-batches"
            )
        for name in ("time_budget", "peak_flops"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise bad(name, "a positive number or None")
        if not isinstance(self.device, str) or not self.device:
            raise bad("device", "a device name such as cpu, cuda, mps or auto")

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The mixed-precision compute dtype (``None`` for float32).

        Raises:
            ValueError: ``dtype`` is still ``"auto"`` (call :func:`resolve_auto` first).
        """
        if self.dtype == "auto":
            raise ValueError("TrainConfig: dtype is 'auto'; resolve it for a device with resolve_auto(cfg) first")
        return COMPUTE_DTYPES[self.dtype]

    @property
    def is_resolved(self) -> bool:
        """Whether ``dtype``, ``compile`` and ``tf32`` are concrete (no ``"auto"`` left)."""
        return "auto" not in (self.dtype, self.compile, self.tf32)

    def resolved_device(self) -> str:
        """``device`` with ``"auto"`` replaced by :func:`default_device`."""
        return default_device() if self.device == "auto" else self.device

    def to_dict(self) -> dict[str, Any]:
        """The settings as a JSON-serialisable dict."""
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build a config from :meth:`to_dict`'s output (e.g. a checkpoint's or ``config.json``'s).

        Args:
            d: field name -> value; missing fields take their defaults.

        Returns:
            The validated :class:`TrainConfig`.

        Raises:
            ValueError: unknown keys, or values the config's validation rejects.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"TrainConfig: unknown keys {unknown}")
        d = dict(d)
        if "betas" in d:
            d["betas"] = tuple(d["betas"])
        return cls(**d)

    def replace(self, **changes: Any) -> TrainConfig:
        """Return a copy with ``changes`` applied (validated again).

        Args:
            **changes: field name -> new value.

        Returns:
            A new :class:`TrainConfig`.

        Raises:
            ValueError: a value the validation rejects; ``TypeError``: an unknown field.
        """
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class DeviceCapabilities:
    """What the fast defaults depend on, probed once per run (and faked in tests).

    Attributes:
        device_type: ``"cuda"``, ``"cpu"``, ``"mps"``, … (``torch.device(...).type``).
        bf16: the device computes bfloat16 matmuls natively (CUDA compute capability ≥ 8.0).
        triton: ``import triton`` works (inductor's GPU code generator; without it ``torch.compile``
            cannot build CUDA kernels).
        name: the device's name, for the plan line.
    """

    device_type: str
    bf16: bool = False
    triton: bool = False
    name: str = ""

    @classmethod
    def probe(cls, device: str | torch.device) -> DeviceCapabilities:
        """Probe ``device`` (no computation, no allocation).

        Args:
            device: a device name such as ``"cuda:0"`` or ``"cpu"`` (not ``"auto"``).

        Returns:
            The device's capabilities.
        """
        dev = torch.device(device)
        if dev.type != "cuda":
            return cls(dev.type, name=dev.type)
        import importlib.util

        bf16 = bool(torch.cuda.is_bf16_supported(including_emulation=False))
        return cls(
            "cuda",
            bf16=bf16,
            triton=importlib.util.find_spec("triton") is not None,
            name=torch.cuda.get_device_name(dev),
        )


def resolve_auto(
    cfg: TrainConfig, device: str | torch.device | None = None, *, capabilities: DeviceCapabilities | None = None
) -> tuple[TrainConfig, list[str]]:
    """Replace ``"auto"`` in ``dtype``, ``compile`` and ``tf32`` by the fastest safe choice for a device.

    The one place flm decides its per-device defaults (explicit values are kept as they are):

    - CUDA with native bf16 (compute capability ≥ 8.0): bf16 mixed precision, ``torch.compile``
      of the whole step if triton imports (else eager, and the reason says so), TF32 for the
      float32 matmuls that remain (the optimiser's are elementwise; the loss and norms run in
      float32 by design). On an H200 this is 6.7× the float32 eager step (``bench/``).
    - CUDA without native bf16: float32, compiled if triton imports, TF32 off (pre-Ampere GPUs
      have no TF32).
    - CPU: float32 eager, which measured fastest at the cpu-small preset on a 2-core CPU
      (compile there was no faster once its first call is counted; see ``bench/results``).
    - MPS and other devices: float32 eager (not measured).

    Args:
        cfg: the settings; fields that are not ``"auto"`` are kept.
        device: where the run trains (default: ``cfg.resolved_device()``).
        capabilities: the device's capabilities (default: :meth:`DeviceCapabilities.probe`);
            tests pass a fake one to check the CUDA logic on a CPU machine.

    Returns:
        ``(resolved config, reasons)``: ``reasons`` has one line per field that was ``"auto"``
        (what was chosen and why), for the plan and ``config.json``.
    """
    caps = capabilities or DeviceCapabilities.probe(device if device is not None else cfg.resolved_device())
    cuda = caps.device_type == "cuda"
    changes: dict[str, Any] = {}
    reasons: list[str] = []
    if cfg.dtype == "auto":
        changes["dtype"] = "bf16" if cuda and caps.bf16 else "float32"
        why = (
            "a CUDA GPU with native bf16"
            if changes["dtype"] == "bf16"
            else ("this GPU has no native bf16" if cuda else f"the fastest measured on {caps.device_type}")
        )
        if caps.device_type not in ("cuda", "cpu"):
            why = f"{caps.device_type}: not measured"
        reasons.append(f"dtype {changes['dtype']} ({why})")
    if cfg.compile == "auto" and cfg.shard:
        changes["compile"] = False
        reasons.append("compile off (the sharded step is not compiled yet)")
    elif cfg.compile == "auto":
        changes["compile"] = cuda and caps.triton
        if cuda:
            why = (
                "CUDA with triton"
                if caps.triton
                else "triton does not import here, so inductor cannot build GPU kernels"
            )
        elif caps.device_type == "cpu":
            why = "on a CPU the compile time outweighs its gain at these sizes"
        else:
            why = f"{caps.device_type}: not measured"
        reasons.append(f"compile {'on' if changes['compile'] else 'off'} ({why})")
    if cfg.tf32 == "auto":
        changes["tf32"] = cuda and caps.bf16  # TF32 tensor cores arrived with bf16 (Ampere)
        if cuda:
            reasons.append(f"tf32 {'on' if changes['tf32'] else 'off'} for float32 matmuls")
    return (dataclasses.replace(cfg, **changes) if changes else cfg), reasons


def compile_mode_problem(cfg: TrainConfig, device_type: str) -> str | None:
    """Why ``cfg.compile_mode`` cannot apply to a run on ``device_type``, or ``None`` when it can.

    Checked once ``"auto"`` is resolved (a mode needs the step compiled) and the device known:
    ``reduce-overhead`` is CUDA graphs and nothing else, so off CUDA it would silently be the
    default mode; ``max-autotune`` also tunes kernels on a CPU, so it is allowed there.

    Args:
        cfg: the resolved settings.
        device_type: ``torch.device(...).type`` of the run, e.g. ``"cuda"`` or ``"cpu"``.

    Returns:
        A sentence for an error message, or ``None``.
    """
    mode = cfg.compile_mode
    if mode == "default":
        return None
    if cfg.compile is not True:
        return f"compile_mode {mode!r} needs the step compiled, but compile is off for this run; add --compile"
    if mode == "reduce-overhead" and device_type != "cuda":
        return f"compile_mode 'reduce-overhead' is CUDA graphs, which need a CUDA device; this run is on {device_type}"
    return None


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """Let float32 matmuls use TensorFloat-32 inside the block; restore the previous setting after.

    A training run switches it on for its own duration only, never at import, so a library
    user's float32 results elsewhere do not change.

    Args:
        enabled: ``True`` selects ``torch.set_float32_matmul_precision("high")``; ``False`` leaves
            the current setting alone.

    Source: ``torch.set_float32_matmul_precision``.
    """
    if not enabled:
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def decay_mask(params: PyTree) -> PyTree:
    """Weight-decay mask: decay matrices (ndim ≥ 2), not RMSNorm gains (ndim 1)."""
    return tree_map(lambda p: p.dim() >= 2, params)


def make_optimizer(
    cfg: TrainConfig, *, inplace: bool = False, norm_fn: Callable[[PyTree], torch.Tensor] | None = None
) -> optim.GradientTransformation:
    """The handout's optimiser: global-norm clipping → AdamW on a warm-up + cosine schedule.

    Args:
        cfg: the run's settings (lr, min_lr, warmup_iters, max_iters, betas, eps, weight_decay,
            grad_clip).
        inplace: donate the gradients and the optimiser state to the update (clipping scales the
            gradients in place, AdamW writes its moments in place): what a training loop that owns
            them uses; the default stays pure.
        norm_fn: the clipping's global norm (see :func:`flm.optim.clip_by_global_norm`; sharded
            training passes the norm over every rank's shard).

    Returns:
        ``chain(clip_by_global_norm(grad_clip), adamw(...))`` (no clipping when ``grad_clip`` is 0).
        With ``compile=True`` and ``compile_scope="blocks"`` AdamW runs its compiled per-leaf
        kernel (``adamw(kernel="compiled")``: the update is compiled once, not per layer, as the
        block is); the whole-step compile fuses the update into the step itself.

    Source: handout §4.3–4.5, §7.2.
    """
    schedule = optim.cosine_schedule(cfg.lr, cfg.min_lr, cfg.warmup_iters, cfg.max_iters)
    kernel = "compiled" if cfg.compile is True and cfg.compile_scope == "blocks" else "foreach"
    adam = optim.adamw(
        schedule,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
        inplace=inplace,
        kernel=kernel,
    )
    if cfg.grad_clip > 0:
        return optim.chain(optim.clip_by_global_norm(cfg.grad_clip, inplace=inplace, norm_fn=norm_fn), adam)
    return adam
