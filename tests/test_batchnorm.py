"""sam_fast.batchnorm: the second SAM pass leaves BatchNorm's running statistics alone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sam_fast
from models import batches, loss_of, small_cnn

BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _model(momentum: float | None, sync: bool) -> nn.Module:
    model = small_cnn()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    if sync:
        # SyncBatchNorm without a process group normalises like BatchNorm (no sync).
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.train()


def _stats(model: nn.Module) -> list[torch.Tensor]:
    return [getattr(m, name).clone() for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) for name in BUFFERS]


def _sam_step(model, opt, batch, style: str | None) -> None:
    loss_of(model, batch).backward()
    opt.first_step(zero_grad=True)
    if style == "functions":
        sam_fast.disable_running_stats(model)
        loss_of(model, batch).backward()
        sam_fast.enable_running_stats(model)
    elif style == "context":
        with sam_fast.frozen_running_stats(model):
            loss_of(model, batch).backward()
    else:
        loss_of(model, batch).backward()
    opt.second_step(zero_grad=True)


@pytest.mark.parametrize("sync", [False, True], ids=["bn", "syncbn"])
@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
@pytest.mark.parametrize("style", ["functions", "context"])
def test_stats_are_those_of_the_first_pass(style, momentum, sync):
    """After each SAM step, running_mean/var and num_batches_tracked equal (bit for bit)
    those of one plain training forward of the pre-step model on that batch. With
    momentum=None this needs the counter kept: the next step's average divides by it."""
    model = _model(momentum, sync)
    opt = sam_fast.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
    for batch in batches(3):
        ref = copy.deepcopy(model)
        with torch.no_grad():
            ref(batch[0])
        _sam_step(model, opt, batch, style)
        for got, want in zip(_stats(model), _stats(ref), strict=True):
            assert torch.equal(got, want)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert m.momentum is momentum or m.momentum == momentum
            assert m.track_running_stats is True


@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
def test_without_the_helper_the_stats_differ(momentum):
    """The comparison above can fail: an unfrozen second pass moves the statistics."""
    model = _model(momentum, False)
    opt = sam_fast.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    batch = batches(1)[0]
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref(batch[0])
    _sam_step(model, opt, batch, None)
    assert not all(torch.equal(a, b) for a, b in zip(_stats(model), _stats(ref)))


def test_settings_restored_exactly():
    model = nn.Sequential(nn.BatchNorm1d(3, momentum=None), nn.BatchNorm1d(3, momentum=0.3),
                          nn.BatchNorm1d(3, track_running_stats=False),
                          nn.SyncBatchNorm(3, momentum=None))
    before = [(m.momentum, m.track_running_stats) for m in model]
    sam_fast.disable_running_stats(model)
    assert all(m.momentum == 0 and not m.track_running_stats for m in model)
    assert [m.backup_momentum for m in model] == [b[0] for b in before]  # reference's name
    sam_fast.disable_running_stats(model)  # twice: the first saved settings survive
    sam_fast.enable_running_stats(model)
    assert [(m.momentum, m.track_running_stats) for m in model] == before
    assert model[0].momentum is None and model[3].momentum is None
    assert not hasattr(model[0], "backup_momentum")
    sam_fast.enable_running_stats(model)  # not frozen: a no-op
    assert [(m.momentum, m.track_running_stats) for m in model] == before


def test_context_manager_restores_on_error_and_nests():
    model = nn.Sequential(nn.BatchNorm1d(3, momentum=None), nn.Linear(3, 3))
    with pytest.raises(ValueError, match="boom"):
        with sam_fast.frozen_running_stats(model) as m:
            assert m is model and model[0].momentum == 0
            raise ValueError("boom")
    assert model[0].momentum is None and model[0].track_running_stats
    sam_fast.disable_running_stats(model)
    with sam_fast.frozen_running_stats(model):
        pass
    assert model[0].momentum == 0  # the outer freeze still holds
    sam_fast.enable_running_stats(model)
    assert model[0].momentum is None


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_frozen_forward_outputs(training):
    """Frozen, training mode still normalises with the batch statistics and eval mode
    with the running ones (outputs equal to an unfrozen copy's); the statistics stay put."""
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(4)
    x = torch.randn(8, 4)
    with torch.no_grad():
        bn(x * 3 + 1)  # running statistics away from their initial values
        bn.train(training)
        want = copy.deepcopy(bn)(x)
        stats = _stats(bn)
        with sam_fast.frozen_running_stats(bn):
            got = bn(x)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(_stats(bn), stats))


def test_non_finite_batch_leaves_stats_finite():
    """momentum=0 alone would write 0 * inf = NaN into the running statistics."""
    bn = nn.BatchNorm1d(4).train()
    stats = _stats(bn)
    with torch.no_grad(), sam_fast.frozen_running_stats(bn):
        bn(torch.full((8, 4), float("inf")))
    assert all(torch.equal(a, b) for a, b in zip(_stats(bn), stats))


def test_refuses_non_modules():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        sam_fast.disable_running_stats([nn.BatchNorm1d(2)])  # type: ignore[arg-type]
