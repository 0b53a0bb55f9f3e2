"""Device-side helpers shared by every kernel: finding a program's chunk through the
block map of :mod:`.tables`, typed operand pointers from address rows, rounding to
the storage dtype, and the specialisation policy of every kernel's arguments."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import TypeVar

import torch
import triton
import triton.language as tl

F = TypeVar("F", bound=Callable)


def _interpreting() -> bool:
    """Whether ``@triton.jit`` makes interpreted functions (TRITON_INTERPRET)."""
    try:
        from triton import knobs
    except ImportError:  # older Triton: no knobs module, it reads the variable itself
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
    return bool(knobs.runtime.interpret)


def device_fn(fn: F) -> F:
    """``@triton.jit`` for a helper called from kernels.

    Under Triton's interpreter the helper stays a plain Python function: each
    call of an interpreted jit helper re-patches ``triton.language`` (about a
    millisecond), several times per program, which made the CPU tests several
    times slower. The kernel patches the language for its whole run, so the
    plain function executes the same operations; compiled, nothing changes.
    """
    return fn if _interpreting() else triton.jit(fn)


def runtime_args(fn: Callable) -> list[str]:
    """The names of ``fn``'s arguments that are not ``tl.constexpr``."""
    return [name for name, p in inspect.signature(fn).parameters.items()
            if "constexpr" not in str(p.annotation)]


def kernel(fn: F) -> F:
    """``@triton.jit`` for a launched kernel, with no runtime argument specialised.

    Triton compiles a separate variant for an integer argument equal to 1 (made
    a constant) or divisible by 16, and for a pointer divisible by 16. For these
    kernels that buys nothing (block counts and lengths only bound loops;
    pointer arguments are tables and device scalars, read with scalar loads:
    the operands' alignment is the ALIGNED flag, decided per call), and costs a
    compilation whenever a count first crosses one of those values, possibly
    inside a CUDA graph capture. So only the constexpr flags choose variants;
    the launchers pass every float hyperparameter as a Python float (Python
    ints would arrive as i32, another variant) and every runtime option flag as
    a Python bool (docs/triton.md, "Specialisation", says which options are
    constexprs and why).
    """
    return triton.jit(fn, do_not_specialize=runtime_args(fn))


@device_fn
def chunk_of(blocks, B, CHUNK: tl.constexpr):
    """(tensor index, chunk start, elements in the chunk) of this program, from the
    block map (see :mod:`.tables`): three independent loads.

    The start is int64 (tensors may exceed 2^31 elements); the count is at most
    CHUNK, so int32 indexing within the chunk is safe.
    """
    pid = tl.program_id(0)
    t = tl.load(blocks + pid)
    # A multiple of CHUNK, said where it is loaded (a hint on a helper's
    # argument would be lost) so that aligned operands stay provably aligned.
    start = tl.multiple_of(tl.load(blocks + B + pid), CHUNK)
    rem = tl.load(blocks + 2 * B + pid).to(tl.int32)
    return t, start, rem


@device_fn
def operand(row, t, start, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """Pointer (element type DT) to this chunk of tensor t of the operand whose
    address row is ``row``."""
    ptr = tl.load(row + t).to(tl.pointer_type(DT))
    if ALIGNED:
        # The host saw every address 16-byte aligned, and chunk starts are
        # multiples of CHUNK elements: saying so lets the compiler emit 16-byte
        # vector accesses (unknown alignment means one access per element).
        # The hint must sit on the pointer: on the int64 before the cast it is lost.
        ptr = tl.multiple_of(ptr, 16)
    return ptr + start


@device_fn
def load_or_zero(ptr, mask):
    """``tl.load`` as fp32, 0 where ``mask`` is off (``mask`` None: a full block)."""
    if mask is None:
        x = tl.load(ptr)
    else:
        x = tl.load(ptr, mask=mask, other=0.0)
    return x.to(tl.float32)


@device_fn
def to_storage(x, DT: tl.constexpr):
    """Round fp32 ``x`` to DT, to nearest-even as PyTorch does.

    bf16 rounding is done on the bits: Triton's CPU interpreter truncates
    fp32 -> bf16 casts, and one code path on both targets is what CI tests.
    NaN becomes the canonical bf16 NaN 0x7FC0, as in c10::BFloat16.
    """
    if DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DT)


# mul_rn(a, b): ``a * b`` rounded once, as a product of its own that ptxas may not
# contract into an fma with a later add. For the multiplies by a factor that is 1.0
# unless an option is on (the grad scale's reciprocal, AdamW's decay): a plain
# ``a * b`` feeding an add may be fused by ptxas into ``fma(a, b, c)`` (FMA contraction
# is on, see tables.LAUNCH), which rounds once where PyTorch (a separate unscale or
# ``mul_`` kernel) rounds the product first and, with ``b == 1.0``, is not the add
# PyTorch computes at all. ``mul.rn`` is never contracted, so such a factor can be a
# runtime argument instead of a compile-time flag (one kernel variant, not two) without
# changing a bit. Under the interpreter (numpy: no contraction) it is the plain product.
if _interpreting():
    def mul_rn(a, b):
        return a * b
else:
    @triton.jit
    def mul_rn(a, b):
        # Inline PTX, not libdevice's __nv_fmul_rn: Triton resolves libdevice's FTZ switch
        # to flush-to-zero (mul.rn.ftz), which would zero subnormal gradients.
        a, b = tl.broadcast(a, b)
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=f,f,f", [a, b],
                                         dtype=tl.float32, is_pure=True, pack=1)


@device_fn
def amp_scalars(grad_scale, found_inf, has_scale, has_inf):
    """(``1 / S``, whether the step is kept) from GradScaler's device scalars: ``1.0``
    and True where the runtime flags say a scalar is absent. Both pointers are always
    valid fp32 buffers (an absent one is :func:`amp_args`'s stand-in), so both loads run
    unconditionally and a select drops what a flag says is absent."""
    # The select before the division: the stand-in's bits are never divided by.
    scale = tl.where(has_scale, tl.load(grad_scale).to(tl.float32), 1.0)
    inv_scale = tl.math.div_rn(1.0, scale)
    keep = (tl.load(found_inf) == 0) | (has_inf == 0)
    return inv_scale, keep


def amp_args(table, grad_scale, found_inf) -> tuple:
    """The ``(grad_scale, found_inf)`` pointers of a launch: fp32 device scalars, the
    table's stand-in buffer where one is absent (see :func:`amp_scalars`)."""
    stand_in = table.stand_in
    if stand_in is None:
        stand_in = table.blocks.view(torch.float32)
    return (stand_in if grad_scale is None else fp32_scalar(grad_scale),
            stand_in if found_inf is None else fp32_scalar(found_inf))


def fp32_scalar(t):
    """A device scalar as fp32 (None stays None): one pointer type, so one kernel variant."""
    return t if t is None or t.dtype == torch.float32 else t.float()


@device_fn
def pow_int(base, n):
    """``base ** n`` for a whole number ``n >= 0`` by repeated squaring in fp64.

    Adam's bias corrections ``1 - beta ** step`` on the device: fp64 squaring
    is accurate to ~1e-15 relative, so rounding the result to fp32 gives the
    correctly rounded fp32 power, which PyTorch's fp32 ``pow`` also computes
    (up to its own last-bit error). ``beta`` is rounded to fp32 first, as there.
    """
    acc = tl.full((), 1.0, tl.float64)
    # tl.cast, not .to: under the interpreter float arguments stay Python floats
    # (compiled, they arrive as fp32); the fp32 rounding is then the same.
    b = tl.cast(tl.cast(base, tl.float32), tl.float64)
    e = n
    while e > 0:
        if (e & 1) != 0:
            acc = acc * b
        b = b * b
        e = e >> 1
    return acc
