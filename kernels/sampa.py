"""SAMPa's two fused passes with a ``torch.optim.SGD`` base.

- points: from ``x`` and ``g_y``, write ``backup <- x``, ``y <- x - lr * d(x, g_y)``
  (SGD's look-ahead; the momentum buffers are read, never written) and
  ``x~ = x + scale * g_y`` into the params, in one pass;
- update: ``x <- x - lr * d(x, (1 - lam) g~ + lam g_y)`` from the backup,
  updating the momentum buffers.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .common import chunk_of, device_fn, operand, to_storage
from .sgd import sgd_direction
from .tables import BLOCK, CHUNK, LAUNCH, Table


@device_fn
def _points_block(p, g, m, b, y, offs, mask, s, lr, momentum, one_minus_dampening, weight_decay,
                  DT: tl.constexpr, HAS_WD: tl.constexpr, MOMENTUM: tl.constexpr,
                  NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, INIT: tl.constexpr):
    x_raw = tl.load(p + offs, mask=mask)
    x = x_raw.to(tl.float32)
    grad = tl.load(g + offs, mask=mask).to(tl.float32)
    buf = grad  # not read unless MOMENTUM and not INIT
    if MOMENTUM and not INIT:
        buf = tl.load(m + offs, mask=mask).to(tl.float32)
    d, _ = sgd_direction(x, grad, buf, momentum, one_minus_dampening, weight_decay,
                         HAS_WD, MOMENTUM, NESTEROV, MAXIMIZE, INIT)
    tl.store(y + offs, to_storage(x + (-lr) * d, DT), mask=mask)
    # scale == 0 (a non-finite norm): x~ = x exactly, even where g_y is inf/NaN.
    e = tl.where(s != 0.0, grad * s, 0.0)
    tl.store(b + offs, x_raw, mask=mask)
    tl.store(p + offs, to_storage(x + e, DT), mask=mask)


@triton.jit(do_not_specialize=["B", "T"])
def _points_kernel(meta, B, T, scale, lr, momentum, one_minus_dampening, weight_decay,
                   DT: tl.constexpr, HAS_WD: tl.constexpr, MOMENTUM: tl.constexpr,
                   NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, INIT: tl.constexpr,
                   ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    # Operands: params, grads_y, backups, ys[, momentum_buffers].
    t, start, rem = chunk_of(meta, B, CHUNK)
    p = operand(meta, B, T, t, start, 0, DT, ALIGNED)
    g = operand(meta, B, T, t, start, 1, DT, ALIGNED)
    b = operand(meta, B, T, t, start, 2, DT, ALIGNED)
    y = operand(meta, B, T, t, start, 3, DT, ALIGNED)
    m = p
    if MOMENTUM and not INIT:
        m = operand(meta, B, T, t, start, 4, DT, ALIGNED)
    s = tl.load(scale).to(tl.float32)
    n_full = (rem // BLOCK) * BLOCK
    for off in tl.range(0, n_full, BLOCK):
        _points_block(p, g, m, b, y, off + tl.arange(0, BLOCK), None, s, lr, momentum,
                      one_minus_dampening, weight_decay, DT, HAS_WD, MOMENTUM, NESTEROV,
                      MAXIMIZE, INIT)
    if n_full < rem:
        offs = n_full + tl.arange(0, BLOCK)
        _points_block(p, g, m, b, y, offs, offs < rem, s, lr, momentum, one_minus_dampening,
                      weight_decay, DT, HAS_WD, MOMENTUM, NESTEROV, MAXIMIZE, INIT)


@device_fn
def _update_block(p, b, gt, gy, m, offs, mask, lam, one_minus_lam, lr, momentum,
                  one_minus_dampening, weight_decay, DT: tl.constexpr, HAS_WD: tl.constexpr,
                  MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
                  INIT: tl.constexpr):
    x = tl.load(b + offs, mask=mask).to(tl.float32)
    g_tilde = tl.load(gt + offs, mask=mask).to(tl.float32)
    g_y = tl.load(gy + offs, mask=mask).to(tl.float32)
    grad = g_tilde * one_minus_lam + lam * g_y
    buf = grad  # not read unless MOMENTUM and not INIT
    if MOMENTUM and not INIT:
        buf = tl.load(m + offs, mask=mask).to(tl.float32)
    d, new_buf = sgd_direction(x, grad, buf, momentum, one_minus_dampening, weight_decay,
                               HAS_WD, MOMENTUM, NESTEROV, MAXIMIZE, INIT)
    if MOMENTUM:
        tl.store(m + offs, to_storage(new_buf, DT), mask=mask)
    tl.store(p + offs, to_storage(x + (-lr) * d, DT), mask=mask)


@triton.jit(do_not_specialize=["B", "T"])
def _update_kernel(meta, B, T, lam, one_minus_lam, lr, momentum, one_minus_dampening,
                   weight_decay, DT: tl.constexpr, HAS_WD: tl.constexpr, MOMENTUM: tl.constexpr,
                   NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, INIT: tl.constexpr,
                   ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    # Operands: params, backups, grads_tilde, grads_y[, momentum_buffers].
    t, start, rem = chunk_of(meta, B, CHUNK)
    p = operand(meta, B, T, t, start, 0, DT, ALIGNED)
    b = operand(meta, B, T, t, start, 1, DT, ALIGNED)
    gt = operand(meta, B, T, t, start, 2, DT, ALIGNED)
    gy = operand(meta, B, T, t, start, 3, DT, ALIGNED)
    m = p
    if MOMENTUM:
        m = operand(meta, B, T, t, start, 4, DT, ALIGNED)
    n_full = (rem // BLOCK) * BLOCK
    for off in tl.range(0, n_full, BLOCK):
        _update_block(p, b, gt, gy, m, off + tl.arange(0, BLOCK), None, lam, one_minus_lam, lr,
                      momentum, one_minus_dampening, weight_decay, DT, HAS_WD, MOMENTUM,
                      NESTEROV, MAXIMIZE, INIT)
    if n_full < rem:
        offs = n_full + tl.arange(0, BLOCK)
        _update_block(p, b, gt, gy, m, offs, offs < rem, lam, one_minus_lam, lr, momentum,
                      one_minus_dampening, weight_decay, DT, HAS_WD, MOMENTUM, NESTEROV,
                      MAXIMIZE, INIT)


def points(table: Table, dtype: tl.dtype, scale: Tensor, *, lr: float, momentum: float,
           dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
           init_buffers: bool) -> None:
    """Operands (params, grads_y, backups, ys[, momentum_buffers]); the buffers are
    an operand only when momentum is on and they hold history (not init_buffers)."""
    _points_kernel[(table.n_blocks,)](
        table.meta, table.n_blocks, table.n_tensors, scale, lr, momentum, 1.0 - dampening,
        weight_decay, DT=dtype, HAS_WD=weight_decay != 0, MOMENTUM=momentum != 0,
        NESTEROV=nesterov, MAXIMIZE=maximize, INIT=init_buffers, ALIGNED=table.aligned,
        BLOCK=BLOCK, CHUNK=CHUNK, **LAUNCH,
    )


def update(table: Table, dtype: tl.dtype, *, lam: float, lr: float, momentum: float,
           dampening: float, weight_decay: float, nesterov: bool, maximize: bool,
           init_buffers: bool) -> None:
    """Operands (params, backups, grads_tilde, grads_y[, momentum_buffers])."""
    _update_kernel[(table.n_blocks,)](
        table.meta, table.n_blocks, table.n_tensors, lam, 1.0 - lam, lr, momentum,
        1.0 - dampening, weight_decay, DT=dtype, HAS_WD=weight_decay != 0,
        MOMENTUM=momentum != 0, NESTEROV=nesterov, MAXIMIZE=maximize, INIT=init_buffers,
        ALIGNED=table.aligned, BLOCK=BLOCK, CHUNK=CHUNK, **LAUNCH,
    )
