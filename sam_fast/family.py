"""The SAM family on fused ops: LookSAM, GSAM, WSAM and Friendly-SAM (docs/family.md).

Each is :class:`~sam_fast.SAM` (the same wrapper over any base optimizer, plan, fused
restore + base step, GradScaler handling, checkpoints) with a little more done to the
gradients, always by the generic ops of :mod:`sam_fast.family_ops`:

- GSAM and WSAM rewrite the second gradient before the step (one ``dot_sumsq`` and one
  ``combine_`` for GSAM; one ``combine_`` for WSAM, two with its decoupled step);
- LookSAM takes SAM's step every ``k`` steps, keeps the component of the SAM gradient
  orthogonal to the plain one, and adds it, rescaled, to the plain gradient between them
  (one pass there);
- Friendly-SAM replaces the ascent direction by the gradient minus a share of its
  running average (``ema_residual_``, which also gives the direction's norm).

The first gradient that GSAM, WSAM and LookSAM need at the second step is copied into a
per-parameter buffer at :meth:`first_step`. Parameters without a gradient in either
pass are left out of the rewrite (and stepped, or not, as SAM steps them).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from . import distributed, family_ops
from .sam import SAM, _scale_of
from .wrapper import _eager

__all__ = ["LookSAM", "GSAM", "WSAM", "FriendlySAM"]


def _finite_float(value: Any, name: str, lo: float | None = None, hi: float | None = None,
                  *, lo_open: bool = False, hi_open: bool = False) -> float:
    if isinstance(value, (bool, Tensor)) or not isinstance(value, (int, float)) or (
            not math.isfinite(value)):
        raise ValueError(f"Invalid {name}: {value!r} (must be a finite float)")
    value = float(value)
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise ValueError(f"Invalid {name}: {value} (must be {'>' if lo_open else '>='} {lo})")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        raise ValueError(f"Invalid {name}: {value} (must be {'<' if hi_open else '<='} {hi})")
    return value


def _check_rng(seed: Any, generator: Any) -> None:
    """The random-draw options of ESAM and BSAM: an int ``seed`` or a ``torch.Generator``,
    not both."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"Invalid seed: {seed!r} (must be an int)")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {generator!r}")
        if seed is not None:
            raise TypeError("pass seed= or generator=, not both")


def _device_seed(seed: int, device: torch.device, sharded: bool = False) -> int:
    """The seed of ESAM's and BSAM's generator on ``device``: ``seed`` offset per device
    index, so that the devices of one process draw different numbers. ``sharded`` (DTensor
    parameters: each rank holds one device and draws for the whole model, see
    :func:`sam_fast.distributed.shard_of_draw`): the seed of index 0 of the device type, so
    that every rank, whichever ``cuda:r`` it runs on, draws what one process on ``cuda:0``
    (or the CPU) draws."""
    index = 0 if device.index is None else (1 if sharded else device.index + 1)
    return (seed + 7919 * index) % 2**63


def _device_generator(generators: dict[str, torch.Generator], seed: int,
                      device: torch.device, sharded: bool = False) -> torch.Generator:
    """ESAM's and BSAM's generator for ``device``, made on first use (seeded by
    :func:`_device_seed`) and kept in ``generators``."""
    key = str(device)
    gen = generators.get(key)
    if gen is None:
        gen = torch.Generator(device)
        gen.manual_seed(_device_seed(seed, device, sharded))
        generators[key] = gen
    return gen


def _alias(kwargs: dict[str, Any], ours: str, theirs: str, value: Any, default: Any) -> Any:
    """``ours=`` or ``pytorch-optimizer``'s ``theirs=`` (not both)."""
    if theirs in kwargs:
        if value is not default:
            raise TypeError(f"pass {ours}= or {theirs}=, not both")
        return kwargs.pop(theirs)
    return value


class _TwoGradients(SAM):
    """SAM that keeps the first pass's gradient for the second step (``first_grad``)."""

    def _first_step(self, grad_scaler: Any, sumsq_hint: Tensor | None = None) -> bool:
        pairs = [(p, p.grad) for g in self.param_groups for p in g["params"]
                 if p.grad is not None]
        ok = super()._first_step(grad_scaler, sumsq_hint)
        if ok:
            # After the checks of SAM's first step (a sparse gradient was refused there).
            bufs = [self._buffer(p, "first_grad") for p, _ in pairs]
            grads = [g for _, g in pairs]
            if distributed.is_dtensor(grads[0]):  # FSDP2: DTensor has no _foreach_copy_
                bufs, grads = distributed.locals_of(bufs), distributed.locals_of(grads)
            torch._foreach_copy_(bufs, grads)
            self._counter["first"] = [p for p, _ in pairs]
        return ok

    def _pairs(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """(params, second gradients, first gradients) of the parameters with both."""
        firsts = self._counter.get("first") or []
        params = [p for p in firsts if p.grad is not None]
        return params, [p.grad for p in params], [self.state[p]["first_grad"] for p in params]

    def _read_local_grads(self) -> None:
        self._refuse_local_grads(f"{type(self).__name__}'s update reads the first pass's "
                                 "gradients, and these come")
        super()._read_local_grads()

    @_eager
    def second_step(self, zero_grad: bool = False) -> None:
        if distributed._local_grads and self._step_state.perturbed is not None:
            self._refuse_local_second_pass()  # before the rewrite reads the gradients
        if self._step_state.perturbed is not None and not self._counter["plain"]:
            params, second, first = self._pairs()
            if params:
                self._rewrite(params, second, first)
        self._counter["first"] = None
        super().second_step(zero_grad)

    def _rewrite(self, params: list[Tensor], second: list[Tensor], first: list[Tensor]) -> None:
        raise NotImplementedError

    def restore(self) -> None:
        self._counter["first"] = None
        super().restore()


class GSAM(_TwoGradients):
    r"""GSAM (Zhuang et al., ICLR 2022, "Surrogate Gap Guided Sharpness-Aware Minimization").

    SAM's ascent; the update direction is ``g_adv - alpha * g_perp``, ``g_perp`` the part
    of the first gradient ``g`` orthogonal to ``g_adv`` (the gradient at ``w + e``)::

        opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.05, alpha=0.4, lr=0.1)

    ``rho`` follows the learning rate (the paper's Algorithm 1):
    ``rho_t = rho_min + (rho_max - rho_min) * (lr_t - lr_min) / (lr_max - lr_min)`` with
    ``lr_t`` the group's current ``lr`` (so any LR scheduler drives it), ``lr_max`` the
    group's ``lr`` at construction unless given. ``rho`` (or ``rho_max``) alone: constant.
    """

    group_keys = SAM.group_keys | {"alpha", "rho_max", "rho_min", "lr_max", "lr_min"}

    def __init__(self, params: Iterable[Tensor] | Iterable[dict] | None,
                 base_optimizer: type[Optimizer] | Optimizer, rho: float = 0.05,
                 alpha: float = 0.4, *, rho_min: float | None = None,
                 lr_max: float | None = None, lr_min: float = 0.0, **kwargs: Any) -> None:
        if "rho_max" in kwargs:
            if rho != 0.05:
                raise TypeError("pass rho= or rho_max=, not both")
            rho = kwargs.pop("rho_max")
        if "rho_scheduler" in kwargs:
            raise TypeError("GSAM takes rho_min=/lr_max=/lr_min= (rho follows the learning "
                            "rate by itself), not pytorch-optimizer's rho_scheduler")
        self._gsam = dict(alpha=_finite_float(alpha, "alpha", 0.0, 1.0),
                          rho_max=_finite_float(rho, "rho", 0.0),
                          rho_min=_finite_float(rho if rho_min is None else rho_min,
                                                "rho_min", 0.0),
                          lr_min=_finite_float(lr_min, "lr_min", 0.0))
        if self._gsam["rho_min"] > self._gsam["rho_max"]:
            raise ValueError(f"Invalid rho_min: {rho_min} (must be <= rho_max {rho})")
        if lr_max is not None:
            lr_max = _finite_float(lr_max, "lr_max", 0.0)
            if lr_max <= self._gsam["lr_min"] and self._gsam["rho_min"] != rho:
                raise ValueError(f"Invalid lr_max: {lr_max} (must be > lr_min {lr_min})")
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        for group in self.param_groups:
            group.setdefault("alpha", self._gsam["alpha"])
            group.setdefault("rho_max", self._gsam["rho_max"])
            group.setdefault("rho_min", self._gsam["rho_min"])
            group.setdefault("lr_min", self._gsam["lr_min"])
            group.setdefault("lr_max", float(lr_max if lr_max is not None else group["lr"]))
        self._wrapper_defaults.update(alpha=self._gsam["alpha"], rho_max=self._gsam["rho_max"],
                                      rho_min=self._gsam["rho_min"],
                                      lr_min=self._gsam["lr_min"])

    def _fill_group_keys(self) -> None:
        super()._fill_group_keys()
        for group in self.param_groups:
            group.setdefault("lr_max", float(group["lr"]))

    def rho_of(self, group: dict) -> float:
        """The group's ``rho_t`` from its current learning rate."""
        hi, lo = float(group["rho_max"]), float(group["rho_min"])
        if hi == lo:
            return hi
        lr, lr_max, lr_min = float(group["lr"]), float(group["lr_max"]), float(group["lr_min"])
        return lo + (hi - lo) * (lr - lr_min) / (lr_max - lr_min)

    def _first_step(self, grad_scaler: Any, sumsq_hint: Tensor | None = None) -> bool:
        for group in self.param_groups:
            group["rho"] = self.rho_of(group)
        return super()._first_step(grad_scaler, sumsq_hint)

    def _rewrite(self, params: list[Tensor], second: list[Tensor], first: list[Tensor]) -> None:
        # [<g_adv, g>, |g_adv|^2, |g|^2]; c = <g, g_adv> / |g_adv|^2 (0 when g_adv = 0):
        # g_perp = g - c g_adv and g_adv - alpha g_perp = (1 + alpha c) g_adv - alpha g.
        stats = family_ops._dot_sumsq(second, first, self.backend, check=False)
        c = torch.where(stats[1] > 0, stats[0] / stats[1], torch.zeros_like(stats[0]))
        by_alpha: dict[float, list[int]] = {}
        index = {id(p): i for i, p in enumerate(params)}
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in index:
                    by_alpha.setdefault(float(group["alpha"]), []).append(index[id(p)])
        for alpha, idx in by_alpha.items():
            coef = torch.stack([1 + alpha * c, torch.full_like(c, -alpha)])
            family_ops._combine([second[i] for i in idx], [first[i] for i in idx], coef,
                                self.backend, check=False)


class WSAM(_TwoGradients):
    r"""WSAM (Yue et al., KDD 2023, "Sharpness-Aware Minimization Revisited: Weighted
    Sharpness as a Regularization Term").

    The loss ``L(w) + gamma/(1-gamma) * (L(w + e) - L(w))``: its gradient mixes the
    gradients at ``w`` (``g``) and at ``w + e`` (``g_adv``)::

        opt = WSAM(model.parameters(), torch.optim.SGD, rho=0.05, gamma=0.9, lr=0.1)

    ``decouple=True`` (the paper's Algorithm 1 and the authors' default): the base
    optimizer steps with ``g`` and the sharpness term is applied after it as
    ``w <- w - lr * gamma/(1-gamma) * (g_adv - g)``; ``decouple=False``: one base step
    with ``gamma/(1-gamma) g_adv + (1-2 gamma)/(1-gamma) g``. ``gamma = 1/2`` with
    ``decouple=False`` is SAM.
    """

    group_keys = SAM.group_keys | {"gamma"}
    _TRANSIENT = SAM._TRANSIENT | {"_coefs"}  # device constants, remade after a copy

    def __init__(self, params: Iterable[Tensor] | Iterable[dict] | None,
                 base_optimizer: type[Optimizer] | Optimizer, rho: float = 0.05,
                 gamma: float = 0.9, *, decouple: bool = True, **kwargs: Any) -> None:
        if "max_norm" in kwargs:
            raise TypeError("WSAM: clip the gradients yourself (max_norm is not taken)")
        self.decouple = bool(decouple)
        self._gamma = _finite_float(gamma, "gamma", 0.0, 1.0, hi_open=True)
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        for group in self.param_groups:
            group.setdefault("gamma", self._gamma)
        self._wrapper_defaults["gamma"] = self._gamma

    def _by_gamma(self, params: list[Tensor]) -> dict[float, list[int]]:
        index = {id(p): i for i, p in enumerate(params)}
        out: dict[float, list[int]] = {}
        for group in self.param_groups:
            gamma = _finite_float(group["gamma"], "gamma", 0.0, 1.0, hi_open=True)
            for p in group["params"]:
                if id(p) in index:
                    out.setdefault(gamma, []).append(index[id(p)])
        return out

    def _coef(self, a: float, b: float, device: torch.device) -> Tensor:
        """``[a, b]`` on ``device`` in fp64 (the ops round it to each group's math dtype),
        made once per value: no upload per step, which a CUDA graph could not replay."""
        cache = self.__dict__.setdefault("_coefs", {})
        key = (a, b, device)
        coef = cache.get(key)
        if coef is None:
            if len(cache) > 64:  # a schedule moves lr every step: keep the cache small
                cache.clear()
            coef = cache[key] = torch.tensor([a, b], dtype=torch.float64, device=device)
        return coef

    def _rewrite(self, params: list[Tensor], second: list[Tensor], first: list[Tensor]) -> None:
        device = second[0].device
        if not self.decouple:
            for gamma, idx in self._by_gamma(params).items():
                coef = self._coef(gamma / (1 - gamma), (1 - 2 * gamma) / (1 - gamma), device)
                family_ops._combine([second[i] for i in idx], [first[i] for i in idx], coef,
                                    self.backend, check=False)
            return
        # Decoupled: the base step sees g exactly (the first-gradient buffer becomes the
        # gradient), the buffer that held g_adv becomes g_adv - g for the step after it.
        family_ops._combine(second, first, self._coef(1.0, -1.0, device), self.backend,
                            check=False)
        for p, sharp, g in zip(params, second, first):
            p.grad = g
            self.state[p]["first_grad"] = sharp
        self._counter["sharpness"] = params

    @_eager
    def second_step(self, zero_grad: bool = False) -> None:
        self._counter["sharpness"] = None
        super().second_step(False)
        params = self._counter.pop("sharpness", None)
        if params:
            found_inf: Tensor | None = getattr(self, "found_inf", None)
            grad_scale: Tensor | None = getattr(self, "grad_scale", None)
            # GradScaler found inf/NaN: the base step was skipped, so is this (one host read
            # of the flag, as on SAM's fallback path).
            if found_inf is None or not bool(found_inf):
                self._decoupled_step(params, grad_scale)
        if zero_grad:
            self.zero_grad()

    def _decoupled_step(self, params: list[Tensor], grad_scale: Tensor | None) -> None:
        index = {id(p): p for p in params}
        for group in self.param_groups:
            ps = [p for p in group["params"] if id(p) in index]
            if not ps:
                continue
            gamma = float(group["gamma"])
            k = -float(group["lr"]) * gamma / (1 - gamma)
            coef = self._coef(1.0, k, ps[0].device)
            if grad_scale is not None:
                coef = coef * torch.stack([torch.ones_like(grad_scale),
                                           torch.reciprocal(grad_scale)]).to(coef)
            family_ops._combine(ps, [self.state[p]["first_grad"] for p in ps], coef,
                                self.backend, check=False)


class LookSAM(_TwoGradients):
    r"""LookSAM (Liu et al., CVPR 2022, "Towards Efficient and Scalable Sharpness-Aware
    Minimization"), Algorithm 1.

    Every ``k`` steps (steps ``0, k, 2k, ...``) a SAM step, which also keeps
    ``g_v = g_s - (<g_s, g> / |g|^2) g``, the component of the SAM gradient ``g_s``
    orthogonal to the plain gradient ``g``; in between, one pass and the base step with
    ``g + alpha * (|g| / |g_v|) g_v``::

        opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.1, k=5, alpha=0.7, lr=0.1)
        loss_fn(model(x), y).backward()
        opt.step(closure)      # SAM step (closure at w + e) or, between them, one pass

    Norms and the projection are global over all parameters, as in the paper's
    equations (``pytorch-optimizer`` projects each tensor on its own).
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict] | None,
                 base_optimizer: type[Optimizer] | Optimizer, rho: float = 0.1, k: int = 5,
                 alpha: float = 0.7, **kwargs: Any) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"Invalid k: {k!r} (must be an int >= 1)")
        if "interval" in kwargs:
            raise TypeError("LookSAM: the SAM steps' interval is k=")
        self.alpha = _finite_float(alpha, "alpha", 0.0)
        super().__init__(params, base_optimizer, rho=rho, interval=k, **kwargs)

    @property
    def k(self) -> int:
        return self.interval

    def _rewrite(self, params: list[Tensor], second: list[Tensor], first: list[Tensor]) -> None:
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        if found_inf is not None and bool(found_inf):
            return  # a skipped step keeps the old g_v clean (one host read, under AMP only)
        # [<g_s, g>, |g_s|^2, |g|^2]; g_v = g_s - (<g_s, g>/|g|^2) g, written over g.
        stats = family_ops._dot_sumsq(second, first, self.backend, check=False)
        c = torch.where(stats[2] > 0, stats[0] / stats[2], torch.zeros_like(stats[0]))
        coef = torch.stack([-c, torch.ones_like(c)])
        family_ops._combine(first, second, coef, self.backend, check=False)
        for p, gv in zip(params, first):
            old = self.state[p].get("looksam_gv")
            self.state[p]["looksam_gv"] = gv
            if old is not None:
                self.state[p]["first_grad"] = old  # reused as the next first-gradient buffer
            else:
                self.state[p].pop("first_grad", None)
        # Parameters with a g_v from an earlier SAM step but no gradient now keep theirs.

    def _plain_grads(self, grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
        if found_inf is not None and bool(found_inf):
            return  # skipped: nothing to add (the flag is read by the base step anyway)
        params = [p for g in self.param_groups for p in g["params"]
                  if p.grad is not None and "looksam_gv" in self.state[p]]
        if not params:
            return
        grads = [p.grad for p in params]
        gvs = [self.state[p]["looksam_gv"] for p in params]
        stats = family_ops._dot_sumsq(grads, gvs, self.backend, check=False)
        norm_g, norm_v = stats[1].sqrt(), stats[2].sqrt()
        ratio = torch.where(norm_v > 0, norm_g / norm_v, torch.zeros_like(norm_g))
        coef = torch.stack([torch.ones_like(ratio), self.alpha * ratio])
        family_ops._combine(grads, gvs, coef, self.backend, check=False)

    def _extra_state(self) -> dict[str, Any]:
        extra = super()._extra_state()
        index = self._param_index()
        extra["looksam_gv"] = {index[id(p)]: self.state[p]["looksam_gv"].clone()
                               for g in self.param_groups for p in g["params"]
                               if "looksam_gv" in self.state[p]}
        return extra

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        params = self._params_by_index()
        for p in params:
            self.state[p].pop("looksam_gv", None)
        for i, gv in extra.get("looksam_gv", {}).items():
            p = params[int(i)]
            self.state[p]["looksam_gv"] = gv.to(device=p.device, dtype=p.dtype).clone()


class FriendlySAM(SAM):
    r"""Friendly-SAM (Li et al., CVPR 2024, "Friendly Sharpness-Aware Minimization").

    The ascent direction is the stochastic part of the gradient: the gradient minus
    ``sigma`` times its running average, ``m_t = lmbda m_{t-1} + (1 - lmbda) g_t``,
    ``d_t = g_t - sigma m_t``, ``e = rho d_t / |d_t|``; the rest is SAM::

        opt = FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.05, sigma=1.0,
                          lmbda=0.9, lr=0.1)

    ``variant="paper"`` (default) follows the equations above with ``m_{-1} = 0``;
    ``variant="official"`` follows the authors' code (nblt/F-SAM, also
    ``pytorch-optimizer``): ``d_t = g_t - sigma m_{t-1}`` with the previous average,
    and ``m_0 = g_0``, ``d_0 = g_0`` at a parameter's first step. The direction is
    written into the gradients (``p.grad`` holds ``d_t`` after :meth:`first_step`).
    """

    group_keys = SAM.group_keys | {"sigma", "lmbda"}

    def __init__(self, params: Iterable[Tensor] | Iterable[dict] | None,
                 base_optimizer: type[Optimizer] | Optimizer, rho: float = 0.05,
                 sigma: float = 1.0, lmbda: float = 0.9, *, variant: str = "paper",
                 **kwargs: Any) -> None:
        if variant not in ("paper", "official"):
            raise ValueError(f"Invalid variant: {variant!r} (must be 'paper' or 'official')")
        self.variant = variant
        sigma = _finite_float(sigma, "sigma", 0.0)
        lmbda = _finite_float(lmbda, "lmbda", 0.0, 1.0, hi_open=True)
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        for group in self.param_groups:
            group.setdefault("sigma", sigma)
            group.setdefault("lmbda", lmbda)
        self._wrapper_defaults.update(sigma=sigma, lmbda=lmbda)

    def _first_step(self, grad_scaler: Any, sumsq_hint: Tensor | None = None) -> bool:
        if self._step_state.perturbed is not None:
            return super()._first_step(grad_scaler)
        grad_scale = _scale_of(grad_scaler, self)
        for group in self.param_groups:
            _finite_float(group["sigma"], "sigma", 0.0)
            _finite_float(group["lmbda"], "lmbda", 0.0, 1.0, hi_open=True)
        calls: list[tuple[list[Tensor], list[Tensor], float, float, bool]] = []
        for group in self.param_groups:
            ps = [p for p in group["params"] if p.grad is not None]
            if not ps:
                continue
            for p in ps:
                if p.grad.is_sparse:
                    raise RuntimeError("FriendlySAM: sparse gradients are not supported")
            fresh = [p for p in ps if "fsam_momentum" not in self.state[p]]
            seen = [p for p in ps if "fsam_momentum" in self.state[p]]
            sigma, lmbda = float(group["sigma"]), float(group["lmbda"])
            official = self.variant == "official"
            if seen:
                calls.append((seen, [p.grad for p in seen], lmbda, sigma, not official))
            if fresh:
                for p in fresh:
                    self.state[p]["fsam_momentum"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format)
                # official: m_0 = g_0, d_0 = g_0 (decay 0, sigma 0); paper: m_{-1} = 0.
                calls.append((fresh, [p.grad for p in fresh], 0.0 if official else lmbda,
                              0.0 if official else sigma, True))
        if not calls:
            return False
        skip = None
        if grad_scale is not None:
            # Under GradScaler an inf/NaN gradient is expected now and then: it must not
            # enter the running average (skip is a device flag; no host read).
            from .ops import grad_sumsq

            total = grad_sumsq([g for _, gs, *_ in calls for g in gs], backend=self.backend)
            skip = (~torch.isfinite(total)).float()
        sums = []
        for ps, gs, decay, sigma, updated in calls:
            sums.append(family_ops._ema_residual(
                [self.state[p]["fsam_momentum"] for p in ps], gs, decay, sigma, updated,
                grad_scale, skip, self.backend, check=False))
        hint = None
        if not any(g["adaptive"] for g in self.param_groups) and len({s.device for s in sums}) == 1:
            hint = torch.stack(sums).sum() if len(sums) > 1 else sums[0]
        # The directions are unscaled now: the perturbation takes them as they are.
        return super()._first_step(None, hint)

    def _extra_state(self) -> dict[str, Any]:
        extra = super()._extra_state()
        index = self._param_index()
        extra["fsam_momentum"] = {index[id(p)]: self.state[p]["fsam_momentum"].clone()
                                  for g in self.param_groups for p in g["params"]
                                  if "fsam_momentum" in self.state[p]}
        return extra

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        params = self._params_by_index()
        for p in params:
            self.state[p].pop("fsam_momentum", None)
        for i, m in extra.get("fsam_momentum", {}).items():
            p = params[int(i)]
            self.state[p]["fsam_momentum"] = m.to(device=p.device, dtype=p.dtype).clone()
