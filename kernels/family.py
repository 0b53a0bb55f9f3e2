"""The SAM family's generic ops (docs/family.md) as multi-tensor Triton kernels.

- :func:`dot_sumsq`: ``[<a, b>, |a|^2, |b|^2]`` in one read of both lists;
- :func:`combine`: ``a <- coef[0] * a + coef[1] * b``, the coefficients read on the device;
- :func:`ema_residual`: ``m <- decay m + (1 - decay) u``, ``g <- u - sigma m`` (``u = g / S``)
  with the squared norm of the written ``g``.

Reductions are deterministic as in :mod:`.norm`: every program writes the fp32 partials
of its chunk to its own slots and one single-program pass adds them in a fixed order.
Rounding follows the torch specification (sam_fast/backends/torch_family.py): each
product that the specification rounds on its own is kept out of FMA contraction with
:func:`.common.mul_rn` (the product rounded once, sign of zero included), so fp32 results
agree bit for bit with it for the elementwise outputs.

As in the other kernels, every chunk runs a loop of full blocks (no mask: 16-byte accesses
where the table is aligned) and one masked tail, and the options that only select
(``updated``, a grad scale, a skip flag) are runtime flags, not variants (docs/triton.md).
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from .common import (chunk_of, device_fn, fp32_scalar, kernel, load_or_zero, mul_rn, operand,
                     to_storage)
from .tables import BLOCK, CHUNK, LAUNCH, Table


# -- <a, b>, |a|^2, |b|^2 ------------------------------------------------------------------------


@device_fn
def _dot_block(a, b, offs, mask):
    x = load_or_zero(a + offs, mask)
    y = load_or_zero(b + offs, mask)
    return x * y, x * x, y * y


@kernel
def _dot_partials_kernel(blocks, B, a_row, b_row, partials, DT: tl.constexpr,
                         ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    t, start, rem = chunk_of(blocks, B, CHUNK)
    a = operand(a_row, t, start, DT, ALIGNED)
    b = operand(b_row, t, start, DT, ALIGNED)
    ab = tl.zeros([BLOCK], dtype=tl.float32)
    aa = tl.zeros([BLOCK], dtype=tl.float32)
    bb = tl.zeros([BLOCK], dtype=tl.float32)
    n_full = (rem // BLOCK) * BLOCK
    for off in tl.range(0, n_full, BLOCK):
        xy, xx, yy = _dot_block(a, b, off + tl.arange(0, BLOCK), None)
        ab += xy
        aa += xx
        bb += yy
    if n_full < rem:
        offs = n_full + tl.arange(0, BLOCK)
        xy, xx, yy = _dot_block(a, b, offs, offs < rem)
        ab += xy
        aa += xx
        bb += yy
    pid = tl.program_id(0)
    tl.store(partials + pid, tl.sum(ab, axis=0))
    tl.store(partials + B + pid, tl.sum(aa, axis=0))
    tl.store(partials + 2 * B + pid, tl.sum(bb, axis=0))


@kernel
def _sum3_kernel(partials, n, out, BLOCK: tl.constexpr):
    """out[j] = sum of partials[j*n : (j+1)*n], j = 0, 1, 2, in a fixed order."""
    for j in tl.static_range(3):
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for off in tl.range(0, n, BLOCK):
            offs = off + tl.arange(0, BLOCK)
            acc += tl.load(partials + j * n + offs, mask=offs < n, other=0.0)
        tl.store(out + j, tl.sum(acc, axis=0))


def dot_sumsq(table: Table, dtype: tl.dtype) -> Tensor:
    """Operands (a, b): a 3-element fp32 tensor ``[<a, b>, |a|^2, |b|^2]``."""
    device = table.blocks.device
    partials = torch.empty(3 * table.n_blocks, dtype=torch.float32, device=device)
    out = torch.empty(3, dtype=torch.float32, device=device)
    a_row, b_row = table.rows
    _dot_partials_kernel[(table.n_blocks,)](
        table.blocks, table.n_blocks, a_row, b_row, partials, DT=dtype,
        ALIGNED=table.aligned, BLOCK=BLOCK, CHUNK=CHUNK, **LAUNCH)
    _sum3_kernel[(1,)](partials, table.n_blocks, out, BLOCK=BLOCK, **LAUNCH)
    return out


# -- a <- coef[0] a + coef[1] b ------------------------------------------------------------------


@device_fn
def _combine_block(a, b, offs, mask, c0, c1, DT: tl.constexpr):
    x = tl.load(a + offs, mask=mask).to(tl.float32)
    y = tl.load(b + offs, mask=mask).to(tl.float32)
    tl.store(a + offs, to_storage(mul_rn(x, c0) + mul_rn(y, c1), DT), mask=mask)


@kernel
def _combine_kernel(blocks, B, a_row, b_row, coef, DT: tl.constexpr, ALIGNED: tl.constexpr,
                    BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    t, start, rem = chunk_of(blocks, B, CHUNK)
    a = operand(a_row, t, start, DT, ALIGNED)
    b = operand(b_row, t, start, DT, ALIGNED)
    c0 = tl.load(coef).to(tl.float32)
    c1 = tl.load(coef + 1).to(tl.float32)
    n_full = (rem // BLOCK) * BLOCK
    for off in tl.range(0, n_full, BLOCK):
        _combine_block(a, b, off + tl.arange(0, BLOCK), None, c0, c1, DT)
    if n_full < rem:
        offs = n_full + tl.arange(0, BLOCK)
        _combine_block(a, b, offs, offs < rem, c0, c1, DT)


def combine(table: Table, dtype: tl.dtype, coef: Tensor) -> None:
    """Operands (a, b): ``a <- coef[0] * a + coef[1] * b``, ``coef`` 2 fp32 on the device."""
    a_row, b_row = table.rows
    _combine_kernel[(table.n_blocks,)](
        table.blocks, table.n_blocks, a_row, b_row, coef, DT=dtype, ALIGNED=table.aligned,
        BLOCK=BLOCK, CHUNK=CHUNK, **LAUNCH)


# -- the running average and its residual, with the residual's norm -------------------------------


@device_fn
def _ema_block(m, g, offs, mask, keep, inv, decay_f, one_minus_f, sigma_f, updated,
               DT: tl.constexpr):
    m_raw = tl.load(m + offs, mask=mask)
    g_raw = tl.load(g + offs, mask=mask)
    old = m_raw.to(tl.float32)
    # inv is 1.0 without a grad scale: exact, and never contracted (mul_rn).
    u = mul_rn(g_raw.to(tl.float32), inv)
    new = mul_rn(old, decay_f) + mul_rn(u, one_minus_f)
    d = u - mul_rn(tl.where(updated, new, old), sigma_f)
    d_stored = to_storage(d, DT)
    d_back = d_stored.to(tl.float32)
    # A skipped step (keep false) writes the old bits back: the stores need no mask of
    # their own (a scalar flag and a vector mask do not combine under the interpreter,
    # and a full block's stores stay 16-byte ones).
    tl.store(m + offs, tl.where(keep, to_storage(new, DT), m_raw), mask=mask)
    tl.store(g + offs, tl.where(keep, d_stored, g_raw), mask=mask)
    sq = d_back * d_back
    if mask is not None:
        sq = tl.where(mask, sq, 0.0)
    return sq


@kernel
def _ema_partials_kernel(blocks, B, m_row, g_row, partials, grad_scale, skip, decay, one_minus,
                         sigma, updated, has_scale, has_skip, DT: tl.constexpr,
                         ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    t, start, rem = chunk_of(blocks, B, CHUNK)
    m = operand(m_row, t, start, DT, ALIGNED)
    g = operand(g_row, t, start, DT, ALIGNED)
    decay_f = tl.cast(decay, tl.float32)
    one_minus_f = tl.cast(one_minus, tl.float32)
    sigma_f = tl.cast(sigma, tl.float32)
    # grad_scale and skip are always valid fp32 buffers (absent: the partials, read and
    # ignored), so the loads need no branch.
    inv = tl.math.div_rn(1.0, tl.where(has_scale, tl.load(grad_scale).to(tl.float32), 1.0))
    keep = (tl.load(skip) == 0) | (has_skip == 0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    n_full = (rem // BLOCK) * BLOCK
    for off in tl.range(0, n_full, BLOCK):
        acc += _ema_block(m, g, off + tl.arange(0, BLOCK), None, keep, inv, decay_f,
                          one_minus_f, sigma_f, updated, DT)
    if n_full < rem:
        offs = n_full + tl.arange(0, BLOCK)
        acc += _ema_block(m, g, offs, offs < rem, keep, inv, decay_f, one_minus_f, sigma_f,
                          updated, DT)
    tl.store(partials + tl.program_id(0), tl.sum(acc, axis=0))


@kernel
def _sum_or_nan_kernel(partials, n, out, skip, has_skip, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in tl.range(0, n, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        acc += tl.load(partials + offs, mask=offs < n, other=0.0)
    total = tl.sum(acc, axis=0)
    skipped = (tl.load(skip) != 0) & (has_skip != 0)
    tl.store(out, tl.where(skipped, float("nan"), total))


def ema_residual(table: Table, dtype: tl.dtype, *, decay: float, sigma: float, updated: bool,
                 grad_scale: Tensor | None, skip: Tensor | None) -> Tensor:
    """Operands (m, g): the running average and residual of ``torch_family.ema_residual_``;
    returns the 0-dim fp32 ``|g|^2`` of the written residual (NaN where ``skip``).
    ``grad_scale`` and ``skip``: fp32 device scalars, or None."""
    device = table.blocks.device
    partials = torch.empty(table.n_blocks, dtype=torch.float32, device=device)
    out = torch.empty((), dtype=torch.float32, device=device)
    m_row, g_row = table.rows
    grad_scale = fp32_scalar(grad_scale)
    skip_ptr = partials if skip is None else skip  # read, and unused without a flag
    _ema_partials_kernel[(table.n_blocks,)](
        table.blocks, table.n_blocks, m_row, g_row, partials,
        partials if grad_scale is None else grad_scale, skip_ptr,
        float(decay), float(1.0 - decay), float(sigma), bool(updated),
        grad_scale is not None, skip is not None, DT=dtype, ALIGNED=table.aligned,
        BLOCK=BLOCK, CHUNK=CHUNK, **LAUNCH)
    _sum_or_nan_kernel[(1,)](partials, table.n_blocks, out, skip_ptr, skip is not None,
                             BLOCK=BLOCK, **LAUNCH)
    return out
