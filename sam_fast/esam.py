"""ESAM (Du et al., ICLR 2022, "Efficient Sharpness-aware Minimization for Improved Training
of Neural Networks"): SAM with Stochastic Weight Perturbation (SWP: a random subset of the
weights is perturbed, the perturbation scaled by ``1/beta``) and Sharpness-sensitive Data
Selection (SDS: the second pass uses the fraction ``gamma`` of the batch whose loss rose
most under the perturbation). See docs/family.md.

It is :class:`~sam_fast.SAM` (plan, fused perturbation, restore and base step, GradScaler,
checkpoints) with the random subset applied to the first gradients before SAM's first step,
and :func:`esam_select`, a small helper around the user's per-example losses, for SDS.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from . import distributed, ops
from .family import (_added_group, _check_rng, _device_generator, _finite_float, _load_rng,
                     _parse_rng, _rng_state)
from .sam import SAM
from .wrapper import _eager, check_group_options

__all__ = ["ESAM", "esam_select"]

_SWP = ("element", "tensor")


def _count(gamma: float, n: int) -> int:
    """``|B+|`` for a batch of ``n``: ``floor(gamma * n)``, at least 1 (at most ``n``)."""
    return min(n, max(1, int(math.floor(gamma * n + 1e-9))))


def esam_select(loss_before: Tensor, loss_after: Tensor, gamma: float) -> Tensor:
    """SDS (the paper's eq. 6): the indices of the ``floor(gamma * n)`` examples (at least
    one) whose loss rose most from ``w`` to ``w + e``, in increasing order.

    ``loss_before`` and ``loss_after`` are per-example losses (1-dim, ``n`` elements; e.g.
    ``CrossEntropyLoss(reduction="none")``) of the same batch at ``w`` and at the perturbed
    point. Returns a ``torch.long`` tensor on their device; nothing is read on the host (the
    count depends on ``n`` and ``gamma`` only), so the second pass can index the batch with
    it (``x[idx]``) or take ``loss[idx].mean()`` without a sync. ``gamma = 1``: every example.
    Ties are broken by ``torch.topk``.
    """
    gamma = _finite_float(gamma, "gamma", 0.0, 1.0, lo_open=True)
    if not isinstance(loss_before, Tensor) or not isinstance(loss_after, Tensor):
        raise TypeError("esam_select: the per-example losses must be tensors")
    if loss_before.dim() != 1 or loss_before.shape != loss_after.shape:
        raise ValueError(
            "esam_select needs per-example losses: two 1-dim tensors of the same length "
            f"(got shapes {tuple(loss_before.shape)} and {tuple(loss_after.shape)}; use "
            "reduction='none')")
    n = loss_before.shape[0]
    k = _count(gamma, n)
    if k >= n:
        return torch.arange(n, device=loss_before.device)
    rise = loss_after.detach() - loss_before.detach()
    return torch.sort(torch.topk(rise, k, sorted=False).indices).values


_SDS_UNDER_FSDP2 = (
    "ESAM with gamma < 1 (SDS) does not take FSDP2's sharded (DTensor) parameters: each "
    "rank would keep the sharpest examples of its own part of the batch, not of the whole "
    "batch, and weight them by its own count, so the step would not be one process's. SWP "
    "(beta < 1, swp='element' or 'tensor') works under FSDP2")


class ESAM(SAM):
    r"""ESAM: SAM with a random subset of the weights perturbed (SWP) and the second pass on
    the sharpest examples (SDS)::

        opt = ESAM(model.parameters(), torch.optim.SGD, rho=0.05, beta=0.5, gamma=0.5,
                   lr=0.1, momentum=0.9)
        loss_fn = torch.nn.CrossEntropyLoss(reduction="none")   # per-example losses

        def closure(idx=None):        # per-example losses of the batch (or of examples idx)
            return loss_fn(model(x if idx is None else x[idx]), y if idx is None else y[idx])

        opt.step(closure)             # closure() -> backward -> SWP ascent -> SDS -> step

    ``step`` calls ``closure()`` with the gradient enabled and backpropagates the mean itself;
    under ``torch.no_grad`` at ``w + e`` for the per-example rise; then ``closure(idx)`` on
    the selected examples, whose mean it backpropagates (the authors' three forward passes;
    with ``gamma = 1`` two, as SAM's). By hand (e.g. with GradScaler), the same with SAM's
    :meth:`first_step`/:meth:`second_step` and :meth:`select` (see docs/family.md).

    SWP (``beta`` < 1), ``e = (rho / beta) * m * g / (|g| + eps)``:

    - ``swp="element"`` (default, the paper's eq. 3 as we read it: a Bernoulli(``beta``) mask
      over the gradient's coordinates, ``|g|`` the norm of the whole first gradient);
    - ``swp="tensor"`` (the authors' code): every parameter tensor is perturbed with
      probability ``beta`` as a whole, ``|g|`` the norm over the perturbed tensors. The draw
      is made ahead: :attr:`unperturbed_params` lists the tensors the next step leaves out,
      so that their gradients need not be computed in its first pass (the code turns their
      ``requires_grad`` off; a gradient that is ``None`` is simply not perturbed here).

    The random numbers come from ``torch.Generator`` objects of this optimizer, seeded by
    ``seed`` (by default, a seed drawn once from torch's global generator), or ``generator``
    (on the parameters' device for ``"element"``; on the CPU for ``"tensor"``); a device's
    generator is seeded by its ordinal among this optimizer's devices of its type, so DDP
    rank r on ``cuda:r`` draws what one process on ``cuda:0`` draws (docs/family.md, "The
    generators"). Their states are saved by :meth:`state_dict`, keyed ``"cuda#0"``,
    ``"cpu#0"``. ``"element"`` draws, per step, one
    ``bernoulli_(beta)`` per device into a flat fp32 buffer (that device's parameters in
    state-dict order, every parameter whether it has a gradient or not); ``"tensor"`` one
    ``torch.rand`` of one fp64 number per parameter, on the CPU (no device sync). ``beta = 1``
    draws nothing (SAM's step, plus SDS). Under FSDP2 (DTensor parameters) every rank draws
    for the whole tensors and keeps its shards' part (one process's mask); ``gamma < 1`` is
    refused there (SDS would select per rank).

    The first gradients are masked in place (``p.grad`` holds ``m * g`` after
    :meth:`first_step`; SAM's step discards it anyway).

    ``gamma``: the fraction of the batch in the second pass (:meth:`select`). ``beta`` and
    ``gamma`` are the optimizer's (not per param group).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict] | None,
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        beta: float = 1.0,
        gamma: float = 1.0,
        *,
        swp: str = "element",
        seed: int | None = None,
        generator: torch.Generator | None = None,
        **kwargs: Any,
    ) -> None:
        for key in ("adaptive", "eta", "normalize", "interval"):
            if key in kwargs:
                raise TypeError(f"ESAM does not take {key}= (SAM's normalised ascent, every "
                                "step)")
        self.beta = _finite_float(beta, "beta", 0.0, 1.0, lo_open=True)
        self.gamma = _finite_float(gamma, "gamma", 0.0, 1.0, lo_open=True)
        if swp not in _SWP:
            raise ValueError(f"Invalid swp: {swp!r} (must be 'element' or 'tensor')")
        _check_rng(seed, generator)
        if generator is not None and swp == "tensor" and generator.device.type != "cpu":
            raise ValueError("swp='tensor' draws on the host: its generator must be a CPU "
                             f"torch.Generator (got one on {generator.device})")
        super().__init__(params, base_optimizer, rho=rho, **kwargs)
        # DTensor parameters (FSDP2): every rank draws for the whole model and takes its
        # shards' part (exactly one process's draws). SDS would select per rank, not over
        # the whole batch: refused here, before anything is touched.
        self._sharded = distributed.check_drawable(
            (p for g in self.param_groups for p in g["params"]), "ESAM")
        if self._sharded and self.gamma < 1.0:
            raise NotImplementedError(_SDS_UNDER_FSDP2)
        self.swp = swp
        if generator is None and seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self._seed = seed
        devices = {p.device for g in self.param_groups for p in g["params"]}
        if generator is not None and swp == "element" and {generator.device} != devices:
            raise ValueError(f"generator is on {generator.device}, the parameters on "
                             f"{sorted(map(str, devices))}: swp='element' draws its masks "
                             "on the parameters' device")
        # device -> generator (element: the parameters' devices; tensor: the CPU), seeded by
        # the device's ordinal among the optimizer's (sam_fast.family._device_seed).
        self._generators: dict[torch.device, torch.Generator] = {}
        if generator is not None:
            self._generators[generator.device] = generator
        self._rho_factor = 1.0 / self.beta  # SAM's perturbation times 1/beta
        self._masks: tuple[tuple, list] | None = None  # the element masks' layout cache
        self._counter["keep"] = None  # swp="tensor": the drawn-ahead selection

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """``Optimizer.add_param_group``, after the constructor's checks of the new
        parameters (FSDP2 placements, SDS under FSDP2, a generator without a seed for a
        device it is not on): a refused group leaves the optimizer as it was."""
        if not hasattr(self, "_generators"):  # the constructor's own groups: checked there
            return super().add_param_group(param_group)
        # swp="tensor" draws on the host, swp="element" on the parameters' devices.
        param_group, sharded = _added_group(param_group, "ESAM", self._generators, self._seed,
                                            draws_on_params=self.swp == "element")
        if sharded and self.gamma < 1.0:
            raise NotImplementedError(_SDS_UNDER_FSDP2)
        super().add_param_group(param_group)
        self._sharded = self._sharded or sharded

    # -- random numbers -------------------------------------------------------------------

    def _generator(self, device: torch.device) -> torch.Generator:
        return _device_generator(self._generators, self._seed, device, self.param_groups)

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _keep(self) -> list[bool]:
        """swp='tensor': whether each parameter (in state-dict order) is perturbed at the next
        step, drawn once per step on the CPU."""
        keep = self._counter["keep"]
        params = self._params()
        if keep is None or len(keep) != len(params):
            u = torch.rand(len(params), generator=self._generator(torch.device("cpu")),
                           dtype=torch.float64)
            keep = (u < self.beta).tolist()
            self._counter["keep"] = keep
        return keep

    @property
    def unperturbed_params(self) -> list[Tensor]:
        """``swp="tensor"``: the parameters the next :meth:`first_step` leaves where they are
        (their first-pass gradients are not needed; drawn now if not drawn yet). Empty for
        ``swp="element"`` and ``beta = 1``."""
        if self.swp != "tensor" or self.beta == 1.0:
            return []
        return [p for p, k in zip(self._params(), self._keep()) if not k]

    def _element_masks(self) -> list[tuple[torch.device, Tensor, list[Tensor], list[Tensor]]]:
        """Per device: (device, flat fp32 buffer, its parameters, views of the buffer shaped
        like their local tensors), built once per layout. One buffer per device whatever the
        dtypes, so that the masks drawn do not depend on the storage dtypes (0 and 1 are
        exact in every dtype). For DTensor parameters the buffer holds the whole tensors'
        draws (one process's) and each view is its local shard's part of them."""
        params = self._params()
        key = tuple((id(p), p.shape, p.device) for p in params)
        if self._masks is not None and self._masks[0] == key:
            return self._masks[1]
        groups: dict[torch.device, list[Tensor]] = {}
        for p in params:
            groups.setdefault(p.device, []).append(p)
        out = []
        for device, ps in groups.items():
            flat = torch.empty(sum(p.numel() for p in ps), dtype=torch.float32, device=device)
            views, at = [], 0
            for p in ps:
                views.append(distributed.shard_of_draw(flat[at:at + p.numel()], p))
                at += p.numel()
            out.append((device, flat, ps, views))
        self._masks = (key, out)
        return out

    # -- the algorithm ---------------------------------------------------------------------

    def _first_step(self, grad_scaler: Any, sumsq_hint: Tensor | None = None) -> bool:
        if self._step_state.perturbed is not None or self.beta == 1.0:
            return super()._first_step(grad_scaler, sumsq_hint)
        for group in self.param_groups:
            check_group_options(group)
        grads = [p.grad for p in self._params()]
        present = [g for g in grads if g is not None]
        if not present:
            return False
        if any(g.is_sparse for g in present):
            raise RuntimeError("ESAM: sparse gradients are not supported")
        if self.swp == "tensor":
            keep = self._keep()
            self._counter["keep"] = None
            dropped = [distributed.local(g) for g, k in zip(grads, keep)
                       if g is not None and not k]
            if dropped:
                # Not perturbed (e = 0) and out of the norm, as the code's missing gradients.
                torch._foreach_zero_(dropped)
            return super()._first_step(grad_scaler, None)
        # element: the norm of the whole first gradient, then the masked gradient.
        sumsq = ops.grad_sumsq(present, backend=self.backend)
        for device, flat, ps, views in self._element_masks():
            flat.bernoulli_(self.beta, generator=self._generator(device))
            pairs = [(distributed.local(p.grad), v) for p, v in zip(ps, views)
                     if p.grad is not None]
            if pairs:
                torch._foreach_mul_([g for g, _ in pairs], [v for _, v in pairs])
        # SAM's first step takes the norm given only when every gradient is there (it
        # measures the present ones itself otherwise, which would be the masked norm): a
        # parameter without one gets zeros for the call (e = 0), and None again after it,
        # so that it is stepped only if the second pass gives it a gradient.
        missing = [p for p, g in zip(self._params(), grads) if g is None]
        for p in missing:
            p.grad = torch.zeros_like(p)
        try:
            return super()._first_step(grad_scaler, sumsq)
        finally:
            for p in missing:
                p.grad = None

    def select(self, loss_before: Tensor, loss_after: Tensor) -> Tensor:
        """SDS: :func:`esam_select` with this optimizer's ``gamma``."""
        return esam_select(loss_before, loss_after, self.gamma)

    @_eager
    def step(self, closure: Callable[..., Tensor] | None = None) -> Any:
        """One ESAM step. ``closure(idx=None)`` returns the per-example losses (1-dim, no
        backward) of the batch, or of its examples ``idx`` (a ``torch.long`` index tensor);
        with ``gamma = 1`` a mean loss (0-dim) is accepted too. Returns the mean loss at
        ``w`` (detached).

        After a :meth:`first_step` taken by hand, ``step()`` without a closure is
        :meth:`second_step` (what ``GradScaler.step`` calls)."""
        if self._step_state.perturbed is not None:
            if closure is not None:
                raise RuntimeError("ESAM.step(closure) after first_step(): call second_step()")
            return super().step(None)
        if closure is None:
            raise RuntimeError(
                "ESAM.step() requires a closure returning the per-example losses (or call "
                "first_step(), select() and second_step() yourself)")
        before = self._evaluate(closure)
        self._check_losses(before)
        with torch.enable_grad():
            before.mean().backward()
        if not self._first_step(None):
            raise RuntimeError("ESAM.step(): the closure's loss produced no gradient")
        self.zero_grad()
        try:
            if self.gamma < 1.0:
                after = closure()
                idx = self.select(before, after)
                loss = self._evaluate(lambda: closure(idx))
            else:
                loss = self._evaluate(closure)
            with torch.enable_grad():
                loss.mean().backward()
        except BaseException:
            self.restore()
            raise
        self.second_step(zero_grad=True)
        return before.detach().mean()

    def _check_losses(self, losses: Any) -> None:
        if not isinstance(losses, Tensor) or losses.dim() > 1 or (
                losses.dim() == 0 and self.gamma < 1.0):
            raise TypeError(
                "ESAM.step: the closure must return the per-example losses (a 1-dim tensor, "
                "reduction='none'), without calling backward()"
                + (f"; got {type(losses).__name__}" if not isinstance(losses, Tensor)
                   else f"; got shape {tuple(losses.shape)}"))

    # -- checkpoints --------------------------------------------------------------------------

    def _extra_state(self) -> dict[str, Any]:
        extra = super()._extra_state()
        extra["esam_seed"] = self._seed
        extra["esam_rng"] = _rng_state(self._generators, self.param_groups)
        keep = self._counter["keep"]
        extra["esam_keep"] = None if keep is None else list(keep)
        return extra

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The generator states are checked (keys mapped to this optimizer's devices) before
        # anything is loaded.
        _parse_rng(state_dict.get("sam_fast", {}).get("esam_rng", {}), self.param_groups,
                   "ESAM")
        super().load_state_dict(state_dict)

    def _load_extra_state(self, extra: dict[str, Any]) -> None:
        super()._load_extra_state(extra)
        if extra.get("esam_seed") is not None:
            self._seed = extra["esam_seed"]
        _load_rng(self._generators,
                  _parse_rng(extra.get("esam_rng", {}), self.param_groups, "ESAM"),
                  self._seed is not None)
        keep = extra.get("esam_keep")
        self._counter["keep"] = None if keep is None else [bool(k) for k in keep]
