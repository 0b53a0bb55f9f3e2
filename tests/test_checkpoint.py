"""state_dict() / load_state_dict(): a resumed run continues bit for bit."""

from __future__ import annotations

import io

import pytest
import torch

from conftest import run_sam
from models import batches, make_closure, small_cnn
from sam_fast import SAM, SAMPa

BASES = [
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)),
    (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2, amsgrad=True)),
    (torch.optim.RMSprop, dict(lr=1e-3, momentum=0.5)),  # fallback path
]
IDS = [b.__name__ for b, _ in BASES]


def _roundtrip(obj):
    """Through torch.save/torch.load, as a checkpoint on disk would go."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _assert_same_state(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    for x, y in zip(a.buffers(), b.buffers()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("base,kw", BASES, ids=IDS)
def test_sam_resume_is_bit_for_bit(base, kw):
    data = batches(8)
    straight = small_cnn(0)
    opt = SAM(straight.parameters(), base, rho=0.1, adaptive=True, eta=0.01, **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for batch in data:
        run_sam(straight, opt, [batch])
        sched.step()

    first = small_cnn(0)
    opt1 = SAM(first.parameters(), base, rho=0.1, adaptive=True, eta=0.01, **kw)
    sched1 = torch.optim.lr_scheduler.StepLR(opt1, step_size=2, gamma=0.5)
    for batch in data[:4]:
        run_sam(first, opt1, [batch])
        sched1.step()
    checkpoint = _roundtrip({"model": first.state_dict(), "opt": opt1.state_dict(),
                             "sched": sched1.state_dict()})

    resumed = small_cnn(7)  # different initial weights: everything must come from the file
    opt2 = SAM(resumed.parameters(), base, rho=0.3, **kw)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=2, gamma=0.5)
    resumed.load_state_dict(checkpoint["model"])
    opt2.load_state_dict(checkpoint["opt"])
    sched2.load_state_dict(checkpoint["sched"])
    assert opt2.param_groups is opt2.base_optimizer.param_groups
    assert opt2.param_groups[0]["rho"] == 0.1 and opt2.param_groups[0]["adaptive"]
    for batch in data[4:]:
        run_sam(resumed, opt2, [batch])
        sched2.step()
    _assert_same_state(straight, resumed)


@pytest.mark.parametrize("base,kw", BASES[:2], ids=IDS[:2])
@pytest.mark.parametrize("lam", [0.0, 0.2])
def test_sampa_resume_is_bit_for_bit(base, kw, lam):
    data = batches(9)
    straight = small_cnn(0)
    opt = SAMPa(straight.parameters(), base, rho=0.1, lam=lam, **kw)
    for batch in data:
        opt.step(make_closure(straight, batch))

    first = small_cnn(0)
    opt1 = SAMPa(first.parameters(), base, rho=0.1, lam=lam, **kw)
    for batch in data[:5]:
        opt1.step(make_closure(first, batch))
    checkpoint = _roundtrip({"model": first.state_dict(), "opt": opt1.state_dict()})

    resumed = small_cnn(3)
    opt2 = SAMPa(resumed.parameters(), base, rho=0.1, lam=lam, **kw)
    resumed.load_state_dict(checkpoint["model"])
    opt2.load_state_dict(checkpoint["opt"])
    assert opt2.updates == 4
    # the closure of the batch before the checkpoint is re-created from the data
    opt2.step(make_closure(resumed, data[5]), previous_closure=make_closure(resumed, data[4]))
    for batch in data[6:]:
        opt2.step(make_closure(resumed, batch))
    assert opt2.updates == opt.updates == 8
    _assert_same_state(straight, resumed)


def test_state_dict_is_a_torch_optimizer_state_dict():
    """The base optimizer's layout: a plain torch.optim optimizer can load it."""
    model = small_cnn(0)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    run_sam(model, opt, batches(2))
    state = opt.state_dict()
    assert set(state) == {"state", "param_groups", "sam_fast"}
    plain = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    plain.load_state_dict({k: v for k, v in state.items() if k != "sam_fast"})
    assert plain.param_groups[0]["lr"] == 0.1
    assert torch.equal(plain.state[next(model.parameters())]["momentum_buffer"],
                       opt.base_optimizer.state[next(model.parameters())]["momentum_buffer"])
