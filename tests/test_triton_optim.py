"""Whole optimizers on the ``triton`` backend against the ``torch`` backend, step for step.

SAM, ASAM and SAMPa with SGD and AdamW bases train the small CNN of
tests/models.py twice from the same weights on the same batches, once per
backend, and the parameters are compared after every step. They also run
through the events that re-allocate tensors (gradients set to None every
step, a checkpoint reload, a change of memory format), which must rebuild the
kernels' pointer tables rather than use stale ones.

Tolerance: both backends compute the same fp32 equations and differ only in
the order of roundings (a few fp32 ulps per fused op, ~1e-7 relative).
Training feeds those differences back through the next forward/backward;
over the 6 steps run here the largest relative difference measured on the
CPU was 3.3e-7 (1e-7 to 3e-7 typically). 5e-6 leaves more than an order of
magnitude of room, while a wrong formula, a stale table or a skipped tensor
shows at 1e-3 or more.
"""

from __future__ import annotations

import copy

import pytest
import torch

import oracle
from models import batches, loss_of, make_closure, small_cnn
from sam_fast import SAM, SAMPa, dispatch
from sam_fast.backends import triton_backend as tb

_CPU_REASON = dispatch.why_unavailable("triton", "cpu")
_CUDA_REASON = (dispatch.why_unavailable("triton", "cuda") if torch.cuda.is_available()
                else "no CUDA device")
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        _CPU_REASON is not None, reason=f"triton on CPU: {_CPU_REASON}")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        _CUDA_REASON is not None, reason=f"triton on CUDA: {_CUDA_REASON}")]),
]

STEPS = 6
TOL = 5e-6


@pytest.fixture(autouse=True)
def _no_tf32():
    """On a GPU, TF32 convolutions would round weights that differ in their last
    fp32 bit to different 10-bit mantissas and blow ulp-level differences up."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved

SGD_KW = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
NESTEROV_KW = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
ADAMW_KW = dict(lr=1e-3, weight_decay=1e-2)

SAM_CONFIGS = [
    ("sam-sgd", torch.optim.SGD, SGD_KW, {}),
    ("sam-nesterov", torch.optim.SGD, NESTEROV_KW, {}),
    ("sam-adamw", torch.optim.AdamW, ADAMW_KW, {}),
    ("sam-adam-amsgrad", torch.optim.Adam, dict(lr=1e-3, amsgrad=True, weight_decay=1e-3), {}),
    ("asam-sgd", torch.optim.SGD, SGD_KW, dict(rho=0.5, adaptive=True, eta=0.01)),
    ("asam-adamw", torch.optim.AdamW, ADAMW_KW, dict(rho=0.5, adaptive=True)),
]
SAMPA_CONFIGS = [
    ("sampa-sgd", torch.optim.SGD, SGD_KW),
    ("sampa-nesterov", torch.optim.SGD, NESTEROV_KW),
    ("sampa-adamw", torch.optim.AdamW, ADAMW_KW),  # not fused: perturb_/restore_ + AdamW.step
]


def _snapshot(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().cpu().clone() for p in model.parameters()]


def _data(device: str, n: int):
    return [(x.to(device), y.to(device)) for x, y in batches(n)]


def _sam_steps(model, opt, data) -> list[list[torch.Tensor]]:
    """SAM as users drive it; gradients are set to None after every pass (new tensors,
    possibly at new addresses, at every backward)."""
    out = []
    for batch in data:
        loss_of(model, batch).backward()
        opt.first_step(zero_grad=True)
        loss_of(model, batch).backward()
        opt.second_step(zero_grad=True)
        out.append(_snapshot(model))
    return out


def _assert_same_trajectory(ours, theirs, tol=TOL):
    assert len(ours) == len(theirs)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        diff = oracle.max_rel_diff(a, b)
        assert diff < tol, f"step {k}: triton and torch backends differ by {diff:.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,base,base_kw,sam_kw", SAM_CONFIGS,
                         ids=[c[0] for c in SAM_CONFIGS])
def test_sam_matches_the_torch_backend_step_for_step(device, name, base, base_kw, sam_kw):
    data = _data(device, STEPS)
    runs = {}
    for backend in ("triton", "torch"):
        model = small_cnn(0).to(device)
        opt = SAM(model.parameters(), base, backend=backend, **sam_kw, **base_kw)
        runs[backend] = _sam_steps(model, opt, data)
    _assert_same_trajectory(runs["triton"], runs["torch"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lam", [0.0, 0.2])
@pytest.mark.parametrize("name,base,kw", SAMPA_CONFIGS, ids=[c[0] for c in SAMPA_CONFIGS])
def test_sampa_matches_the_torch_backend_step_for_step(device, name, base, kw, lam):
    data = _data(device, STEPS + 1)
    runs = {}
    for backend in ("triton", "torch"):
        model = small_cnn(0).to(device)
        opt = SAMPa(model.parameters(), base, rho=0.1, lam=lam, backend=backend, **kw)
        trajectory, losses = [], []
        for batch in data:
            losses.append(opt.step(make_closure(model, batch)).item())
            trajectory.append(_snapshot(model))
        runs[backend] = (trajectory, losses)
    _assert_same_trajectory(runs["triton"][0], runs["torch"][0])
    for a, b in zip(runs["triton"][1], runs["torch"][1]):
        assert abs(a - b) <= TOL * abs(b)


@pytest.mark.parametrize("device", DEVICES)
def test_sam_is_as_accurate_as_the_torch_backend_against_the_float64_oracle(device):
    """Beyond agreeing with each other: both fp32 backends sit as close to the float64
    equations as fp32 allows (a shared error would pass the step-for-step tests)."""
    data = batches(STEPS)
    problem = oracle.Problem(small_cnn(0), data, loss_of)
    want = oracle.sam_trajectory(problem, oracle.SGD64(0.05, 0.9, 0, 5e-4), STEPS, rho=0.05)
    distance = {}
    for backend in ("triton", "torch"):
        model = small_cnn(0).to(device)
        opt = SAM(model.parameters(), torch.optim.SGD, backend=backend, **SGD_KW)
        got = _sam_steps(model, opt, [(x.to(device), y.to(device)) for x, y in data])
        distance[backend] = oracle.max_rel_diff(got[-1], want[-1])
    # fp32 vs float64 after 6 steps: ~1e-6; the floor keeps a lucky torch run
    # from making the bound unreasonably tight.
    assert distance["triton"] <= max(3 * distance["torch"], 5e-6), distance


@pytest.mark.parametrize("device", DEVICES)
def test_checkpoint_reload_rebuilds_the_tables(device):
    """load_state_dict puts the weights and optimizer state in new tensors (new
    addresses): the run continues exactly as an uninterrupted one."""
    data = _data(device, STEPS)
    model = small_cnn(0).to(device)
    reference = _sam_steps(model, SAM(model.parameters(), torch.optim.SGD, backend="torch",
                                      **SGD_KW), data)
    model = small_cnn(0).to(device)
    opt = SAM(model.parameters(), torch.optim.SGD, backend="triton", **SGD_KW)
    ours = []
    for k, batch in enumerate(data):
        ours += _sam_steps(model, opt, [batch])
        if k == 2:
            weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
            model = small_cnn(1).to(device)  # other weights, replaced by the checkpoint's
            model.load_state_dict(weights)
            opt = SAM(model.parameters(), torch.optim.SGD, backend="triton", **SGD_KW)
            opt.load_state_dict(state)
            misses = tb.CACHE.misses
    assert tb.CACHE.misses > misses, "the reloaded tensors need tables of their own"
    _assert_same_trajectory(ours, reference)


@pytest.mark.parametrize("device", DEVICES)
def test_new_gradients_every_step_upload_only_their_rows(device):
    """zero_grad(set_to_none=True) gives new gradient tensors at every backward (kept
    alive here, so their addresses are all new): a SAM step then builds exactly the
    two gradients' address rows, whatever the tensor count; the block maps and the
    parameters', backups' and buffers' rows are built in the first step only."""
    model = small_cnn(0).to(device)
    opt = SAM(model.parameters(), torch.optim.SGD, backend="triton", **SGD_KW)
    data = _data(device, 4)
    _sam_steps(model, opt, data[:1])
    kept = []
    for batch in data[1:]:
        misses, plans = tb.CACHE.misses, len(tb.CACHE._plans)
        loss_of(model, batch).backward()
        kept.append([p.grad for p in model.parameters()])
        opt.first_step(zero_grad=True)
        loss_of(model, batch).backward()
        kept.append([p.grad for p in model.parameters()])
        opt.second_step(zero_grad=True)
        assert tb.CACHE.misses - misses == 2, "one row per backward's gradients"
        assert len(tb.CACHE._plans) == plans, "plans depend on sizes and layouts only"


@pytest.mark.parametrize("device", DEVICES)
def test_memory_format_change_mid_run(device):
    """model.to(memory_format=channels_last) gives the conv weights new storage and
    strides while their momentum buffers keep the old layout: those positions go to
    the torch backend, the rest stays in the kernels, and the run stays exact."""
    data = _data(device, STEPS)
    runs = {}
    for backend in ("triton", "torch"):
        model = small_cnn(0).to(device)
        opt = SAM(model.parameters(), torch.optim.SGD, backend=backend, **SGD_KW)
        runs[backend] = []
        for k, batch in enumerate(data):
            runs[backend] += _sam_steps(model, opt, [batch])
            if k == 1:
                model.to(memory_format=torch.channels_last)
        conv = model[0].weight
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    _assert_same_trajectory(runs["triton"], runs["torch"])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # interpreter
@pytest.mark.parametrize("device", DEVICES)
def test_skipped_perturbation_on_a_non_finite_gradient(device):
    """An inf gradient: the norm reports it, the perturbation is skipped on the device
    (scale 0), the weights stay finite, exactly as with the torch backend."""
    runs = {}
    for backend in ("triton", "torch"):
        model = small_cnn(0).to(device)
        opt = SAM(model.parameters(), torch.optim.SGD, backend=backend, lr=0.05)
        before = _snapshot(model)
        loss_of(model, _data(device, 1)[0]).backward()
        model[0].weight.grad[0, 0, 0, 0] = float("inf")
        opt.first_step()
        assert bool(opt.perturbation_skipped) and not torch.isfinite(opt.last_grad_norm)
        assert all(torch.equal(a, b) for a, b in zip(_snapshot(model), before))
        opt.restore()
        runs[backend] = _snapshot(model)
    assert all(torch.equal(a, b) for a, b in zip(runs["triton"], runs["torch"]))
