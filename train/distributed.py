"""Process-group setup and the few collectives the trainer needs.

Works the same under `torchrun`, `deepspeed` and `accelerate launch` (they all export RANK /
WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT) and as a plain single process. On a machine
without CUDA, DeepSpeed runs on its CPU accelerator with gloo. Every collective has a timeout, so a
rank that hangs turns into a failure instead of a stuck job.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_cpu_accelerator_if_needed() -> None:
    """DeepSpeed picks its accelerator at import time; on a CPU-only machine that must be `cpu`."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_distributed(timeout_s: int = 600) -> DistInfo:
    use_cpu_accelerator_if_needed()
    if "RANK" not in os.environ:  # a plain `mllm train`: a world of one
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if not dist.is_initialized():
        import deepspeed

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s),
                                   verbose=False)
    world = dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", world)))
    info = DistInfo(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", 0)), local_world)
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    return info


def all_reduce(value: float, op: str = "sum") -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    if torch.cuda.is_available() and dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return float(tensor.item())


def all_reduce_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a (small) tensor over ranks; returns a CPU float64 copy."""
    out = tensor.detach().double().cpu()
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return out
    if dist.get_backend() == "nccl":
        out = out.cuda()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.cpu()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def shutdown(clean: bool = True) -> None:
    """Tear the process group down before exit: a live gloo group's threads can abort the interpreter at
    shutdown ("terminate called without an active exception"), turning a finished run into a failure.
    After an error (`clean=False`) there is no barrier: the other ranks may never reach it."""
    if dist.is_initialized():
        if clean and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]
