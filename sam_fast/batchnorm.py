"""BatchNorm running statistics around SAM's second forward pass.

SAM runs the model twice on each batch. The second pass runs at the perturbed
point ``w + e``; its batch statistics describe a model that is never kept, and
letting them into ``running_mean``/``running_var`` also counts every batch twice.
The usual recipe (``davda54/sam``'s ``disable_running_stats`` /
``enable_running_stats``, whose names and call pattern these functions keep) is::

    enable_running_stats(model)            # first pass: statistics update as usual
    loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)
    disable_running_stats(model)           # second pass: statistics untouched
    loss_fn(model(x), y).backward()
    opt.second_step(zero_grad=True)

or, with the context manager, ``with frozen_running_stats(model): ...`` around
the second pass.

What "untouched" means here is stronger than the reference's ``momentum = 0``:

- ``momentum = None`` (a cumulative average) divides by ``num_batches_tracked``,
  which every training forward increments, even with ``momentum = 0``: the
  reference's second pass shifts every later average. Here the counter does not move.
- ``momentum = 0`` still computes ``0 * batch_mean + 1 * running_mean``, which is
  NaN when the perturbed point's activations overflow. Here nothing is written.

Both come from switching ``track_running_stats`` off for the frozen pass: in
training mode ``_BatchNorm.forward`` then normalises with the batch statistics
(as it does anyway) and passes no running buffers to ``F.batch_norm``, so
neither they nor the counter change; in eval mode it still normalises with the
running statistics. ``momentum`` is also set to 0, as in the reference, for code
that reads it. Both attributes are put back exactly (``None`` included).
``SyncBatchNorm`` is a ``_BatchNorm`` and is handled the same way.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["disable_running_stats", "enable_running_stats", "frozen_running_stats"]

# The saved settings live on the module itself, so that enable_running_stats needs
# nothing but the model (the reference's API). ``backup_momentum`` is the reference's
# attribute name; code written for it that reads the attribute keeps working.
_MOMENTUM = "backup_momentum"
_TRACK = "_sam_fast_backup_track_running_stats"


def _batchnorms(model: nn.Module) -> Iterator[_BatchNorm]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            yield module


def disable_running_stats(model: nn.Module) -> None:
    """Stop every BatchNorm in ``model`` from updating its running statistics.

    ``running_mean``, ``running_var`` and ``num_batches_tracked`` stay bit for bit
    as they are until :func:`enable_running_stats`. Calling it twice is harmless:
    the settings saved the first time are kept (the reference would save the 0).
    """
    modules = list(_batchnorms(model))  # every check before any module is changed
    for module in modules:
        if hasattr(module, _TRACK):
            continue  # already frozen: keep the original settings
        setattr(module, _MOMENTUM, module.momentum)
        setattr(module, _TRACK, module.track_running_stats)
        module.momentum = 0.0
        module.track_running_stats = False


def enable_running_stats(model: nn.Module) -> None:
    """Undo :func:`disable_running_stats`: put back each BatchNorm's own ``momentum``
    (``None`` included) and ``track_running_stats``. Modules that were not frozen are
    left alone, so it may be called every step, frozen or not."""
    modules = list(_batchnorms(model))
    for module in modules:
        if not hasattr(module, _TRACK):
            continue
        module.track_running_stats = getattr(module, _TRACK)
        module.momentum = getattr(module, _MOMENTUM)
        delattr(module, _TRACK)
        delattr(module, _MOMENTUM)


@contextlib.contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[nn.Module]:
    """``with frozen_running_stats(model):`` the BatchNorm running statistics of
    ``model`` do not change inside the block; they resume updating after it, also when
    the block raises. Yields ``model``.

    Only the modules this call froze are unfrozen on exit, so blocks nest.
    """
    modules = [m for m in _batchnorms(model) if not hasattr(m, _TRACK)]
    for module in modules:
        disable_running_stats(module)
    try:
        yield model
    finally:
        for module in modules:
            enable_running_stats(module)
