"""What the sharpness measurements return: the value and what it cost."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass(frozen=True)
class TraceResult:
    """Hutchinson's estimate of ``tr H``.

    Attributes:
        trace: the mean of the probe values ``v^T H v``.
        stderr: its standard error, ``std(values) / sqrt(probes)`` (0 for one probe).
        probes: the number of Rademacher probes used.
        converged: whether the stopping rule (``stderr <= max(atol, rtol*|trace|)``)
            was met before ``max_probes``.
        passes: sweeps over the data (each is a forward, a backward and a
            double backward per batch, for one block of probes).
        hvps: Hessian-vector products, each over all the data.
        samples: the probe values ``v^T H v`` (float64, on the CPU).
    """

    trace: float
    stderr: float
    probes: int
    converged: bool
    passes: int
    hvps: int
    samples: Tensor = field(repr=False)


@dataclass(frozen=True)
class EigenResult:
    """The top Hessian eigenvalues by Lanczos.

    Attributes:
        eigenvalues: the ``k`` wanted eigenvalues, in decreasing order (float64, CPU).
        residuals: ``||H x - lambda x||`` of each Ritz pair (an error bound on
            its eigenvalue).
        eigenvectors: when asked for, one list of tensors shaped like the
            parameters per eigenvalue (unit norm over all of them), else None.
        iterations: Lanczos steps taken (one Hessian-vector product each).
        converged: whether every residual met the tolerance.
        passes: sweeps over the data.
        hvps: Hessian-vector products, each over all the data.
    """

    eigenvalues: Tensor
    residuals: Tensor
    eigenvectors: list[list[Tensor]] | None = field(repr=False)
    iterations: int
    converged: bool
    passes: int
    hvps: int


@dataclass(frozen=True)
class SharpnessResult:
    """Worst-case (or adaptive) sharpness ``max_{e in ball} L(w + e) - L(w)``.

    Attributes:
        sharpness: the largest increase found by the ascent (a lower bound on
            the true maximum), averaged over chunks for m-sharpness.
        loss: ``L(w)`` (averaged over chunks, weighted by their sizes).
        perturbed_loss: ``L(w + e)`` at the best ``e`` found (same averaging).
        rho: the radius.
        m: the chunk size of m-sharpness, None for the whole data.
        chunks: how many separate ascents were run (1 when ``m`` is None).
        steps: ascent steps per chunk.
        passes: sweeps over the data (each chunk's ascent sweeps its chunk).
        evaluations: forward passes of one batch or chunk, each but the last
            of an ascent with a backward.
    """

    sharpness: float
    loss: float
    perturbed_loss: float
    rho: float
    m: int | None
    chunks: int
    steps: int
    passes: int
    evaluations: int
