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

import numpy as np
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


# -- float64 formulas, written from docs/design.md section 2 and the torch.optim docs ----------


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

# (normalize, grad scale): SAM / ASAM, USAM, each with and without a grad scale. 3 is
# not a power of two, unlike GradScaler's scales: S * eps is then rounded, and fusing
# that product into the add would show (see the contract tests).
SCALE_CASES = [(True, None), (True, 3.0), (False, None), (False, 3.0)]


def _scale64(sumsq, rho, eps, normalize, grad_scale):
    """The perturbation scale in float64 from the equations: rho / (||g|| + S eps), rho / S."""
    s = 1.0 if grad_scale is None else grad_scale
    return rho / (math.sqrt(sumsq) + s * eps) if normalize else rho / s


def _contract_scale(sumsq, rho, eps, normalize, grad_scale):
    """The op contract's fp32 chain (notes: op contract) in numpy fp32 scalars, whose
    operations are IEEE correctly rounded: sqrt, the add apart from the product
    S * eps, a reciprocal, then the product with rho; 0 for a non-finite sum."""
    f = np.float32
    ss = f(sumsq)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        if normalize:
            eps_term = f(eps) if grad_scale is None else f(grad_scale) * f(eps)
            scale = (f(1) / (np.sqrt(ss) + eps_term)) * f(rho)
        else:
            scale = f(rho) if grad_scale is None else (f(1) / f(grad_scale)) * f(rho)
    return torch.tensor(scale if np.isfinite(ss) else f(0), dtype=torch.float32)


def _torch_sqrt_is_correctly_rounded(sumsq):
    """PyTorch 2.13's CPU sqrt is not correctly rounded (off by an ulp for ~17% of
    fp32 inputs); CUDA's is, and so are the kernels' sqrt_rn and the contract."""
    v = np.float32(sumsq.item())
    return _same_bits(torch.sqrt(sumsq.cpu()), torch.tensor(np.sqrt(v)))


def _bits(t):
    return t.reshape(-1).view(torch.int32 if t.element_size() == 4 else torch.int16)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eta", [None, 0.0, 0.01])
@pytest.mark.parametrize("normalize,grad_scale", SCALE_CASES)
def test_perturb_and_restore(device, dtype, eta, normalize, grad_scale, gen):
    params = _rand(SHAPES, dtype, gen, device)
    grads = _rand(SHAPES, dtype, gen, device, scale=1.0 if grad_scale is None else grad_scale)
    weights = None if eta is None else params
    sumsq = ops.grad_sumsq(grads, weights, eta or 0.0, backend="torch")
    gs = None if grad_scale is None else torch.tensor(grad_scale, device=device)
    originals = _clones(params)
    backups = [torch.empty_like(p) for p in params]
    kw = dict(rho=0.05, eps=1e-3, normalize=normalize, eta=eta, grad_scale=gs)
    ops.perturb_(params, grads, backups, sumsq, backend="triton", **kw)
    # The torch backend's elementwise ops with the contract's scale: bit for bit.
    scale = _contract_scale(sumsq.item(), 0.05, 1e-3, normalize, grad_scale).to(device)
    reference = _clones(originals)
    tb.torch_ops._perturb_by_scale(reference, grads, _clones(backups), scale, eta)
    if _torch_sqrt_is_correctly_rounded(sumsq) or not normalize:
        # ... which is the torch backend's op itself wherever its sqrt is right.
        spec = _clones(originals)
        ops.perturb_(spec, grads, _clones(backups), sumsq, backend="torch", **kw)
        assert all(_same_bits(a, b) for a, b in zip(spec, reference))
    scale64 = _scale64(sumsq.item(), 0.05, 1e-3, normalize, grad_scale)
    for p, r, w, g, b in zip(params, reference, originals, grads, backups):
        assert _same_bits(b, w), "the backup must hold the weights' exact bits"
        assert _same_bits(p, r), "perturb_ must equal the spec bit for bit"
        t = (w.double().abs() + eta) ** 2 if eta is not None else 1.0
        # The fp32 scale is a few fp32 roundings (sqrt, add, reciprocal, product)
        # from the float64 one: 4 more of e's magnitude on top of _close's.
        _close(p, w.double() + scale64 * t * g.double(), dtype, scale=2.0, fp32_ops=8.0)
    ops.restore_(params, backups, backend="triton")
    assert all(_same_bits(p, w) for p, w in zip(params, originals))


def _scale_of_kernel(device, sumsq, **kw):
    """The kernel's scale itself: w = 0, g = 1 make w + scale * g the scale's fp32 bits."""
    p, g = torch.zeros(1, device=device), torch.ones(1, device=device)
    tb.perturb_([p], [g], [torch.empty_like(p)], sumsq, **kw)
    return p[0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize,grad_scale", SCALE_CASES + [(True, 65536.0)])
def test_perturbation_scale_follows_the_contract_bit_for_bit(device, normalize, grad_scale,
                                                              gen):
    """The scale derived in the kernel has exactly the contract's bits over sums of
    squares spread across 60 binades; the sample is one on which the obvious other
    roundings (one division, the add fused with S * eps, fp64 math) differ from the
    contract, so a kernel that took one of them fails here. The torch backend's
    perturbation_scale agrees with the contract wherever PyTorch's sqrt is
    correctly rounded (always on CUDA; see _torch_sqrt_is_correctly_rounded)."""
    values = (torch.rand(48, generator=gen, dtype=torch.float64) * 60 - 30).exp2()
    values = values.float().tolist() + [0.0, 2.0**-140, 1.0, 4.0, 3.4e38]
    rho, eps = 0.05, 1e-3
    gs = None if grad_scale is None else torch.tensor(grad_scale, device=device)
    f = np.float32
    s = f(1.0 if grad_scale is None else grad_scale)
    differs = {"division": 0, "fused add": 0, "fp64": 0}
    for v in values:
        sumsq = torch.tensor(v, dtype=torch.float32, device=device)
        got = _scale_of_kernel(device, sumsq, rho=rho, eps=eps, normalize=normalize,
                               grad_scale=gs).cpu()
        want = _contract_scale(v, rho, eps, normalize, grad_scale)
        assert _same_bits(got, want), (v, got.item(), want.item())
        if _torch_sqrt_is_correctly_rounded(sumsq) or not normalize:
            spec = tb.torch_ops.perturbation_scale(sumsq, rho, eps, normalize, gs)
            assert _same_bits(spec.cpu(), want), (v, spec.item(), want.item())
        if normalize:
            norm = np.sqrt(f(v))
            division = f(rho) / (norm + s * f(eps))
            fused = (f(1) / f(np.float64(norm) + np.float64(s) * np.float64(f(eps)))) * f(rho)
        else:
            division = f(rho) / s
            fused = want.numpy()
        alternatives = {"division": division, "fused add": fused,
                        "fp64": f(_scale64(v, rho, eps, normalize, grad_scale))}
        for name, alt in alternatives.items():
            differs[name] += not _same_bits(torch.tensor(alt), want)
    if normalize:
        assert differs["division"] and differs["fp64"], differs
        if grad_scale is not None and math.log2(grad_scale) % 1:
            assert differs["fused add"], differs  # (a power of two makes S * eps exact)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("normalize,grad_scale", SCALE_CASES)
@pytest.mark.parametrize("eps", [0.0, 1e-12, 2.0**-140])
def test_perturbation_scale_edge_values(device, normalize, grad_scale, eps):
    """A zero sum of squares with eps = 0 (scale inf, as the spec says), an eps below
    fp32's normal range (a Python float Triton would widen to fp64 under the
    interpreter), with and without a grad scale: the contract's bits."""
    gs = None if grad_scale is None else torch.tensor(grad_scale, device=device)
    for v in (0.0, 1e-30, 4.0):
        sumsq = torch.tensor(v, device=device)
        got = _scale_of_kernel(device, sumsq, rho=0.5, eps=eps, normalize=normalize,
                               grad_scale=gs).cpu()
        want = _contract_scale(v, 0.5, eps, normalize, grad_scale)
        assert _same_bits(got, want), (v, got.item(), want.item())
        spec = tb.torch_ops.perturbation_scale(sumsq, 0.5, eps, normalize, gs)
        assert _same_bits(spec.cpu(), want)  # these sqrt are exact: no CPU discrepancy


@_INF_TIMES_ZERO
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("eta", [None, 0.01])
@pytest.mark.parametrize("normalize,grad_scale", SCALE_CASES)
def test_perturb_with_a_non_finite_sum_of_squares_is_exactly_identity(device, bad, eta,
                                                                       normalize, grad_scale,
                                                                       gen):
    params = _rand([(9,), (1030,)], torch.float32, gen, device)
    grads = _rand([(9,), (1030,)], torch.float32, gen, device)
    grads[0][3] = bad
    grads[1][1029] = bad
    sumsq = ops.grad_sumsq(grads, backend="triton")
    assert not torch.isfinite(sumsq)
    gs = None if grad_scale is None else torch.tensor(grad_scale, device=device)
    originals = _clones(params)
    backups = [torch.empty_like(p) for p in params]
    ops.perturb_(params, grads, backups, sumsq, rho=0.05, normalize=normalize, eta=eta,
                 grad_scale=gs, backend="triton")
    for p, w, b in zip(params, originals, backups):
        assert _same_bits(p, w) and _same_bits(b, w)


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
    sumsq = ops.grad_sumsq(g_y, backend="torch")
    runs = {}
    for backend in ("triton", "torch"):
        params = _clones(x)
        backups = [torch.empty_like(t) for t in x]
        ys = [torch.empty_like(t) for t in x]
        bufs_in = _clones(bufs)
        ops.sampa_points_(params, g_y, bufs_in if reads else None, backups, ys, sumsq, rho=0.05,
                          eps=1e-3, lr=0.1, init_buffers=init, backend=backend, **options)
        assert all(_same_bits(a, b) for a, b in zip(bufs_in, bufs)), "buffers are read only"
        runs[backend] = (params, backups, ys)
    (params, backups, ys), (ref_params, _, ref_ys) = runs["triton"], runs["torch"]
    # x~ = x + scale * g_y with the contract's scale, elementwise as the torch backend.
    scale = _contract_scale(sumsq.item(), 0.05, 1e-3, True, None).to(device)
    want_x = _clones(x)
    tb.torch_ops._perturb_by_scale(want_x, g_y, _clones(x), scale, None)
    if _torch_sqrt_is_correctly_rounded(sumsq):
        assert all(_same_bits(a, b) for a, b in zip(ref_params, want_x))
    scale64 = _scale64(sumsq.item(), 0.05, 1e-3, True, None)
    for i, (xi, g, b0) in enumerate(zip(x, g_y, bufs)):
        assert _same_bits(backups[i], xi)
        want_y, _ = _sgd64(xi.double(), g.double(), b0.double(), lr=0.1, init=init, **options)
        _close(ys[i], want_y, dtype, scale=2.0)
        _close_to_torch(ys[i], ref_ys[i], dtype, scale=2.0)
        assert _same_bits(params[i], want_x[i]), "x~ must follow the spec bit for bit"
        _close(params[i], xi.double() + scale64 * g.double(), dtype, scale=2.0, fp32_ops=8.0)


@_INF_TIMES_ZERO
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_sampa_points_with_a_non_finite_sum_of_squares_keep_x(device, bad, gen):
    x = _rand([(5,), (1100,)], torch.float32, gen, device)
    g_y = _rand([(5,), (1100,)], torch.float32, gen, device)
    g_y[1][1099] = bad
    sumsq = ops.grad_sumsq(g_y, backend="triton")
    params, backups, ys = _clones(x), [torch.empty_like(t) for t in x], _clones(x)
    ops.sampa_points_(params, g_y, None, backups, ys, sumsq, rho=0.05, lr=0.1,
                      backend="triton")
    assert all(_same_bits(p, xi) for p, xi in zip(params, x))
    assert all(_same_bits(b, xi) for b, xi in zip(backups, x))


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
    tb.CACHE.clear()
    misses = tb.CACHE.misses

    norm = ops.grad_norm(g, x, 0.01, backend="triton")
    want = math.sqrt(sum((((p.double().abs() + 0.01) * q.double()) ** 2).sum().item()
                         for p, q in zip(x, g)))
    assert abs(norm.item() - want) / want < 2e-6
    plan, table = tb._plan([g, x])
    assert plan.other == () and table.n_blocks == len(shapes), "one launch, a block each"
    assert tb.CACHE.misses == misses + 3, "one block map and one row per list"

    params, backups = _clones(x), [torch.empty_like(t) for t in x]
    one = torch.tensor(1.0, device=device)
    ops.perturb_(params, g, backups, one, rho=0.5, normalize=False, backend="triton")
    assert tb.CACHE.misses == misses + 5, "the same sizes and gradients: two new rows"
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
    sumsq = ops.grad_sumsq(g, backend="triton")
    ops.sampa_points_(params, g, bufs0, backups, ys, sumsq, rho=0.5, lr=0.1, backend="triton",
                      **sgd)
    scale = 0.5 / math.sqrt(sum((t.double() ** 2).sum().item() for t in g))
    for p, xi, gi in zip(params, x, g):
        _close(p, xi.double() + scale * gi.double(), dtype, scale=2.0)
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
    ops.perturb_([], [], [], one, rho=0.1, backend="triton")
    ops.restore_([], [], backend="triton")
    ops.restore_sgd_([], [], [], None, lr=0.1, backend="triton")
    ops.sampa_update_([], [], [], [], None, lam=0.2, lr=0.1, backend="triton")
    with pytest.raises(ValueError, match="at least one"):
        ops.grad_norm([], backend="triton")
    # ... and the backend treats an empty group as nothing to do (grad_sumsq excepted).
    tb.perturb_([], [], [], one, rho=0.1, eps=1e-12, normalize=True)
    tb.restore_([], [])
    tb.restore_sgd_([], [], [], None, lr=0.1)
    tb.restore_adamw_([], [], [], [], [], None, [], **BETAS)
    tb.sampa_points_([], [], None, [], [], one, rho=0.1, eps=1e-12, lr=0.1)
    tb.sampa_update_([], [], [], [], None, lam=0.2, lr=0.1)
    # Tensors without elements: no block to launch, a zero norm.
    empty = [torch.empty(0, device=device), torch.empty(0, 3, device=device)]
    assert ops.grad_norm(empty, backend="triton").item() == 0.0
    ops.perturb_(empty, empty, _clones(empty), one, rho=0.1, backend="triton")


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
    plan, table = tb._plan([params, grads, backups])
    assert plan.other == (0, 1) and plan.kernel == (2, 3)
    assert table.n_blocks == 2 and len(table.rows) == 3
    originals = _clones(params)
    ops.perturb_(params, grads, backups, torch.tensor(1.0, device=device), rho=0.3,
                 normalize=False, backend="triton")
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
    sumsq = ops.grad_sumsq(grads, backend="torch")
    assert sumsq.dtype == torch.float64
    ops.perturb_(params, grads, [torch.empty_like(p) for p in params], sumsq, rho=0.1,
                 backend="triton")
    ops.perturb_(reference, grads, [torch.empty_like(p) for p in params], sumsq, rho=0.1,
                 backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(params, reference))
    assert ops.grad_norm(grads, backend="triton").dtype == torch.float64


# -- block maps, address rows and their cache ----------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_new_gradients_cost_one_row_and_the_rest_hits(device, gen):
    """The training loop's pattern: parameters, backups and buffers keep their storage,
    gradients are new tensors at every backward. Each step then misses exactly one
    address row (the gradients'); the block map and the other rows hit, and the
    results are those of the torch backend on the same tensors."""
    shapes = [(5,), (40,), (3, 7)]
    params = _rand(shapes, torch.float32, gen, device)
    backups = [torch.empty_like(p) for p in params]
    bufs = _rand(shapes, torch.float32, gen, device)
    ref_params, ref_bufs = _clones(params), _clones(bufs)
    tb.CACHE.clear()
    kept = []  # keep every step's gradients alive, so that no address is reused
    for step in range(4):
        grads = _rand(shapes, torch.float32, gen, device, scale=step + 1.0)
        kept.append(grads)
        misses = tb.CACHE.misses
        sumsq = ops.grad_sumsq(grads, backend="triton")
        ops.perturb_(params, grads, backups, sumsq, rho=0.05, backend="triton")
        ops.restore_sgd_(params, backups, grads, bufs, lr=0.1, momentum=0.9, backend="triton")
        new = tb.CACHE.misses - misses
        # step 0 builds the block map and the params/backups/buffers rows too
        assert new == (5 if step == 0 else 1), f"step {step}: {new} misses"
        ref_backups = [torch.empty_like(p) for p in params]
        ops.perturb_(ref_params, grads, ref_backups, sumsq, rho=0.05, backend="torch")
        ops.restore_sgd_(ref_params, ref_backups, grads, ref_bufs, lr=0.1, momentum=0.9,
                         backend="torch")
        for p, r in zip(params + bufs, ref_params + ref_bufs):
            _close_to_torch(p, r, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_one_storage_under_two_shapes(device, gen):
    """The same address with another size: the same row (its content is the address)
    with another block map, so each launch covers exactly its tensor."""
    storage = torch.randn(64, generator=gen).to(device)
    ones = torch.ones(64, device=device)
    K = tb.kernels
    for n in (40, 5, 64):
        view = storage[:n]
        plan, table = tb._plan([[view]])
        assert table.n_blocks == 1
        assert table.blocks.tolist() == [0, 0, n], "tensor 0, chunk start 0, n elements"
        assert table.rows[0].tolist() == [storage.data_ptr()]
        total = K.norm.sumsq(table, tb._TL_DTYPE[torch.float32], None)
        assert abs(total.item() - (view.double() ** 2).sum().item()) < 1e-5 * total.item()
    del ones


def _byte_cache(capacity_bytes):
    return tb.kernels.tables.TableCache(capacity_bytes=capacity_bytes)


@_NEEDS_TRITON
def test_the_cache_is_bounded_in_bytes_lru():
    cpu = torch.device("cpu")
    cache = _byte_cache(capacity_bytes=3 * 8 * 10)  # three rows of ten addresses
    rows = [tuple(range(16 * k, 16 * k + 160, 16)) for k in range(5)]
    for r in rows[:3]:
        cache.row(r, cpu, False)
    assert cache.nbytes == 240 and len(cache) == 3 and cache.misses == 3
    cache.row(rows[0], cpu, False)  # a hit makes row 0 the most recent
    assert cache.hits == 1
    cache.row(rows[3], cpu, False)  # evicts the least recently used: row 1
    cache.row(rows[0], cpu, False)
    cache.row(rows[2], cpu, False)
    assert cache.hits == 3 and cache.misses == 4
    cache.row(rows[1], cpu, False)  # was evicted: built again
    assert cache.misses == 5 and cache.nbytes <= cache.capacity_bytes
    # A block map counts its bytes too: 3 int64 per block.
    blocks = cache.block_map((1, 2, 3), cpu, False)
    assert blocks.n_blocks == 3 and blocks.tensor.tolist() == [0, 1, 2, 0, 0, 0, 1, 2, 3]
    assert cache.nbytes <= cache.capacity_bytes
    # One entry larger than the bound is still returned (the call launches with it).
    big = cache.row(tuple(range(0, 16 * 100, 16)), cpu, False)
    assert big.tensor.numel() == 100 and len(cache) == 1


@_NEEDS_TRITON
def test_captured_entries_are_never_evicted_or_freed(monkeypatch):
    """Anything used while the stream is capturing (simulated here) leaves the LRU for
    good: pressure does not evict it, clear() keeps it, its tensor stays the same."""
    cpu = torch.device("cpu")
    cache = _byte_cache(capacity_bytes=2 * 8 * 4)
    eager = cache.row((16, 32, 48, 64), cpu, False)
    during = cache.row((0, 16, 32, 48), cpu, True)       # built during capture
    again = cache.row((16, 32, 48, 64), cpu, True)       # built before, used during capture
    assert again is eager and cache.captured_bytes == 64 and cache.nbytes == 0
    for k in range(10):  # pressure: many new rows, evicting each other
        cache.row(tuple(range(1000 * (k + 1), 1000 * (k + 1) + 64, 16)), cpu, False)
    assert cache.nbytes <= cache.capacity_bytes
    cache.clear()
    assert cache.row((0, 16, 32, 48), cpu, False) is during
    assert cache.row((16, 32, 48, 64), cpu, False) is eager
    assert cache.captured_bytes == 64 and cache.misses == 12
    cache.clear(captured=True)
    assert len(cache) == 0 and cache.captured_bytes == 0
    # The backend asks tables.capturing(device) once per call.
    monkeypatch.setattr(tb.kernels.tables, "capturing", lambda device: True)
    x = [torch.ones(3), torch.ones(4)]
    saved, tb.CACHE = tb.CACHE, _byte_cache(1 << 20)
    try:
        tb.grad_sumsq(x)
        assert tb.CACHE.captured_bytes == 8 * 2 + 8 * 3 * 2 and tb.CACHE.nbytes == 0
    finally:
        tb.CACHE = saved


@_NEEDS_TRITON
def test_capture_staging_never_reuses_memory():
    """The pinned staging memory of captured uploads: slices never overlap, stay 16-byte
    aligned, and a slab is replaced (not rewound) when it runs low."""
    made = []

    class Staging(tb.kernels.tables.CaptureStaging):
        SLAB = 64

        def _alloc(self, n):  # plain host memory: this machine may have no CUDA
            made.append(torch.empty(n, dtype=torch.int64))
            return made[-1]

    staging = Staging()
    staging.top_up()
    slices = [staging.take(n) for n in (3, 10, 1, 40, 30)]
    assert len(made) == 2, "the 30 elements did not fit in the first slab: a new one"
    slices.append(staging.take(4))
    staging.top_up()  # more than half of the second slab is used: a third one
    assert len(made) == 3
    slices.append(staging.take(4))
    assert slices[-1].data_ptr() == made[-1].data_ptr()
    slices.append(staging.take(100))  # larger than a slab: a slab of its own
    assert slices[-1].numel() == 100 and len(made) == 4
    spans = sorted((t.data_ptr(), t.data_ptr() + 8 * t.numel()) for t in slices)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:]))
    assert all(t.data_ptr() % 16 == 0 for t in slices)
    del made  # the slices alone keep their slabs alive


@pytest.mark.gpu
@pytest.mark.skipif(_CUDA_REASON is not None, reason=f"triton on CUDA: {_CUDA_REASON}")
def test_a_step_captured_in_a_cuda_graph_replays_like_eager_steps(gen):
    """A step whose gradients are allocated inside the capture (as backward does): their
    rows are uploaded during capture from pinned staging memory, everything the graph
    reads is kept, and eviction pressure between replays changes nothing."""
    device = "cuda"
    shapes = [(7,), (1030,), (33, 5), (16411,)]
    src = _rand(shapes, torch.float32, gen, device)        # the graph's static input
    state = [_rand(shapes, torch.float32, gen, device) for _ in range(2)]  # params, bufs

    def step(params, bufs):
        grads = [t * 1.5 for t in src]  # new tensors at every step
        backups = [torch.empty_like(p) for p in params]
        sumsq = tb.grad_sumsq(grads)
        tb.perturb_(params, grads, backups, sumsq, rho=0.05, eps=1e-12, normalize=True)
        tb.restore_sgd_(params, backups, grads, bufs, lr=0.1, momentum=0.9)

    params, bufs = _clones(state[0]), _clones(state[1])
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up, as torch.cuda.graphs asks
        step(params, bufs)
    torch.cuda.current_stream().wait_stream(side)
    eager_params, eager_bufs = _clones(params), _clones(bufs)
    captured = tb.CACHE.captured_bytes
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(params, bufs)
    assert tb.CACHE.captured_bytes > captured
    saved = tb.CACHE.capacity_bytes
    try:
        for k in range(3):
            for t in src:
                t.copy_(torch.randn(t.shape, generator=gen).to(device))
            graph.replay()
            step(eager_params, eager_bufs)
            tb.CACHE.capacity_bytes = 0  # evict everything evictable ...
            other = _rand([(3,), (5,)], torch.float32, gen, device)
            tb.grad_sumsq(other)         # ... and reuse freed memory
            torch.cuda.synchronize()
            for a, b in zip(params + bufs, eager_params + eager_bufs):
                assert _same_bits(a, b), f"replay {k}"
    finally:
        tb.CACHE.capacity_bytes = saved


@_NEEDS_TRITON
def test_block_map_handles_chunk_starts_beyond_int32():
    index, starts = tb.kernels.tables.block_map([3, 0, 2**31 + 5], chunk=2**30)
    assert index == [0, 2, 2, 2]
    assert starts == [0, 0, 2**30, 2**31]
    values = tb.kernels.tables.block_map_values([3, 0, 2**31 + 5], chunk=2**30)
    assert values[8:] == [3, 2**30, 2**30, 5], "the elements of each block's chunk"


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
    rows = tuple(torch.tensor([t.data_ptr() - shift], dtype=torch.int64, device=device)
                 for t in (buf, grad, backup))
    assert start % chunk == 0
    blocks = torch.tensor([0, start, n], dtype=torch.int64, device=device)
    table = K.tables.Table(blocks=blocks, n_blocks=1, rows=rows, aligned=False)
    K.perturb.perturb(table, tb._TL_DTYPE[torch.float32], torch.tensor(1.0, device=device),
                      rho=0.5, eps=0.0, normalize=False, eta=None, grad_scale=None)
    _close(buf[:n], before[:n].double() + 0.5 * grad[:n].double(), torch.float32, scale=2.0)
    assert torch.equal(buf[n:], before[n:]) and torch.equal(backup[:n], before[:n])
    partial = K.norm.sumsq(K.tables.Table(blocks=blocks, n_blocks=1, rows=rows[:1],
                                          aligned=False), tb._TL_DTYPE[torch.float32], None)
    assert abs(partial.item() - (buf[:n].double() ** 2).sum().item()) < 1e-4 * partial.item()


# -- specialisation: which variants get compiled ------------------------------------------


class _Signatures:
    """Records, for every launch of every kernel, the specialisation Triton computes
    from the arguments: the per-argument (type, specialisation) list that, with the
    options, is its compile-cache key (``JITFunction.run``: binder, then
    ``compute_cache_key``). It is computed here with Triton's own binder, built from
    the kernel's signature and do_not_specialize list, in a launch hook, so it works
    under the interpreter (which compiles nothing) and compiled alike."""

    def __init__(self):
        from triton.backends.compiler import BaseBackend
        from triton.runtime.jit import JITFunction, create_function_from_signature
        K = tb.kernels
        self.kernels = {
            "perturb": K.perturb._perturb_kernel, "copy": K.perturb._copy_kernel,
            "partials": K.norm._sumsq_partials_kernel, "sum": K.norm._sum_kernel,
            "sgd": K.sgd._restore_sgd_kernel, "adam": K.adam._restore_adam_kernel,
            "points": K.sampa._points_kernel, "update": K.sampa._update_kernel,
        }
        self.seen: dict[str, set] = {name: set() for name in self.kernels}
        self._hooks = {}
        for name, k in self.kernels.items():
            jit = k if isinstance(k, JITFunction) else JITFunction(k.fn, **k.kwargs)
            binder = create_function_from_signature(jit.signature, jit.params, BaseBackend)

            def hook(*args, _binder=binder, _name=name, **kwargs):
                spec = _binder(*args, **kwargs)[1]
                self.seen[_name].add(tuple((kind, repr(value)) for kind, value in spec))

            self._hooks[name] = hook

    def __enter__(self):
        for name, k in self.kernels.items():
            k.add_pre_run_hook(self._hooks[name])
        return self

    def __exit__(self, *exc):
        for name, k in self.kernels.items():
            k.pre_run_hooks.remove(self._hooks[name])


def _every_op(device, shapes, hp, gen):
    """One call of every op on ``shapes`` with the hyperparameters ``hp``, as given
    (Python ints stay ints: the backend is called directly, not through ops.py)."""
    x = _rand(shapes, torch.float32, gen, device)
    g = _rand(shapes, torch.float32, gen, device)
    b, y = [torch.empty_like(t) for t in x], [torch.empty_like(t) for t in x]
    bufs = _rand(shapes, torch.float32, gen, device)
    sgd = dict(lr=hp["lr"], momentum=hp["momentum"], dampening=hp["dampening"],
               weight_decay=hp["weight_decay"])
    sumsq = tb.grad_sumsq(g)
    tb.grad_sumsq(g, x, hp["eta"])
    for normalize in (True, False):
        tb.perturb_(x, g, b, sumsq, rho=hp["rho"], eps=hp["eps"], normalize=normalize,
                    eta=hp["eta"])
    tb.restore_(x, b)
    tb.restore_sgd_(x, b, g, bufs, **sgd)
    tb.restore_adamw_(x, b, g, _clones(bufs), [t.abs() for t in bufs], None,
                      [torch.tensor(3.0) for _ in x], lr=hp["lr"], beta1=0.9, beta2=0.999,
                      eps=hp["eps"], weight_decay=hp["weight_decay"])
    tb.sampa_points_(x, g, bufs, b, y, sumsq, rho=hp["rho"], eps=hp["eps"], **sgd)
    tb.sampa_update_(x, b, g, g, bufs, lam=hp["lam"], **sgd)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_variants_do_not_depend_on_int_hyperparameters_or_block_counts(device, gen):
    """torch.optim's defaults are Python ints (weight_decay=0, momentum=0, ...): passed
    on as they are they would reach Triton as i32 arguments, which it specialises
    (== 1 becomes a compile-time constant, a multiple of 16 another variant); block
    counts and lengths would do the same. The launchers pass floats and nothing at
    run time is specialised, so the variants (the cache keys) are the same for ints
    and floats, for 1, 16 or 17 blocks, and every runtime argument is unspecialised."""
    ints = [dict(lr=1, momentum=0, dampening=0, weight_decay=0, rho=1, eps=0, eta=0, lam=0),
            dict(lr=16, momentum=1, dampening=0, weight_decay=1, rho=16, eps=1, eta=1, lam=1)]
    runs = {}
    for blocks in (1, 16, 17):
        for k, hp in enumerate(ints):
            for kind in ("int", "float"):
                values = hp if kind == "int" else {n: float(v) for n, v in hp.items()}
                with _Signatures() as signatures:
                    _every_op(device, [(3,)] * blocks, values, gen)
                runs[(blocks, k, kind)] = signatures.seen
    first = runs[(1, 0, "float")]
    assert all(first.values()), "every kernel was launched"
    for key, seen in runs.items():
        if key[1] == 0:
            assert seen == first, f"{key}: other variants than {(1, 0, 'float')}"
    # The second set turns momentum / weight decay on: other flags, same rule.
    assert runs[(1, 1, "int")] == runs[(17, 1, "float")] == runs[(16, 1, "int")]
    for seen in runs.values():
        for spec in set().union(*seen.values()):
            for kind, value in spec:
                if kind != "constexpr":
                    assert value == "None", f"a specialised runtime argument: {spec}"
                    assert not kind.startswith("i") or kind == "i32", spec


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
    sizes = {"BLOCK": K.tables.BLOCK, "CHUNK": K.tables.CHUNK}
    SCALARS = {"sumsq", "grad_scale", "found_inf", "partials"}
    FLAGS = {"has_scale", "has_inf", "maximize", "init", "lerp_small", "normalize"}

    def arg_type(name):
        if name == "blocks" or name.endswith("_row"):
            return "*i64"  # the block map and the address rows
        if name == "B":
            return "i32"
        if name in FLAGS:
            return "u1"  # the runtime option flags: Python bools, as the binder types them
        return "*fp32" if name in SCALARS else "fp32"

    def compile_ptx(fn, flags):
        sig = {p.name: "constexpr" if p.is_constexpr else arg_type(p.name) for p in fn.params}
        src = ASTSource(fn=fn, signature=sig, constexprs={**flags, **sizes})
        return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(K.tables.LAUNCH)).asm["ptx"]

    def check(fn, flags, rounded_products=0):
        ptx = compile_ptx(fn, flags)
        vector = bool(re.search(r"ld\\.global[.\\w:]*\\.v4", ptx))
        print(fn.fn.__name__, flags.get("ALIGNED"), vector)
        # The factors that are 1.0 unless an option is on (kernels.common.mul_rn) stay
        # products of their own: mul.rn, which ptxas never contracts into an fma.
        assert len(re.findall(r"\\bmul\\.rn\\.f32", ptx)) >= rounded_products, fn

    for dt in (tl.float32, tl.bfloat16):
        for aligned in (True, False):
            check(K.perturb._perturb_kernel, dict(DT=dt, ASAM=True, ALIGNED=aligned))
    check(K.perturb._copy_kernel, dict(BITS=tl.int16, ALIGNED=True))
    check(K.norm._sumsq_partials_kernel, dict(DT=tl.float16, ASAM=True, ALIGNED=True))
    check(K.sgd._restore_sgd_kernel,
          dict(DT=tl.bfloat16, HAS_WD=True, MOMENTUM=True, NESTEROV=True, ALIGNED=True),
          rounded_products=1)
    check(K.adam._restore_adam_kernel,
          dict(DT=tl.float32, STEP_DT=tl.float32, HAS_WD=False, AMSGRAD=True,
               DEVICE_STEPS=True, ALIGNED=True), rounded_products=2)
    sampa = dict(DT=tl.float32, HAS_WD=True, MOMENTUM=True, NESTEROV=True, ALIGNED=True)
    check(K.sampa._points_kernel, sampa)
    check(K.sampa._update_kernel, sampa)

    # The scale chain with FMA contraction on: sqrt_rn's result must reach the add
    # with S * eps as a plain add, never as an fma's addend (one rounding fewer).
    ptx = compile_ptx(K.perturb._perturb_kernel, dict(DT=tl.float32, ASAM=False,
                      ALIGNED=True))
    roots = re.findall(r"sqrt\\.rn\\.f32\\s+(%r\\d+),", ptx)
    fused = [line for line in ptx.splitlines() for r in roots
             if re.search(r"fma\\.rn\\.f32[^;]*,\\s*" + r + r"\\s*;", line)]
    added = [line for line in ptx.splitlines() for r in roots
             if re.search(r"add(\\.rn)?\\.f32[^;]*" + r + r"\\b", line)]
    # ... and the elementwise w + scale * g is not contracted either (the tl.where
    # between product and add keeps them apart, as the torch backend rounds them):
    # the chain's zero-addend fma is the only fma.
    only = len(re.findall(r"\\bfma\\.rn\\.f32", ptx)) == 1
    print("scale-chain", len(roots) == 1 and not fused and len(added) == 1 and only)
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
    assert lines[-1] == ["scale-chain", "True"], "the scale's add must not be an fma"
    lines = lines[:-1]
    assert len(lines) == 10
    for name, aligned, vector in lines:
        if aligned == "True":
            assert vector == "True", f"{name}: aligned operands should vectorize"
        else:
            assert vector == "False", f"{name}: unaligned operands must not be vectorized"
