"""Whole optimizers on the compiled ops: SAM, ASAM, USAM and SAMPa with SGD, Adam and
AdamW, ``backend="cpp"`` (``"cuda"`` on a GPU) against ``backend="torch"`` step for
step and against the float64 oracle; CUDA-graph capture and torch.compile of a step.

Tolerances: both backends are fp32 computations of the same equations that
round differently (FMA, association), so trajectories drift apart by a few
fp32 ulps per step; 2e-5 relative after 6 steps leaves two orders of magnitude
of headroom, while a wrong option (momentum, weight decay, bias correction)
shows at 1e-3 or more. Against the oracle the compiled backend must be as
accurate as the torch backend (within 2x plus a few ulps).
"""

from __future__ import annotations

import copy

import pytest
import torch

import oracle
from conftest import params_of, run_sam
from models import batches, loss_of, make_closure, small_cnn
from sam_fast import SAM, SAMPa, _extension

REASON = _extension.cpp_reason()
if REASON is not None:
    if _extension.require_ext():
        raise RuntimeError(f"SAM_FAST_REQUIRE_EXT=1 but the compiled ops are missing: {REASON}")
    pytest.skip(f"sam_fast._C is not available: {REASON}", allow_module_level=True)

HAS_CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=gpu)]
BACKEND = {"cpu": "cpp", "cuda": "cuda"}
STEPS = 6
F32_EPS = torch.finfo(torch.float32).eps

SGD_KW = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)
NESTEROV_KW = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
ADAMW_KW = dict(lr=1e-2, weight_decay=1e-2)
AMSGRAD_KW = dict(lr=1e-2, weight_decay=1e-3, amsgrad=True)

# (name, base, base kwargs, oracle base or None, SAM kwargs)
SAM_CASES = [
    ("sam-sgd", torch.optim.SGD, SGD_KW, lambda: oracle.SGD64(0.05, 0.9, 0, 5e-4), {}),
    ("sam-nesterov", torch.optim.SGD, NESTEROV_KW,
     lambda: oracle.SGD64(0.05, 0.9, 0, 5e-4, nesterov=True), {}),
    ("sam-plain-sgd", torch.optim.SGD, dict(lr=0.1), lambda: oracle.SGD64(0.1), {}),
    ("sam-adamw", torch.optim.AdamW, ADAMW_KW, lambda: oracle.AdamW64(1e-2, weight_decay=1e-2),
     {}),
    ("sam-adam-amsgrad", torch.optim.Adam, AMSGRAD_KW, None, {}),
    ("asam-sgd", torch.optim.SGD, SGD_KW, lambda: oracle.SGD64(0.05, 0.9, 0, 5e-4),
     dict(rho=0.5, adaptive=True, eta=0.01)),
    ("asam-adamw", torch.optim.AdamW, ADAMW_KW, lambda: oracle.AdamW64(1e-2, weight_decay=1e-2),
     dict(rho=0.5, adaptive=True)),
    ("usam-sgd", torch.optim.SGD, SGD_KW, lambda: oracle.SGD64(0.05, 0.9, 0, 5e-4),
     dict(rho=0.05, normalize=False)),
]

# (name, base, base kwargs, oracle base, lam)
SAMPA_CASES = [
    ("sampa-sgd", torch.optim.SGD, SGD_KW, lambda: oracle.SGD64(0.05, 0.9, 0, 5e-4), 0.2),
    ("sampa0-plain-sgd", torch.optim.SGD, dict(lr=0.1), lambda: oracle.SGD64(0.1), 0.0),
    ("sampa-adamw", torch.optim.AdamW, ADAMW_KW, lambda: oracle.AdamW64(1e-2, weight_decay=1e-2),
     0.2),
]


def _state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    base = opt.base_optimizer
    out = []
    for group in base.param_groups:
        for p in group["params"]:
            for key in sorted(base.state[p]):
                value = base.state[p][key]
                if isinstance(value, torch.Tensor):
                    out.append(value)
    return out


def _assert_same_trajectory_point(ours, theirs, opt_ours, opt_theirs, step):
    diff = oracle.max_rel_diff(params_of(ours), params_of(theirs))
    assert diff < 2e-5, f"step {step}: params differ by {diff:.2e}"
    a, b = _state_tensors(opt_ours), _state_tensors(opt_theirs)
    assert len(a) == len(b)
    diff = oracle.max_rel_diff(a, b)
    assert diff < 2e-5, f"step {step}: optimizer state differs by {diff:.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,base,base_kw,make_base,sam_kw", SAM_CASES,
                         ids=[c[0] for c in SAM_CASES])
def test_sam_matches_torch_backend_step_for_step(device, name, base, base_kw, make_base, sam_kw):
    data = batches(STEPS)
    models = {b: small_cnn(0).to(device) for b in (BACKEND[device], "torch")}
    opts = {b: SAM(m.parameters(), base, backend=b, **sam_kw, **base_kw)
            for b, m in models.items()}
    for step, (x, y) in enumerate(data):
        batch = (x.to(device), y.to(device))
        for b in models:
            run_sam(models[b], opts[b], [batch])
        _assert_same_trajectory_point(models[BACKEND[device]], models["torch"],
                                      opts[BACKEND[device]], opts["torch"], step)
    if make_base is not None and device == "cpu":
        problem = oracle.Problem(small_cnn(0), data, loss_of)
        truth = oracle.sam_trajectory(
            problem, make_base(), STEPS, rho=sam_kw.get("rho", 0.05),
            adaptive=sam_kw.get("adaptive", False), eta=sam_kw.get("eta", 0.0),
            normalize=sam_kw.get("normalize", True))[-1]
        ours = oracle.max_rel_diff(params_of(models["cpp"]), truth)
        theirs = oracle.max_rel_diff(params_of(models["torch"]), truth)
        assert ours <= 2 * theirs + 16 * F32_EPS, (ours, theirs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,base,base_kw,make_base,lam", SAMPA_CASES,
                         ids=[c[0] for c in SAMPA_CASES])
def test_sampa_matches_torch_backend_step_for_step(device, name, base, base_kw, make_base, lam):
    data = [(x.to(device), y.to(device)) for x, y in batches(STEPS + 1)]
    models = {b: small_cnn(0).to(device) for b in (BACKEND[device], "torch")}
    opts = {b: SAMPa(m.parameters(), base, rho=0.1, lam=lam, backend=b, **base_kw)
            for b, m in models.items()}
    for step, batch in enumerate(data):
        for b in models:
            opts[b].step(make_closure(models[b], batch))
        _assert_same_trajectory_point(models[BACKEND[device]], models["torch"],
                                      opts[BACKEND[device]], opts["torch"], step)
    if device == "cpu":
        problem = oracle.Problem(small_cnn(0), batches(STEPS + 1), loss_of)
        truth = oracle.sampa_trajectory(problem, make_base(), STEPS + 1, rho=0.1, lam=lam)[-1]
        ours = oracle.max_rel_diff(params_of(models["cpp"]), truth)
        theirs = oracle.max_rel_diff(params_of(models["torch"]), truth)
        assert ours <= 2 * theirs + 16 * F32_EPS, (ours, theirs)


def test_the_compiled_kernels_really_run():
    """backend="cpp" must reach torch.ops.sam_fast, not fall back silently."""
    model = small_cnn(0)
    opt = SAM(model.parameters(), torch.optim.SGD, backend="cpp", **SGD_KW)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run_sam(model, opt, batches(1))
    names = {e.key for e in prof.key_averages()}
    for op in ("sam_fast::grad_sumsq", "sam_fast::perturb_", "sam_fast::restore_sgd_"):
        assert op in names, f"{op} did not run"


# -- torch.compile ---------------------------------------------------------------------------


def _fused_sam_update(params, grads, backups, bufs, lr: float, rho: float):
    """A SAM update written directly on the ops, as a compiled training step would."""
    sumsq = torch.ops.sam_fast.grad_sumsq(grads, [], 0.0)
    torch.ops.sam_fast.perturb_(params, grads, backups, sumsq, rho=rho, eps=1e-12,
                                normalize=True, eta=None, grad_scale=None)
    torch.ops.sam_fast.restore_sgd_(params, backups, grads, bufs, lr=lr, momentum=0.9,
                                    dampening=0.0, weight_decay=5e-4, nesterov=False,
                                    maximize=False, init_buffers=False, grad_scale=None,
                                    found_inf=None)
    return sumsq.sqrt()


@pytest.mark.parametrize("device,compiler", [("cpu", "aot_eager"),
                                             pytest.param("cuda", "inductor", marks=gpu)])
def test_torch_compile_traces_the_ops(device, compiler):
    """fullgraph=True: the fake implementations and the schemas' mutation annotations
    let dynamo/AOTAutograd trace the ops without a graph break; results match eager."""
    gen = torch.Generator().manual_seed(3)

    def make():
        shapes = [(7,), (33, 5), (20_000,)]
        return [[torch.randn(s, generator=gen).to(device) for s in shapes] for _ in range(3)]

    params, grads, bufs = make()
    eager = [copy.deepcopy(t) for t in (params, bufs)]
    backups, backups_eager = [torch.empty_like(p) for p in params], [torch.empty_like(p)
                                                                     for p in params]
    torch._dynamo.reset()
    compiled = torch.compile(_fused_sam_update, backend=compiler, fullgraph=True)
    for _ in range(2):
        n1 = compiled(params, grads, backups, bufs, 0.05, 0.05)
        n2 = _fused_sam_update(eager[0], grads, backups_eager, eager[1], 0.05, 0.05)
        torch.testing.assert_close(n1, n2)
    for a, b in zip(params + bufs, eager[0] + eager[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_torch_compile_of_a_training_step_with_the_optimizer():
    """A whole SAM training step (forward, backward, both SAM steps) under torch.compile
    on the cuda backend matches the eager step."""
    data = [(x.cuda(), y.cuda()) for x, y in batches(4)]
    models = [small_cnn(0).cuda() for _ in range(2)]
    opts = [SAM(m.parameters(), torch.optim.SGD, backend="cuda", **SGD_KW) for m in models]

    def train_step(model, opt, batch):
        loss_of(model, batch).backward()
        opt.first_step(zero_grad=True)
        loss = loss_of(model, batch)
        loss.backward()
        opt.second_step(zero_grad=True)
        return loss

    torch._dynamo.reset()
    compiled = torch.compile(train_step)
    for batch in data:
        compiled(models[0], opts[0], batch)
        train_step(models[1], opts[1], batch)
    assert oracle.max_rel_diff(params_of(models[0]), params_of(models[1])) < 1e-4


# CUDA-graph capture of a whole step: tests/test_cuda_graphs.py (cuda and triton backends).
