"""The one dispatch point between the optimizers and the op implementations.

A backend is a name (``"torch"``, ``"triton"``, ``"cuda"``, ``"cpp"``) with a
table of op implementations. Every implementation works on *one* group of
tensors that share a device and a dtype; the public ops in :mod:`sam_fast.ops`
do the grouping and call :func:`lookup` once per group.

Backends register themselves with :func:`register_backend`. Those that need
something this machine may lack (a GPU, Triton, the compiled extension) pass
an ``available`` predicate, so that ``backend="auto"`` can skip them and an
explicit request can say why it cannot be served.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

# The op names every complete backend provides (docs/design.md section 3).
OP_NAMES = (
    "grad_sumsq",
    "perturb_",
    "restore_",
    "restore_sgd_",
    "restore_adamw_",
    "sampa_points_",
    "sampa_update_",
)

# The SAM family's generic ops (docs/family.md): schemas in sam_fast/family_ops.py, the
# specification in sam_fast/backends/torch_family.py, Triton kernels in kernels/family.py,
# C++ CPU and CUDA kernels in csrc/ (cpu/ops_cpu.cpp, cuda/ops_cuda.cu, family.h).
FAMILY_OP_NAMES = (
    "dot_sumsq",
    "combine_",
    "ema_residual_",
)

# BSAM's three ops (docs/family.md): schemas in sam_fast/bsam_ops.py, the specification in
# sam_fast/backends/torch_bsam.py, Triton kernels in kernels/bsam.py (fp64: the spec), C++ CPU
# and CUDA kernels in csrc/ (cpu/ops_cpu.cpp, cuda/ops_cuda.cu, bsam.h).
BSAM_OP_NAMES = (
    "bsam_noise_",
    "bsam_ascent_",
    "bsam_update_",
)

# Ops every registered backend must implement (no silent hand-over to another backend).
_REQUIRED = FAMILY_OP_NAMES + BSAM_OP_NAMES

# Preference order of ``backend="auto"`` per device type (docs/design.md section 4).
AUTO_ORDER = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpp", "torch"),
}
_AUTO_FALLBACK = ("torch",)


ReasonFn = Callable[[str, bool], "str | None"]


def _always_available(device_type: str, explicit: bool) -> str | None:
    return None


@dataclass
class Backend:
    name: str
    ops: dict[str, Callable] = field(default_factory=dict)
    # (device type, asked for by name?) -> why it cannot run there, None when it can.
    # ``explicit`` lets a backend do costly set-up (a just-in-time build) only when
    # the user named it, never on behalf of ``backend="auto"``.
    unavailable_reason: ReasonFn = _always_available


_BACKENDS: dict[str, Backend] = {}
# (backend name as asked, device type) -> the concrete backend. Availability does not
# change within a process except through register_backend, which clears it.
_RESOLVED: dict[tuple[str, str], str] = {}


def register_backend(
    name: str,
    ops: dict[str, Callable],
    unavailable_reason: ReasonFn | None = None,
) -> None:
    """Register (or replace) the op table of backend ``name``.

    ``unavailable_reason(device_type, explicit)`` says why the backend cannot
    run on that device type (None when it can); ``explicit`` is True when the
    user asked for this backend by name."""
    unknown = set(ops) - set(OP_NAMES) - set(_REQUIRED)
    if unknown:
        raise ValueError(f"backend {name!r} registers unknown ops {sorted(unknown)}")
    backend = Backend(name, dict(ops))
    if unavailable_reason is not None:
        backend.unavailable_reason = unavailable_reason
    _BACKENDS[name] = backend
    _RESOLVED.clear()


def registered_backends() -> tuple[str, ...]:
    return tuple(_BACKENDS)


def why_unavailable(name: str, device_type: str, explicit: bool = True) -> str | None:
    """None when backend ``name`` can run on ``device_type``, else the reason."""
    backend = _BACKENDS.get(name)
    if backend is None:
        return f"backend {name!r} is not registered (known: {', '.join(_BACKENDS) or 'none'})"
    return backend.unavailable_reason(device_type, explicit)


def resolve(name: str, device: torch.device) -> str:
    """The concrete backend that ``name`` means for tensors on ``device``."""
    key = (name, device.type)
    concrete = _RESOLVED.get(key)
    if concrete is not None:
        return concrete
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, _AUTO_FALLBACK):
            if candidate in _BACKENDS and why_unavailable(candidate, device.type, False) is None:
                concrete = candidate
                break
        else:
            raise RuntimeError(f"no sam_fast backend can run on device {device}")
    else:
        reason = why_unavailable(name, device.type, True)
        if reason is not None:
            raise RuntimeError(f"sam_fast backend {name!r} cannot run on {device.type}: {reason}")
        concrete = name
    _RESOLVED[key] = concrete
    return concrete


def lookup(op: str, backend: str, device: torch.device) -> Callable:
    """The implementation of ``op`` for tensors on ``device``.

    Every registered backend implements the SAM family's ops (:data:`FAMILY_OP_NAMES`) and
    BSAM's (:data:`BSAM_OP_NAMES`): one that does not is an error, never a silent hand-over
    to another backend. A backend
    that registered only some of the section 3 ops (as a test backend may) hands the others
    to the ``torch`` backend, which implements all of them.
    """
    concrete = resolve(backend, device)
    impl = _BACKENDS[concrete].ops.get(op)
    if impl is None:
        if op in _REQUIRED:
            raise RuntimeError(f"sam_fast backend {concrete!r} implements no {op!r}")
        impl = _BACKENDS["torch"].ops[op]
    return impl


def served_by(op: str, backend: str, device: torch.device) -> str:
    """The backend whose implementation :func:`lookup` returns for ``op`` on ``device``:
    ``backend`` resolved, or ``"torch"`` for a section 3 op a partial backend lacks (an
    error, as in :func:`lookup`, for a family or BSAM op it lacks)."""
    lookup(op, backend, device)
    concrete = resolve(backend, device)
    return concrete if op in _BACKENDS[concrete].ops else "torch"
