"""A float64 oracle written from the equations of docs/design.md section 2.

Nothing here calls sam_fast or torch.optim: the base optimizers are the
textbook formulas, the gradients come from a float64 copy of the model
evaluated functionally at any point.
"""

from __future__ import annotations

import copy
import math

import torch
from torch.func import functional_call

F64 = torch.float64


class Problem:
    """Gradients of the loss on batch ``k`` at arbitrary float64 weights."""

    def __init__(self, model: torch.nn.Module, batches, loss_of):
        self.model = copy.deepcopy(model).to(F64)
        self.names = [n for n, _ in self.model.named_parameters()]
        self.batches = [(x.to(F64), y) for x, y in batches]
        self.loss_of = loss_of

    def initial(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]

    def grad(self, w: list[torch.Tensor], k: int) -> list[torch.Tensor]:
        leaves = [t.detach().clone().requires_grad_() for t in w]
        x, y = self.batches[k]
        out = functional_call(self.model, dict(zip(self.names, leaves)), (x,))
        loss = torch.nn.functional.cross_entropy(out, y)
        return [g.detach() for g in torch.autograd.grad(loss, leaves)]


class SGD64:
    def __init__(self, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        self.lr, self.mu, self.damp, self.wd, self.nesterov = lr, momentum, dampening, weight_decay, nesterov
        self.buf = None

    def step(self, w, g, commit=True):
        d = [gi + self.wd * wi for wi, gi in zip(w, g)]
        if self.mu != 0:
            if self.buf is None:
                buf = [di.clone() for di in d]
            else:
                buf = [self.mu * b + (1 - self.damp) * di for b, di in zip(self.buf, d)]
            d = [di + self.mu * b for di, b in zip(d, buf)] if self.nesterov else buf
            if commit:
                self.buf = buf
        return [wi - self.lr * di for wi, di in zip(w, d)]


class AdamW64:
    def __init__(self, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.t, self.m, self.v = 0, None, None

    def step(self, w, g, commit=True):
        t = self.t + 1
        m0 = self.m or [torch.zeros_like(x) for x in w]
        v0 = self.v or [torch.zeros_like(x) for x in w]
        m = [self.b1 * a + (1 - self.b1) * gi for a, gi in zip(m0, g)]
        v = [self.b2 * a + (1 - self.b2) * gi * gi for a, gi in zip(v0, g)]
        if commit:
            self.t, self.m, self.v = t, m, v
        out = []
        for wi, mi, vi in zip(w, m, v):
            m_hat = mi / (1 - self.b1**t)
            v_hat = vi / (1 - self.b2**t)
            out.append(wi * (1 - self.lr * self.wd) - self.lr * m_hat / (v_hat.sqrt() + self.eps))
        return out


def _norm(ts) -> torch.Tensor:
    return torch.sqrt(sum((t * t).sum() for t in ts))


def sam_trajectory(problem, base, steps, rho, adaptive=False, eta=0.0, normalize=True, eps=1e-12):
    """Weights after each of ``steps`` SAM steps, the step-k gradients on batch k."""
    w = problem.initial()
    out = []
    for k in range(steps):
        g = problem.grad(w, k)
        weight = [(wi.abs() + eta) if adaptive else torch.ones_like(wi) for wi in w]
        norm = _norm([a * gi for a, gi in zip(weight, g)])
        scale = rho / (norm + eps) if normalize else rho
        e = [scale * a * a * gi for a, gi in zip(weight, g)]
        g_perturbed = problem.grad([wi + ei for wi, ei in zip(w, e)], k)
        w = base.step(w, g_perturbed)
        out.append(w)
    return out


def sampa_trajectory(problem, base, calls, rho, lam, eps=1e-12):
    """Weights after each SAMPa call (calls - 1 updates), with docs/design.md's batch pairing."""
    x = problem.initial()
    g_y = problem.grad(x, 0)
    out = [x]
    for k in range(1, calls):
        scale = rho / (_norm(g_y) + eps)
        x_tilde = [xi + scale * gi for xi, gi in zip(x, g_y)]
        y_new = base.step(x, g_y, commit=False)
        g_tilde = problem.grad(x_tilde, k - 1)
        g_y = problem.grad(y_new, k)
        combined = [(1 - lam) * a + lam * b for a, b in zip(g_tilde, g_y)]
        x = base.step(x, combined)
        out.append(x)
    return out


def max_rel_diff(a, b) -> float:
    """max over tensors of ||a - b||_inf / max(||b||_inf, tiny)."""
    worst = 0.0
    for x, y in zip(a, b):
        x, y = x.double(), y.double()
        denom = max(y.abs().max().item(), 1e-30)
        worst = max(worst, (x - y).abs().max().item() / denom)
    return worst if math.isfinite(worst) else float("inf")


# -- per-tensor textbook steps, every option of torch.optim.SGD / Adam / AdamW ------------------
# (for tests that draw options and skip parameters: each tensor keeps its own state, and a
# tensor without a gradient is not stepped, as in torch.optim)


def sgd_step(w, g, state, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
             maximize=False):
    """One SGD step on one float64 tensor; ``state`` (a dict) holds its momentum buffer."""
    d = -g if maximize else g
    d = d + weight_decay * w
    if momentum != 0:
        buf = state.get("momentum_buffer")
        buf = d.clone() if buf is None else momentum * buf + (1 - dampening) * d
        state["momentum_buffer"] = buf
        d = d + momentum * buf if nesterov else buf
    return w - lr * d


def adam_step(w, g, state, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
              maximize=False, decoupled=False):
    """One Adam (``decoupled=False``: L2 in the gradient) or AdamW step on one float64 tensor;
    ``state`` holds its own step count and moments."""
    b1, b2 = betas
    g = -g if maximize else g
    if decoupled:
        w = w * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * w
    t = state.get("step", 0) + 1
    m = b1 * state.get("exp_avg", torch.zeros_like(w)) + (1 - b1) * g
    v = b2 * state.get("exp_avg_sq", torch.zeros_like(w)) + (1 - b2) * g * g
    state.update(step=t, exp_avg=m, exp_avg_sq=v)
    if amsgrad:
        v = torch.maximum(state.get("max_exp_avg_sq", torch.zeros_like(w)), v)
        state["max_exp_avg_sq"] = v
    m_hat = m / (1 - b1**t)
    v_hat = v / (1 - b2**t)
    return w - lr * m_hat / (v_hat.sqrt() + eps)
