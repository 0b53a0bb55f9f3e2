"""The SAM family's generic fused ops (docs/family.md), callable on any tensor lists.

Three multi-tensor ops of docs/design.md section 3's contract (fp32 math whatever the
storage dtype, no host sync, device scalars stay on the device, deterministic
reductions) from which GSAM, WSAM, LookSAM and Friendly-SAM are built:

- :func:`dot_sumsq` -- ``[<a, b>, |a|^2, |b|^2]`` of two aligned lists in one pass;
- :func:`combine_` -- ``a <- coef[0] * a + coef[1] * b`` (GSAM's ``g_adv - alpha g_perp``,
  WSAM's weighted gradient, LookSAM's kept component and its reuse), the coefficients
  a device tensor;
- :func:`ema_residual_` -- the running average ``m <- decay m + (1 - decay) g`` and the
  residual ``g <- g - sigma m`` fused with its squared norm (Friendly-SAM).

Their schemas are registered here with ``torch.library`` in the ``sam_fast`` namespace
(``torch.ops.sam_fast.dot_sumsq`` ...), with the torch specification
(:mod:`sam_fast.backends.torch_family`) as the ``CompositeExplicitAutograd`` kernel and
fake implementations for FakeTensor / ``torch.compile`` / ``opcheck``. They live here, not
in csrc/ops.cpp's ``TORCH_LIBRARY``, so that the ops exist without ``sam_fast._C``. When
it is built, ``sam_fast._C`` registers their C++ CPU and CUDA kernels
(``TORCH_LIBRARY_IMPL(sam_fast, CPU|CUDA)``, csrc/cpu/ops_cpu.cpp and
csrc/cuda/ops_cuda.cu; fp64 storage included), which take precedence over the composite
one, and the Autograd / ADInplaceOrView kernels of the other ops (an update under grad
mode with an input that requires grad is refused; written lists get their version
counters bumped).

The public functions below group the lists by (device, dtype) and hand each group to
the backend chosen by :mod:`sam_fast.dispatch`: ``torch`` (the specification),
``triton`` (kernels/family.py), ``cpp`` and ``cuda`` (the compiled kernels, through
``torch.ops.sam_fast``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from . import dispatch
from .backends import torch_family
from .distributed import all_reduce_sumsq, is_dtensor, locals_of
from .ops import group_by_device_and_dtype

TensorList = Sequence[Tensor]

__all__ = ["dot_sumsq", "combine_", "ema_residual_"]

# -- schemas ---------------------------------------------------------------------------------

_LIB = torch.library.Library("sam_fast", "FRAGMENT")
_LIB.define("dot_sumsq(Tensor[] a, Tensor[] b) -> Tensor")
_LIB.define("combine_(Tensor(a!)[] a, Tensor[] b, Tensor coef) -> ()")
_LIB.define("ema_residual_(Tensor(a!)[] m, Tensor(b!)[] g, float decay, float sigma, "
            "bool updated, Tensor? grad_scale, Tensor? skip) -> Tensor")


def _dot_sumsq_impl(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return torch_family.dot_sumsq(a, b)


def _combine_impl(a: list[Tensor], b: list[Tensor], coef: Tensor) -> None:
    torch_family.combine_(a, b, coef)


def _ema_residual_impl(m: list[Tensor], g: list[Tensor], decay: float, sigma: float,
                       updated: bool, grad_scale: Tensor | None, skip: Tensor | None) -> Tensor:
    return torch_family.ema_residual_(m, g, decay=decay, sigma=sigma, updated=updated,
                                      grad_scale=grad_scale, skip=skip)


_LIB.impl("dot_sumsq", _dot_sumsq_impl, "CompositeExplicitAutograd")
_LIB.impl("combine_", _combine_impl, "CompositeExplicitAutograd")
_LIB.impl("ema_residual_", _ema_residual_impl, "CompositeExplicitAutograd")


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


@torch.library.register_fake("sam_fast::dot_sumsq")
def _dot_sumsq_fake(a: list[Tensor], b: list[Tensor]) -> Tensor:
    return a[0].new_empty((3,), dtype=_acc_dtype(a[0]))


@torch.library.register_fake("sam_fast::combine_")
def _combine_fake(a: list[Tensor], b: list[Tensor], coef: Tensor) -> None:
    return None


@torch.library.register_fake("sam_fast::ema_residual_")
def _ema_residual_fake(m: list[Tensor], g: list[Tensor], decay: float, sigma: float,
                       updated: bool, grad_scale: Tensor | None, skip: Tensor | None) -> Tensor:
    return m[0].new_empty((), dtype=_acc_dtype(m[0]))


# -- the public, grouping ops ------------------------------------------------------------------


def _on(t: Tensor, device: torch.device) -> Tensor:
    return t if t.device == device else t.to(device=device, non_blocking=True)


def _sum_on_home(partials: list[Tensor], home: torch.device) -> Tensor:
    if len(partials) == 1:
        return _on(partials[0], home)
    acc = torch.float64 if any(p.dtype == torch.float64 for p in partials) else torch.float32
    return torch.stack([p.to(home, acc, non_blocking=True) for p in partials]).sum(0)


def _groups(names: tuple[str, str], a: TensorList, b: TensorList, check: bool) -> dict:
    """``(device, dtype) -> (a part, b part)``, keyed by ``a``'s tensors. ``check``: every
    tensor validated (:func:`sam_fast.ops.group_by_device_and_dtype`), as the public ops do
    for any lists. Unchecked: for the family optimizers' own lists (their parameters, checked
    once per layout; the gradients SAM's step has just checked; buffers they made like the
    parameters), where the per-tensor checks cost more than the op on small models."""
    if check:
        return group_by_device_and_dtype(names, (a, b))
    lead = a[0]
    device, dtype = lead.device, lead.dtype
    if all(t.dtype == dtype and t.device == device for t in a):
        return {(device, dtype): (a, b)}
    out: dict = {}
    for x, y in zip(a, b):
        xs, ys = out.setdefault((x.device, x.dtype), ([], []))
        xs.append(x)
        ys.append(y)
    return out


def dot_sumsq(a: TensorList, b: TensorList, *, backend: str = "auto") -> Tensor:
    """``[<a, b>, |a|^2, |b|^2]`` over all tensors of the aligned lists ``a`` and ``b``:
    a 1-dim tensor of three elements, fp32 (fp64 when every tensor is fp64), on the
    device of ``a[0]``. Deterministic (fixed reduction order)."""
    return _dot_sumsq(a, b, backend, check=True)


def _sharded(names: tuple[str, ...], *lists: TensorList) -> bool:
    """Whether the lists hold DTensors (FSDP2); then every tensor of every list must be one,
    and the ops run on the local shards, a reduction completed over the shard groups."""
    if not is_dtensor(lists[0][0]):
        return False
    for name, ts in zip(names, lists):
        if not all(map(is_dtensor, ts)):
            raise TypeError(f"{name}: a list mixes DTensors and plain tensors")
    return True


def _dot_sumsq(a: TensorList, b: TensorList, backend: str, check: bool) -> Tensor:
    if len(a) == 0:
        raise ValueError("dot_sumsq needs at least one tensor")
    sharded = _sharded(("a", "b"), a, b)
    la, lb = (locals_of(a), locals_of(b)) if sharded else (a, b)
    partials = [dispatch.lookup("dot_sumsq", backend, device)(x, y)
                for (device, _), (x, y) in _groups(("a", "b"), la, lb, check).items()]
    total = _sum_on_home(partials, la[0].device)
    return all_reduce_sumsq(total, a) if sharded else total


def combine_(a: TensorList, b: TensorList, coef: Tensor, *, backend: str = "auto") -> None:
    """``a <- coef[0] * a + coef[1] * b`` in place, ``coef`` a tensor of two elements
    (typically derived on the device from :func:`dot_sumsq`; never read on the host)."""
    _combine(a, b, coef, backend, check=True)


def _combine(a: TensorList, b: TensorList, coef: Tensor, backend: str, check: bool) -> None:
    if not isinstance(coef, Tensor) or coef.numel() != 2:
        raise ValueError("combine_: coef must be a tensor of two elements")
    if len(a) and _sharded(("a", "b"), a, b):
        a, b = locals_of(a), locals_of(b)  # elementwise: the shards are the whole story
    for (device, _), (x, y) in _groups(("a", "b"), a, b, check).items():
        dispatch.lookup("combine_", backend, device)(x, y, _on(coef.reshape(2), device))


def ema_residual_(
    m: TensorList,
    g: TensorList,
    *,
    decay: float,
    sigma: float,
    updated: bool = True,
    grad_scale: Tensor | None = None,
    skip: Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """``u = g / grad_scale``; ``m' = decay m + (1 - decay) u``; ``g <- u - sigma m'``
    (``u - sigma m`` with the previous average when not ``updated``); ``m <- m'``.
    Returns ``|g|^2`` of the written residual (0-dim, fp32). Where ``skip`` is non-zero
    nothing is written and the result is NaN."""
    return _ema_residual(m, g, decay, sigma, updated, grad_scale, skip, backend, check=True)


def _ema_residual(m: TensorList, g: TensorList, decay: float, sigma: float, updated: bool,
                  grad_scale: Tensor | None, skip: Tensor | None, backend: str,
                  check: bool) -> Tensor:
    if len(m) == 0:
        raise ValueError("ema_residual_ needs at least one tensor")
    sharded = _sharded(("m", "g"), m, g)
    lm, lg = (locals_of(m), locals_of(g)) if sharded else (m, g)
    partials = []
    for (device, _), (x, y) in _groups(("m", "g"), lm, lg, check).items():
        partials.append(dispatch.lookup("ema_residual_", backend, device)(
            x, y, decay=float(decay), sigma=float(sigma), updated=bool(updated),
            grad_scale=None if grad_scale is None else _on(grad_scale, device),
            skip=None if skip is None else _on(skip, device)))
    total = _sum_on_home(partials, lm[0].device)
    return all_reduce_sumsq(total, m) if sharded else total
