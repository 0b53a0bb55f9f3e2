"""Worst-case and adaptive sharpness by projected gradient ascent in an L2 ball."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from ._checks import non_negative_float, positive_float, positive_int
from ._data import Batch, Data, LossFn, check_data, mean_loss
from ._hvp import flatten, unflatten
from ._progress import progress_bar
from ._state import preserved, select_params
from .results import SharpnessResult


def worst_case_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    rho: float,
    *,
    m: int | None = None,
    steps: int = 20,
    step_size: float | None = None,
    params: Sequence[Tensor] | None = None,
    seed: int = 0,
    eval_mode: bool = True,
    progress: bool | None = None,
) -> SharpnessResult:
    r"""``max_{‖e‖₂ ≤ ρ} L(w + e) − L(w)`` by projected gradient ascent.

    The ascent starts with SAM's step ``e = ρ g/‖g‖`` (the first-order
    maximiser; a random direction where ``g = 0``), then takes ``steps − 1``
    normalised gradient steps of length ``step_size`` (default ``ρ/2``), each
    projected back onto the ball. A step that does not raise the loss is undone
    and the step length halved, so the loss only goes up; the best point found
    is reported, a lower bound on the true maximum.

    ``m`` gives m-sharpness (Foret et al. 2021; Andriushchenko & Flammarion
    2022): each batch is cut into consecutive chunks of ``m`` examples, the
    ascent is run on each chunk's loss with its own ``e``, and the chunks'
    sharpness is averaged (weighted by chunk size, so a last short chunk
    counts for what it holds). ``m=None`` runs one ascent on the mean loss of
    all the data (every step then sweeps all of it).

    Args:
        rho: the radius (> 0).
        m: the chunk size, or None.
        steps: gradient evaluations per ascent (≥ 1; 1 is SAM's one-step estimate).
        step_size: the length of the steps after the first.
        params: the parameters to perturb (default: all trainable ones).
        seed: seeds the start direction where the gradient vanishes (a local
            generator), and dropout in train mode.
        eval_mode, progress: as in :func:`~sam_fast.sharpness.hessian_trace`.

    The parameters and buffers are put back exactly as they were.
    """
    return _sharpness(model, loss_fn, data, rho, None, m=m, steps=steps, step_size=step_size,
                      params=params, seed=seed, eval_mode=eval_mode, progress=progress,
                      desc="worst-case sharpness")


def adaptive_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    rho: float,
    *,
    eta: float = 0.0,
    m: int | None = None,
    steps: int = 20,
    step_size: float | None = None,
    params: Sequence[Tensor] | None = None,
    seed: int = 0,
    eval_mode: bool = True,
    progress: bool | None = None,
) -> SharpnessResult:
    r"""Adaptive sharpness ``max_{‖e / (|w| + η)‖₂ ≤ ρ} L(w + e) − L(w)``.

    The ball is scaled elementwise by ``t = |w| + η`` (Kwon et al. 2021;
    Andriushchenko et al., ICML 2023, "A Modern Look at the Relationship
    between Sharpness and Generalization"), which makes the measure invariant
    to rescaling a ReLU layer up and the next one down. The ascent runs on
    ``δ = e / t`` in the plain ball ``‖δ‖ ≤ ρ`` (gradient ``t ⊙ ∇L``), as
    :func:`worst_case_sharpness` does. ``eta = 0`` is Andriushchenko et al.'s
    definition (a zero weight then stays put); the arguments are otherwise
    those of :func:`worst_case_sharpness`.
    """
    eta = non_negative_float("eta", eta)
    return _sharpness(model, loss_fn, data, rho, eta, m=m, steps=steps, step_size=step_size,
                      params=params, seed=seed, eval_mode=eval_mode, progress=progress,
                      desc="adaptive sharpness")


def _sharpness(model: nn.Module, loss_fn: LossFn, data: Any, rho: float, eta: float | None, *,
               m: int | None, steps: int, step_size: float | None,
               params: Sequence[Tensor] | None, seed: int, eval_mode: bool,
               progress: bool | None, desc: str) -> SharpnessResult:
    rho = positive_float("rho", rho)
    steps = positive_int("steps", steps)
    m = None if m is None else positive_int("m", m)
    step = rho / 2 if step_size is None else positive_float("step_size", step_size)
    chosen = select_params(model, params)
    with preserved(model, chosen, eval_mode=eval_mode, seed=seed, restore_params=True):
        batches = Data(data, chosen[0].device)
        check_data(model, loss_fn, batches)
        w0 = flatten([p.detach() for p in chosen]).clone()
        scale = None if eta is None else w0.abs() + eta
        gen = torch.Generator().manual_seed(seed)
        ascent = _Ascent(model, loss_fn, chosen, w0, scale, rho, step, steps, gen)
        chunks = list(_chunks(batches, m)) if m is not None else [batches]
        bar = progress_bar(progress, len(chunks) * steps, desc)
        total = base = top = 0.0
        count = 0
        try:
            for chunk in chunks:
                # m=None: one "chunk", all the data; else a list holding one chunk.
                n, l0, best = ascent.run(chunk, bar)
                base += n * l0
                top += n * best
                count += n
        finally:
            bar.close()
    return SharpnessResult(sharpness=(top - base) / count, loss=base / count,
                           perturbed_loss=top / count, rho=rho, m=m, chunks=len(chunks),
                           steps=steps, passes=ascent.passes, evaluations=ascent.evaluations)


def _chunks(batches: Data, m: int) -> Iterator[list[tuple[Batch, int]]]:
    """Consecutive chunks of ``m`` examples of each batch (the last may be shorter)."""
    for (inputs, targets), n in batches:
        for start in range(0, n, m):
            end = min(start + m, n)
            yield [((inputs[start:end], targets[start:end]), end - start)]


class _Ascent:
    """Projected, normalised gradient ascent on ``δ`` with ``e = t ⊙ δ`` (``t = 1``
    for the plain ball), over the parameters as one flat vector."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, params: list[Tensor], w0: Tensor,
                 scale: Tensor | None, rho: float, step: float, steps: int,
                 gen: torch.Generator) -> None:
        self.model, self.loss_fn, self.params = model, loss_fn, params
        self.w0, self.scale, self.rho, self.step, self.steps = w0, scale, rho, step, steps
        self.gen = gen
        self.passes = 0
        self.evaluations = 0

    def _set(self, delta: Tensor) -> None:
        """Move the parameters to ``w0 + t ⊙ δ``."""
        e = delta if self.scale is None else self.scale * delta
        with torch.no_grad():
            for p, v in zip(self.params, unflatten(self.w0 + e, self.params)):
                p.copy_(v)

    def _evaluate(self, data: Any, need_grad: bool) -> tuple[float, int, Tensor | None]:
        """The mean loss over ``data`` and, when asked, its gradient in ``δ``."""
        total_loss, count = 0.0, 0
        grad = torch.zeros_like(self.w0) if need_grad else None
        for batch, n in data:
            with torch.set_grad_enabled(need_grad):
                loss = mean_loss(self.model, self.loss_fn, batch)
            if need_grad:
                gs = torch.autograd.grad(loss, self.params, allow_unused=True,
                                         materialize_grads=True)
                grad.add_(flatten(gs), alpha=n)
            total_loss += float(loss.detach().double()) * n
            count += n
            self.evaluations += 1
        self.passes += 1
        if grad is not None:
            grad /= count
            if self.scale is not None:
                grad *= self.scale  # chain rule through e = t ⊙ δ
        return total_loss / count, count, grad

    def _towards(self, delta: Tensor, grad: Tensor, length: float) -> Tensor | None:
        """``Proj_ball(δ + length · g/‖g‖)``; None where the gradient vanishes."""
        norm = torch.linalg.vector_norm(grad.double())
        if not norm > 0:
            return None
        moved = delta + (length / float(norm)) * grad
        size = float(torch.linalg.vector_norm(moved.double()))
        return moved * (self.rho / size) if size > self.rho else moved

    def _random_direction(self) -> Tensor:
        d = torch.randn(self.w0.numel(), generator=self.gen, dtype=torch.float64)
        return d.to(device=self.w0.device, dtype=self.w0.dtype)

    def run(self, data: Any, bar: Any) -> tuple[int, float, float]:
        """One ascent; returns (examples, L(w), the best L(w + e) found)."""
        delta = torch.zeros_like(self.w0)
        self._set(delta)
        loss0, n, grad = self._evaluate(data, need_grad=self.steps > 0)
        best_loss, best_delta, best_grad = loss0, delta, grad
        length = self.rho  # SAM's step first: straight to the sphere along g
        for t in range(self.steps):
            proposal = self._towards(best_delta, best_grad, length)
            if proposal is None and t == 0:
                # w is a stationary point of this loss (g = 0): the gradient gives no
                # direction, so start from a random point of the sphere (seeded).
                proposal = self._towards(delta, self._random_direction(), length)
            bar.update(1)
            if proposal is None:  # stationary inside the ball: nothing left to climb
                bar.update(self.steps - t - 1)
                break
            self._set(proposal)
            loss, _, grad = self._evaluate(data, need_grad=t + 1 < self.steps)
            if loss > best_loss:
                best_loss, best_delta, best_grad = loss, proposal, grad
                length = self.step if t == 0 else length
            else:
                length = (self.step if t == 0 else length) / 2
                if best_grad is None:
                    break
        return n, loss0, best_loss
