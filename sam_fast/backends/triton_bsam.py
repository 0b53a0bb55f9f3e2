"""The ``triton`` implementations of BSAM's ops (kernels/bsam.py), registered in the
``triton`` backend's table (:mod:`.triton_backend`). Same contract as :mod:`.triton_family`:
each function takes one (device, dtype) group with the signature and meaning of its
namesake in :mod:`sam_fast.backends.torch_bsam`.

The kernels serve fp32, fp16 and bf16 groups (math in fp32, the noise fp32 whatever the
group's dtype). fp64 groups go to the torch specification, by design and not as a
fallback from a failure: fp64 needs fp64 math, which the kernels' fp32 arithmetic is not
(on a GPU the ``cuda`` backend's compiled kernels serve fp64 in fp64). Positions the
kernels cannot address as one dense run go to the specification too, as in every Triton
op.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch
from torch import Tensor

from . import torch_bsam
from . import triton_backend as tb
from .torch_ops import TensorList

kernels: Any = None
if tb.kernels is not None:
    kernels = importlib.import_module(tb.kernels.__name__ + ".bsam")


def _spec(name: str) -> Callable:
    return torch_bsam.OPS[name]


def _flag(t: Tensor | None, device: torch.device) -> Tensor | None:
    if t is None:
        return None
    t = tb._on(t, device)
    return t if t.dtype == torch.float32 else t.to(torch.float32)


def _served(lists: list[TensorList], list_dtypes: tuple | None = None
            ) -> tuple[Any, Any] | None:
    """The plan of an fp32, fp16 or bf16 group, None for fp64 (the specification's)."""
    if tb._delegated(lists[0][0]):
        return None
    return tb._plan(lists, list_dtypes=list_dtypes)


# bsam_noise_'s operands (w, backup, z, s): z is the fp32 draw whatever the group's dtype.
_NOISE_DTYPES = (None, None, torch.float32, None)


def bsam_noise_(params: TensorList, backups: TensorList, noise: TensorList, s: TensorList,
                num_data: float) -> None:
    if len(params) == 0:
        return
    lists = [params, backups, noise, s]
    served = _served(lists, _NOISE_DTYPES)
    if served is None:
        return _spec("bsam_noise_")(params, backups, noise, s, num_data)
    plan, table = served
    if plan.other:
        _spec("bsam_noise_")(*[tb._pick(x, plan.other) for x in lists], num_data)
    if table is not None:
        with tb._guard(params[0].device):
            kernels.noise(table, tb._TL_DTYPE[params[0].dtype], num_data)


def bsam_ascent_(params: TensorList, backups: TensorList, grads: TensorList, s: TensorList,
                 gs: TensorList, rho: float, grad_scale: Tensor | None = None,
                 skip: Tensor | None = None) -> None:
    if len(params) == 0:
        return
    lists = [params, backups, grads, s, gs]
    served = _served(lists)
    if served is None:
        return _spec("bsam_ascent_")(params, backups, grads, s, gs, rho, grad_scale, skip)
    device = params[0].device
    grad_scale, skip = tb._on_opt(grad_scale, device), _flag(skip, device)
    plan, table = served
    if plan.other:
        _spec("bsam_ascent_")(*[tb._pick(x, plan.other) for x in lists], rho, grad_scale,
                              skip)
    if table is not None:
        with tb._guard(device):
            kernels.ascent(table, tb._TL_DTYPE[params[0].dtype], rho, grad_scale, skip)


def bsam_update_(params: TensorList, backups: TensorList, grads: TensorList, m: TensorList,
                 s: TensorList, gs: TensorList, lr: float, beta1: float, beta2: float,
                 weight_decay: float, damping: float, new_s: bool,
                 grad_scale: Tensor | None = None, skip: Tensor | None = None) -> None:
    if len(params) == 0:
        return
    lists = [params, backups, grads, m, s, gs]
    scalars = (lr, beta1, beta2, weight_decay, damping, new_s)
    served = _served(lists)
    if served is None:
        return _spec("bsam_update_")(*lists, *scalars, grad_scale, skip)
    device = params[0].device
    grad_scale, skip = tb._on_opt(grad_scale, device), _flag(skip, device)
    plan, table = served
    if plan.other:
        _spec("bsam_update_")(*[tb._pick(x, plan.other) for x in lists], *scalars,
                              grad_scale, skip)
    if table is not None:
        with tb._guard(device):
            kernels.update(table, tb._TL_DTYPE[params[0].dtype], lr=lr, beta1=beta1,
                           beta2=beta2, weight_decay=weight_decay, damping=damping,
                           new_s=new_s, grad_scale=grad_scale, skip=skip)


OPS: dict[str, Callable] = {
    "bsam_noise_": bsam_noise_,
    "bsam_ascent_": bsam_ascent_,
    "bsam_update_": bsam_update_,
}
