"""What SAM and SAMPa share: wrapping a base optimizer, the perturbation scale,
backup buffers and checkpoints.

Like ``davda54/sam``, the wrapper and its base optimizer share one list of
param-group dicts: the wrapper's own keys (``rho``, ...) sit beside the base
optimizer's (``lr``, ...), so an LR scheduler attached to either one drives
the same ``lr``.
"""

from __future__ import annotations

import functools
import inspect
import math
import weakref
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from . import dispatch, ops, plan

BACKENDS = ("auto", "torch", "triton", "cuda", "cpp")

# Whether an autograd/kineto profiler is recording (a C-level flag read).
_profiler_enabled = torch._C._autograd._profiler_enabled


def split_eps(base_optimizer: type[Optimizer] | Optimizer, kwargs: dict[str, Any], default: float
              ) -> float:
    """SAM's epsilon, taking ``eps`` out of ``kwargs`` only when the base optimizer has none.

    ``SAM(params, torch.optim.Adam, eps=1e-8)`` must keep meaning Adam's eps,
    as it does in the reference implementation; ``perturb_eps`` always names ours.
    """
    perturb_eps = kwargs.pop("perturb_eps", None)
    if "eps" in kwargs and not isinstance(base_optimizer, Optimizer):
        try:
            base_takes_eps = "eps" in inspect.signature(base_optimizer).parameters
        except (TypeError, ValueError):
            base_takes_eps = True
        if not base_takes_eps:
            if perturb_eps is not None:
                raise TypeError("pass SAM's epsilon once: as perturb_eps= or as eps=, not both")
            perturb_eps = kwargs.pop("eps")
    eps = default if perturb_eps is None else perturb_eps
    if not eps >= 0:
        raise ValueError(f"Invalid perturb_eps: {eps} (must be >= 0)")
    return float(eps)


def _eager(fn: Callable) -> Callable:
    """``fn`` without autograd, run eagerly inside ``torch.compile``'d code (a graph break).

    The optimizer keeps Python state between calls (the perturbation in flight, the
    plan), which dynamo may not replay faithfully; eagerly, a compiled training step
    gives exactly the eager results. The grad mode is switched by hand: the
    ``torch.no_grad()`` decorator costs several microseconds per call.
    """
    set_grad_enabled = torch._C._set_grad_enabled
    is_grad_enabled = torch.is_grad_enabled

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        enabled = is_grad_enabled()
        set_grad_enabled(False)
        try:
            return fn(*args, **kwargs)
        finally:
            set_grad_enabled(enabled)

    return torch.compiler.disable(run, recursive=True)


def _check_rho(rho: Any) -> None:
    if isinstance(rho, Tensor) or not isinstance(rho, (int, float)) or not (
            math.isfinite(rho) and rho >= 0.0):
        raise ValueError(f"Invalid rho: {rho!r} (must be a finite float >= 0)")


def check_group_options(group: dict) -> None:
    """The wrapper's per-group options, checked before a step writes anything."""
    _check_rho(group["rho"])
    eps = group["perturb_eps"]
    if isinstance(eps, Tensor) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"Invalid perturb_eps: {eps!r} (must be a float >= 0)")


def _check_base_step(base: Optimizer) -> None:
    """Refuse a base optimizer whose ``step`` needs a closure (``torch.optim.LBFGS``): SAM
    calls ``step()`` without one, which would fail only after the weights were perturbed."""
    try:
        closure = inspect.signature(base.step).parameters.get("closure")
    except (TypeError, ValueError):
        return
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise TypeError(
            f"{type(base).__name__}.step() requires a closure (it re-evaluates the loss "
            "itself); SAM's base optimizer must step from the gradients alone"
        )


class StepState:
    """What changes from step to step: the plan of the current layout, and the
    perturbation in flight (shared by every copy of the optimizer's ``__dict__``)."""

    __slots__ = ("owner", "plan", "perturbed", "sumsq", "norm", "grads_y")

    def __init__(self, owner: Optimizer) -> None:
        # The optimizer the state was made for: a wrapper holding a copy of its __dict__
        # (LightningOptimizer) runs our methods with itself as ``self``.
        self.owner = weakref.ref(owner)
        self.plan: plan.Plan | None = None
        # Per bucket of the plan: None (every tensor perturbed), or the positions
        # perturbed; the whole list is None when nothing is perturbed.
        self.perturbed: list[list[int] | None] | None = None
        self.sumsq: Tensor | None = None
        self.norm: Tensor | None = None
        # SAMPa's g_y per bucket of the plan, while its fast path holds it.
        self.grads_y: list[list[Tensor]] | None = None


class SharpnessOptimizer(Optimizer):
    """Base of :class:`~sam_fast.SAM` and :class:`~sam_fast.SAMPa`; not for direct use."""

    # Keys this wrapper adds to every param group (subclasses extend).
    group_keys: frozenset[str] = frozenset({"rho", "perturb_eps"})

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        wrapper_defaults: dict[str, Any],
        base_kwargs: dict[str, Any],
        backend: str,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        _check_rho(wrapper_defaults["rho"])
        self.backend = backend
        # Mutable step state lives in one object that every shallow copy of this
        # optimizer's __dict__ shares (LightningOptimizer and other wrappers copy it).
        self._step_state = StepState(self)

        if isinstance(base_optimizer, Optimizer):
            if base_kwargs:
                raise TypeError(
                    f"base_optimizer is already built; its options cannot be set here "
                    f"(got {sorted(base_kwargs)})"
                )
            self._check_same_params(params, base_optimizer)
            super().__init__(base_optimizer.param_groups, wrapper_defaults)
            self.base_optimizer = base_optimizer
            for group in base_optimizer.param_groups:
                for key, value in wrapper_defaults.items():
                    group.setdefault(key, value)
        elif isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer):
            if params is None:
                raise TypeError("params is required when base_optimizer is a class")
            super().__init__(params, dict(wrapper_defaults, **base_kwargs))
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        else:
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer subclass or instance, "
                f"got {base_optimizer!r}"
            )
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self._wrapper_defaults = dict(wrapper_defaults)
        _check_base_step(self.base_optimizer)
        plan.check_no_duplicates(self.param_groups)
        plan.check_no_overlap(self.param_groups)
        for group in self.param_groups:
            _check_rho(group["rho"])
            for p in group["params"]:
                ops.check_tensor(p, "parameter")
                reason = dispatch.why_unavailable(self.backend, p.device.type) if (
                    self.backend != "auto") else None
                if reason is not None:
                    raise RuntimeError(
                        f"backend={self.backend!r} cannot serve parameters on {p.device}: {reason}"
                    )

    @staticmethod
    def _check_same_params(params: Any, base: Optimizer) -> None:
        if params is None:
            return
        listed = list(params)
        if listed and isinstance(listed[0], dict):
            listed = [p for g in listed for p in g["params"]]
        ours = {id(p) for p in listed}
        theirs = {id(p) for g in base.param_groups for p in g["params"]}
        if ours != theirs:
            raise ValueError(
                "params must be the parameters the given base_optimizer was built over "
                f"({len(ours)} given, {len(theirs)} in base_optimizer, "
                f"{len(ours & theirs)} in common); pass params=None to use the base optimizer's"
            )

    # -- buffers ----------------------------------------------------------------------------

    def _buffer(self, p: Tensor, name: str) -> Tensor:  # noqa: D401
        """A scratch tensor like ``p`` kept in ``self.state`` (allocated once, reused)."""
        state = self.state[p]
        buf = state.get(name)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
            buf = torch.empty_like(p, memory_format=torch.preserve_format)
            state[name] = buf
        return buf

    # -- checkpoints --------------------------------------------------------------------------

    def _extra_state(self) -> dict[str, Any]:
        """What the wrapper itself must save beyond the base optimizer's state."""
        return {}

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict (param groups carry the wrapper's keys too),
        plus the wrapper's own state under ``"sam_fast"``."""
        state = self.base_optimizer.state_dict()
        state["sam_fast"] = self._extra_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load our own checkpoints, a plain ``torch.optim`` optimizer's, or one saved by
        ``davda54/sam`` (its ``old_p`` entries are dropped; group keys it lacks take the
        constructor's values)."""
        base_state = {k: v for k, v in state_dict.items() if k != "sam_fast"}
        if "state" in base_state:
            base_state["state"] = {
                k: {n: v for n, v in s.items() if n != "old_p"} if isinstance(s, dict) else s
                for k, s in base_state["state"].items()}
        self.base_optimizer.load_state_dict(base_state)
        # Optimizer.load_state_dict builds new group dicts: share them again.
        self.param_groups = self.base_optimizer.param_groups
        self._fill_group_keys()
        self._step_state.plan = None
        self._load_extra_state(state_dict.get("sam_fast", {}))

    def _fill_group_keys(self) -> None:
        """Give every group the wrapper's keys (groups from another optimizer's checkpoint,
        or added with ``base_optimizer.add_param_group``, lack them)."""
        for group in self.param_groups:
            for key, value in self._wrapper_defaults.items():
                group.setdefault(key, value)

    # -- copies -------------------------------------------------------------------------------

    # Rebuilt after a copy: the plan holds tensors of the original and resolved functions.
    _TRANSIENT = frozenset({"_step_state"})

    def __getstate__(self) -> dict[str, Any]:
        # All of the wrapper's attributes (torch.optim's own __getstate__ keeps only
        # defaults, state and param_groups, which loses ours), less what is rebuilt:
        # the step state, hooks (torch.optim recreates them) and an LR scheduler's
        # per-instance patch of ``step``.
        return {k: v for k, v in self.__dict__.items()
                if k not in self._TRANSIENT and k != "step" and not k.startswith("_optimizer_")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._step_state = StepState(self)

    # -- the plan -------------------------------------------------------------------------------

    # The ops every plan resolves for its buckets.
    _PLAN_OPS: tuple[str, ...] = ("perturb_", "restore_")

    def _adaptive_eta(self, group: dict) -> float | None:
        return None

    def _leave_plan(self, old: plan.Plan) -> None:
        """Called before a new plan replaces ``old``: move anything kept per bucket to
        per-parameter state."""

    def _current_plan(self) -> plan.Plan:
        """The plan of the current layout (built when the layout changed)."""
        current = self._step_state.plan
        groups = self.param_groups
        if groups is not self.base_optimizer.param_groups:
            raise RuntimeError(
                "the optimizer's param_groups are no longer the base optimizer's; assign "
                "groups through opt.param_groups of both, or use add_param_group()")
        if current is not None:
            if current.fast:
                # the handles check each parameter on every call (LAYOUT_CHANGED: _replan)
                if plan.head_key(groups, self.base_optimizer.state) == current.key[:3]:
                    return current
            # the groups' current parameters: an element replaced in place is a new layout
            elif plan.layout_key(groups, self.base_optimizer.state, plan.flat_params(groups),
                                 current.dtensor) == current.key:
                return current
            self._leave_plan(current)
        self._fill_group_keys()
        for group in groups:
            _check_rho(group["rho"])
        params = plan.flat_params(groups)
        key = plan.layout_key(groups, self.base_optimizer.state, params)
        built = plan.build(groups, lambda p: self.state[p], self.backend, self._PLAN_OPS, key,
                           self._adaptive_eta)
        self._step_state.plan = built
        return built

    def _replan(self) -> plan.Plan:
        """A new plan, after a fast handle found the parameters changed (LAYOUT_CHANGED)."""
        current = self._step_state.plan
        if current is not None:
            self._leave_plan(current)
            self._step_state.plan = None
        return self._current_plan()

    def _param_index(self) -> dict[int, int]:
        """id(param) -> its position in the state dict's numbering."""
        order = [p for g in self.param_groups for p in g["params"]]
        return {id(p): i for i, p in enumerate(order)}

    def _params_by_index(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _mark_stepped(self) -> None:
        """Tell LR schedulers attached to us or to the base optimizer that a step happened,
        also when the fused path did not call ``base_optimizer.step()``."""
        self._opt_called = True
        self.base_optimizer._opt_called = True  # type: ignore[attr-defined]
        # Called through a wrapper that holds a shallow copy of our __dict__ (Lightning's
        # LightningOptimizer, in manual optimization), the flag above lands in the copy;
        # a scheduler reads the optimizer it was built with: the step state's owner.
        owner = self._step_state.owner()
        if owner is not None and owner is not self:
            owner._opt_called = True  # type: ignore[attr-defined]

    def _base_step_on(self, groups: list[dict]) -> None:
        """``base_optimizer.step()`` for ``groups`` only: the other groups' gradients are
        hidden from it for the call (their step was a fused op, or is not due)."""
        chosen = {id(g) for g in groups}
        hidden = {}
        for g in self.param_groups:
            if id(g) not in chosen:
                for p in g["params"]:
                    hidden[p] = p.grad
                    p.grad = None
        try:
            self.base_optimizer.step()
        finally:
            for p, grad in hidden.items():
                p.grad = grad

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim.Optimizer.zero_grad``, with the common case made cheap.

        ``set_to_none=True`` outside a profiler is a loop that drops every gradient:
        torch.optim's own wraps it in a ``record_function`` whose enter and exit cost
        more than the loop on a model of a few hundred tensors, twice per SAM step.
        Under a profiler (its label), or with ``set_to_none=False``, torch.optim's runs.
        """
        if not set_to_none or _profiler_enabled():
            super().zero_grad(set_to_none)
            return
        current = self._step_state.plan
        if (current is not None and current.fast and self.param_groups is
                self.base_optimizer.param_groups and plan.head_key(
                    self.param_groups, self.base_optimizer.state) == current.key[:3]):
            # The handles cover every parameter of the groups; each checks its own part.
            clear = plan.fast.clear_grads
            if all([clear(b.fast) == plan.OK for b in current.buckets]):
                return
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    @staticmethod
    def _evaluate(closure: Callable[[], Any]) -> Any:
        with torch.enable_grad():
            return closure()
