"""The host side of a step keeps no per-step garbage: over 50 steps of a 1000-tensor
model with gradients re-created every pass (as backward() does), the library's
host-side memory grows by less than 5 MB, and a new plan replaces the old one."""

from __future__ import annotations

import gc
import tracemalloc

import pytest
import torch

from sam_fast import SAM, SAMPa, dispatch

BACKENDS = [b for b in ("torch", "cpp", "triton") if dispatch.why_unavailable(b, "cpu") is None]


def _fresh_grads(params):
    for p in params:
        p.grad = torch.ones_like(p)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["sam", "sampa"])
def test_fifty_steps_of_a_thousand_tensors_keep_no_garbage(backend, kind):
    # Triton's interpreter runs every program of a launch in Python (seconds per step at
    # 1000 tensors): a smaller model there; its own caches are bounded in bytes and
    # tested in test_triton_ops.
    n, steps = (100, 10) if backend == "triton" else (1000, 50)
    params = [torch.nn.Parameter(torch.randn(2)) for _ in range(n)]
    if kind == "sam":
        opt = SAM(params, torch.optim.SGD, lr=1e-3, momentum=0.9, backend=backend)

        def step():
            _fresh_grads(params)
            opt.first_step(zero_grad=True)
            _fresh_grads(params)
            opt.second_step(zero_grad=True)
    else:
        opt = SAMPa(params, torch.optim.SGD, lr=1e-3, momentum=0.9, backend=backend)

        def step():
            opt.step(lambda: _fresh_grads(params))

    for _ in range(3):  # plan, buffers, state
        step()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(steps):
            step()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 5 * 2**20, f"host memory grew by {grown / 2**20:.1f} MB over {steps} steps"


def test_a_new_layout_replaces_the_plan():
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(4)]
    opt = SAM(params, torch.optim.SGD, lr=0.1, backend="torch")
    _fresh_grads(params)
    opt.first_step(zero_grad=True)
    _fresh_grads(params)
    opt.second_step(zero_grad=True)
    first = opt._step_state.plan
    extra = torch.nn.Parameter(torch.randn(5))
    opt.add_param_group({"params": [extra]})
    _fresh_grads(params + [extra])
    opt.first_step(zero_grad=True)
    assert opt._step_state.plan is not first
    assert sum(len(b.params) for b in opt._step_state.plan.buckets) == 5
    _fresh_grads(params + [extra])
    opt.second_step(zero_grad=True)
    # model.to(): new storage for the same Parameter objects is a new layout too
    params[0].data = params[0].data.to(torch.float64)
    before = opt._step_state.plan
    _fresh_grads(params + [extra])
    opt.first_step(zero_grad=True)
    assert opt._step_state.plan is not before
    assert {b.dtype for b in opt._step_state.plan.buckets} == {torch.float32, torch.float64}
    opt.restore()
