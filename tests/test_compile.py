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


def _family_cases():
    from sam_fast import BSAM, ESAM, GSAM, WSAM, FriendlySAM, LookSAM, MomentumSAM

    return {
        "gsam": lambda ps, b: GSAM(ps, torch.optim.SGD, lr=0.05, momentum=0.9, backend=b),
        "wsam": lambda ps, b: WSAM(ps, torch.optim.SGD, lr=0.05, momentum=0.9, backend=b),
        "looksam": lambda ps, b: LookSAM(ps, torch.optim.SGD, k=2, lr=0.05, backend=b),
        "friendly": lambda ps, b: FriendlySAM(ps, torch.optim.AdamW, lr=1e-3, backend=b),
        "interval": lambda ps, b: SAM(ps, torch.optim.SGD, interval=2, lr=0.05, backend=b),
        "msam": lambda ps, b: MomentumSAM(ps, torch.optim.SGD, lr=0.05, momentum=0.9,
                                          backend=b),
        "esam": lambda ps, b: ESAM(ps, torch.optim.SGD, beta=0.5, gamma=0.5, seed=0, lr=0.05,
                                   backend=b),
        "bsam": lambda ps, b: BSAM(ps, num_data=64, lr=0.05, rho=0.01, seed=0, backend=b),
    }


def _msam_step(model, opt, batch):
    loss = opt.step(make_closure(model, batch))
    opt.zero_grad(set_to_none=True)
    return loss


def _esam_step(model, opt, batch):
    x, y = batch
    return opt.step(lambda idx=None: torch.nn.functional.cross_entropy(
        model(x if idx is None else x[idx]), y if idx is None else y[idx], reduction="none"))


# The optimizer runs eagerly inside the compiled step whatever its backend: every variant
# on the compiled CPU backend, two on the (slow) Triton interpreter.
_FAMILY_RUNS = [(b, n) for b in BACKENDS if b != "triton" for n in _family_cases()] + [
    ("triton", n) for n in ("gsam", "friendly") if "triton" in BACKENDS]


@pytest.mark.parametrize("backend,name", _FAMILY_RUNS)
def test_compiled_family_step_equals_eager(backend, name):
    """The family's steps (SAM steps and, for LookSAM and SAM every 2 steps, plain ones)
    inside a compiled training step: the optimizer runs eagerly, so bit for bit."""
    torch._dynamo.reset()
    data = batches(4)
    step = {"msam": _msam_step, "bsam": _msam_step, "esam": _esam_step}.get(name, _closure_step)
    runs = []
    for compiled in (False, True):
        model = small_convnet(0)
        opt = _family_cases()[name](model.parameters(), backend)
        fn = torch.compile(step, backend="aot_eager") if compiled else step
        for batch in data:
            fn(model, opt, batch)
        runs.append(params_of(model))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], params_of(small_convnet(0))))
