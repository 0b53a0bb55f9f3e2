"""SAMPa-λ (Xie, Pethick, Cevher, NeurIPS 2024): SAM whose two gradients are independent.

Sequential, single-process form with the batch pairing of docs/design.md section 2.
The two gradient evaluations of a step live in separate methods
(:meth:`SAMPa._gradient_at_x_tilde`, :meth:`SAMPa._gradient_at_y`) so the
distributed form can run them on different devices.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from . import base_step, ops, plan
from .distributed import local
from .distributed import TwoSidedExchange
from .wrapper import SharpnessOptimizer, _eager, check_group_options, split_eps

Closure = Callable[[], Any]

VARIANTS = ("paper", "code")
"""``"paper"``: Algorithm 1 of the paper (call 0 only evaluates ``grad f(x_0)``).
``"code"``: the authors' script (LIONS-EPFL/SAMPa ``train.py``): call 0 takes a plain
base step with ``grad f_{B_0}(x_0)``, and while no momentum buffer exists ``y`` leaves
out weight decay (see docs/design.md section 2)."""


class SAMPa(SharpnessOptimizer):
    r"""SAMPa-λ around a base optimizer (``torch.optim.SGD`` by default).

    ``step(closure)``: the closure computes the loss and its gradients at the
    parameters' current values on the current batch (it may call
    ``opt.zero_grad()`` itself; the optimizer zeroes before each evaluation
    anyway). Call ``k`` with closure ``c_k``:

    - call 0: ``g_y <- grad f_{B_0}(x_0)``; no update;
    - call k >= 1: ``x~ = x + rho g_y / (||g_y|| + eps)``, ``y_new`` = the point
      the base step would move ``x`` to with gradient ``g_y``;
      ``g~ <- grad f_{B_{k-1}}(x~)`` with the kept ``c_{k-1}``,
      ``g_y <- grad f_{B_k}(y_new)`` with ``c_k``, and the base step on ``x``
      with ``(1 - lam) g~ + lam g_y``.

    ``step`` returns the loss of ``c_k`` at ``y_k`` (at ``x_0`` on call 0).
    Between calls the parameters hold ``x`` and their ``.grad`` is ``None``
    (``g_y`` is kept in the optimizer's state).

    A parameter that gets no gradient in one of a step's evaluations counts as
    having a zero gradient there.

    After :meth:`load_state_dict` the closure of the batch before the
    checkpoint is not known: pass it once as ``step(closure,
    previous_closure=...)`` to continue exactly (or pass the current closure
    to accept a different batch for that one step).
    """

    group_keys = frozenset({"rho", "perturb_eps", "lam"})

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict] | None,
        base_optimizer: type[Optimizer] | Optimizer = torch.optim.SGD,
        rho: float = 0.1,
        lam: float = 0.2,
        *,
        parallel: bool | Any = False,
        variant: str = "paper",
        backend: str = "auto",
        **kwargs: Any,
    ) -> None:
        perturb_eps = split_eps(base_optimizer, kwargs, default=1e-12)
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"Invalid lam, should be in [0, 1]: {lam}")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.variant = variant
        super().__init__(params, base_optimizer, dict(rho=rho, lam=lam, perturb_eps=perturb_eps),
                         kwargs, backend)
        self._exchange: TwoSidedExchange | None = None
        if parallel is not False and parallel is not None:
            self._exchange = TwoSidedExchange(None if parallel is True else parallel)
        self._pending_closure: Closure | None = None
        self._moved: list[list[Tensor]] = []  # groups whose params left x in this step
        self.updates = 0
        """Number of updates of ``x`` so far (calls minus one)."""

    # A kept closure evaluates the *original* model: a copy (deepcopy, pickle) must be
    # given the closure of the batch before, as after loading a checkpoint.
    _TRANSIENT = SharpnessOptimizer._TRANSIENT | {"_pending_closure", "_moved"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._pending_closure = None
        self._moved = []

    # -- state between calls -----------------------------------------------------------------

    def _grads_y(self) -> list[list[Tensor]]:
        """Per group, the params that have a kept g_y."""
        self._spill_grads_y()
        return [[p for p in g["params"] if "grad_y" in self.state[p]] for g in self.param_groups]

    def _has_grad_y(self) -> bool:
        return self._step_state.grads_y is not None or any(self._grads_y())

    # g_y lives per bucket of the plan while the fast path runs (no per-parameter dict
    # traffic per step), and per parameter in self.state otherwise (the general path,
    # checkpoints, copies, a new plan).

    def _spill_grads_y(self) -> None:
        st = self._step_state
        if st.grads_y is None:
            return
        assert st.plan is not None
        if st.grads_y is _IN_HANDLES:
            fast = plan.fast
            for b in st.plan.buckets:
                for p, g in zip(b.params, fast.bucket_get(b.fast, fast.GRADS_Y)):
                    self.state[p]["grad_y"] = g
                fast.bucket_set(b.fast, fast.GRADS_Y, None)
        else:
            for b, grads in zip(st.plan.buckets, st.grads_y):
                for p, g in zip(b.params, grads):
                    self.state[p]["grad_y"] = g
        st.grads_y = None

    def _leave_plan(self, old: Any) -> None:
        self._spill_grads_y()

    def __getstate__(self) -> dict[str, Any]:
        self._spill_grads_y()
        return super().__getstate__()

    def _fast_grads_y(self, current: Any) -> list[list[Tensor]] | None:
        """g_y per bucket, when every parameter has one (else None: the general path)."""
        st = self._step_state
        if st.grads_y is None:
            loaded = []
            for b in current.buckets:
                grads = [self.state[p].get("grad_y") for p in b.params]
                if any(g is None for g in grads):
                    return None
                loaded.append(grads)
            for b in current.buckets:
                for p in b.params:
                    del self.state[p]["grad_y"]
            st.grads_y = loaded
            if current.fast:
                for b, grads in zip(current.buckets, loaded):
                    plan.fast.bucket_set(b.fast, plan.fast.GRADS_Y, grads)
                st.grads_y = _IN_HANDLES
        return st.grads_y

    def _evaluate_at_current(self, closure: Closure) -> tuple[Any, dict[Tensor, Tensor]]:
        """Zero the gradients, run ``closure``, and take the gradients it produced."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None
        loss = self._evaluate(closure)
        grads = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    ops.check_tensor(p.grad, "gradient")
                    grads[p] = p.grad
                    p.grad = None
        return loss, grads

    # -- the step ----------------------------------------------------------------------------

    @_eager
    def step(self, closure: Closure | None = None, previous_closure: Closure | None = None) -> Any:
        """One SAMPa call (see the class docstring); returns the loss of ``closure`` at y.

        In the parallel form every rank calls ``step`` with the closure of its
        share of the current batch; the ranks of the ``x~`` half evaluate the
        previous one, those of the ``y`` half the current one, and all return
        the loss at y (a detached tensor).
        """
        if closure is None:
            raise RuntimeError(
                "SAMPa.step() requires a closure that computes the loss and gradients at the "
                "current parameters on the current batch"
            )
        if previous_closure is not None:
            self._pending_closure = previous_closure
        if not self._has_grad_y():
            return self._first_call(closure)
        if self._exchange is None:
            loss = self._fast_step(closure)
            if loss is not _GENERAL:
                return loss

        active = self._grads_y()
        if self._step_state.plan is not None:
            # The general path reads and creates state in self.state directly: the
            # buckets' lists of it are rebuilt when the fast path next runs.
            for b in self._step_state.plan.buckets:
                b.cache.clear()
        fused = [
            base_step.fused_kind(self.base_optimizer, g, self.group_keys) == "sgd"
            for g in self.param_groups
        ]
        self._moved = []
        if self._exchange is None:
            try:
                pending = self._require_pending()
                ys = self._points(active, fused)
                grads_tilde = self._gradient_at_x_tilde(pending)
                _require_some(grads_tilde, "the previous batch's closure (evaluated at x~)")
                loss, grads_y = self._gradient_at_y(closure, active, ys)
                _require_some(grads_y, "the closure (evaluated at y)")
            except BaseException:
                self._restore_x()
                raise
        else:
            loss, grads_tilde, grads_y = self._two_sided_gradients(active, fused, closure)
        self._update(active, fused, grads_tilde, grads_y)
        self._pending_closure = closure
        self.updates += 1
        self._mark_stepped()
        return loss

    _PLAN_OPS = ("perturb_", "restore_", "sampa_points_", "sampa_update_")

    def _fast_step(self, closure: Closure) -> Any:
        """A call k >= 1 with every group on the fused SGD ops, on the plan's buckets.

        Returns ``_GENERAL`` (nothing touched) when the general path must serve the
        call: a group without a fused op, a parameter without g_y, momentum buffers
        present for some parameters of a bucket and not for others.
        """
        base = self.base_optimizer
        if not all(base_step.fused_kind(base, g, self.group_keys) == "sgd"
                   for g in self.param_groups):
            return _GENERAL
        current = self._current_plan()
        for group in self.param_groups:
            check_group_options(group)
        buffers = [self._momentum_buffers(b) for b in current.buckets]
        if any(bufs is _GENERAL for bufs in buffers):
            return _GENERAL
        grads_y = self._fast_grads_y(current)
        if grads_y is None:
            return _GENERAL
        if current.fast:
            return self._handle_step(current, closure, buffers)
        pending = self._require_pending()
        sumsq = plan.total_sumsq(current, grads_y, _dtensor_grads_of(current, grads_y))
        groups = self.param_groups
        moved = []
        try:
            for b, g_y, bufs in zip(current.buckets, grads_y, buffers):
                group = groups[b.group_index]
                options = self._y_options(group, bufs is None)
                b.impls["sampa_points_"](
                    b.tensors, g_y, bufs, b.backups, self._ys(b), _on(sumsq, b.device),
                    rho=float(group["rho"]), eps=float(group["perturb_eps"]),
                    init_buffers=bufs is None, **options)
                moved.append(b)
            _, grads_tilde = self._evaluate_on(current, pending)
            for b in current.buckets:
                b.impls["restore_"](b.tensors, self._ys(b))
            loss, new_grads_y = self._evaluate_on(current, closure)
            if not any(g is not None for gs in grads_tilde for g in gs):
                raise RuntimeError(
                    "SAMPa.step(): the previous batch's closure (evaluated at x~) produced no "
                    "gradient (did it call backward()?); the parameters are back at x")
            if not any(g is not None for gs in new_grads_y for g in gs):
                raise RuntimeError(
                    "SAMPa.step(): the closure (evaluated at y) produced no gradient (did it "
                    "call backward()?); the parameters are back at x")
        except BaseException:
            for b in moved:
                b.impls["restore_"](b.tensors, b.backups)
            raise
        kept = []
        for b, g_t, g_y, bufs in zip(current.buckets, grads_tilde, new_grads_y, buffers):
            group = groups[b.group_index]
            options = base_step.sgd_options(group)
            g_t, g_y = _zeros_for_missing(g_t, b.tensors), _zeros_for_missing(g_y, b.tensors)
            init = bufs is None and options["momentum"] != 0
            if init:
                bufs = [local(t) for t in base_step.new_momentum_buffers(base, b.params)]
                b.cache["momentum_buffer"] = bufs
            b.impls["sampa_update_"](b.tensors, b.backups, g_t, g_y, bufs, lam=group["lam"],
                                     init_buffers=init, **options)
            kept.append(g_y)
        self._step_state.grads_y = kept
        self._pending_closure = closure
        self.updates += 1
        self._mark_stepped()
        return loss

    def _handle_step(self, current: Any, closure: Closure, buffers: list[Any]) -> Any:
        """:meth:`_fast_step` on a fast plan: the buckets' C++ handles hold g_y, y, the
        backups and the momentum buffers, and read and take the gradients themselves."""
        fast = plan.fast
        buckets = current.buckets
        groups = self.param_groups
        pending = self._require_pending()
        sumsq = plan.fast_total_sumsq(current, fast.GRADS_Y)
        if type(sumsq) is int:  # the parameters changed: a new plan, the general path
            self._replan()
            return _GENERAL
        for b, bufs in zip(buckets, buffers):
            self._load_handle(b, bufs)
        moved = []
        try:
            for b, bufs in zip(buckets, buffers):
                group = groups[b.group_index]
                o = self._y_options(group, bufs is None)
                status = fast.sampa_points(
                    b.fast, _on(sumsq, b.device), group["rho"], group["perturb_eps"], o["lr"],
                    o["momentum"], o["dampening"], o["weight_decay"], o["nesterov"],
                    o["maximize"], bufs is None)
                if status != plan.OK:
                    raise RuntimeError("the parameters changed inside SAMPa.step()")
                moved.append(b)
            for p in current.params:
                p.grad = None
            self._evaluate(pending)
            tilde_found = self._take_grads(current, fast.GRADS_TILDE)
            for b in buckets:
                fast.restore(b.fast, True)
            loss = self._evaluate(closure)
            if not tilde_found:
                for p in current.params:
                    p.grad = None
                raise RuntimeError(
                    "SAMPa.step(): the previous batch's closure (evaluated at x~) produced no "
                    "gradient (did it call backward()?); the parameters are back at x")
            if not self._take_grads(current, fast.GRADS_Y):  # g_y is replaced only when found
                raise RuntimeError(
                    "SAMPa.step(): the closure (evaluated at y) produced no gradient (did it "
                    "call backward()?); the parameters are back at x")
        except BaseException:
            for b in buckets:
                fast.bucket_set(b.fast, fast.GRADS_TILDE, None)
            for b in moved:
                fast.restore(b.fast, False)
            raise
        base = self.base_optimizer
        for b, bufs in zip(buckets, buffers):
            group = groups[b.group_index]
            o = base_step.sgd_options(group)
            init = bufs is None and o["momentum"] != 0
            if init:
                bufs = [local(t) for t in base_step.new_momentum_buffers(base, b.params)]
                b.cache["momentum_buffer"] = bufs
                b.cache["momentum_ready"] = True
                self._load_handle(b, bufs)
            status = fast.sampa_update(b.fast, group["lam"], o["lr"], o["momentum"],
                                       o["dampening"], o["weight_decay"], o["nesterov"],
                                       o["maximize"], init)
            if status != plan.OK:
                raise RuntimeError("the parameters changed inside SAMPa.step()")
        self._step_state.grads_y = _IN_HANDLES
        self._pending_closure = closure
        self.updates += 1
        self._mark_stepped()
        return loss

    def _load_handle(self, b: Any, bufs: list[Tensor] | None) -> None:
        """Give a bucket's handle its y buffers and momentum buffers (once per list)."""
        fast = plan.fast
        ys = self._ys(b)
        if b.cache.get("handle_ys") is not ys:
            fast.bucket_set(b.fast, fast.YS, ys)
            b.cache["handle_ys"] = ys
        if bufs is not None and b.cache.get("handle_bufs") is not bufs:
            fast.bucket_set(b.fast, fast.MOMENTUM_BUFFER, bufs)
            b.cache["handle_bufs"] = bufs

    @staticmethod
    def _take_grads(current: Any, slot: int) -> bool:
        """Move every gradient into a handle slot (a missing one as zeros) and set the
        ``.grad`` to None; whether any gradient was there (when none was, the slots are
        left as they were)."""
        fast = plan.fast
        found = False
        partial = []
        for b in current.buckets:
            status = fast.take_grads(b.fast, slot, True)
            if status == plan.OK:
                found = True
                continue
            if status == plan.LAYOUT_CHANGED:
                raise RuntimeError("the parameters changed inside SAMPa.step()")
            grads = b.grads()
            for p in b.params:
                p.grad = None
            plan.check_grads(grads, b.params)
            found = found or any(g is not None for g in grads)
            partial.append((b, grads))
        if found:
            for b, grads in partial:
                fast.bucket_set(b.fast, slot, _zeros_for_missing(grads, b.tensors))
        return found

    def _momentum_buffers(self, b: Any) -> Any:
        """The bucket's momentum buffers in order: a list, None when none exists yet (or no
        momentum), ``_GENERAL`` when only some exist or their dtype differs."""
        group = self.param_groups[b.group_index]
        if group["momentum"] == 0:
            return None
        if b.cache.get("momentum_ready"):  # every buffer there, checked (the steady state)
            return b.cache["momentum_buffer"]
        bufs = b.cache.get("momentum_buffer")
        if bufs is None:
            bufs = [self.base_optimizer.state[p].get("momentum_buffer") for p in b.params]
            bufs = [None if t is None else local(t) for t in bufs]
            b.cache["momentum_buffer"] = bufs
        present = [t is not None for t in bufs]
        if not any(present):
            return None
        if not all(present) or any(t.dtype != x.dtype or t.device != x.device
                                   for t, x in zip(bufs, b.tensors)):
            return _GENERAL
        b.cache["momentum_ready"] = True
        return bufs

    def _y_options(self, group: dict, no_buffer: bool) -> dict[str, Any]:
        options = base_step.sgd_options(group)
        if self.variant == "code" and (no_buffer or options["momentum"] == 0):
            options["weight_decay"] = 0.0  # the script's y while no buffer exists
        return options

    @staticmethod
    def _ys(b: Any) -> list[Tensor]:
        ys = b.cache.get("y")
        if ys is None:
            ys = b.cache["y"] = [torch.empty_like(t, memory_format=torch.preserve_format)
                                 for t in b.tensors]
        return ys

    def _evaluate_on(self, current: Any, closure: Closure) -> tuple[Any, list[list[Any]]]:
        """Zero the gradients, run ``closure``, and take its gradients per bucket."""
        params = current.params
        for p in params:
            p.grad = None
        loss = self._evaluate(closure)
        grads = [b.grads() for b in current.buckets]
        for p in params:
            p.grad = None
        for b, gs in zip(current.buckets, grads):
            if not plan.complete(gs):
                plan.check_grads(gs, b.params)
        return loss, grads

    def _require_pending(self) -> Closure:
        if self._pending_closure is None:
            raise RuntimeError(
                "SAMPa.step(): this optimizer was loaded from a checkpoint (or copied) and "
                "does not know the closure of the batch before it; pass it once as "
                "step(closure, previous_closure=...) (or previous_closure=closure to use the "
                "current batch for that step)"
            )
        return self._pending_closure

    def _first_call(self, closure: Closure) -> Any:
        """Call 0: g_y <- grad f_{B_0}(x_0); no update."""
        if self._exchange is None:
            loss, grads = self._evaluate_at_current(closure)
        else:
            loss, grads = None, {}
            failure = None
            try:
                if self._exchange.role == "y":
                    loss, grads = self._evaluate_at_current(closure)
            except BaseException as exc:
                failure = exc
            _, grads, loss = self._exchange.exchange(
                self._params_by_index(), grads, loss, failed=failure is not None)
            if failure is not None:
                raise failure
        if not grads:
            raise RuntimeError("SAMPa.step(): the closure produced no gradient")
        if self.variant == "code":
            # The script's call 0: g_y starts at zero, so x~ = y = x_0 and both
            # gradients are grad f_{B_0}(x_0): a plain base step with it.
            active = [[p for p in g["params"] if p in grads] for g in self.param_groups]
            for params in active:
                for p in params:
                    self._buffer(p, "backup").copy_(p)
            fused = [base_step.fused_kind(self.base_optimizer, g, self.group_keys) == "sgd"
                     for g in self.param_groups]
            self._update(active, fused, grads, grads)
            self.updates += 1
            self._mark_stepped()
        else:
            for p, g in grads.items():
                self.state[p]["grad_y"] = g
        self._pending_closure = closure
        return loss

    def _two_sided_gradients(self, active: list[list[Tensor]], fused: list[bool],
                             closure: Closure) -> tuple[Any, dict[Tensor, Tensor],
                                                        dict[Tensor, Tensor]]:
        """This rank's side of the step, then the exchange that gives every rank both
        gradients. A failure on any rank is reported to all of them."""
        assert self._exchange is not None
        mine: dict[Tensor, Tensor] = {}
        loss = None
        failure: BaseException | None = None
        try:
            if self._exchange.role == "x_tilde":
                pending = self._require_pending()
                self._points(active, fused)
                mine = self._gradient_at_x_tilde(pending)
            else:
                ys = self._points(active, fused)
                loss, mine = self._gradient_at_y(closure, active, ys)
        except BaseException as exc:
            failure = exc
        finally:
            self._restore_x()
        grads_tilde, grads_y, loss = self._exchange.exchange(
            self._params_by_index(), mine, loss, failed=failure is not None)
        if failure is not None:
            raise failure
        return loss, grads_tilde, grads_y

    def _norm_of_grad_y(self, active: list[list[Tensor]]) -> Tensor:
        grads = [self.state[p]["grad_y"] for ps in active for p in ps]
        return ops.grad_sumsq(grads, backend=self.backend)

    def _points(self, active: list[list[Tensor]], fused: list[bool]) -> list[list[Tensor]]:
        """backup <- x, params <- x~, and the y points (returned, per group)."""
        sumsq = self._norm_of_grad_y(active)
        ys_by_group = []
        for group, params, is_fused in zip(self.param_groups, active, fused):
            if not params:
                ys_by_group.append([])
                continue
            grads_y = [self.state[p]["grad_y"] for p in params]
            backups = [self._buffer(p, "backup") for p in params]
            ys = [self._buffer(p, "y") for p in params]
            if is_fused:
                self._sgd_points(group, params, grads_y, backups, ys, sumsq)
            else:
                self._simulated_y(params, grads_y, ys)
                ops.perturb_(params, grads_y, backups, sumsq, rho=group["rho"],
                             eps=group["perturb_eps"], backend=self.backend)
            self._moved.append(params)
            ys_by_group.append(ys)
        return ys_by_group

    def _sgd_points(self, group: dict, params: list[Tensor], grads_y: list[Tensor],
                    backups: list[Tensor], ys: list[Tensor], sumsq: Tensor) -> None:
        options = base_step.sgd_options(group)
        for idx, bufs, init in base_step.momentum_parts(self.base_optimizer, params,
                                                        options["momentum"]):
            if self.variant == "code" and (init or options["momentum"] == 0):
                # the script's y while no momentum buffer exists: x - lr * g_y
                options = dict(options, weight_decay=0.0)
            ops.sampa_points_(
                [params[i] for i in idx], [grads_y[i] for i in idx], bufs,
                [backups[i] for i in idx], [ys[i] for i in idx], sumsq, rho=group["rho"],
                eps=group["perturb_eps"], init_buffers=init, backend=self.backend, **options,
            )

    def _simulated_y(self, params: list[Tensor], grads_y: list[Tensor], ys: list[Tensor]) -> None:
        """y = where ``base_optimizer.step()`` would move x with gradient g_y, found by taking
        that step and undoing it, for bases without a fused op.

        The look-ahead leaves no trace: the weights, the per-parameter state and the
        param groups' own entries (some optimizers count steps there) are put back,
        and the step runs without the optimizer's step hooks (an EMA or a step
        counter hooked to it must see the one real update, not the look-ahead).
        """
        base = self.base_optimizer
        saved_state = {p: copy.deepcopy(base.state[p]) for p in params if p in base.state}
        saved_groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"}
                        for g in base.param_groups]
        x = [p.detach().clone() for p in params]
        others = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        hidden = {p: p.grad for p in others}
        try:
            for p in others:
                p.grad = None
            for p, g in zip(params, grads_y):
                p.grad = g
            _step_without_hooks(base)
            torch._foreach_copy_(ys, params)
        finally:
            torch._foreach_copy_(params, x)
            for p in params:
                p.grad = None
                if p in saved_state:
                    base.state[p] = saved_state[p]
                else:
                    base.state.pop(p, None)
            for group, saved in zip(base.param_groups, saved_groups):
                for key in [k for k in group if k != "params" and k not in saved]:
                    del group[key]
                group.update(saved)
            for p, g in hidden.items():
                p.grad = g

    def _gradient_at_x_tilde(self, previous_closure: Closure) -> dict[Tensor, Tensor]:
        """g~ = grad f_{B_{k-1}}(x~), the params holding x~."""
        _, grads = self._evaluate_at_current(previous_closure)
        return grads

    def _gradient_at_y(self, closure: Closure, active: list[list[Tensor]],
                       ys: list[list[Tensor]]) -> tuple[Any, dict[Tensor, Tensor]]:
        """g_y = grad f_{B_k}(y_new): move the params to y, then evaluate."""
        for params, y in zip(active, ys):
            if params:
                ops.restore_(params, y, backend=self.backend)
        return self._evaluate_at_current(closure)

    def _restore_x(self) -> None:
        """Put x back into the params that :meth:`_points` moved (after a failed closure)."""
        for params in self._moved:
            ops.restore_(params, [self.state[p]["backup"] for p in params], backend=self.backend)
        self._moved = []

    def _update(self, active: list[list[Tensor]], fused: list[bool],
                grads_tilde: dict[Tensor, Tensor], grads_y: dict[Tensor, Tensor]) -> None:
        """x <- base step on x with (1 - lam) g~ + lam g_y; keep g_y for the next call."""
        fallback_groups = []
        for group, params, is_fused in zip(self.param_groups, active, fused):
            moved = set(map(id, params))
            # Params that got a gradient only now were not moved to x~ / y: they sit at x.
            late = [p for p in group["params"] if id(p) not in moved and
                    (p in grads_tilde or p in grads_y)]
            for p in late:
                self._buffer(p, "backup").copy_(p)
            params = params + late
            if not params:
                continue
            g_tilde = [_or_zeros(grads_tilde.get(p), p) for p in params]
            g_y = [_or_zeros(grads_y.get(p), p) for p in params]
            backups = [self.state[p]["backup"] for p in params]
            if is_fused:
                self._sgd_update(group, params, backups, g_tilde, g_y)
            else:
                ops.restore_(params, backups, backend=self.backend)
                lam = group["lam"]
                combined = torch._foreach_mul(g_tilde, 1 - lam)
                torch._foreach_add_(combined, g_y, alpha=lam)
                for p, g in zip(params, combined):
                    p.grad = g
                fallback_groups.append(group)
            for p, g in zip(params, g_y):
                self.state[p]["grad_y"] = g
        if fallback_groups:
            self._fallback_base_step(fallback_groups)

    def _sgd_update(self, group: dict, params: list[Tensor], backups: list[Tensor],
                    g_tilde: list[Tensor], g_y: list[Tensor]) -> None:
        options = base_step.sgd_options(group)
        for idx, bufs, init in base_step.momentum_parts(self.base_optimizer, params,
                                                        options["momentum"]):
            part = [params[i] for i in idx]
            if init:
                bufs = base_step.new_momentum_buffers(self.base_optimizer, part)
            ops.sampa_update_(
                part, [backups[i] for i in idx], [g_tilde[i] for i in idx],
                [g_y[i] for i in idx], bufs, lam=group["lam"], init_buffers=init,
                backend=self.backend, **options,
            )

    def _fallback_base_step(self, groups: list[dict]) -> None:
        """The base optimizer's own step on the mixed gradients of ``groups``; those
        gradients were made for this step only, so they are dropped after it."""
        try:
            self._base_step_on(groups)
        finally:
            for g in groups:
                for p in g["params"]:
                    p.grad = None

    # -- checkpoints --------------------------------------------------------------------------

    def _extra_state(self) -> dict[str, Any]:
        self._spill_grads_y()
        index = self._param_index()
        grads_y = {index[id(p)]: self.state[p]["grad_y"].clone()
                   for g in self.param_groups for p in g["params"] if "grad_y" in self.state[p]}
        return {"grad_y": grads_y, "updates": self.updates}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        self._step_state.grads_y = None
        params = self._params_by_index()
        for p in params:
            self.state[p].pop("grad_y", None)
        for i, g in extra.get("grad_y", {}).items():
            p = params[int(i)]
            self.state[p]["grad_y"] = g.to(device=p.device, dtype=p.dtype).clone()
        self.updates = int(extra.get("updates", 0))
        self._pending_closure = None


def _step_without_hooks(opt: Optimizer) -> None:
    """``opt.step()`` without its (and the global) step hooks: torch.optim wraps every
    optimizer class's ``step`` in a hook runner that keeps the original as ``__wrapped__``."""
    step = type(opt).step
    raw = getattr(step, "__wrapped__", None) if getattr(step, "hooked", False) else None
    if raw is None:
        opt.step()
    else:
        raw(opt)


_GENERAL = object()  # "the general path serves this call"
_IN_HANDLES = object()  # StepState.grads_y: g_y is in the fast plan's handles


def _on(t: Tensor, device: torch.device) -> Tensor:
    return t if t.device == device else t.to(device, non_blocking=True)


def _dtensor_grads_of(current: Any, grads: list[list[Tensor]]) -> list[Tensor]:
    """DTensors whose shard groups complete the sum (the parameters: same mesh and
    placements as their gradients); empty when nothing is sharded."""
    return current.params if current.dtensor else []


def _zeros_for_missing(grads: list[Tensor | None], like: list[Tensor]) -> list[Tensor]:
    """A parameter without a gradient in an evaluation counts as a zero gradient there."""
    if plan.complete(grads):
        return grads  # type: ignore[return-value]
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like)]


def _require_some(grads: dict[Tensor, Tensor], what: str) -> None:
    if not grads:
        raise RuntimeError(
            f"SAMPa.step(): {what} produced no gradient (did it call backward()?); the "
            "parameters are back at x")


def _or_zeros(grad: Tensor | None, p: Tensor) -> Tensor:
    return grad if grad is not None else torch.zeros_like(p)
