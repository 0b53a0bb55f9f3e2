"""The fused multi-tensor ops of docs/design.md section 3, callable on any tensor lists.

Each public op checks its lists, splits them into groups that share a device
and a dtype, and hands every group to the implementation chosen by
:mod:`sam_fast.dispatch`. Lists are aligned: position ``i`` of every list
belongs to the same parameter.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
from torch import Tensor

from . import dispatch
from .distributed import all_reduce_sumsq, local

TensorList = Sequence[Tensor]

__all__ = [
    "grad_sumsq",
    "grad_norm",
    "perturb_",
    "restore_",
    "restore_sgd_",
    "restore_adamw_",
    "sampa_points_",
    "sampa_update_",
]

_STORAGE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_tensor(t: Tensor, what: str) -> None:
    """Reject what no op handles, naming the offending tensor."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_sparse or t.layout != torch.strided:
        raise RuntimeError(f"{what} is sparse ({t.layout}); sam_fast supports dense tensors only")
    if t.is_complex():
        raise RuntimeError(f"{what} is complex ({t.dtype}); sam_fast supports real tensors only")
    if t.dtype not in _STORAGE_DTYPES:
        raise RuntimeError(
            f"{what} has dtype {t.dtype}; sam_fast supports float32, float64, bfloat16 and float16"
        )


Groups = dict[tuple[torch.device, torch.dtype], list[list[Tensor] | None]]


def group_by_device_and_dtype(names: Sequence[str], lists: Sequence[TensorList | None]) -> Groups:
    """Split aligned lists into per-(device, dtype) sublists, keyed by the first list's tensors.

    Every tensor at position ``i`` must match the first list's tensor in device
    and shape. DTensors (FSDP2) stand for their local shards. The checks run on
    every call and keep nothing: these ops take any lists (gradients are new
    tensors every step). The optimizers check their parameters once per layout
    instead (:mod:`sam_fast.plan`) and call the backends directly.
    """
    head = lists[0]
    assert head is not None
    for name, lst in zip(names, lists):
        if lst is not None and len(lst) != len(head):
            raise ValueError(f"{name} has {len(lst)} tensors but {names[0]} has {len(head)}")
    plain: list[list[Tensor] | None] = [
        None if lst is None else [local(t) for t in lst] for lst in lists
    ]
    layout = _validate_and_group(names, plain)
    if len(layout) == 1:  # the common case: one device, one dtype
        return {layout[0][0]: plain}
    return {
        group_key: [None if lst is None else [lst[i] for i in positions] for lst in plain]
        for group_key, positions in layout
    }


def _validate_and_group(
    names: Sequence[str], lists: Sequence[list[Tensor] | None]
) -> list[tuple[tuple[torch.device, torch.dtype], list[int]]]:
    """Check every tensor and return, per (device, dtype), the positions it holds."""
    head = lists[0]
    assert head is not None
    positions: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, lead in enumerate(head):
        check_tensor(lead, f"{names[0]}[{i}]")
        for name, lst in zip(names[1:], lists[1:]):
            if lst is None:
                continue
            t = lst[i]
            check_tensor(t, f"{name}[{i}]")
            if t.device != lead.device:
                raise RuntimeError(
                    f"{name}[{i}] is on {t.device} but {names[0]}[{i}] is on {lead.device}; "
                    "each parameter's tensors must share a device"
                )
            if t.shape != lead.shape:
                raise RuntimeError(
                    f"{name}[{i}] has shape {tuple(t.shape)} but {names[0]}[{i}] has "
                    f"{tuple(lead.shape)}"
                )
        positions[(lead.device, lead.dtype)].append(i)
    return list(positions.items())


def _scalar_on(value: Tensor, device: torch.device) -> Tensor:
    return value.to(device=device, non_blocking=True)


def grad_sumsq(
    grads: TensorList,
    params: TensorList | None = None,
    eta: float = 0.0,
    *,
    backend: str = "auto",
) -> Tensor:
    """``||g||^2`` over all tensors (of every rank, for FSDP2 shards), or
    ``||(|w| + eta) * g||^2`` when ``params`` are given (ASAM).

    Returns a 0-dim fp32 tensor (fp64 when every tensor is fp64) on the device
    of the first gradient. Accumulation is in fp32 whatever the storage dtype.
    """
    if len(grads) == 0:
        raise ValueError("grad_sumsq needs at least one gradient")
    names = ("grads", "params")
    groups = group_by_device_and_dtype(names, (grads, params))
    home = local(grads[0]).device
    partials = []
    for (device, _), (g, p) in groups.items():
        impl = dispatch.lookup("grad_sumsq", backend, device)
        partial = impl(g, p, eta) if p is not None else impl(g)
        partials.append(partial.to(home, non_blocking=True))
    if len(partials) == 1:
        total = partials[0]
    else:
        acc = torch.float64 if any(p.dtype == torch.float64 for p in partials) else torch.float32
        total = torch.stack([p.to(acc) for p in partials]).sum()
    # FSDP2 shards: add up the other ranks' local sums (one small all-reduce).
    return all_reduce_sumsq(total, grads)


def grad_norm(
    grads: TensorList,
    params: TensorList | None = None,
    eta: float = 0.0,
    *,
    backend: str = "auto",
) -> Tensor:
    """``||g||`` over all tensors, or ``||(|w| + eta) * g||`` when ``params`` are given (ASAM):
    the square root of :func:`grad_sumsq`."""
    return grad_sumsq(grads, params, eta, backend=backend).sqrt()


def perturb_(
    params: TensorList,
    grads: TensorList,
    backups: TensorList,
    sumsq: Tensor,
    *,
    rho: float,
    eps: float = 1e-12,
    normalize: bool = True,
    eta: float | None = None,
    grad_scale: Tensor | None = None,
    backend: str = "auto",
) -> None:
    """``backups <- w``; ``w <- w + e`` with ``e = scale * g`` (or ``scale * (|w|+eta)^2 * g``
    when ``eta`` is not None), where the kernels derive ``scale = rho / (sqrt(sumsq) + eps)``
    (``rho`` when not ``normalize``) from ``sumsq``, the global sum of squares from
    :func:`grad_sumsq`. With ``grad_scale`` (the gradients carry GradScaler's scale) the
    scale is that of the unscaled gradients. ``e`` is exactly zero where ``sumsq`` is not
    finite (a skipped perturbation)."""
    groups = group_by_device_and_dtype(("params", "grads", "backups"), (params, grads, backups))
    for (device, _), (p, g, b) in groups.items():
        dispatch.lookup("perturb_", backend, device)(
            p, g, b, _scalar_on(sumsq, device), rho=float(rho), eps=float(eps),
            normalize=bool(normalize), eta=None if eta is None else float(eta),
            grad_scale=None if grad_scale is None else _scalar_on(grad_scale, device))


def restore_(params: TensorList, backups: TensorList, *, backend: str = "auto") -> None:
    """``w <- backup`` bit for bit."""
    groups = group_by_device_and_dtype(("params", "backups"), (params, backups))
    for (device, _), (p, b) in groups.items():
        dispatch.lookup("restore_", backend, device)(p, b)


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
    backend: str = "auto",
) -> None:
    """``w <- backup``, then one ``torch.optim.SGD`` step with ``grads``.

    ``init_buffers=True`` marks the momentum buffers as fresh (SGD's first
    step: ``buf = d``). ``grad_scale`` divides the gradients; where
    ``found_inf`` is non-zero only the restore happens.
    """
    if momentum != 0 and momentum_buffers is None:
        raise ValueError("momentum != 0 needs momentum_buffers")
    groups = group_by_device_and_dtype(
        ("params", "backups", "grads", "momentum_buffers"),
        (params, backups, grads, momentum_buffers if momentum != 0 else None),
    )
    for (device, _), (p, b, g, bufs) in groups.items():
        dispatch.lookup("restore_sgd_", backend, device)(
            p,
            b,
            g,
            bufs,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            init_buffers=init_buffers,
            grad_scale=grad_scale,
            found_inf=found_inf,
        )


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
    backend: str = "auto",
) -> None:
    """``w <- backup``, then one ``torch.optim.Adam`` step (``AdamW`` with
    ``decoupled_weight_decay=True``). ``state_steps`` are Adam's 0-dim step
    counters, on the CPU or on the parameters' device."""
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("amsgrad=True needs max_exp_avg_sqs")
    lists = (params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None)
    names = ("params", "backups", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
    if len(state_steps) != len(params):
        raise ValueError(f"state_steps has {len(state_steps)} tensors but params has {len(params)}")
    # The step counters may live on the host, so they ride along by index.
    position = {id(local(t)): i for i, t in enumerate(params)}
    for (device, _), (p, b, g, m, v, vmax) in group_by_device_and_dtype(names, lists).items():
        steps = [state_steps[position[id(t)]] for t in p]
        dispatch.lookup("restore_adamw_", backend, device)(
            p,
            b,
            g,
            m,
            v,
            vmax,
            steps,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
            grad_scale=grad_scale,
            found_inf=found_inf,
        )


def sampa_points_(
    params: TensorList,
    grads_y: TensorList,
    momentum_buffers: TensorList | None,
    backups: TensorList,
    ys: TensorList,
    sumsq: Tensor,
    *,
    rho: float,
    eps: float = 1e-12,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    init_buffers: bool = False,
    backend: str = "auto",
) -> None:
    """SAMPa's two points: ``backups <- x``, ``ys <- SGD lookahead of x with g_y``
    (buffers read only; not at all with ``init_buffers``), ``params <- x + scale * g_y``
    with ``scale = rho / (sqrt(sumsq) + eps)`` (``sumsq`` = :func:`grad_sumsq` of ``g_y``)."""
    reads_buffers = momentum != 0 and not init_buffers
    if reads_buffers and momentum_buffers is None:
        raise ValueError("momentum != 0 needs momentum_buffers")
    names = ("params", "grads_y", "momentum_buffers", "backups", "ys")
    lists = (params, grads_y, momentum_buffers if reads_buffers else None, backups, ys)
    for (device, _), (p, g, bufs, b, y) in group_by_device_and_dtype(names, lists).items():
        dispatch.lookup("sampa_points_", backend, device)(
            p,
            g,
            bufs,
            b,
            y,
            _scalar_on(sumsq, device),
            rho=float(rho),
            eps=float(eps),
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            init_buffers=init_buffers,
        )


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
    backend: str = "auto",
) -> None:
    """``params <- SGD step from x = backups`` with gradient ``(1-lam) g~ + lam g_y``."""
    if momentum != 0 and momentum_buffers is None:
        raise ValueError("momentum != 0 needs momentum_buffers")
    names = ("params", "backups", "grads_tilde", "grads_y", "momentum_buffers")
    lists = (params, backups, grads_tilde, grads_y, momentum_buffers if momentum != 0 else None)
    for (device, _), (p, b, gt, gy, bufs) in group_by_device_and_dtype(names, lists).items():
        dispatch.lookup("sampa_update_", backend, device)(
            p,
            b,
            gt,
            gy,
            bufs,
            lam=lam,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
            init_buffers=init_buffers,
        )
