"""Loading the compiled ops: ``sam_fast._C``, and the CUDA kernels just in time.

``sam_fast._C`` (built by setup.py) defines the ``torch.ops.sam_fast`` schemas
and holds the CPU kernels, plus the CUDA kernels when it was built with CUDA.
When it has no CUDA kernels and CUDA tensors ask for them, they are compiled
just in time from the shipped sources (``torch.utils.cpp_extension.load``,
ninja, cached per machine) if a CUDA toolchain is here; ``SAM_FAST_JIT=0``
turns that off. Every reason a backend cannot run is kept as a sentence, for
``dispatch.why_unavailable``, the one warning, and ``python -m sam_fast.info``.

``SAM_FAST_REQUIRE_EXT=1`` (set by CI) turns a missing or broken ``sam_fast._C``
into an ImportError of ``sam_fast`` instead of a fallback.

The portable build's CUDA kernels are a library of their own,
``sam_fast._C_stable_cuda`` (docs/extension.md, "The portable CUDA library"), loaded after
``sam_fast._C_stable`` when torch is a CUDA build; when it cannot load, the cuda
backend is unavailable with the reason and the cpu one is unaffected.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from . import _toolchain

# Every op with CPU and CUDA kernels in sam_fast._C, the SAM family's and BSAM's included
# (their schemas are defined in sam_fast/family_ops.py and sam_fast/bsam_ops.py, the
# kernels in csrc/).
_OPS = ("grad_sumsq", "perturb_", "restore_", "restore_sgd_", "restore_adamw_",
        "sampa_points_", "sampa_update_", "dot_sumsq", "combine_", "ema_residual_",
        "bsam_noise_", "bsam_ascent_", "bsam_update_")

# The portable library's stable-ABI target (setup.py's STABLE_TARGET): the oldest torch
# it loads in.
STABLE_TARGET = (2, 10)
ABI_CHOICES = ("auto", "matched", "stable")

_lock = threading.RLock()
_C: ModuleType | None = None
_C_reason: str | None = None
_loaded = False
_cuda_reason: str | None = None
_cuda_checked = False
_jit_info: dict[str, Any] | None = None
# The portable CUDA library: the module once loaded, else why not (None: not tried).
_cuda_lib: ModuleType | None = None
_cuda_lib_reason: str | None = None
_cuda_lib_broken = False  # built but failed to load: no just-in-time build instead
_warned: set[str] = set()


def require_ext() -> bool:
    return os.environ.get("SAM_FAST_REQUIRE_EXT", "0") == "1"


def abi_choice() -> str:
    """``SAM_FAST_ABI``: "auto" (default: the version-matched library when it was built
    for this torch, else the portable one), "matched" or "stable" (only that one)."""
    choice = os.environ.get("SAM_FAST_ABI", "auto")
    if choice not in ABI_CHOICES:
        raise ValueError(f"SAM_FAST_ABI={choice!r}; expected one of {ABI_CHOICES}")
    return choice


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _built_module() -> ModuleType | None:
    """sam_fast/_built.py: what setup.py last built here (None: an installation from
    before the file existed)."""
    try:
        return importlib.import_module("sam_fast._built")
    except ImportError:
        return None


def _built_portable_cuda() -> bool | None:
    """Whether setup.py built sam_fast._C_stable_cuda here (None: _built.py predates it)."""
    value = getattr(_built_module(), "PORTABLE_CUDA", None)
    return None if value is None else bool(value)


def _built() -> tuple[str | None, bool | None]:
    """The torch the version-matched library was built for (None: not built) and whether
    the portable one was; (None, None) without sam_fast/_built.py."""
    built = _built_module()
    if built is None:
        return None, None
    return getattr(built, "MATCHED_TORCH", None), bool(getattr(built, "PORTABLE", False))


def _same_release(built: str) -> bool:
    """``built`` (a torch version, local tag aside) is this torch."""
    return built.split("+")[0] == torch.__version__.split("+")[0]


def _load_matched(matched_torch: str | None) -> tuple[ModuleType | None, str | None]:
    # Decided before the import: a library imported is registered for good, and a
    # version-matched one loaded into another torch can crash rather than raise.
    if matched_torch is not None and not _same_release(matched_torch):
        return None, (f"sam_fast._C was built for torch {matched_torch} but this is torch "
                      f"{torch.__version__}")
    try:
        module = importlib.import_module("sam_fast._C")
    except ImportError as exc:
        return None, _explain_import_error(exc, "sam_fast._C")
    built = getattr(module, "torch_version", "")
    if built and not _same_release(built):
        return None, (f"sam_fast._C was built for torch {built} but this is torch "
                      f"{torch.__version__}; rebuild sam_fast")
    return module, None


def _load_portable() -> tuple[ModuleType | None, str | None]:
    if _release(torch.__version__) < STABLE_TARGET:
        return None, (f"this torch ({torch.__version__}) predates {STABLE_TARGET[0]}."
                      f"{STABLE_TARGET[1]}, the oldest torch the portable sam_fast._C_stable "
                      "serves")
    try:
        module = importlib.import_module("sam_fast._C_stable")
    except ImportError as exc:
        return None, _explain_import_error(exc, "sam_fast._C_stable")
    from . import _stable

    _stable.register(_OPS)
    _load_portable_cuda()
    return module, None


def _load_portable_cuda() -> None:
    """sam_fast._C_stable_cuda, after sam_fast._C_stable (whose schemas it registers CUDA
    kernels for): only in a CUDA build of torch; a failure is the cuda backend's reason."""
    global _cuda_lib, _cuda_lib_reason, _cuda_lib_broken
    if torch.version.cuda is None:
        _cuda_lib_reason = (f"this torch ({torch.__version__}) is not a CUDA build: the portable "
                            "CUDA kernels (sam_fast._C_stable_cuda) are not loaded")
        return
    if _built_portable_cuda() is False:
        _cuda_lib_reason = "sam_fast._C_stable_cuda is not built (a portable build without CUDA)"
        return
    try:
        _cuda_lib = importlib.import_module("sam_fast._C_stable_cuda")
    except ImportError as exc:
        _cuda_lib_reason = _explain_import_error(exc, "sam_fast._C_stable_cuda")
        _cuda_lib_broken = not (isinstance(exc, ModuleNotFoundError)
                                and exc.name == "sam_fast._C_stable_cuda")
        return
    _cuda_lib_reason = None


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        return 0


def _portable_cuda_obstacle() -> str | None:
    """Why the loaded portable CUDA library cannot run here: its static CUDA runtime
    needs a driver of at least its major version (minor-version compatibility)."""
    if _cuda_lib is None:
        return None
    runtime = getattr(_cuda_lib, "cuda_runtime", "")
    driver = _cuda_lib.driver_version() if hasattr(_cuda_lib, "driver_version") else ""
    if runtime and driver and _major(driver) < _major(runtime):
        return (f"sam_fast._C_stable_cuda carries the CUDA {runtime} runtime (linked "
                f"statically), but this machine's driver supports CUDA {driver} only: update "
                "the driver to one for CUDA " + runtime.split(".")[0] + ".x, or build "
                "sam_fast for this torch (SAM_FAST_BUILD=matched)")
    return None


def load() -> ModuleType | None:
    """Import the compiled library once (and its fake implementations): ``sam_fast._C``
    when it was built for this torch, else ``sam_fast._C_stable`` (torch 2.10 and later);
    None when neither can serve."""
    global _C, _C_reason, _loaded
    with _lock:
        if _loaded:
            return _C
        _loaded = True
        choice = abi_choice()
        matched_torch, portable = _built()
        reasons = []
        if choice in ("auto", "matched") and (matched_torch is not None or portable is None):
            _C, reason = _load_matched(matched_torch)
            if reason:
                reasons.append(reason)
        if _C is None and choice in ("auto", "stable") and portable is not False:
            _C, reason = _load_portable()
            if reason:
                reasons.append(reason)
        if _C is not None:
            from . import _fake  # noqa: F401  (registers the fake implementations)
        elif not reasons:
            reasons.append(_NOT_BUILT if choice == "auto" else
                           f"SAM_FAST_ABI={choice} but that library was not built here")
        _C_reason = None if _C is not None else "; ".join(reasons)
        if _C is None and require_ext():
            raise ImportError(f"SAM_FAST_REQUIRE_EXT=1 but {_C_reason}")
        return _C


def abi() -> str | None:
    """Which library serves the cpp backend: "matched", "stable" or None."""
    module = load()
    if module is None:
        return None
    return getattr(module, "abi", "matched")


_NOT_BUILT = ("sam_fast._C is not built (installed without a compiler, with SAM_FAST_NO_EXT=1, "
              "or with build isolation and no torch to build against: reinstall with "
              "`pip install --no-build-isolation .`)")


def _explain_import_error(exc: ImportError, name: str) -> str:
    if isinstance(exc, ModuleNotFoundError) and exc.name == name:
        return _NOT_BUILT if name == "sam_fast._C" else f"{name} is not built"
    return f"{name} failed to load: {exc}"


def cpp_reason() -> str | None:
    """Why the CPU kernels cannot run here, or None."""
    return None if load() is not None else _C_reason


def _has_cuda_kernels() -> bool:
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"sam_fast::{op}", "CUDA")
               for op in _OPS)


def cuda_reason(allow_jit: bool = True) -> str | None:
    """Why the CUDA kernels cannot run here, or None; compiles them just in time if
    ``allow_jit``, the installed build lacks them and a toolchain is here."""
    global _cuda_reason, _cuda_checked
    with _lock:
        if _cuda_checked:
            return _cuda_reason
        if load() is None:
            return _C_reason
        if not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        if getattr(_C, "abi", "matched") == "stable":
            reason = (_cuda_lib_reason if _cuda_lib_broken else None) or \
                _portable_cuda_obstacle()
            if reason is not None:
                _cuda_checked, _cuda_reason = True, reason
                return reason
        if _has_cuda_kernels():
            _cuda_checked, _cuda_reason = True, None
            return None
        reason = _jit_obstacle()
        if reason is None and not allow_jit:
            return ("the installed sam_fast._C has no CUDA kernels; backend='cuda' compiles "
                    "them just in time (SAM_FAST_JIT=0 turns that off)")
        if reason is None:
            reason = _jit_build()
        _cuda_checked, _cuda_reason = True, reason
        return reason


def _jit_obstacle() -> str | None:
    """What stops a just-in-time build of the CUDA kernels, or None."""
    base = "the installed sam_fast._C has no CUDA kernels"
    if torch.version.cuda is None:
        return f"{base}, and this torch ({torch.__version__}) is not a CUDA build"
    if _toolchain.jit_disabled():
        return f"{base}, and SAM_FAST_JIT=0 turns the just-in-time build off"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        return (f"{base}, and no CUDA toolchain was found to compile them just in time "
                "(set CUDA_HOME or put nvcc on PATH)")
    if not cpp_extension.is_ninja_available():
        return f"{base}, and ninja is missing for the just-in-time build (pip install ninja)"
    if csrc_dir() is None:
        return f"{base}, and this installation does not carry the CUDA sources"
    return None


def csrc_dir() -> Path | None:
    """The C++/CUDA sources: shipped as sam_fast/_csrc, or csrc/ of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_csrc", here.parent / "csrc"):
        if (candidate / "cuda" / "ops_cuda.cu").is_file():
            return candidate
    return None


def _jit_build() -> str | None:
    global _jit_info
    from torch.utils import cpp_extension

    src = csrc_dir()
    assert src is not None
    extra = _toolchain.include_flags(_toolchain.nvidia_include_dirs(cpp_extension.CUDA_HOME))
    warnings.warn(
        "sam_fast: the installed build has no CUDA kernels; compiling them just in time "
        "(once per machine, cached by torch.utils.cpp_extension; SAM_FAST_JIT=0 turns this off)",
        stacklevel=4,
    )
    try:
        cpp_extension.load(
            name="sam_fast_cuda_jit",
            sources=[str(src / "cuda" / "ops_cuda.cu")],
            extra_cflags=["-O3"] + extra,
            extra_cuda_cflags=["-O3", "-lineinfo"] + extra,
            is_python_module=False,
            verbose=os.environ.get("SAM_FAST_JIT_VERBOSE", "0") == "1",
        )
    except Exception as exc:  # a compiler failure: report it, fall back
        return f"the installed sam_fast._C has no CUDA kernels and the just-in-time build failed: {exc}"
    if not _has_cuda_kernels():
        return "the just-in-time CUDA build finished but registered no kernels"
    _jit_info = {
        "source": "just-in-time build",
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST", "the visible GPUs"),
    }
    return None


def warn_once(backend: str, reason: str) -> None:
    """The one warning per backend that it cannot serve the tensors it was meant for."""
    if backend in _warned:
        return
    _warned.add(backend)
    warnings.warn(f"sam_fast: the {backend!r} backend is unavailable: {reason}; "
                  "sam_fast falls back to the next backend (backend='auto') or raises (when "
                  f"{backend!r} was asked for). `python -m sam_fast.info` shows what is there.",
                  RuntimeWarning, stacklevel=5)


def build_info() -> dict[str, Any]:
    """What the loaded library was built with (empty when none is loaded): its ABI
    ("matched": this torch only; "stable": every torch from ``target_version`` on), the
    torch whose headers it was compiled with, CUDA, architectures, compilers."""
    module = load()
    if module is None:
        return {}
    info = {"abi": abi(), "module": module.__name__}
    info.update({key: getattr(module, key, None)
                 for key in ("torch_version", "cuda_version", "cuda_arch_list", "compiler")})
    info["target_version"] = getattr(module, "target_version", None) or info["torch_version"]
    info["with_cuda"] = bool(getattr(module, "with_cuda", 0))
    info["path"] = getattr(module, "__file__", None)
    if info["abi"] == "stable" and torch.version.cuda is not None:
        info["cuda_kernels"] = portable_cuda_info()
    if _jit_info is not None:
        info["cuda_kernels"] = _jit_info
    return info


def portable_cuda_info() -> dict[str, Any]:
    """What the portable CUDA library was built with, or why it is not loaded."""
    if _cuda_lib is None:
        return {"source": "sam_fast._C_stable_cuda", "loaded": False,
                "reason": _cuda_lib_reason or "not loaded"}
    lib = _cuda_lib
    return {
        "source": "sam_fast._C_stable_cuda",
        "loaded": True,
        "path": getattr(lib, "__file__", None),
        "torch_version": getattr(lib, "torch_version", None),
        "target_version": getattr(lib, "target_version", None),
        "cuda_version": getattr(lib, "cuda_version", None),
        "cuda_runtime": f"{getattr(lib, 'cuda_runtime', '?')} "
                        f"({getattr(lib, 'cuda_runtime_linkage', '?')})",
        "cuda_arch_list": getattr(lib, "cuda_arch_list", None),
        "driver": lib.driver_version() or "none",
    }
