"""The torch specification of BSAM's three ops (schemas: :mod:`sam_fast.bsam_ops`): the
``torch`` backend's implementation of each, and the executable definition every kernel
matches (the C++ and CUDA kernels bit for bit, per-element math in csrc/bsam.h; the
Triton kernels to rounding, see kernels/bsam.py). One (device, dtype) group per call;
math in fp32 whatever the storage dtype, fp64 for fp64; ``noise`` is the fp32 draw.

The square roots are ``torch.sqrt``'s: correctly rounded on CUDA, within an ulp on the
CPU (ATen calls a vector math library there), which the CPU kernels reproduce by taking
their roots from ATen's sqrt too (csrc/cpu/ops_cpu.cpp)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .torch_ops import TensorList, _math_dtype, _widen

__all__ = ["bsam_noise_", "bsam_ascent_", "bsam_update_", "OPS"]



def _flag(skip: Tensor | None, device: torch.device) -> Tensor | None:
    return None if skip is None else skip.to(device=device, non_blocking=True) != 0


def _commit(dst: TensorList, new: list[Tensor], flag: Tensor | None) -> None:
    if flag is None:
        torch._foreach_copy_(list(dst), new)
        return
    for d, n in zip(dst, new):
        d.copy_(torch.where(flag, d, n.to(d.dtype)))


def bsam_noise_(params: TensorList, backups: TensorList, noise: TensorList, s: TensorList,
                num_data: float) -> None:
    """``backup <- w``; ``w <- w + z * sqrt(1 / (num_data * s))`` (``z`` fp32)."""
    if len(params) == 0:
        return
    torch._foreach_copy_(list(backups), list(params))
    math = _math_dtype(params[0].dtype)
    sigma = torch._foreach_sqrt(torch._foreach_reciprocal(torch._foreach_mul(_widen(s),
                                                                             num_data)))
    z = [t if t.dtype == math else t.to(math) for t in noise]
    new = torch._foreach_add(_widen(params), torch._foreach_mul(z, sigma))
    torch._foreach_copy_(list(params), new)


def bsam_ascent_(params: TensorList, backups: TensorList, grads: TensorList, s: TensorList,
                 gs: TensorList, rho: float, grad_scale: Tensor | None = None,
                 skip: Tensor | None = None) -> None:
    """``w <- backup + rho g / s``, ``gs <- sqrt(s) |g|`` with ``g = grads / grad_scale``;
    where ``skip``: ``w <- backup``, ``gs <- 0``."""
    if len(params) == 0:
        return
    device, math = params[0].device, _math_dtype(params[0].dtype)
    g = _widen(grads)
    if grad_scale is not None:
        g = torch._foreach_mul(g, torch.reciprocal(grad_scale.to(device=device, dtype=math)))
    sd = _widen(s)
    w = torch._foreach_add(_widen(backups), torch._foreach_div(torch._foreach_mul(g, rho), sd))
    curv = torch._foreach_mul(torch._foreach_sqrt(sd), torch._foreach_abs(g))
    flag = _flag(skip, device)
    if flag is None:
        torch._foreach_copy_(list(params), w)
        torch._foreach_copy_(list(gs), curv)
        return
    for p, b, new in zip(params, backups, w):
        p.copy_(torch.where(flag, b, new.to(p.dtype)))
    for dst, c in zip(gs, curv):
        dst.copy_(torch.where(flag, torch.zeros_like(dst), c.to(dst.dtype)))


def bsam_update_(params: TensorList, backups: TensorList, grads: TensorList, m: TensorList,
                 s: TensorList, gs: TensorList, lr: float, beta1: float, beta2: float,
                 weight_decay: float, damping: float, new_s: bool,
                 grad_scale: Tensor | None = None, skip: Tensor | None = None) -> None:
    """``m <- b1 m + (1 - b1)(g + wd w0)``; ``s' = b2 s + (1 - b2)(gs + damping + wd)``;
    ``w <- w0 - lr m / (s' if new_s else s)``; ``s <- s'`` (``w0 = backup``,
    ``g = grads / grad_scale``). Where ``skip``: ``w <- w0``, ``m`` and ``s`` untouched."""
    if len(params) == 0:
        return
    device, math = params[0].device, _math_dtype(params[0].dtype)
    g = _widen(grads)
    if grad_scale is not None:
        g = torch._foreach_mul(g, torch.reciprocal(grad_scale.to(device=device, dtype=math)))
    w0 = _widen(backups)
    d = torch._foreach_add(g, torch._foreach_mul(w0, weight_decay))
    m_new = torch._foreach_add(torch._foreach_mul(_widen(m), beta1),
                               torch._foreach_mul(d, 1.0 - beta1))
    s_old = _widen(s)
    s_new = torch._foreach_add(torch._foreach_mul(s_old, beta2), torch._foreach_mul(
        torch._foreach_add(_widen(gs), damping + weight_decay), 1.0 - beta2))
    step = torch._foreach_div(m_new, s_new if new_s else s_old)
    w = torch._foreach_sub(w0, torch._foreach_mul(step, lr))
    flag = _flag(skip, device)
    if flag is None:
        torch._foreach_copy_(list(params), w)
        torch._foreach_copy_(list(m), m_new)
        torch._foreach_copy_(list(s), s_new)
        return
    for p, b, new in zip(params, backups, w):
        p.copy_(torch.where(flag, b, new.to(p.dtype)))
    _commit(m, m_new, flag)
    _commit(s, s_new, flag)


OPS: dict[str, Callable] = {
    "bsam_noise_": bsam_noise_,
    "bsam_ascent_": bsam_ascent_,
    "bsam_update_": bsam_update_,
}
