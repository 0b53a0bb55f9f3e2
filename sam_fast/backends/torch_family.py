"""The ``torch`` backend of the SAM family's generic ops (docs/family.md, "The ops").

The executable specification of three multi-tensor ops that GSAM, WSAM,
LookSAM and Friendly-SAM are built from (docs/family.md). Each function
receives one group of tensors that share a device and a dtype (the public ops
in :mod:`sam_fast.family_ops` group and validate), computes in fp32 (fp64 for
fp64 storage) whatever the storage dtype, rounds every output once, and never
reads a device value on the host.

- :func:`dot_sumsq`: ``[<a, b>, |a|^2, |b|^2]`` in one pass;
- :func:`combine_`: ``a <- coef[0] * a + coef[1] * b`` with device coefficients;
- :func:`ema_residual_`: ``m <- decay * m + (1 - decay) * g``, then
  ``g <- g - sigma * m`` (the updated or the previous ``m``), returning ``|g|^2``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .torch_ops import TensorList, _math_dtype, _widen, powsum


def dot_sumsq(a: TensorList, b: TensorList) -> Tensor:
    """``[<a, b>, |a|^2, |b|^2]`` over every tensor, as one 1-dim tensor of 3 elements
    (fp32; fp64 for fp64 storage)."""
    if len(a) == 0:
        raise ValueError("dot_sumsq needs at least one tensor")
    acc = _math_dtype(a[0].dtype)
    wa, wb = _widen(a), _widen(b)
    dots = [torch.linalg.vecdot(x.reshape(-1), y.reshape(-1)) for x, y in zip(wa, wb)]
    sq_a = powsum(a, acc)
    sq_b = powsum(b, acc)
    return torch.stack([torch.stack(dots).sum(), torch.stack(sq_a).sum(),
                        torch.stack(sq_b).sum()]).to(acc)


def combine_(a: TensorList, b: TensorList, coef: Tensor) -> None:
    """``a <- coef[0] * a + coef[1] * b``, ``coef`` a device tensor of two elements (its
    values are never read on the host). The products are rounded in the math dtype and
    their sum once more, then once to the storage dtype."""
    if len(a) == 0:
        return
    device, math = a[0].device, _math_dtype(a[0].dtype)
    c = coef.to(device=device, dtype=math, non_blocking=True)
    wa, wb = _widen(a), _widen(b)
    out = torch._foreach_mul(wa, c[0])
    torch._foreach_add_(out, torch._foreach_mul(wb, c[1]))
    torch._foreach_copy_(list(a), out)


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
    """``u = g / grad_scale`` (``g`` when None); ``m' = decay * m + (1 - decay) * u``;
    ``g <- u - sigma * (m' if updated else m)``; ``m <- m'``. Returns ``|g|^2`` of the
    written ``g`` as a 0-dim tensor (fp32; fp64 for fp64 storage).

    Where ``skip`` (a 0-dim device tensor) is non-zero nothing is written and the result
    is NaN: a skipped step (GradScaler found inf/NaN in ``g``) leaves the average clean and
    reports a non-finite norm, which the perturbation reads as "skip"."""
    if len(m) == 0:
        raise ValueError("ema_residual_ needs at least one tensor")
    device, math = m[0].device, _math_dtype(m[0].dtype)
    u = _widen(g)
    if grad_scale is not None:
        inv = torch.reciprocal(grad_scale.to(device=device, dtype=math))
        u = torch._foreach_mul(u, inv)
    old = _widen(m)  # m itself in its math dtype: nothing writes it before the end
    new = torch._foreach_mul(old, decay)
    torch._foreach_add_(new, torch._foreach_mul(u, 1.0 - decay))
    ref = new if updated else old
    d = torch._foreach_sub(u, torch._foreach_mul(ref, sigma))
    # The direction as stored (rounded to the storage dtype) is what the norm measures.
    stored = d if all(x.dtype == math for x in g) else [t.to(x.dtype) for t, x in zip(d, g)]
    total = torch.stack(powsum(stored, math)).sum()
    if skip is None:
        torch._foreach_copy_(list(m), new)
        torch._foreach_copy_(list(g), stored)
        return total
    flag = skip.to(device=device, non_blocking=True) != 0
    for dst, src in zip(m, new):
        dst.copy_(torch.where(flag, dst, src.to(dst.dtype)))
    for dst, src in zip(g, stored):
        dst.copy_(torch.where(flag, dst, src))
    return torch.where(flag, torch.full_like(total, float("nan")), total)


OPS = {
    "dot_sumsq": dot_sumsq,
    "combine_": combine_,
    "ema_residual_": ema_residual_,
}
