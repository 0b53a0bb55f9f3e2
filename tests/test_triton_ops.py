"""The ``triton`` backend's kernels against float64 formulas and against the torch backend.

On the CPU they run in Triton's interpreter (``TRITON_INTERPRET=1``, set by
scripts/test); the same tests run on CUDA tensors where a GPU is present
(marked ``gpu``).

Tolerances. Every kernel computes in fp32 from the widened inputs and rounds
each output once to the storage dtype. Against float64 formulas evaluated on
the same (widened) inputs an output is therefore off by its final rounding,
at most half an ulp of the storage dtype (relative to the value: a truncating
conversion fails this), plus a few fp32 roundings of the O(scale)
intermediates (absolute: ``fp32_ops * eps32 * scale``, which also covers
values that cancel to near zero); see ``_close``. Against the torch backend
(the same fp32 math in another association / FMA contraction), outputs
differ by a few fp32 ulps of the intermediates, and bf16/fp16 outputs by one
storage ulp where the two fp32 results straddle a rounding boundary; see
``_close_to_torch``. The few looser bounds say why where they are used.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from sam_fast import dispatch, ops
from sam_fast.backends import triton_backend as tb

# -- where the kernels can run ------------------------------------------------------------

_CPU_REASON = dispatch.why_unavailable("triton", "cpu")
_CUDA_REASON = (dispatch.why_unavailable("triton", "cuda") if torch.cuda.is_available()
                else "no CUDA device")

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        _CPU_REASON is not None, reason=f"triton on CPU: {_CPU_REASON}")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        _CUDA_REASON is not None, reason=f"triton on CUDA: {_CUDA_REASON}")]),
]

_NEEDS_TRITON = pytest.mark.skipif(tb.kernels is None, reason="Triton is not installed")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# One element, two, a prime, sizes around BLOCK (1024) and CHUNK (16384, a
# chunk boundary inside one tensor), several dimensions, and an empty tensor.
SHAPES = [(1,), (2,), (7,), (1021,), (1024,), (1025,), (13, 17), (3, 5, 7), (0,), (16411,)]


# Under the interpreter, numpy evaluates g * scale for inf/NaN gradients before
# the kernel's tl.where discards the product; its RuntimeWarning is expected.
_INF_TIMES_ZERO = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(2024)


def _rand(shapes, dtype, gen, device, scale=1.0, positive=False):
    out = []
    for s in shapes:
        t = torch.randn(s, generator=gen, dtype=torch.float64) * scale
        out.append((t.abs() if positive else t).to(dtype).to(device))
    return out


def _clones(tensors):
    return None if tensors is None else [t.clone() for t in tensors]


EPS32 = torch.finfo(torch.float32).eps


def _close(actual, expected, dtype, scale=2.0, ulps=0.5, fp32_ops=4.0):
    """|actual - expected| <= ulps * eps(dtype) * |expected| + fp32_ops * eps32 * scale.

    Against float64 formulas: the final rounding to the storage dtype (half an
    ulp: a truncating conversion fails this) plus a few fp32 roundings of the
    O(scale) intermediates.
    """
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(),
                               rtol=ulps * torch.finfo(dtype).eps, atol=fp32_ops * EPS32 * scale)


def _close_to_torch(actual, reference, dtype, scale=2.0):
    """Against the torch backend: the same fp32 math in another order, so a few fp32
    ulps of the intermediates, and for bf16/fp16 one storage ulp where the two fp32
    results fall on either side of a rounding boundary."""
    _close(actual, reference, dtype, scale, ulps=0.5 if dtype == torch.float32 else 1.0,
           fp32_ops=8.0)


def _same_bits(a, b):
    """Bitwise equality (unlike torch.equal: NaN == NaN, -0.0 != +0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


# -- float64 formulas, written from DESIGN.md section 2 and the torch.optim docs ----------


def _sgd64(x, g, buf, *, lr, momentum, dampening, weight_decay, nesterov, maximize, init):
    d = -g if maximize else g
    d = d + weight_decay * x
    if momentum:
        buf = d.clone() if init else momentum * buf + (1 - dampening) * d
        d = d + momentum * buf if nesterov else buf
    return x - lr * d, buf


def _adam64(x, g, m, v, vmax, t, *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
            decoupled_weight_decay):
    g = -g if maximize else g
    if weight_decay and decoupled_weight_decay:
        x = x * (1 - lr * weight_decay)
    elif weight_decay:
        g = g + weight_decay * x
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    if amsgrad:
        vmax = torch.maximum(vmax, v)
    denom = (vmax if amsgrad else v).sqrt() / math.sqrt(1 - beta2**t) + eps
    return x - lr / (1 - beta1**t) * m / denom, m, v, vmax


# -- grad_sumsq ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eta", [None, 0.0, 0.01])
def test_grad_norm(device, dtype, eta, gen):
    grads = _rand(SHAPES, dtype, gen, device)
    params = _rand(SHAPES, dtype, gen, device)
    if eta is None:
        norm = ops.grad_norm(grads, backend="triton")
        expected = math.sqrt(sum((g.double() ** 2).sum().item() for g in grads))
        reference = ops.grad_norm(grads, backend="torch")
    else:
        norm = ops.grad_norm(grads, params, eta, backend="triton")
        expected = math.sqrt(sum((((p.double().abs() + eta) * g.double()) ** 2).sum().item()
                                 for p, g in zip(params, grads)))
        reference = ops.grad_norm(grads, params, eta, backend="torch")
    assert norm.dim() == 0 and norm.dtype == torch.float32 and norm.device.type == device
    # ~20k positive fp32 terms summed as 16-step lane sums, a 1024-wide tree and a
    # short final pass: relative error a few 1e-7; 2e-6 leaves room.
    assert abs(norm.item() - expected) / expected < 2e-6
    assert abs(norm.item() - reference.item()) / expected < 4e-6


@pytest.mark.parametrize("device", DEVICES)
def test_grad_norm_is_deterministic(device, gen):
    grads = _rand(SHAPES, torch.float32, gen, device, scale=3.0)
    first = ops.grad_norm(grads, backend="triton")
    assert all(_same_bits(first, ops.grad_norm(grads, backend="triton")) for _ in range(3))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("asam", [False, True])
def test_grad_norm_reports_non_finite(device, bad, asam, gen):
    grads = _rand([(10,), (1030,)], torch.float32, gen, device)
    params = _rand([(10,), (1030,)], torch.float32, gen, device)
    grads[1][1027] = bad  # in the masked tail of the second tensor
    norm = ops.grad_norm(grads, params if asam else None, 0.01, backend="triton")
    assert not torch.isfinite(norm)


def test_grad_sumsq_needs_a_tensor():
    with pytest.raises(ValueError, match="at least one"):
        tb.grad_sumsq([])


# -- perturb_ / restore_ -------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eta", [None, 0.0, 0.01])
def test_perturb_and_restore(device, dtype, eta, gen):
    params = _rand(SHAPES, dtype, gen, device)
    grads = _rand(SHAPES, dtype, gen, device)
    originals = _clones(params)
    reference = _clones(params)
    backups = [torch.empty_like(p) for p in params]
    scale = torch.tensor(0.037, device=device)
    ops.perturb_(params, grads, backups, scale, eta, backend="triton")
    ops.perturb_(reference, grads, _clones(backups), scale, eta, backend="torch")
    for p, r, w, g, b in zip(params, reference, originals, grads, backups):
        assert _same_bits(b, w), "the backup must hold the weights' exact bits"
        t = (w.double().abs() + eta) ** 2 if eta is not None else 1.0
        _close(p, w.double() + scale.item() * t * g.double(), dtype, scale=2.0)
        _close_to_torch(p, r, dtype, scale=2.0)
    ops.restore_(params, backups, backend="triton")
    assert all(_same_bits(p, w) for p, w in zip(params, originals))


@_INF_TIMES_ZERO
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("eta", [None, 0.01])
def test_perturb_with_zero_scale_is_exactly_identity(device, bad, eta, gen):
    params = _rand([(9,), (1030,)], torch.float32, gen, device)
    grads = _rand([(9,), (1030,)], torch.float32, gen, device)
    grads[0][3] = bad
    grads[1][1029] = bad
    norm = ops.grad_norm(grads, backend="triton")
    # The optimizer's rule: a non-finite norm gives scale 0 (on the device, no sync).
    scale = torch.where(torch.isfinite(norm), 0.05 / norm, torch.zeros_like(norm))
    originals = _clones(params)
    backups = [torch.empty_like(p) for p in params]
    ops.perturb_(params, grads, backups, scale, eta, backend="triton")
    for p, w, b in zip(params, originals, backups):
        assert torch.equal(p, w) and _same_bits(b, w)
        assert torch.isfinite(p).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_copies_bits(device, dtype, gen):
    backups = _rand([(5,), (1027,)], dtype, gen, device)
    backups[0][0] = -0.0
    backups[0][1] = float("nan")
    backups[0][2] = float("-inf")
    params = [torch.full_like(b, 3.0) for b in backups]
    ops.restore_(params, backups, backend="triton")
    assert all(_same_bits(p, b) for p, b in zip(params, backups))


# -- restore + SGD -------------------------------------------------------------------------

SGD_OPTIONS = [
    dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=False, maximize=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=True, maximize=False),
    dict(momentum=0.8, dampening=0.3, weight_decay=1e-2, nesterov=False, maximize=True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", SGD_OPTIONS)
@pytest.mark.parametrize("init", [True, False])
def test_restore_sgd(device, dtype, options, init, gen):
    x = _rand(SHAPES, dtype, gen, device)
    grads = _rand(SHAPES, dtype, gen, device)
    bufs0 = _rand(SHAPES, dtype, gen, device)
    uses = options["momentum"] != 0
    results = {}
    for backend in ("triton", "torch"):
        params = _rand(SHAPES, dtype, gen, device)  # the perturbed point, overwritten
        bufs = _clones(bufs0)
        ops.restore_sgd_(params, x, grads, bufs if uses else None, lr=0.1, init_buffers=init,
                         backend=backend, **options)
        results[backend] = (params, bufs)
    (params, bufs), (ref_params, ref_bufs) = results["triton"], results["torch"]
    for i, (xi, g, b0) in enumerate(zip(x, grads, bufs0)):
        want_x, want_b = _sgd64(xi.double(), g.double(), b0.double(), lr=0.1, init=init,
                                **options)
        _close(params[i], want_x, dtype, scale=2.0)
        _close_to_torch(params[i], ref_params[i], dtype, scale=2.0)
        if uses:
            _close(bufs[i], want_b, dtype, scale=2.0)
            _close_to_torch(bufs[i], ref_bufs[i], dtype, scale=2.0)
        else:
            assert _same_bits(bufs[i], b0), "buffers are not touched without momentum"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("found", [0.0, 1.0])
@pytest.mark.parametrize("init", [True, False])
def test_restore_sgd_grad_scale_and_found_inf(device, found, init, gen):
    x = _rand(SHAPES, torch.float32, gen, device)
    grads = _rand(SHAPES, torch.float32, gen, device, scale=1024.0)  # scaled by GradScaler
    bufs = _rand(SHAPES, torch.float32, gen, device)
    bufs0 = _clones(bufs)
    params = _rand(SHAPES, torch.float32, gen, device)
    options = dict(momentum=0.9, dampening=0.0, weight_decay=1e-3, nesterov=True,
                   maximize=False)
    ops.restore_sgd_(params, x, grads, bufs, lr=0.1, init_buffers=init,
                     grad_scale=torch.tensor(1024.0, device=device),
                     found_inf=torch.tensor(found, device=device), backend="triton", **options)
    for p, xi, g, b, b0 in zip(params, x, grads, bufs, bufs0):
        if found:
            assert _same_bits(p, xi), "a skipped step still restores the weights"
            assert _same_bits(b, b0), "a skipped step leaves the buffers as they were"
        else:
            want_x, want_b = _sgd64(xi.double(), g.double() / 1024, b0.double(), lr=0.1,
                                    init=init, **options)
            _close(p, want_x, torch.float32, scale=2.0)
            _close(b, want_b, torch.float32, scale=2.0)


# -- restore + Adam / AdamW ----------------------------------------------------------------

ADAM_OPTIONS = [
    dict(weight_decay=0.0, amsgrad=False, maximize=False, decoupled_weight_decay=False),
    dict(weight_decay=1e-2, amsgrad=False, maximize=False, decoupled_weight_decay=True),
    dict(weight_decay=1e-2, amsgrad=True, maximize=True, decoupled_weight_decay=False),
]
BETAS = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)


def _adam_state(dtype, gen, device, shapes=SHAPES):
    m = _rand(shapes, dtype, gen, device, scale=0.1)
    v = _rand(shapes, dtype, gen, device, scale=0.01, positive=True)
    vmax = [t * 1.5 for t in v]
    return m, v, vmax


def _check_adam(out, ref, x, grads, state0, t, dtype, options, grad_divisor=1.0):
    (params, m, v, vmax), (ref_params, ref_m, ref_v, ref_vmax) = out, ref
    m0, v0, vmax0 = state0
    for i in range(len(x)):
        want = _adam64(x[i].double(), grads[i].double() / grad_divisor, m0[i].double(),
                       v0[i].double(), vmax0[i].double(), t, **BETAS, **options)
        _close(params[i], want[0], dtype, scale=2.0)
        _close(m[i], want[1], dtype, scale=0.5)
        _close(v[i], want[2], dtype, scale=0.05)
        for a, b in ((params, ref_params), (m, ref_m), (v, ref_v)):
            _close_to_torch(a[i], b[i], dtype, scale=2.0)
        if options["amsgrad"]:
            _close(vmax[i], want[3], dtype, scale=0.05)
            _close_to_torch(vmax[i], ref_vmax[i], dtype, scale=0.05)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", ADAM_OPTIONS)
def test_restore_adam_host_steps(device, dtype, options, gen):
    """torch.optim.Adam's default: step counters on the host, corrections computed there."""
    x = _rand(SHAPES, dtype, gen, device)
    grads = _rand(SHAPES, dtype, gen, device)
    state0 = _adam_state(dtype, gen, device)
    runs = {}
    for backend in ("triton", "torch"):
        params = _rand(SHAPES, dtype, gen, device)
        m, v, vmax = (_clones(s) for s in state0)
        steps = [torch.tensor(4.0) for _ in SHAPES]
        ops.restore_adamw_(params, x, grads, m, v, vmax if options["amsgrad"] else None, steps,
                           **BETAS, **options, backend=backend)
        assert all(s.item() == 5.0 for s in steps)
        runs[backend] = (params, m, v, vmax)
    _check_adam(runs["triton"], runs["torch"], x, grads, state0, 5, dtype, options)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("options", ADAM_OPTIONS[1:])
@pytest.mark.parametrize("found", [0.0, 1.0])
def test_restore_adam_device_steps(device, options, found, gen):
    """Capturable Adam: counters on the device, read (and advanced) without the host.

    On CPU tensors the path is forced (counters on the CPU count as on the host
    for the public op); the kernel reads them through the table either way.
    """
    dtype = torch.float32
    x = _rand(SHAPES, dtype, gen, device)
    grads = _rand(SHAPES, dtype, gen, device, scale=8.0)
    state0 = _adam_state(dtype, gen, device)
    params = _rand(SHAPES, dtype, gen, device)
    m, v, vmax = (_clones(s) for s in state0)
    # Counters differ per tensor (a parameter added later): each program reads its own.
    steps = [torch.tensor(float(1 + i % 3), device=device) for i in range(len(SHAPES))]
    steps0 = [s.item() for s in steps]
    tb._restore_adam(params, x, grads, m, v, vmax if options["amsgrad"] else None, steps,
                     tb.AdamOptions(**BETAS, **options),
                     grad_scale=torch.tensor(8.0, device=device),
                     found_inf=torch.tensor(found, device=device), steps_on_device=True)
    if found:
        assert [s.item() for s in steps] == steps0
        assert all(_same_bits(p, xi) for p, xi in zip(params, x))
        assert all(_same_bits(a, b) for a, b in zip(m + v, state0[0] + state0[1]))
        return
    assert [s.item() for s in steps] == [c + 1 for c in steps0]
    for i in range(len(SHAPES)):
        want = _adam64(x[i].double(), grads[i].double() / 8.0, state0[0][i].double(),
                       state0[1][i].double(), state0[2][i].double(), steps0[i] + 1,
                       **BETAS, **options)
        # On the device the bias corrections are fp32, as in PyTorch's capturable
        # Adam: beta2 = 0.999 rounded to fp32 makes 1 - beta2^t off by ~1.3e-5
        # relative, so the update (lr * O(1) = 1e-2 * up to ~3) moves by up to
        # ~4e-7: 16 fp32 ulps at scale 2 (3.8e-6) bounds it with room.
        _close(params[i], want[0], dtype, fp32_ops=16.0)
        _close(m[i], want[1], dtype, scale=0.5)
        _close(v[i], want[2], dtype, scale=0.05)


@pytest.mark.parametrize("device", DEVICES)
def test_restore_adam_host_steps_that_differ(device, gen):
    """Counters that differ between tensors: one launch per distinct count."""
    dtype = torch.float32
    options = ADAM_OPTIONS[1]
    x = _rand(SHAPES, dtype, gen, device)
    grads = _rand(SHAPES, dtype, gen, device)
    state0 = _adam_state(dtype, gen, device)
    runs = {}
    for backend in ("triton", "torch"):
        params = _rand(SHAPES, dtype, gen, device)
        m, v, vmax = (_clones(s) for s in state0)
        steps = [torch.tensor(float(i % 3)) for i in range(len(SHAPES))]
        ops.restore_adamw_(params, x, grads, m, v, None, steps, **BETAS, **options,
                           backend=backend)
        runs[backend] = (params, m, v, vmax)
    for i in range(len(SHAPES)):
        want = _adam64(x[i].double(), grads[i].double(), state0[0][i].double(),
                       state0[1][i].double(), None, i % 3 + 1, **BETAS, **options)
        _close(runs["triton"][0][i], want[0], dtype, scale=2.0)
        _close_to_torch(runs["triton"][0][i], runs["torch"][0][i], dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_restore_adam_host_steps_found_inf_restores_only(device, gen):
    x = _rand(SHAPES, torch.float32, gen, device)
    grads = _rand(SHAPES, torch.float32, gen, device)
    m, v, _ = _adam_state(torch.float32, gen, device)
    m0, v0 = _clones(m), _clones(v)
    params = _rand(SHAPES, torch.float32, gen, device)
    steps = [torch.tensor(2.0) for _ in SHAPES]
    ops.restore_adamw_(params, x, grads, m, v, None, steps, **BETAS,
                       found_inf=torch.tensor(1.0, device=device), backend="triton")
    assert all(s.item() == 2.0 for s in steps)
    assert all(_same_bits(p, xi) for p, xi in zip(params, x))
    assert all(_same_bits(a, b) for a, b in zip(m + v, m0 + v0))


# -- SAMPa ---------------------------------------------------------------------------------

SAMPA_OPTIONS = [
    dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    dict(momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=True, maximize=False),
    dict(momentum=0.8, dampening=0.2, weight_decay=1e-2, nesterov=False, maximize=True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", SAMPA_OPTIONS)
@pytest.mark.parametrize("init", [True, False])
def test_sampa_points(device, dtype, options, init, gen):
    x = _rand(SHAPES, dtype, gen, device)
    g_y = _rand(SHAPES, dtype, gen, device)
    bufs = _rand(SHAPES, dtype, gen, device)
    reads = options["momentum"] != 0 and not init
    scale = torch.tensor(0.07, device=device)
    runs = {}
    for backend in ("triton", "torch"):
        params = _clones(x)
        backups = [torch.empty_like(t) for t in x]
        ys = [torch.empty_like(t) for t in x]
        bufs_in = _clones(bufs)
        ops.sampa_points_(params, g_y, bufs_in if reads else None, backups, ys, scale, lr=0.1,
                          init_buffers=init, backend=backend, **options)
        assert all(_same_bits(a, b) for a, b in zip(bufs_in, bufs)), "buffers are read only"
        runs[backend] = (params, backups, ys)
    (params, backups, ys), (ref_params, _, ref_ys) = runs["triton"], runs["torch"]
    for i, (xi, g, b0) in enumerate(zip(x, g_y, bufs)):
        assert _same_bits(backups[i], xi)
        want_y, _ = _sgd64(xi.double(), g.double(), b0.double(), lr=0.1, init=init, **options)
        _close(ys[i], want_y, dtype, scale=2.0)
        _close_to_torch(ys[i], ref_ys[i], dtype, scale=2.0)
        _close(params[i], xi.double() + 0.07 * g.double(), dtype, scale=2.0)
        _close_to_torch(params[i], ref_params[i], dtype, scale=2.0)


@_INF_TIMES_ZERO
@pytest.mark.parametrize("device", DEVICES)
def test_sampa_points_with_zero_scale_keep_x(device, gen):
    x = _rand([(5,), (1100,)], torch.float32, gen, device)
    g_y = _rand([(5,), (1100,)], torch.float32, gen, device)
    g_y[1][1099] = float("inf")
    params, backups, ys = _clones(x), [torch.empty_like(t) for t in x], _clones(x)
    ops.sampa_points_(params, g_y, None, backups, ys, torch.tensor(0.0, device=device), lr=0.1,
                      backend="triton")
    assert all(_same_bits(p, xi) for p, xi in zip(params, x))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("options", SAMPA_OPTIONS)
@pytest.mark.parametrize("init", [True, False])
def test_sampa_update(device, dtype, options, init, gen):
    x = _rand(SHAPES, dtype, gen, device)
    g_tilde = _rand(SHAPES, dtype, gen, device)
    g_y = _rand(SHAPES, dtype, gen, device)
    bufs0 = _rand(SHAPES, dtype, gen, device)
    uses = options["momentum"] != 0
    lam = 0.2
    runs = {}
    for backend in ("triton", "torch"):
        params = _rand(SHAPES, dtype, gen, device)
        bufs = _clones(bufs0)
        ops.sampa_update_(params, x, g_tilde, g_y, bufs if uses else None, lam=lam, lr=0.1,
                          init_buffers=init, backend=backend, **options)
        runs[backend] = (params, bufs)
    (params, bufs), (ref_params, ref_bufs) = runs["triton"], runs["torch"]
    for i, (xi, gt, gy, b0) in enumerate(zip(x, g_tilde, g_y, bufs0)):
        g = (1 - lam) * gt.double() + lam * gy.double()
        want_x, want_b = _sgd64(xi.double(), g, b0.double(), lr=0.1, init=init, **options)
        _close(params[i], want_x, dtype, scale=2.0)
        _close_to_torch(params[i], ref_params[i], dtype, scale=2.0)
        if uses:
            _close(bufs[i], want_b, dtype, scale=2.0)
            _close_to_torch(bufs[i], ref_bufs[i], dtype, scale=2.0)


# -- many tensors, empty lists, layouts ----------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_a_thousand_tensors_in_one_launch(device, gen):
    """1031 tiny tensors (a prime count, sizes 1..7): one launch per op, every op."""
    shapes = [(1 + (i * 5) % 7,) for i in range(1031)]
    dtype = torch.float32
    x = _rand(shapes, dtype, gen, device)
    g = _rand(shapes, dtype, gen, device)
    g2 = _rand(shapes, dtype, gen, device)
    bufs0 = _rand(shapes, dtype, gen, device)
    misses = tb.CACHE.misses

    norm = ops.grad_norm(g, x, 0.01, backend="triton")
    want = math.sqrt(sum((((p.double().abs() + 0.01) * q.double()) ** 2).sum().item()
                         for p, q in zip(x, g)))
    assert abs(norm.item() - want) / want < 2e-6
    assert tb.CACHE.misses == misses + 1, "one table for the whole list"

    params, backups = _clones(x), [torch.empty_like(t) for t in x]
    ops.perturb_(params, g, backups, torch.tensor(0.5, device=device), backend="triton")
    for p, xi, gi in zip(params, x, g):
        _close(p, xi.double() + 0.5 * gi.double(), dtype, scale=2.0)
    ops.restore_(params, backups, backend="triton")
    assert all(_same_bits(p, xi) for p, xi in zip(params, x))

    sgd = dict(momentum=0.9, dampening=0.0, weight_decay=1e-3, nesterov=False, maximize=False)
    bufs = _clones(bufs0)
    ops.restore_sgd_(params, x, g, bufs, lr=0.1, backend="triton", **sgd)
    for p, xi, gi, b0 in zip(params, x, g, bufs0):
        _close(p, _sgd64(xi.double(), gi.double(), b0.double(), lr=0.1, init=False, **sgd)[0],
               dtype, scale=2.0)

    m, v, _ = _adam_state(dtype, gen, device, shapes)
    m0, v0 = _clones(m), _clones(v)
    steps = [torch.tensor(0.0) for _ in shapes]
    ops.restore_adamw_(params, x, g, m, v, None, steps, **BETAS, weight_decay=1e-2,
                       decoupled_weight_decay=True, backend="triton")
    for i in range(len(shapes)):
        want = _adam64(x[i].double(), g[i].double(), m0[i].double(), v0[i].double(), None, 1,
                       **BETAS, weight_decay=1e-2, amsgrad=False, maximize=False,
                       decoupled_weight_decay=True)
        _close(params[i], want[0], dtype, scale=2.0)

    params, ys = _clones(x), [torch.empty_like(t) for t in x]
    ops.sampa_points_(params, g, bufs0, backups, ys, torch.tensor(0.5, device=device), lr=0.1,
                      backend="triton", **sgd)
    ops.sampa_update_(params, backups, g, g2, _clones(bufs0), lam=0.25, lr=0.1,
                      backend="triton", **sgd)
    for p, xi, gi, gyi, b0 in zip(params, x, g, g2, bufs0):
        combined = 0.75 * gi.double() + 0.25 * gyi.double()
        _close(p, _sgd64(xi.double(), combined, b0.double(), lr=0.1, init=False, **sgd)[0],
               dtype, scale=2.0)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_lists_and_empty_tensors(device):
    one = torch.tensor(1.0, device=device)
    # The public ops hand no group to a backend for empty lists ...
    ops.perturb_([], [], [], one, backend="triton")
    ops.restore_([], [], backend="triton")
    ops.restore_sgd_([], [], [], None, lr=0.1, backend="triton")
    ops.sampa_update_([], [], [], [], None, lam=0.2, lr=0.1, backend="triton")
    with pytest.raises(ValueError, match="at least one"):
        ops.grad_norm([], backend="triton")
    # ... and the backend treats an empty group as nothing to do (grad_sumsq excepted).
    tb.perturb_([], [], [], one)
    tb.restore_([], [])
    tb.restore_sgd_([], [], [], None, lr=0.1)
    tb.restore_adamw_([], [], [], [], [], None, [], **BETAS)
    tb.sampa_points_([], [], None, [], [], one, lr=0.1)
    tb.sampa_update_([], [], [], [], None, lam=0.2, lr=0.1)
    # Tensors without elements: no block to launch, a zero norm.
    empty = [torch.empty(0, device=device), torch.empty(0, 3, device=device)]
    assert ops.grad_norm(empty, backend="triton").item() == 0.0
    ops.perturb_(empty, empty, _clones(empty), one, backend="triton")


@pytest.mark.parametrize("device", DEVICES)
def test_layouts_the_kernels_cannot_address_go_to_the_torch_backend(device, gen):
    """Policy: positions whose tensors are not one dense run of numel elements
    (or whose layouts differ within the position) are served by the torch
    backend; the rest of the list still runs in the kernels. Dense permuted
    layouts (channels-last) run in the kernels."""
    def r(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    channels_last = r(4, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    params = [
        r(20, 8)[:, ::2],                # strided slice: gaps between elements
        r(6, 10).t(),                    # transposed: dense, but its grad below is not
        channels_last,                   # dense permutation, grad alike
        r(33),                           # plain
    ]
    grads = [
        r(20, 4),
        r(6, 10).t().contiguous(),       # same shape, different strides from its param
        torch.randn_like(channels_last).contiguous(memory_format=torch.channels_last),
        r(33),
    ]
    backups = [torch.empty_like(p) for p in params]
    plan = tb._plan([params, grads, backups])
    assert plan.other == (0, 1) and plan.kernel == (2, 3)
    originals = _clones(params)
    ops.perturb_(params, grads, backups, torch.tensor(0.3, device=device), backend="triton")
    for p, w, g, b in zip(params, originals, grads, backups):
        assert torch.equal(b, w)
        _close(p, w.double() + 0.3 * g.double(), torch.float32, scale=2.0)
    norm = ops.grad_norm(grads, backend="triton")
    want = math.sqrt(sum((g.double() ** 2).sum().item() for g in grads))
    assert abs(norm.item() - want) / want < 2e-6


@pytest.mark.parametrize("device", DEVICES)
def test_fp64_is_served_by_the_torch_backend(device, gen):
    params = _rand([(7,), (1030,)], torch.float64, gen, device)
    grads = _rand([(7,), (1030,)], torch.float64, gen, device)
    reference = _clones(params)
    ops.perturb_(params, grads, [torch.empty_like(p) for p in params],
                 torch.tensor(0.1, dtype=torch.float64, device=device), backend="triton")
    ops.perturb_(reference, grads, [torch.empty_like(p) for p in params],
                 torch.tensor(0.1, dtype=torch.float64, device=device), backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(params, reference))
    assert ops.grad_norm(grads, backend="triton").dtype == torch.float64


# -- the table cache -----------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_tables_are_cached_and_rebuilt_when_an_address_changes(device, gen):
    params = _rand([(5,), (40,)], torch.float32, gen, device)
    grads = _rand([(5,), (40,)], torch.float32, gen, device)
    backups = [torch.empty_like(p) for p in params]
    scale = torch.tensor(0.5, device=device)
    tb.CACHE.clear()
    misses = tb.CACHE.misses
    for _ in range(3):
        ops.restore_(params, backups, backend="triton")
        ops.perturb_(params, grads, backups, scale, backend="triton")
    assert tb.CACHE.misses == misses + 2, "one table per operand-list set, then hits"

    # A gradient re-allocated (zero_grad(set_to_none=True) then backward): new address.
    ops.restore_(params, backups, backend="triton")
    x = _clones(params)
    old = grads[1]
    grads[1] = torch.randn(40, generator=gen).to(device) * 7
    assert grads[1].data_ptr() != old.data_ptr()
    ops.perturb_(params, grads, backups, scale, backend="triton")
    assert tb.CACHE.misses == misses + 3
    _close(params[1], x[1].double() + 0.5 * grads[1].double(), torch.float32, scale=8.0)

    # The same storage holding a differently shaped tensor is a different table too.
    ops.restore_(params, backups, backend="triton")
    storage = torch.zeros(64, device=device)
    a, b = storage[:40], storage[:5]
    key_a = tb.kernels.tables.fingerprint([[a]])
    key_b = tb.kernels.tables.fingerprint([[b]])
    assert a.data_ptr() == b.data_ptr() and key_a != key_b


@_NEEDS_TRITON
def test_the_cache_is_bounded():
    cache = tb.kernels.tables.TableCache(capacity=3)
    for key in range(5):
        cache.get(key, lambda: object())
    assert len(cache) == 3 and cache.misses == 5
    cache.get(4, lambda: object())
    assert cache.hits == 1


@_NEEDS_TRITON
def test_block_map_handles_chunk_starts_beyond_int32():
    index, starts = tb.kernels.tables.block_map([3, 0, 2**31 + 5], chunk=2**30)
    assert index == [0, 2, 2, 2]
    assert starts == [0, 0, 2**30, 2**31]


@pytest.mark.parametrize("device", DEVICES)
def test_int64_chunk_offsets(device, gen):
    """A chunk starting past 2^31 elements, without allocating 8 GiB: a table whose
    tensor begins 2^31 elements before a small buffer, with only its last block.
    Truncating the start to int32 would address memory 8 GiB away."""
    K = tb.kernels
    chunk = K.tables.CHUNK
    start = 2**31  # a multiple of CHUNK
    n = 100
    buf = torch.randn(n + 8, generator=gen).to(device)  # 8 guard elements
    grad = torch.randn(n + 8, generator=gen).to(device)
    backup = torch.zeros(n + 8, device=device)
    before = buf.clone()
    shift = start * buf.element_size()
    addresses = [t.data_ptr() - shift for t in (buf, grad, backup)]
    assert start % chunk == 0
    meta = torch.tensor([0, start, start + n] + addresses, dtype=torch.int64, device=device)
    table = K.tables.Table(meta=meta, n_blocks=1, n_tensors=1, aligned=False)
    K.perturb.perturb(table, tb._TL_DTYPE[torch.float32], torch.tensor(0.5, device=device),
                      None)
    _close(buf[:n], before[:n].double() + 0.5 * grad[:n].double(), torch.float32, scale=2.0)
    assert torch.equal(buf[n:], before[n:]) and torch.equal(backup[:n], before[:n])
    partial = K.norm.sumsq(K.tables.Table(meta=meta[:4].clone(), n_blocks=1, n_tensors=1,
                                          aligned=False), tb._TL_DTYPE[torch.float32], None)
    # The table's operand 0 is buf here (the first address): its first n elements.
    assert abs(partial.item() - (buf[:n].double() ** 2).sum().item()) < 1e-4 * partial.item()


# -- registration and compilation ----------------------------------------------------------


def _run_python(code: str, env_updates: dict[str, str | None]) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    for key, value in env_updates.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=600,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_registration_without_triton_or_interpreter():
    """No Triton: the backend still imports and says why; no interpreter: CPU refused."""
    code = """
        import sys
        sys.modules["triton"] = None  # as if Triton were not installed
        import sam_fast
        from sam_fast import dispatch
        print(dispatch.why_unavailable("triton", "cuda"))
        print(dispatch.resolve("auto", __import__("torch").device("cpu")))
    """
    out = _run_python(code, {"TRITON_INTERPRET": None})
    assert out.returncode == 0, out.stderr
    reason, auto_cpu = out.stdout.strip().splitlines()
    assert "Triton" in reason and auto_cpu != "triton"
    code = """
        import sam_fast
        from sam_fast import dispatch
        print(dispatch.why_unavailable("triton", "cpu"))
        print(dispatch.why_unavailable("triton", "cuda"))
    """
    out = _run_python(code, {"TRITON_INTERPRET": None})
    assert out.returncode == 0, out.stderr
    cpu, cuda = out.stdout.strip().splitlines()
    assert "TRITON_INTERPRET=1" in cpu and cuda == "None"


_COMPILE_CHECK = """
    import re, triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from sam_fast.backends import triton_backend as tb
    K = tb.kernels
    table = {"meta": "*i64", "B": "i32", "T": "i32"}
    sizes = {"BLOCK": K.tables.BLOCK, "CHUNK": K.tables.CHUNK}

    def check(fn, scalars, flags):
        sig = {**table, **scalars, **{k: "constexpr" for k in [*flags, *sizes]}}
        src = ASTSource(fn=fn, signature=sig, constexprs={**flags, **sizes})
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                             options=dict(K.tables.LAUNCH)).asm["ptx"]
        vector = bool(re.search(r"ld\\.global[.\\w:]*\\.v4", ptx))
        print(fn.fn.__name__, flags.get("ALIGNED"), vector)

    f32 = "fp32"
    for dt in (tl.float32, tl.bfloat16):
        for aligned in (True, False):
            check(K.perturb._perturb_kernel, {"scale": "*fp32", "eta": f32},
                  dict(DT=dt, ASAM=True, ALIGNED=aligned))
    check(K.perturb._copy_kernel, {}, dict(BITS=tl.int16, ALIGNED=True))
    check(K.norm._sumsq_partials_kernel, {"partials": "*fp32", "eta": f32},
          dict(DT=tl.float16, ASAM=True, ALIGNED=True))
    check(K.sgd._restore_sgd_kernel,
          {"grad_scale": "*fp32", "found_inf": "*fp32", **dict.fromkeys(
              ["lr", "momentum", "one_minus_dampening", "weight_decay"], f32)},
          dict(DT=tl.bfloat16, HAS_SCALE=True, HAS_INF=True, HAS_WD=True, MOMENTUM=True,
               NESTEROV=True, MAXIMIZE=True, INIT=False, ALIGNED=True))
    check(K.adam._restore_adam_kernel,
          {"grad_scale": "*fp32", "found_inf": "*fp32", **dict.fromkeys(
              ["beta1", "beta2", "lerp_w", "one_minus_beta2", "eps", "weight_decay", "decay",
               "neg_lr", "host_step_size", "host_bc2_sqrt"], f32)},
          dict(DT=tl.float32, STEP_DT=tl.float32, HAS_SCALE=True, HAS_INF=True, HAS_WD=True,
               DECOUPLED=False, AMSGRAD=True, MAXIMIZE=False, LERP_SMALL=True,
               DEVICE_STEPS=True, ALIGNED=True))
    sampa = dict(DT=tl.float32, HAS_WD=True, MOMENTUM=True, NESTEROV=True, MAXIMIZE=False,
                 INIT=False, ALIGNED=True)
    check(K.sampa._points_kernel, {"scale": "*fp32", **dict.fromkeys(
        ["lr", "momentum", "one_minus_dampening", "weight_decay"], f32)}, sampa)
    check(K.sampa._update_kernel, dict.fromkeys(
        ["lam", "one_minus_lam", "lr", "momentum", "one_minus_dampening", "weight_decay"], f32),
        sampa)
"""


def test_kernels_compile_for_h100_with_vector_accesses():
    """Every kernel family compiles for sm_90 (no GPU needed: Triton's bundled ptxas),
    and 16-byte aligned tables give 16-byte vector loads in the unmasked loop."""
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"this Triton has no NVIDIA backend to compile with: {exc}")
    out = _run_python(_COMPILE_CHECK, {"TRITON_INTERPRET": None,
                                       "TRITON_DEFAULT_FP_FUSION": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line.split() for line in out.stdout.strip().splitlines()]
    assert len(lines) == 10
    for name, aligned, vector in lines:
        if aligned == "True":
            assert vector == "True", f"{name}: aligned operands should vectorize"
        else:
            assert vector == "False", f"{name}: unaligned operands must not be vectorized"
