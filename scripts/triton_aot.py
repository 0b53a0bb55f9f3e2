"""Ahead-of-time proof of the ``triton`` backend's kernels for Hopper and Ampere, without a GPU.

1. **Enumerate.** Every op of the backend (``sam_fast.backends.triton_backend.OPS``) is called
   on tiny CPU tensors over the matrix of options it accepts (:func:`op_matrix`: dtype,
   aligned or unaligned addresses, every option that selects a ``constexpr``, the Python types
   of the scalars that ``torch.optim`` really passes, host and device step counters).
   ``JITFunction.run`` (what ``kernel[grid](*args, **kwargs)`` calls) is replaced by a
   recorder: nothing runs, and every launch is turned into the compile signature a real GPU
   launch would get, by Triton's own binder (``create_function_from_signature`` and
   ``JITFunction._pack_args``, exactly as ``JITFunction.run`` does) with the CUDA backend of
   each target. The variants are derived from the backend's launch code, not written here.
   List lengths (1, 3, 16 tensors: Triton specialises ints equal to 1 and divisible by 16)
   are swept at one point of every op's matrix; an op whose launches depend on the length
   gets its whole matrix run at every length.
2. **Select.** Every enumerated variant is compiled (variants with identical TTIR share one
   backend compile). That is affordable because the kernels keep few constexprs: an option
   that only selects between values (GradScaler's scale and found_inf, maximize, SGD's first
   step, Adam's lerp formula, the perturbation's normalisation) or multiplies by a factor
   that is exactly 1.0 when off (the grad scale's reciprocal, AdamW's decay, through
   ``kernels.common.mul_rn``, which ptxas cannot contract) is a runtime argument, so a
   kernel compiles once per (dtype, alignment, what changes its loads or its arithmetic):
   ~420 variants over both targets, where a constexpr per option made ~6300.
   ``--cover`` compiles only a strength-2 covering array per (kernel, dtype) instead: every
   pair of (constexpr or scalar-signature) values that occurs together in some variant
   occurs together in a compiled one, plus for each of aligned/unaligned the variant with
   every option on and the one with every option off (a quicker local check).
3. **Compile** each selected variant for sm_90 and sm_80 with
   ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget(...))``
   in a pool of processes, with a fresh cache directory (nothing is reused across runs).
4. **Check** every compile: it succeeds; ptxas reports no spill stores/loads and no stack
   frame, and the cubin no local memory (``cuobjdump --dump-resource-usage``); registers
   within :data:`REG_BUDGET`; in every ALIGNED variant each global load and store inside a
   loop (the full-block main loop: the masked tail is straight-line code after it) moves
   16 bytes (``ld.global.v4.b32`` for every dtype: 8 bf16/fp16 elements are packed in 4
   32-bit registers). Print a table; list the specialisation hazards seen.

Run through ``scripts/triton_aot_check`` (it picks the test venv and unsets TRITON_INTERPRET:
the kernels must be real ``JITFunction`` objects, not interpreted ones).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import inspect
import io
import itertools
import multiprocessing
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# -- the register budget --------------------------------------------------------------------
# Every launch uses 4 warps (kernels.tables.NUM_WARPS): 128 threads per program. These are
# bandwidth-bound streaming kernels; what keeps HBM busy is bytes in flight per SM, that is
# resident warps x loads in flight per warp. An SM has 64K 32-bit registers (sm_80 and sm_90)
# and holds at most 64 warps (16 programs of 4 warps). At 128 registers per thread a program
# takes 16K registers, so 4 programs (16 warps, 25% occupancy) stay resident per SM. Each
# thread issues its 8 elements of 2-6 operands at once (16-byte accesses), so 16 warps keep
# 16 x 32 x 32 B x 2..6 = 32-96 KiB in flight per SM, which is what Little's law asks of an
# H200 (4.8 TB/s x ~700 ns latency / 132 SMs ~ 25 KiB) and an A100 (2 TB/s x ~600 ns / 108
# SMs ~ 11 KiB) with room to spare. Above 128 the next steps are 3 programs (168 regs) and
# then 2; far before 255 (the hardware limit, where ptxas must spill) a kernel that needs that
# much has grown past what an elementwise update needs and must be looked at.
REG_BUDGET = 128

# The Triton whose JITFunction.run this mirrors (Recorder.variants); others are warned about.
VERIFIED_TRITON = "3.9"
_WARNED: list = []

TARGETS = {"sm_90": ("cuda", 90, 32), "sm_80": ("cuda", 80, 32)}

# Constexprs that stay the same in every launch and say nothing about the variant.
_FIXED = ("BLOCK", "CHUNK")


# -- 1. recording launches ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compile of one kernel, as Triton keys it for one target."""

    module: str
    kernel: str
    target: str
    signature: tuple[tuple[str, str], ...]  # every parameter's type ("constexpr" for constexprs)
    constexprs: tuple[tuple[str, Any], ...]  # (parameter, value); dtypes by name
    attrs: tuple[tuple[str, tuple], ...]  # (parameter, specialisation attributes), non-empty ones
    options: tuple[tuple[str, Any], ...]  # compile options that differ from Triton's defaults

    @property
    def name(self) -> str:
        return f"{self.module}.{self.kernel}"

    def untargeted(self) -> tuple:
        return (self.module, self.kernel, self.signature, self.constexprs, self.attrs,
                self.options)

    def constexpr(self, name: str, default: Any = None) -> Any:
        return dict(self.constexprs).get(name, default)

    def features(self) -> tuple[tuple[str, Any], ...]:
        """What tells this variant apart from its kernel's others (the coverage unit):
        constexpr values, scalar and pointer types, specialisation attributes."""
        attrs = dict(self.attrs)
        out = [(n, v) for n, v in self.constexprs if n not in _FIXED]
        for n, t in self.signature:
            if t != "constexpr":
                out.append((f"{n}:", t + ("/" + ",".join(f"{a}={b}" for a, b in attrs[n])
                                           if n in attrs else "")))
        return tuple(out)

    def short(self) -> str:
        """The options on, and the non-default scalar types, for the table."""
        parts = []
        for name, value in self.constexprs:
            if name in _FIXED or name == "DT" or value is False:
                continue
            parts.append(name if value is True else f"{name}={value}")
        params = dict(self.signature)
        for n, t in self.signature:
            # (u1: the runtime option flags, Python bools by design: not shown)
            if t in ("i32", "i64") and n not in ("B", "T"):
                parts.append(f"{n}:{t}")
            elif t == "constexpr" and n not in dict(self.constexprs):
                parts.append(f"{n}=const")
        del params
        return " ".join(parts) or "-"


@dataclasses.dataclass
class Launch:
    op: str
    case: dict
    variant: Variant


def _tensor_key(arg: Any) -> Any:
    """What Triton's specialisation of a tensor argument depends on: its dtype and whether
    its address is a multiple of 16 (``native_specialize_impl``)."""
    return ("tensor", str(arg.dtype), arg.data_ptr() % 16 == 0)


def _arg_key(arg: Any) -> Any:
    if hasattr(arg, "data_ptr") and hasattr(arg, "dtype"):
        return _tensor_key(arg)
    return (type(arg).__name__, arg)


class Recorder:
    """While active, replaces ``JITFunction.run``: each launch becomes one :class:`Variant`
    per target, computed by Triton's own binder (as ``JITFunction.run`` computes it)."""

    def __init__(self, targets: dict[str, tuple[str, int, int]]) -> None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.backends = {name: make_backend(GPUTarget(*t)) for name, t in targets.items()}
        self.defaults = {name: b.parse_options({}) for name, b in self.backends.items()}
        self._binders: dict[tuple[int, str], Callable] = {}
        self._memo: dict[tuple, list[Variant]] = {}
        self.launches: list[Launch] = []
        self.op = "?"
        self.case: dict = {}

    def _binder(self, fn: Any, target: str) -> Callable:
        from triton.runtime.jit import create_function_from_signature

        key = (id(fn), target)
        if key not in self._binders:
            self._binders[key] = create_function_from_signature(
                fn.signature, fn.params, self.backends[target])
        return self._binders[key]

    def variants(self, fn: Any, args: tuple, kwargs: dict) -> list[Variant]:
        """The variants of ``fn[grid](*args, **kwargs)``: the first half of
        ``JITFunction.run`` (Triton 3.9), up to the compile it would start."""
        from triton import knobs

        memo_key = (id(fn), tuple(map(_arg_key, args)),
                    tuple(sorted((k, _arg_key(v)) for k, v in kwargs.items())))
        if memo_key in self._memo:
            return self._memo[memo_key]
        kwargs = dict(kwargs)
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
        names = [p.name for p in fn.params]
        out = []
        for target, backend in self.backends.items():
            bound, specialization, options = self._binder(fn, target)(*args, **kwargs)
            options, signature, constexprs, attrs = fn._pack_args(
                backend, kwargs, bound, specialization, options)
            defaults = self.defaults[target]
            changed = tuple(sorted((k, v) for k, v in options.__dict__.items()
                                   if getattr(defaults, k, None) != v))
            out.append(Variant(
                module=fn.fn.__module__, kernel=fn.fn.__name__, target=target,
                signature=tuple(signature.items()),
                constexprs=tuple((names[path[0]], _plain(value))
                                 for path, value in sorted(constexprs.items())),
                attrs=tuple((names[path[0]], tuple(map(tuple, value)))
                            for path, value in sorted(attrs.items()) if value),
                options=changed,
            ))
        self._memo[memo_key] = out
        return out

    @contextlib.contextmanager
    def active(self) -> Iterator[Recorder]:
        from triton.runtime.jit import JITFunction

        recorder = self
        original = JITFunction.run

        def run(self, *args, grid, warmup, **kwargs):  # noqa: ARG001 (nothing is launched)
            for v in recorder.variants(self, args, kwargs):
                recorder.launches.append(Launch(recorder.op, recorder.case, v))
            return None

        JITFunction.run = run
        try:
            yield self
        finally:
            JITFunction.run = original


def _plain(value: Any) -> Any:
    """A constexpr value as a plain, printable, hashable Python value (dtypes by name)."""
    import triton.language as tl

    if isinstance(value, tl.constexpr):
        return _plain(value.value)
    if isinstance(value, tl.dtype):
        return str(value)
    return value


# -- 2. the matrix of calls -----------------------------------------------------------------

DTYPES = ("float32", "bfloat16", "float16")
LENGTHS = (1, 3, 16)  # tensors per list: a count of 1, a plain count, a multiple of 16
BASE_LENGTH = 3
SCALAR_STYLES = ("float", "torch_defaults")


def _zero(style: str) -> float | int:
    """An option left off: ``0.0``, or ``0`` as ``torch.optim``'s defaults hold it (SGD's
    momentum, dampening and weight_decay, Adam's weight_decay are the int 0)."""
    return 0 if style == "torch_defaults" else 0.0


@dataclasses.dataclass
class OpMatrix:
    """One op's option matrix: ``call(case, n)`` runs the op once on ``n`` tensors per list."""

    op: str
    axes: dict[str, tuple]
    call: Callable[[dict, int], None]
    contract: str = ""

    def cases(self) -> Iterator[dict]:
        names = list(self.axes)
        for values in itertools.product(*(self.axes[n] for n in names)):
            yield dict(zip(names, values))


def op_matrix(tb: Any, torch: Any, dtypes: Iterable[str] = DTYPES) -> list[OpMatrix]:
    """Every op's option matrix, calls through the backend's own entry points.

    The options are the ops' public contracts (``torch_ops`` holds the reference
    signatures); ``style`` picks the Python types of the hyperparameters an option
    leaves off (floats, or ``torch.optim``'s int defaults).
    """
    dtypes = tuple(dtypes)
    aligns = (True, False)

    def lists(case: dict, n: int, k: int) -> list[list]:
        dtype = getattr(torch, case["dtype"])
        out = []
        for _ in range(k):
            row = []
            for _ in range(n):
                base = torch.zeros(6, dtype=dtype)  # a fresh allocation: 64-byte aligned
                row.append(base[:5] if case["aligned"] else base[1:])  # 2 or 4 bytes off
            out.append(row)
        assert all((t.data_ptr() % 16 == 0) == case["aligned"] for row in out for t in row)
        return out

    def scalar(value: float, dtype: Any = None) -> Any:
        return torch.tensor(value, dtype=dtype or torch.float32)

    matrices = []

    # grad_sumsq: SAM's norm and ASAM's (two passes: per-chunk partials, then their sum).
    def sumsq_call(case: dict, n: int) -> None:
        g, w = lists(case, n, 2)
        if case["asam"]:
            tb.OPS["grad_sumsq"](g, w, 0.01)
        else:
            tb.OPS["grad_sumsq"](g)

    matrices.append(OpMatrix("grad_sumsq", dict(dtype=dtypes, aligned=aligns,
                                                asam=(False, True)), sumsq_call))

    # perturb_: the new contract (a global sum of squares; rho, eps, normalize, eta,
    # grad_scale; docs/design.md section 3) once the backend has it, else the old one.
    perturb = tb.OPS["perturb_"]
    new_perturb = "sumsq" in inspect.signature(perturb).parameters
    axes: dict[str, tuple] = dict(dtype=dtypes, aligned=aligns, asam=(False, True))
    if new_perturb:
        axes.update(normalize=(True, False), grad_scale=(False, True))

    def perturb_call(case: dict, n: int) -> None:
        p, g, b = lists(case, n, 3)
        eta = 0.01 if case["asam"] else None
        if new_perturb:
            perturb(p, g, b, scalar(4.0), rho=0.05, eps=1e-12, normalize=case["normalize"],
                    eta=eta, grad_scale=scalar(1024.0) if case["grad_scale"] else None)
        else:
            perturb(p, g, b, scalar(0.05), eta)

    matrices.append(OpMatrix("perturb_", axes, perturb_call,
                             "new" if new_perturb else "old (scale tensor)"))

    def restore_call(case: dict, n: int) -> None:
        p, b = lists(case, n, 2)
        tb.OPS["restore_"](p, b)

    matrices.append(OpMatrix("restore_", dict(dtype=dtypes, aligned=aligns), restore_call))

    sgd_axes = dict(dtype=dtypes, aligned=aligns, momentum=(False, True),
                    nesterov=(False, True), weight_decay=(False, True), maximize=(False, True),
                    init_buffers=(False, True), style=SCALAR_STYLES)

    def sgd_kw(case: dict) -> dict:
        z = _zero(case["style"])
        return dict(lr=0.1, momentum=0.9 if case["momentum"] else z, dampening=z,
                    weight_decay=1e-4 if case["weight_decay"] else z,
                    nesterov=case["nesterov"], maximize=case["maximize"],
                    init_buffers=case["init_buffers"])

    def sgd_call(case: dict, n: int) -> None:
        p, b, g, m = lists(case, n, 4)
        tb.OPS["restore_sgd_"](
            p, b, g, m if case["momentum"] else None, **sgd_kw(case),
            grad_scale=scalar(1024.0) if case["grad_scale"] else None,
            found_inf=scalar(0.0) if case["found_inf"] else None)

    matrices.append(OpMatrix("restore_sgd_", dict(sgd_axes, grad_scale=(False, True),
                                                  found_inf=(False, True)), sgd_call))

    def adam_call(case: dict, n: int) -> None:
        p, b, g, m, v, vmax = lists(case, n, 6)
        step_dtype = torch.float64 if case["steps"].endswith("fp64") else torch.float32
        steps = [torch.tensor(3.0, dtype=step_dtype) for _ in p]
        kw = dict(lr=1e-3, beta1=case["beta1"], beta2=0.999, eps=1e-8,
                  weight_decay=1e-2 if case["weight_decay"] else _zero(case["style"]),
                  amsgrad=case["amsgrad"], maximize=case["maximize"],
                  decoupled_weight_decay=case["adamw"])
        grad_scale = scalar(1024.0) if case["grad_scale"] else None
        found_inf = scalar(0.0) if case["found_inf"] else None
        vmax = vmax if case["amsgrad"] else None
        if case["steps"] == "host":
            tb.OPS["restore_adamw_"](p, b, g, m, v, vmax, steps, **kw, grad_scale=grad_scale,
                                     found_inf=found_inf)
        else:
            # Counters on the device, which CPU tensors cannot be: the backend's own entry
            # point with the counters' home given (as its tests do).
            options = tb.AdamOptions(**kw)
            tb._restore_adam(p, b, g, m, v, vmax, steps, options, grad_scale=grad_scale,
                             found_inf=found_inf, steps_on_device=True)

    matrices.append(OpMatrix("restore_adamw_", dict(
        dtype=dtypes, aligned=aligns, adamw=(False, True), weight_decay=(False, True),
        amsgrad=(False, True), maximize=(False, True),
        beta1=(0.9, 0.0),  # |1 - beta1| < 0.5 or not: two lerp formulas (LERP_SMALL)
        grad_scale=(False, True), found_inf=(False, True),
        steps=("host", "device_fp32", "device_fp64"), style=SCALAR_STYLES), adam_call))

    points = tb.OPS["sampa_points_"]
    new_points = "sumsq" in inspect.signature(points).parameters

    def points_call(case: dict, n: int) -> None:
        p, g, m, b, y = lists(case, n, 5)
        bufs = m if case["momentum"] and not case["init_buffers"] else None
        if new_points:
            points(p, g, bufs, b, y, scalar(4.0), rho=0.05, eps=1e-12, **sgd_kw(case))
        else:
            points(p, g, bufs, b, y, scalar(0.05), **sgd_kw(case))

    matrices.append(OpMatrix("sampa_points_", sgd_axes, points_call,
                             "new" if new_points else "old (scale tensor)"))

    def update_call(case: dict, n: int) -> None:
        p, b, gt, gy, m = lists(case, n, 5)
        tb.OPS["sampa_update_"](p, b, gt, gy, m if case["momentum"] else None, lam=0.2,
                                **sgd_kw(case))

    matrices.append(OpMatrix("sampa_update_", sgd_axes, update_call))

    # The SAM family's generic ops (sam_fast/family_ops.py, kernels/family.py).
    if "dot_sumsq" in tb.OPS:
        def dot_call(case: dict, n: int) -> None:
            a, b = lists(case, n, 2)
            tb.OPS["dot_sumsq"](a, b)

        matrices.append(OpMatrix("dot_sumsq", dict(dtype=dtypes, aligned=aligns), dot_call))

        def combine_call(case: dict, n: int) -> None:
            a, b = lists(case, n, 2)
            tb.OPS["combine_"](a, b, torch.tensor([0.5, 2.0]))

        matrices.append(OpMatrix("combine_", dict(dtype=dtypes, aligned=aligns), combine_call))

        def ema_call(case: dict, n: int) -> None:
            m, g = lists(case, n, 2)
            tb.OPS["ema_residual_"](
                m, g, decay=0.9, sigma=1.0, updated=case["updated"],
                grad_scale=scalar(1024.0) if case["grad_scale"] else None,
                skip=scalar(0.0) if case["skip"] else None)

        matrices.append(OpMatrix("ema_residual_", dict(
            dtype=dtypes, aligned=aligns, updated=(True, False), grad_scale=(False, True),
            skip=(False, True)), ema_call))

    # BSAM's three ops (sam_fast/bsam_ops.py, kernels/bsam.py); the noise is fp32 whatever
    # the group's dtype.
    if "bsam_noise_" in tb.OPS:
        def noise_call(case: dict, n: int) -> None:
            p, b, s = lists(case, n, 3)
            (z,) = lists(dict(case, dtype="float32"), n, 1)
            tb.OPS["bsam_noise_"](p, b, z, s, 1000.0)

        matrices.append(OpMatrix("bsam_noise_", dict(dtype=dtypes, aligned=aligns),
                                 noise_call))

        def ascent_call(case: dict, n: int) -> None:
            p, b, g, s, gs = lists(case, n, 5)
            tb.OPS["bsam_ascent_"](p, b, g, s, gs, 0.05,
                                   scalar(1024.0) if case["grad_scale"] else None,
                                   scalar(0.0) if case["skip"] else None)

        matrices.append(OpMatrix("bsam_ascent_", dict(
            dtype=dtypes, aligned=aligns, grad_scale=(False, True), skip=(False, True)),
            ascent_call))

        def bsam_update_call(case: dict, n: int) -> None:
            p, b, g, m, s, gs = lists(case, n, 6)
            tb.OPS["bsam_update_"](p, b, g, m, s, gs, 0.5, 0.9, 0.999, 1e-4, 0.1,
                                   case["new_s"],
                                   scalar(1024.0) if case["grad_scale"] else None,
                                   scalar(0.0) if case["skip"] else None)

        matrices.append(OpMatrix("bsam_update_", dict(
            dtype=dtypes, aligned=aligns, new_s=(True, False), grad_scale=(False, True),
            skip=(False, True)), bsam_update_call))
    return matrices


# -- enumeration ----------------------------------------------------------------------------


@dataclasses.dataclass
class Enumeration:
    launches: list[Launch]
    errors: list[tuple[str, dict, str]]  # (op, case, error) of the calls that raised
    calls: int
    kernels: dict[str, Any]  # "module.kernel" -> JITFunction: every kernel of sam_fast.kernels
    missing_ops: list[str]  # ops of the backend that no matrix calls
    length_dependent: dict[str, list[str]]  # op -> kernels whose launches depend on the length
    contracts: dict[str, str]
    seconds: float
    cpu: float = 0.0  # CPU seconds of the enumeration's workers

    def variants(self, target: str | None = None) -> dict[Variant, list[Launch]]:
        out: dict[Variant, list[Launch]] = defaultdict(list)
        for launch in self.launches:
            if target is None or launch.variant.target == target:
                out[launch.variant].append(launch)
        return out


def load_backend() -> tuple[Any, Any]:
    """(triton_backend, torch) of this checkout, with compiled (not interpreted) kernels."""
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        raise SystemExit("triton_aot: unset TRITON_INTERPRET: the kernels must be JITFunctions")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # 3.9's default; silences its warning
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import torch
    import triton
    from triton.runtime.jit import JITFunction

    if not triton.__version__.startswith(VERIFIED_TRITON) and not _WARNED:
        _WARNED.append(True)
        print(f"triton_aot: warning: Triton {triton.__version__}; the signature mapping "
              f"(JITFunction.run's binder) was verified against {VERIFIED_TRITON}",
              file=sys.stderr)

    # The kernels of this checkout: an editable install of another checkout maps
    # sam_fast.kernels to its own kernels/ (sam_fast/ has no kernels/ in a source tree).
    init = ROOT / "kernels" / "__init__.py"
    if init.is_file() and "sam_fast" not in sys.modules:
        sys.meta_path.insert(0, _KernelsHere(init))
    import sam_fast

    if Path(sam_fast.__file__).resolve().parent != ROOT / "sam_fast":
        raise SystemExit(f"triton_aot: sam_fast imports from {sam_fast.__file__}, not {ROOT}")
    from sam_fast.backends import triton_backend as tb

    if tb.kernels is None:
        raise SystemExit(f"triton_aot: the triton backend did not load: {tb._IMPORT_ERROR}")
    where = Path(tb.kernels.__file__).resolve().parent
    if where != ROOT / "kernels":
        raise SystemExit(f"triton_aot: the kernels load from {where}, not {ROOT / 'kernels'}")
    if not isinstance(tb.kernels.perturb._perturb_kernel, JITFunction):
        raise SystemExit("triton_aot: the kernels are not JITFunctions (TRITON_INTERPRET?)")
    return tb, torch


class _KernelsHere:
    """A meta path finder that maps ``sam_fast.kernels`` to this checkout's ``kernels/``."""

    def __init__(self, init: Path) -> None:
        self.init = init

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "sam_fast.kernels":
            return None
        return importlib.util.spec_from_file_location(
            fullname, self.init, submodule_search_locations=[str(self.init.parent)])


def find_kernels(kernels_pkg: Any) -> dict[str, Any]:
    """Every ``@triton.jit`` function of the kernel package that no other one calls: the
    kernels (the others are device helpers, compiled into the kernels that call them)."""
    from triton.runtime.jit import JITFunction

    funcs: dict[str, Any] = {}
    for name in dir(kernels_pkg):
        module = getattr(kernels_pkg, name)
        if inspect.ismodule(module) and module.__name__.startswith(kernels_pkg.__name__ + "."):
            for value in vars(module).values():
                if isinstance(value, JITFunction) and value.fn.__module__ == module.__name__:
                    funcs[f"{module.__name__}.{value.fn.__name__}"] = value
    called: set[str] = set()
    for fn in funcs.values():
        body = re.sub(r"\bdef\s+\w+", "", fn.src)
        called.update(re.findall(r"\b(\w+)\s*\(", body))
    return {k: f for k, f in funcs.items() if f.fn.__name__ not in called}


def _enumerate_job(job: tuple[str, str]) -> tuple:
    """Run one op's matrix for one dtype under a :class:`Recorder` (in a pool worker)."""
    op, dtype = job
    cpu0 = _cpu()
    tb, torch = load_backend()
    torch.set_num_threads(1)
    recorder = Recorder(TARGETS)
    (m,) = [m for m in op_matrix(tb, torch, (dtype,)) if m.op == op]
    errors: list[tuple[str, dict, str]] = []
    calls = 0

    def run(case: dict, n: int) -> list[Launch]:
        nonlocal calls
        case = dict(case, n=n)
        recorder.op, recorder.case = m.op, case
        before = len(recorder.launches)
        calls += 1
        try:
            m.call(case, n)
        except Exception as exc:  # reported; fatal only with --strict
            errors.append((m.op, case, f"{type(exc).__name__}: {exc}"))
        return recorder.launches[before:]

    with recorder.active():
        cases = list(m.cases())
        # The length sweep: the first and the last point of the matrix at every length.
        by_length: dict[int, set] = {}
        for n in LENGTHS:
            by_length[n] = {launch.variant for case in (cases[0], cases[-1])
                            for launch in run(case, n)}
        base = by_length[BASE_LENGTH]
        dependent = sorted({v.name for vs in by_length.values() for v in vs ^ base})
        for n in LENGTHS if dependent else (BASE_LENGTH,):
            for case in cases:
                run(case, n)
    tb.CACHE.clear()
    return recorder.launches, errors, calls, dependent, m.contract, _cpu() - cpu0


def enumerate_variants(dtypes: Iterable[str] = DTYPES, only_ops: Iterable[str] | None = None,
                       jobs: int = 1) -> Enumeration:
    """Every launch of every op's matrix (:func:`op_matrix`), (op, dtype) jobs in a fork
    pool of ``jobs`` processes."""
    t0 = time.time()
    tb, torch = load_backend()
    only = set(only_ops or ())
    ops = [m.op for m in op_matrix(tb, torch, ("float32",)) if not only or m.op in only]
    work = [(op, dtype) for op in ops for dtype in dtypes]
    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            parts = pool.map(_enumerate_job, work, chunksize=1)
    else:
        parts = [_enumerate_job(job) for job in work]
    launches: list[Launch] = []
    errors: list[tuple[str, dict, str]] = []
    calls = 0
    length_dependent: dict[str, list[str]] = {}
    contracts: dict[str, str] = {}
    cpu = 0.0
    for (op, _), (l, err, n, dependent, contract, job_cpu) in zip(work, parts):
        cpu += job_cpu
        launches += l
        errors += err
        calls += n
        if dependent:
            length_dependent[op] = sorted(set(length_dependent.get(op, [])) | set(dependent))
        if contract:
            contracts[op] = contract
    missing = [op for op in tb.OPS if op not in ops] if not only else []
    return Enumeration(launches, errors, calls, find_kernels(tb.kernels), missing,
                       length_dependent, contracts, time.time() - t0, cpu)


# -- 3. selection: a strength-2 cover -------------------------------------------------------


def _is_maximal(v: Variant) -> int:
    return sum(1 for _, value in v.constexprs if value is True)


def select(variants: Iterable[Variant]) -> list[Variant]:
    """A strength-2 covering subset of ``variants`` per (kernel, target, dtype): every pair of
    features (:meth:`Variant.features`) found together in some variant is found together
    in a selected one; the variants with the most and the fewest options on are always in,
    for aligned and unaligned. Greedy (largest number of new pairs first), deterministic."""
    groups: dict[tuple, list[Variant]] = defaultdict(list)
    for v in variants:
        groups[(v.name, v.target, v.constexpr("DT", v.constexpr("BITS")))].append(v)
    chosen: list[Variant] = []
    for key in sorted(groups, key=str):
        group = sorted(groups[key], key=lambda v: repr(v.features()))
        features = {v: v.features() for v in group}
        counts = Counter(f for fs in features.values() for f in fs)
        varying = sorted((f for f, n in counts.items() if n < len(group)), key=repr)
        ids = {f: i for i, f in enumerate(varying)}
        width = len(varying) + 1  # unit (i, j): bit i * width + j; a single feature: j = last
        masks = {}
        for v in group:
            mine = sorted(ids[f] for f in features[v] if f in ids)
            bits = bytearray((width * width + 7) // 8)
            for unit in itertools.chain(((i, width - 1) for i in mine),
                                        itertools.combinations(mine, 2)):
                k = unit[0] * width + unit[1]
                bits[k >> 3] |= 1 << (k & 7)
            masks[v] = int.from_bytes(bits, "little")
        picked: list[Variant] = []
        for aligned in (True, False):
            same = [v for v in group if v.constexpr("ALIGNED", aligned) == aligned]
            if same:
                picked.append(max(same, key=_is_maximal))
                picked.append(min(same, key=_is_maximal))
        picked = list(dict.fromkeys(picked))
        uncovered = 0
        for mask in masks.values():
            uncovered |= mask
        for v in picked:
            uncovered &= ~masks[v]
        while uncovered:
            best = max(group, key=lambda v: (masks[v] & uncovered).bit_count())
            picked.append(best)
            uncovered &= ~masks[best]
        chosen.extend(picked)
    return chosen


# -- 4. compiling ---------------------------------------------------------------------------

_KERNELS: dict[str, Any] = {}  # set in the parent before the pool forks


@dataclasses.dataclass
class Result:
    variant: Variant
    ok: bool
    error: str = ""
    regs: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    stack: int = -1
    local: int = -1
    shared: int = -1
    loop_widths: tuple[tuple[str, int], ...] = ()  # (ld/st, bytes) of loop global accesses
    tail_widths: tuple[tuple[str, int], ...] = ()
    spills_in_loop: int = 0  # STL/LDL instructions of the SASS inside a loop (when it spills)
    seconds: float = 0.0
    cpu: float = 0.0  # CPU seconds of the compile (the worker and its ptxas)
    ttir_hash: str = ""
    shares_with: int = 1  # variants whose TTIR is this one's
    problems: tuple[str, ...] = ()  # what fails the check
    known: tuple[str, ...] = ()  # defects covered by KNOWN (reported, not failing)


_PTX_ACCESS = re.compile(r"^\s*(?:@!?%\w+\s+)?((?:ld|st)\.global[\w.:]*)\s")
_PTX_LABEL = re.compile(r"^\s*(\$?[\w$]+):")
_PTX_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$?[\w$]+);")


def _access_width(op: str) -> tuple[str, int]:
    """("ld" or "st", bytes per thread) of a PTX global access like ``ld.global.v4.b32``."""
    parts = op.split(".")
    vec = 1
    bits = 0
    for part in parts[2:]:
        if re.fullmatch(r"v\d", part):
            vec = int(part[1:])
        elif re.fullmatch(r"[bsuf]\d+", part):
            bits = int(part[1:])
    return parts[0], vec * bits // 8


def vector_report(ptx: str) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(accesses inside loops, the others) of a kernel's PTX, as (ld/st, bytes).

    A loop is the code from a label to a later branch back to it; the kernels' only loops
    are the full-block ``tl.range`` loops (and ``_sum_kernel``'s), the masked tail and the
    table lookups come before or after them.
    """
    lines = ptx.splitlines()
    labels = {}
    for i, line in enumerate(lines):
        m = _PTX_LABEL.match(line)
        if m:
            labels[m.group(1)] = i
    in_loop = [False] * len(lines)
    for i, line in enumerate(lines):
        m = _PTX_BRANCH.search(line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            for j in range(labels[m.group(1)], i + 1):
                in_loop[j] = True
    loop, other = [], []
    for i, line in enumerate(lines):
        m = _PTX_ACCESS.match(line)
        if m:
            (loop if in_loop[i] else other).append(_access_width(m.group(1)))
    return loop, other


_PTXAS = {
    "regs": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def _resource_usage(cubin: bytes, tmpdir: str) -> dict[str, int]:
    """REG/STACK/SHARED/LOCAL of the cubin's kernel, from ``cuobjdump --dump-resource-usage``."""
    from triton import knobs

    path = os.path.join(tmpdir, f"k{os.getpid()}_{time.monotonic_ns()}.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    try:
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", path],
                             check=True, capture_output=True, text=True).stdout
    finally:
        os.remove(path)
    found = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out)}
    if "reg" not in found:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{out}")
    return found


_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def sass_local_accesses(cubin: bytes, tmpdir: str) -> tuple[int, int]:
    """(inside loops, outside) counts of the SASS's local-memory accesses (STL/LDL): a
    loop is the code between a backward branch's target and the branch."""
    from triton import knobs

    path = os.path.join(tmpdir, f"s{os.getpid()}_{time.monotonic_ns()}.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    try:
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "-sass", path], check=True,
                             capture_output=True, text=True).stdout
    finally:
        os.remove(path)
    code = [(int(a, 16), text) for a, text in _SASS.findall(out)]
    loops = []
    for addr, text in code:
        m = re.search(r"\bBRA\s+(?:`?\(?)0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr))
    inside = outside = 0
    for addr, text in code:
        if re.search(r"\b(STL|LDL)\b", text):
            if any(lo <= addr <= hi for lo, hi in loops):
                inside += 1
            else:
                outside += 1
    return inside, outside


def _frontend_ttir(fn: Any, v: Variant, target: Any) -> str:
    """The TTIR of a variant (Triton's frontend and TTIR passes only, as
    ``triton.compile`` starts), for telling identical variants apart cheaply."""
    from triton._C.libtriton import ir
    from triton.compiler import ASTSource, make_backend

    backend = make_backend(target)
    src = ASTSource(fn, dict(v.signature), _paths(fn, v.constexprs), _paths(fn, v.attrs))
    options = backend.parse_options(dict(dict(v.options), **src.parse_options()))
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, options, backend.get_codegen_implementation(options),
                         backend.get_module_map(), context)
    stages: dict = {}
    backend.add_stages(stages, options, src.language)
    return str(stages["ttir"](module, {}))


def _paths(fn: Any, items: Iterable[tuple[str, Any]]) -> dict:
    """{(argument index,): value} as ``ASTSource`` takes constexprs and attrs; dtype names
    back to Triton dtypes."""
    import triton.language as tl

    out = {}
    for name, value in items:
        if isinstance(value, str) and hasattr(tl, _DTYPE_ATTR.get(value, value)):
            value = getattr(tl, _DTYPE_ATTR.get(value, value))
        elif isinstance(value, tuple):
            value = [list(a) for a in value]
        out[(fn.arg_names.index(name),)] = value
    return out


_DTYPE_ATTR = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64",
               "i16": "int16", "i32": "int32", "i64": "int64", "i8": "int8"}


def ttir_hash_of(v: Variant) -> str:
    from triton.backends.compiler import GPUTarget

    text = _frontend_ttir(_KERNELS[v.name], v, GPUTarget(*TARGETS[v.target]))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def compile_variant(v: Variant) -> Result:
    """Compile one variant for its target and measure it (in a pool worker)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.time()
    cpu0 = _cpu()
    fn = _KERNELS[v.name]
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v's report, printed on stdout
    log = io.StringIO()
    try:
        src = ASTSource(fn, dict(v.signature), _paths(fn, v.constexprs), _paths(fn, v.attrs))
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget(*TARGETS[v.target]),
                                    options=dict(v.options))
        report = log.getvalue()
        found = {}
        for key, pattern in _PTXAS.items():
            m = pattern.search(report)
            if m is None:
                raise RuntimeError(f"no '{key}' in the ptxas report:\n{report}")
            found[key] = int(m.group(1))
        usage = _resource_usage(kernel.asm["cubin"], tempfile.gettempdir())
        loop, other = vector_report(kernel.asm["ptx"])
        in_loop = 0
        if found["spill_stores"] or found["spill_loads"] or found["stack"] or usage.get("local"):
            in_loop = sass_local_accesses(kernel.asm["cubin"], tempfile.gettempdir())[0]
        return Result(v, True, regs=usage["reg"], spill_stores=found["spill_stores"],
                      spills_in_loop=in_loop, cpu=_cpu() - cpu0,
                      spill_loads=found["spill_loads"], stack=max(found["stack"],
                                                                  usage.get("stack", 0)),
                      local=usage.get("local", 0), shared=kernel.metadata.shared,
                      loop_widths=tuple(loop), tail_widths=tuple(other),
                      seconds=time.time() - t0)
    except Exception as exc:
        return Result(v, False, error=f"{type(exc).__name__}: {exc}"[:2000],
                      seconds=time.time() - t0, cpu=_cpu() - cpu0)


def _cpu() -> float:
    """CPU seconds of this process and its waited-for children (ptxas)."""
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF,
               resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))


def check(r: Result, reg_budget: int = REG_BUDGET) -> tuple[str, ...]:
    """What is wrong with one compile (empty: nothing)."""
    if not r.ok:
        return (f"does not compile: {r.error}",)
    problems = []
    if r.spill_stores or r.spill_loads:
        where = (f"{r.spills_in_loop} local accesses inside a loop" if r.spills_in_loop
                 else "none inside a loop")
        problems.append(f"spills ({r.spill_stores} B stored, {r.spill_loads} B loaded; "
                        f"{where})")
    if r.stack or r.local:
        problems.append(f"local memory (stack {r.stack} B, local {r.local} B)")
    if r.regs > reg_budget:
        problems.append(f"{r.regs} registers > budget {reg_budget}")
    if r.variant.constexpr("ALIGNED") is True:
        if not any(op == "ld" for op, _ in r.loop_widths):
            problems.append("ALIGNED, but no global load inside a loop (main loop not found)")
        narrow = sorted({f"{op} {w}B" for op, w in r.loop_widths if w != 16})
        if narrow:
            problems.append("ALIGNED, but main-loop accesses narrower than 16 bytes: "
                            + ", ".join(narrow))
    return tuple(problems)


@dataclasses.dataclass(frozen=True)
class Known:
    """A defect of the kernels as they are, found by this check and left to kernels/ to fix:
    it is reported as KNOWN instead of failing, within ``limit`` (bytes of spill/stack, or
    registers) and, for spills, only when no local access sits inside a loop. Anything
    beyond it, and every other defect, fails. ``--no-known`` fails on these too."""

    kernel: str
    kind: str  # "spill" (spills and the stack frame they need) or "regs"
    limit: int
    why: str
    targets: tuple[str, ...] = ("sm_90", "sm_80")
    dtypes: tuple[str, ...] = ()  # DT or BITS values; empty: any
    aligned: bool | None = None  # only ALIGNED (True) or only unaligned (False) variants

    def covers(self, r: Result, problem: str) -> bool:
        v = r.variant
        if v.kernel != self.kernel or v.target not in self.targets:
            return False
        if self.aligned is not None and v.constexpr("ALIGNED") is not self.aligned:
            return False
        if self.dtypes and str(v.constexpr("DT", v.constexpr("BITS"))) not in self.dtypes:
            return False
        if self.kind == "spill":
            return (problem.startswith(("spills", "local memory")) and r.spills_in_loop == 0
                    and max(r.spill_stores, r.spill_loads, r.stack, r.local) <= self.limit)
        if self.kind == "regs":
            return problem.endswith(f"> budget {REG_BUDGET}") and r.regs <= self.limit
        return False


KNOWN = (
    Known("_restore_adam_kernel", "regs", 152, aligned=False,
          why="the unaligned variants with AMSGRAD and host step counters need 133-147 "
              "registers on sm_90 and 141 on sm_80 (every other Adam variant <= 128, the "
              "aligned ones <= 123): every access is a scalar one and each thread keeps its 8 "
              "elements of 6 operands, and their old bits for a skipped step, live at once. "
              "3 programs per SM instead of 4 still keep ~3x the bytes in flight an H200 "
              "needs (see REG_BUDGET), and only storage that is not 16-byte aligned takes "
              "these variants"),
)


def compile_all(variants: list[Variant], jobs: int, dedupe_ttir: bool) -> list[Result]:
    """Compile ``variants`` in a fork pool of ``jobs`` processes, with a fresh cache."""
    ctx = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="triton_aot_cache_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        from triton import knobs

        knobs.cache.dir = cache
        with ctx.Pool(jobs) as pool:
            shares: dict[Variant, int] = {}
            if dedupe_ttir:
                hashes = pool.map(ttir_hash_of, variants, chunksize=8)
                first: dict[tuple, Variant] = {}
                for v, h in zip(variants, hashes):
                    rep = first.setdefault((v.target, h), v)
                    shares[rep] = shares.get(rep, 0) + 1
                todo = list(first.values())
            else:
                todo = variants
                hashes = []
            results = pool.map(compile_variant, todo, chunksize=1)
    for r in results:
        r.shares_with = shares.get(r.variant, 1)
        r.problems = check(r)
    return results


def triage(results: list[Result], known: Iterable[Known] = KNOWN) -> None:
    """Move the problems that a :data:`KNOWN` entry covers from ``problems`` to ``known``."""
    known = tuple(known)
    for r in results:
        tolerated = [p for p in r.problems if any(k.covers(r, p) for k in known)]
        r.known = tuple(tolerated)
        r.problems = tuple(p for p in r.problems if p not in tolerated)


# -- 5. hazards and report ------------------------------------------------------------------


def hazards(e: Enumeration) -> list[str]:
    """Specialisation hazards seen in the enumerated launches (sm_90's; sm_80's are the same).

    A hazard is a compile that the kernel's constexprs do not ask for: two variants with the
    same constexprs whose scalar or pointer arguments got different types or specialisation
    attributes (a Python int where a float usually goes, an int equal to 1 or divisible by
    16), i.e. the same code compiled again at run time.
    """
    out = []
    declared = {name: {p.name for p in fn.params if p.is_constexpr}
                for name, fn in e.kernels.items()}
    groups: dict[tuple, dict[Variant, list[Launch]]] = defaultdict(dict)
    for v, launches in e.variants("sm_90").items():
        fixed = tuple((k, val) for k, val in v.constexprs if k in declared.get(v.name, ()))
        groups[(v.name, fixed)][v] = launches
    splits: dict[tuple[str, str], dict[str, set]] = defaultdict(lambda: defaultdict(set))
    for (name, _), members in groups.items():
        if len(members) < 2:
            continue
        tags = {v: _param_tags(v, declared.get(name, set())) for v in members}
        for param in {p for t in tags.values() for p in t}:
            seen = {t.get(param) for t in tags.values()}
            if len(seen) > 1:
                for v, launches in members.items():
                    splits[(name, param)][tags[v].get(param)].update(
                        _case_tag(x) for x in launches[:20])
    for (name, param), by_tag in sorted(splits.items()):
        detail = "; ".join(f"{tag} from e.g. {sorted(cases)[0]}"
                           for tag, cases in sorted(by_tag.items()))
        out.append(f"{name.rsplit('.', 1)[-1]}({param}): the same constexprs compile again "
                   f"for {len(by_tag)} argument types: {detail}")
    for name, fn in sorted(e.kernels.items()):
        ints = [p.name for p in fn.params if not p.is_constexpr and not p.do_not_specialize
                and any(t[1].startswith(("i32", "i64", "constexpr"))
                        for v in e.variants("sm_90") if v.name == name
                        for t in _param_tags(v, declared[name]).items() if t[0] == p.name)]
        if ints:
            out.append(f"{name.rsplit('.', 1)[-1]}: {', '.join(ints)} received Python ints and "
                       "are not in do_not_specialize: an int there is specialised on == 1 (a "
                       "constexpr baked into the code) and on % 16, so its values pick variants")
    for op, kernels in sorted(e.length_dependent.items()):
        out.append(f"{op}: the number of tensors (blocks) picks the compiled variant of "
                   f"{', '.join(k.rsplit('.', 1)[-1] for k in kernels)}")
    return out


def _param_tags(v: Variant, declared: set) -> dict[str, str]:
    """Type and specialisation of every non-constexpr parameter, e.g. ``i32/div16``."""
    attrs = dict(v.attrs)
    consts = dict(v.constexprs)
    out = {}
    for param, ty in v.signature:
        if param in declared:
            continue
        if ty == "constexpr":
            out[param] = f"constexpr {consts.get(param)!r}"
        else:
            div = any(a[0] == "tt.divisibility" for a in attrs.get(param, ()))
            out[param] = ty + ("/div16" if div else "")
    return out


def _case_tag(launch: Launch) -> str:
    c = launch.case
    keys = [k for k in ("style", "n", "momentum", "weight_decay", "steps") if k in c]
    return launch.op + "(" + ", ".join(f"{k}={c[k]}" for k in keys) + ")"


def _widths(ws: Iterable[tuple[str, int]]) -> str:
    counts = Counter(ws)
    return " ".join(f"{op}{w}x{n}" for (op, w), n in sorted(counts.items())) or "-"


def table(results: list[Result]) -> str:
    rows = [("kernel", "target", "DT", "al", "options", "regs", "spill", "stack/lmem", "smem",
             "loop ld/st B x count", "tail", "s", "")]
    for r in sorted(results, key=lambda r: (r.variant.kernel, r.variant.target,
                                            str(r.variant.constexpr("DT", r.variant.constexpr(
                                                "BITS"))),
                                            str(r.variant.constexpr("ALIGNED")),
                                            r.variant.short())):
        v = r.variant
        dt = v.constexpr("DT", v.constexpr("BITS", "-"))
        al = {True: "A", False: "u", None: "-"}[v.constexpr("ALIGNED")]
        if r.ok:
            rows.append((v.kernel, v.target, str(dt), al, v.short(), str(r.regs),
                         f"{r.spill_stores}/{r.spill_loads}", f"{r.stack}/{r.local}",
                         str(r.shared), _widths(r.loop_widths), _widths(r.tail_widths),
                         f"{r.seconds:.1f}",
                         "FAIL" if r.problems else "known" if r.known else ""))
        else:
            rows.append((v.kernel, v.target, str(dt), al, v.short(), "-", "-", "-", "-", "-",
                         "-", f"{r.seconds:.1f}", "FAIL"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    widths[4] = min(widths[4], 60)
    lines = []
    for row in rows:
        cells = [c if i != 4 or len(c) <= 60 else c[:57] + "..." for i, c in enumerate(row)]
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
    return "\n".join(lines)


def summary(e: Enumeration, selected: list[Variant], results: list[Result]) -> str:
    enumerated = Counter((v.kernel, v.target) for v in e.variants())
    chosen = Counter((r.variant.kernel, r.variant.target) for r in results)
    lines = [f"{'kernel':26} {'target':6} {'variants':>8} {'compiled':>8} {'max regs':>8} "
             f"{'spills':>6} {'smem':>6} {'fails':>5} {'known':>5}"]
    for key in sorted(enumerated):
        rs = [r for r in results if (r.variant.kernel, r.variant.target) == key]
        ok = [r for r in rs if r.ok]
        lines.append(
            f"{key[0]:26} {key[1]:6} {enumerated[key]:8d} {chosen[key]:8d} "
            f"{max((r.regs for r in ok), default=-1):8d} "
            f"{sum(r.spill_stores + r.spill_loads for r in ok):6d} "
            f"{max((r.shared for r in ok), default=-1):6d} "
            f"{sum(1 for r in rs if r.problems):5d} {sum(1 for r in rs if r.known):5d}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/triton_aot_check",
        description="Compile every variant the triton backend can launch for sm_90 and sm_80, "
                    "without a GPU, and check registers, spills, local memory and vector "
                    "widths.")
    parser.add_argument("--cover", action="store_true",
                        help="compile only a strength-2 cover of the variants per kernel and "
                             "dtype (a quicker local check; CI compiles every variant)")
    parser.add_argument("--strict", action="store_true",
                        help="an op that raises, or a kernel that no op launches, fails the "
                             "check (CI runs with it)")
    parser.add_argument("--no-known", action="store_true",
                        help="fail on the defects listed in KNOWN too")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--ops", default="", help="comma-separated ops (default: all)")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--table", type=Path, help="also write the table to this file")
    parser.add_argument("--list", action="store_true", help="enumerate only, print variants")
    args = parser.parse_args(argv)
    t0 = time.time()
    for t in list(TARGETS):
        if t not in args.targets.split(","):
            del TARGETS[t]

    e = enumerate_variants(args.dtypes.split(","), [o for o in args.ops.split(",") if o],
                           jobs=args.jobs)
    all_variants = list(e.variants())
    print(f"triton_aot: {e.calls} op calls, {len(e.launches)} launches, "
          f"{len(all_variants)} distinct variants over {len(TARGETS)} targets "
          f"({e.seconds:.0f}s)")
    for op, contract in e.contracts.items():
        print(f"  {op}: {contract} contract")
    fatal = []
    if e.errors:
        by_op = defaultdict(list)
        for op, case, err in e.errors:
            by_op[op].append((case, err))
        for op, errs in by_op.items():
            print(f"  {op}: {len(errs)} calls raised, e.g. {errs[0][1]} (case {errs[0][0]})")
        if args.strict:
            fatal.append(f"{len(e.errors)} op calls raised")
    launched = {v.name for v in all_variants}
    never = sorted(set(e.kernels) - launched)
    if never and not args.ops:
        print(f"  kernels no op launched: {', '.join(never)}")
        if args.strict:
            fatal.append(f"kernels never launched: {never}")
    if e.missing_ops:
        print(f"  ops with no matrix here: {', '.join(e.missing_ops)}")
        fatal.append(f"ops not enumerated: {e.missing_ops}")
    # Constexpr coverage: a boolean constexpr seen with one value only means an option
    # the matrix does not turn (a new one: add it to op_matrix).
    for name in sorted(launched):
        seen: dict[str, set] = defaultdict(set)
        declared = {p.name for p in e.kernels[name].params if p.is_constexpr}
        for v in all_variants:
            if v.name == name:
                for k, val in v.constexprs:
                    if k in declared:
                        seen[k].add(val)
        one_sided = [k for k, vals in seen.items() if vals in ({True}, {False})]
        if one_sided:
            msg = f"{name}: constexprs {one_sided} only ever take one value"
            print("  " + msg)
            fatal.append(msg)
    if args.list:
        for v in sorted(all_variants, key=lambda v: (v.name, v.target, repr(v.features()))):
            print(v.target, v.kernel, v.short())
        return 1 if fatal else 0

    _KERNELS.update(e.kernels)
    chosen = select(all_variants) if args.cover else all_variants
    print(f"triton_aot: compiling {len(chosen)} variants "
          f"({'strength-2 cover per kernel and dtype' if args.cover else 'every one'}) "
          f"with {args.jobs} processes")
    t1 = time.time()
    results = compile_all(chosen, args.jobs, dedupe_ttir=not args.cover)
    triage(results, () if args.no_known else KNOWN)
    shared = sum(r.shares_with for r in results)
    print(f"triton_aot: {len(results)} compiles in {time.time() - t1:.0f}s"
          + (f" (for {shared} variants: those with identical TTIR share one)"
             if not args.cover else ""))
    text = table(results)
    print(text)
    if args.table:
        args.table.write_text(text + "\n")
    print()
    print(summary(e, chosen, results))
    print()
    found = hazards(e)
    print(f"specialisation hazards ({len(found)}):")
    for h in found:
        print("  - " + h)
    bad = [r for r in results if r.problems]
    for k in KNOWN if not args.no_known else ():
        hits = [r for r in results if any(k.covers(r, p) for p in r.known)]
        if hits:
            print(f"KNOWN {k.kernel} ({k.kind} <= {k.limit}) in {len(hits)} compiles, e.g. "
                  f"{hits[0].variant.target} [{hits[0].variant.short()}] "
                  f"DT={hits[0].variant.constexpr('DT')}: {'; '.join(hits[0].known)}\n"
                  f"      why: {k.why}")
    for r in bad:
        print(f"FAIL {r.variant.target} {r.variant.kernel} [{r.variant.short()}] "
              f"DT={r.variant.constexpr('DT')}: {'; '.join(r.problems)}")
    ok = not bad and not fatal
    for f in fatal:
        print(f"FAIL {f}")
    regs = max((r.regs for r in results if r.ok), default=-1)
    cpu = _cpu()
    compile_cpu = sum(r.cpu for r in results)
    print(f"triton_aot: {'OK' if ok else 'FAILED'}: {len(results)} compiles, "
          f"{len(bad)} failing, max {regs} registers (budget {REG_BUDGET}), "
          f"{time.time() - t0:.0f}s wall; CPU: {compile_cpu:.0f}s in the compiles, "
          f"{e.cpu:.0f}s in the enumeration")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
