"""``flm train``'s memory check: the peak memory one rank's training step needs, estimated from
the run config alone, against what this machine can still allocate, and which setting to change
when it does not fit. The plan refuses a run that cannot fit before it writes or downloads
anything (CPU: available RAM, a container's cgroup limit, ``ulimit -v``; CUDA: free device memory).

Source: :func:`flm.model.training_memory` (handout §4.4 accounting).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from flm.cli.common import UsageError, format_bytes
from flm.config import RunConfig

__all__ = ["available_memory", "step_memory", "memory_driver", "check_memory"]


def available_memory(device: str) -> tuple[int, str] | None:
    """What this process can still allocate on ``device``, and what limits it.

    On the CPU the least of: the available RAM (``MemAvailable``), a container's cgroup memory
    limit less its usage, and an address-space limit (``ulimit -v``) less the address space in
    use. On CUDA the device's free memory.

    Args:
        device: a resolved device string (``cpu``, ``cuda:0``, …).

    Returns:
        ``(bytes, what limits it)``, or ``None`` where unknown (e.g. MPS, a system without ``/proc``).
    """
    import resource

    dev = torch.device(device)
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return int(free), f"free memory on {torch.cuda.get_device_name(dev)}"
    if dev.type != "cpu":
        return None

    def read_int(path: str, key: str | None = None) -> int | None:
        try:
            text = Path(path).read_text()
        except OSError:
            return None
        if key is None:
            text = text.strip()
            return int(text) if text.isdigit() else None
        for line in text.splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
        return None

    limits = []
    ram = read_int("/proc/meminfo", "MemAvailable")
    if ram is None and hasattr(os, "sysconf"):
        with contextlib.suppress(ValueError, OSError):
            ram = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if ram is not None:
        limits.append((ram, "available RAM"))
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        limit, usage = read_int(limit_file), read_int(usage_file)
        if limit is not None and usage is not None and limit < 1 << 60:
            limits.append((max(limit - usage, 0), "the memory limit of this container (cgroup)"))
            break
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    in_use = read_int("/proc/self/status", "VmSize")
    if soft != resource.RLIM_INFINITY and in_use is not None:
        limits.append((max(soft - in_use, 0), "the address-space limit (ulimit -v)"))
    return min(limits) if limits else None


def step_memory(cfg: RunConfig) -> dict[str, int]:
    """Peak memory of one rank's training step (and of the final evaluation), in bytes.

    :func:`flm.model.training_memory` for one micro-batch (``batch_size / ranks /
    grad_accum_steps`` sequences), without the attention scores when a fused kernel computes them
    (``attention`` other than ``"flm"``), activations at 2 bytes under bf16; at least the final
    evaluation's logits and softmax over a whole ``batch_size``. An estimate from the config alone.

    Args:
        cfg: the resolved run config (``dtype`` not ``"auto"``).

    Returns:
        ``{"state": parameters + gradients + AdamW state, "activations": ..., "total": ...}``.
    """
    from flm.model import training_memory

    m, t = cfg.model, cfg.train
    world = max(int(os.environ.get("WORLD_SIZE", "1") or 1), 1)
    micro = max(-(-t.batch_size // (world * t.grad_accum_steps)), 1)
    mem = training_memory(m, micro)
    s = m.context_length
    scores = 4 * micro * m.num_layers * 2 * m.num_heads * s * s if m.attention != "flm" else 0
    activations = mem["activations"] - scores
    if t.dtype != "auto" and t.compute_dtype is not None:  # "auto" (unresolved): assume float32
        activations //= 2
    evaluation = 4 * -(-t.batch_size // world) * s * (2 * m.vocab_size + 4 * m.d_model)
    state = mem["parameters"] + mem["gradients"] + mem["optimizer_state"]
    total = max(state + activations, mem["parameters"] + evaluation)
    if torch.device(t.device).type == "cpu":  # ranks on one machine share its RAM
        total *= max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1)
    return {"state": state, "activations": activations, "total": total}


_MEMORY_SETTINGS = (
    ("train", "batch_size"),
    ("model", "vocab_size"),
    ("model", "d_model"),
    ("model", "context_length"),
    ("model", "num_layers"),
    ("model", "d_ff"),
    ("model", "num_heads"),
)


def memory_driver(cfg: RunConfig) -> str:
    """Which setting to change when a run does not fit: the one whose value at the preset's would
    shrink :func:`step_memory` the most (at least halve it), else the larger part (activations:
    the batch; parameters and optimiser state: the model's size).

    Returns:
        Advice naming the flag, e.g. ``"--vocab-size 40000000 drives it: lower it"``.
    """
    from flm.cli.args import flag_name
    from flm.config import RunConfig as _RunConfig

    batch_advice = "lower it, or raise --grad-accum-steps to split each step into micro-batches"
    need = step_memory(cfg)
    try:
        base = _RunConfig.resolve(cfg.preset)
    except ValueError:
        base = None
    best, best_ratio = None, 2.0
    for section, name in _MEMORY_SETTINGS if base is not None else ():
        value, default = getattr(getattr(cfg, section), name), getattr(getattr(base, section), name)
        if value == default:
            continue
        try:
            variant = cfg.replace(**{section: {name: default}})
        except (ValueError, TypeError):
            continue
        ratio = need["total"] / max(step_memory(variant)["total"], 1)
        if ratio >= best_ratio:
            best, best_ratio = (section, name, value), ratio
    if best is not None:
        section, name, value = best
        advice = batch_advice if name == "batch_size" else "lower it"
        return f"{flag_name(section, name)} {value} drives it: {advice}"
    if need["activations"] >= need["state"]:
        return f"the activations of --batch-size {cfg.train.batch_size} drive it: {batch_advice}"
    return "the model's parameters and optimiser state drive it: lower --d-model, --num-layers or --vocab-size"


def check_memory(cfg: RunConfig) -> str:
    """Refuse a run whose training step cannot fit this machine's memory (:func:`step_memory`
    against :func:`available_memory`), naming the setting that drives it.

    Args:
        cfg: the resolved run config.

    Returns:
        A plan line: the estimate and what is available.

    Raises:
        UsageError: the estimate exceeds what is available.
    """
    need = step_memory(cfg)
    have = available_memory(cfg.train.device)
    line = f"memory: about {format_bytes(need['total'])} per training step"
    if have is None:
        return line
    if need["total"] > have[0]:
        raise UsageError(
            f"this run needs about {format_bytes(need['total'])} of memory (parameters, gradients and AdamW "
            f"state {format_bytes(need['state'])}; activations {format_bytes(need['activations'])}) but "
            f"{format_bytes(have[0])} is available ({have[1]}); {memory_driver(cfg)}"
        )
    return f"{line} ({format_bytes(have[0])} available)"
