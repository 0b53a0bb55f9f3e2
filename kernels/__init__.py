"""Triton kernels of sam_fast's ``triton`` backend (shipped as ``sam_fast.kernels``).

One module per kernel family; each exposes a host-side launcher that takes a
:class:`~.tables.Table` (the block map and address rows of one tensor group)
and the op's scalars:

- :mod:`.tables`: block maps and address rows, layout checks, their byte-bounded cache;
- :mod:`.common`: device helpers shared by the kernels;
- :mod:`.norm`: deterministic sum of squares (SAM and ASAM norms);
- :mod:`.perturb`: ``w <- w + e`` with backup, and the bit-exact restore;
- :mod:`.sgd`: restore + ``torch.optim.SGD`` step;
- :mod:`.adam`: restore + ``torch.optim.Adam`` / ``AdamW`` step;
- :mod:`.sampa`: SAMPa's points and update with an SGD base.

See docs/triton.md for the design notes.
"""

from . import adam, norm, perturb, sampa, sgd, tables

__all__ = ["adam", "norm", "perturb", "sampa", "sgd", "tables"]
