"""Sum of squares of the gradients (SAM's norm) and of ``(|w| + eta) * g`` (ASAM's).

Deterministic: every program writes the fp32 partial sum of its chunk to its
own slot, and one single-program pass adds the slots in a fixed order. No
float atomics, so the same inputs give the same bits on every run. A
non-finite gradient makes the result inf or NaN, which is how the norm
reports it (the optimizer then zeroes the perturbation scale on the device).
"""

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from .common import chunk_of, device_fn, kernel, load_or_zero, operand
from .tables import BLOCK, CHUNK, LAUNCH, Table


@device_fn
def _sumsq_block(g, w, offs, mask, eta, ASAM: tl.constexpr):
    x = load_or_zero(g + offs, mask)
    if ASAM:
        # |w| + eta, then the product, in the torch backend's order.
        a = tl.abs(load_or_zero(w + offs, mask)) + eta
        x = a * x
    return x * x


@kernel
def _sumsq_partials_kernel(blocks, B, g_row, w_row, partials, eta, DT: tl.constexpr,
                           ASAM: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                           CHUNK: tl.constexpr):
    t, start, rem = chunk_of(blocks, B, CHUNK)
    g = operand(g_row, t, start, DT, ALIGNED)
    w = g
    if ASAM:
        w = operand(w_row, t, start, DT, ALIGNED)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    n_full = (rem // BLOCK) * BLOCK
    for off in tl.range(0, n_full, BLOCK):
        acc += _sumsq_block(g, w, off + tl.arange(0, BLOCK), None, eta, ASAM)
    if n_full < rem:
        offs = n_full + tl.arange(0, BLOCK)
        acc += _sumsq_block(g, w, offs, offs < rem, eta, ASAM)
    tl.store(partials + tl.program_id(0), tl.sum(acc, axis=0))


# One program adds the partials in a fixed order. ``n`` (the number of blocks)
# is not specialised (see common.kernel): a model whose block count is 1, a
# multiple of 16 or neither compiles this pass once, not up to three times.
@kernel
def _sum_kernel(partials, n, out, BLOCK: tl.constexpr):
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in tl.range(0, n, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        acc += tl.load(partials + offs, mask=offs < n, other=0.0)
    tl.store(out, tl.sum(acc, axis=0))


def sumsq(table: Table, dtype: tl.dtype, eta: float | None) -> Tensor:
    """0-dim fp32 sum of squares over the table's operand 0 (gradients), weighted
    by ``|operand 1| + eta`` (parameters) when ``eta`` is not None."""
    device = table.blocks.device
    partials = torch.empty(table.n_blocks, dtype=torch.float32, device=device)
    out = torch.empty((), dtype=torch.float32, device=device)
    g_row = table.rows[0]
    w_row = table.rows[1] if eta is not None else g_row
    _sumsq_partials_kernel[(table.n_blocks,)](
        table.blocks, table.n_blocks, g_row, w_row, partials,
        0.0 if eta is None else float(eta),
        DT=dtype, ASAM=eta is not None, ALIGNED=table.aligned, BLOCK=BLOCK, CHUNK=CHUNK,
        **LAUNCH,
    )
    _sum_kernel[(1,)](partials, table.n_blocks, out, BLOCK=BLOCK, **LAUNCH)
    return out
