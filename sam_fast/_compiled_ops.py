"""The op table of the compiled backends (``cpp`` and ``cuda``).

Each function has exactly the signature and semantics of its namesake in
:mod:`sam_fast.backends.torch_ops` and receives one (device, dtype) group. It
calls ``torch.ops.sam_fast.<op>``, whose CPU or CUDA kernel the dispatcher
picks from the tensors' device. Absent optional lists travel as empty lists
(the schemas avoid mutable optional lists, see csrc/ops.cpp).

float64 groups of the section 3 ops go to the torch backend: their compiled
kernels compute in fp32 and store fp32, fp16 and bf16 only. The SAM family's
generic ops (``dot_sumsq``, ``combine_``, ``ema_residual_``; namesakes in
:mod:`sam_fast.backends.torch_family`) and BSAM's (``bsam_noise_``, ``bsam_ascent_``,
``bsam_update_``; namesakes in :mod:`sam_fast.backends.torch_bsam`) have compiled kernels
for fp64 too, in fp64 as their specifications compute. Tensors of any layout are accepted: the
C++ side stages the rare non-dense or differently-strided ones through a
temporary (csrc/op_args.h).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .backends import torch_ops

TensorList = Sequence[Tensor]


class _OpTable:
    """``torch.ops.sam_fast``'s ops as this module calls them, resolved on first use (the
    compiled library is loaded by then): the op packets themselves under the
    version-matched library; under the portable one, :func:`sam_fast._stable.direct_call`'s
    wrappers, which skip a Python hop the optimizers' calls do not need."""

    def __getattr__(self, name: str):
        from . import _extension

        if _extension.abi() == "stable":
            from . import _stable

            op = _stable.direct_call(name)
        else:
            op = getattr(torch.ops.sam_fast, name)
        setattr(self, name, op)  # later lookups are plain attribute reads
        return op


_OPS = _OpTable()


def _fp64(tensors: TensorList) -> bool:
    return len(tensors) > 0 and tensors[0].dtype == torch.float64


def _opt(tensors: TensorList | None) -> list[Tensor]:
    return [] if tensors is None else list(tensors)


# Empty groups return early: the dispatcher cannot pick a kernel for a call
# without tensors, and there is nothing to do.


def grad_sumsq(grads: TensorList, params: TensorList | None = None, eta: float = 0.0) -> Tensor:
    """Sum of squares of ``g`` (or of ``(|w| + eta) * g``), fp32; fp64 groups: torch backend."""
    if _fp64(grads):
        return torch_ops.grad_sumsq(grads, params, eta)
    if len(grads) == 0:
        raise ValueError("grad_sumsq needs at least one tensor")
    return _OPS.grad_sumsq(list(grads), _opt(params), float(eta))


def perturb_(
    params: TensorList,
    grads: TensorList,
    backups: TensorList,
    sumsq: Tensor,
    *,
    rho: float,
    eps: float,
    normalize: bool,
    eta: float | None = None,
    grad_scale: Tensor | None = None,
) -> None:
    """backups <- w;  w <- w + e(w, g), the kernel deriving the scale from ``sumsq``
    (``torch_ops.perturbation_scale``, bit for bit); fp64 groups: torch backend."""
    if _fp64(params):
        return torch_ops.perturb_(params, grads, backups, sumsq, rho=rho, eps=eps,
                                  normalize=normalize, eta=eta, grad_scale=grad_scale)
    if len(params) == 0:
        return None
    _OPS.perturb_(list(params), list(grads), list(backups), sumsq,
                                rho=float(rho), eps=float(eps), normalize=bool(normalize),
                                eta=None if eta is None else float(eta), grad_scale=grad_scale)


def restore_(params: TensorList, backups: TensorList) -> None:
    """w <- backup, bit for bit; fp64 groups: torch backend."""
    if _fp64(params):
        return torch_ops.restore_(params, backups)
    if len(params) == 0:
        return None
    _OPS.restore_(list(params), list(backups))


def restore_sgd_(
    params: TensorList,
    backups: TensorList,
    grads: TensorList,
    momentum_buffers: TensorList | None,
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    init_buffers: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """w <- backup, then one ``torch.optim.SGD`` step; fp64 groups: torch backend."""
    if _fp64(params):
        return torch_ops.restore_sgd_(
            params, backups, grads, momentum_buffers, lr=lr, momentum=momentum,
            dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, init_buffers=init_buffers, grad_scale=grad_scale,
            found_inf=found_inf)
    if momentum != 0 and momentum_buffers is None:
        raise ValueError("momentum != 0 needs momentum_buffers")
    if len(params) == 0:
        return None
    _OPS.restore_sgd_(
        list(params), list(backups), list(grads),
        _opt(momentum_buffers) if momentum != 0 else [],
        lr=float(lr), momentum=float(momentum), dampening=float(dampening),
        weight_decay=float(weight_decay), nesterov=bool(nesterov), maximize=bool(maximize),
        init_buffers=bool(init_buffers), grad_scale=grad_scale, found_inf=found_inf)


def restore_adamw_(
    params: TensorList,
    backups: TensorList,
    grads: TensorList,
    exp_avgs: TensorList,
    exp_avg_sqs: TensorList,
    max_exp_avg_sqs: TensorList | None,
    state_steps: TensorList,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """w <- backup, then one ``torch.optim.Adam`` / ``AdamW`` step; fp64 groups: torch backend.

    With host step counters and ``found_inf`` the kernel reads the flag on the
    host, as the torch backend does (the one sync; Adam(capturable=True)
    keeps the counters on the device and avoids it)."""
    if _fp64(params):
        return torch_ops.restore_adamw_(
            params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
            lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
            amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=decoupled_weight_decay,
            grad_scale=grad_scale, found_inf=found_inf)
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("amsgrad=True needs max_exp_avg_sqs")
    if len(params) == 0:
        return None
    _OPS.restore_adamw_(
        list(params), list(backups), list(grads), list(exp_avgs), list(exp_avg_sqs),
        _opt(max_exp_avg_sqs) if amsgrad else [], list(state_steps),
        lr=float(lr), beta1=float(beta1), beta2=float(beta2), eps=float(eps),
        weight_decay=float(weight_decay), amsgrad=bool(amsgrad), maximize=bool(maximize),
        decoupled_weight_decay=bool(decoupled_weight_decay), grad_scale=grad_scale,
        found_inf=found_inf)


def sampa_points_(
    params: TensorList,
    grads_y: TensorList,
    momentum_buffers: TensorList | None,
    backups: TensorList,
    ys: TensorList,
    sumsq: Tensor,
    *,
    rho: float,
    eps: float,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    init_buffers: bool = False,
) -> None:
    """SAMPa's two points (backups, ys, params <- x~, the scale derived in the kernel
    from ``sumsq``); fp64 groups: torch backend."""
    if _fp64(params):
        return torch_ops.sampa_points_(
            params, grads_y, momentum_buffers, backups, ys, sumsq, rho=rho, eps=eps, lr=lr,
            momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, init_buffers=init_buffers)
    reads_buffers = momentum != 0 and not init_buffers
    if reads_buffers and momentum_buffers is None:
        raise ValueError("momentum != 0 needs momentum_buffers")
    if len(params) == 0:
        return None
    _OPS.sampa_points_(
        list(params), list(grads_y), _opt(momentum_buffers) if reads_buffers else [],
        list(backups), list(ys), sumsq, rho=float(rho), eps=float(eps),
        lr=float(lr), momentum=float(momentum), dampening=float(dampening),
        weight_decay=float(weight_decay), nesterov=bool(nesterov), maximize=bool(maximize),
        init_buffers=bool(init_buffers))


def sampa_update_(
    params: TensorList,
    backups: TensorList,
    grads_tilde: TensorList,
    grads_y: TensorList,
    momentum_buffers: TensorList | None,
    *,
    lam: float,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    init_buffers: bool = False,
) -> None:
    """params <- SGD step from the backups with ``(1-lam) g~ + lam g_y``; fp64: torch backend."""
    if _fp64(params):
        return torch_ops.sampa_update_(
            params, backups, grads_tilde, grads_y, momentum_buffers, lam=lam, lr=lr,
            momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, init_buffers=init_buffers)
    if momentum != 0 and momentum_buffers is None:
        raise ValueError("momentum != 0 needs momentum_buffers")
    if len(params) == 0:
        return None
    _OPS.sampa_update_(
        list(params), list(backups), list(grads_tilde), list(grads_y),
        _opt(momentum_buffers) if momentum != 0 else [],
        lam=float(lam), lr=float(lr), momentum=float(momentum), dampening=float(dampening),
        weight_decay=float(weight_decay), nesterov=bool(nesterov), maximize=bool(maximize),
        init_buffers=bool(init_buffers))


# -- the SAM family's generic ops (schemas: sam_fast/family_ops.py) --------------------------


def dot_sumsq(a: TensorList, b: TensorList) -> Tensor:
    """``[<a, b>, |a|^2, |b|^2]`` (fp32; fp64 for fp64 storage), deterministic."""
    if len(a) == 0:
        raise ValueError("dot_sumsq needs at least one tensor")
    return _OPS.dot_sumsq(list(a), list(b))


def combine_(a: TensorList, b: TensorList, coef: Tensor) -> None:
    """``a <- coef[0] * a + coef[1] * b``, ``coef`` a device tensor of two elements."""
    if len(a) == 0:
        return None
    _OPS.combine_(list(a), list(b), coef)


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
    """The running average and its residual with the residual's ``|g|^2`` (NaN, nothing
    written, where ``skip``)."""
    if len(m) == 0:
        raise ValueError("ema_residual_ needs at least one tensor")
    return _OPS.ema_residual_(list(m), list(g), float(decay), float(sigma),
                                            bool(updated), grad_scale, skip)


# -- BSAM's ops (schemas: sam_fast/bsam_ops.py) -----------------------------------------------


def bsam_noise_(params: TensorList, backups: TensorList, noise: TensorList, s: TensorList,
                num_data: float) -> None:
    """``backup <- w``; ``w <- w + z sqrt(1 / (N s))`` (``noise``: fp32)."""
    if len(params) == 0:
        return None
    _OPS.bsam_noise_(list(params), list(backups), list(noise), list(s),
                                   float(num_data))


def bsam_ascent_(params: TensorList, backups: TensorList, grads: TensorList, s: TensorList,
                 gs: TensorList, rho: float, grad_scale: Tensor | None = None,
                 skip: Tensor | None = None) -> None:
    """``w <- backup + rho g / s``, ``gs <- sqrt(s) |g|``; a plain restore where ``skip``."""
    if len(params) == 0:
        return None
    _OPS.bsam_ascent_(list(params), list(backups), list(grads), list(s),
                                    list(gs), float(rho), grad_scale, skip)


def bsam_update_(params: TensorList, backups: TensorList, grads: TensorList, m: TensorList,
                 s: TensorList, gs: TensorList, lr: float, beta1: float, beta2: float,
                 weight_decay: float, damping: float, new_s: bool,
                 grad_scale: Tensor | None = None, skip: Tensor | None = None) -> None:
    """BSAM's update of ``m``, ``s`` and ``w`` from the backups; a plain restore where
    ``skip``."""
    if len(params) == 0:
        return None
    _OPS.bsam_update_(list(params), list(backups), list(grads), list(m), list(s),
                                    list(gs), float(lr), float(beta1), float(beta2),
                                    float(weight_decay), float(damping), bool(new_s),
                                    grad_scale, skip)


OPS = {
    "grad_sumsq": grad_sumsq,
    "perturb_": perturb_,
    "restore_": restore_,
    "restore_sgd_": restore_sgd_,
    "restore_adamw_": restore_adamw_,
    "sampa_points_": sampa_points_,
    "sampa_update_": sampa_update_,
    "dot_sumsq": dot_sumsq,
    "combine_": combine_,
    "ema_residual_": ema_residual_,
    "bsam_noise_": bsam_noise_,
    "bsam_ascent_": bsam_ascent_,
    "bsam_update_": bsam_update_,
}
