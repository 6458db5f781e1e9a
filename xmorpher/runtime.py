"""Where and how a process runs: its place in a torchrun job, its device and its mixed precision.

Shared by training, registration and evaluation. Only this module talks to ``torch.distributed``;
one process outside torchrun is rank 0 of 1 and every collective here is then a no-op.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import XMorpherError

__all__ = [
    "Distributed",
    "init_distributed",
    "shutdown_distributed",
    "all_gather_objects",
    "all_reduce_sum_",
    "data_parallel",
    "resolve_device",
    "autocast_dtype",
]


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job: rank 0 of 1 when not launched by torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Distributed:
    """Join the torchrun job described by the environment, if any (NCCL on GPUs, gloo on CPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown_distributed() -> None:
    if dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def all_gather_objects(value: Any, dist_info: Distributed) -> List[Any]:
    """Every rank's ``value``, in rank order (a collective: all ranks call it together)."""
    if dist_info.world == 1:
        return [value]
    values: List[Any] = [None] * dist_info.world
    dist.all_gather_object(values, value)
    return values


def all_reduce_sum_(tensor: torch.Tensor, dist_info: Distributed) -> torch.Tensor:
    """Sum ``tensor`` over the ranks, in place (a collective)."""
    if dist_info.world > 1:
        dist.all_reduce(tensor)
    return tensor


def data_parallel(model: nn.Module, device: torch.device, dist_info: Distributed) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel in a job of several processes, else itself."""
    if dist_info.world == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: this process's GPU (``cuda:local_rank``) when CUDA is available, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise XMorpherError(f"device '{name}' requested but CUDA is not available")
    return device


def autocast_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """Mixed precision on CUDA only: bf16 where supported, else fp16 (with a grad scaler)."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
