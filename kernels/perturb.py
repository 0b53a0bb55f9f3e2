"""The perturbation ``w <- w + e`` (saving ``w``) and the bit-exact restore ``w <- backup``.

The perturbation's scale is derived on the device, in every program, from the
global sum of squares (:func:`perturbation_scale`), so a SAM step launches no
chain of tiny scalar ops and reads nothing on the host.
"""

from __future__ import annotations

import triton.language as tl
from torch import Tensor

from .common import chunk_of, device_fn, fp32_scalar, kernel, operand, to_storage
from .tables import BLOCK, CHUNK, LAUNCH, Table

# The largest finite fp32: |x| <= FP32_MAX is false exactly for inf and NaN.
FP32_MAX = tl.constexpr(3.4028234663852886e38)


@device_fn
def perturbation_scale(sumsq, grad_scale, rho, eps, normalize, has_scale):
    """``rho / (sqrt(sumsq) + eps)`` (``rho`` when not ``normalize``) as the torch backend's
    ``perturbation_scale`` computes it, rounding for rounding (docs: op contract):
    correctly rounded sqrt and reciprocal, the add kept apart from any product,
    then the product with rho; ``grad_scale`` S (device scalar, read when ``has_scale``)
    makes it ``rho / (sqrt(sumsq) + S * eps)`` or ``rho / S``. 0 when sumsq is not finite.

    ``normalize`` and ``has_scale`` are runtime flags (this is scalar code, once per
    program): without a scale S is 1.0, and every formula below then computes exactly
    what the unscaled one does (``fma(1, eps, 0) == eps``, ``(1 / 1) * rho == rho``).
    ``grad_scale`` must be a valid fp32 pointer either way (it is loaded unconditionally).
    """
    ss = tl.load(sumsq).to(tl.float32)
    # rho and eps are fp32 arguments when compiled; under the interpreter they are
    # Python floats, which Triton would widen to fp64 if they were tiny: round here.
    rho_f = tl.cast(rho, tl.float32)
    scale_s = tl.where(has_scale, tl.load(grad_scale).to(tl.float32), 1.0)
    # fp32(S * eps): an fma with a zero addend is the product rounded once, and unlike a
    # plain multiply it cannot be contracted into an fma with the add below (FMA
    # contraction is on for these kernels; a contracted norm + S*eps would round once
    # where PyTorch rounds twice).
    eps_term = tl.fma(scale_s, tl.cast(eps, tl.float32), 0.0)
    denom = tl.sqrt_rn(ss) + eps_term
    normalized = tl.math.div_rn(1.0, denom) * rho_f  # PyTorch: reciprocal, then * rho
    plain = tl.math.div_rn(1.0, scale_s) * rho_f
    scale = tl.where(normalize, normalized, plain)
    return tl.where(tl.abs(ss) <= FP32_MAX, scale, 0.0)


@device_fn
def _perturb_block(p, g, b, offs, mask, s, eta, DT: tl.constexpr, ASAM: tl.constexpr):
    w_raw = tl.load(p + offs, mask=mask)
    w = w_raw.to(tl.float32)
    e = tl.load(g + offs, mask=mask).to(tl.float32)
    if ASAM:
        a = tl.abs(w) + eta
        e = (a * a) * e
    e = e * s
    # scale == 0 marks a skipped step: e is exactly 0 even where g is inf/NaN.
    e = tl.where(s != 0.0, e, 0.0)
    tl.store(b + offs, w_raw, mask=mask)  # the stored bits, not a round trip
    tl.store(p + offs, to_storage(w + e, DT), mask=mask)


@kernel
def _perturb_kernel(blocks, B, p_row, g_row, b_row, sumsq, grad_scale, rho, eps, eta,
                    normalize, has_scale, DT: tl.constexpr, ASAM: tl.constexpr,
                    ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    t, start, rem = chunk_of(blocks, B, CHUNK)
    p = operand(p_row, t, start, DT, ALIGNED)
    g = operand(g_row, t, start, DT, ALIGNED)
    b = operand(b_row, t, start, DT, ALIGNED)
    # Device scalars, read here: no host sync. A few flops per program.
    s = perturbation_scale(sumsq, grad_scale, rho, eps, normalize, has_scale)
    eta_f = tl.cast(eta, tl.float32)
    n_full = (rem // BLOCK) * BLOCK
    for off in tl.range(0, n_full, BLOCK):
        _perturb_block(p, g, b, off + tl.arange(0, BLOCK), None, s, eta_f, DT, ASAM)
    if n_full < rem:
        offs = n_full + tl.arange(0, BLOCK)
        _perturb_block(p, g, b, offs, offs < rem, s, eta_f, DT, ASAM)


@kernel
def _copy_kernel(blocks, B, dst_row, src_row, BITS: tl.constexpr, ALIGNED: tl.constexpr,
                 BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    # Integer element type of the storage width: a copy of bits, whatever they encode.
    t, start, rem = chunk_of(blocks, B, CHUNK)
    dst = operand(dst_row, t, start, BITS, ALIGNED)
    src = operand(src_row, t, start, BITS, ALIGNED)
    n_full = (rem // BLOCK) * BLOCK
    for off in tl.range(0, n_full, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs))
    if n_full < rem:
        offs = n_full + tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, mask=offs < rem), mask=offs < rem)


def perturb(table: Table, dtype: tl.dtype, sumsq: Tensor, *, rho: float, eps: float,
            normalize: bool, eta: float | None, grad_scale: Tensor | None) -> None:
    """Operands (params, grads, backups): ``backups <- w``, ``w <- w + e``, the scale
    derived in the kernel from ``sumsq`` (0-dim fp32 device tensor)."""
    p_row, g_row, b_row = table.rows
    grad_scale = fp32_scalar(grad_scale)
    _perturb_kernel[(table.n_blocks,)](
        table.blocks, table.n_blocks, p_row, g_row, b_row, sumsq,
        sumsq if grad_scale is None else grad_scale,  # read, and unused without a scale
        float(rho), float(eps), 0.0 if eta is None else float(eta), bool(normalize),
        grad_scale is not None, DT=dtype, ASAM=eta is not None, ALIGNED=table.aligned,
        BLOCK=BLOCK, CHUNK=CHUNK, **LAUNCH,
    )


def copy(table: Table, bits: tl.dtype) -> None:
    """Operands (dst, src): ``dst <- src`` bit for bit; ``bits`` is the integer
    type of the storage width (tl.int32 for fp32, tl.int16 for bf16/fp16)."""
    dst_row, src_row = table.rows
    _copy_kernel[(table.n_blocks,)](
        table.blocks, table.n_blocks, dst_row, src_row, BITS=bits, ALIGNED=table.aligned,
        BLOCK=BLOCK, CHUNK=CHUNK, **_COPY_LAUNCH[bits == tl.int32],
    )


# 32-bit copies with twice the warps: 4 elements (one 16-byte access) per thread, as the
# 16-bit copy has 8. With 8 per thread ptxas unrolls the int32 loop and parks 16-24 bytes
# of loop-invariant values on the stack before it (a spill the AOT check fails on).
_COPY_LAUNCH = {False: LAUNCH, True: {**LAUNCH, "num_warps": 2 * LAUNCH["num_warps"]}}
