"""The torch backend's ops against float64 formulas written from docs/design.md, on awkward data.

Tolerances: results are rounded once to the storage dtype after fp32 math
(fp64 math for fp64 storage), so each output element may be off by a few
units in the last place of the storage dtype relative to its magnitude;
``_close`` allows 4 ulps of the storage dtype (plus the same absolute slack at
the scale of the inputs, for elements that cancel to near zero).
"""

from __future__ import annotations

import math

import pytest
import torch

from sam_fast import ops
from sam_fast.backends import torch_ops

SHAPES_AWKWARD = [(1,), (2,), (7,), (13, 17), (1023,), (1025,), (4097,), (3, 5, 7)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _ulp(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0,
           ulps: float = 4.0) -> None:
    tol = ulps * _ulp(dtype)
    torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * scale)


def _rand(shapes, dtype, gen, scale=1.0):
    return [(torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(dtype) for s in shapes]


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


# -- grad_norm ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eta", [None, 0.0, 0.01])
def test_grad_norm_matches_float64(dtype, eta, gen):
    grads = _rand(SHAPES_AWKWARD, dtype, gen)
    params = _rand(SHAPES_AWKWARD, dtype, gen)
    if eta is None:
        norm = ops.grad_norm(grads, backend="torch")
        expected = math.sqrt(sum((g.double() ** 2).sum().item() for g in grads))
    else:
        norm = ops.grad_norm(grads, params, eta, backend="torch")
        expected = math.sqrt(sum((((p.double().abs() + eta) * g.double()) ** 2).sum().item()
                                 for p, g in zip(params, grads)))
    assert norm.dim() == 0
    assert norm.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # fp32 accumulation of ~10^4 terms: relative error well under 1e-5
    rel = abs(norm.item() - expected) / expected
    assert rel < (1e-12 if dtype == torch.float64 else 1e-5), rel


def test_grad_norm_spans_dtypes_and_is_deterministic(gen):
    grads = _rand([(5,), (300,)], torch.float32, gen) + _rand([(17,), (64,)], torch.bfloat16, gen)
    expected = math.sqrt(sum((g.double() ** 2).sum().item() for g in grads))
    first = ops.grad_norm(grads, backend="torch")
    assert abs(first.item() - expected) / expected < 1e-5
    assert all(torch.equal(first, ops.grad_norm(grads, backend="torch")) for _ in range(3))


def test_grad_norm_of_thousands_of_tensors(gen):
    shapes = [(1 + (i * 7) % 13,) for i in range(2000)]
    grads = _rand(shapes, torch.float32, gen)
    expected = math.sqrt(sum((g.double() ** 2).sum().item() for g in grads))
    assert abs(ops.grad_norm(grads, backend="torch").item() - expected) / expected < 1e-5


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_grad_norm_reports_non_finite(bad, gen):
    grads = _rand([(10,), (3,)], torch.float32, gen)
    grads[1][2] = bad
    assert not torch.isfinite(ops.grad_norm(grads, backend="torch"))


def test_grad_norm_needs_gradients():
    with pytest.raises(ValueError, match="at least one"):
        ops.grad_norm([], backend="torch")


# -- perturb_ / restore_ --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eta", [None, 0.0, 0.01])
def test_perturb_and_restore(dtype, eta, gen):
    params = _rand(SHAPES_AWKWARD, dtype, gen)
    grads = _rand(SHAPES_AWKWARD, dtype, gen)
    originals = [p.clone() for p in params]
    backups = [torch.empty_like(p) for p in params]
    scale = torch.tensor(0.037)
    # USAM's form takes the scale as it is: e = rho * g
    ops.perturb_(params, grads, backups, torch.tensor(1.0), rho=0.037, normalize=False, eta=eta,
                 backend="torch")
    for p, w, g, b in zip(params, originals, grads, backups):
        assert torch.equal(b, w), "backup must be the exact weights"
        t = (w.double().abs() + eta) ** 2 if eta is not None else 1.0
        _close(p, w.double() + scale.item() * t * g.double(), dtype, scale=2.0)
    ops.restore_(params, backups, backend="torch")
    assert all(torch.equal(p, w) for p, w in zip(params, originals))


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("normalize", [True, False])
def test_perturb_with_a_non_finite_sum_of_squares_is_exactly_identity(bad, normalize, gen):
    params = _rand([(9,), (4, 4)], torch.float32, gen)
    grads = _rand([(9,), (4, 4)], torch.float32, gen)
    grads[0][3] = bad
    originals = [p.clone() for p in params]
    backups = [torch.empty_like(p) for p in params]
    sumsq = ops.grad_sumsq(grads, backend="torch")
    assert not torch.isfinite(sumsq)
    ops.perturb_(params, grads, backups, sumsq, rho=0.05, normalize=normalize, backend="torch")
    assert all(torch.equal(p, w) for p, w in zip(params, originals))


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("grad_scale", [None, 1024.0, 3.0])
def test_perturbation_scale_follows_the_formula(normalize, grad_scale, gen):
    """rho / (||g|| + eps) (rho for USAM), of the unscaled gradients under a grad scale."""
    grads = _rand([(5,), (3, 7)], torch.float32, gen)
    s = 1.0 if grad_scale is None else grad_scale
    scaled = [g * s for g in grads]
    sumsq = ops.grad_sumsq(scaled, backend="torch")
    gs = None if grad_scale is None else torch.tensor(grad_scale)
    scale = torch_ops.perturbation_scale(sumsq, 0.05, 1e-3, normalize, gs)
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in scaled))
    want = 0.05 / (norm + s * 1e-3) if normalize else 0.05 / s
    assert abs(scale.item() - want) <= 4 * 2.0**-24 * want
    # and applied: e = scale * (S g) is the perturbation of the unscaled gradients
    params = _rand([(5,), (3, 7)], torch.float32, gen)
    before = [p.clone() for p in params]
    ops.perturb_(params, scaled, [torch.empty_like(p) for p in params], sumsq, rho=0.05,
                 eps=1e-3, normalize=normalize, grad_scale=gs, backend="torch")
    for p, w, g in zip(params, before, scaled):
        _close(p, w.double() + want * g.double(), torch.float32, scale=2.0)


def test_ops_accept_non_contiguous_tensors(gen):
    base = torch.randn(6, 10, generator=gen)
    param = base.t()  # a transposed view: strides (1, 10)
    grad = torch.randn(10, 6, generator=gen).t().contiguous().t()
    assert not param.is_contiguous()
    before = param.clone()
    backup = torch.empty_like(param)
    ops.perturb_([param], [grad], [backup], torch.tensor(1.0),
                 rho=0.5, normalize=False, backend="torch")
    _close(param, before.double() + 0.5 * grad.double(), torch.float32, scale=2.0)
    ops.restore_([param], [backup], backend="torch")
    assert torch.equal(param, before)


def test_empty_lists_are_no_ops():
    ops.perturb_([], [], [], torch.tensor(1.0), rho=1.0, normalize=False, backend="torch")
    ops.restore_([], [], backend="torch")


def test_thousands_of_tensors_in_one_call(gen):
    shapes = [(1 + (i * 5) % 11,) for i in range(1500)]
    params = _rand(shapes, torch.float32, gen)
    grads = _rand(shapes, torch.float32, gen)
    originals = [p.clone() for p in params]
    backups = [torch.empty_like(p) for p in params]
    ops.perturb_(params, grads, backups, torch.tensor(1.0),
                 rho=0.25, normalize=False, backend="torch")
    for p, w, g in zip(params, originals, grads):
        _close(p, w.double() + 0.25 * g.double(), torch.float32, scale=2.0)


# -- fused restore + base step --------------------------------------------------------------


def _sgd64(x, g, buf, lr, momentum, dampening, wd, nesterov, maximize, init):
    g = -g if maximize else g
    d = g + wd * x
    if momentum:
        buf = d.clone() if init else momentum * buf + (1 - dampening) * d
        d = d + momentum * buf if nesterov else buf
    return x - lr * d, buf


SGD_OPTIONS = [
    dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=False, maximize=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=True, maximize=False),
    dict(momentum=0.8, dampening=0.3, weight_decay=1e-2, nesterov=False, maximize=True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", SGD_OPTIONS)
@pytest.mark.parametrize("init", [True, False])
def test_restore_sgd_matches_formula(dtype, options, init, gen):
    shapes = SHAPES_AWKWARD
    x = _rand(shapes, dtype, gen)
    perturbed = _rand(shapes, dtype, gen)
    grads = _rand(shapes, dtype, gen)
    bufs = _rand(shapes, dtype, gen)
    bufs_before = [b.clone() for b in bufs]
    ops.restore_sgd_(perturbed, x, grads, bufs if options["momentum"] else None, lr=0.1,
                     init_buffers=init, backend="torch", **options)
    for p, xi, g, b, b0 in zip(perturbed, x, grads, bufs, bufs_before):
        want_x, want_b = _sgd64(xi.double(), g.double(), b0.double(), 0.1, options["momentum"],
                                options["dampening"], options["weight_decay"],
                                options["nesterov"], options["maximize"], init)
        _close(p, want_x, dtype, scale=2.0)
        if options["momentum"]:
            _close(b, want_b, dtype, scale=2.0)


def _adam64(x, g, m, v, vmax, step, lr, b1, b2, eps, wd, amsgrad, maximize, decoupled):
    g = -g if maximize else g
    if wd and decoupled:
        x = x * (1 - lr * wd)
    elif wd:
        g = g + wd * x
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    vmax = torch.maximum(vmax, v) if amsgrad else vmax
    denom = (vmax if amsgrad else v).sqrt() / math.sqrt(1 - b2**step) + eps
    return x - lr / (1 - b1**step) * m / denom, m, v, vmax


ADAM_OPTIONS = [
    dict(weight_decay=0.0, amsgrad=False, maximize=False, decoupled_weight_decay=False),
    dict(weight_decay=1e-2, amsgrad=False, maximize=False, decoupled_weight_decay=True),
    dict(weight_decay=1e-2, amsgrad=True, maximize=True, decoupled_weight_decay=False),
    dict(weight_decay=5e-2, amsgrad=True, maximize=False, decoupled_weight_decay=True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("options", ADAM_OPTIONS)
@pytest.mark.parametrize("steps_on_device", [False, True])
def test_restore_adamw_matches_formula(dtype, options, steps_on_device, gen):
    shapes = [(1,), (13, 17), (1025,)]
    x = _rand(shapes, dtype, gen)
    perturbed = _rand(shapes, dtype, gen)
    grads = _rand(shapes, dtype, gen)
    m = _rand(shapes, dtype, gen, 0.1)
    v = [t.abs() for t in _rand(shapes, dtype, gen, 0.01)]
    vmax = [t * 1.5 for t in v]
    before = [[t.clone() for t in ts] for ts in (m, v, vmax)]
    # "device" steps are simply float32 tensors the kernels read (as with capturable Adam)
    steps = [torch.tensor(4.0) for _ in shapes]
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
    ops.restore_adamw_(perturbed, x, grads, m, v, vmax if options["amsgrad"] else None, steps,
                       backend="torch", **hp, **options)
    assert all(s.item() == 5.0 for s in steps)
    for i in range(len(shapes)):
        want = _adam64(x[i].double(), grads[i].double(), before[0][i].double(),
                       before[1][i].double(), before[2][i].double(), 5, hp["lr"], hp["beta1"],
                       hp["beta2"], hp["eps"], options["weight_decay"], options["amsgrad"],
                       options["maximize"], options["decoupled_weight_decay"])
        # m / sqrt(v) chains a few roundings: 16 ulps
        _close(perturbed[i], want[0], dtype, scale=2.0, ulps=16)
        _close(m[i], want[1], dtype, scale=0.2, ulps=4)
        _close(v[i], want[2], dtype, scale=0.02, ulps=4)


def test_restore_sgd_skips_the_step_when_found_inf(gen):
    x = _rand([(5,), (8,)], torch.float32, gen)
    perturbed = _rand([(5,), (8,)], torch.float32, gen)
    grads = _rand([(5,), (8,)], torch.float32, gen)
    grads[1][0] = float("inf")
    bufs = _rand([(5,), (8,)], torch.float32, gen)
    bufs_before = [b.clone() for b in bufs]
    ops.restore_sgd_(perturbed, x, grads, bufs, lr=0.1, momentum=0.9,
                     found_inf=torch.tensor(1.0), backend="torch")
    assert all(torch.equal(p, xi) for p, xi in zip(perturbed, x))
    assert all(torch.equal(b, b0) for b, b0 in zip(bufs, bufs_before))


def test_restore_sgd_unscales_gradients(gen):
    x = _rand([(5,)], torch.float32, gen)
    grads = _rand([(5,)], torch.float32, gen)
    scaled = [g * 1024 for g in grads]
    a, b = [t.clone() for t in x], [t.clone() for t in x]
    ops.restore_sgd_(a, x, grads, None, lr=0.1, backend="torch")
    ops.restore_sgd_(b, x, scaled, None, lr=0.1, grad_scale=torch.tensor(1024.0),
                     found_inf=torch.tensor(0.0), backend="torch")
    assert torch.equal(a[0], b[0])


# -- SAMPa ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("options", SGD_OPTIONS)
@pytest.mark.parametrize("init", [True, False])
def test_sampa_points_and_update(dtype, options, init, gen):
    shapes = SHAPES_AWKWARD
    x = _rand(shapes, dtype, gen)
    params = [t.clone() for t in x]
    g_y = _rand(shapes, dtype, gen)
    g_tilde = _rand(shapes, dtype, gen)
    bufs = _rand(shapes, dtype, gen)
    bufs_before = [b.clone() for b in bufs]
    backups = [torch.empty_like(t) for t in x]
    ys = [torch.empty_like(t) for t in x]
    mom = bufs if options["momentum"] else None
    sumsq = ops.grad_sumsq(g_y, backend="torch")
    scale = torch_ops.perturbation_scale(sumsq, 0.05, 1e-12, True)
    ops.sampa_points_(params, g_y, mom, backups, ys, sumsq, rho=0.05, eps=1e-12, lr=0.1,
                      init_buffers=init, backend="torch", **options)
    for i in range(len(shapes)):
        assert torch.equal(backups[i], x[i])
        assert torch.equal(bufs[i], bufs_before[i]), "points must not commit the buffers"
        _close(params[i], x[i].double() + scale.item() * g_y[i].double(), dtype,
               scale=2.0)
        want_y, _ = _sgd64(x[i].double(), g_y[i].double(), bufs_before[i].double(), 0.1,
                           options["momentum"], options["dampening"], options["weight_decay"],
                           options["nesterov"], options["maximize"], init)
        _close(ys[i], want_y, dtype, scale=2.0)
    lam = 0.2
    ops.sampa_update_(params, backups, g_tilde, g_y, mom, lam=lam, lr=0.1, init_buffers=init,
                      backend="torch", **options)
    for i in range(len(shapes)):
        combined = (1 - lam) * g_tilde[i].double() + lam * g_y[i].double()
        want_x, want_b = _sgd64(x[i].double(), combined, bufs_before[i].double(), 0.1,
                                options["momentum"], options["dampening"],
                                options["weight_decay"], options["nesterov"],
                                options["maximize"], init)
        _close(params[i], want_x, dtype, scale=2.0, ulps=6)
        if options["momentum"]:
            _close(bufs[i], want_b, dtype, scale=2.0, ulps=6)


# -- input checks ---------------------------------------------------------------------------


def test_mismatched_lists_are_rejected():
    a = [torch.zeros(3), torch.zeros(4)]
    with pytest.raises(ValueError, match="grads has 1 tensors but params has 2"):
        ops.perturb_(a, [torch.zeros(3)], [torch.zeros(3), torch.zeros(4)], torch.tensor(1.0),
                     rho=1.0, normalize=False,
                     backend="torch")
    with pytest.raises(RuntimeError, match=r"grads\[1\] has shape \(5,\)"):
        ops.perturb_(a, [torch.zeros(3), torch.zeros(5)], [torch.zeros(3), torch.zeros(4)],
                     torch.tensor(1.0), rho=1.0, backend="torch")


def test_tensors_of_one_parameter_on_several_devices_are_rejected():
    param = torch.zeros(3)
    grad = torch.zeros(3, device="meta")
    with pytest.raises(RuntimeError, match=r"grads\[0\] is on meta but params\[0\] is on cpu"):
        ops.perturb_([param], [grad], [torch.zeros(3)], torch.tensor(1.0),
                     rho=1.0, normalize=False, backend="torch")


def test_sparse_complex_and_integer_tensors_are_rejected():
    with pytest.raises(RuntimeError, match="sparse"):
        ops.grad_norm([torch.zeros(3).to_sparse()], backend="torch")
    with pytest.raises(RuntimeError, match="complex"):
        ops.grad_norm([torch.zeros(3, dtype=torch.complex64)], backend="torch")
    with pytest.raises(RuntimeError, match="dtype torch.int64"):
        ops.grad_norm([torch.zeros(3, dtype=torch.int64)], backend="torch")


def test_unknown_backend_is_rejected():
    with pytest.raises(RuntimeError, match="not registered"):
        ops.grad_norm([torch.ones(3)], backend="no-such-backend")


def test_validated_layouts_are_not_reused_for_other_tensors(gen):
    """The per-layout cache of checks must notice new storage, shapes and dtypes."""
    params = _rand([(4,), (6,)], torch.float32, gen)
    grads = _rand([(4,), (6,)], torch.float32, gen)
    backups = [torch.empty_like(p) for p in params]
    ops.perturb_(params, grads, backups, torch.tensor(1.0),
                 rho=0.1, normalize=False, backend="torch")
    with pytest.raises(RuntimeError, match=r"grads\[1\] has shape \(3, 2\)"):
        ops.perturb_(params, [grads[0], grads[1].view(3, 2)], backups, torch.tensor(1.0),
                     rho=0.1, normalize=False,
                     backend="torch")
    # a parameter whose storage changes dtype in place (as module.to() does)
    params[1].data = params[1].data.to(torch.bfloat16)
    grads[1] = grads[1].to(torch.bfloat16)
    backups[1] = torch.empty_like(params[1])
    before = [p.clone() for p in params]
    ops.perturb_(params, grads, backups, torch.tensor(1.0),
                 rho=0.5, normalize=False, backend="torch")
    assert params[1].dtype == torch.bfloat16
    _close(params[1], before[1].double() + 0.5 * grads[1].double(), torch.bfloat16, scale=2.0)
