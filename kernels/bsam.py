"""BSAM's three elementwise ops (sam_fast/bsam_ops.py) as multi-tensor Triton kernels.

- :func:`noise`: ``backup <- w``; ``w <- w + z sqrt(1 / (N s))``;
- :func:`ascent`: ``w <- backup + rho g / s``, ``gs <- sqrt(s) |g|`` (``g`` unscaled);
- :func:`update`: ``m``, ``s`` and ``w`` from ``w0 = backup`` (Algorithm 1's last lines).

Conventions of kernels/family.py: every chunk runs a loop of full blocks (no mask) and one
masked tail; products the torch specification rounds on their own are kept out of FMA
contraction (:func:`.common.mul_rn`); division and square root are correctly rounded
(``div_rn``, ``sqrt_rn``); the options that only select (a grad scale, a skip flag,
``new_s``) are runtime flags, not variants. Storage fp32, fp16 and bf16 (``DT``), math in
fp32: every operand is loaded as fp32 and every result rounded to ``DT`` once
(:func:`.common.to_storage`); the noise ``z`` is fp32 whatever ``DT``. fp64 groups go to
the torch specification (the launcher's), whose fp64 math these kernels do not have.
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from .common import chunk_of, device_fn, fp32_scalar, kernel, mul_rn, operand, to_storage
from .tables import BLOCK, CHUNK, LAUNCH, Table


@device_fn
def _noise_block(w, bk, z, s, offs, mask, n_f, DT: tl.constexpr):
    w_raw = tl.load(w + offs, mask=mask)
    tl.store(bk + offs, w_raw, mask=mask)
    sv = tl.load(s + offs, mask=mask).to(tl.float32)
    sigma = tl.sqrt_rn(tl.math.div_rn(1.0, mul_rn(sv, n_f)))
    noisy = w_raw.to(tl.float32) + mul_rn(tl.load(z + offs, mask=mask), sigma)
    tl.store(w + offs, to_storage(noisy, DT), mask=mask)


@kernel
def _noise_kernel(blocks, B, w_row, b_row, z_row, s_row, num_data, DT: tl.constexpr,
                  ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    t, start, rem = chunk_of(blocks, B, CHUNK)
    w = operand(w_row, t, start, DT, ALIGNED)
    bk = operand(b_row, t, start, DT, ALIGNED)
    z = operand(z_row, t, start, tl.float32, ALIGNED)
    s = operand(s_row, t, start, DT, ALIGNED)
    n_f = tl.cast(num_data, tl.float32)
    n_full = (rem // BLOCK) * BLOCK
    for off in tl.range(0, n_full, BLOCK):
        _noise_block(w, bk, z, s, off + tl.arange(0, BLOCK), None, n_f, DT)
    if n_full < rem:
        offs = n_full + tl.arange(0, BLOCK)
        _noise_block(w, bk, z, s, offs, offs < rem, n_f, DT)


def noise(table: Table, dtype: tl.dtype, num_data: float) -> None:
    """Operands (w, backup, z, s); z is fp32, the others ``dtype``."""
    w_row, b_row, z_row, s_row = table.rows
    _noise_kernel[(table.n_blocks,)](table.blocks, table.n_blocks, w_row, b_row, z_row, s_row,
                                     float(num_data), DT=dtype, ALIGNED=table.aligned,
                                     BLOCK=BLOCK, CHUNK=CHUNK, **LAUNCH)


@device_fn
def _ascent_block(w, bk, g, s, gs, offs, mask, inv, rho_f, keep, DT: tl.constexpr):
    b_raw = tl.load(bk + offs, mask=mask)
    sv = tl.load(s + offs, mask=mask).to(tl.float32)
    gv = mul_rn(tl.load(g + offs, mask=mask).to(tl.float32), inv)
    new = to_storage(b_raw.to(tl.float32) + tl.math.div_rn(mul_rn(gv, rho_f), sv), DT)
    curv = to_storage(mul_rn(tl.sqrt_rn(sv), tl.abs(gv)), DT)
    tl.store(w + offs, tl.where(keep, new, b_raw), mask=mask)
    tl.store(gs + offs, tl.where(keep, curv, tl.zeros_like(curv)), mask=mask)


@kernel
def _ascent_kernel(blocks, B, w_row, b_row, g_row, s_row, gs_row, grad_scale, skip, rho,
                   has_scale, has_skip, DT: tl.constexpr, ALIGNED: tl.constexpr,
                   BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    t, start, rem = chunk_of(blocks, B, CHUNK)
    w = operand(w_row, t, start, DT, ALIGNED)
    bk = operand(b_row, t, start, DT, ALIGNED)
    g = operand(g_row, t, start, DT, ALIGNED)
    s = operand(s_row, t, start, DT, ALIGNED)
    gs = operand(gs_row, t, start, DT, ALIGNED)
    rho_f = tl.cast(rho, tl.float32)
    inv = tl.math.div_rn(1.0, tl.where(has_scale, tl.load(grad_scale).to(tl.float32), 1.0))
    keep = (tl.load(skip) == 0) | (has_skip == 0)
    n_full = (rem // BLOCK) * BLOCK
    for off in tl.range(0, n_full, BLOCK):
        _ascent_block(w, bk, g, s, gs, off + tl.arange(0, BLOCK), None, inv, rho_f, keep, DT)
    if n_full < rem:
        offs = n_full + tl.arange(0, BLOCK)
        _ascent_block(w, bk, g, s, gs, offs, offs < rem, inv, rho_f, keep, DT)


def ascent(table: Table, dtype: tl.dtype, rho: float, grad_scale: Tensor | None,
           skip: Tensor | None) -> None:
    """Operands (w, backup, g, s, gs); ``grad_scale`` and ``skip``: fp32 device scalars or
    None."""
    w_row, b_row, g_row, s_row, gs_row = table.rows
    grad_scale = fp32_scalar(grad_scale)
    dummy = torch.zeros(1, dtype=torch.float32, device=table.blocks.device)
    _ascent_kernel[(table.n_blocks,)](
        table.blocks, table.n_blocks, w_row, b_row, g_row, s_row, gs_row,
        dummy if grad_scale is None else grad_scale, dummy if skip is None else skip,
        float(rho), grad_scale is not None, skip is not None, DT=dtype,
        ALIGNED=table.aligned, BLOCK=BLOCK, CHUNK=CHUNK, **LAUNCH)


@device_fn
def _update_block(w, bk, g, m, s, gs, offs, mask, inv, lr_f, b1, omb1, b2, omb2, wd, dpw,
                  new_s, keep, DT: tl.constexpr):
    w0_raw = tl.load(bk + offs, mask=mask)
    m_raw = tl.load(m + offs, mask=mask)
    s_raw = tl.load(s + offs, mask=mask)
    w0 = w0_raw.to(tl.float32)
    s_old = s_raw.to(tl.float32)
    gv = mul_rn(tl.load(g + offs, mask=mask).to(tl.float32), inv)
    d = gv + mul_rn(w0, wd)
    m_new = mul_rn(m_raw.to(tl.float32), b1) + mul_rn(d, omb1)
    gsv = tl.load(gs + offs, mask=mask).to(tl.float32)
    s_new = mul_rn(s_old, b2) + mul_rn(gsv + dpw, omb2)
    step = tl.math.div_rn(m_new, tl.where(new_s, s_new, s_old))
    w_new = to_storage(w0 - mul_rn(step, lr_f), DT)
    tl.store(w + offs, tl.where(keep, w_new, w0_raw), mask=mask)
    tl.store(m + offs, tl.where(keep, to_storage(m_new, DT), m_raw), mask=mask)
    tl.store(s + offs, tl.where(keep, to_storage(s_new, DT), s_raw), mask=mask)


@kernel
def _update_kernel(blocks, B, w_row, b_row, g_row, m_row, s_row, gs_row, grad_scale, skip,
                   lr, beta1, one_minus_b1, beta2, one_minus_b2, weight_decay, damp_plus_wd,
                   new_s, has_scale, has_skip, DT: tl.constexpr, ALIGNED: tl.constexpr,
                   BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    t, start, rem = chunk_of(blocks, B, CHUNK)
    w = operand(w_row, t, start, DT, ALIGNED)
    bk = operand(b_row, t, start, DT, ALIGNED)
    g = operand(g_row, t, start, DT, ALIGNED)
    m = operand(m_row, t, start, DT, ALIGNED)
    s = operand(s_row, t, start, DT, ALIGNED)
    gs = operand(gs_row, t, start, DT, ALIGNED)
    lr_f = tl.cast(lr, tl.float32)
    b1 = tl.cast(beta1, tl.float32)
    omb1 = tl.cast(one_minus_b1, tl.float32)
    b2 = tl.cast(beta2, tl.float32)
    omb2 = tl.cast(one_minus_b2, tl.float32)
    wd = tl.cast(weight_decay, tl.float32)
    dpw = tl.cast(damp_plus_wd, tl.float32)
    inv = tl.math.div_rn(1.0, tl.where(has_scale, tl.load(grad_scale).to(tl.float32), 1.0))
    keep = (tl.load(skip) == 0) | (has_skip == 0)
    n_full = (rem // BLOCK) * BLOCK
    for off in tl.range(0, n_full, BLOCK):
        _update_block(w, bk, g, m, s, gs, off + tl.arange(0, BLOCK), None, inv, lr_f, b1,
                      omb1, b2, omb2, wd, dpw, new_s, keep, DT)
    if n_full < rem:
        offs = n_full + tl.arange(0, BLOCK)
        _update_block(w, bk, g, m, s, gs, offs, offs < rem, inv, lr_f, b1, omb1, b2, omb2,
                      wd, dpw, new_s, keep, DT)


def update(table: Table, dtype: tl.dtype, *, lr: float, beta1: float, beta2: float,
           weight_decay: float, damping: float, new_s: bool, grad_scale: Tensor | None,
           skip: Tensor | None) -> None:
    """Operands (w, backup, g, m, s, gs)."""
    w_row, b_row, g_row, m_row, s_row, gs_row = table.rows
    grad_scale = fp32_scalar(grad_scale)
    dummy = torch.zeros(1, dtype=torch.float32, device=table.blocks.device)
    _update_kernel[(table.n_blocks,)](
        table.blocks, table.n_blocks, w_row, b_row, g_row, m_row, s_row, gs_row,
        dummy if grad_scale is None else grad_scale, dummy if skip is None else skip,
        float(lr), float(beta1), float(1.0 - beta1), float(beta2), float(1.0 - beta2),
        float(weight_decay), float(damping + weight_decay), bool(new_s),
        grad_scale is not None, skip is not None, DT=dtype, ALIGNED=table.aligned,
        BLOCK=BLOCK, CHUNK=CHUNK, **LAUNCH)
