"""The top Hessian eigenvalues by Lanczos with full reorthogonalisation."""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from torch import Tensor, nn

from ._checks import non_negative_float, positive_int
from ._data import Data, LossFn, check_data
from ._hvp import HessianVectorProduct, unflatten
from ._progress import progress_bar
from ._state import preserved, select_params
from .results import EigenResult


def hessian_top_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    data: Any,
    k: int = 1,
    *,
    params: Sequence[Tensor] | None = None,
    which: Literal["largest", "magnitude"] = "largest",
    max_iter: int | None = None,
    tol: float = 1e-4,
    seed: int = 0,
    return_eigenvectors: bool = False,
    eval_mode: bool = True,
    progress: bool | None = None,
) -> EigenResult:
    r"""The ``k`` top eigenvalues of ``∇²L(w)`` by Lanczos on Hessian-vector products.

    Each Lanczos step is one Hessian-vector product (one sweep over ``data``).
    Every new vector is orthogonalised against all previous ones, twice ("twice
    is enough"), so no spurious copies of converged eigenvalues appear and the
    basis stays orthonormal in float32. After each step the tridiagonal matrix
    ``T`` is diagonalised; a Ritz pair ``(θ, x)`` has the residual
    ``‖Hx − θx‖ = β |s_last|``, an error bound on ``θ``. The iteration stops
    when the ``k`` wanted residuals are below ``tol · max|θ|``, or after
    ``max_iter`` steps (default ``min(n, 5k + 25)``).

    When the Krylov space closes (``β`` ≈ 0, an invariant subspace), Lanczos
    restarts from a random vector orthogonal to the basis: that is how repeated
    eigenvalues, which one Krylov space holds only once, are found.

    Args:
        k: how many eigenvalues (``1 ≤ k ≤`` number of parameters).
        which: ``"largest"`` (algebraically, the sharpness convention) or
            ``"magnitude"`` (largest ``|λ|``, as power iteration finds).
        tol: relative residual tolerance.
        seed: seeds the start vector (a local generator).
        return_eigenvectors: also return the Ritz vectors, shaped like the params.
        The rest as in :func:`~sam_fast.sharpness.hessian_trace`.

    Memory: the Lanczos basis holds up to ``max_iter`` vectors of the
    parameters' size. The parameters and buffers are left exactly as they were.
    """
    chosen = select_params(model, params)
    n = sum(p.numel() for p in chosen)
    k = positive_int("k", k)
    if k > n:
        raise ValueError(f"k={k} is larger than the number of parameters ({n})")
    if which not in ("largest", "magnitude"):
        raise ValueError(f"which must be 'largest' or 'magnitude', got {which!r}")
    tol = non_negative_float("tol", tol)
    max_iter = min(n, 5 * k + 25) if max_iter is None else min(n, positive_int("max_iter", max_iter))
    if max_iter < k:
        raise ValueError(f"max_iter={max_iter} is smaller than k={k}")
    gen = torch.Generator().manual_seed(seed)
    like = chosen[0]

    with preserved(model, chosen, eval_mode=eval_mode, seed=seed, restore_params=False):
        batches = Data(data, like.device)
        check_data(model, loss_fn, batches)
        hvp = HessianVectorProduct(model, loss_fn, batches, chosen)
        basis = torch.empty(max_iter, n, dtype=like.dtype, device=like.device)
        alphas: list[float] = []
        betas: list[float] = []       # betas[j] couples basis j and j + 1 (0 at a restart)
        block_start = 0               # where the current Krylov space began
        q = _random_unit(gen, n, like, basis[:0])
        bar = progress_bar(progress, max_iter, "hessian eigenvalues")
        converged = False
        try:
            for j in range(max_iter):
                basis[j] = q
                w = hvp(q.unsqueeze(0))[0]
                alpha = float(torch.dot(w.double(), q.double()))
                w = w - alpha * q
                if j > block_start:
                    w = w - betas[-1] * basis[j - 1]
                for _ in range(2):
                    w = w - basis[:j + 1].T @ (basis[:j + 1] @ w)
                beta = float(torch.linalg.vector_norm(w.double()))
                alphas.append(alpha)
                theta, s = _ritz(alphas, betas)
                scale = max(float(theta.abs().max()), torch.finfo(torch.float64).tiny)
                idx = _wanted(theta, k, which)
                # Residuals: only the current block's last row couples to the next vector.
                residual = (beta * s[-1, idx]).abs()
                bar.update(1)
                bar.set_postfix_str(f"top={float(theta[idx[0]]):.4g}")
                if j + 1 == n:
                    converged = True
                    residual = torch.zeros_like(residual)
                    break
                breakdown = beta <= scale * torch.finfo(like.dtype).eps ** 0.5
                if (j + 1 >= k and not breakdown and bool((residual <= tol * scale).all())
                        and _block_settled(alphas, betas, block_start, beta, tol * scale, which)):
                    converged = True
                    break
                if breakdown:
                    q = _random_unit(gen, n, like, basis[:j + 1])
                    betas.append(0.0)
                    block_start = j + 1
                else:
                    q = w / beta
                    betas.append(beta)
        finally:
            bar.close()
        iterations = len(alphas)
        vectors = None
        if return_eigenvectors:
            ritz = (s[:, idx].T.to(like.dtype) @ basis[:iterations])
            vectors = [unflatten(v.clone(), chosen) for v in ritz]
    return EigenResult(eigenvalues=theta[idx].clone(), residuals=residual.clone(),
                       eigenvectors=vectors, iterations=iterations, converged=converged,
                       passes=hvp.passes, hvps=hvp.hvps)


def _ritz(alphas: list[float], betas: list[float]) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of the tridiagonal ``T`` (float64, CPU: it is tiny)."""
    m = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[:m - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigh(t)


def _block_settled(alphas: list[float], betas: list[float], start: int, beta: float,
                   bound: float, which: str) -> bool:
    """After a restart, the current block's top Ritz value must have settled too:
    until it has, the complement of the closed Krylov spaces may still hold an
    eigenvalue larger than the ones found (without a restart this is implied)."""
    if start == 0:
        return True
    theta, s = _ritz(alphas[start:], betas[start:])
    top = int(_wanted(theta, 1, which)[0])
    return abs(beta * float(s[-1, top])) <= bound


def _wanted(theta: Tensor, k: int, which: str) -> Tensor:
    """Indices of the k wanted Ritz values, best first."""
    key = theta if which == "largest" else theta.abs()
    return torch.argsort(key, descending=True)[:k]


def _random_unit(gen: torch.Generator, n: int, like: Tensor, basis: Tensor) -> Tensor:
    """A random unit vector orthogonal to ``basis`` (drawn on the CPU for reproducibility)."""
    q = torch.randn(n, generator=gen, dtype=torch.float64).to(device=like.device, dtype=like.dtype)
    for _ in range(2):
        if basis.shape[0]:
            q = q - basis.T @ (basis @ q)
    return q / torch.linalg.vector_norm(q)
