"""Measuring sharpness: the Hessian's trace and top eigenvalues, worst-case and
adaptive sharpness (docs/design.md section 7; docs/sharpness.md).

Every function takes ``(model, loss_fn, data, ...)``: ``data`` is one
``(inputs, targets)`` batch or an iterable of them, and
``loss_fn(model(inputs), targets)`` is a scalar mean over the batch. The
measured loss is the mean over all examples. Results are deterministic for a
seed, and the model's parameters and buffers are left exactly as they were.
"""

from .ascent import adaptive_sharpness, worst_case_sharpness
from .eigen import hessian_top_eigenvalues
from .results import EigenResult, SharpnessResult, TraceResult
from .trace import hessian_trace

__all__ = [
    "hessian_trace",
    "hessian_top_eigenvalues",
    "worst_case_sharpness",
    "adaptive_sharpness",
    "TraceResult",
    "EigenResult",
    "SharpnessResult",
]
