"""SAM in PyTorch Lightning: automatic optimization needs only the optimizer line.

    python examples/lightning_sam.py [--manual] [--steps 60]

A small MLP with BatchNorm learns a synthetic 4-class task on the CPU in a few
seconds. With automatic optimization Lightning calls ``opt.step(closure)``;
``sam_fast.SAM`` runs the closure at ``w`` and at ``w + e``. ``--manual`` shows
manual optimization with ``first_step``/``step`` and the BatchNorm helper.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
from torch import nn

import sam_fast


def make_data(n: int = 512, seed: int = 0) -> torch.utils.data.TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen)
    y = (x[:, 0] > 0).long() * 2 + (x[:, 1] > 0).long()
    return torch.utils.data.TensorDataset(x, y)


class Classifier(pl.LightningModule):
    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.SiLU(), nn.Linear(32, 4))
        self.automatic_optimization = not manual

    def loss(self, batch) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            # BatchNorm: the second pass (inside opt.step) updates the running
            # statistics too here; use manual optimization to keep them out.
            loss = self.loss(batch)
        else:
            opt = self.optimizers()
            loss = self.loss(batch)
            self.manual_backward(loss)
            opt.first_step(zero_grad=True)
            with sam_fast.frozen_running_stats(self.net):
                self.manual_backward(self.loss(batch))
            opt.step()  # after first_step this is second_step; Lightning counts the step
            opt.zero_grad()
            self.lr_schedulers().step()
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        # The only change from the SGD version of this module:
        opt = sam_fast.SAM(self.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manual", action="store_true", help="manual optimization")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Classifier(manual=args.manual)
    loader = torch.utils.data.DataLoader(make_data(), batch_size=32, shuffle=True)
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, loader)
    x, y = make_data(seed=1).tensors
    model.eval()
    with torch.no_grad():
        accuracy = (model.net(x).argmax(1) == y).float().mean().item()
    opt = trainer.optimizers[0]
    print(f"{trainer.global_step} steps, held-out accuracy {accuracy:.3f}, "
          f"last gradient norm {opt.last_grad_norm.item():.4f}")


if __name__ == "__main__":
    main()
