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
plain restore with ``m`` and ``s`` untouched (GradScaler found inf/NaN). ``noise`` is fp32
whatever the group's dtype (the optimizer draws one fp32 ``normal_`` per device).

The schemas are registered here with ``torch.library`` in the ``sam_fast`` namespace
(``torch.ops.sam_fast.bsam_update_`` ...), with the torch specification
(:mod:`sam_fast.backends.torch_bsam`) as the ``CompositeExplicitAutograd`` kernel and fake
implementations; they live here, not in csrc/ops.cpp, so that the ops exist without
``sam_fast._C``. When it is built, ``sam_fast._C`` registers their C++ CPU and CUDA kernels
(csrc/cpu/ops_cpu.cpp, csrc/cuda/ops_cuda.cu, per-element math in csrc/bsam.h; fp16,
bf16, fp32 and fp64 storage, the specification's bits), which take precedence over the
composite one, and the Autograd / ADInplaceOrView kernels of the other ops.

Each backend's implementation is found through :mod:`sam_fast.dispatch`
(:data:`~sam_fast.dispatch.BSAM_OP_NAMES`; :func:`impl`): ``torch`` (the specification),
``cpp`` and ``cuda`` (the compiled kernels, through ``torch.ops.sam_fast``, every storage
dtype), ``triton`` (kernels/bsam.py for fp32, fp16 and bf16 groups in fp32 math; fp64
groups, and positions its kernels cannot address as one dense run, go to the
specification, by design: see :mod:`sam_fast.backends.triton_bsam`).
"""

from __future__ import annotations

from typing import Callable

import torch

from . import dispatch
from .backends.torch_bsam import OPS as SPEC
from .backends.torch_bsam import bsam_ascent_, bsam_noise_, bsam_update_

__all__ = ["bsam_noise_", "bsam_ascent_", "bsam_update_", "impl", "OP_NAMES", "SPEC"]

OP_NAMES = dispatch.BSAM_OP_NAMES

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


def impl(op: str, backend: str, device: torch.device) -> Callable:
    """The implementation of BSAM op ``op`` for one group on ``device``: that of the backend
    ``backend`` resolves to there (:func:`sam_fast.dispatch.lookup`)."""
    return dispatch.lookup(op, backend, device)
