"""The contenders: every way of doing the optimizer's share of a SAM (and SAMPa) step.

- ``reference``: the per-parameter loop of ``davda54/sam``
  (:class:`sam_fast.reference.ReferenceSAM`), and the same style of loop for SAMPa;
- ``pytorch_optimizer``: ``pytorch_optimizer.SAM``, a published peer (SAM only);
- ``foreach``: a careful ``torch._foreach_*`` implementation (persistent
  backups, fp32 norms), the best one writes without custom kernels;
- ``compile``: ``torch.compile`` of exactly that foreach step;
- ``sam_fast[<backend>]``: :class:`sam_fast.SAM` / the SAMPa ops on each backend
  that :mod:`sam_fast.dispatch` has registered and that can run on the device.

Every contender runs the same hyper-parameters (:class:`Hyper`) on the same
tensors (:class:`Workspace`). All of them use ``torch.optim.SGD`` semantics
with momentum and weight decay as the base step.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from .. import dispatch, ops
from ..reference import ReferenceSAM
from .presets import Preset

# -- shared inputs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Hyper:
    """One configuration for every contender (SGD as in CIFAR/ImageNet recipes)."""

    rho: float = 0.05
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    eps: float = 1e-12
    sampa_rho: float = 0.1  # the SAMPa paper's defaults
    lam: float = 0.2

    adamw_lr: float = 1e-3  # torch.optim.AdamW's defaults but for the weight decay
    adamw_weight_decay: float = 0.05

    def sgd_kwargs(self) -> dict[str, float]:
        return dict(lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)

    def adamw_kwargs(self) -> dict[str, float]:
        return dict(lr=self.adamw_lr, weight_decay=self.adamw_weight_decay)


class Workspace:
    """One copy of a parameter set: the parameters and two gradient pools.

    ``g1`` plays the gradient at ``w`` (and ``g_y`` for SAMPa), ``g2`` the
    gradient at the perturbed point (``g~``). The optimizers never write them.
    """

    def __init__(self, preset: Preset, dtype: torch.dtype, device: torch.device, seed: int
                 ) -> None:
        gen = torch.Generator(device=device).manual_seed(seed)

        def rand(shape: tuple[int, ...], std: float) -> Tensor:
            t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
            return t.mul_(std).to(dtype)

        self.params = [torch.nn.Parameter(rand(s, 0.02)) for s in preset.shapes]
        self.g1 = [rand(s, 1e-3) for s in preset.shapes]
        self.g2 = [rand(s, 1e-3) for s in preset.shapes]

    def attach(self, grads: Sequence[Tensor]) -> None:
        """What a backward pass leaves behind: ``p.grad`` set for every parameter."""
        for p, g in zip(self.params, grads):
            p.grad = g

    def detach(self) -> None:
        for p in self.params:
            p.grad = None


def grads_of(params: Sequence[Tensor]) -> list[Tensor]:
    return [p.grad for p in params if p.grad is not None]


# -- the step interfaces ---------------------------------------------------------------------


class SamStepper(Protocol):
    """The SAM optimizer API every contender is adapted to (``davda54/sam``'s)."""

    def first_step(self) -> None:
        """Norm and perturbation along ``p.grad``; then the gradients are zeroed."""

    def second_step(self) -> None:
        """Restore and base step along ``p.grad``; then the gradients are zeroed."""


class SampaOps(Protocol):
    """SAMPa's two fused updates on the workspace's lists."""

    def points(self) -> None: ...

    def update(self) -> None: ...


class SamRunner:
    """A :class:`SamStepper` as a timing runner: the gradients it reads are attached
    (untimed) before each phase, as the backward pass would leave them."""

    phases = ("first_step", "second_step")

    def __init__(self, ws: Workspace, stepper: SamStepper) -> None:
        self.ws, self.stepper = ws, stepper

    def pre(self, phase: str) -> None:
        self.ws.attach(self.ws.g1 if phase == "first_step" else self.ws.g2)

    @torch.no_grad()
    def run(self, phase: str) -> None:
        if phase == "first_step":
            self.stepper.first_step()
        else:
            self.stepper.second_step()


class SampaRunner:
    phases = ("sampa_points", "sampa_update")

    def __init__(self, impl: SampaOps) -> None:
        self.impl = impl

    def pre(self, phase: str) -> None:
        pass

    @torch.no_grad()
    def run(self, phase: str) -> None:
        if phase == "sampa_points":
            self.impl.points()
        else:
            self.impl.update()


class NormRunner:
    phases = ("grad_norm",)

    def __init__(self, ws: Workspace, fn: Callable[[list[Tensor]], Tensor]) -> None:
        self.ws, self.fn = ws, fn
        self.last: Tensor | None = None

    def pre(self, phase: str) -> None:
        self.ws.attach(self.ws.g1)

    @torch.no_grad()
    def run(self, phase: str) -> None:
        self.last = self.fn(grads_of(self.ws.params))


# -- contenders ------------------------------------------------------------------------------


class Contender:
    """A way of doing the step. Subclasses fill in what they support."""

    name: str = ""
    description: str = ""
    compiles: bool = False  # pays a compile on first use (subject to the --compile policy)
    tasks: frozenset[str] = frozenset({"grad_norm", "sam_step", "sampa_step"})

    def unavailable(self, device: torch.device, dtype: torch.dtype) -> str | None:
        return None

    # Each returns None when the contender has no such workload.
    def sam_stepper(self, params: Sequence[Tensor], hp: Hyper) -> SamStepper | None:
        return None

    def sampa_ops(self, ws: Workspace, hp: Hyper) -> SampaOps | None:
        return None

    def norm_fn(self, params: Sequence[Tensor]) -> Callable[[list[Tensor]], Tensor] | None:
        return None

    def sampa_optimizer(self, params: Sequence[Tensor], hp: Hyper) -> Any | None:
        """A SAMPa optimizer with ``step(closure)`` for the end-to-end runs."""
        return None

    def sam_adamw_stepper(self, params: Sequence[Tensor], hp: Hyper) -> SamStepper | None:
        """SAM around ``torch.optim.AdamW`` (the host-cost benchmark's second base)."""
        return None

    def reset(self) -> None:
        """Forget per-shape caches (compiled graphs) before a new parameter set."""


# The reference loop ---------------------------------------------------------------------------


class _ReferenceStepper:
    def __init__(self, params: Sequence[Tensor], hp: Hyper, adamw: bool = False) -> None:
        base, kwargs = ((torch.optim.AdamW, hp.adamw_kwargs()) if adamw
                        else (torch.optim.SGD, hp.sgd_kwargs()))
        self.opt = ReferenceSAM(list(params), base, rho=hp.rho, perturb_eps=hp.eps, **kwargs)

    def first_step(self) -> None:
        self.opt.first_step()  # zeroes the gradients itself, as the reference does

    def second_step(self) -> None:
        self.opt.second_step()


def reference_norm(grads: list[Tensor]) -> Tensor:
    """The reference's global norm: one norm per tensor, stacked."""
    return torch.norm(torch.stack([g.norm(p=2) for g in grads]), p=2)


class _ReferenceSampa:
    """SAMPa written the way the reference writes SAM: a Python loop per parameter,
    a fresh clone of ``x`` (and of ``y``) at every step, the base step in place."""

    def __init__(self, ws: Workspace, hp: Hyper) -> None:
        self.ws, self.hp = ws, hp
        self.state: list[dict[str, Tensor]] = [{"buf": g.clone()} for g in ws.g1]

    def points(self) -> None:
        hp = self.hp
        norm = reference_norm(self.ws.g1)
        scale = hp.sampa_rho / (norm + hp.eps)
        for p, g, st in zip(self.ws.params, self.ws.g1, self.state):
            st["old_p"] = p.data.clone()
            d = g.add(p, alpha=hp.weight_decay)
            st["y"] = p - hp.lr * (hp.momentum * st["buf"] + d)
            p.add_(g * scale)

    def update(self) -> None:
        hp = self.hp
        for p, gt, gy, st in zip(self.ws.params, self.ws.g2, self.ws.g1, self.state):
            x = st.pop("old_p")
            st.pop("y", None)
            d = (1 - hp.lam) * gt + hp.lam * gy
            d.add_(x, alpha=hp.weight_decay)
            st["buf"].mul_(hp.momentum).add_(d)
            p.copy_(x).add_(st["buf"], alpha=-hp.lr)


class Reference(Contender):
    name = "reference"
    description = "per-parameter loop (davda54/sam; sam_fast.reference.ReferenceSAM)"

    def sam_stepper(self, params, hp):
        return _ReferenceStepper(params, hp)

    def sam_adamw_stepper(self, params, hp):
        return _ReferenceStepper(params, hp, adamw=True)

    def sampa_ops(self, ws, hp):
        return _ReferenceSampa(ws, hp)

    def norm_fn(self, params):
        return reference_norm


# pytorch-optimizer ---------------------------------------------------------------------------


class _PeerStepper:
    def __init__(self, cls: type, params: Sequence[Tensor], hp: Hyper, adamw: bool = False
                 ) -> None:
        base, kwargs = ((torch.optim.AdamW, hp.adamw_kwargs()) if adamw
                        else (torch.optim.SGD, hp.sgd_kwargs()))
        # The published defaults (foreach only on CUDA, per its own rule).
        self.opt = cls(list(params), base, rho=hp.rho, perturb_eps=hp.eps, **kwargs)

    def first_step(self) -> None:
        self.opt.first_step(zero_grad=True)

    def second_step(self) -> None:
        self.opt.second_step(zero_grad=True)


class PytorchOptimizer(Contender):
    name = "pytorch_optimizer"
    description = "pytorch_optimizer.SAM (published peer)"
    tasks = frozenset({"grad_norm", "sam_step"})  # it has no SAMPa

    def __init__(self) -> None:
        try:
            import pytorch_optimizer
            from pytorch_optimizer import SAM
        except ImportError as e:
            self._sam = None
            self._why = (f"pytorch-optimizer is not installed ({e.msg}); "
                         "pip install pytorch-optimizer")
        else:
            self._sam = SAM
            self._why = None
            self.description += f" {getattr(pytorch_optimizer, '__version__', '')}".rstrip()

    def unavailable(self, device, dtype):
        return self._why

    def sam_stepper(self, params, hp):
        return _PeerStepper(self._sam, params, hp)

    def sam_adamw_stepper(self, params, hp):
        return _PeerStepper(self._sam, params, hp, adamw=True)

    def norm_fn(self, params):
        try:
            from pytorch_optimizer.optimizer.utils import get_global_gradient_norm
        except ImportError:
            return None
        groups = [{"params": list(params), "adaptive": False}]
        return lambda grads: get_global_gradient_norm(groups).sqrt()


# torch._foreach_* and torch.compile -----------------------------------------------------------


def foreach_norm(grads: list[Tensor]) -> Tensor:
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)))


def foreach_first_step(params: list[Tensor], grads: list[Tensor], backups: list[Tensor],
                       rho: float, eps: float) -> Tensor:
    """backups <- w; w <- w + rho * g / (||g|| + eps)."""
    norm = foreach_norm(grads)
    scale = rho / (norm + eps)
    torch._foreach_copy_(backups, params)
    torch._foreach_add_(params, torch._foreach_mul(grads, scale))
    return norm


def foreach_second_step(params: list[Tensor], grads: list[Tensor], backups: list[Tensor],
                        bufs: list[Tensor], lr: float, momentum: float, weight_decay: float
                        ) -> None:
    """w <- backup, then ``torch.optim.SGD``'s multi-tensor step. The buffers start at
    zero, which gives SGD's first step (``buf = d``) exactly when dampening is 0, so
    one graph serves every step."""
    torch._foreach_copy_(params, backups)
    d = torch._foreach_add(grads, params, alpha=weight_decay)
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, d)
    torch._foreach_add_(params, bufs, alpha=-lr)


def foreach_sampa_points(params: list[Tensor], grads_y: list[Tensor], bufs: list[Tensor],
                         backups: list[Tensor], ys: list[Tensor], rho: float, eps: float,
                         lr: float, momentum: float, weight_decay: float) -> None:
    """backups <- x; ys <- SGD lookahead of x with g_y; x <- x + rho g_y / (||g_y|| + eps)."""
    scale = rho / (foreach_norm(grads_y) + eps)
    d = torch._foreach_add(grads_y, params, alpha=weight_decay)
    new_bufs = torch._foreach_mul(bufs, momentum)
    torch._foreach_add_(new_bufs, d)
    torch._foreach_copy_(ys, params)
    torch._foreach_add_(ys, new_bufs, alpha=-lr)
    torch._foreach_copy_(backups, params)
    torch._foreach_add_(params, torch._foreach_mul(grads_y, scale))


def foreach_sampa_update(params: list[Tensor], backups: list[Tensor], grads_t: list[Tensor],
                         grads_y: list[Tensor], bufs: list[Tensor], lam: float, lr: float,
                         momentum: float, weight_decay: float) -> None:
    """x <- SGD step from the backups with ``(1 - lam) g~ + lam g_y``."""
    d = torch._foreach_mul(grads_t, 1 - lam)
    torch._foreach_add_(d, grads_y, alpha=lam)
    torch._foreach_add_(d, backups, alpha=weight_decay)
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, d)
    torch._foreach_copy_(params, backups)
    torch._foreach_add_(params, bufs, alpha=-lr)


@dataclass
class _StepFns:
    first: Callable[..., Any] = foreach_first_step
    second: Callable[..., Any] = foreach_second_step
    points: Callable[..., Any] = foreach_sampa_points
    update: Callable[..., Any] = foreach_sampa_update


class ForeachSAM:
    """SAM over ``torch._foreach_*`` lists (also usable as an optimizer in the e2e runs)."""

    def __init__(self, params: Sequence[Tensor], hp: Hyper, fns: _StepFns | None = None) -> None:
        self.params = list(params)
        self.hp = hp
        self.fns = fns or _StepFns()
        self.backups = [torch.empty_like(p) for p in self.params]
        self.bufs = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def first_step(self) -> None:
        self.fns.first(self.params, grads_of(self.params), self.backups, self.hp.rho, self.hp.eps)
        self.zero_grad()

    @torch.no_grad()
    def second_step(self) -> None:
        hp = self.hp
        self.fns.second(self.params, grads_of(self.params), self.backups, self.bufs, hp.lr,
                        hp.momentum, hp.weight_decay)
        self.zero_grad()


class _ForeachSampa:
    def __init__(self, ws: Workspace, hp: Hyper, fns: _StepFns) -> None:
        self.ws, self.hp, self.fns = ws, hp, fns
        self.bufs = [g.clone() for g in ws.g1]
        self.backups = [torch.empty_like(p) for p in ws.params]
        self.ys = [torch.empty_like(p) for p in ws.params]

    def points(self) -> None:
        hp = self.hp
        self.fns.points(self.ws.params, self.ws.g1, self.bufs, self.backups, self.ys,
                        hp.sampa_rho, hp.eps, hp.lr, hp.momentum, hp.weight_decay)

    def update(self) -> None:
        hp = self.hp
        self.fns.update(self.ws.params, self.backups, self.ws.g2, self.ws.g1, self.bufs, hp.lam,
                        hp.lr, hp.momentum, hp.weight_decay)


class Foreach(Contender):
    name = "foreach"
    description = "torch._foreach_* step (persistent backups, fp32 norm)"

    def __init__(self) -> None:
        self.fns = _StepFns()

    def sam_stepper(self, params, hp):
        return ForeachSAM(params, hp, self.fns)

    def sampa_ops(self, ws, hp):
        return _ForeachSampa(ws, hp, self.fns)

    def norm_fn(self, params):
        return foreach_norm


class Compiled(Foreach):
    name = "compile"
    description = "torch.compile of the foreach step (default mode)"
    compiles = True
    # The norm is compiled inside first_step; a graph of its own would cost one more compile.
    tasks = frozenset({"sam_step", "sampa_step"})

    def __init__(self) -> None:
        super().__init__()
        self.compile_seconds = 0.0
        self.reset()

    def reset(self) -> None:
        # Dynamo caches graphs per code object and stops recompiling after a few
        # shapes: start every parameter set from a clean cache.
        torch._dynamo.reset()
        self.fns = _StepFns(*(self._timed_compile(f) for f in (
            foreach_first_step, foreach_second_step, foreach_sampa_points, foreach_sampa_update)))

    def _timed_compile(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        compiled = torch.compile(fn)
        seen: set[tuple] = set()

        def call(*args: Any) -> Any:
            key = tuple((t[0].dtype, len(t)) if isinstance(t, list) and t else None for t in args)
            if key in seen:
                return compiled(*args)
            start = time.perf_counter()
            out = compiled(*args)
            self.compile_seconds += time.perf_counter() - start
            seen.add(key)
            return out

        return call

    def unavailable(self, device, dtype):
        if not hasattr(torch, "compile"):
            return "this PyTorch has no torch.compile"
        return None


# sam_fast ----------------------------------------------------------------------------------


class _SamFastStepper:
    def __init__(self, params: Sequence[Tensor], hp: Hyper, backend: str, adamw: bool = False
                 ) -> None:
        from ..sam import SAM

        base, kwargs = ((torch.optim.AdamW, hp.adamw_kwargs()) if adamw
                        else (torch.optim.SGD, hp.sgd_kwargs()))
        self.opt = SAM(list(params), base, rho=hp.rho, perturb_eps=hp.eps, backend=backend,
                       **kwargs)

    def first_step(self) -> None:
        self.opt.first_step(zero_grad=True)

    def second_step(self) -> None:
        self.opt.second_step(zero_grad=True)


class _SamFastSampa:
    """SAMPa's fused ops as :class:`sam_fast.SAMPa` calls them (norm, points, update)."""

    def __init__(self, ws: Workspace, hp: Hyper, backend: str) -> None:
        self.ws, self.hp, self.backend = ws, hp, backend
        self.bufs = [g.clone() for g in ws.g1]
        self.backups = [torch.empty_like(p) for p in ws.params]
        self.ys = [torch.empty_like(p) for p in ws.params]

    def points(self) -> None:
        hp = self.hp
        sumsq = ops.grad_sumsq(self.ws.g1, backend=self.backend)
        ops.sampa_points_(self.ws.params, self.ws.g1, self.bufs, self.backups, self.ys, sumsq,
                          rho=hp.sampa_rho, eps=hp.eps, backend=self.backend, **hp.sgd_kwargs())

    def update(self) -> None:
        hp = self.hp
        ops.sampa_update_(self.ws.params, self.backups, self.ws.g2, self.ws.g1, self.bufs,
                          lam=hp.lam, backend=self.backend, **hp.sgd_kwargs())


class SamFast(Contender):
    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.name = f"sam_fast[{backend}]"
        self.description = f"sam_fast.SAM / SAMPa ops, backend={backend!r}"

    def unavailable(self, device, dtype):
        return dispatch.why_unavailable(self.backend, device.type)

    def sam_stepper(self, params, hp):
        return _SamFastStepper(params, hp, self.backend)

    def sam_adamw_stepper(self, params, hp):
        return _SamFastStepper(params, hp, self.backend, adamw=True)

    def sampa_ops(self, ws, hp):
        return _SamFastSampa(ws, hp, self.backend)

    def norm_fn(self, params):
        return lambda grads: ops.grad_norm(grads, backend=self.backend)

    def sampa_optimizer(self, params, hp):
        from ..sampa import SAMPa

        return SAMPa(list(params), torch.optim.SGD, rho=hp.sampa_rho, lam=hp.lam,
                     perturb_eps=hp.eps, backend=self.backend, **hp.sgd_kwargs())


# -- discovery -------------------------------------------------------------------------------

PEER_NAMES = ("reference", "pytorch_optimizer", "foreach", "compile")


def sam_fast_backends() -> tuple[str, ...]:
    """Every backend :mod:`sam_fast.dispatch` knows, in registration order."""
    return dispatch.registered_backends()


def interpreted_backend_note(backend: str, device: torch.device) -> str | None:
    """Why a backend that *can* run would be meaningless to time here: Triton on the CPU
    runs through its interpreter (TRITON_INTERPRET=1), a correctness tool."""
    if backend == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return ("runs in Triton's interpreter on the CPU (TRITON_INTERPRET=1); "
                "ask for it with --backend triton")
    return None


def build_contenders(names: Sequence[str], backends: Sequence[str]) -> list[Contender]:
    """Contenders in report order: the peers named in ``names``, then sam_fast per backend."""
    built: list[Contender] = []
    factories: dict[str, Callable[[], Contender]] = {
        "reference": Reference, "pytorch_optimizer": PytorchOptimizer,
        "foreach": Foreach, "compile": Compiled,
    }
    for name in PEER_NAMES:
        if name in names:
            built.append(factories[name]())
    if "sam_fast" in names:
        built.extend(SamFast(b) for b in backends)
    return built


# -- correctness -----------------------------------------------------------------------------


def max_relative_difference(got: Sequence[Tensor], want: Sequence[Tensor]) -> float:
    """max over tensors of ``max|got - want| / max|want|`` (fp32 math): the error relative to
    the tensor's own scale, so zeros in ``want`` do not blow it up."""
    worst = 0.0
    for a, b in zip(got, want):
        a32, b32 = a.detach().float(), b.detach().float()
        scale = b32.abs().max().item()
        err = (a32 - b32).abs().max().item()
        if not math.isfinite(err):
            return math.inf
        worst = max(worst, err / scale if scale > 0 else err)
    return worst
