"""torch.compile of a training step that calls the optimizer gives the eager results.

The optimizer's methods run eagerly inside compiled code (a graph break: see
``wrapper._eager``), so the comparison is bit for bit. Dynamo's ``eager`` and
``aot_eager`` backends trace and replay the user's function without changing its
numerics; inductor would also change the model's forward and backward.
"""

from __future__ import annotations

import pytest
import torch

from conftest import params_of
from models import batches, loss_of, make_closure, small_convnet
from sam_fast import SAM, SAMPa, dispatch

BACKENDS = [b for b in ("torch", "cpp", "triton") if dispatch.why_unavailable(b, "cpu") is None]


def _two_pass(model, opt, batch):
    loss_of(model, batch).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, batch).backward()
    opt.second_step(zero_grad=True)


def _closure_step(model, opt, batch):
    loss_of(model, batch).backward()
    loss = opt.step(make_closure(model, batch))
    opt.zero_grad()
    return loss


def _sampa_step(model, opt, batch):
    return opt.step(make_closure(model, batch))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
@pytest.mark.parametrize("step", [_two_pass, _closure_step, _sampa_step],
                         ids=["first-second", "step-closure", "sampa"])
def test_compiled_step_equals_eager(backend, compiler, step):
    torch._dynamo.reset()
    data = batches(3)
    runs = []
    for compiled in (False, True):
        model = small_convnet(0)
        make = SAMPa if step is _sampa_step else SAM
        opt = make(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, backend=backend)
        fn = torch.compile(step, backend=compiler) if compiled else step
        for batch in data:
            fn(model, opt, batch)
        assert not getattr(opt, "_perturbed", False)
        runs.append(params_of(model))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
