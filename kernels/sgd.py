"""``torch.optim.SGD``'s update, fused with SAM's restore (``w <- backup``, then the step).

:func:`sgd_direction` is shared with the SAMPa kernels; it follows the torch
backend's ``_sgd_direction`` operation by operation, in fp32.
"""

from __future__ import annotations

import triton.language as tl
from torch import Tensor

from .common import chunk_of, device_fn, kernel, operand, to_storage
from .tables import BLOCK, CHUNK, LAUNCH, Table


@device_fn
def sgd_direction(x, g, buf, momentum, one_minus_dampening, weight_decay,
                  HAS_WD: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                  MAXIMIZE: tl.constexpr, INIT: tl.constexpr):
    """(d, new momentum buffer) of torch.optim.SGD; the buffer is ``d`` when unused."""
    d = g
    if MAXIMIZE:
        d = -g
    if HAS_WD:
        d = d + weight_decay * x
    new_buf = d
    if MOMENTUM:
        if not INIT:
            new_buf = buf * momentum + one_minus_dampening * d
        if NESTEROV:
            d = d + momentum * new_buf
        else:
            d = new_buf
    return d, new_buf


@device_fn
def _restore_sgd_block(p, b, g, m, offs, mask, keep, inv_scale, lr, momentum,
                       one_minus_dampening, weight_decay, DT: tl.constexpr,
                       HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, HAS_WD: tl.constexpr,
                       MOMENTUM: tl.constexpr,
                       NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, INIT: tl.constexpr):
    x_raw = tl.load(b + offs, mask=mask)
    x = x_raw.to(tl.float32)
    grad = tl.load(g + offs, mask=mask).to(tl.float32)
    if HAS_SCALE:
        grad = grad * inv_scale
    buf_raw = x_raw  # not read unless the buffers are
    if MOMENTUM and (HAS_INF or not INIT):
        buf_raw = tl.load(m + offs, mask=mask)
    d, new_buf = sgd_direction(x, grad, buf_raw.to(tl.float32), momentum, one_minus_dampening,
                               weight_decay, HAS_WD, MOMENTUM, NESTEROV, MAXIMIZE, INIT)
    new_x = to_storage(x + (-lr) * d, DT)
    new_buf = to_storage(new_buf, DT)
    if HAS_INF:
        # A skipped step restores w (the backup's bits) and leaves the buffers as
        # they were: their old bits are written back, so the stores need no
        # extra mask (a scalar-and-vector mask the interpreter mishandles).
        new_x = tl.where(keep, new_x, x_raw)
        new_buf = tl.where(keep, new_buf, buf_raw)
    if MOMENTUM:
        tl.store(m + offs, new_buf, mask=mask)
    tl.store(p + offs, new_x, mask=mask)


@kernel
def _restore_sgd_kernel(blocks, B, p_row, b_row, g_row, m_row, grad_scale, found_inf, lr,
                        momentum, one_minus_dampening, weight_decay, DT: tl.constexpr,
                        HAS_SCALE: tl.constexpr, HAS_INF: tl.constexpr, HAS_WD: tl.constexpr,
                        MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                        INIT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                        CHUNK: tl.constexpr):
    t, start, rem = chunk_of(blocks, B, CHUNK)
    p = operand(p_row, t, start, DT, ALIGNED)
    b = operand(b_row, t, start, DT, ALIGNED)
    g = operand(g_row, t, start, DT, ALIGNED)
    m = p
    if MOMENTUM:
        m = operand(m_row, t, start, DT, ALIGNED)
    # Device scalars, read here so that the step needs no host sync.
    inv_scale = 1.0
    if HAS_SCALE:
        inv_scale = tl.math.div_rn(1.0, tl.load(grad_scale).to(tl.float32))
    keep = False  # unused unless HAS_INF
    if HAS_INF:
        keep = tl.load(found_inf) == 0
    n_full = (rem // BLOCK) * BLOCK
    for off in tl.range(0, n_full, BLOCK):
        _restore_sgd_block(p, b, g, m, off + tl.arange(0, BLOCK), None, keep, inv_scale, lr,
                           momentum, one_minus_dampening, weight_decay, DT, HAS_SCALE, HAS_INF,
                           HAS_WD, MOMENTUM, NESTEROV, MAXIMIZE, INIT)
    if n_full < rem:
        offs = n_full + tl.arange(0, BLOCK)
        _restore_sgd_block(p, b, g, m, offs, offs < rem, keep, inv_scale, lr, momentum,
                           one_minus_dampening, weight_decay, DT, HAS_SCALE, HAS_INF, HAS_WD,
                           MOMENTUM, NESTEROV, MAXIMIZE, INIT)


def restore_sgd(table: Table, dtype: tl.dtype, *, lr: float, momentum: float, dampening: float,
                weight_decay: float, nesterov: bool, maximize: bool, init_buffers: bool,
                grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    """Operands (params, backups, grads[, momentum_buffers])."""
    rows = table.rows
    dummy = table.blocks  # stands in for absent device scalars; never read
    _restore_sgd_kernel[(table.n_blocks,)](
        table.blocks, table.n_blocks, rows[0], rows[1], rows[2],
        rows[3] if momentum != 0 else rows[0],  # never read without MOMENTUM
        dummy if grad_scale is None else grad_scale, dummy if found_inf is None else found_inf,
        float(lr), float(momentum), 1.0 - float(dampening), float(weight_decay),
        DT=dtype, HAS_SCALE=grad_scale is not None, HAS_INF=found_inf is not None,
        HAS_WD=weight_decay != 0, MOMENTUM=momentum != 0, NESTEROV=bool(nesterov),
        MAXIMIZE=bool(maximize), INIT=bool(init_buffers), ALIGNED=table.aligned, BLOCK=BLOCK,
        CHUNK=CHUNK, **LAUNCH,
    )
