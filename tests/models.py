"""Small deterministic models and data for the optimizer tests."""

from __future__ import annotations

import torch
from torch import nn


def small_cnn(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A CNN with BatchNorm (running statistics, affine params) and a linear head.

    Convolutions before BatchNorm carry no bias, as in ResNets: such a bias has an
    exactly-zero gradient, and Adam would turn its rounding noise into steps.

    The activation is SiLU, not ReLU: the tests compare float32 trajectories with
    each other and with a float64 oracle, which presumes a loss that is smooth along
    the path. With ReLU, a pre-activation passing within float32 rounding of zero
    (8e-8 at the perturbed point of step 7 of test_sam's AdamW case) gets a sign that
    depends on the CPU's kernels and thread count, the gradient jumps, and the run
    lands 4e-2 from the oracle on some machines and 8e-7 on others (one in eight
    1-ulp perturbations of the initial weights did it). A smooth loss makes the
    float32 error a continuous function of the rounding noise, so a bar measured on
    one machine holds on another.
    """
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.SiLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 5),
    )
    return model.to(dtype)


def batches(n: int, seed: int = 1, batch_size: int = 8, dtype: torch.dtype = torch.float32):
    """``n`` fixed (input, target) batches of 8x8 RGB images and 5 classes."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(batch_size, 3, 8, 8, generator=gen).to(dtype)
        y = torch.randint(0, 5, (batch_size,), generator=gen)
        out.append((x, y))
    return out


def loss_of(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def make_closure(model: nn.Module, batch):
    """A closure computing the loss on ``batch`` and its gradients (accumulated)."""

    def closure():
        loss = loss_of(model, batch)
        loss.backward()
        return loss

    return closure


def small_convnet(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Like :func:`small_cnn` without BatchNorm, whose batch statistics would make a
    data-parallel run differ from a single process on the concatenated batch (SiLU for
    the same reason as there)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1),
        nn.SiLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 5),
    )
    return model.to(dtype)
