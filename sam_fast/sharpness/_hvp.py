"""Hessian-vector products of the data's mean loss, by double backward.

For each batch the gradient is built once with ``create_graph=True``; then
every probe of a block is one backward through that gradient graph. The block
goes through in one call with autograd's ``is_grads_batched=True`` (vmap over
the backward, the machinery of ``torch.func``) and falls back to one backward
per probe where a backward formula has no batching rule.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import Tensor, nn

from ._data import Data, LossFn, mean_loss


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(flat: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    out, start = [], 0
    for p in like:
        out.append(flat[start:start + p.numel()].view_as(p))
        start += p.numel()
    return out


class HessianVectorProduct:
    """``V -> V H`` for a block of flat vectors ``V`` (``[k, n]``), ``H`` the Hessian
    of the mean loss over all of ``data`` with respect to ``params``.

    Counts what it costs: ``passes`` (sweeps over the data) and ``hvps``.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: Data,
                 params: Sequence[Tensor], *, batched: bool = True) -> None:
        self.model, self.loss_fn, self.data, self.params = model, loss_fn, data, list(params)
        self.numel = sum(p.numel() for p in self.params)
        self.batched = batched
        self.passes = 0
        self.hvps = 0

    def __call__(self, vs: Tensor) -> Tensor:
        if vs.dim() != 2 or vs.shape[1] != self.numel:
            raise ValueError(f"expected a [k, {self.numel}] block of vectors, got {tuple(vs.shape)}")
        total = torch.zeros_like(vs)
        count = 0
        for batch, n in self.data:
            loss = mean_loss(self.model, self.loss_fn, batch)
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True,
                                        materialize_grads=True)
            flat_grad = flatten(grads)
            if flat_grad.requires_grad:  # else the loss is linear in params: H = 0
                total.add_(self._products(flat_grad, vs), alpha=n)
            count += n
        self.passes += 1
        self.hvps += vs.shape[0]
        return total / count

    def _products(self, flat_grad: Tensor, vs: Tensor) -> Tensor:
        """``H_b v`` for each row ``v`` of ``vs``, through one batch's gradient graph."""
        if self.batched and vs.shape[0] > 1:
            try:
                with warnings.catch_warnings():
                    # vmap's per-op fallback warns; it is still correct, only slower.
                    warnings.filterwarnings("ignore", message=".*performance drop.*")
                    rows = torch.autograd.grad(flat_grad, self.params, grad_outputs=vs,
                                               retain_graph=True, is_grads_batched=True,
                                               allow_unused=True, materialize_grads=True)
                return torch.cat([r.reshape(vs.shape[0], -1) for r in rows], dim=1)
            except RuntimeError:
                self.batched = False  # some backward has no batching rule: loop from now on
        out = []
        for v in vs:
            rows = torch.autograd.grad(flat_grad, self.params, grad_outputs=v, retain_graph=True,
                                       allow_unused=True, materialize_grads=True)
            out.append(flatten(rows))
        return torch.stack(out)
