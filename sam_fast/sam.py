"""SAM, ASAM and USAM: a drop-in for ``davda54/sam``'s ``SAM`` on fused ops."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from . import base_step, distributed, ops, plan
from .wrapper import SharpnessOptimizer, _eager, check_group_options, split_eps


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
        interval: SAM every ``interval`` steps (MosaicML Composer's ``interval``, optax's
            ``sync_period``): steps ``0, k, 2k, ...`` are SAM steps, the others a plain
            base-optimizer step on the current gradients, one forward/backward pass
            (:attr:`ascent_due` says which the next step is). Default 1: every step.
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
        interval: int = 1,
        **kwargs: Any,
    ) -> None:
        perturb_eps = split_eps(base_optimizer, kwargs, default=1e-12)
        if not eta >= 0.0:
            raise ValueError(f"Invalid eta, should be non-negative: {eta}")
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"Invalid interval: {interval!r} (must be an int >= 1)")
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta, normalize=normalize,
                        perturb_eps=perturb_eps)
        super().__init__(params, base_optimizer, defaults, kwargs, backend)
        self.interval = interval
        # Steps taken (SAM or plain) and whether a first_step() that did not perturb awaits
        # its second_step(): a dict, so that shallow copies of __dict__ share it.
        self._counter: dict[str, Any] = {"steps": 0, "plain": False}

    @property
    def ascent_due(self) -> bool:
        """Whether the next step perturbs (a SAM step) or is a plain base step
        (``interval`` > 1)."""
        return self._counter["steps"] % self.interval == 0

    _PLAN_OPS = ("perturb_", "restore_", "restore_sgd_", "restore_adamw_")

    # The perturbation is ``w + factor * rho * d / (|d| + eps)``: 1 for SAM's ascent along
    # the gradient; Momentum-SAM (-1) moves against its direction, the momentum; a plain
    # step (0) saves the point without moving it.
    _rho_factor = 1.0

    # -- what the last first_step measured ------------------------------------------------------

    @property
    def last_grad_norm(self) -> Tensor | None:
        """The gradient norm of the last :meth:`first_step` (0-dim device tensor; computed
        from the sum of squares when first read)."""
        state = self._step_state
        if state.norm is None and state.sumsq is not None:
            state.norm = state.sumsq.sqrt()
        return state.norm

    @property
    def perturbation_skipped(self) -> Tensor | None:
        """Whether the last :meth:`first_step` skipped the perturbation because the norm was
        not finite (0-dim bool device tensor; read it with ``.item()`` when you need it)."""
        sumsq = self._step_state.sumsq
        return None if sumsq is None else ~torch.isfinite(sumsq)

    @property
    def _perturbed(self) -> bool:
        return self._step_state.perturbed is not None

    def _adaptive_eta(self, group: dict) -> float | None:
        return float(group["eta"]) if group["adaptive"] else None

    # -- the algorithm ---------------------------------------------------------------------

    @_eager
    def first_step(self, zero_grad: bool = False, *, grad_scaler: Any = None) -> None:
        """Save ``w`` and move to ``w + e(w)`` along the current gradients.

        ``grad_scaler``: the ``torch.amp.GradScaler`` whose scale the current
        gradients carry, so that ``e`` is that of the unscaled gradients
        (needed for USAM; SAM's direction does not depend on the scale).
        A non-finite gradient norm skips the perturbation: the weights stay as
        they are and :attr:`perturbation_skipped` is set.

        All or nothing: every check runs before any weight is written, and a
        failure while writing puts back what was already perturbed.

        With ``interval`` > 1, on a step that is not a SAM step (:attr:`ascent_due` is
        False) nothing moves: :meth:`second_step` then takes a plain base step with the
        gradients present then. (Skip the second pass on such steps: call :meth:`step`
        after the first backward, or check :attr:`ascent_due`.)
        """
        if not self.ascent_due:
            if self._step_state.perturbed is not None or self._counter["plain"]:
                raise RuntimeError("first_step() called twice without second_step()")
            self._refuse_local_grads("a plain step of SAM(interval=k) would apply gradients")
            self._counter["plain"] = True
            if zero_grad:
                self.zero_grad()
            return
        if distributed._local_grads:
            self._read_local_grads()
        if not self._first_step(grad_scaler):
            raise RuntimeError(
                "first_step(): no parameter has a gradient; run backward() before first_step()"
            )
        if zero_grad:
            self.zero_grad()

    def _read_local_grads(self) -> None:
        """A local_ascent() pass is what SAM's ascent may read (each rank climbs along its own
        gradient); subclasses whose update reads the first gradient refuse it."""
        distributed.forget_local_grads()

    def _refuse_local_grads(self, what: str) -> None:
        if distributed._local_grads and distributed.local_grads_among(
                p for g in self.param_groups for p in g["params"]):
            distributed.refuse_local_grads(what)

    def _first_step(self, grad_scaler: Any, sumsq_hint: Tensor | None = None) -> bool:
        """:meth:`first_step`'s work; False (nothing touched) when no parameter has a gradient.

        ``sumsq_hint``: the global sum of squares of the current gradients, when the caller
        computed it already (fused into the op that wrote them; plain SAM norm only)."""
        state = self._step_state
        if state.perturbed is not None:
            raise RuntimeError(
                "first_step() called twice without second_step(): the parameters are already "
                "perturbed; call second_step() (or restore()) first"
            )
        grad_scale = _scale_of(grad_scaler, self)
        current = self._current_plan()
        for group in self.param_groups:  # options may change between steps (schedules)
            check_group_options(group)
        if current.fast and sumsq_hint is None:
            status = self._fast_first_step(current, grad_scale)
            if status == plan.LAYOUT_CHANGED:
                current = self._replan()
                if current.fast:
                    status = self._fast_first_step(current, grad_scale)
            if status == plan.OK:
                return True
        grads = [b.grads() for b in current.buckets]
        if all(map(plan.complete, grads)):
            sumsq = sumsq_hint if sumsq_hint is not None else plan.total_sumsq(
                current, grads, _dtensor_grads(current, grads))
            masks: list[list[int] | None] = [None] * len(grads)
        else:
            found = [[i for i, g in enumerate(gs) if g is not None] for gs in grads]
            if not any(found):
                return False
            for b, gs in zip(current.buckets, grads):
                plan.check_grads(gs, b.params)
            masks = [None if len(f) == len(gs) else f for f, gs in zip(found, grads)]
            grads = [gs if m is None else [gs[i] for i in m] for gs, m in zip(grads, masks)]
            sumsq = sumsq_hint if sumsq_hint is not None else self._partial_sumsq(
                current, grads, masks)
        state.sumsq, state.norm = sumsq, None
        done: list[int] = []
        try:
            for bi, (b, gs, m) in enumerate(zip(current.buckets, grads, masks)):
                if not gs:
                    continue
                group = self.param_groups[b.group_index]
                tensors = b.tensors if m is None else [b.tensors[i] for i in m]
                backups = b.backups if m is None else [b.backups[i] for i in m]
                b.impls["perturb_"](
                    tensors, gs, backups, _on(sumsq, b.device),
                    rho=self._rho_factor * float(group["rho"]),
                    eps=float(group["perturb_eps"]), normalize=bool(group["normalize"]),
                    eta=self._adaptive_eta(group),
                    grad_scale=None if grad_scale is None else _on(grad_scale, b.device))
                done.append(bi)
        except BaseException:
            for bi in done:  # all or nothing: put back what was perturbed
                m = masks[bi]
                b = current.buckets[bi]
                b.impls["restore_"](b.tensors if m is None else [b.tensors[i] for i in m],
                                    b.backups if m is None else [b.backups[i] for i in m])
            raise
        state.perturbed = masks
        return True

    def _fast_first_step(self, current: plan.Plan, grad_scale: Tensor | None) -> int:
        """first_step on a fast plan's handles: OK, or (nothing touched) LAYOUT_CHANGED or
        INCOMPLETE (a gradient missing or sparse: the general path)."""
        sumsq = plan.fast_total_sumsq(current)
        if type(sumsq) is int:
            return sumsq
        state = self._step_state
        state.sumsq, state.norm = sumsq, None
        groups = self.param_groups
        fast = plan.fast
        done: list[plan.Bucket] = []
        try:
            for b in current.buckets:
                group = groups[b.group_index]
                status = fast.perturb(
                    b.fast, _on(sumsq, b.device), self._rho_factor * float(group["rho"]),
                    group["perturb_eps"],
                    group["normalize"], self._adaptive_eta(group),
                    None if grad_scale is None else _on(grad_scale, b.device))
                if status != plan.OK:
                    raise RuntimeError("the parameters or their gradients changed inside "
                                       "first_step()")
                done.append(b)
        except BaseException:
            for b in done:  # all or nothing: put back what was perturbed
                fast.restore(b.fast, False)
            raise
        state.perturbed = [None] * len(current.buckets)
        return plan.OK

    def _partial_sumsq(self, current: plan.Plan, grads: list[list[Tensor]],
                       masks: list[list[int] | None]) -> Tensor:
        """The global sum of squares when some gradients are missing (the validating ops)."""
        parts: dict[float | None, tuple[list[Tensor], list[Tensor]]] = {}
        for b, gs, m in zip(current.buckets, grads, masks):
            if not gs:  # no gradient in this bucket this step (frozen, unused branch)
                continue
            eta = self._adaptive_eta(self.param_groups[b.group_index])
            ws, acc = parts.setdefault(eta, ([], []))
            ws.extend(b.params if m is None else [b.params[i] for i in m])
            acc.extend(p.grad for p in (b.params if m is None else [b.params[i] for i in m]))
        sums = [ops.grad_sumsq(gs, ws if eta is not None else None, eta or 0.0,
                               backend=self.backend) for eta, (ws, gs) in parts.items()]
        if len(sums) == 1:
            return sums[0]
        acc_dtype = torch.float64 if any(t.dtype == torch.float64 for t in sums) else torch.float32
        return torch.stack([t.to(current.home, acc_dtype) for t in sums]).sum()

    @_eager
    def restore(self) -> None:
        """Put back the weights saved by :meth:`first_step` without stepping.

        For a second forward/backward that failed in user code; :meth:`step`
        calls it for you when its closure raises.
        """
        state = self._step_state
        if state.perturbed is None:
            return
        current = state.plan
        assert current is not None
        for b, m in zip(current.buckets, state.perturbed):
            b.impls["restore_"](b.tensors if m is None else [b.tensors[i] for i in m],
                                b.backups if m is None else [b.backups[i] for i in m])
        state.perturbed = None

    @_eager
    def second_step(self, zero_grad: bool = False) -> None:
        """Go back to ``w`` bit for bit, then take the base optimizer's step with the
        gradients at ``w + e(w)``.

        A parameter with a gradient only now (an unused branch in the first pass,
        a routed expert) is stepped, with ``e = 0``, as ``torch.optim`` steps it; one
        with no gradient now is restored and not stepped.

        After a :meth:`first_step` that did not perturb (``interval`` > 1, not a SAM step):
        the plain base step with the current gradients.
        """
        state = self._step_state
        if distributed._local_grads and state.perturbed is not None:
            self._refuse_local_second_pass()
        if self._counter["plain"]:
            self._counter["plain"] = False
            self._plain_step()
            if zero_grad:
                self.zero_grad()
            return
        if state.perturbed is None:
            raise RuntimeError(
                "second_step() called without first_step(): there is no saved point to "
                "return to"
            )
        # Set by GradScaler.step() on optimizers with _step_supports_amp_scaling.
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        current = state.plan
        assert current is not None
        base = self.base_optimizer
        kinds = [base_step.fused_kind(base, g, self.group_keys) for g in self.param_groups]
        fallback: dict[int, dict] = {}
        for b, m in zip(current.buckets, state.perturbed):
            group = self.param_groups[b.group_index]
            kind = kinds[b.group_index]
            if kind is None:
                b.impls["restore_"](b.tensors if m is None else [b.tensors[i] for i in m],
                                    b.backups if m is None else [b.backups[i] for i in m])
                b.cache.clear()  # the base optimizer's own step may create state
                fallback[id(group)] = group
                continue
            if m is None and b.fast is not None and base_step.FAST_STEPS[kind](
                    base, group, b, grad_scale, found_inf) == plan.OK:
                continue
            grads = b.grads()
            step = base_step.RESTORE_STEPS[kind]
            if m is None and plan.complete(grads):
                step(base, group, b, grads, None, grad_scale=grad_scale, found_inf=found_inf,
                     backend=self.backend)
                continue
            plan.check_grads(grads, b.params)
            perturbed = set(range(len(grads))) if m is None else set(m)
            stepping = [i for i, g in enumerate(grads) if g is not None]
            idle = [i for i in sorted(perturbed) if grads[i] is None]
            late = [i for i in stepping if i not in perturbed]
            if idle:
                b.impls["restore_"]([b.tensors[i] for i in idle], [b.backups[i] for i in idle])
            if late:  # never perturbed: they sit at w, which the fused step reads from the backup
                torch._foreach_copy_([b.backups[i] for i in late], [b.tensors[i] for i in late])
            if stepping:
                step(base, group, b, [grads[i] for i in stepping], stepping,
                     grad_scale=grad_scale, found_inf=found_inf, backend=self.backend)
        state.perturbed = None
        if fallback:
            self._base_step_fallback(list(fallback.values()), grad_scale, found_inf)
        self._counter["steps"] += 1
        self._mark_stepped()
        if zero_grad:
            self.zero_grad()

    def _refuse_local_second_pass(self) -> None:
        """The second pass ran under local_ascent(): back to ``w``, then the error."""
        if distributed.local_grads_among(p for g in self.param_groups for p in g["params"]):
            self.restore()
            distributed.refuse_local_grads(
                "second_step() (the weights are back at w, unstepped): the step would apply "
                "gradients")

    def _plain_step(self) -> None:
        """A step without the ascent (``interval`` > 1): the base optimizer's step on the
        current gradients (unscaled, or skipped, as GradScaler asks), one pass.

        It runs through SAM's own two phases with ``rho`` times 0: the point is saved and not
        moved (``e = 0``), and the restore + base step from it is the base step itself, on
        the fused ops and the fast path where a SAM step is (the result agrees with the
        base's own ``step()`` to fp32 rounding, as a SAM step's does); other bases get their
        own ``step()`` there as in any SAM step. SAM's phases are called as SAM's, so that a
        subclass's additions to a SAM step (a kept gradient, a rewrite) stay out of it."""
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        if not any(p.grad is not None for g in self.param_groups for p in g["params"]):
            raise RuntimeError("step(): no parameter has a gradient; run backward() first")
        self._refuse_local_grads("a plain step of SAM(interval=k) would apply gradients")
        self._plain_grads(grad_scale, found_inf)
        self._rho_factor = 0.0
        try:
            SAM._first_step(self, None)
        finally:
            del self._rho_factor  # back to the class's factor
        SAM.second_step(self)  # counts the step and marks it taken

    def _plain_grads(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        """What a plain step does to the gradients before the base step (LookSAM: adds
        the kept component); nothing here."""

    def _base_step_fallback(self, groups: list[dict], grad_scale: Tensor | None,
                            found_inf: Tensor | None) -> None:
        """The base optimizer's own ``step()`` for groups no fused op covers."""
        if found_inf is not None and bool(found_inf):
            # The one host read of the AMP fallback path, as in GradScaler's own.
            return
        if grad_scale is not None:
            grads = [p.grad for g in groups for p in g["params"] if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, torch.reciprocal(grad_scale.to(grads[0])))
        self._base_step_on(groups)

    @_eager
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One SAM step with a closure that does a forward/backward pass and returns the loss.

        - gradients present (the usual loop: backward, then ``step(closure)``): perturb
          along them, run ``closure`` at ``w + e``, restore and step; returns its loss;
        - no gradient yet (the ``torch.optim`` closure convention, e.g. Lightning's
          automatic optimization): run ``closure`` for the first pass too; returns the
          first pass's loss;
        - after :meth:`first_step`: finish the step (run ``closure`` at ``w + e`` if
          given, then :meth:`second_step`); without a closure this is what
          ``GradScaler.step`` calls.

        Whenever it ran ``closure``, ``step`` returns with the gradients set to ``None``:
        the ones left would be those at ``w + e``, which the next ``step(closure)`` would
        take for the first pass's.
        """
        if self._step_state.perturbed is not None:
            loss = None
            if closure is not None:
                loss = self._evaluate_perturbed(closure)
            self.second_step(zero_grad=closure is not None)
            return loss
        if self._counter["plain"] or not self.ascent_due:
            # A plain step (interval > 1): one pass, the closure only when no gradient is
            # there yet (so its loss is returned then, and None otherwise).
            self._counter["plain"] = False
            loss = None
            if closure is not None and not any(
                    p.grad is not None for g in self.param_groups for p in g["params"]):
                loss = self._evaluate(closure)
            self._plain_step()
            if closure is not None:
                self.zero_grad()
            return loss
        if closure is None:
            raise RuntimeError(
                "SAM.step() requires a closure that does the second forward/backward pass "
                "(or call first_step() and second_step() yourself)"
            )
        first_loss = None
        if distributed._local_grads:
            self._read_local_grads()
        if not self._first_step(None):
            first_loss = self._evaluate(closure)
            if not self._first_step(None):
                raise RuntimeError("SAM.step(): the closure produced no gradient")
        self.zero_grad()
        loss = self._evaluate_perturbed(closure)
        # The gradients left now are those at w + e: a next step(closure) would take them
        # for a first pass (Lightning's closure zeroes the gradients only inside itself).
        self.second_step(zero_grad=True)
        return loss if first_loss is None else first_loss

    def _evaluate_perturbed(self, closure: Callable[[], Any]) -> Any:
        try:
            return self._evaluate(closure)
        except BaseException:
            self.restore()
            raise

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self._step_state.perturbed is not None or self._counter["plain"]:
            raise RuntimeError(
                "state_dict() between first_step() and second_step(): the parameters hold "
                "the perturbed point w + e; call second_step() or restore() first"
            )
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._step_state.perturbed = None
        self._counter["plain"] = False
        super().load_state_dict(state_dict)

    def _extra_state(self) -> dict[str, Any]:
        return {"steps": self._counter["steps"]}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self._counter["steps"] = int(extra.get("steps", 0))


def _on(t: Tensor, device: torch.device) -> Tensor:
    return t if t.device == device else t.to(device, non_blocking=True)


def _dtensor_grads(current: plan.Plan, grads: list[list[Tensor]]) -> list[Tensor]:
    """DTensors whose shard groups complete the sum (FSDP2: the parameters, with the mesh
    and placements of their gradients); empty when nothing is sharded."""
    return current.params if current.dtensor else []


def _scale_of(grad_scaler: Any, opt: Optimizer) -> Tensor | None:
    """The current scale of a GradScaler as a device tensor (no host sync when possible).

    A scaler that already unscaled this optimizer's gradients in this iteration (its
    ``unscale_(opt)`` before ``first_step``) is refused: it would not unscale the second
    gradients, which are the ones the step uses.
    """
    if grad_scaler is None or not getattr(grad_scaler, "is_enabled", lambda: True)():
        return None
    states = getattr(grad_scaler, "_per_optimizer_states", None)
    if isinstance(states, dict) and id(opt) in states:
        stage = states[id(opt)].get("stage")
        if getattr(stage, "name", None) == "UNSCALED":
            raise RuntimeError(
                "first_step(grad_scaler=...): scaler.unscale_(opt) was called before "
                "first_step(); a scaler unscales an optimizer once per update(), and that "
                "must be the second gradients: call unscale_ after the second backward "
                "(for clipping), or not at all")
    scale = getattr(grad_scaler, "_scale", None)
    if isinstance(scale, Tensor):
        return scale.float()
    return torch.tensor(float(grad_scaler.get_scale()))
