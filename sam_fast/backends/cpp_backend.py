"""The ``cpp`` backend: the C++ CPU kernels of ``sam_fast._C`` (csrc/cpu/ops_cpu.cpp).

Registered always; when ``sam_fast._C`` is missing it registers the reason,
so ``backend="auto"`` moves on to ``torch`` and ``backend="cpp"`` says why.
float64 groups run on the torch backend (see sam_fast/_compiled_ops.py).
"""

from __future__ import annotations

from .. import _extension, dispatch
from .._compiled_ops import OPS


def unavailable_reason(device_type: str, explicit: bool = True) -> str | None:
    if device_type != "cpu":
        return f"the cpp backend runs on CPU tensors (use 'cuda' or 'triton' on {device_type})"
    reason = _extension.cpp_reason()
    if reason is not None:
        _extension.warn_once("cpp", reason)
    return reason


_extension.load()  # raises under SAM_FAST_REQUIRE_EXT=1 when the extension is missing
dispatch.register_backend("cpp", OPS, unavailable_reason=unavailable_reason)
