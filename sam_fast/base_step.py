"""Fused restore + base-optimizer steps, and when they may replace ``base.step()``.

The fused ops cover ``torch.optim.SGD``, ``Adam`` and ``AdamW`` (exact types,
not subclasses, whose ``step`` may do anything) with every option whose
meaning they reproduce. They read and write the base optimizer's own state
(``momentum_buffer``; ``step``, ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq``) in the layout PyTorch uses, so checkpoints, fallbacks and
a later switch back to the plain optimizer all see ordinary state.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from . import ops

_SGD_KEYS = frozenset(
    {"params", "lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach",
     "differentiable", "fused"}
)
_ADAM_KEYS = frozenset(
    {"params", "lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
     "differentiable", "fused", "decoupled_weight_decay"}
)


def _plain_floats(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _has_step_hooks(opt: Optimizer) -> bool:
    from torch.optim import optimizer as optim_module

    return bool(
        getattr(opt, "_optimizer_step_pre_hooks", None)
        or getattr(opt, "_optimizer_step_post_hooks", None)
        or getattr(optim_module, "_global_optimizer_pre_hooks", None)
        or getattr(optim_module, "_global_optimizer_post_hooks", None)
    )


def fused_kind(opt: Optimizer, group: dict, extra_keys: frozenset[str]) -> str | None:
    """``"sgd"`` or ``"adam"`` when a fused op reproduces ``opt.step()`` on ``group``, else None.

    ``extra_keys`` are the keys the SAM wrapper itself adds to the group.
    Anything unknown (a key from a newer PyTorch, a tensor learning rate,
    ``differentiable=True``, step hooks that must run) keeps the optimizer's
    own ``step()``.
    """
    if _has_step_hooks(opt) or group.get("differentiable", False):
        return None
    keys = set(group) - extra_keys - {"initial_lr"}
    if type(opt) is torch.optim.SGD and keys <= _SGD_KEYS:
        if _plain_floats(group["lr"], group["momentum"], group["dampening"], group["weight_decay"]):
            return "sgd"
    if type(opt) in (torch.optim.Adam, torch.optim.AdamW) and keys <= _ADAM_KEYS:
        if _plain_floats(group["lr"], *group["betas"], group["eps"], group["weight_decay"]):
            return "adam"
    return None


def sgd_options(group: dict) -> dict[str, Any]:
    return dict(
        lr=group["lr"],
        momentum=group["momentum"],
        dampening=group["dampening"],
        weight_decay=group["weight_decay"],
        nesterov=group["nesterov"],
        maximize=group["maximize"],
    )


def momentum_parts(
    opt: Optimizer, params: Sequence[Tensor], momentum: float
) -> list[tuple[list[int], list[Tensor] | None, bool]]:
    """``params`` split for the fused SGD ops: positions whose momentum buffer exists (with
    those buffers), and positions that get one at this step (``init_buffers=True``, no
    buffers yet). Without momentum, one part holding every position."""
    if momentum == 0:
        return [(list(range(len(params))), None, False)] if params else []
    have = [i for i, p in enumerate(params) if opt.state[p].get("momentum_buffer") is not None]
    fresh = [i for i, p in enumerate(params) if opt.state[p].get("momentum_buffer") is None]
    parts: list[tuple[list[int], list[Tensor] | None, bool]] = []
    if have:
        parts.append((have, [opt.state[params[i]]["momentum_buffer"] for i in have], False))
    if fresh:
        parts.append((fresh, None, True))
    return parts


def new_momentum_buffers(opt: Optimizer, params: Sequence[Tensor]) -> list[Tensor]:
    """Allocate (unfilled) momentum buffers for ``params`` and record them in ``opt.state``.

    Call right before the op that fills them, so a failure cannot leave an
    unfilled buffer behind."""
    bufs = []
    for p in params:
        buf = torch.empty_like(p, memory_format=torch.preserve_format)
        opt.state[p]["momentum_buffer"] = buf
        bufs.append(buf)
    return bufs


def restore_sgd_step(
    opt: Optimizer,
    group: dict,
    params: Sequence[Tensor],
    backups: Sequence[Tensor],
    *,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    backend: str,
) -> None:
    """``w <- backup`` and ``torch.optim.SGD``'s step on ``group`` for ``params``."""
    options = sgd_options(group)
    for idx, bufs, init in momentum_parts(opt, params, options["momentum"]):
        part = [params[i] for i in idx]
        if init:
            bufs = new_momentum_buffers(opt, part)
        ops.restore_sgd_(
            part,
            [backups[i] for i in idx],
            [p.grad for p in part],
            bufs,
            init_buffers=init,
            grad_scale=grad_scale,
            found_inf=found_inf,
            backend=backend,
            **options,
        )


def _init_adam_state(opt: Optimizer, group: dict, p: Tensor) -> dict:
    """``torch.optim.Adam._init_group``'s state for a parameter seen for the first time."""
    state = opt.state[p]
    if len(state) == 0:
        on_device = group["capturable"] or group["fused"]
        if on_device:
            step = torch.zeros((), dtype=torch.float32 if group["fused"] else _scalar_dtype(),
                               device=p.device)
        else:
            step = torch.tensor(0.0, dtype=_scalar_dtype())
        state["step"] = step
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return state


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def restore_adam_step(
    opt: Optimizer,
    group: dict,
    params: Sequence[Tensor],
    backups: Sequence[Tensor],
    *,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    backend: str,
) -> None:
    """``w <- backup`` and ``torch.optim.Adam``/``AdamW``'s step on ``group`` for ``params``."""
    states = [_init_adam_state(opt, group, p) for p in params]
    beta1, beta2 = group["betas"]
    ops.restore_adamw_(
        list(params),
        list(backups),
        [p.grad for p in params],
        [s["exp_avg"] for s in states],
        [s["exp_avg_sq"] for s in states],
        [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else None,
        [s["step"] for s in states],
        lr=group["lr"],
        beta1=beta1,
        beta2=beta2,
        eps=group["eps"],
        weight_decay=group["weight_decay"],
        amsgrad=group["amsgrad"],
        maximize=group["maximize"],
        decoupled_weight_decay=group.get("decoupled_weight_decay", type(opt) is torch.optim.AdamW),
        grad_scale=grad_scale,
        found_inf=found_inf,
        backend=backend,
    )


RESTORE_STEPS = {"sgd": restore_sgd_step, "adam": restore_adam_step}
