"""sam_fast: fast Sharpness-Aware Minimization (SAM, ASAM, USAM, SAMPa) for PyTorch, and
measures of sharpness (:mod:`sam_fast.sharpness`)."""

from . import backends as _backends  # noqa: F401  (registers the backends)
from . import ops, sharpness
from ._version import __version__
from .batchnorm import disable_running_stats, enable_running_stats, frozen_running_stats
from .dispatch import registered_backends
from .sam import SAM
from .sampa import SAMPa

__all__ = [
    "SAM", "SAMPa", "disable_running_stats", "enable_running_stats", "frozen_running_stats", "ops",
    "registered_backends", "sharpness", "__version__",
]
