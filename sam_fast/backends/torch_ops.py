"""The ``torch`` backend: every op of docs/design.md section 3 with ``torch._foreach_*``.

This is the executable specification the fused kernels are tested against, so
it favours clarity over the last byte of traffic. Each function receives one
group of tensors that share a device and a dtype (the public ops in
:mod:`sam_fast.ops` group and validate) and never reads a device value on the
host: scalars that depend on device results arrive as 0-dim tensors.

Storage may be fp32, fp64, bf16 or fp16; the math runs in fp32 (fp64 for fp64
storage) and the result is rounded to the storage dtype once. For fp32
storage the optimizer steps use the same foreach calls, in the same order, as
``torch.optim.SGD`` / ``Adam`` (foreach implementation), so they agree with
them bit for bit on the CPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

TensorList = list[Tensor] | tuple[Tensor, ...]
# foreach ops return tuples or lists; either is a sequence of tensors here.
Tensors = list[Tensor] | tuple[Tensor, ...]


def _math_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _widen(tensors: TensorList) -> list[Tensor]:
    """The tensors in their math dtype; fp32/fp64 tensors are returned as they are."""
    return [t if t.dtype == _math_dtype(t.dtype) else t.to(_math_dtype(t.dtype)) for t in tensors]


def _commit(dst: TensorList, new: TensorList, skip: Tensor | None) -> None:
    """dst <- new, or dst unchanged where ``skip`` (a 0-dim bool tensor) is set."""
    if skip is None:
        torch._foreach_copy_(list(dst), list(new))
        return
    for d, n in zip(dst, new):
        d.copy_(torch.where(skip, d, n.to(d.dtype)))


def _skip_flag(found_inf: Tensor | None, device: torch.device) -> Tensor | None:
    if found_inf is None:
        return None
    return found_inf.to(device=device, non_blocking=True) != 0


def _unscale(grads: Tensors, grad_scale: Tensor | None) -> Tensors:
    if grad_scale is None:
        return grads
    inv = torch.reciprocal(grad_scale.to(device=grads[0].device, dtype=grads[0].dtype))
    return torch._foreach_mul(grads, inv)


def powsum(tensors: TensorList, dtype: torch.dtype) -> Tensors:
    """Each tensor's sum of squares in ``dtype``: ``torch._foreach_powsum`` where torch
    has it, else (torch 2.10, which the portable library serves too) each tensor widened,
    squared and summed: the same values up to the order of the summation."""
    if _FOREACH_POWSUM is not None:
        return _FOREACH_POWSUM(list(tensors), 2, dtype=dtype)
    return [torch.sum(torch.square(t.to(dtype))) for t in tensors]


_FOREACH_POWSUM = getattr(torch, "_foreach_powsum", None)


def grad_sumsq(grads: TensorList, params: TensorList | None = None, eta: float = 0.0) -> Tensor:
    """Sum of squares of ``g`` (or of ``(|w| + eta) * g`` when params are given), fp32."""
    if len(grads) == 0:
        raise ValueError("grad_sumsq needs at least one tensor")
    acc = _math_dtype(grads[0].dtype)
    if params is None:
        partial = powsum(grads, acc)
    else:
        weights = torch._foreach_abs(_widen(params))
        if eta != 0.0:
            torch._foreach_add_(weights, eta)
        weighted = torch._foreach_mul(weights, _widen(grads))
        partial = powsum(weighted, acc)
    return torch.stack(partial).sum()


def _workspace(storage: TensorList, in_place: bool) -> list[Tensor]:
    """Where a step computes: the storage itself when it may be written in place
    (math dtype, no skip flag), else math-dtype copies committed at the end."""
    if in_place:
        return list(storage)
    return [t.to(_math_dtype(t.dtype), copy=True) for t in storage]


def _in_place(storage: TensorList, skip: Tensor | None) -> bool:
    return skip is None and storage[0].dtype == _math_dtype(storage[0].dtype)


def perturbation_scale(
    sumsq: Tensor, rho: float, eps: float, normalize: bool, grad_scale: Tensor | None = None
) -> Tensor:
    """The perturbation's scale as a 0-dim device tensor, from the global sum of squares.

    ``rho / (||g|| + eps)`` (``rho`` for USAM), with the roundings of PyTorch's
    ``float / tensor`` (a reciprocal, then a product), so every backend can
    reproduce it bit for bit inside its kernels. With gradients scaled by ``S``
    (GradScaler), ``sumsq`` is that of the scaled gradients and the scale is
    that of the unscaled ones: ``rho / (||S g|| + S * eps)``, or ``rho / S``.
    0 where ``sumsq`` is not finite, which the perturbation reads as "skip".
    """
    if normalize:
        # Correctly rounded, as the kernels compute it: PyTorch's CPU fp32 sqrt is one ulp
        # off for a sizeable share of inputs; an fp64 sqrt rounded to fp32 is exact
        # (53 >= 2 * 24 + 2 bits, so the double rounding is innocuous).
        norm = torch.sqrt(sumsq.double()).to(sumsq.dtype) if sumsq.dtype == torch.float32 \
            else torch.sqrt(sumsq)
        denom = norm + (eps if grad_scale is None else grad_scale.to(norm) * eps)
        scale = torch.reciprocal(denom) * rho
    elif grad_scale is None:
        scale = torch.full_like(sumsq, rho)
    else:
        scale = torch.reciprocal(grad_scale.to(sumsq)) * rho
    return torch.where(torch.isfinite(sumsq), scale, torch.zeros_like(scale))


def _perturbation(
    params: TensorList, grads: TensorList, scale: Tensor, eta: float | None
) -> Tensors:
    """e = scale * g (SAM, USAM) or scale * (|w| + eta)^2 * g (ASAM), exactly 0 where scale == 0."""
    g = _widen(grads)
    if eta is None:
        e = torch._foreach_mul(g, scale)
    else:
        weights = torch._foreach_abs(_widen(params))
        if eta != 0.0:
            torch._foreach_add_(weights, eta)
        e = torch._foreach_mul(weights, weights)
        torch._foreach_mul_(e, g)
        torch._foreach_mul_(e, scale)
    # scale == 0 marks a skipped step (non-finite norm): 0 * inf would be NaN.
    skipped = scale == 0
    for t in e:
        t.masked_fill_(skipped, 0.0)
    return e


def _perturb_by_scale(
    params: TensorList, grads: TensorList, backups: TensorList, scale: Tensor, eta: float | None
) -> None:
    e = _perturbation(params, grads, scale, eta)
    torch._foreach_copy_(list(backups), list(params))
    if _in_place(params, None):
        torch._foreach_add_(list(params), e)
    else:
        torch._foreach_copy_(list(params), torch._foreach_add(_widen(params), e))


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
    """backups <- w;  w <- w + e(w, g), ``e`` scaled by :func:`perturbation_scale` of
    ``sumsq`` (the global sum of squares of the gradients, or of ``(|w| + eta) g``)."""
    if len(params) == 0:
        return
    device = params[0].device
    scale = perturbation_scale(sumsq.to(device, non_blocking=True), rho, eps, normalize,
                               None if grad_scale is None else grad_scale.to(device))
    _perturb_by_scale(params, grads, backups, scale, eta)


def restore_(params: TensorList, backups: TensorList) -> None:
    """w <- backup, bit for bit."""
    if len(params) == 0:
        return
    torch._foreach_copy_(list(params), list(backups))


def _sgd_direction(
    x: Tensors,
    grads: Tensors,
    bufs: list[Tensor] | None,
    *,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    init_buffers: bool,
) -> Tensors:
    """The direction ``d`` of ``torch.optim.SGD``, updating the momentum buffers
    ``bufs`` in place (pass copies to keep the originals), with the same calls in
    the same order as its foreach implementation."""
    d: Tensors = torch._foreach_neg(grads) if maximize else grads
    if weight_decay != 0:
        d = torch._foreach_add(d, x, alpha=weight_decay)
    if momentum == 0:
        return d
    assert bufs is not None, "momentum needs buffers"
    if init_buffers:
        torch._foreach_copy_(bufs, d)
    else:
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, d, alpha=1 - dampening)
    return torch._foreach_add(d, bufs, alpha=momentum) if nesterov else bufs


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
    """w <- backup, then one ``torch.optim.SGD`` step with gradients ``grads``.

    ``init_buffers`` says the momentum buffers hold no history yet (SGD's first
    step, which sets ``buf = d`` instead of ``mu * buf + (1 - dampening) * d``).
    ``grad_scale`` divides the gradients (GradScaler's scale); where
    ``found_inf`` is non-zero the weights are restored and nothing else changes.
    """
    if len(params) == 0:
        return
    restore_(params, backups)
    skip = _skip_flag(found_inf, params[0].device)
    in_place = _in_place(params, skip)
    x = _workspace(params, in_place)
    has_bufs = momentum != 0 and momentum_buffers is not None
    bufs = _workspace(momentum_buffers, in_place) if has_bufs else None
    d = _sgd_direction(
        x,
        _unscale(_widen(grads), grad_scale),
        bufs,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
        init_buffers=init_buffers,
    )
    torch._foreach_add_(x, d, alpha=-lr)
    if not in_place:
        if bufs is not None and momentum_buffers is not None:
            _commit(momentum_buffers, bufs, skip)
        _commit(params, x, skip)


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
    """w <- backup, then one ``torch.optim.Adam`` (``AdamW`` when decoupled) step.

    ``state_steps`` are Adam's 0-dim step counters. On the CPU (PyTorch's
    default for non-capturable Adam) the bias corrections are computed on the
    host as ``torch.optim.Adam`` does; on the device they stay tensors.
    """
    if len(params) == 0:
        return
    restore_(params, backups)
    device = params[0].device
    steps_on_host = state_steps[0].device.type == "cpu"
    if found_inf is not None and steps_on_host:
        # Host-resident step counters cannot be bumped conditionally without
        # reading the flag: for CUDA params this is the one sync of the step, as
        # in GradScaler's default path. Adam(capturable=True) keeps the counters
        # on the device and avoids it.
        if bool(found_inf):
            return
        found_inf = None
    skip = _skip_flag(found_inf, device)
    in_place = _in_place(params, skip)
    x = _workspace(params, in_place)
    m = _workspace(exp_avgs, in_place)
    v = _workspace(exp_avg_sqs, in_place)
    use_vmax = amsgrad and max_exp_avg_sqs is not None
    vmax = _workspace(max_exp_avg_sqs, in_place) if use_vmax and max_exp_avg_sqs else None
    g: Tensors = _unscale(_widen(grads), grad_scale)

    if skip is None:
        torch._foreach_add_(list(state_steps), 1)
    else:
        _commit(state_steps, [s + (~skip).to(s.dtype) for s in state_steps], None)

    if maximize:
        g = torch._foreach_neg(g)
    if weight_decay != 0:
        if decoupled_weight_decay:
            torch._foreach_mul_(x, 1 - lr * weight_decay)
        else:
            g = torch._foreach_add(g, x, alpha=weight_decay)
    torch._foreach_lerp_(m, g, 1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, g, g, 1 - beta2)
    if vmax is not None:
        torch._foreach_maximum_(vmax, v)
        denom = torch._foreach_sqrt(vmax)
    else:
        denom = torch._foreach_sqrt(v)

    if steps_on_host:
        counts = [float(c) for c in state_steps]  # host tensors: no device sync
        step_size = [(lr / (1 - beta1**c)) * -1 for c in counts]
        bc2_sqrt = [(1 - beta2**c) ** 0.5 for c in counts]
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(x, m, denom, step_size)
    else:
        c = [t.to(device=device, dtype=x[0].dtype) for t in state_steps]
        bc1 = torch._foreach_pow(beta1, c)
        bc2_sqrt_t = torch._foreach_sqrt([1 - b for b in torch._foreach_pow(beta2, c)])
        torch._foreach_div_(denom, bc2_sqrt_t)
        torch._foreach_add_(denom, eps)
        update = torch._foreach_div(m, denom)
        torch._foreach_mul_(update, [-lr / (1 - b) for b in bc1])
        torch._foreach_add_(x, update)

    if not in_place:
        _commit(exp_avgs, m, skip)
        _commit(exp_avg_sqs, v, skip)
        if vmax is not None and max_exp_avg_sqs is not None:
            _commit(max_exp_avg_sqs, vmax, skip)
        _commit(params, x, skip)


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
    """SAMPa's two evaluation points from ``x`` (the params) and ``g_y``.

    backups <- x;  ys <- the point ``torch.optim.SGD`` would move x to with
    gradient ``g_y`` (the momentum buffers are read, not written);
    params <- x~ = x + scale * g_y, ``scale = rho / (||g_y|| + eps)`` from ``sumsq``
    (:func:`perturbation_scale`; x~ = x where ``sumsq`` is not finite).
    """
    if len(params) == 0:
        return
    x = _widen(params)
    reads_bufs = momentum != 0 and not init_buffers and momentum_buffers is not None
    bufs = _workspace(momentum_buffers, False) if reads_bufs and momentum_buffers else None
    if momentum != 0 and init_buffers:
        bufs = [torch.empty_like(t) for t in x]  # filled with d, then dropped
    d = _sgd_direction(
        x,
        _widen(grads_y),
        bufs,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
        init_buffers=init_buffers,
    )
    torch._foreach_copy_(list(ys), torch._foreach_add(x, d, alpha=-lr))
    perturb_(params, grads_y, backups, sumsq, rho=rho, eps=eps, normalize=True)


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
    """params <- one ``torch.optim.SGD`` step from x (the backups) with
    gradient ``(1 - lam) * g~ + lam * g_y``; the momentum buffers are updated."""
    if len(params) == 0:
        return
    g = torch._foreach_mul(_widen(grads_tilde), 1 - lam)
    torch._foreach_add_(g, _widen(grads_y), alpha=lam)
    restore_sgd_(params, backups, g, momentum_buffers, lr=lr, momentum=momentum,
                 dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                 maximize=maximize, init_buffers=init_buffers)


OPS = {
    "grad_sumsq": grad_sumsq,
    "perturb_": perturb_,
    "restore_": restore_,
    "restore_sgd_": restore_sgd_,
    "restore_adamw_": restore_adamw_,
    "sampa_points_": sampa_points_,
    "sampa_update_": sampa_update_,
}
