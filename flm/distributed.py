"""Data parallelism on ``torch.distributed``: each rank its own batches, gradients averaged.

Run under ``torchrun --nproc_per_node N …``: :func:`init_from_env` joins the process group (NCCL on
CUDA, gloo on CPU), :func:`all_reduce_mean` averages a gradient pytree over ranks in flattened
buckets (one collective per bucket instead of one per leaf). Every rank initialises the same
parameters from the same seed, so no broadcast is needed. The train step takes the all-reduce as its
``grad_reduce`` hook, so the optimiser sees the same averaged gradient on every rank and the
replicas stay identical without ever exchanging parameters.

Source: Li et al. (2020), "PyTorch Distributed: Experiences on Accelerating Data Parallel
Training" (gradient bucketing); handout §7.5.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optree
import torch
import torch.distributed as dist

from flm import _compat  # noqa: F401  (before any init_process_group: see _compat._UNPIN_DEFAULT_GROUP)

__all__ = [
    "DistInfo",
    "init_from_env",
    "all_reduce_mean",
    "all_gather_bytes",
    "barrier",
    "shutdown",
    "directory_owners",
    "node_count",
    "check_same",
]

PyTree = Any
DEFAULT_BUCKET_BYTES = 25 * 2**20


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank (0 logs, evaluates and writes checkpoints).
        world_size: number of processes.
        local_rank: rank on this machine (selects the GPU).
        device: this rank's device.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """True on rank 0."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1


def init_from_env(device: str | None = None, backend: str | None = None) -> DistInfo:
    """Join the process group described by torchrun's environment (or run single-process).

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``). With
    ``WORLD_SIZE`` unset or 1 nothing is initialised.

    Args:
        device: ``"cuda"`` (each rank takes ``cuda:LOCAL_RANK``), ``"cpu"``, … (default: CUDA if
            available, else CPU).
        backend: ``"nccl"`` or ``"gloo"`` (default: NCCL for CUDA, gloo otherwise).

    Returns:
        This process's :class:`DistInfo`.

    Raises:
        ValueError: for an inconsistent environment (rank ≥ world size).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world <= 1:
        return DistInfo(0, 1, 0, device)
    if not 0 <= rank < world:
        raise ValueError(f"distributed: RANK={rank} is outside WORLD_SIZE={world}")
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    backend = backend or ("nccl" if device.startswith("cuda") else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local, device)


def shutdown() -> None:
    """Leave the process group (no-op when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op single-process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(tree: PyTree, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> PyTree:
    """Average a tree of tensors over all ranks, in flattened buckets.

    Leaves are grouped by dtype and packed into contiguous buckets of about ``bucket_bytes``;
    each bucket is summed with one ``all_reduce`` and divided by the world size, then unpacked.
    The input tree is not modified. Without a process group the tree is returned unchanged.

    Args:
        tree: e.g. the gradients, same structure and shapes on every rank.
        bucket_bytes: target bucket size.

    Returns:
        A tree of the same structure holding the averages.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tree
    world = dist.get_world_size()
    leaves, spec = optree.tree_flatten(tree, namespace="")
    out: list[torch.Tensor | None] = [None] * len(leaves)
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(leaves):
        groups.setdefault((t.dtype, t.device), []).append(i)
    for idx in groups.values():
        bucket: list[int] = []
        size = 0
        for j, i in enumerate(idx):
            bucket.append(i)
            size += leaves[i].numel() * leaves[i].element_size()
            if size >= bucket_bytes or j == len(idx) - 1:
                flat = torch.cat([leaves[k].reshape(-1) for k in bucket])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                flat.div_(world)
                offset = 0
                for k in bucket:
                    n = leaves[k].numel()
                    out[k] = flat[offset : offset + n].view_as(leaves[k])
                    offset += n
                bucket, size = [], 0
    return optree.tree_unflatten(spec, out)


def all_gather_bytes(data: torch.Tensor) -> list[torch.Tensor]:
    """Gather a same-sized uint8 tensor (e.g. a generator state) from every rank, in rank order."""
    if not (dist.is_available() and dist.is_initialized()):
        return [data]
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    local = data.to(backend_device)
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return [p.cpu() for p in parts]


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def directory_owners(directory: str | os.PathLike[str]) -> list[int]:
    """For every rank, the lowest rank that sees the same ``directory`` as it does (a collective).

    Ranks of several nodes may name one path that is one shared directory (a network file
    system) or a node-local directory on each machine; a path or ``st_dev``/``st_ino`` comparison
    cannot tell them apart across machines. So every rank creates a probe file
    ``.flm-probe.<nonce>-<rank>.tmp`` in its ``directory`` (the nonce drawn by rank 0, shared
    with the others), and looks for every rank's probe in its own: two ranks whose directories are
    one location see each other's probes. The probes are removed before returning (one left by a
    killed process is a temporary name that :func:`flm._io.remove_orphan_temps` clears). Probe
    names are new, so a network file system's cache of earlier lookups does not hide them.

    Args:
        directory: this rank's directory (created if missing), e.g. the run directory.

    Returns:
        ``owners`` of length world size: ``owners[r]`` is the lowest rank whose directory is rank
        ``r``'s; rank ``r`` alone writes a directory iff ``owners[r] == r``. ``[0]`` without a
        process group.

    Raises:
        OSError: the directory cannot be created or written.
    """
    if not _initialized():
        return [0]
    rank, world = dist.get_rank(), dist.get_world_size()
    seed = torch.frombuffer(bytearray(os.urandom(8)), dtype=torch.uint8)
    nonce = all_gather_bytes(seed)[0].numpy().tobytes().hex()  # rank 0's
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    mine = d / f".flm-probe.{nonce}-{rank}.tmp"
    mine.touch(exist_ok=False)
    try:
        barrier()  # every probe exists before any rank looks
        seen = torch.tensor([(d / f".flm-probe.{nonce}-{r}.tmp").exists() for r in range(world)], dtype=torch.uint8)
        rows = all_gather_bytes(seen)  # also: no probe is removed before every rank has looked
    finally:
        mine.unlink(missing_ok=True)
    return [int(row.nonzero()[0, 0]) for row in rows]


def node_count() -> int:
    """The number of nodes in the job: ranks with ``LOCAL_RANK`` 0 (a collective; 1 without a process group)."""
    if not _initialized():
        return 1
    first = torch.tensor([int(os.environ.get("LOCAL_RANK", "0")) == 0], dtype=torch.uint8)
    return int(sum(int(p[0]) for p in all_gather_bytes(first)))


def check_same(value: str, what: str) -> None:
    """Raise unless ``value`` is the same on every rank (a collective; its SHA-256 is exchanged).

    Args:
        value: e.g. a tokenizer fingerprint and the token counts, as one string.
        what: what it describes, for the message.

    Raises:
        ValueError: ranks disagree; names the ranks that differ from rank 0.
    """
    if not _initialized():
        return
    digest = torch.frombuffer(bytearray(hashlib.sha256(value.encode()).digest()), dtype=torch.uint8)
    parts = all_gather_bytes(digest)
    differ = [r for r, p in enumerate(parts) if not torch.equal(p, parts[0])]
    if differ:
        raise ValueError(
            f"distributed: {what} differs between rank 0 and rank(s) {', '.join(map(str, differ))}: "
            "every node must train on the same data (same texts, --train-bytes and --vocab-size)"
        )
