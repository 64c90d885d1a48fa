"""Joining a ``torchrun`` launch: the one place that turns torchrun's environment into a process group.

``join_from_env(device)`` does nothing in a single process (WORLD_SIZE unset or 1) or when a group
already exists (tests, embedding applications); under torchrun it takes the rank's own GPU when the
device is CUDA (``cuda:LOCAL_RANK``) and joins with NCCL, or with gloo on the CPU. It returns the
rank, the world size, the device to use and whether it created the group (then ``leave()`` it).

Boundaries: process-group setup only; what each rank computes is the caller's
(``spiral_rt.world.grpo``, ``spiral-rt train-grpo``); gradient averaging is ``GRPOTrainer``'s DDP.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Launch:
    rank: int
    world_size: int
    device: str
    owns_group: bool

    def leave(self) -> None:
        """Destroy the process group if ``join_from_env`` created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def join_from_env(device: str) -> Launch:
    """(rank, world size, device, created) for this process (module docstring)."""
    if dist.is_available() and dist.is_initialized():
        return Launch(dist.get_rank(), dist.get_world_size(), device, False)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Launch(0, 1, device, False)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if cuda else "gloo")
    return Launch(dist.get_rank(), dist.get_world_size(), device, True)
