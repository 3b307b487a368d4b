"""The processes of a training run: joining the torchrun world (gloo on CPU, nccl on CUDA) and the few collectives
the loop needs. Nothing here knows about models or data."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if torch.distributed.is_initialized() and self.world_size > 1:
            torch.distributed.barrier()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> Dist:
    """Join the torchrun world (or make a world of one), gloo on CPU and nccl on CUDA."""
    import colossalai

    if "RANK" not in os.environ:  # plain `python -m training.train`: a world of one
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"})
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    cuda = torch.cuda.is_available()
    if not torch.distributed.is_initialized():
        colossalai.launch_from_torch(backend="nccl" if cuda else "gloo", verbose=False)
    local_rank = int(os.environ["LOCAL_RANK"])
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), local_rank, device)


def broadcast_object(obj: Any, dist: Dist) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if dist.world_size > 1:
        holder = [obj]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]
    return obj


def all_ranks(ok: bool, dist: Dist) -> bool:
    """True when ``ok`` holds on every rank."""
    if dist.world_size > 1:
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=dist.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag.item())
    return ok
