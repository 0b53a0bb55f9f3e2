"""Chen et al. (NeurIPS 2023), "Why Does Sharpness-Aware Minimization Generalize Better Than SGD?"

    python examples/papers/chen2023_two_patch.py          # ~1 minute on one core

The paper's data model: each example has two patches, a signal patch ``y·μ``
and a noise patch ``ξ ~ N(0, σ_p² (I − μμᵀ/‖μ‖²))``, and a fraction ``p`` of
the training labels is flipped. The model is the paper's two-layer
convolutional ReLU network: ``f(W, x) = F₊₁ − F₋₁`` with
``F_j = (1/m) Σ_r Σ_patches ReLU(⟨w_{j,r}, x^(patch)⟩)``, second layer fixed,
logistic loss. With few examples and weak signal (``n‖μ‖⁴ ≲ d σ_p⁴``), gradient
descent fits the training set by memorising the noise patches and its test
error stays high (harmful overfitting); SAM's perturbation keeps the noise
from being learned early, so it learns ``μ`` at signal strengths where GD
does not. The script sweeps ``‖μ‖`` and prints the clean test error of both.

Follows the paper: the data model, the network (ReLU, fixed ±1 second layer,
1/m scaling), logistic loss, full-batch training from small Gaussian
initialisation, label noise. Shrunk for a CPU: ``d = 400``, ``n = 40``,
``m = 10`` filters per class, 200 steps, 3 seeds per point (the paper's
heat maps use larger ``d`` and sweep ``n`` as well).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from sam_fast import SAM  # noqa: E402


def two_patch_data(n: int, d: int, signal: float, sigma_p: float, flip: float,
                   gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x [n, 2, d], noisy labels, clean labels)``; ``μ = signal · e₁`` (noise ⟂ μ)."""
    y = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
    mu = torch.zeros(d)
    mu[0] = signal
    noise = sigma_p * torch.randn(n, d, generator=gen)
    noise[:, 0] = 0.0  # the projection onto μ's orthogonal complement
    x = torch.stack([y[:, None] * mu, noise], dim=1)
    flipped = torch.rand(n, generator=gen) < flip
    return x, torch.where(flipped, -y, y), y


class TwoLayerCNN(torch.nn.Module):
    """The paper's network: filters shared over the two patches, fixed second layer."""

    def __init__(self, d: int, m: int, init_std: float, gen: torch.Generator) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(init_std * torch.randn(2, m, d, generator=gen))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, patches, d = x.shape
        two, m, _ = self.w.shape
        # <w_{j,r}, x^(p)> for every example, patch and filter, as one matmul.
        act = torch.relu(x.reshape(n * patches, d) @ self.w.reshape(two * m, d).T)
        f = act.view(n, patches, two, m).sum(dim=1).mean(dim=2)  # F_j: sum patches, mean filters
        return f[:, 0] - f[:, 1]


def logistic(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.softplus(-y * out).mean()


def train(method: str, signal: float, seed: int, cfg: dict) -> dict:
    gen = torch.Generator().manual_seed(seed)
    x, y, _ = two_patch_data(cfg["n"], cfg["d"], signal, 1.0, cfg["flip"], gen)
    xt, _, yt_clean = two_patch_data(cfg["n_test"], cfg["d"], signal, 1.0, 0.0, gen)
    model = TwoLayerCNN(cfg["d"], cfg["m"], cfg["init_std"], gen)
    if method == "GD":
        opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"])
    else:
        opt = SAM(model.parameters(), torch.optim.SGD, rho=cfg["rho"], lr=cfg["lr"])
    for _ in range(cfg["steps"]):
        logistic(model(x), y).backward()
        if method == "GD":
            opt.step()
            opt.zero_grad()
        else:
            opt.first_step(zero_grad=True)
            logistic(model(x), y).backward()
            opt.second_step(zero_grad=True)
    with torch.no_grad():
        train_err = float((torch.sign(model(x)) != y).float().mean())
        test_err = float((torch.sign(model(xt)) != yt_clean).float().mean())
        # How much of the filters' mass went to the signal coordinate vs the noise ones.
        signal_w = float(model.w[:, :, 0].abs().max())
    return dict(train_err=train_err, test_err=test_err, signal_w=signal_w)


def main(argv: list[str] | None = None) -> dict:
    args = _common.parser(__doc__).parse_args(argv)
    _common.setup(args.threads)
    cfg = dict(n=40, n_test=1000, d=400, m=10, flip=0.1, init_std=0.01, lr=0.5, rho=0.4,
               steps=200)
    signals = [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0]
    seeds = [0, 1, 2]
    if args.quick:
        cfg.update(d=50, steps=20, n_test=50)
        signals, seeds = [1.0, 4.0], [0]
    results: dict = {}
    rows = []
    for s in signals:
        row = [s]
        for method in ("GD", "SAM"):
            runs = [train(method, s, seed, cfg) for seed in seeds]
            err = torch.tensor([r["test_err"] for r in runs])
            tr = torch.tensor([r["train_err"] for r in runs])
            results[(method, s)] = err
            row += [float(tr.mean()), float(err.mean()), float(err.std()) if len(seeds) > 1 else 0.0]
        rows.append(row)
    print(f"two-patch data: d={cfg['d']}, n={cfg['n']}, label noise {cfg['flip']}, "
          f"{cfg['steps']} full-batch steps, lr {cfg['lr']}, SAM rho {cfg['rho']}, "
          f"{len(seeds)} seeds; clean test error")
    print(_common.table(["‖μ‖", "GD train err", "GD test err", "±", "SAM train err",
                         "SAM test err", "±"], rows))

    if args.no_plot:
        return results
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for method, color in (("GD", "tab:blue"), ("SAM", "tab:red")):
        mean = [float(results[(method, s)].mean()) for s in signals]
        sd = [float(results[(method, s)].std()) if len(seeds) > 1 else 0.0 for s in signals]
        ax.errorbar(signals, mean, yerr=sd, marker="o", capsize=3, label=method, color=color)
    ax.set_xlabel("signal strength ‖μ‖ (σ_p = 1)")
    ax.set_ylabel("clean test error")
    ax.set_title(f"Two-patch data (d={cfg['d']}, n={cfg['n']}): GD memorises, SAM learns")
    ax.legend()
    path = _common.save(fig, args.out, "chen2023_two_patch.png")
    print(f"plot: {path}")
    return results


if __name__ == "__main__":
    main()
