"""Where the CUDA toolchain's pieces are, for setup.py and the just-in-time build.

Imports nothing from sam_fast (setup.py loads this file by path, before the
package is installed) and nothing heavy: no torch at import time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

# Ampere (A100, A10/RTX 30), Hopper, and PTX for newer chips to JIT from.
DEFAULT_CUDA_ARCH_LIST = "8.0;8.6;9.0+PTX"


def _site_dirs() -> list[Path]:
    dirs = []
    for key in ("purelib", "platlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            dirs.append(Path(path))
    try:
        import torch  # noqa: PLC0415  (only when asked, never at import)

        dirs.append(Path(torch.__file__).resolve().parent.parent)
    except ImportError:
        pass
    seen, out = set(), []
    for d in dirs:
        if d not in seen and d.is_dir():
            seen.add(d)
            out.append(d)
    return out


def nvidia_include_dirs(cuda_home: str | None) -> list[str]:
    """Header folders of the ``nvidia-*`` wheels that a CUDA build of torch pulls in.

    A CUDA toolkit that only has the compiler and runtime lacks the library
    headers PyTorch's own headers include (cuBLAS, cuSPARSE, cuSOLVER); pip's
    CUDA wheels carry them (``nvidia/cu13/include`` since CUDA 13, one folder
    per library before). Empty when the toolkit has them itself.
    """
    if cuda_home and (Path(cuda_home) / "include" / "cublas_v2.h").exists():
        return []
    found = []
    for site in _site_dirs():
        nvidia = site / "nvidia"
        if not nvidia.is_dir():
            continue
        for include in sorted(nvidia.glob("*/include")):
            if any(include.glob("*.h")):
                found.append(str(include))
    return found


def include_flags(dirs: list[str]) -> list[str]:
    """``-isystem`` flags: searched after the toolkit's own ``-I`` folders, so
    these only fill the gaps and never shadow the toolkit's headers."""
    flags: list[str] = []
    for d in dirs:
        flags += ["-isystem", d]
    return flags


def compiler_version(command: str) -> str:
    """First useful line of ``command --version`` (``gcc 12.2.0``, ``nvcc 13.0``), or ``""``."""
    exe = shutil.which(command)
    if exe is None:
        return ""
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    lines = [line.strip() for line in out.splitlines() if line.strip()]
    if not lines:
        return ""
    if command == "nvcc":
        release = [line for line in lines if "release" in line]
        return f"nvcc {release[-1].split('release')[-1].split(',')[0].strip()}" if release else ""
    return lines[0]


def jit_disabled() -> bool:
    """``SAM_FAST_JIT=0`` turns the just-in-time CUDA build off."""
    return os.environ.get("SAM_FAST_JIT", "1").strip().lower() in ("0", "false", "no", "off")
