"""The per-parameter SAM loop of the reference implementation (``davda54/sam``),
written here from its published algorithm: one norm per tensor, clone, add,
copy back, then the base optimizer's own step.

It is the baseline the tests compare against and the "reference loop"
contender of the benchmarks; it is not used by the optimizers.
"""

from __future__ import annotations

import torch


class ReferenceSAM(torch.optim.Optimizer):
    """SAM as the reference implementation computes it, plus ASAM's ``eta`` and USAM."""

    def __init__(self, params, base_optimizer, rho=0.05, adaptive=False, eta=0.0,
                 normalize=True, perturb_eps=1e-12, **kwargs):
        defaults = dict(rho=rho, adaptive=adaptive, **kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.eta, self.normalize, self.perturb_eps = eta, normalize, perturb_eps

    def _weight(self, group, p):
        return (torch.abs(p) + self.eta) if group["adaptive"] else 1.0

    @torch.no_grad()
    def first_step(self):
        per_tensor = [
            (self._weight(group, p) * p.grad).norm(p=2)
            for group in self.param_groups for p in group["params"] if p.grad is not None
        ]
        norm = torch.norm(torch.stack(per_tensor), p=2)
        for group in self.param_groups:
            scale = group["rho"] / (norm + self.perturb_eps) if self.normalize else group["rho"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                w = self._weight(group, p)
                p.add_(w * w * p.grad * scale if group["adaptive"] else p.grad * scale)
        self.zero_grad()

    @torch.no_grad()
    def second_step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if "old_p" in self.state[p]:
                    p.data.copy_(self.state[p].pop("old_p"))
        self.base_optimizer.step()
        self.zero_grad()
