"""``torch.optim.SGD``'s update, fused with SAM's restore (``w <- backup``, then the step).

:func:`sgd_direction` is shared with the SAMPa kernels; it follows the torch
backend's ``_sgd_direction`` operation by operation, in fp32.
"""

from __future__ import annotations

import triton.language as tl
from torch import Tensor

from .common import (amp_args, amp_scalars, chunk_of, device_fn, kernel, mul_rn, operand,
                     to_storage)
from .tables import BLOCK, CHUNK, LAUNCH, Table


@device_fn
def sgd_direction(x, g, buf, momentum, one_minus_dampening, weight_decay, maximize, init,
                  HAS_WD: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr):
    """(d, new momentum buffer) of torch.optim.SGD; the buffer is ``d`` when unused.

    ``maximize`` and ``init`` (the first step: the buffer becomes ``d``, its old
    contents unused) are runtime flags: selects, not arithmetic, so they cost no
    kernel variant and change no rounding. Weight decay stays a constexpr: ``d + 0 * x``
    is not ``d`` (NaN where x is infinite, +0 where d is -0).
    """
    d = tl.where(maximize, -g, g)
    if HAS_WD:
        d = d + weight_decay * x
    new_buf = d
    if MOMENTUM:
        new_buf = tl.where(init, d, buf * momentum + one_minus_dampening * d)
        if NESTEROV:
            d = d + momentum * new_buf
        else:
            d = new_buf
    return d, new_buf


@device_fn
def _restore_sgd_block(p, b, g, m, offs, mask, keep, inv_scale, lr, momentum,
                       one_minus_dampening, weight_decay, maximize, init, DT: tl.constexpr,
                       HAS_WD: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr):
    x_raw = tl.load(b + offs, mask=mask)
    x = x_raw.to(tl.float32)
    # inv_scale is 1.0 without a grad scale: exact, and never contracted (mul_rn).
    grad = mul_rn(tl.load(g + offs, mask=mask).to(tl.float32), inv_scale)
    buf_raw = x_raw  # not read without MOMENTUM
    if MOMENTUM:
        buf_raw = tl.load(m + offs, mask=mask)
    d, new_buf = sgd_direction(x, grad, buf_raw.to(tl.float32), momentum, one_minus_dampening,
                               weight_decay, maximize, init, HAS_WD, MOMENTUM, NESTEROV)
    new_x = to_storage(x + (-lr) * d, DT)
    new_buf = to_storage(new_buf, DT)
    # A skipped step (keep false: found_inf set) restores w (the backup's bits) and
    # leaves the buffers as they were: their old bits are written back, so the stores
    # need no extra mask (a scalar-and-vector mask the interpreter mishandles).
    new_x = tl.where(keep, new_x, x_raw)
    new_buf = tl.where(keep, new_buf, buf_raw)
    if MOMENTUM:
        tl.store(m + offs, new_buf, mask=mask)
    tl.store(p + offs, new_x, mask=mask)


@kernel
def _restore_sgd_kernel(blocks, B, p_row, b_row, g_row, m_row, grad_scale, found_inf, lr,
                        momentum, one_minus_dampening, weight_decay, has_scale, has_inf,
                        maximize, init, DT: tl.constexpr, HAS_WD: tl.constexpr,
                        MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, ALIGNED: tl.constexpr,
                        BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    t, start, rem = chunk_of(blocks, B, CHUNK)
    p = operand(p_row, t, start, DT, ALIGNED)
    b = operand(b_row, t, start, DT, ALIGNED)
    g = operand(g_row, t, start, DT, ALIGNED)
    m = p
    if MOMENTUM:
        m = operand(m_row, t, start, DT, ALIGNED)
    inv_scale, keep = amp_scalars(grad_scale, found_inf, has_scale, has_inf)
    n_full = (rem // BLOCK) * BLOCK
    for off in tl.range(0, n_full, BLOCK):
        _restore_sgd_block(p, b, g, m, off + tl.arange(0, BLOCK), None, keep, inv_scale, lr,
                           momentum, one_minus_dampening, weight_decay, maximize, init, DT,
                           HAS_WD, MOMENTUM, NESTEROV)
    if n_full < rem:
        offs = n_full + tl.arange(0, BLOCK)
        _restore_sgd_block(p, b, g, m, offs, offs < rem, keep, inv_scale, lr, momentum,
                           one_minus_dampening, weight_decay, maximize, init, DT, HAS_WD,
                           MOMENTUM, NESTEROV)


def restore_sgd(table: Table, dtype: tl.dtype, *, lr: float, momentum: float, dampening: float,
                weight_decay: float, nesterov: bool, maximize: bool, init_buffers: bool,
                grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    """Operands (params, backups, grads[, momentum_buffers])."""
    rows = table.rows
    has_momentum = momentum != 0
    _restore_sgd_kernel[(table.n_blocks,)](
        table.blocks, table.n_blocks, rows[0], rows[1], rows[2],
        rows[3] if has_momentum else rows[0],  # never read without MOMENTUM
        *amp_args(table, grad_scale, found_inf),
        float(lr), float(momentum), 1.0 - float(dampening), float(weight_decay),
        grad_scale is not None, found_inf is not None, bool(maximize),
        bool(init_buffers) and has_momentum,
        DT=dtype, HAS_WD=weight_decay != 0, MOMENTUM=has_momentum,
        NESTEROV=bool(nesterov) and has_momentum, ALIGNED=table.aligned, BLOCK=BLOCK,
        CHUNK=CHUNK, **LAUNCH,
    )
