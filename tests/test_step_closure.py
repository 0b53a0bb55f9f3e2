"""``step(closure)`` in torch.optim's convention, called step after step.

A closure that zeroes the gradients itself (Lightning's automatic optimization,
LBFGS-style code) and no ``zero_grad`` between steps: each ``step`` must see "no
gradient yet" and run the closure for the first pass too. The gradients a step
leaves would be those at ``w + e``; taken for the next first pass they would
perturb along a stale direction and skip a forward/backward.
"""

from __future__ import annotations

import torch

import sam_fast
from models import batches, loss_of, small_cnn


def test_consecutive_closure_steps_equal_the_explicit_loop():
    data = batches(4)
    model = small_cnn()
    opt = sam_fast.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    first_losses = []
    for batch in data:
        def closure(batch=batch):
            loss = loss_of(model, batch)
            opt.zero_grad()  # inside the closure, as Lightning's
            loss.backward()
            return loss
        first_losses.append(opt.step(closure).item())
        assert all(p.grad is None for p in model.parameters())

    ref = small_cnn()
    ref_opt = sam_fast.SAM(ref.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    want_losses = []
    for batch in data:
        loss = loss_of(ref, batch)
        loss.backward()
        want_losses.append(loss.item())
        ref_opt.first_step(zero_grad=True)
        loss_of(ref, batch).backward()
        ref_opt.second_step(zero_grad=True)
    assert first_losses == want_losses
    for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True):
        # BatchNorm statistics included: both run two training forwards per step
        assert torch.equal(a, b)
