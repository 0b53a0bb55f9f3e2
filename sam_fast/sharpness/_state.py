"""Leaving the model exactly as it was found: parameters, buffers, train/eval modes, RNG."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn


def select_params(model: nn.Module, params: Sequence[Tensor] | None) -> list[Tensor]:
    """The parameters to measure: ``params`` or every trainable parameter of ``model``.

    The estimators work on one flat vector, so all must share a device and a
    floating dtype (a mixed model can be measured one part at a time).
    """
    chosen = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    if not chosen:
        raise ValueError("no parameters to measure: the model has no parameter with "
                         "requires_grad=True (or params is empty)")
    for p in chosen:
        if not isinstance(p, Tensor) or not p.requires_grad:
            raise ValueError("every entry of params must be a tensor with requires_grad=True")
        if not p.is_floating_point():
            raise ValueError(f"parameters must be floating point, got {p.dtype}")
    kinds = {(p.device, p.dtype) for p in chosen}
    if len(kinds) > 1:
        raise ValueError("the parameters must share one device and dtype, got "
                         + ", ".join(f"{d}/{t}" for d, t in sorted(kinds, key=str)))
    if len({id(p) for p in chosen}) != len(chosen):
        raise ValueError("params lists a parameter twice")
    return chosen


@contextlib.contextmanager
def preserved(model: nn.Module, params: Sequence[Tensor], *, eval_mode: bool, seed: int,
              restore_params: bool) -> Iterator[None]:
    """Run a measurement and put everything back, bit for bit, whatever happens.

    - buffers (BatchNorm running statistics, ``num_batches_tracked``): a
      forward pass in train mode updates them, so they are copied back;
    - parameters: copied back when the measurement moves them (the ascent);
      the Hessian estimators never write them, and skip the copy so that the
      parameters' version counters stay untouched;
    - every module's ``training`` flag;
    - in train mode, the global RNG that dropout draws from: forked and seeded
      with ``seed``, so the measurement is repeatable and the caller's random
      stream is the one it was.
    """
    saved_params = [p.detach().clone() for p in params] if restore_params else []
    saved_buffers = [(b, b.detach().clone()) for b in model.buffers()]
    modes = [(m, m.training) for m in model.modules()]
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    rng = contextlib.nullcontext() if eval_mode else torch.random.fork_rng(devices=devices)
    try:
        with rng:
            if eval_mode:
                model.eval()
            else:
                torch.manual_seed(seed)
            yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved_params):
                p.copy_(s)
            for b, s in saved_buffers:
                b.copy_(s)
        for m, training in modes:
            m.training = training
