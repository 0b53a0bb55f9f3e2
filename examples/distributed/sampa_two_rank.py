"""SAMPa's parallel form: two ranks compute its two gradients at the same time.

    torchrun --nproc_per_node 2 examples/distributed/sampa_two_rank.py

Rank 0 evaluates the gradient at x~ (on the previous batch), rank 1 the
gradient at y (on the current batch); one all-reduce per step gives both ranks
both gradients, and they take the same update. Every rank passes the closure
of the *whole* current batch (with 2m ranks: its shard, rank r and rank r + m
reading the same shard). The trajectory equals single-process SAMPa.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from common import batch, make_model, setup
from sam_fast import SAMPa


def main() -> None:
    rank, world, device = setup()
    half = world // 2
    model = make_model(device)
    opt = SAMPa(model.parameters(), torch.optim.SGD, rho=0.1, lam=0.2, lr=0.1, momentum=0.9,
                parallel=True)
    loss_fn = torch.nn.CrossEntropyLoss()
    for step in range(20):
        x, y = batch(step, rank % half, half, device)

        def closure(x=x, y=y):
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        if rank == 0 and step % 5 == 0:
            print(f"call {step:3d}  loss at y {loss.item():.4f}  updates {opt.updates}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
