"""SAM in the Hugging Face ``transformers.Trainer``.

``Trainer`` runs, per optimizer step: ``training_step`` (forward and backward),
gradient clipping (``accelerator.clip_grad_norm_``), ``optimizer.step()``,
``lr_scheduler.step()`` and ``model.zero_grad()``. :class:`SAMTrainer` changes only
``training_step``: it runs the forward/backward at ``w``, calls
:meth:`SAM.first_step(zero_grad=True) <sam_fast.SAM.first_step>`, and runs the
forward/backward again at ``w + e``. The Trainer then clips those second gradients
and calls ``optimizer.step()``: accelerate's ``AcceleratedOptimizer.step()`` calls
``SAM.step()`` without a closure, which after ``first_step`` is ``second_step()``
(restore ``w``, base step with the gradients at ``w + e``). Clipping, schedules,
logging and checkpoints are the Trainer's own.

Gradient accumulation (``gradient_accumulation_steps > 1``) is refused: the
Trainer hands ``training_step`` one micro-batch at a time and steps after the
last, so the perturbation would come from the last micro-batch's gradient alone
(or the second pass would have to replay the earlier micro-batches, which the
Trainer no longer holds). Accumulate with a plain loop instead (README,
"Gradient accumulation and clipping"), or use a larger batch.

Mixed precision with accelerate's GradScaler (``fp16=True``) is refused for now:
``first_step`` would need the scaler (``grad_scaler=``) and the path is untested
here (no GPU); bf16 needs no scaler.

This module imports ``transformers``; ``import sam_fast`` does not import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import transformers
from torch import nn

from ..sam import SAM
from ..batchnorm import frozen_running_stats

__all__ = ["SAMTrainer", "unwrap_sam"]


def unwrap_sam(optimizer: Any) -> SAM:
    """The :class:`~sam_fast.SAM` inside ``optimizer`` (accelerate's
    ``AcceleratedOptimizer`` and similar wrappers keep it as ``.optimizer``)."""
    seen = 0
    current = optimizer
    while not isinstance(current, SAM):
        inner = getattr(current, "optimizer", None)
        if inner is None or inner is current or seen > 8:
            raise TypeError(
                "SAMTrainer needs a sam_fast.SAM optimizer: pass optimizers=(SAM(...), "
                f"scheduler_or_None) or rho=... to wrap the Trainer's own; got "
                f"{type(optimizer).__name__}")
        current, seen = inner, seen + 1
    return current


class SAMTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that trains with SAM.

    Either pass the optimizer, ``SAMTrainer(..., optimizers=(sam_fast.SAM(...), None))``
    (``None`` lets the Trainer build its LR schedule over it), or pass ``rho=`` (and
    optionally ``adaptive=``, ``eta=``) to wrap the optimizer the Trainer builds from
    its arguments (``optim``, ``learning_rate``, ``weight_decay``, ...).

    ``freeze_bn_stats=True`` keeps BatchNorm running statistics out of the second
    pass (:func:`sam_fast.frozen_running_stats`); transformer models rarely have any.

    The logged training loss is the first pass's, at ``w`` (what the Trainer logs
    without SAM, and what ``SAM.step(closure)`` returns).
    """

    def __init__(self, *args: Any, rho: float | None = None, adaptive: bool = False,
                 eta: float = 0.0, freeze_bn_stats: bool = True, **kwargs: Any) -> None:
        args_ = kwargs.get("args", args[1] if len(args) > 1 else None)
        if args_ is not None and args_.gradient_accumulation_steps > 1:
            raise ValueError(
                "SAMTrainer does not support gradient_accumulation_steps > 1: the Trainer "
                "gives training_step one micro-batch at a time, so SAM's perturbation "
                "would come from the last micro-batch only. Use a larger batch, or a plain "
                "loop that accumulates both passes (README, 'Gradient accumulation').")
        if args_ is not None and getattr(args_, "fp16", False):
            raise ValueError(
                "SAMTrainer does not support fp16=True (accelerate's GradScaler) yet: "
                "first_step would need the scaler and that path is untested; use bf16=True.")
        optimizers = kwargs.get("optimizers")
        if optimizers is not None and optimizers[0] is not None:
            if rho is not None:
                raise TypeError("pass rho= or a SAM optimizer in optimizers=, not both")
            unwrap_sam(optimizers[0])  # refuse a non-SAM optimizer now, not at step one
        elif rho is None:
            raise TypeError("SAMTrainer needs optimizers=(sam_fast.SAM(...), ...) or rho=")
        self._sam_options = None if rho is None else dict(rho=rho, adaptive=adaptive, eta=eta)
        self._freeze_bn_stats = freeze_bn_stats
        super().__init__(*args, **kwargs)

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """The Trainer's own optimizer, wrapped in SAM when ``rho=`` was given."""
        optimizer = super().create_optimizer(*args, **kwargs)
        if self._sam_options is not None and not isinstance(optimizer, SAM):
            self.optimizer = optimizer = SAM(None, optimizer, **self._sam_options)
        return optimizer

    def training_step(self, model: nn.Module, inputs: dict[str, Any], *args: Any,
                      **kwargs: Any) -> torch.Tensor:
        """Forward/backward at ``w``, ``first_step``, forward/backward at ``w + e``.

        Returns the first pass's loss; the Trainer then clips the second gradients and
        calls ``optimizer.step()``, which finishes the SAM step (``second_step``).
        """
        sam = unwrap_sam(self.optimizer)
        if self.args.gradient_accumulation_steps > 1:  # arguments changed after __init__
            raise ValueError("SAMTrainer does not support gradient accumulation "
                             "(gradient_accumulation_steps > 1)")
        # compute_loss may pop entries (labels, with label smoothing): each pass its own dict
        copy = (lambda d: type(d)(d)) if isinstance(inputs, Mapping) else (lambda d: d)
        loss = super().training_step(model, copy(inputs), *args, **kwargs)
        sam.first_step(zero_grad=True)
        try:
            if self._freeze_bn_stats:
                with frozen_running_stats(model):
                    super().training_step(model, copy(inputs), *args, **kwargs)
            else:
                super().training_step(model, copy(inputs), *args, **kwargs)
        except BaseException:
            sam.restore()
            raise
        return loss
