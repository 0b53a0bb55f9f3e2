"""SAMPa's two fused passes with a ``torch.optim.SGD`` base.

- points: from ``x`` and ``g_y``, write ``backup <- x``, ``y <- x - lr * d(x, g_y)``
  (SGD's look-ahead; the momentum buffers are read, never written) and
  ``x~ = x + scale * g_y`` into the params, in one pass, the scale derived in
  the kernel from the sum of squares of ``g_y`` (``perturb.perturbation_scale``);
- update: ``x <- x - lr * d(x, (1 - lam) g~ + lam g_y)`` from the backup,
  updating the momentum buffers.
"""

from __future__ import annotations

import triton.language as tl
from torch import Tensor

from .common import chunk_of, device_fn, kernel, operand, to_storage
from .perturb import perturbation_scale
from .sgd import sgd_direction
from .tables import BLOCK, CHUNK, LAUNCH, Table


@device_fn
def _points_block(p, g, m, b, y, offs, mask, s, lr, momentum, one_minus_dampening, weight_decay,
                  maximize, init, DT: tl.constexpr, HAS_WD: tl.constexpr,
                  MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr):
    x_raw = tl.load(p + offs, mask=mask)
    x = x_raw.to(tl.float32)
    grad = tl.load(g + offs, mask=mask).to(tl.float32)
    buf = grad  # not read without MOMENTUM; read but unused on the first step (init)
    if MOMENTUM:
        buf = tl.load(m + offs, mask=mask).to(tl.float32)
    d, _ = sgd_direction(x, grad, buf, momentum, one_minus_dampening, weight_decay,
                         maximize, init, HAS_WD, MOMENTUM, NESTEROV)
    tl.store(y + offs, to_storage(x + (-lr) * d, DT), mask=mask)
    # scale == 0 (a non-finite norm): x~ = x exactly, even where g_y is inf/NaN.
    e = tl.where(s != 0.0, grad * s, 0.0)
    tl.store(b + offs, x_raw, mask=mask)
    tl.store(p + offs, to_storage(x + e, DT), mask=mask)


@kernel
def _points_kernel(blocks, B, p_row, g_row, b_row, y_row, m_row, sumsq, rho, eps, lr, momentum,
                   one_minus_dampening, weight_decay, maximize, init, DT: tl.constexpr,
                   HAS_WD: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr,
                   ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    # Operands: params, grads_y, backups, ys[, momentum_buffers].
    t, start, rem = chunk_of(blocks, B, CHUNK)
    p = operand(p_row, t, start, DT, ALIGNED)
    g = operand(g_row, t, start, DT, ALIGNED)
    b = operand(b_row, t, start, DT, ALIGNED)
    y = operand(y_row, t, start, DT, ALIGNED)
    m = p
    if MOMENTUM:  # on the first step (init) the params' row stands in: read, unused
        m = operand(m_row, t, start, DT, ALIGNED)
    # SAM's normalized scale without a grad scale (SAMPa has none), 0 when not finite.
    s = perturbation_scale(sumsq, sumsq, rho, eps, True, False)
    n_full = (rem // BLOCK) * BLOCK
    for off in tl.range(0, n_full, BLOCK):
        _points_block(p, g, m, b, y, off + tl.arange(0, BLOCK), None, s, lr, momentum,
                      one_minus_dampening, weight_decay, maximize, init, DT, HAS_WD, MOMENTUM,
                      NESTEROV)
    if n_full < rem:
        offs = n_full + tl.arange(0, BLOCK)
        _points_block(p, g, m, b, y, offs, offs < rem, s, lr, momentum, one_minus_dampening,
                      weight_decay, maximize, init, DT, HAS_WD, MOMENTUM, NESTEROV)


@device_fn
def _update_block(p, b, gt, gy, m, offs, mask, lam, one_minus_lam, lr, momentum,
                  one_minus_dampening, weight_decay, maximize, init, DT: tl.constexpr,
                  HAS_WD: tl.constexpr, MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr):
    x = tl.load(b + offs, mask=mask).to(tl.float32)
    g_tilde = tl.load(gt + offs, mask=mask).to(tl.float32)
    g_y = tl.load(gy + offs, mask=mask).to(tl.float32)
    grad = g_tilde * one_minus_lam + lam * g_y
    buf = grad  # not read without MOMENTUM; read but unused on the first step (init)
    if MOMENTUM:
        buf = tl.load(m + offs, mask=mask).to(tl.float32)
    d, new_buf = sgd_direction(x, grad, buf, momentum, one_minus_dampening, weight_decay,
                               maximize, init, HAS_WD, MOMENTUM, NESTEROV)
    if MOMENTUM:
        tl.store(m + offs, to_storage(new_buf, DT), mask=mask)
    tl.store(p + offs, to_storage(x + (-lr) * d, DT), mask=mask)


@kernel
def _update_kernel(blocks, B, p_row, b_row, gt_row, gy_row, m_row, lam, one_minus_lam, lr,
                   momentum, one_minus_dampening, weight_decay, maximize, init,
                   DT: tl.constexpr, HAS_WD: tl.constexpr, MOMENTUM: tl.constexpr,
                   NESTEROV: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                   CHUNK: tl.constexpr):
    # Operands: params, backups, grads_tilde, grads_y[, momentum_buffers].
    t, start, rem = chunk_of(blocks, B, CHUNK)
    p = operand(p_row, t, start, DT, ALIGNED)
    b = operand(b_row, t, start, DT, ALIGNED)
    gt = operand(gt_row, t, start, DT, ALIGNED)
    gy = operand(gy_row, t, start, DT, ALIGNED)
    m = p
    if MOMENTUM:
        m = operand(m_row, t, start, DT, ALIGNED)
    n_full = (rem // BLOCK) * BLOCK
    for off in tl.range(0, n_full, BLOCK):
        _update_block(p, b, gt, gy, m, off + tl.arange(0, BLOCK), None, lam, one_minus_lam, lr,
                      momentum, one_minus_dampening, weight_decay, maximize, init, DT, HAS_WD,
                      MOMENTUM, NESTEROV)
    if n_full < rem:
        offs = n_full + tl.arange(0, BLOCK)
        _update_block(p, b, gt, gy, m, offs, offs < rem, lam, one_minus_lam, lr, momentum,
                      one_minus_dampening, weight_decay, maximize, init, DT, HAS_WD, MOMENTUM,
                      NESTEROV)


def points(table: Table, dtype: tl.dtype, sumsq: Tensor, *, rho: float, eps: float, lr: float,
           momentum: float, dampening: float, weight_decay: float, nesterov: bool,
           maximize: bool, init_buffers: bool) -> None:
    """Operands (params, grads_y, backups, ys[, momentum_buffers]); the buffers are
    an operand only when momentum is on and they hold history (not init_buffers)."""
    rows = table.rows
    has_momentum = momentum != 0
    init = bool(init_buffers) and has_momentum
    _points_kernel[(table.n_blocks,)](
        table.blocks, table.n_blocks, rows[0], rows[1], rows[2], rows[3],
        rows[0] if init or not has_momentum else rows[4],  # the params stand in: unused
        sumsq, float(rho), float(eps), float(lr), float(momentum), 1.0 - float(dampening),
        float(weight_decay), bool(maximize), init, DT=dtype, HAS_WD=weight_decay != 0,
        MOMENTUM=has_momentum, NESTEROV=bool(nesterov) and has_momentum,
        ALIGNED=table.aligned, BLOCK=BLOCK, CHUNK=CHUNK, **LAUNCH,
    )


def update(table: Table, dtype: tl.dtype, *, lam: float, lr: float, momentum: float,
           dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
           init_buffers: bool) -> None:
    """Operands (params, backups, grads_tilde, grads_y[, momentum_buffers])."""
    rows = table.rows
    lam = float(lam)
    has_momentum = momentum != 0
    _update_kernel[(table.n_blocks,)](
        table.blocks, table.n_blocks, rows[0], rows[1], rows[2], rows[3],
        rows[4] if has_momentum else rows[0],  # never read without MOMENTUM
        lam, 1.0 - lam, float(lr), float(momentum), 1.0 - float(dampening),
        float(weight_decay), bool(maximize), bool(init_buffers) and has_momentum,
        DT=dtype, HAS_WD=weight_decay != 0, MOMENTUM=has_momentum,
        NESTEROV=bool(nesterov) and has_momentum, ALIGNED=table.aligned, BLOCK=BLOCK,
        CHUNK=CHUNK, **LAUNCH,
    )
