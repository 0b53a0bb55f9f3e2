"""SAM, ASAM and USAM: a drop-in for ``davda54/sam``'s ``SAM`` on fused ops."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from . import base_step, ops
from .wrapper import SharpnessOptimizer, split_eps


class SAM(SharpnessOptimizer):
    r"""Sharpness-Aware Minimization around any base optimizer.

    Same constructor and methods as the reference implementation
    (``davda54/sam``)::

        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)     # w <- w + e(w)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)    # w <- w_old, then the base step

    Args:
        params: parameters or param-group dicts (``None`` when ``base_optimizer``
            is an already-built optimizer: its groups are used).
        base_optimizer: an optimizer class, built here over the same param
            groups with ``**kwargs``, or an optimizer instance.
        rho: neighbourhood radius (per param group).
        adaptive: ASAM's elementwise scaling ``T_w = |w| + eta`` (per group).
        eta: ASAM's offset; 0 reproduces the reference, the ASAM paper uses 0.01.
        normalize: ``False`` gives USAM, ``e = rho * g``.
        perturb_eps: the ``eps`` of ``rho / (||g|| + eps)``, default 1e-12. It may
            also be passed as ``eps`` when the base optimizer has no ``eps`` of
            its own (SGD); with Adam-like bases ``eps`` stays the base's, as in
            the reference.
        backend: ``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"`` or ``"cpp"``.
        **kwargs: the base optimizer's options (``lr``, ``momentum``, ...).

    With ``torch.amp.GradScaler``, ``scaler.step(opt)`` runs :meth:`second_step`
    (this class declares ``_step_supports_amp_scaling``): the weights are always
    restored, the gradients unscaled, and the base step skipped where the
    scaler found inf/NaN. See the README's recipe.
    """

    group_keys = frozenset({"rho", "perturb_eps", "adaptive", "eta", "normalize"})
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        adaptive: bool = False,
        *,
        eta: float = 0.0,
        normalize: bool = True,
        backend: str = "auto",
        **kwargs: Any,
    ) -> None:
        perturb_eps = split_eps(base_optimizer, kwargs, default=1e-12)
        if not eta >= 0.0:
            raise ValueError(f"Invalid eta, should be non-negative: {eta}")
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta, normalize=normalize, perturb_eps=perturb_eps)
        super().__init__(params, base_optimizer, defaults, kwargs, backend)
        # Params perturbed by first_step, per group; None when not perturbed.
        self._perturbed: list[list[Tensor]] | None = None
        self.last_grad_norm: Tensor | None = None
        """The gradient norm of the last :meth:`first_step` (0-dim device tensor)."""
        self.perturbation_skipped: Tensor | None = None
        """Whether the last :meth:`first_step` skipped the perturbation because the norm was
        not finite (0-dim bool device tensor; read it with ``.item()`` when you need it)."""

    # -- the algorithm ---------------------------------------------------------------------

    def _grad_norm(self, params_by_group: list[list[Tensor]]) -> Tensor:
        """The global norm of DESIGN.md section 2: ``||g||``, with ASAM's weights
        ``|w| + eta`` on the groups that are adaptive."""
        parts: dict[float | None, tuple[list[Tensor], list[Tensor]]] = {}
        for group, params in zip(self.param_groups, params_by_group):
            key = float(group["eta"]) if group["adaptive"] else None
            ws, gs = parts.setdefault(key, ([], []))
            ws.extend(params)
            gs.extend(p.grad for p in params)
        home = params_by_group[next(i for i, ps in enumerate(params_by_group) if ps)][0].device
        norms = [
            ops.grad_sumsq(gs, ws if eta is not None else None, eta or 0.0, backend=self.backend)
            for eta, (ws, gs) in parts.items()
        ]
        if len(norms) == 1:
            return norms[0]
        acc = torch.float64 if any(n.dtype == torch.float64 for n in norms) else torch.float32
        return torch.stack([n.to(home, acc) for n in norms]).sum()

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, grad_scaler: Any = None) -> None:
        """Save ``w`` and move to ``w + e(w)`` along the current gradients.

        ``grad_scaler``: the ``torch.amp.GradScaler`` whose scale the current
        gradients carry, so that ``e`` is that of the unscaled gradients
        (needed for USAM; SAM's direction does not depend on the scale).
        A non-finite gradient norm skips the perturbation: the weights stay as
        they are and :attr:`perturbation_skipped` is set.
        """
        if self._perturbed is not None:
            raise RuntimeError(
                "first_step() called twice without second_step(): the parameters are already "
                "perturbed; call second_step() (or restore()) first"
            )
        params_by_group = [
            [p for p in group["params"] if p.grad is not None] for group in self.param_groups
        ]
        if not any(params_by_group):
            raise RuntimeError(
                "first_step(): no parameter has a gradient; run backward() before first_step()"
            )
        grad_scale = _scale_of(grad_scaler)
        sumsq = self._grad_norm(params_by_group)
        self.last_grad_norm = sumsq.sqrt()
        self.perturbation_skipped = ~torch.isfinite(sumsq)
        for group, params in zip(self.param_groups, params_by_group):
            if not params:
                continue
            ops.perturb_(
                params,
                [p.grad for p in params],
                [self._buffer(p, "backup") for p in params],
                sumsq,
                rho=group["rho"], eps=group["perturb_eps"], normalize=group["normalize"],
                eta=float(group["eta"]) if group["adaptive"] else None,
                grad_scale=grad_scale,
                backend=self.backend,
            )
        self._perturbed = params_by_group
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights saved by :meth:`first_step` without stepping.

        For a second forward/backward that failed in user code; :meth:`step`
        calls it for you when its closure raises.
        """
        if self._perturbed is None:
            return
        for params in self._perturbed:
            if params:
                ops.restore_(params, [self.state[p]["backup"] for p in params],
                             backend=self.backend)
        self._perturbed = None

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Go back to ``w`` bit for bit, then take the base optimizer's step with the
        gradients at ``w + e(w)``."""
        if self._perturbed is None:
            raise RuntimeError(
                "second_step() called without first_step(): there is no saved point to "
                "return to"
            )
        # Set by GradScaler.step() on optimizers with _step_supports_amp_scaling.
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)

        fallback = False
        for group, params in zip(self.param_groups, self._perturbed):
            kind = base_step.fused_kind(self.base_optimizer, group, self.group_keys)
            stepping = [p for p in params if p.grad is not None]
            idle = [p for p in params if p.grad is None]
            if kind is None:
                fallback = True
                idle = params
                stepping = []
            if idle:
                ops.restore_(idle, [self.state[p]["backup"] for p in idle], backend=self.backend)
            if stepping:
                base_step.RESTORE_STEPS[kind](
                    self.base_optimizer,
                    group,
                    stepping,
                    [self.state[p]["backup"] for p in stepping],
                    grad_scale=grad_scale,
                    found_inf=found_inf,
                    backend=self.backend,
                )
        self._perturbed = None
        if fallback:
            self._base_step_fallback(grad_scale, found_inf)
        self._mark_stepped()
        if zero_grad:
            self.zero_grad()

    def _base_step_fallback(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """The base optimizer's own ``step()`` for groups no fused op covers."""
        groups = [
            g for g in self.param_groups
            if base_step.fused_kind(self.base_optimizer, g, self.group_keys) is None
        ]
        if found_inf is not None and bool(found_inf):
            # The one host read of the AMP fallback path, as in GradScaler's own.
            return
        if grad_scale is not None:
            grads = [p.grad for g in groups for p in g["params"] if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, torch.reciprocal(grad_scale.to(grads[0])))
        self._base_step_on(groups)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SAM step: perturb along the current gradients, run ``closure`` (the second
        forward/backward at ``w + e``), restore and step. Returns the closure's loss.

        Called without a closure after :meth:`first_step` (as ``GradScaler.step``
        does), it is :meth:`second_step`.
        """
        if closure is None:
            if self._perturbed is not None:
                self.second_step()
                return None
            raise RuntimeError(
                "SAM.step() requires a closure that does the second forward/backward pass "
                "(or call first_step() and second_step() yourself)"
            )
        self.first_step(zero_grad=True)
        try:
            loss = self._evaluate(closure)
        except BaseException:
            self.restore()
            raise
        self.second_step()
        return loss

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self._perturbed is not None:
            raise RuntimeError(
                "state_dict() between first_step() and second_step(): the parameters hold "
                "the perturbed point w + e; call second_step() or restore() first"
            )
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._perturbed = None
        super().load_state_dict(state_dict)


def _scale_of(grad_scaler: Any) -> Tensor | None:
    """The current scale of a GradScaler as a device tensor (no host sync when possible)."""
    if grad_scaler is None or not getattr(grad_scaler, "is_enabled", lambda: True)():
        return None
    scale = getattr(grad_scaler, "_scale", None)
    if isinstance(scale, Tensor):
        return scale.float()
    return torch.tensor(float(grad_scaler.get_scale()))
