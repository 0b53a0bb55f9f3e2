"""torch.amp.GradScaler with SAM: the README's recipe, exactness, and planted infs.

GradScaler's scale is a power of two, so scaling and unscaling are exact in
float32 (away from overflow/underflow): a scaled run without overflow must
equal the unscaled run bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from conftest import params_of, run_sam
from models import batches, loss_of, small_cnn
from sam_fast import SAM

BASES = [
    (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
    (torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2)),
    (torch.optim.RMSprop, dict(lr=1e-3)),  # no fused op: the fallback path
]
IDS = [b.__name__ for b, _ in BASES]


def amp_step(model, opt, scaler, batch, plant_inf=(False, False)):
    """The README's recipe (autocast omitted: on the CPU it would change the numerics
    this test compares; the scaler's logic is the same)."""
    scaler.scale(loss_of(model, batch)).backward()
    if plant_inf[0]:
        next(model.parameters()).grad.view(-1)[0] = float("inf")
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(loss_of(model, batch)).backward()
    if plant_inf[1]:
        next(model.parameters()).grad.view(-1)[0] = float("inf")
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


@pytest.mark.parametrize("base,kw", BASES, ids=IDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_scaled_run_equals_unscaled_run(base, kw, normalize):
    data = batches(6)
    a, b = small_cnn(0), small_cnn(0)
    plain = SAM(a.parameters(), base, normalize=normalize, **kw)
    scaled = SAM(b.parameters(), base, normalize=normalize, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=3)
    run_sam(a, plain, data)
    for batch in data:
        amp_step(b, scaled, scaler, batch)
    assert scaler.get_scale() == 2.0**14  # grew twice: no step was skipped
    for p, q in zip(a.parameters(), b.parameters()):
        if normalize:
            # rho / (S * (||g|| + eps)) is rho / (||g|| + eps) / S exactly
            assert torch.equal(p, q)
        else:  # USAM: rho / S * (S g) rounds once more than rho * g
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("base,kw", BASES, ids=IDS)
@pytest.mark.parametrize("where", [(True, True), (False, True), (True, False)],
                         ids=["both-passes", "second-pass", "first-pass"])
def test_planted_inf_never_reaches_the_weights(base, kw, where):
    model = small_cnn(0)
    opt = SAM(model.parameters(), base, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    data = batches(3)
    amp_step(model, opt, scaler, data[0])  # some optimizer state to protect
    weights = params_of(model)
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v
             for p in model.parameters() for k, v in opt.base_optimizer.state[p].items()}
    amp_step(model, opt, scaler, data[1], plant_inf=where)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if where[1]:
        # GradScaler saw the inf: the step is skipped, the weights are exactly as before
        assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
        after = {k: v for p in model.parameters() for k, v in opt.base_optimizer.state[p].items()}
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(after[key]), torch.as_tensor(value)), key
        assert scaler.get_scale() == 2.0**9
    else:
        # only the first pass overflowed: the perturbation was skipped, the base step
        # ran on the unperturbed point's gradients
        assert opt.perturbation_skipped.item()
        assert not all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


def test_step_without_closure_after_first_step_is_second_step():
    """GradScaler.step(opt) calls opt.step() with no closure."""
    a, b = small_cnn(0), small_cnn(0)
    opt_a = SAM(a.parameters(), torch.optim.SGD, lr=0.1)
    opt_b = SAM(b.parameters(), torch.optim.SGD, lr=0.1)
    run_sam(a, opt_a, batches(2))
    for batch in batches(2):
        loss_of(b, batch).backward()
        opt_b.first_step(zero_grad=True)
        loss_of(b, batch).backward()
        opt_b.step()
        opt_b.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("base,kw", BASES, ids=IDS)
def test_unscale_for_clipping_after_the_second_backward(base, kw):
    """scaler.unscale_(opt) between the second backward and scaler.step: the step must
    not unscale twice (GradScaler then passes grad_scale=None)."""
    data = batches(4)
    a, b = small_cnn(0), small_cnn(0)
    plain = SAM(a.parameters(), base, **kw)
    scaled = SAM(b.parameters(), base, **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for batch in data:
        loss_of(a, batch).backward()
        plain.first_step(zero_grad=True)
        loss_of(a, batch).backward()
        torch.nn.utils.clip_grad_norm_(a.parameters(), 0.5)
        plain.second_step(zero_grad=True)

        scaler.scale(loss_of(b, batch)).backward()
        scaled.first_step(zero_grad=True, grad_scaler=scaler)
        scaler.scale(loss_of(b, batch)).backward()
        scaler.unscale_(scaled)
        torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
        scaler.step(scaled)
        scaler.update()
        scaled.zero_grad()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
