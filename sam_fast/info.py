"""What this sam_fast installation can do: ``python -m sam_fast.info``.

Prints the versions, the build metadata of the compiled extension, and for
every backend and device type whether it can run, or why not. It never
triggers the just-in-time CUDA build (it says when the first use would).
"""

from __future__ import annotations

import platform
import sys

import torch

from . import __version__, _extension, dispatch


def _reason(backend: str, device_type: str) -> str | None:
    # The compiled backends answer without side effects (no JIT build, no warning).
    if backend == "cpp" and device_type == "cpu":
        return _extension.cpp_reason()
    if backend == "cuda" and device_type == "cuda":
        return _extension.cuda_reason(allow_jit=False)
    return dispatch.why_unavailable(backend, device_type, explicit=False)


def report() -> str:
    lines = [
        f"sam_fast {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} "
        f"(CUDA {torch.version.cuda or 'none'}), "
        f"CUDA device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}",
        "",
    ]
    info = _extension.build_info()
    if info:
        lines.append(f"{info['module']}: {info.get('path')}")
        if info["abi"] == "stable":
            lines.append(f"  ABI: stable (portable: torch {info['target_version']} and later; "
                         "no C++ fast path, see docs/extension.md)")
        else:
            lines.append(f"  ABI: version-matched (torch {info.get('torch_version')} only, "
                         "with the C++ fast path)")
        lines.append(f"  built with torch {info.get('torch_version')}, "
                     f"CUDA {info.get('cuda_version') or 'none (CPU kernels only)'}, "
                     f"TORCH_CUDA_ARCH_LIST {info.get('cuda_arch_list') or '-'}")
        lines.append(f"  compilers: {info.get('compiler') or 'unknown'}")
        if "cuda_kernels" in info:
            lines.append(f"  CUDA kernels: {info['cuda_kernels']}")
    else:
        lines.append(f"sam_fast._C: missing: {_extension.cpp_reason()}")
    lines.append("")
    lines.append("backends (device type: status):")
    no_gpu = "" if torch.cuda.is_available() else " (but this machine has no CUDA device)"
    for backend in dispatch.registered_backends():
        for device_type in ("cpu", "cuda"):
            reason = _reason(backend, device_type)
            status = "available" if reason is None else f"unavailable: {reason}"
            if reason is None and device_type == "cuda":
                status += no_gpu
            lines.append(f"  {backend:7s} {device_type:5s} {status}")
    for device_type in ("cpu", "cuda"):
        if device_type == "cuda" and no_gpu:
            lines.append("backend='auto' on cuda: no CUDA device on this machine")
            continue
        order = dispatch.AUTO_ORDER.get(device_type, ())
        usable = [b for b in order if b in dispatch.registered_backends()
                  and _reason(b, device_type) is None]
        lines.append(f"backend='auto' on {device_type}: {usable[0] if usable else 'none'}"
                     f" (order {' -> '.join(order)})")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
