"""A small end-to-end run: the same CNN trained with SGD, SAM, ASAM and SAMPa.

    python examples/train_small.py --steps 200

It trains on a synthetic, learnable 10-class image task (no downloads), then
prints each optimizer's final training loss, held-out accuracy and time per
step. It shows the API in context; the numbers are not a benchmark (see
``python -m sam_fast.bench`` for that).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from sam_fast import SAM, SAMPa


def make_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose class is set by a fixed random template plus noise."""
    gen = torch.Generator().manual_seed(0)
    templates = torch.randn(10, 3, 16, 16, generator=gen)
    gen.manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=gen)
    images = templates[labels] + 2.0 * torch.randn(n, 3, 16, 16, generator=gen)
    return images, labels


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def train(name: str, steps: int, batch_size: int, device: str) -> dict:
    model = make_model().to(device)
    loss_fn = nn.CrossEntropyLoss()
    images, labels = make_task(steps * batch_size, seed=1)
    images, labels = images.to(device), labels.to(device)
    sgd_kw = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
    if name == "SGD":
        opt = torch.optim.SGD(model.parameters(), **sgd_kw)
    elif name == "SAM":
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, **sgd_kw)
    elif name == "ASAM":
        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, adaptive=True, eta=0.01, **sgd_kw)
    else:
        opt = SAMPa(model.parameters(), torch.optim.SGD, rho=0.1, lam=0.2, **sgd_kw)

    start = time.perf_counter()
    loss = torch.tensor(0.0)
    for step in range(steps):
        x = images[step * batch_size:(step + 1) * batch_size]
        y = labels[step * batch_size:(step + 1) * batch_size]

        def closure(x=x, y=y):
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        if name == "SGD":
            opt.zero_grad()
            loss = closure()
            opt.step()
        elif name in ("SAM", "ASAM"):
            loss = closure()                 # first forward/backward at w
            opt.first_step(zero_grad=True)   # w <- w + e(w)
            closure()                        # second forward/backward at w + e(w)
            opt.second_step(zero_grad=True)  # back to w, then the SGD step
        else:
            loss = opt.step(closure)         # SAMPa evaluates the closure itself
    elapsed = time.perf_counter() - start

    model.eval()
    test_x, test_y = make_task(2000, seed=2)
    with torch.no_grad():
        accuracy = (model(test_x.to(device)).argmax(1).cpu() == test_y).float().mean().item()
    return {"loss": loss.item(), "accuracy": accuracy, "ms_per_step": 1e3 * elapsed / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"{'optimizer':<8} {'train loss':>10} {'test acc':>9} {'ms/step':>8}")
    for name in ("SGD", "SAM", "ASAM", "SAMPa"):
        r = train(name, args.steps, args.batch_size, args.device)
        print(f"{name:<8} {r['loss']:>10.4f} {r['accuracy']:>9.3f} {r['ms_per_step']:>8.1f}")


if __name__ == "__main__":
    main()
