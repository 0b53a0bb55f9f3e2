"""BSAM (Moellenhoff & Khan, ICLR 2023, "SAM as an Optimal Relaxation of Bayes"), Algorithm
1: SAM's ascent from a noisy sample of a Gaussian posterior whose precision ``s`` is learnt
with an Adam-like rule. Its own update (no base optimizer), three passes; see
docs/family.md. Every per-step vector operation is one fused op of
:mod:`sam_fast.bsam_ops` per (device, dtype) group, plus one ``normal_`` per device.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from . import bsam_ops, dispatch, distributed, ops
from .family import (_added_group, _check_rng, _device_generator, _finite_float, _load_rng,
                     _parse_rng, _rng_state)
from .wrapper import BACKENDS, _eager

__all__ = ["BSAM"]

_VARIANTS = ("paper", "official")


class _Bucket:
    """One (param group, device, dtype) group: its parameters, their local tensors (the
    shards of DTensor parameters, which the ops run on; the parameters themselves
    otherwise), flat buffers shaped like those (backups and the curvature term
    ``sqrt(s)|g|``), and the fp32 noise views of its parameters."""

    __slots__ = ("group_index", "device", "params", "tensors", "backups", "gs", "noise")

    def __init__(self, group_index: int, params: list[Tensor], noise: list[Tensor]) -> None:
        self.group_index = group_index
        self.device = params[0].device
        self.params = params
        self.tensors = [distributed.local(p) for p in params]
        self.backups = _views(self.tensors, params[0].dtype)
        self.gs = _views(self.tensors, params[0].dtype)
        self.noise = noise


def _views(params: list[Tensor], dtype: torch.dtype, flat: Tensor | None = None
           ) -> list[Tensor]:
    """Views shaped like ``params`` of one flat buffer (``flat``, or a new one)."""
    if flat is None:
        flat = torch.empty(sum(p.numel() for p in params), dtype=dtype,
                           device=params[0].device)
    out, at = [], 0
    for p in params:
        out.append(flat[at:at + p.numel()].view(p.shape))
        at += p.numel()
    return out


class BSAM(Optimizer):
    r"""bSAM, Algorithm 1 of Moellenhoff & Khan (ICLR 2023)::

        eps ~ N(0, 1 / (N s))               first_step():  w <- w + eps (w saved)
        g1 = grad L(w + eps)
        e = rho g1 / s                      second_step(): w <- w + e (from the saved w)
        g = grad L(w + e)
        m <- beta1 m + (1 - beta1)(g + weight_decay w)
        s <- beta2 s + (1 - beta2)(sqrt(s) |g1| + damping + weight_decay)
        w <- w - lr m / s                   third_step()

    Usage (pytorch-optimizer's protocol; the closure need not zero the gradients)::

        opt = BSAM(model.parameters(), num_data=len(train_set), lr=0.5, rho=0.05)

        def closure():
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)   # zero_grad, first_step, closure, second_step, closure, third_step

    or by hand: ``zero_grad()``, :meth:`first_step` (before the first forward pass),
    forward/backward, :meth:`second_step`, forward/backward, :meth:`third_step` (or
    ``scaler.step(opt)``). Between steps the parameters are ``w`` exactly (saved, not moved
    back by arithmetic).

    Args:
        params: parameters or param-group dicts (the options below are per group).
        num_data: ``N``, the number of training examples (the noise's variance is
            ``1 / (N s)``; the authors multiply it by their augmentation factor).
        lr: ``alpha``. pytorch-optimizer's default 0.5 (the authors' CIFAR setting).
        betas: ``(beta1, beta2)``; ``beta1=``/``beta2=`` are accepted too.
        weight_decay: ``delta`` (the authors' prior precision over ``N``).
        rho: the ascent's radius (``e = rho g1 / s``, not normalised).
        damping: ``gamma`` of the precision's update (0.1 in the paper and both codes).
        s_init: the precision's initial value (the authors' ``custominit``, 1).
        variant: ``"paper"`` (Algorithm 1: ``w`` is updated with the new ``s``) or
            ``"official"`` (team-approx-bayes/bayesian-sam: with the previous ``s``).
        seed / generator: the noise's ``torch.Generator`` (seeded with ``seed``; by default
            a seed drawn once from torch's global generator), one per device, seeded by
            the device's ordinal among this optimizer's devices of its type (DDP rank r on
            ``cuda:r`` draws what one process on ``cuda:0`` draws); their states are in
            :meth:`state_dict`, keyed ``"cuda#0"``, ``"cpu#0"``. Per step one fp32 ``normal_`` per device over its
            parameters in state-dict order. Under FSDP2 (DTensor parameters) every rank
            draws for the whole tensors and keeps its shards' part: one process's noise.
        backend: as for :class:`~sam_fast.SAM`.

    State per parameter: ``s`` and ``momentum`` (pytorch-optimizer's names).
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        num_data: int,
        lr: float = 0.5,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 1e-4,
        rho: float = 0.05,
        damping: float = 0.1,
        s_init: float = 1.0,
        *,
        variant: str = "paper",
        seed: int | None = None,
        generator: torch.Generator | None = None,
        backend: str = "auto",
        **kwargs: Any,
    ) -> None:
        if "beta1" in kwargs or "beta2" in kwargs:
            if betas != (0.9, 0.999):
                raise TypeError("pass betas= or beta1=/beta2=, not both")
            betas = (kwargs.pop("beta1", 0.9), kwargs.pop("beta2", 0.999))
        kwargs.pop("foreach", None)  # pytorch-optimizer's: every op here is multi-tensor
        for key in ("adaptive", "base_optimizer"):
            if key in kwargs:
                raise TypeError(f"BSAM does not take {key}= (its own update rule, Algorithm 1)")
        if kwargs:
            raise TypeError(f"BSAM got unexpected options {sorted(kwargs)}")
        if isinstance(num_data, bool) or not isinstance(num_data, (int, float)) or not (
                math.isfinite(num_data) and num_data > 0):
            raise ValueError(f"Invalid num_data: {num_data!r} (must be > 0)")
        if variant not in _VARIANTS:
            raise ValueError(f"Invalid variant: {variant!r} (must be 'paper' or 'official')")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        _check_rng(seed, generator)
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, rho=rho, damping=damping)
        _check_group(defaults)
        self.s_init = _finite_float(s_init, "s_init", 0.0, lo_open=True)
        super().__init__(params, defaults)
        # DTensor parameters (FSDP2): every rank draws the whole model's noise and takes its
        # shards' part (exactly one process's draws); placements checked before anything moves.
        self._sharded = distributed.check_drawable(
            (p for g in self.param_groups for p in g["params"]), "BSAM")
        for group in self.param_groups:
            _check_group(group)
            _check_params(group["params"], backend)
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if generator is not None and {generator.device} != devices:
            raise ValueError(f"generator is on {generator.device}, the parameters on "
                             f"{sorted(map(str, devices))}")
        self.num_data = float(num_data)
        self.variant = variant
        self.backend = backend
        if generator is None and seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self._seed = seed
        # device -> generator, seeded by the device's ordinal among the optimizer's
        # (sam_fast.family._device_seed).
        self._generators: dict[torch.device, torch.Generator] = {}
        if generator is not None:
            self._generators[generator.device] = generator
        # phase: 0 between steps, 1 at the noisy point, 2 at the ascent point.
        self._bsam: dict[str, Any] = {"phase": 0, "steps": 0, "skip": None, "layout": None}

    @property
    def damping(self) -> float:
        """The first group's damping (pytorch-optimizer keeps one for the optimizer)."""
        return float(self.param_groups[0]["damping"])

    # -- layout and random numbers ------------------------------------------------------------

    def _generator(self, device: torch.device) -> torch.Generator:
        return _device_generator(self._generators, self._seed, device, self.param_groups)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``Optimizer.add_param_group``, after the constructor's checks of the new group
        (its options, its parameters, FSDP2 placements, a generator without a seed for a
        device it is not on): a refused group leaves the optimizer as it was."""
        if not hasattr(self, "_generators"):  # the constructor's own groups: checked there
            return super().add_param_group(param_group)
        param_group, sharded = _added_group(param_group, "BSAM", self._generators, self._seed)
        _check_params(param_group["params"], self.backend)
        super().add_param_group(param_group)
        try:
            _check_group(self.param_groups[-1])  # its options, the defaults filled in
        except Exception:
            self.param_groups.pop()
            raise
        self._sharded = self._sharded or sharded

    def _layout(self) -> tuple[list[_Bucket], list[tuple[torch.device, Tensor]]]:
        """The buckets and the per-device fp32 noise buffers, built once per layout. For
        DTensor parameters a buffer holds the whole tensors' noise (one process's draw) and
        each parameter's noise is its local shard's part of it."""
        params = [p for g in self.param_groups for p in g["params"]]
        key = (tuple((id(p), p.shape, p.dtype, p.device) for p in params),
               tuple(len(g["params"]) for g in self.param_groups))
        cached = self._bsam["layout"]
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        by_device: dict[torch.device, list[Tensor]] = {}
        for p in params:
            by_device.setdefault(p.device, []).append(p)
        noise_of: dict[int, Tensor] = {}
        flats = []
        for device, ps in by_device.items():
            flat = torch.empty(sum(p.numel() for p in ps), dtype=torch.float32, device=device)
            at = 0
            for p in ps:
                noise_of[id(p)] = distributed.shard_of_draw(flat[at:at + p.numel()], p)
                at += p.numel()
            flats.append((device, flat))
        buckets = []
        for gi, group in enumerate(self.param_groups):
            parts: dict[tuple, list[Tensor]] = {}
            for p in group["params"]:
                parts.setdefault((p.device, p.dtype), []).append(p)
            for ps in parts.values():
                buckets.append(_Bucket(gi, ps, [noise_of[id(p)] for p in ps]))
        self._bsam["layout"] = (key, buckets, flats)
        return buckets, flats

    def _locals(self, tensors: list) -> list:
        """The local shards of DTensors (their storage: what the ops run on); the list as it
        is without DTensor parameters. ``None`` stays ``None``."""
        if not self._sharded:
            return tensors
        return [distributed.local(t) for t in tensors]

    def _state_of(self, p: Tensor) -> tuple[Tensor, Tensor]:
        state = self.state[p]
        if "s" not in state:
            state["s"] = torch.full_like(p, self.s_init, memory_format=torch.preserve_format)
            state["momentum"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state["s"], state["momentum"]

    # -- the three steps ------------------------------------------------------------------------

    @_eager
    def first_step(self) -> None:
        """Save ``w`` and move to the noisy point ``w + eps``, ``eps ~ N(0, 1/(N s))``; before
        the first forward pass (the gradients must be None)."""
        if self._bsam["phase"] != 0:
            raise RuntimeError("first_step() called twice without third_step(): call "
                               "third_step() (or restore()) first")
        for group in self.param_groups:
            _check_group(group)
        if any(p.grad is not None for g in self.param_groups for p in g["params"]):
            raise RuntimeError(
                "BSAM.first_step() comes before the forward/backward pass: the gradients "
                "must be None (zero_grad()), since the pass after it computes them at the "
                "noisy point")
        buckets, flats = self._layout()
        for b in buckets:
            for p in b.params:
                self._state_of(p)
        for device, flat in flats:
            flat.normal_(generator=self._generator(device))
        for b in buckets:
            bsam_ops.impl("bsam_noise_", self.backend, b.device)(
                b.tensors, b.backups, b.noise,
                self._locals([self.state[p]["s"] for p in b.params]), self.num_data)
        self._bsam["phase"] = 1

    @_eager
    def second_step(self, zero_grad: bool = False, *, grad_scaler: Any = None) -> None:
        """From the saved ``w``, move to ``w + rho g1 / s`` (``g1``: the gradients now, at the
        noisy point) and keep ``sqrt(s) |g1|`` for the update. ``grad_scaler``: the
        ``torch.amp.GradScaler`` whose scale ``g1`` carries (an inf/NaN ``g1`` then skips
        the ascent and the whole step, read on the device)."""
        if self._bsam["phase"] != 1:
            raise RuntimeError("second_step() without first_step()" if self._bsam["phase"] == 0
                               else "second_step() called twice")
        buckets, _ = self._layout()
        grads = [[p.grad for p in b.params] for b in buckets]
        present = [g for gs in grads for g in gs if g is not None]
        if not present:
            raise RuntimeError("second_step(): no parameter has a gradient; run backward() at "
                               "the noisy point first (or restore())")
        if any(g.is_sparse for g in present):
            raise RuntimeError("BSAM: sparse gradients are not supported")
        scale = skip = None
        if grad_scaler is not None and grad_scaler.is_enabled():
            from .sam import _scale_of

            scale = _scale_of(grad_scaler, self)
            total = ops.grad_sumsq(present, backend=self.backend)
            skip = (~torch.isfinite(total)).float()
        for b, gs in zip(buckets, grads):
            group = self.param_groups[b.group_index]
            have = [i for i, g in enumerate(gs) if g is not None]
            missing = [i for i, g in enumerate(gs) if g is None]
            if missing:  # no gradient at the noisy point: back to w, no curvature term
                torch._foreach_copy_([b.tensors[i] for i in missing],
                                     [b.backups[i] for i in missing])
                torch._foreach_zero_([b.gs[i] for i in missing])
            if have:
                pick = (lambda lst: lst) if not missing else (lambda lst: [lst[i] for i in have])
                bsam_ops.impl("bsam_ascent_", self.backend, b.device)(
                    pick(b.tensors), pick(b.backups), pick(self._locals(gs)),
                    pick(self._locals([self.state[p]["s"] for p in b.params])), pick(b.gs),
                    float(group["rho"]), _on(scale, b.device), _on(skip, b.device))
        self._bsam["skip"] = skip
        self._bsam["phase"] = 2
        if zero_grad:
            self.zero_grad()

    @_eager
    def third_step(self, zero_grad: bool = False) -> None:
        """Back to ``w`` and the update of ``m``, ``s`` and ``w`` with the gradients now (at
        ``w + e``). Parameters without a gradient now are restored and not stepped. Under
        ``GradScaler`` (``scaler.step(opt)``), the gradients are unscaled and the step is
        skipped where the scaler found inf/NaN (or the first gradients had them)."""
        if self._bsam["phase"] != 2:
            raise RuntimeError("third_step() without first_step() and second_step()")
        grad_scale: Tensor | None = getattr(self, "grad_scale", None)
        found_inf: Tensor | None = getattr(self, "found_inf", None)
        skip = self._bsam["skip"]
        if found_inf is not None:
            flag = found_inf.float()
            skip = flag if skip is None else torch.maximum(skip, flag.to(skip.device))
        buckets, _ = self._layout()
        new_s = self.variant == "paper"
        for b in buckets:
            group = self.param_groups[b.group_index]
            gs = [p.grad for p in b.params]
            have = [i for i, g in enumerate(gs) if g is not None]
            if len(have) < len(gs):
                idle = [i for i, g in enumerate(gs) if g is None]
                torch._foreach_copy_([b.tensors[i] for i in idle], [b.backups[i] for i in idle])
            if not have:
                continue
            if any(gs[i].is_sparse for i in have):
                raise RuntimeError("BSAM: sparse gradients are not supported")
            pick = (lambda lst: lst) if len(have) == len(gs) else (
                lambda lst: [lst[i] for i in have])
            beta1, beta2 = group["betas"]
            bsam_ops.impl("bsam_update_", self.backend, b.device)(
                pick(b.tensors), pick(b.backups), pick(self._locals(gs)),
                pick(self._locals([self.state[p]["momentum"] for p in b.params])),
                pick(self._locals([self.state[p]["s"] for p in b.params])), pick(b.gs),
                float(group["lr"]), float(beta1), float(beta2), float(group["weight_decay"]),
                float(group["damping"]), new_s, _on(grad_scale, b.device), _on(skip, b.device))
        self._bsam["phase"] = 0
        self._bsam["skip"] = None
        self._bsam["steps"] += 1
        self._opt_called = True  # LR schedulers: a step happened
        if zero_grad:
            self.zero_grad()

    @_eager
    def restore(self) -> None:
        """Put back the saved ``w`` without stepping (a pass that failed in user code)."""
        if self._bsam["phase"] == 0:
            return
        buckets, _ = self._layout()
        for b in buckets:
            torch._foreach_copy_(b.tensors, b.backups)
        self._bsam["phase"] = 0
        self._bsam["skip"] = None

    @_eager
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One bSAM step: ``zero_grad``, :meth:`first_step`, ``closure`` (a forward/backward
        pass, at the noisy point), :meth:`second_step`, ``closure`` (at ``w + e``),
        :meth:`third_step`; returns the second closure's loss (as pytorch-optimizer's).
        Without a closure after :meth:`second_step`: :meth:`third_step` (what
        ``GradScaler.step`` calls). The gradients are None afterwards."""
        if self._bsam["phase"] == 2 and closure is None:
            self.third_step()
            return None
        if closure is None:
            raise RuntimeError(
                "BSAM.step() needs a closure (a forward/backward pass, run twice), or call "
                "first_step(), second_step() and third_step() around your own passes")
        if self._bsam["phase"] != 0:
            raise RuntimeError("BSAM.step(closure) inside a step taken by hand")
        self.zero_grad()
        self.first_step()
        try:
            with torch.enable_grad():
                closure()
            self.second_step(zero_grad=True)
            with torch.enable_grad():
                loss = closure()
        except BaseException:
            self.restore()
            raise
        self.third_step(zero_grad=True)
        return loss

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self._bsam["phase"] != 0:
            raise RuntimeError("state_dict() inside a step: the parameters are not w; call "
                               "third_step() or restore() first")
        state = super().state_dict()
        state["sam_fast"] = {
            "steps": self._bsam["steps"], "seed": self._seed,
            "rng": _rng_state(self._generators, self.param_groups),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = state_dict.get("sam_fast", {})
        # Checked (keys mapped to this optimizer's devices) before anything is loaded.
        states = _parse_rng(extra.get("rng", {}), self.param_groups, "BSAM")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "sam_fast"})
        self._bsam.update(phase=0, skip=None, layout=None, steps=int(extra.get("steps", 0)))
        if extra.get("seed") is not None:
            self._seed = extra["seed"]
        _load_rng(self._generators, states, self._seed is not None)


def _on(t: Tensor | None, device: torch.device) -> Tensor | None:
    if t is None or t.device == device:
        return t
    return t.to(device, non_blocking=True)


def _check_params(params: Iterable[Tensor], backend: str) -> None:
    """Parameters BSAM can update with ``backend``, checked before anything is written."""
    for p in params:
        ops.check_tensor(p, "parameter")
        reason = dispatch.why_unavailable(backend, p.device.type) if backend != "auto" else None
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} cannot serve parameters on {p.device}: "
                               f"{reason}")


def _check_group(group: dict) -> None:
    """A group's options, checked before anything is written."""
    _finite_float(group["lr"], "lr", 0.0)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair)")
    _finite_float(betas[0], "beta1", 0.0, 1.0, hi_open=True)
    _finite_float(betas[1], "beta2", 0.0, 1.0, hi_open=True)
    _finite_float(group["weight_decay"], "weight_decay", 0.0)
    _finite_float(group["rho"], "rho", 0.0)
    _finite_float(group["damping"], "damping", 0.0)
