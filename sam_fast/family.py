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
import re
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


def _added_group(param_group: dict[str, Any], who: str,
                 generators: dict[torch.device, torch.Generator], seed: Any,
                 draws_on_params: bool = True) -> tuple[dict[str, Any], bool]:
    """ESAM's and BSAM's checks of a group given to ``add_param_group``, made before it is
    added: its DTensor parameters' placements (:func:`distributed.check_drawable`) and,
    where the draws are made on the parameters' devices, that there is a generator or a
    seed for each. Returns a copy of the group whose ``params`` is a list (as
    ``Optimizer.add_param_group`` makes it: an iterator is consumed once, here) and
    whether any parameter is a DTensor."""
    params = param_group["params"]
    param_group = dict(param_group,
                       params=[params] if isinstance(params, Tensor) else list(params))
    sharded = distributed.check_drawable(param_group["params"], who)
    missing = sorted({str(p.device) for p in param_group["params"]}
                     - {str(d) for d in generators}) if draws_on_params and seed is None else []
    if missing:
        raise ValueError(f"{who} was given one torch.Generator (on "
                         f"{', '.join(sorted(map(str, generators)))}) and no seed, so it cannot "
                         f"draw on {', '.join(missing)}: pass seed= instead to add parameters "
                         "there")
    return param_group, sharded


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


# ESAM's and BSAM's random numbers come from one torch.Generator per device, seeded from
# the optimizer's seed and the device's *ordinal*: its rank among this optimizer's devices of
# its type, in order of first appearance over the param groups' parameters (the CPU is
# ordinal 0, whatever the parameters). One process's devices draw differently; DDP rank r
# with its model on cuda:r draws what one process on cuda:0 draws; and the states are kept
# in state_dict() under "<type>#<ordinal>" ("cpu#0", "cuda#0", ...), so a checkpoint
# resumes on another rank layout.

_SEED_STEP = 7919  # the seed's offset per ordinal (a prime)


def _device_ordinals(param_groups: Iterable[dict]) -> dict[torch.device, int]:
    """Each device of the parameters of ``param_groups`` -> its ordinal among the devices of
    its type, in order of first appearance (``cuda:3`` alone is ``cuda`` ordinal 0)."""
    out: dict[torch.device, int] = {}
    count: dict[str, int] = {}
    for group in param_groups:
        for p in group["params"]:
            device = p.device
            if device not in out:
                out[device] = count.get(device.type, 0)
                count[device.type] = out[device] + 1
    return out


def _ordinal(device: torch.device, ordinals: dict[torch.device, int]) -> int:
    """``device``'s ordinal: 0 for a device without an index (the CPU), else its place in
    ``ordinals`` (a device the parameters are not on comes after those of its type)."""
    if device.index is None:
        return 0
    if device in ordinals:
        return ordinals[device]
    return sum(1 for d in ordinals if d.type == device.type)


def _device_seed(seed: int, device: torch.device, ordinal: int = 0) -> int:
    """The seed of ESAM's and BSAM's generator on ``device``, the ``ordinal``-th device of
    its type among the optimizer's: ``seed`` for the CPU (offset 0), ``seed + 7919 (ordinal
    + 1)`` for an indexed device. The first CUDA device of an optimizer gets what ``cuda:0``
    always got, whichever ``cuda:r`` it is."""
    offset = 0 if device.index is None else _SEED_STEP * (ordinal + 1)
    return (seed + offset) % 2**63


def _rng_key(device: torch.device, ordinal: int) -> str:
    """The key of a generator's state in ``state_dict()``: ``"cuda#0"``, ``"cpu#0"``."""
    return f"{device.type}#{ordinal}"


def _device_generator(generators: dict[torch.device, torch.Generator], seed: int | None,
                      device: torch.device, param_groups: Iterable[dict]) -> torch.Generator:
    """ESAM's and BSAM's generator for ``device``, made on first use (seeded by
    :func:`_device_seed` with the device's ordinal among the parameters of
    ``param_groups``) and kept in ``generators``."""
    gen = generators.get(device)
    if gen is None:
        if seed is None:
            raise RuntimeError(
                f"no random generator for {device}: this optimizer was given generator= on "
                f"{', '.join(sorted(map(str, generators))) or 'no device'} and no seed")
        gen = torch.Generator(device)
        gen.manual_seed(_device_seed(seed, device, _ordinal(device,
                                                            _device_ordinals(param_groups))))
        generators[device] = gen
    return gen


def _rng_state(generators: dict[torch.device, torch.Generator],
               param_groups: Iterable[dict]) -> dict[str, Tensor]:
    """The generators' states keyed by ordinal (:func:`_rng_key`). A generator of a device
    the parameters have left (moved since) is not saved: nothing draws from it any more."""
    ordinals = _device_ordinals(param_groups)
    return {_rng_key(d, _ordinal(d, ordinals)): g.get_state()
            for d, g in generators.items() if d.index is None or d in ordinals}


_NEW_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)#([0-9]+)$")


def _rng_devices(keys: Iterable[Any], ordinals: dict[torch.device, int],
                 who: str) -> dict[Any, torch.device]:
    """Each generator key of a checkpoint -> the device of this optimizer (``ordinals``, from
    :func:`_device_ordinals`) whose generator takes its state; ``ValueError`` for a bad key,
    one naming a device this optimizer does not have, or two naming the same one.

    Keys are ``"<type>#<ordinal>"`` (:func:`_rng_key`; ``"cpu#0"`` is the CPU whatever the
    parameters), or ``str(device)`` as checkpoints before the ordinals have them (``"cpu"``,
    ``"cuda:3"``). The old keys of a device type go to the devices they name when this
    optimizer has all of them (the layout they were saved on: the resume is the one it
    was); otherwise they take, in increasing index, the ordinals 0, 1, ... (DDP rank 3's
    lone ``"cuda:3"`` becomes ``"cuda#0"``, its rank's device on any layout)."""
    by_type: dict[str, list[torch.device]] = {}
    for device in sorted(ordinals, key=ordinals.__getitem__):
        by_type.setdefault(device.type, []).append(device)
    wanted: dict[Any, tuple[str, int]] = {}  # key -> (device type, ordinal)
    old: dict[Any, torch.device] = {}  # old indexed keys -> the device they name
    keys = list(keys)
    for key in keys:
        match = _NEW_KEY.match(key) if isinstance(key, str) else None
        if match is not None:
            wanted[key] = (match.group(1), int(match.group(2)))
            continue
        try:
            device = torch.device(key) if isinstance(key, str) else None
        except (RuntimeError, ValueError):
            device = None
        if device is None:
            raise ValueError(
                f"{who}.load_state_dict: bad generator key {key!r} (expected '<type>#<n>', "
                "e.g. 'cuda#0', or a device as older checkpoints have it, e.g. 'cuda:0')")
        if device.index is None:
            wanted[key] = (device.type, 0)
        else:
            old[key] = device
    for dtype in {d.type for d in old.values()}:
        named = {k: d for k, d in old.items() if d.type == dtype}
        if all(d in ordinals for d in named.values()):
            wanted.update({k: (dtype, ordinals[d]) for k, d in named.items()})
        else:
            rank = {i: n for n, i in enumerate(sorted({d.index for d in named.values()}))}
            wanted.update({k: (dtype, rank[d.index]) for k, d in named.items()})
    out: dict[Any, torch.device] = {}
    for key in keys:  # in the checkpoint's order
        dtype, ordinal = wanted[key]
        devices = by_type.get(dtype, [])
        if dtype == "cpu" and ordinal == 0:
            device = torch.device("cpu")
        elif ordinal < len(devices):
            device = devices[ordinal]
        else:
            have = ", ".join(f"{d} ({_rng_key(d, ordinals[d])})" for d in by_type.get(dtype, []))
            raise ValueError(
                f"{who}.load_state_dict: the checkpoint has a generator state for {key!r} "
                f"({dtype} device number {ordinal} of the optimizer that saved it), which "
                f"this optimizer does not have (its {dtype} devices: {have or 'none'}): the "
                "checkpoint was saved with more devices of that type per process")
        for other, d in out.items():
            if d == device:
                raise ValueError(f"{who}.load_state_dict: the generator keys {other!r} and "
                                 f"{key!r} both name {device}")
        out[key] = device
    return out


def _parse_rng(states: Any, param_groups: Iterable[dict],
               who: str) -> dict[torch.device, Tensor]:
    """The generator states of a checkpoint (``{key: state}``, keys as :func:`_rng_devices`
    reads them) as ``{device: state}`` for this optimizer's devices, all checked before
    anything is loaded (``ValueError``): the keys, and each state against a scratch
    generator on its device."""
    if not isinstance(states, dict):
        raise ValueError(f"{who}.load_state_dict: the generator states must be a dict "
                         f"{{device key: state}}, got {type(states).__name__}")
    devices = _rng_devices(states, _device_ordinals(param_groups), who)
    out: dict[torch.device, Tensor] = {}
    for key, state in states.items():
        device = devices[key]
        if not isinstance(state, Tensor) or state.dtype != torch.uint8 or (
                state.device.type != "cpu"):
            raise ValueError(f"{who}.load_state_dict: the generator state for {key!r} must be "
                             "a CPU uint8 tensor (torch.Generator.get_state()), got "
                             f"{type(state).__name__}")
        try:
            torch.Generator(device).set_state(state)  # a scratch one: nothing touched yet
        except RuntimeError as exc:
            raise ValueError(f"{who}.load_state_dict: the generator state for {key!r} is not "
                             f"one of a generator on {device}: {exc}") from None
        out[device] = state
    return out


def _load_rng(generators: dict[torch.device, torch.Generator],
              states: dict[torch.device, Tensor], seeded: bool) -> None:
    """Set the generators to the states :func:`_parse_rng` checked. With a seed, a generator
    the checkpoint has no state for is dropped, to be made from the seed on first use as the
    saved optimizer would (a ``generator=`` of one without a seed is kept)."""
    if seeded:
        for device in [d for d in generators if d not in states]:
            del generators[device]
    for device, state in states.items():
        gen = generators.get(device)
        if gen is None:
            gen = generators[device] = torch.Generator(device)
        gen.set_state(state)


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
