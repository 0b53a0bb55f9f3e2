"""BSAM's three fused elementwise ops (Moellenhoff & Khan, ICLR 2023, Algorithm 1; see
docs/family.md), one pass each, multi-tensor over one (device, dtype) group:

- :func:`bsam_noise_` -- ``backup <- w``; ``w <- w + z * sqrt(1 / (N s))`` (``z`` the
  standard normal draw, fp32): the noisy point of the first pass;
- :func:`bsam_ascent_` -- ``w <- backup + rho g / s`` and ``gs <- sqrt(s) |g|``, ``g`` the
  gradient at the noisy point (unscaled by ``grad_scale``): the ascent of the second pass,
  and the curvature term the update needs later;
- :func:`bsam_update_` -- from ``w0 = backup`` and the gradient ``g`` at ``w0 + e``:
  ``m <- b1 m + (1 - b1)(g + wd w0)``, ``s' = b2 s + (1 - b2)(gs + damping + wd)``,
  ``w <- w0 - lr m / s'`` (``new_s``; the previous ``s`` otherwise, the authors' code),
  ``s <- s'``.

Same contract as docs/design.md section 3: fp32 math whatever the storage dtype (fp64 for
fp64), no host sync, device scalars stay on the device; a ``skip`` flag (0-dim device
tensor, non-zero: skip) makes the ascent a plain restore with ``gs = 0`` and the update a
plain restore with ``m`` and ``s`` untouched (GradScaler found inf/NaN).

The schemas are registered with ``torch.library`` in the ``sam_fast`` namespace
(``torch.ops.sam_fast.bsam_update_`` ...) with the torch specification below as the
``CompositeExplicitAutograd`` kernel and fake implementations. The module routes itself
(:func:`impl`): the ``triton`` backend's kernels (kernels/bsam.py) for fp32 groups on a
backend that resolves to ``triton``; the torch specification for everything else (the
compiled ``cpp``/``cuda`` backends have no kernels for these ops yet), so
:mod:`sam_fast.dispatch` needs no entry for them.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from . import dispatch
from .backends.torch_ops import TensorList, _math_dtype, _widen

__all__ = ["bsam_noise_", "bsam_ascent_", "bsam_update_", "impl", "OP_NAMES"]

OP_NAMES = ("bsam_noise_", "bsam_ascent_", "bsam_update_")

# -- the torch specification ------------------------------------------------------------------


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


SPEC: dict[str, Callable] = {
    "bsam_noise_": bsam_noise_,
    "bsam_ascent_": bsam_ascent_,
    "bsam_update_": bsam_update_,
}

# -- schemas ------------------------------------------------------------------------------------

_LIB = torch.library.Library("sam_fast", "FRAGMENT")
_LIB.define("bsam_noise_(Tensor(a!)[] params, Tensor(b!)[] backups, Tensor[] noise, "
            "Tensor[] s, float num_data) -> ()")
_LIB.define("bsam_ascent_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, Tensor[] s, "
            "Tensor(b!)[] gs, float rho, Tensor? grad_scale, Tensor? skip) -> ()")
_LIB.define("bsam_update_(Tensor(a!)[] params, Tensor[] backups, Tensor[] grads, "
            "Tensor(b!)[] m, Tensor(c!)[] s, Tensor[] gs, float lr, float beta1, float beta2, "
            "float weight_decay, float damping, bool new_s, Tensor? grad_scale, "
            "Tensor? skip) -> ()")
for _name, _fn in SPEC.items():
    _LIB.impl(_name, _fn, "CompositeExplicitAutograd")


@torch.library.register_fake("sam_fast::bsam_noise_")
def _noise_fake(params, backups, noise, s, num_data) -> None:
    return None


@torch.library.register_fake("sam_fast::bsam_ascent_")
def _ascent_fake(params, backups, grads, s, gs, rho, grad_scale, skip) -> None:
    return None


@torch.library.register_fake("sam_fast::bsam_update_")
def _update_fake(params, backups, grads, m, s, gs, lr, beta1, beta2, weight_decay, damping,
                 new_s, grad_scale, skip) -> None:
    return None


# -- routing ------------------------------------------------------------------------------------

_TRITON: dict[str, Callable] | None = None


def _triton_ops() -> dict[str, Callable]:
    global _TRITON
    if _TRITON is None:
        try:
            from .backends import triton_bsam
            _TRITON = dict(triton_bsam.OPS) if triton_bsam.available() else {}
        except ImportError:
            _TRITON = {}
    return _TRITON


def impl(op: str, backend: str, device: torch.device) -> Callable:
    """The implementation of BSAM op ``op`` for one group on ``device``: the ``triton``
    kernels where ``backend`` resolves to ``triton`` there, else the torch specification
    (``cpp`` and ``cuda``, which have no kernels for these ops yet, included)."""
    if dispatch.resolve(backend, device) == "triton":
        fn = _triton_ops().get(op)
        if fn is not None:
            return fn
    return SPEC[op]
