"""SAM with FSDP2 (``fully_shard``): the optimizer sees DTensor shards.

    torchrun --nproc_per_node 2 examples/distributed/fsdp2_sam.py

The fused ops run on each rank's local shards; the gradient norm is completed
with one small all-reduce of the local sums of squares.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from common import batch, make_model, setup
from sam_fast import SAM


def main() -> None:
    rank, world, device = setup()
    model = make_model(device)
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer)
    fully_shard(model)
    opt = SAM(model.parameters(), torch.optim.AdamW, rho=0.05, lr=1e-3, weight_decay=1e-2)
    loss_fn = torch.nn.CrossEntropyLoss()
    for step in range(20):
        x, y = batch(step, rank, world, device)
        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.second_step(zero_grad=True)
        if rank == 0 and step % 5 == 0:
            print(f"step {step:3d}  loss at w+e {loss.item():.4f}  "
                  f"|g| {opt.last_grad_norm.item():.4f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
