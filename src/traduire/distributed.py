"""Data parallelism through torch.distributed, started by `torchrun`.

A process started by torchrun finds RANK, WORLD_SIZE and LOCAL_RANK in its environment; without
them traduire runs as a single process and every helper here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init(device_kind: str) -> Context:
    """Join the process group if started by torchrun: NCCL on GPUs, gloo on CPU."""
    if "RANK" not in os.environ or dist.is_initialized():
        return current()
    backend = "nccl" if device_kind == "cuda" else "gloo"
    # A short timeout turns a rank that died into an error on the others, not a long hang.
    timeout = timedelta(seconds=float(os.environ.get("TRADUIRE_DIST_TIMEOUT", "600")))
    device_id = None
    if backend == "nccl":
        device_id = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device_id)
    # device_id binds the rank to its GPU up front (NCCL otherwise guesses from the rank).
    dist.init_process_group(backend, timeout=timeout, device_id=device_id)
    return current()


def current() -> Context:
    if not dist.is_available() or not dist.is_initialized():
        return Context()
    return Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's decision, seen by every rank (so all stop at the same step)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def broadcast_value(value: float, device: torch.device) -> float:
    """Rank 0's value, seen by every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return t.item()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
