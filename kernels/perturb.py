"""The perturbation ``w <- w + e`` (saving ``w``) and the bit-exact restore ``w <- backup``."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .common import chunk_of, device_fn, operand, to_storage
from .tables import BLOCK, CHUNK, LAUNCH, Table


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


@triton.jit(do_not_specialize=["B", "T"])
def _perturb_kernel(meta, B, T, scale, eta, DT: tl.constexpr, ASAM: tl.constexpr,
                    ALIGNED: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    t, start, rem = chunk_of(meta, B, CHUNK)
    p = operand(meta, B, T, t, start, 0, DT, ALIGNED)
    g = operand(meta, B, T, t, start, 1, DT, ALIGNED)
    b = operand(meta, B, T, t, start, 2, DT, ALIGNED)
    s = tl.load(scale).to(tl.float32)  # a device scalar: no host sync
    n_full = (rem // BLOCK) * BLOCK
    for off in tl.range(0, n_full, BLOCK):
        _perturb_block(p, g, b, off + tl.arange(0, BLOCK), None, s, eta, DT, ASAM)
    if n_full < rem:
        offs = n_full + tl.arange(0, BLOCK)
        _perturb_block(p, g, b, offs, offs < rem, s, eta, DT, ASAM)


@triton.jit(do_not_specialize=["B", "T"])
def _copy_kernel(meta, B, T, BITS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                 CHUNK: tl.constexpr):
    # Integer element type of the storage width: a copy of bits, whatever they encode.
    t, start, rem = chunk_of(meta, B, CHUNK)
    dst = operand(meta, B, T, t, start, 0, BITS, ALIGNED)
    src = operand(meta, B, T, t, start, 1, BITS, ALIGNED)
    n_full = (rem // BLOCK) * BLOCK
    for off in tl.range(0, n_full, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs))
    if n_full < rem:
        offs = n_full + tl.arange(0, BLOCK)
        tl.store(dst + offs, tl.load(src + offs, mask=offs < rem), mask=offs < rem)


def perturb(table: Table, dtype: tl.dtype, scale: Tensor, eta: float | None) -> None:
    """Operands (params, grads, backups): ``backups <- w``, ``w <- w + e``."""
    _perturb_kernel[(table.n_blocks,)](
        table.meta, table.n_blocks, table.n_tensors, scale, 0.0 if eta is None else eta,
        DT=dtype, ASAM=eta is not None, ALIGNED=table.aligned, BLOCK=BLOCK, CHUNK=CHUNK,
        **LAUNCH,
    )


def copy(table: Table, bits: tl.dtype) -> None:
    """Operands (dst, src): ``dst <- src`` bit for bit; ``bits`` is the integer
    type of the storage width (tl.int32 for fp32, tl.int16 for bf16/fp16)."""
    _copy_kernel[(table.n_blocks,)](
        table.meta, table.n_blocks, table.n_tensors, BITS=bits, ALIGNED=table.aligned,
        BLOCK=BLOCK, CHUNK=CHUNK, **LAUNCH,
    )
