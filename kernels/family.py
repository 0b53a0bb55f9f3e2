"""The SAM family's generic ops (docs/family.md) as multi-tensor Triton kernels.

- :func:`dot_sumsq`: ``[<a, b>, |a|^2, |b|^2]`` in one read of both lists;
- :func:`combine`: ``a <- coef[0] * a + coef[1] * b``, the coefficients read on the device;
- :func:`ema_residual`: ``m <- decay m + (1 - decay) u``, ``g <- u - sigma m`` (``u = g / S``)
  with the squared norm of the written ``g``.

Reductions are deterministic as in :mod:`.norm`: every program writes the fp32 partials
of its chunk to its own slots and one single-program pass adds them in a fixed order.
Rounding follows the torch specification (sam_fast/backends/torch_family.py): each
product that the specification rounds on its own is kept out of FMA contraction with
``tl.fma(x, y, 0.0)`` (the product rounded once), so fp32 results agree bit for bit
with it for the elementwise outputs.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from .common import chunk_of, device_fn, kernel, load_or_zero, operand, to_storage
from .tables import BLOCK, CHUNK, LAUNCH, Table


@device_fn
def _mul(x, y):
    """``x * y`` rounded once, never contracted into a neighbouring add."""
    return tl.fma(x, y, 0.0)


# -- <a, b>, |a|^2, |b|^2 ------------------------------------------------------------------------


@kernel
def _dot_partials_kernel(blocks, B, a_row, b_row, partials, DT: tl.constexpr,
                         ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    t, start, rem = chunk_of(blocks, B, CHUNK)
    a = operand(a_row, t, start, DT, ALIGNED)
    b = operand(b_row, t, start, DT, ALIGNED)
    ab = tl.zeros([BLOCK], dtype=tl.float32)
    aa = tl.zeros([BLOCK], dtype=tl.float32)
    bb = tl.zeros([BLOCK], dtype=tl.float32)
    for off in tl.range(0, rem, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < rem
        x = load_or_zero(a + offs, mask)
        y = load_or_zero(b + offs, mask)
        ab += x * y
        aa += x * x
        bb += y * y
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


@kernel
def _combine_kernel(blocks, B, a_row, b_row, coef, DT: tl.constexpr, ALIGNED: tl.constexpr,
                    BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    t, start, rem = chunk_of(blocks, B, CHUNK)
    a = operand(a_row, t, start, DT, ALIGNED)
    b = operand(b_row, t, start, DT, ALIGNED)
    c0 = tl.load(coef).to(tl.float32)
    c1 = tl.load(coef + 1).to(tl.float32)
    for off in tl.range(0, rem, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < rem
        x = tl.load(a + offs, mask=mask).to(tl.float32)
        y = tl.load(b + offs, mask=mask).to(tl.float32)
        tl.store(a + offs, to_storage(_mul(x, c0) + _mul(y, c1), DT), mask=mask)


def combine(table: Table, dtype: tl.dtype, coef: Tensor) -> None:
    """Operands (a, b): ``a <- coef[0] * a + coef[1] * b``, ``coef`` 2 fp32 on the device."""
    a_row, b_row = table.rows
    _combine_kernel[(table.n_blocks,)](
        table.blocks, table.n_blocks, a_row, b_row, coef, DT=dtype, ALIGNED=table.aligned,
        BLOCK=BLOCK, CHUNK=CHUNK, **LAUNCH)


# -- the running average and its residual, with the residual's norm -------------------------------


@kernel
def _ema_partials_kernel(blocks, B, m_row, g_row, partials, grad_scale, skip, decay, one_minus,
                         sigma, DT: tl.constexpr, UPDATED: tl.constexpr,
                         HAS_SCALE: tl.constexpr, HAS_SKIP: tl.constexpr,
                         ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    t, start, rem = chunk_of(blocks, B, CHUNK)
    m = operand(m_row, t, start, DT, ALIGNED)
    g = operand(g_row, t, start, DT, ALIGNED)
    decay_f = tl.cast(decay, tl.float32)
    one_minus_f = tl.cast(one_minus, tl.float32)
    sigma_f = tl.cast(sigma, tl.float32)
    inv = 1.0
    if HAS_SCALE:
        inv = tl.math.div_rn(1.0, tl.load(grad_scale).to(tl.float32))
    # Elements stored: all of the chunk, or none on a skipped step (a bound, not a mask of
    # its own: a scalar flag and a vector mask do not combine under the interpreter).
    lim = rem
    if HAS_SKIP:
        lim = tl.where(tl.load(skip) == 0, rem, 0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in tl.range(0, rem, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        mask = offs < rem
        old = tl.load(m + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(g + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            u = _mul(u, inv)
        new = _mul(old, decay_f) + _mul(u, one_minus_f)
        if UPDATED:
            d = u - _mul(new, sigma_f)
        else:
            d = u - _mul(old, sigma_f)
        d_stored = to_storage(d, DT)
        d_back = d_stored.to(tl.float32)
        acc += tl.where(mask, d_back * d_back, 0.0)
        store_mask = offs < lim
        tl.store(m + offs, to_storage(new, DT), mask=store_mask)
        tl.store(g + offs, d_stored, mask=store_mask)
    tl.store(partials + tl.program_id(0), tl.sum(acc, axis=0))


@kernel
def _sum_or_nan_kernel(partials, n, out, skip, HAS_SKIP: tl.constexpr, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in tl.range(0, n, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        acc += tl.load(partials + offs, mask=offs < n, other=0.0)
    total = tl.sum(acc, axis=0)
    if HAS_SKIP:
        total = tl.where(tl.load(skip) == 0, total, float("nan"))
    tl.store(out, total)


def ema_residual(table: Table, dtype: tl.dtype, *, decay: float, sigma: float, updated: bool,
                 grad_scale: Tensor | None, skip: Tensor | None) -> Tensor:
    """Operands (m, g): the running average and residual of ``torch_family.ema_residual_``;
    returns the 0-dim fp32 ``|g|^2`` of the written residual (NaN where ``skip``)."""
    device = table.blocks.device
    partials = torch.empty(table.n_blocks, dtype=torch.float32, device=device)
    out = torch.empty((), dtype=torch.float32, device=device)
    m_row, g_row = table.rows
    _ema_partials_kernel[(table.n_blocks,)](
        table.blocks, table.n_blocks, m_row, g_row, partials,
        partials if grad_scale is None else grad_scale,  # never read without HAS_SCALE
        partials if skip is None else skip,  # never read without HAS_SKIP
        float(decay), float(1.0 - decay), float(sigma), DT=dtype, UPDATED=bool(updated),
        HAS_SCALE=grad_scale is not None, HAS_SKIP=skip is not None, ALIGNED=table.aligned,
        BLOCK=BLOCK, CHUNK=CHUNK, **LAUNCH)
    _sum_or_nan_kernel[(1,)](partials, table.n_blocks, out, partials if skip is None else skip,
                             HAS_SKIP=skip is not None, BLOCK=BLOCK, **LAUNCH)
    return out
