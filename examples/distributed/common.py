"""What the torchrun examples share: process-group set-up, a model and synthetic data."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def setup() -> tuple[int, int, torch.device]:
    """Initialise the default process group (NCCL on GPUs, gloo on the CPU)."""
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return rank, world, torch.device("cuda", local_rank)
    return rank, world, torch.device("cpu")


def make_model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)  # identical initial weights on every rank
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    ).to(device)


def batch(step: int, shard: int, shards: int, device: torch.device, size: int = 64):
    """Batch ``step`` of a synthetic task, cut into ``shards`` pieces; piece ``shard``."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(size, 3, 16, 16, generator=gen)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0].mean(dim=(1, 2)) > 0).long()
    n = size // shards
    return x[shard * n:(shard + 1) * n].to(device), y[shard * n:(shard + 1) * n].to(device)
