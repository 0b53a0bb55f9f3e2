"""SAM on a DistributedDataParallel model.

    torchrun --nproc_per_node 2 examples/distributed/ddp_sam.py [--local-ascent]

Global ascent (default): both backwards all-reduce, every rank perturbs along
the same global gradient: the same trajectory as one process on the whole
batch. Local ascent: the first forward/backward runs under ``no_sync()``, so
each rank perturbs along its own gradient and the step saves one all-reduce.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from common import batch, make_model, setup
from sam_fast import SAM
from sam_fast.distributed import local_ascent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local-ascent", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    rank, world, device = setup()
    model = DistributedDataParallel(make_model(device))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    for step in range(args.steps):
        x, y = batch(step, rank, world, device)
        if args.local_ascent:
            with local_ascent(model):                 # no gradient all-reduce here
                loss_fn(model(x), y).backward()
        else:
            loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss = loss_fn(model(x), y)
        loss.backward()                               # all-reduced as usual
        opt.second_step(zero_grad=True)
        if rank == 0 and step % 5 == 0:
            print(f"step {step:3d}  loss at w+e {loss.item():.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
