"""torchrun support: process group setup, rank helpers, exact gathers."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, List

import torch
import torch.distributed as dist


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes (gloo on CPU, NCCL on GPU); False when not launched so."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return True


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """One GPU per process: cuda:LOCAL_RANK."""
    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def gather_objects(obj: Any) -> List[Any]:
    """Every rank's object, in rank order (on every rank)."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


@contextlib.contextmanager
def session(device: torch.device) -> Iterator[torch.device]:
    """A command's run under torchrun or alone: join the process group if launched so, yield this
    process's device (cuda:LOCAL_RANK), leave the group at the end."""
    joined = init_from_env(device)
    try:
        yield local_device(device)
    finally:
        if joined:
            shutdown()
