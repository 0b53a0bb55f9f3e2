"""The ``cuda`` backend: the CUDA multi-tensor kernels (csrc/cuda/ops_cuda.cu).

They come with ``sam_fast._C`` when it was built with CUDA; otherwise the
first CUDA tensors that ask for them compile them just in time if a CUDA
toolchain is here and ``backend="cuda"`` was asked for by name
(sam_fast/_extension.py; ``SAM_FAST_JIT=0`` turns it off).
When neither works the reason is registered and warned about once, and
``backend="auto"`` moves on to ``triton`` / ``torch``. float64 groups run on
the torch backend (see sam_fast/_compiled_ops.py).
"""

from __future__ import annotations

from .. import _extension, dispatch
from .._compiled_ops import OPS


def unavailable_reason(device_type: str, explicit: bool = True) -> str | None:
    """Why the CUDA kernels cannot serve ``device_type``; a just-in-time build of them
    happens only when ``backend="cuda"`` was asked for by name (``explicit``)."""
    if device_type != "cuda":
        return f"the cuda backend runs on CUDA tensors (use 'cpp' or 'torch' on {device_type})"
    reason = _extension.cuda_reason(allow_jit=explicit)
    if reason is not None:
        _extension.warn_once("cuda", reason)
    return reason


dispatch.register_backend("cuda", OPS, unavailable_reason=unavailable_reason)
