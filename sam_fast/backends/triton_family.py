"""The ``triton`` backend of the SAM family's generic ops (kernels/family.py).

Same contract as :mod:`.triton_backend`: each function receives one (device, dtype)
group with the signature and meaning of its namesake in :mod:`.torch_family`; fp64
groups, and the positions the kernels cannot address as one dense run, go to the
torch specification, the rest runs in one launch. Registered by the block at the end
of :mod:`.triton_backend`.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import Tensor

from . import torch_family
from . import triton_backend as tb
from .torch_ops import TensorList

family: Any = None
if tb.kernels is not None:
    family = importlib.import_module("sam_fast.kernels.family")


def _flag(t: Tensor | None, device: torch.device) -> Tensor | None:
    """A skip flag as a 0-dim fp32 device tensor (0: do the step)."""
    if t is None:
        return None
    t = tb._on(t, device)
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def dot_sumsq(a: TensorList, b: TensorList) -> Tensor:
    """``[<a, b>, |a|^2, |b|^2]`` (3 fp32), deterministic: per-block partials, one ordered pass."""
    if len(a) == 0:
        raise ValueError("dot_sumsq needs at least one tensor")
    if tb._delegated(a[0]):
        return torch_family.dot_sumsq(a, b)
    plan, table = tb._plan([a, b])
    device = a[0].device
    total = None
    if table is not None:
        with tb._guard(device):
            total = family.dot_sumsq(table, tb._TL_DTYPE[a[0].dtype])
    if plan.other:
        rest = torch_family.dot_sumsq(tb._pick(a, plan.other), tb._pick(b, plan.other))
        total = rest if total is None else total + rest
    if total is None:  # nothing but empty tensors
        total = torch.zeros(3, dtype=torch.float32, device=device)
    return total


def combine_(a: TensorList, b: TensorList, coef: Tensor) -> None:
    """``a <- coef[0] * a + coef[1] * b``, the coefficients read by the kernel."""
    if len(a) == 0:
        return
    if tb._delegated(a[0]):
        return torch_family.combine_(a, b, coef)
    device = a[0].device
    coef = tb._on(coef, device)
    if coef.dtype != torch.float32:
        coef = coef.to(torch.float32)
    plan, table = tb._plan([a, b])
    if plan.other:
        torch_family.combine_(tb._pick(a, plan.other), tb._pick(b, plan.other), coef)
    if table is not None:
        with tb._guard(device):
            family.combine(table, tb._TL_DTYPE[a[0].dtype], coef.contiguous())


def ema_residual_(
    m: TensorList,
    g: TensorList,
    *,
    decay: float,
    sigma: float,
    updated: bool = True,
    grad_scale: Tensor | None = None,
    skip: Tensor | None = None,
) -> Tensor:
    """The running average, its residual written into ``g`` and ``|g|^2``, in one pass."""
    if len(m) == 0:
        raise ValueError("ema_residual_ needs at least one tensor")
    if tb._delegated(m[0]):
        return torch_family.ema_residual_(m, g, decay=decay, sigma=sigma, updated=updated,
                                          grad_scale=grad_scale, skip=skip)
    device = m[0].device
    grad_scale, skip = tb._on_opt(grad_scale, device), _flag(skip, device)
    plan, table = tb._plan([m, g])
    total = None
    if plan.other:
        total = torch_family.ema_residual_(
            tb._pick(m, plan.other), tb._pick(g, plan.other), decay=decay, sigma=sigma,
            updated=updated, grad_scale=grad_scale, skip=skip)
    if table is not None:
        with tb._guard(device):
            part = family.ema_residual(table, tb._TL_DTYPE[m[0].dtype], decay=decay,
                                       sigma=sigma, updated=updated, grad_scale=grad_scale,
                                       skip=skip)
        total = part if total is None else total + part
    if total is None:  # nothing but empty tensors
        total = torch.zeros((), dtype=torch.float32, device=device)
        if skip is not None:
            total = torch.where(skip != 0, torch.full_like(total, float("nan")), total)
    return total


OPS = {
    "dot_sumsq": dot_sumsq,
    "combine_": combine_,
    "ema_residual_": ema_residual_,
}
