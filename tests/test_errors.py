"""Misuse gets a clear error, and a failure leaves the weights as they were."""

from __future__ import annotations

import pytest
import torch

from conftest import params_of
from models import batches, loss_of, make_closure, small_cnn
from sam_fast import SAM, SAMPa


def _sam(model=None, **kw):
    model = model or small_cnn(0)
    return model, SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **kw)


def test_second_step_without_first_step():
    model, opt = _sam()
    loss_of(model, batches(1)[0]).backward()
    with pytest.raises(RuntimeError, match="second_step\\(\\) called without first_step\\(\\)"):
        opt.second_step()


def test_first_step_twice():
    model, opt = _sam()
    loss_of(model, batches(1)[0]).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="first_step\\(\\) called twice"):
        opt.first_step()


def test_first_step_without_gradients():
    _, opt = _sam()
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        opt.first_step()


def test_step_without_closure():
    model, opt = _sam()
    loss_of(model, batches(1)[0]).backward()
    with pytest.raises(RuntimeError, match="requires a closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="requires a closure"):
        SAMPa(model.parameters(), lr=0.1).step()


@pytest.mark.parametrize("rho", [-0.1, float("nan")])
def test_negative_rho(rho):
    with pytest.raises(ValueError, match="Invalid rho"):
        SAM(small_cnn(0).parameters(), torch.optim.SGD, rho=rho, lr=0.1)
    with pytest.raises(ValueError, match="Invalid rho"):
        SAMPa(small_cnn(0).parameters(), rho=rho, lr=0.1)
    with pytest.raises(ValueError, match="Invalid rho"):
        SAM([{"params": list(small_cnn(0).parameters()), "rho": rho}], torch.optim.SGD, lr=0.1)


def test_bad_options():
    params = list(small_cnn(0).parameters())
    with pytest.raises(ValueError, match="Invalid lam"):
        SAMPa(params, lam=1.5, lr=0.1)
    with pytest.raises(ValueError, match="Invalid eta"):
        SAM(params, torch.optim.SGD, eta=-1.0, lr=0.1)
    with pytest.raises(ValueError, match="backend must be one of"):
        SAM(params, torch.optim.SGD, lr=0.1, backend="fast")
    with pytest.raises(TypeError, match="base_optimizer must be"):
        SAM(params, "SGD", lr=0.1)
    with pytest.raises(TypeError, match="once"):
        SAM(params, torch.optim.SGD, lr=0.1, eps=1e-6, perturb_eps=1e-9)


def test_base_instance_over_other_params():
    a, b = small_cnn(0), small_cnn(1)
    with pytest.raises(ValueError, match="params must be the parameters"):
        SAM(a.parameters(), torch.optim.SGD(b.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="already built"):
        SAM(a.parameters(), torch.optim.SGD(a.parameters(), lr=0.1), lr=0.5)


def test_sparse_gradients():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = SAM(emb.parameters(), torch.optim.SGD, lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.first_step()
    assert not opt._perturbed


def test_complex_parameters():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(RuntimeError, match="complex"):
        SAM([p], torch.optim.SGD, lr=0.1)


def test_explicit_backend_that_cannot_run_here():
    with pytest.raises(RuntimeError, match="cannot serve parameters on cpu|not registered"):
        SAM(small_cnn(0).parameters(), torch.optim.SGD, lr=0.1, backend="cuda")


def test_sam_closure_raising_restores_the_weights():
    model, opt = _sam()
    batch = batches(1)[0]
    loss_of(model, batch).backward()
    before = params_of(model)

    def failing():
        loss_of(model, batch).backward()
        raise KeyError("data loader died")

    with pytest.raises(KeyError, match="data loader died"):
        opt.step(failing)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    # and the optimizer is usable again
    opt.zero_grad()
    loss_of(model, batch).backward()
    opt.step(make_closure(model, batch))


@pytest.mark.parametrize("fail_in", ["x_tilde", "y"])
def test_sampa_closure_raising_restores_x_and_keeps_state(fail_in):
    data = batches(4, dtype=torch.float64)
    model = small_cnn(0, torch.float64)
    twin = small_cnn(0, torch.float64)
    opt = SAMPa(model.parameters(), lr=0.05, momentum=0.9, backend="torch")
    opt_twin = SAMPa(twin.parameters(), lr=0.05, momentum=0.9, backend="torch")
    for batch in data[:2]:
        opt.step(make_closure(model, batch))
        opt_twin.step(make_closure(twin, batch))
    before = params_of(model)

    def failing():
        raise RuntimeError("boom")

    if fail_in == "x_tilde":
        with pytest.raises(RuntimeError, match="boom"):
            opt.step(make_closure(model, data[2]), previous_closure=failing)
        opt._pending_closure = make_closure(model, data[1])
    else:
        with pytest.raises(RuntimeError, match="boom"):
            opt.step(failing)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    # nothing was lost: the next steps continue exactly like the twin's
    for batch in data[2:]:
        opt.step(make_closure(model, batch))
        opt_twin.step(make_closure(twin, batch))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_state_dict_between_first_and_second_step():
    model, opt = _sam()
    loss_of(model, batches(1)[0]).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="between first_step\\(\\) and second_step\\(\\)"):
        opt.state_dict()


def test_sampa_after_load_needs_the_previous_closure():
    data = batches(3)
    model = small_cnn(0)
    opt = SAMPa(model.parameters(), lr=0.05)
    opt.step(make_closure(model, data[0]))
    fresh = SAMPa(model.parameters(), lr=0.05)
    fresh.load_state_dict(opt.state_dict())
    with pytest.raises(RuntimeError, match="previous_closure"):
        fresh.step(make_closure(model, data[1]))
