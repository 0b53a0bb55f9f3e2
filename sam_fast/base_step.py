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
from torch.optim import optimizer as _optim_module
from torch.optim.optimizer import Optimizer

from . import dispatch, plan
from .distributed import local
from .plan import Bucket

_SGD_KEYS = frozenset(
    {"params", "lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach",
     "differentiable", "fused"}
)
_ADAM_KEYS = frozenset(
    {"params", "lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
     "differentiable", "fused", "decoupled_weight_decay"}
)


def _plain_floats(*values: Any) -> bool:
    return all(type(v) is float or (isinstance(v, (int, float)) and not isinstance(v, bool))
               for v in values)


def _has_step_hooks(opt: Optimizer) -> bool:
    return bool(
        getattr(opt, "_optimizer_step_pre_hooks", None)
        or getattr(opt, "_optimizer_step_post_hooks", None)
        or _optim_module._global_optimizer_pre_hooks
        or _optim_module._global_optimizer_post_hooks
    )


# (base optimizer type, the wrapper's keys) -> (kind, every group key it may meet); a
# handful of entries for the life of the process.
_ALLOWED_KEYS: dict[tuple[type, frozenset[str]], tuple[str, frozenset[str]] | None] = {}


def _allowed_keys(opt_type: type, extra_keys: frozenset[str]
                  ) -> tuple[str, frozenset[str]] | None:
    try:
        return _ALLOWED_KEYS[(opt_type, extra_keys)]
    except KeyError:
        pass
    if opt_type is torch.optim.SGD:
        entry: tuple[str, frozenset[str]] | None = ("sgd", _SGD_KEYS)
    elif opt_type in (torch.optim.Adam, torch.optim.AdamW):
        entry = ("adam", _ADAM_KEYS)
    else:
        entry = None
    if entry is not None:
        entry = (entry[0], entry[1] | extra_keys | {"initial_lr"})
    _ALLOWED_KEYS[(opt_type, extra_keys)] = entry
    return entry


def fused_kind(opt: Optimizer, group: dict, extra_keys: frozenset[str]) -> str | None:
    """``"sgd"`` or ``"adam"`` when a fused op reproduces ``opt.step()`` on ``group``, else None.

    ``extra_keys`` are the keys the SAM wrapper itself adds to the group.
    Anything unknown (a key from a newer PyTorch, a tensor learning rate,
    ``differentiable=True``, step hooks that must run) keeps the optimizer's
    own ``step()``. Called per group and step: a few dict reads, no allocation.
    """
    allowed = _allowed_keys(type(opt), extra_keys)
    if allowed is None or _has_step_hooks(opt) or group.get("differentiable", False):
        return None
    kind, keys = allowed
    if not group.keys() <= keys:
        return None
    if kind == "sgd":
        ok = _plain_floats(group["lr"], group["momentum"], group["dampening"],
                           group["weight_decay"])
    else:
        ok = _plain_floats(group["lr"], *group["betas"], group["eps"], group["weight_decay"])
    return kind if ok else None


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


def skipped(found_inf: Tensor | None) -> bool:
    """Whether GradScaler found inf/NaN, read on the host.

    Only called where a step would *create* optimizer state (a parameter's first
    step): torch.optim creates no state on a skipped step, and fresh state cannot
    be made conditional on a device flag. So the read happens on the first
    step(s) of a run only, never in steady state.
    """
    return found_inf is not None and bool(found_inf)


def _pick(lst: Sequence[Tensor], idx: Sequence[int] | None) -> list[Tensor]:
    return list(lst) if idx is None else [lst[i] for i in idx]


def _mismatched(states: Sequence[Tensor | None], tensors: Sequence[Tensor]) -> bool:
    return any(s is not None and (s.dtype != t.dtype or s.device != t.device)
               for s, t in zip(states, tensors))


def restore_sgd_step(opt: Optimizer, group: dict, bucket: Bucket, grads: Sequence[Tensor],
                     idx: Sequence[int] | None, *, grad_scale: Tensor | None,
                     found_inf: Tensor | None, backend: str) -> None:
    """``w <- backup`` and ``torch.optim.SGD``'s step on ``bucket`` (positions ``idx``,
    all when None) with ``grads`` (aligned with ``idx``)."""
    options = sgd_options(group)
    tensors, backups = _pick(bucket.tensors, idx), _pick(bucket.backups, idx)
    impl = bucket.impls["restore_sgd_"]
    if options["momentum"] == 0:
        impl(tensors, backups, list(grads), None, init_buffers=False, grad_scale=grad_scale,
             found_inf=found_inf, **options)
        return
    cache = bucket.cache
    bufs_all = cache.get("momentum_buffer")
    if bufs_all is None:
        # local(): the shards of DTensor buffers (FSDP2), as the ops take; a DTensor buffer
        # is here after load_state_dict (or a new plan over existing state).
        bufs_all = cache["momentum_buffer"] = [local(opt.state[p].get("momentum_buffer"))
                                               for p in bucket.params]
        cache["momentum_mismatch"] = _mismatched(bufs_all, bucket.tensors)
    if cache["momentum_mismatch"]:
        impl = dispatch.lookup("restore_sgd_", "torch", bucket.device)
    if idx is None and cache.get("momentum_complete"):  # the steady state
        impl(tensors, backups, grads, bufs_all, init_buffers=False,
             grad_scale=grad_scale, found_inf=found_inf, **options)
        return
    bufs = _pick(bufs_all, idx) if idx is not None else bufs_all
    if all(b is not None for b in bufs):
        if idx is None:
            cache["momentum_complete"] = True
        impl(tensors, backups, list(grads), bufs, init_buffers=False, grad_scale=grad_scale,
             found_inf=found_inf, **options)
        return
    positions = range(len(bucket.params)) if idx is None else idx
    have = [k for k, b in enumerate(bufs) if b is not None]
    fresh = [k for k, b in enumerate(bufs) if b is None]
    if have:
        impl([tensors[k] for k in have], [backups[k] for k in have], [grads[k] for k in have],
             [bufs[k] for k in have], init_buffers=False, grad_scale=grad_scale,
             found_inf=found_inf, **options)
    part = [tensors[k] for k in fresh]
    if skipped(found_inf):
        # torch.optim creates no buffer on a skipped step: restore only.
        bucket.impls["restore_"](part, [backups[k] for k in fresh])
        return
    params = [bucket.params[positions[k]] for k in fresh]
    new = new_momentum_buffers(opt, params)
    impl(part, [backups[k] for k in fresh], [grads[k] for k in fresh],
         [local(b) for b in new], init_buffers=True, grad_scale=grad_scale, found_inf=None,
         **options)
    for k, b in zip(fresh, new):
        bufs_all[positions[k]] = local(b)


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


_ADAM_KEYS_IN_STATE = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")


def _adam_lists(opt: Optimizer, group: dict, bucket: Bucket) -> dict[str, list]:
    cache = bucket.cache.get("adam")
    if cache is None:
        states = [opt.state[p] for p in bucket.params]
        cache = {key: [s.get(key) for s in states] for key in _ADAM_KEYS_IN_STATE}
        cache = {k: [None if t is None or k == "step" else local(t) for t in v]
                 if k != "step" else v for k, v in cache.items()}
        cache["fresh"] = any(len(s) == 0 for s in states)
        cache["mismatch"] = _mismatched(cache["exp_avg"], bucket.tensors) or _mismatched(
            cache["exp_avg_sq"], bucket.tensors)
        bucket.cache["adam"] = cache
    return cache


def restore_adam_step(opt: Optimizer, group: dict, bucket: Bucket, grads: Sequence[Tensor],
                      idx: Sequence[int] | None, *, grad_scale: Tensor | None,
                      found_inf: Tensor | None, backend: str) -> None:
    """``w <- backup`` and ``torch.optim.Adam``/``AdamW``'s step on ``bucket`` (positions
    ``idx``, all when None) with ``grads``."""
    lists = _adam_lists(opt, group, bucket)
    positions = list(range(len(bucket.params))) if idx is None else list(idx)
    if lists["fresh"]:
        fresh = [i for i in positions if lists["step"][i] is None]
        if fresh and skipped(found_inf):
            # No state on a skipped step (torch.optim's behaviour): restore all, step none.
            bucket.impls["restore_"](_pick(bucket.tensors, positions),
                                     _pick(bucket.backups, positions))
            return
        for i in fresh:
            state = _init_adam_state(opt, group, bucket.params[i])
            for key in _ADAM_KEYS_IN_STATE:
                t = state.get(key)
                lists[key][i] = t if t is None or key == "step" else local(t)
        lists["fresh"] = any(s is None for s in lists["step"])
    impl = bucket.impls["restore_adamw_"]
    if lists["mismatch"]:
        impl = dispatch.lookup("restore_adamw_", "torch", bucket.device)
    beta1, beta2 = group["betas"]
    amsgrad = group["amsgrad"]
    impl(
        _pick(bucket.tensors, idx),
        _pick(bucket.backups, idx),
        list(grads),
        _pick(lists["exp_avg"], idx),
        _pick(lists["exp_avg_sq"], idx),
        _pick(lists["max_exp_avg_sq"], idx) if amsgrad else None,
        _pick(lists["step"], idx),
        lr=group["lr"],
        beta1=beta1,
        beta2=beta2,
        eps=group["eps"],
        weight_decay=group["weight_decay"],
        amsgrad=amsgrad,
        maximize=group["maximize"],
        decoupled_weight_decay=group.get("decoupled_weight_decay", type(opt) is torch.optim.AdamW),
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


RESTORE_STEPS = {"sgd": restore_sgd_step, "adam": restore_adam_step}


# -- the fast path: the same ops through the bucket's C++ handle (csrc/fast_path.cpp) ---------
#
# Only in the steady state, where the step creates no state: every state tensor exists in the
# parameters' dtype and device, and the handle holds their lists (loaded once, again after the
# bucket's cache was rebuilt). Anything else answers NOT_READY and the Python path runs.


def fast_sgd_step(opt: Optimizer, group: dict, bucket: Bucket, grad_scale: Tensor | None,
                  found_inf: Tensor | None) -> int:
    """:func:`restore_sgd_step` of a whole bucket through its handle: OK, or (nothing
    touched) NOT_READY, INCOMPLETE or LAYOUT_CHANGED."""
    momentum = group["momentum"]
    if momentum != 0:
        cache = bucket.cache
        if not cache.get("momentum_complete") or cache["momentum_mismatch"]:
            return plan.NOT_READY
        if cache.get("fast") != "sgd":
            plan.fast.bucket_set(bucket.fast, plan.fast.MOMENTUM_BUFFER, cache["momentum_buffer"])
            cache["fast"] = "sgd"
    return plan.fast.restore_sgd(bucket.fast, group["lr"], momentum, group["dampening"],
                                 group["weight_decay"], group["nesterov"], group["maximize"],
                                 grad_scale, found_inf)


def fast_adam_step(opt: Optimizer, group: dict, bucket: Bucket, grad_scale: Tensor | None,
                   found_inf: Tensor | None) -> int:
    """:func:`restore_adam_step` of a whole bucket through its handle (as :func:`fast_sgd_step`)."""
    cache = bucket.cache
    lists = cache.get("adam")
    if lists is None or lists["fresh"] or lists["mismatch"]:
        return plan.NOT_READY
    amsgrad = group["amsgrad"]
    if cache.get("fast") != ("adam", amsgrad):
        if amsgrad and any(t is None for t in lists["max_exp_avg_sq"]):
            return plan.NOT_READY
        fast = plan.fast
        fast.bucket_set(bucket.fast, fast.EXP_AVG, lists["exp_avg"])
        fast.bucket_set(bucket.fast, fast.EXP_AVG_SQ, lists["exp_avg_sq"])
        fast.bucket_set(bucket.fast, fast.STATE_STEP, lists["step"])
        fast.bucket_set(bucket.fast, fast.MAX_EXP_AVG_SQ, lists["max_exp_avg_sq"] if amsgrad
                        else None)
        cache["fast"] = ("adam", amsgrad)
    beta1, beta2 = group["betas"]
    return plan.fast.restore_adamw(
        bucket.fast, group["lr"], beta1, beta2, group["eps"], group["weight_decay"], amsgrad,
        group["maximize"],
        group.get("decoupled_weight_decay", type(opt) is torch.optim.AdamW),
        grad_scale, found_inf)


FAST_STEPS = {"sgd": fast_sgd_step, "adam": fast_adam_step}
