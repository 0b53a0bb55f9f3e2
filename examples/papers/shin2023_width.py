"""Shin et al. (2023), "The Effects of Overparameterization on Sharpness-aware Minimization".

    python examples/papers/shin2023_width.py     # a few minutes on one core; needs scikit-learn

The paper finds that SAM's advantage over SGD grows with overparameterisation:
the wider the network, the larger the gain in test accuracy. This script
sweeps the width of a one-hidden-layer ReLU MLP on scikit-learn's digits
(8x8 images of handwritten digits, 1797 examples, shipped inside the
package: no download), trains SGD and SAM from the same initialisation with
the same schedule for several seeds, and plots the gain (SAM − SGD test
accuracy) with its spread over seeds.

Follows the paper: the width sweep at a fixed training set, SAM against its
base SGD with everything else equal (same initialisation, batches, learning
rate and epochs), several seeds. Shrunk for a CPU: digits instead of
MNIST/CIFAR, a 500-example training split (the other 1297 are the test set),
one hidden layer, 30 epochs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from sam_fast import SAM  # noqa: E402


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as float features in [0, 1] and integer labels.

    Read straight from the CSV that scikit-learn ships (what
    ``sklearn.datasets.load_digits`` reads), without importing scikit-learn:
    that import pulls in scipy and joblib, tens of seconds on a busy machine.
    """
    import importlib.util

    import numpy as np

    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("this example needs scikit-learn for its digits data: "
                         "pip install 'sam-fast[examples]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    table = np.loadtxt(path, delimiter=",")
    return torch.tensor(table[:, :-1], dtype=torch.float32) / 16.0, torch.tensor(table[:, -1]).long()


def split(x: torch.Tensor, y: torch.Tensor, n_train: int, seed: int):
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train:]
    return (x[tr], y[tr]), (x[te], y[te])


def mlp(width: int, seed: int, d_in: int = 64, classes: int = 10) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, classes))


def train(method: str, width: int, seed: int, data, cfg: dict) -> float:
    """Test accuracy after training; SGD and SAM share init and batch order per seed."""
    (x, y), (xt, yt) = data
    model = mlp(width, seed, d_in=x.shape[1])
    sgd = dict(lr=cfg["lr"], momentum=0.9, weight_decay=cfg["wd"])
    if method == "SGD":
        opt = torch.optim.SGD(model.parameters(), **sgd)
    else:
        opt = SAM(model.parameters(), torch.optim.SGD, rho=cfg["rho"], **sgd)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(1000 + seed)
    for _ in range(cfg["epochs"]):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), cfg["batch"]):
            xb, yb = x[perm[i:i + cfg["batch"]]], y[perm[i:i + cfg["batch"]]]
            loss_fn(model(xb), yb).backward()
            if method == "SGD":
                opt.step()
                opt.zero_grad()
            else:
                opt.first_step(zero_grad=True)
                loss_fn(model(xb), yb).backward()
                opt.second_step(zero_grad=True)
    with torch.no_grad():
        return float((model(xt).argmax(1) == yt).float().mean())


def main(argv: list[str] | None = None, digits=load_digits) -> dict:
    args = _common.parser(__doc__).parse_args(argv)
    _common.setup(args.threads)
    cfg = dict(n_train=500, epochs=30, batch=50, lr=0.05, wd=5e-4, rho=0.1)
    widths = [4, 16, 64, 256, 1024]
    seeds = [0, 1, 2, 3]
    if args.quick:
        cfg.update(n_train=100, epochs=1)
        widths, seeds = [4, 16], [0, 1]
    x, y = digits()
    gains: dict[int, torch.Tensor] = {}
    rows = []
    for width in widths:
        acc = {m: [] for m in ("SGD", "SAM")}
        for seed in seeds:
            data = split(x, y, cfg["n_train"], seed)
            for m in acc:
                acc[m].append(train(m, width, seed, data, cfg))
        sgd, sam = torch.tensor(acc["SGD"]), torch.tensor(acc["SAM"])
        gain = (sam - sgd) * 100
        gains[width] = gain
        rows.append([width, float(sgd.mean()) * 100, float(sam.mean()) * 100,
                     float(gain.mean()), float(gain.std())])
    print(f"digits: {cfg['n_train']} train / {len(y) - cfg['n_train']} test, MLP 64-width-10, "
          f"{cfg['epochs']} epochs, batch {cfg['batch']}, SGD lr {cfg['lr']} momentum 0.9 "
          f"wd {cfg['wd']}, SAM rho {cfg['rho']}, {len(seeds)} seeds (paired)")
    print(_common.table(["width", "SGD test acc %", "SAM test acc %", "gain (pp)", "± sd"], rows))

    if args.no_plot:
        return gains
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax1.plot(widths, [r[1] for r in rows], marker="o", color="tab:blue", label="SGD")
    ax1.plot(widths, [r[2] for r in rows], marker="o", color="tab:red", label="SAM")
    ax1.set_ylabel("test accuracy (%), mean over seeds")
    ax1.legend()
    mean = [float(gains[w].mean()) for w in widths]
    sd = [float(gains[w].std()) for w in widths]
    ax2.errorbar(widths, mean, yerr=sd, marker="o", capsize=3, color="tab:red")
    for w in widths:
        ax2.scatter([w] * len(seeds), gains[w].tolist(), color="tab:red", alpha=0.3, s=10)
    ax2.axhline(0.0, color="gray", lw=0.8)
    ax2.set_yscale("symlog", linthresh=1.0)  # the narrow nets' large losses and the ±1pp rest
    ax2.set_ylabel("SAM − SGD (pp), seeds and mean ± sd")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("hidden width")
    fig.suptitle(f"SAM vs SGD across widths (digits, {cfg['n_train']} training examples)")
    fig.tight_layout()
    path = _common.save(fig, args.out, "shin2023_width.png")
    print(f"plot: {path}")
    return gains


if __name__ == "__main__":
    main()
