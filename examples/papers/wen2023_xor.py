"""Wen, Li & Ma (NeurIPS 2023), "Sharpness Minimization Algorithms Do Not Only
Minimize Sharpness To Achieve Better Generalization".

    python examples/papers/wen2023_xor.py      # a few minutes on one core

The paper's xor task: ``x`` uniform on the hypercube ``{−1, 1}^d`` and
``y = x₁x₂``, fitted with a two-layer ReLU network ``f(x) = Σ_j a_j ReLU(w_jᵀx + b_j)``
under the squared loss, trained by 1-SAM (SAM whose perturbation is taken on
one example at a time). Its claim: without the first-layer bias ``b``, the
flattest interpolators generalise and 1-SAM finds one; with the bias there
are flattest interpolators that memorise, and 1-SAM fails to generalise
although it reaches a *flatter* minimum (a smaller Hessian trace). So
flatness alone does not explain why SAM generalises.

This script trains both networks by 1-SAM from the same initialisation and
order of examples, and reports, along the run and at its end, the training
loss, the test error and the Hessian trace of the training loss measured by
``sam_fast.sharpness.hessian_trace`` (with its standard error), plus the top
Hessian eigenvalue and the 1-sharpness (worst-case sharpness per example).

Follows the paper: the data, the network with and without bias, squared
loss, 1-SAM as SAM on batches of one example (``sam_fast.SAM``), sharpness
as the Hessian trace. Shrunk for a CPU: a small ``d`` and training set and a
short run (see ``CONFIG``); the paper trains far longer, and the drift
towards the memorising flat minimum is slow, so a short run shows at most
its beginning.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from sam_fast import SAM  # noqa: E402
from sam_fast.sharpness import (hessian_top_eigenvalues, hessian_trace,  # noqa: E402
                                worst_case_sharpness)

CONFIG = dict(d=30, n=100, n_test=2000, width=100, lr=0.01, rho=0.2, steps=8000, checkpoints=8)
QUICK = dict(d=8, n=16, n_test=64, width=8, lr=0.01, rho=0.1, steps=40, checkpoints=2)


def xor_data(n: int, d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, 2, (n, d), generator=gen).float() * 2 - 1
    return x, x[:, 0] * x[:, 1]


def two_layer(d: int, width: int, bias: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, width, bias=bias), nn.ReLU(), nn.Linear(width, 1, bias=False))
    return net


def squared(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out.squeeze(-1) - y) ** 2).mean()


def measure(model: nn.Module, train, test) -> dict:
    with torch.no_grad():
        loss = float(squared(model(train[0]), train[1]))
        err = float((torch.sign(model(test[0]).squeeze(-1)) != test[1]).float().mean())
    tr = hessian_trace(model, squared, train, rtol=0.05, max_probes=100, progress=False)
    return dict(loss=loss, test_err=err, trace=tr.trace, trace_se=tr.stderr)


def run(bias: bool, cfg: dict, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    train, test = xor_data(cfg["n"], cfg["d"], gen), xor_data(cfg["n_test"], cfg["d"], gen)
    model = two_layer(cfg["d"], cfg["width"], bias, seed)
    # 1-SAM: one example per step.
    opt = SAM(model.parameters(), torch.optim.SGD, rho=cfg["rho"], lr=cfg["lr"])
    order = torch.Generator().manual_seed(1000 + seed)
    every = max(1, cfg["steps"] // cfg["checkpoints"])
    history = []
    perm = torch.randperm(cfg["n"], generator=order)
    for step in range(cfg["steps"]):
        i = step % cfg["n"]
        if i == 0 and step:
            perm = torch.randperm(cfg["n"], generator=order)
        xb, yb = train[0][perm[i:i + 1]], train[1][perm[i:i + 1]]
        squared(model(xb), yb).backward()
        opt.first_step(zero_grad=True)
        squared(model(xb), yb).backward()
        opt.second_step(zero_grad=True)
        if (step + 1) % every == 0:
            history.append(dict(step=step + 1, **measure(model, train, test)))
    final = history[-1]
    top = hessian_top_eigenvalues(model, squared, train, k=1, progress=False)
    sharp1 = worst_case_sharpness(model, squared, train, rho=0.05, m=1, steps=5, progress=False)
    return dict(history=history, final=final, lambda_max=float(top.eigenvalues[0]),
                sharpness_m1=sharp1.sharpness)


def main(argv: list[str] | None = None) -> dict:
    args = _common.parser(__doc__).parse_args(argv)
    _common.setup(args.threads)
    cfg = QUICK if args.quick else CONFIG
    results = {bias: run(bias, cfg) for bias in (False, True)}
    print(f"xor y = x1*x2 on {{-1,1}}^{cfg['d']}: n={cfg['n']}, width {cfg['width']}, "
          f"1-SAM (batch 1) rho {cfg['rho']} lr {cfg['lr']}, {cfg['steps']} steps")
    rows = []
    for bias, r in results.items():
        f = r["final"]
        rows.append(["with bias" if bias else "no bias", f["loss"], f["test_err"], f["trace"],
                     f["trace_se"], r["lambda_max"], r["sharpness_m1"]])
    print(_common.table(["network", "train loss", "test error", "Hessian trace", "± se",
                         "λ_max", "1-sharpness ρ=0.05"], rows))

    if args.no_plot:
        return results
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for bias, color in ((False, "tab:blue"), (True, "tab:red")):
        h = results[bias]["history"]
        steps = [p["step"] for p in h]
        label = "with bias" if bias else "no bias"
        ax1.plot(steps, [p["test_err"] for p in h], marker="o", color=color, label=label)
        ax2.errorbar(steps, [p["trace"] for p in h], yerr=[p["trace_se"] for p in h],
                     marker="o", capsize=3, color=color, label=label)
    ax1.set_xlabel("1-SAM steps")
    ax1.set_ylabel("test error")
    ax2.set_xlabel("1-SAM steps")
    ax2.set_ylabel("Hessian trace (train loss)")
    ax1.legend()
    fig.suptitle(f"xor on {{-1,1}}^{cfg['d']}: generalisation vs flatness under 1-SAM")
    fig.tight_layout()
    path = _common.save(fig, args.out, "wen2023_xor.png")
    print(f"plot: {path}")
    return results


if __name__ == "__main__":
    main()
