"""The Hessian trace by Hutchinson's estimator, with a stopping rule on its standard error."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from ._checks import non_negative_float, positive_int
from ._data import Data, LossFn, check_data
from ._hvp import HessianVectorProduct
from ._progress import progress_bar
from ._state import preserved, select_params
from .results import TraceResult


def rademacher(gen: torch.Generator, k: int, n: int, like: Tensor) -> Tensor:
    """``k`` probes of ``n`` independent signs, drawn on the CPU from ``gen``.

    Drawing on the CPU makes the probes, and so the estimate, the same on
    every device for one seed.
    """
    signs = torch.randint(0, 2, (k, n), generator=gen, dtype=torch.int8).mul_(2).sub_(1)
    return signs.to(device=like.device, dtype=like.dtype)


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    *,
    params: Sequence[Tensor] | None = None,
    max_probes: int = 200,
    min_probes: int = 10,
    rtol: float = 0.02,
    atol: float = 0.0,
    probes_per_pass: int = 10,
    seed: int = 0,
    eval_mode: bool = True,
    batched: bool = True,
    progress: bool | None = None,
) -> TraceResult:
    r"""Estimate ``tr ∇²L(w)`` with Hutchinson's estimator ``E[vᵀ ∇²L v]``, Rademacher ``v``.

    Probes are drawn in blocks of ``probes_per_pass``; each block costs one
    sweep over ``data``. After each block the running standard error
    ``s/√N`` is compared with ``max(atol, rtol·|trace|)``; the estimate stops
    once it is met (and at least ``min_probes`` probes are in) or at
    ``max_probes``. With Rademacher probes the estimator's variance is
    ``2(‖H‖_F² − Σ H_ii²)`` per probe: it is exact for a diagonal Hessian.

    Args:
        model, loss_fn, data: the loss ``loss_fn(model(inputs), targets)``
            (a scalar mean) over one ``(inputs, targets)`` batch or an iterable
            of them; the Hessian is that of the mean over all examples.
        params: the parameters to differentiate in (default: all trainable ones).
        max_probes, min_probes, rtol, atol, probes_per_pass: the stopping rule.
        seed: seeds the probes (a local generator; the global RNG is not used).
        eval_mode: measure in eval mode (default). ``False`` keeps the modules'
            modes (BatchNorm then uses batch statistics; dropout is seeded).
        batched: push each probe block through one vmapped backward.
        progress: a tqdm bar; None shows it only on a terminal.

    The parameters and buffers are left exactly as they were.
    """
    max_probes = positive_int("max_probes", max_probes)
    min_probes = min(positive_int("min_probes", min_probes), max_probes)
    probes_per_pass = positive_int("probes_per_pass", probes_per_pass)
    rtol, atol = non_negative_float("rtol", rtol), non_negative_float("atol", atol)
    chosen = select_params(model, params)
    n = sum(p.numel() for p in chosen)
    gen = torch.Generator().manual_seed(seed)
    samples: list[Tensor] = []
    with preserved(model, chosen, eval_mode=eval_mode, seed=seed, restore_params=False):
        batches = Data(data, chosen[0].device)
        check_data(model, loss_fn, batches)
        hvp = HessianVectorProduct(model, loss_fn, batches, chosen, batched=batched)
        bar = progress_bar(progress, max_probes, "hessian trace")
        converged = False
        try:
            while len(samples) < max_probes:
                k = min(probes_per_pass, max_probes - len(samples))
                vs = rademacher(gen, k, n, chosen[0])
                # v^T H v per probe, accumulated in float64 so that the mean and
                # the standard error do not lose the small spread of large values.
                values = (hvp(vs).double() * vs.double()).sum(dim=1).cpu()
                samples.extend(values.unbind())
                bar.update(k)
                mean, se = _mean_and_stderr(samples)
                bar.set_postfix_str(f"trace={mean:.4g}±{se:.2g}")
                if len(samples) >= max(min_probes, 2) and se <= max(atol, rtol * abs(mean)):
                    converged = True
                    break
        finally:
            bar.close()
    mean, se = _mean_and_stderr(samples)
    return TraceResult(trace=mean, stderr=se, probes=len(samples), converged=converged,
                       passes=hvp.passes, hvps=hvp.hvps, samples=torch.stack(samples))


def _mean_and_stderr(samples: list[Tensor]) -> tuple[float, float]:
    x = torch.stack(samples)
    if x.numel() < 2:
        return float(x.mean()), 0.0
    return float(x.mean()), float(x.std(correction=1)) / math.sqrt(x.numel())
