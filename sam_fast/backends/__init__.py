"""Backend registrations.

The ``torch`` backend is always there. Every other backend lives in a module
of this package named ``<name>_backend`` that registers itself with
:func:`sam_fast.dispatch.register_backend` when imported (and registers an
``unavailable_reason`` when it cannot run here, rather than failing to import).
"""

import importlib
import pkgutil

from .. import dispatch
from . import torch_bsam, torch_family, torch_ops

dispatch.register_backend("torch", {**torch_ops.OPS, **torch_family.OPS, **torch_bsam.OPS})

for _module in pkgutil.iter_modules(__path__):
    if _module.name.endswith("_backend"):
        importlib.import_module(f"{__name__}.{_module.name}")
