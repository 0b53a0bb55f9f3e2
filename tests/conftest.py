"""Shared fixtures: the small CNN problem and runners for SAM-style training loops."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from models import batches, loss_of, small_cnn  # noqa: F401  (re-exported for tests)


def params_of(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def run_sam(model, opt, data, *, use_closure: bool = False):
    """SAM the way users drive it: backward, first_step, backward, second_step."""
    losses = []
    for batch in data:
        loss_of(model, batch).backward()
        if use_closure:

            def closure(batch=batch):
                loss = loss_of(model, batch)
                loss.backward()
                return loss

            losses.append(opt.step(closure))
            opt.zero_grad()
        else:
            opt.first_step(zero_grad=True)
            losses.append(loss_of(model, batch))
            losses[-1].backward()
            opt.second_step(zero_grad=True)
    return losses


def clone_model(model: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(model)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On the lent GPU (SAM_FAST_EXPECT_GPU=1) a GPU test may not skip: that would
    hide exactly the work the machine was lent for."""
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and os.environ.get("SAM_FAST_EXPECT_GPU") == "1"
            and item.get_closest_marker("gpu") is not None):
        report.outcome = "failed"
        report.longrepr = f"GPU test skipped on a GPU machine: {report.longrepr}"
