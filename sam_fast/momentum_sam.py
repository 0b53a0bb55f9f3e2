"""Momentum-SAM (Becker et al., 2024, "Momentum-SAM: Sharpness Aware Minimization without
Computational Overhead"): SAM's perturbation taken along the base optimizer's momentum
instead of a first gradient, so a step needs one forward/backward pass (docs/family.md).

It is :class:`~sam_fast.SAM` with another direction: the same plan, fused ops, fast path,
restore and fused base step, GradScaler handling and checkpoints.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from .sam import SAM
from .wrapper import _eager

__all__ = ["MomentumSAM"]

# The base optimizers whose momentum is the direction, and the state key that holds it.
_DIRECTION_KEY = {torch.optim.SGD: "momentum_buffer", torch.optim.Adam: "exp_avg",
                  torch.optim.AdamW: "exp_avg"}


class MomentumSAM(SAM):
    r"""MSAM: ``w~ = w - rho * v / (|v| + eps)``, ``v`` the base optimizer's momentum (SGD's
    ``momentum_buffer``; Adam's and AdamW's ``exp_avg``, as in the authors' AdamW variant),
    the norm global over every parameter; the gradient is taken at ``w~`` and the base
    optimizer steps from ``w`` with it. One forward/backward pass per step::

        opt = MomentumSAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
        opt.step(closure)       # perturb, closure (the one pass, at w~), restore + step

    or by hand (e.g. with GradScaler): :meth:`first_step` *before* the forward pass (the
    gradients must be None), the forward and backward pass, then :meth:`second_step` (or
    ``scaler.step(opt)``). The first step (no momentum yet) is a plain base step.

    ``rho`` defaults to 0.3, the authors' default for SGD. Departure from the authors'
    code (``optimizer/msam.py``), which keeps the weights at ``w~`` between steps and moves
    them back by arithmetic: here ``w`` is saved and restored bit for bit, so the weights
    users see between steps (for evaluation, checkpoints) are ``w``, and the base step's
    weight decay reads ``w`` where theirs reads ``w~``.
    """

    _rho_factor = -1.0  # SAM's first step, against the direction (the momentum)

    def __init__(self, params: Iterable[Tensor] | Iterable[dict] | None,
                 base_optimizer: type[Optimizer] | Optimizer = torch.optim.SGD,
                 rho: float = 0.3, **kwargs: Any) -> None:
        for key in ("adaptive", "eta", "normalize", "interval"):
            if key in kwargs:
                raise TypeError(f"MomentumSAM does not take {key}= (its direction is the "
                                "momentum, normalised, every step)")
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        kind = type(self.base_optimizer)
        if kind not in _DIRECTION_KEY:
            raise TypeError("MomentumSAM perturbs along the base optimizer's momentum: it "
                            "takes torch.optim.SGD (with momentum), Adam or AdamW, not "
                            f"{kind.__name__}")
        if kind is torch.optim.SGD:
            for group in self.param_groups:
                if not group.get("momentum", 0):
                    raise ValueError("MomentumSAM with SGD needs momentum > 0 (without it "
                                     "there is no direction to perturb along)")
        self._direction_key = _DIRECTION_KEY[kind]

    @_eager
    def first_step(self, zero_grad: bool = False, *, grad_scaler: Any = None) -> None:
        """Save ``w`` and move to ``w - rho * v / (|v| + eps)``, before the forward pass.

        Parameters without momentum yet (the first step, a parameter that never had a
        gradient) stay where they are; when none has any, nothing moves and
        :meth:`second_step` takes a plain base step. ``zero_grad`` and ``grad_scaler`` are
        accepted for SAM's signature and unused (there is no gradient yet; the momentum is
        unscaled).
        """
        if self._step_state.perturbed is not None or self._counter["plain"]:
            raise RuntimeError("first_step() called twice without second_step()")
        params = [p for g in self.param_groups for p in g["params"]]
        if any(p.grad is not None for p in params):
            raise RuntimeError(
                "MomentumSAM.first_step() comes before the forward/backward pass: the "
                "gradients must be None (zero_grad(set_to_none=True)), since the pass "
                "after it computes them at the perturbed point")
        state, key = self.base_optimizer.state, self._direction_key
        moved = False
        try:
            # The momentum stands in for the gradients SAM's first step reads: the same
            # checks, norm and fused perturbation, with the sign turned.
            for p in params:
                p.grad = state[p].get(key) if p in state else None
            if any(p.grad is not None for p in params):
                moved = SAM._first_step(self, None)
        finally:
            for p in params:
                p.grad = None  # never let backward() accumulate into the momentum
        if not moved:
            self._counter["plain"] = True

    @_eager
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One MSAM step: :meth:`first_step`, ``closure`` (the one forward/backward pass,
        at the perturbed point), :meth:`second_step`; returns the closure's loss. Without
        a closure (``GradScaler.step``), the second step of a :meth:`first_step` taken by
        hand."""
        if self._step_state.perturbed is None and not self._counter["plain"]:
            if closure is None:
                raise RuntimeError(
                    "MomentumSAM.step() needs a closure (the one forward/backward pass, run "
                    "at the perturbed point), or call first_step() before the forward pass "
                    "and second_step() after the backward")
            self.first_step()
        return super().step(closure)
