"""What SAM and SAMPa share: wrapping a base optimizer, the perturbation scale,
backup buffers and checkpoints.

Like ``davda54/sam``, the wrapper and its base optimizer share one list of
param-group dicts: the wrapper's own keys (``rho``, ...) sit beside the base
optimizer's (``lr``, ...), so an LR scheduler attached to either one drives
the same ``lr``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from . import dispatch, ops

BACKENDS = ("auto", "torch", "triton", "cuda", "cpp")


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
        for key, value in wrapper_defaults.items():
            if key == "rho" and not value >= 0.0:
                raise ValueError(f"Invalid rho, should be non-negative: {value}")
        self.backend = backend

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
        for group in self.param_groups:
            if not group["rho"] >= 0.0:
                raise ValueError(f"Invalid rho, should be non-negative: {group['rho']}")
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

    def _buffer(self, p: Tensor, name: str) -> Tensor:
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
        base_state = {k: v for k, v in state_dict.items() if k != "sam_fast"}
        self.base_optimizer.load_state_dict(base_state)
        # Optimizer.load_state_dict builds new group dicts: share them again.
        self.param_groups = self.base_optimizer.param_groups
        self._load_extra_state(state_dict.get("sam_fast", {}))

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

    @staticmethod
    def _evaluate(closure: Callable[[], Any]) -> Any:
        with torch.enable_grad():
            return closure()
