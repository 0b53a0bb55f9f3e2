"""The ``triton`` backend: the ops of docs/design.md section 3 as multi-tensor Triton kernels.

Each op receives one (device, dtype) group (the public ops in
:mod:`sam_fast.ops` group and validate) with the exact signature and meaning
of its counterpart in :mod:`.torch_ops`, the executable specification. The
kernels live in ``sam_fast.kernels`` (the repository's top-level
``kernels/``); this module decides what they can serve and launches them.

What the kernels do not serve goes to the torch backend, so every call is
answered correctly:

- fp64 storage: whole groups are delegated to :mod:`.torch_ops` (fp64 math
  there; the kernels compute in fp32);
- positions whose tensors the kernels cannot address as one dense run of
  ``numel`` elements (non-contiguous slices, expanded views, layouts that
  differ between a parameter and its gradient or state) or whose state dtype
  differs from the parameter's: those positions alone are handed to
  :mod:`.torch_ops`, the rest of the group still runs in one launch
  (channels-last and other dense permuted layouts run in the kernels).

Availability: on ``cuda`` when Triton imports (and the kernels were not built
for the interpreter); on ``cpu`` only through Triton's interpreter, i.e. when
``TRITON_INTERPRET=1`` was set before sam_fast was imported (how CI tests the
kernels). This module never fails to import: without Triton it registers the
reason instead.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from .. import dispatch
from . import torch_ops
from .torch_ops import TensorList


def _load_kernels() -> ModuleType:
    """``sam_fast.kernels``: in a source checkout (``pyproject.toml`` and ``kernels/``
    beside ``sam_fast/``), the checkout's own ``kernels/``; otherwise as installed
    (wheel or ``pip install -e``).

    The checkout comes first because an editable install maps ``sam_fast.kernels``
    to the checkout it was made from: another checkout of the project (a git
    worktree) run against that environment would otherwise pair its own
    ``sam_fast`` with the other checkout's kernels.
    """
    root = Path(__file__).resolve().parents[2]
    init = root / "kernels" / "__init__.py"
    if not ((root / "pyproject.toml").is_file() and init.is_file()):
        try:
            return importlib.import_module("sam_fast.kernels")
        except ModuleNotFoundError as exc:
            if exc.name != "sam_fast.kernels":
                raise
    spec = importlib.util.spec_from_file_location(
        "sam_fast.kernels", init, submodule_search_locations=[str(init.parent)]
    )
    if not init.is_file() or spec is None or spec.loader is None:
        raise ModuleNotFoundError("sam_fast.kernels is not installed", name="sam_fast.kernels")
    module = importlib.util.module_from_spec(spec)
    sys.modules["sam_fast.kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["sam_fast.kernels"]
        raise
    return module


kernels: ModuleType | None
try:
    import triton.language as tl

    kernels = _load_kernels()
    from triton.runtime.interpreter import InterpretedFunction

    _INTERPRETED = isinstance(kernels.perturb._perturb_kernel, InterpretedFunction)
    _IMPORT_ERROR: str | None = None
except Exception as exc:  # no Triton, or a Triton that cannot load here: never fail
    kernels = None
    _INTERPRETED = False
    _IMPORT_ERROR = f"Triton is not usable here ({type(exc).__name__}: {exc}); pip install triton"


def unavailable_reason(device_type: str, explicit: bool = True) -> str | None:
    """None when the kernels can run on ``device_type``, else why not."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device_type == "cpu":
        if not _INTERPRETED:
            return ("on the CPU the Triton kernels run only in Triton's interpreter: set "
                    "TRITON_INTERPRET=1 before importing sam_fast")
        return None
    if device_type == "cuda":
        if _INTERPRETED:
            return ("TRITON_INTERPRET=1 was set when sam_fast was imported: the interpreted "
                    "kernels cannot follow device pointers; unset it to use CUDA")
        return None
    return f"the Triton kernels target CUDA devices, not {device_type!r}"


# -- plans: which positions the kernels serve, through which cached table -------------------

if kernels is not None:
    _TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16,
                 torch.float16: tl.float16}
    # Integer types of the storage width, for bit-exact copies.
    _BITS = {torch.float32: tl.int32, torch.bfloat16: tl.int16, torch.float16: tl.int16}
    _STEP_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}
    CACHE = kernels.tables.TableCache()
    """The process-wide cache of plans, block maps and address rows (docs/triton.md)."""


def _delegated(t: Tensor) -> bool:
    """fp64 (or anything else the kernels do not store) goes to the torch backend."""
    return t.dtype not in _TL_DTYPE


def _plan(lists: Sequence[TensorList], n_elementwise: int | None = None,
          list_dtypes: tuple[torch.dtype | None, ...] | None = None) -> Any:
    """``(plan, table)`` for these operand lists (``kernels.tables.TableCache.table``):
    which positions the kernels serve, and the block map and address rows they read
    (``list_dtypes``: a list whose operands are not the group's dtype, by position).

    Cached by sizes and layouts (the plan, the block map) and by each list's
    addresses (its row), so that re-allocated gradients cost one small upload.
    """
    assert kernels is not None
    return CACHE.table(lists, n_elementwise, list_dtypes)


def _pick(lst: TensorList, idx: Sequence[int]) -> list[Tensor]:
    return [lst[i] for i in idx]


def _pick_opt(lst: TensorList | None, idx: Sequence[int]) -> list[Tensor] | None:
    return None if lst is None else [lst[i] for i in idx]


def _on(t: Tensor, device: torch.device) -> Tensor:
    """A device scalar on ``device`` (already there: returned as is, no launch)."""
    return t if t.device == device else t.to(device=device, non_blocking=True)


def _on_opt(t: Tensor | None, device: torch.device) -> Tensor | None:
    return None if t is None else _on(t, device)


def _guard(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Launch on the tensors' GPU: Triton launches on the current CUDA device."""
    if device.type == "cuda" and device.index is not None and (
            device.index != torch.cuda.current_device()):
        return torch.cuda.device(device)
    return contextlib.nullcontext()


# -- the ops (signatures and meaning: torch_ops) --------------------------------------------


def grad_sumsq(grads: TensorList, params: TensorList | None = None, eta: float = 0.0) -> Tensor:
    """Sum of squares of ``g`` (or of ``(|w| + eta) * g`` when params are given), fp32,
    as a 0-dim device tensor; deterministic (per-block partials, one ordered pass)."""
    if len(grads) == 0:
        raise ValueError("grad_sumsq needs at least one tensor")
    if _delegated(grads[0]):
        return torch_ops.grad_sumsq(grads, params, eta)
    assert kernels is not None
    lists = [grads] if params is None else [grads, params]
    plan, table = _plan(lists)
    device = grads[0].device
    total = None
    if table is not None:
        with _guard(device):
            total = kernels.norm.sumsq(table, _TL_DTYPE[grads[0].dtype],
                                       None if params is None else eta)
    if plan.other:
        rest = torch_ops.grad_sumsq(_pick(grads, plan.other), _pick_opt(params, plan.other), eta)
        total = rest if total is None else total + rest
    if total is None:  # nothing but empty tensors
        total = torch.zeros((), dtype=torch.float32, device=device)
    return total


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
    """backups <- w;  w <- w + e(w, g), scaled by ``torch_ops.perturbation_scale`` of
    ``sumsq``, which the kernel derives itself (rounding for rounding); e is exactly 0
    where that scale is 0 (``sumsq`` not finite)."""
    if len(params) == 0:
        return
    if _delegated(params[0]) or sumsq.dtype != torch.float32:
        # fp64 groups, or a sum of squares the spec computes in another precision.
        return torch_ops.perturb_(params, grads, backups, sumsq, rho=rho, eps=eps,
                                  normalize=normalize, eta=eta, grad_scale=grad_scale)
    assert kernels is not None
    plan, table = _plan([params, grads, backups])
    device = params[0].device
    sumsq, grad_scale = _on(sumsq, device), _on_opt(grad_scale, device)
    if plan.other:
        idx = plan.other
        torch_ops.perturb_(_pick(params, idx), _pick(grads, idx), _pick(backups, idx), sumsq,
                           rho=rho, eps=eps, normalize=normalize, eta=eta,
                           grad_scale=grad_scale)
    if table is not None:
        with _guard(device):
            kernels.perturb.perturb(table, _TL_DTYPE[params[0].dtype], sumsq, rho=rho, eps=eps,
                                    normalize=normalize, eta=eta, grad_scale=grad_scale)


def restore_(params: TensorList, backups: TensorList) -> None:
    """w <- backup, bit for bit."""
    if len(params) == 0:
        return
    if _delegated(params[0]):
        return torch_ops.restore_(params, backups)
    assert kernels is not None
    plan, table = _plan([params, backups])
    if plan.other:
        torch_ops.restore_(_pick(params, plan.other), _pick(backups, plan.other))
    if table is not None:
        with _guard(params[0].device):
            kernels.perturb.copy(table, _BITS[params[0].dtype])


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
    """w <- backup, then one ``torch.optim.SGD`` step; ``grad_scale`` and ``found_inf``
    are read by the kernel from device memory."""
    if len(params) == 0:
        return
    if _delegated(params[0]):
        return torch_ops.restore_sgd_(
            params, backups, grads, momentum_buffers, lr=lr, momentum=momentum,
            dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, init_buffers=init_buffers, grad_scale=grad_scale,
            found_inf=found_inf)
    assert kernels is not None
    device = params[0].device
    grad_scale, found_inf = _on_opt(grad_scale, device), _on_opt(found_inf, device)
    buffers = momentum_buffers if momentum != 0 else None
    plan, table = _plan([params, backups, grads] + ([buffers] if buffers is not None else []))
    if plan.other:
        idx = plan.other
        torch_ops.restore_sgd_(
            _pick(params, idx), _pick(backups, idx), _pick(grads, idx), _pick_opt(buffers, idx),
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, init_buffers=init_buffers,
            grad_scale=grad_scale, found_inf=found_inf)
    if table is not None:
        with _guard(device):
            kernels.sgd.restore_sgd(
                table, _TL_DTYPE[params[0].dtype], lr=lr, momentum=momentum,
                dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                maximize=maximize, init_buffers=init_buffers, grad_scale=grad_scale,
                found_inf=found_inf)


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

    Step counters on the CPU (non-capturable Adam): the bias corrections are
    computed on the host from them, as the torch backend does (not a device
    sync); with ``found_inf`` the flag must then be read on the host, the one
    sync of that path, as in the torch backend. Counters on the device: the
    kernel reads them, nothing is read on the host.
    """
    if len(params) == 0:
        return
    _restore_adam(params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                  AdamOptions(lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                              decoupled_weight_decay),
                  grad_scale=grad_scale, found_inf=found_inf,
                  steps_on_device=state_steps[0].device.type != "cpu")


@dataclass(frozen=True)
class AdamOptions:
    """The keyword options of :func:`restore_adamw_`, passed on as they are."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    decoupled_weight_decay: bool

    def run_torch(self, params: TensorList, backups: TensorList, grads: TensorList,
                  exp_avgs: TensorList, exp_avg_sqs: TensorList,
                  max_exp_avg_sqs: TensorList | None, state_steps: TensorList,
                  grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """The torch backend's op with these options."""
        torch_ops.restore_adamw_(
            params, backups, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
            lr=self.lr, beta1=self.beta1, beta2=self.beta2, eps=self.eps,
            weight_decay=self.weight_decay, amsgrad=self.amsgrad, maximize=self.maximize,
            decoupled_weight_decay=self.decoupled_weight_decay, grad_scale=grad_scale,
            found_inf=found_inf)

    def run_kernel(self, table: Any, dtype: Any, *, grad_scale: Tensor | None,
                   found_inf: Tensor | None, step_dtype: Any = None,
                   host_step_size: float = 0.0, host_bc2_sqrt: float = 1.0) -> None:
        """The fused kernel with these options (see ``kernels.adam.restore_adam``)."""
        assert kernels is not None
        with _guard(table.blocks.device):
            kernels.adam.restore_adam(
                table, dtype, lr=self.lr, beta1=self.beta1, beta2=self.beta2, eps=self.eps,
                weight_decay=self.weight_decay, amsgrad=self.amsgrad, maximize=self.maximize,
                decoupled_weight_decay=self.decoupled_weight_decay, grad_scale=grad_scale,
                found_inf=found_inf, step_dtype=step_dtype, host_step_size=host_step_size,
                host_bc2_sqrt=host_bc2_sqrt)


def _restore_adam(params: TensorList, backups: TensorList, grads: TensorList,
                  exp_avgs: TensorList, exp_avg_sqs: TensorList,
                  max_exp_avg_sqs: TensorList | None, state_steps: TensorList,
                  options: AdamOptions, *, grad_scale: Tensor | None, found_inf: Tensor | None,
                  steps_on_device: bool) -> None:
    """:func:`restore_adamw_` with the counters' home given (tests force the device
    path on CPU tensors, where the interpreter reads host memory either way)."""
    device = params[0].device
    vmax = max_exp_avg_sqs if options.amsgrad else None
    if steps_on_device:
        # The kernel reads every counter with one element type, on the params' device.
        step_dtypes = {s.dtype for s in state_steps}
        steps_ok = (len(step_dtypes) == 1 and step_dtypes <= _STEP_DTYPE.keys()
                    and all(s.device == device for s in state_steps))
    else:
        steps_ok = True
    if _delegated(params[0]) or not steps_ok:
        return options.run_torch(params, backups, grads, exp_avgs, exp_avg_sqs, vmax,
                                 state_steps, grad_scale, found_inf)
    grad_scale, found_inf = _on_opt(grad_scale, device), _on_opt(found_inf, device)
    if not steps_on_device and found_inf is not None:
        # Host counters cannot be advanced conditionally without reading the flag:
        # the one sync of this path, exactly as in the torch backend.
        if bool(found_inf):
            restore_(params, backups)
            return
        found_inf = None
    lists: list[TensorList] = [params, backups, grads, exp_avgs, exp_avg_sqs]
    if vmax is not None:
        lists.append(vmax)
    n_elementwise = len(lists)
    if steps_on_device:
        lists.append(state_steps)  # the counters' addresses: a row of their own, the last
    plan, kernel_table = _plan(lists, n_elementwise)
    if plan.other:
        idx = plan.other
        options.run_torch(_pick(params, idx), _pick(backups, idx), _pick(grads, idx),
                          _pick(exp_avgs, idx), _pick(exp_avg_sqs, idx), _pick_opt(vmax, idx),
                          _pick(state_steps, idx), grad_scale, found_inf)
    steps = _pick(state_steps, plan.kernel)
    if kernel_table is None:
        # Nothing to compute (every tensor is empty), but Adam counts the step all the same.
        if steps:
            torch._foreach_add_(steps, 1 if found_inf is None
                                else (found_inf == 0).to(steps[0].dtype))
        return
    dtype = _TL_DTYPE[params[0].dtype]
    if steps_on_device:
        if found_inf is None:
            torch._foreach_add_(steps, 1)
        else:
            torch._foreach_add_(steps, (found_inf == 0).to(steps[0].dtype))
        options.run_kernel(kernel_table, dtype, grad_scale=grad_scale, found_inf=found_inf,
                           step_dtype=_STEP_DTYPE[steps[0].dtype])
        return
    torch._foreach_add_(steps, 1)
    counts = torch.stack(steps).tolist()  # host tensors: no device sync
    by_count: dict[float, list[int]] = {}
    for j, c in enumerate(counts):
        by_count.setdefault(c, []).append(j)
    for count, members in by_count.items():
        # Counters usually agree (one launch); otherwise one launch per distinct count.
        table = kernel_table
        if len(members) != len(counts):
            table = _plan([_pick(_pick(lst, plan.kernel), members)
                           for lst in lists[:n_elementwise]])[1]
        # The torch backend's (and torch.optim.Adam's) host formulas, in double.
        step_size = (options.lr / (1 - options.beta1**count)) * -1
        bc2_sqrt = (1 - options.beta2**count) ** 0.5
        options.run_kernel(table, dtype, grad_scale=grad_scale, found_inf=None,
                           host_step_size=step_size, host_bc2_sqrt=bc2_sqrt)


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
    """backups <- x;  ys <- SGD's look-ahead of x with g_y (buffers read only);
    params <- x + scale * g_y, the scale ``rho / (sqrt(sumsq) + eps)`` derived in the
    kernel (x unchanged where ``sumsq`` is not finite); one pass."""
    if len(params) == 0:
        return
    if _delegated(params[0]) or sumsq.dtype != torch.float32:
        return torch_ops.sampa_points_(
            params, grads_y, momentum_buffers, backups, ys, sumsq, rho=rho, eps=eps, lr=lr,
            momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, init_buffers=init_buffers)
    assert kernels is not None
    device = params[0].device
    sumsq = _on(sumsq, device)
    buffers = momentum_buffers if momentum != 0 and not init_buffers else None
    plan, table = _plan([params, grads_y, backups, ys]
                        + ([buffers] if buffers is not None else []))
    if plan.other:
        idx = plan.other
        torch_ops.sampa_points_(
            _pick(params, idx), _pick(grads_y, idx), _pick_opt(buffers, idx),
            _pick(backups, idx), _pick(ys, idx), sumsq, rho=rho, eps=eps, lr=lr,
            momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, init_buffers=init_buffers)
    if table is not None:
        with _guard(device):
            kernels.sampa.points(
                table, _TL_DTYPE[params[0].dtype], sumsq, rho=rho, eps=eps, lr=lr,
                momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                nesterov=nesterov, maximize=maximize, init_buffers=init_buffers)


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
    """params <- one ``torch.optim.SGD`` step from x (the backups) with gradient
    ``(1 - lam) * g~ + lam * g_y``; the momentum buffers are updated."""
    if len(params) == 0:
        return
    if _delegated(params[0]):
        return torch_ops.sampa_update_(
            params, backups, grads_tilde, grads_y, momentum_buffers, lam=lam, lr=lr,
            momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, init_buffers=init_buffers)
    assert kernels is not None
    buffers = momentum_buffers if momentum != 0 else None
    plan, table = _plan([params, backups, grads_tilde, grads_y]
                        + ([buffers] if buffers is not None else []))
    if plan.other:
        idx = plan.other
        torch_ops.sampa_update_(
            _pick(params, idx), _pick(backups, idx), _pick(grads_tilde, idx),
            _pick(grads_y, idx), _pick_opt(buffers, idx), lam=lam, lr=lr, momentum=momentum,
            dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            maximize=maximize, init_buffers=init_buffers)
    if table is not None:
        with _guard(params[0].device):
            kernels.sampa.update(
                table, _TL_DTYPE[params[0].dtype], lam=lam, lr=lr, momentum=momentum,
                dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                maximize=maximize, init_buffers=init_buffers)


OPS: dict[str, Callable[..., Any]] = {
    "grad_sumsq": grad_sumsq,
    "perturb_": perturb_,
    "restore_": restore_,
    "restore_sgd_": restore_sgd_,
    "restore_adamw_": restore_adamw_,
    "sampa_points_": sampa_points_,
    "sampa_update_": sampa_update_,
}

dispatch.register_backend("triton", OPS, unavailable_reason=unavailable_reason)

# -- the SAM family's generic ops (issue 13): kernels/family.py, launched by .triton_family ----
from . import triton_family as _family  # noqa: E402  (it reads this module's helpers)

OPS.update(_family.OPS)
dispatch.register_backend("triton", OPS, unavailable_reason=unavailable_reason)

# -- BSAM's ops: kernels/bsam.py, launched by .triton_bsam (fp32 groups; the others: the spec) --
from . import triton_bsam as _bsam  # noqa: E402  (it reads this module's helpers)

OPS.update(_bsam.OPS)
dispatch.register_backend("triton", OPS, unavailable_reason=unavailable_reason)
