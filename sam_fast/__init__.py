"""sam_fast: fast Sharpness-Aware Minimization (SAM, ASAM, USAM, SAMPa, and the family:
GSAM, WSAM, LookSAM, Friendly-SAM, Momentum-SAM, ESAM, BSAM, SAM every k steps) for PyTorch, and measures of
sharpness (:mod:`sam_fast.sharpness`)."""

from . import backends as _backends  # noqa: F401  (registers the backends)
from . import ops, sharpness
from ._version import __version__
from .batchnorm import disable_running_stats, enable_running_stats, frozen_running_stats
from .dispatch import registered_backends
from .bsam import BSAM
from .esam import ESAM, esam_select
from .family import GSAM, WSAM, FriendlySAM, LookSAM
from .momentum_sam import MomentumSAM
from .sam import SAM
from .sampa import SAMPa

__all__ = [
    "SAM", "SAMPa", "GSAM", "WSAM", "LookSAM", "FriendlySAM", "MomentumSAM", "ESAM", "esam_select", "BSAM",
    "disable_running_stats", "enable_running_stats", "frozen_running_stats", "ops",
    "registered_backends", "sharpness", "__version__",
]
