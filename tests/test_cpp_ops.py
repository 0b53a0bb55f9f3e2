"""The compiled ops (``cpp`` on the CPU, ``cuda`` on a GPU) against the torch backend
and against float64 formulas written from docs/design.md / torch.optim's documentation.

Tolerances: both backends compute in fp32 and round once to the storage
dtype, but they may associate and fuse (FMA) differently, so an element may
differ by a few units in the last place of the storage dtype (``_close``:
4 ulps relative, the same at the inputs' scale absolute). Copies (backups,
restores) must be bit-exact.

Without ``sam_fast._C`` this module skips with the reason, unless
``SAM_FAST_REQUIRE_EXT=1`` (CI), where importing sam_fast already fails.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sam_fast import _compiled_ops, _extension, dispatch, ops
from sam_fast.backends import torch_ops

REASON = _extension.cpp_reason()
if REASON is not None:
    if _extension.require_ext():
        raise RuntimeError(f"SAM_FAST_REQUIRE_EXT=1 but the compiled ops are missing: {REASON}")
    pytest.skip(f"sam_fast._C is not available: {REASON}", allow_module_level=True)

HAS_CUDA = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]),
]
BACKEND = {"cpu": "cpp", "cuda": "cuda"}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
F32_EPS = torch.finfo(torch.float32).eps

# 1 element, primes, the CPU chunk (16384) and CUDA chunk (65536) edges, a
# 3-d shape, 1100 small tensors (several CUDA launches of <= 255 tensors), and
# empty tensors among others.
SIZE_SETS = {
    "one": [(1,)],
    "primes": [(2,), (3,), (13,), (101,), (1009,), (7919,)],
    "chunk_edges": [(16383,), (16384,), (16385,), (65537,), (3, 5, 7)],
    "many": [(1 + (i * 7) % 29,) for i in range(1100)],
    "with_empty": [(0,), (5,), (0, 3), (17,)],
}


def _dtype_sizes(names):
    """(dtype, size set) pairs: every dtype on each size set, but the 1100-tensor set
    (slow on the torch backend's per-tensor path) in float32 only."""
    return [pytest.param(d, n, id=f"{str(d)[6:]}-{n}") for d in DTYPES for n in names
            if n != "many" or d == torch.float32]


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0,
           ulps: float = 4.0) -> None:
    tol = ulps * torch.finfo(dtype).eps
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=tol,
                               atol=tol * scale)


def _rand(shapes, dtype, gen, device="cpu", scale=1.0, positive=False):
    out = []
    for s in shapes:
        t = torch.randn(s, generator=gen, dtype=torch.float64) * scale
        if positive:
            t = t.abs()
        out.append(t.to(dtype).to(device))
    return out


def _empty_like(ts):
    return [torch.empty_like(t) for t in ts]


def _clone(lists):
    return copy.deepcopy(lists)


def _oracle_indices(n: int) -> range:
    """Every tensor against the torch backend, but the (slow, per-tensor) float64
    oracle on a sample when there are more than a hundred."""
    return range(n) if n <= 100 else range(0, n, 17)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(20240611)


# -- grad_sumsq / grad_norm ------------------------------------------------------------------


def _sumsq64(grads, params=None, eta=0.0):
    total = 0.0
    for i, g in enumerate(grads):
        v = g.double()
        if params is not None:
            v = (params[i].double().abs() + eta) * v
        total += (v * v).sum().item()
    return total


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,sizes", _dtype_sizes(SIZE_SETS))
@pytest.mark.parametrize("eta", [None, 0.0, 0.01])
def test_grad_norm_matches_torch_and_float64(device, dtype, sizes, eta, gen):
    shapes = SIZE_SETS[sizes]
    grads = _rand(shapes, dtype, gen, device)
    params = _rand(shapes, dtype, gen, device) if eta is not None else None
    ours = ops.grad_norm(grads, params, eta or 0.0, backend=BACKEND[device])
    theirs = ops.grad_norm(grads, params, eta or 0.0, backend="torch")
    expected = math.sqrt(_sumsq64(grads, params, eta or 0.0))
    assert ours.dtype == torch.float32 and ours.dim() == 0 and ours.device.type == device
    assert abs(ours.item() - expected) <= 1e-5 * expected
    assert abs(ours.item() - theirs.item()) <= 1e-5 * expected


@pytest.mark.parametrize("device", DEVICES)
def test_grad_norm_is_deterministic(device, gen):
    grads = _rand(SIZE_SETS["many"] + SIZE_SETS["chunk_edges"] + [(300_000,)], torch.float32,
                  gen, device)
    first = ops.grad_norm(grads, backend=BACKEND[device])
    assert all(torch.equal(first, ops.grad_norm(grads, backend=BACKEND[device]))
               for _ in range(3))
    if device == "cpu":
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            single = ops.grad_norm(grads, backend="cpp")
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(first, single), "the norm depends on the number of threads"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("weighted", [False, True])
def test_grad_norm_reports_non_finite(device, bad, weighted, gen):
    grads = _rand([(5,), (70_000,), (3,)], torch.float32, gen, device)
    grads[1][12345] = bad
    params = _rand([(5,), (70_000,), (3,)], torch.float32, gen, device) if weighted else None
    ours = ops.grad_norm(grads, params, 0.0, backend=BACKEND[device])
    theirs = ops.grad_norm(grads, params, 0.0, backend="torch")
    assert not torch.isfinite(ours)
    assert torch.isnan(ours) == torch.isnan(theirs)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_sumsq_edge_lists(device):
    sumsq = torch.ops.sam_fast.grad_sumsq
    zeros = [torch.zeros(0, device=device), torch.zeros(0, 4, device=device)]
    assert sumsq(zeros, [], 0.0).item() == 0.0
    with pytest.raises(ValueError, match="at least one"):
        ops.grad_norm([], backend=BACKEND[device])
    with pytest.raises(ValueError, match="at least one"):
        _compiled_ops.grad_sumsq([])


# -- perturb_ / restore_ ---------------------------------------------------------------------
#
# perturb_ and sampa_points_ derive the scale rho / (sqrt(sumsq) + eps) inside the kernel
# (csrc/elementwise.h: perturbation_scale). On the CPU it and the perturbation must agree
# with the torch backend (torch_ops.perturbation_scale, torch_ops.perturb_) bit for bit:
# every step is one correctly rounded operation in the same order. CUDA keeps the
# tolerance of _close (not run on a GPU where these tests were written).

# (rho, eps, normalize, eta): SAM, SAM with eps 0 and with a large eps, USAM, ASAM (with
# and without eta)
PERTURB_KINDS = {
    "sam": (0.05, 1e-12, True, None),
    "sam-eps0": (0.37, 0.0, True, None),
    "sam-eps-large": (2.0, 1e-3, True, None),
    "usam": (0.05, 1e-12, False, None),
    "asam": (0.5, 1e-12, True, 0.01),
    "asam-eta0": (0.5, 1e-12, True, 0.0),
}


def _same_bits(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Bitwise equality (NaNs and signed zeros included)."""
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return False
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.dtype.itemsize]
    return torch.equal(actual.cpu().view(bits), expected.cpu().view(bits))


def _agrees(device, actual, expected, dtype):
    if device == "cpu":
        assert _same_bits(actual, expected), (actual, expected)
    else:
        _close(actual, expected, dtype)


def _scale64(sumsq, rho, eps, normalize, grad_scale=None):
    """The scale in float64 from its definition. With GradScaler's S the gradients (and
    sumsq) are S times the true ones and e = scale * (S g) must be rho g / (||g|| + eps):
    scale = rho / (sqrt(sumsq) + S eps), or rho / S for USAM."""
    s = 1.0 if grad_scale is None else float(grad_scale)
    if not normalize:
        return rho / s
    return rho / (math.sqrt(sumsq) + s * eps)


def _perturb64(w, g, scale, eta):
    w, g = w.double(), g.double()
    if scale == 0:
        return w + 0.0
    if eta is None:
        return w + scale * g
    t = w.abs() + eta
    return w + scale * t * t * g


def _run_perturb(backend, params, grads, sumsq, kind, grad_scale=None):
    rho, eps, normalize, eta = PERTURB_KINDS[kind]
    p, b = _clone(params), _empty_like(params)
    ops.perturb_(p, grads, b, sumsq, rho=rho, eps=eps, normalize=normalize, eta=eta,
                 grad_scale=grad_scale, backend=backend)
    return p, b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,sizes", _dtype_sizes(SIZE_SETS))
@pytest.mark.parametrize("kind", ["sam", "usam", "asam", "asam-eta0"])
@pytest.mark.parametrize("grad_scale", [None, 1024.0])
def test_perturb(device, dtype, sizes, kind, grad_scale, gen):
    """Backups exact; weights bit for bit as the torch backend (CPU) and as the float64
    formula within a few ulps, the scale derived from the gradients' own sum of squares."""
    shapes = SIZE_SETS[sizes]
    rho, eps, normalize, eta = PERTURB_KINDS[kind]
    params = _rand(shapes, dtype, gen, device)
    s = 1.0 if grad_scale is None else grad_scale
    grads = _rand(shapes, dtype, gen, device, scale=s)  # as GradScaler leaves them
    gs = None if grad_scale is None else torch.tensor(grad_scale, device=device)
    sumsq = ops.grad_sumsq(grads, params if eta is not None else None, eta or 0.0,
                           backend="torch")
    p, b = _run_perturb(BACKEND[device], params, grads, sumsq, kind, gs)
    p_ref, _ = _run_perturb("torch", params, grads, sumsq, kind, gs)
    scale = _scale64(sumsq.item(), rho, eps, normalize, grad_scale)
    for i in range(len(shapes)):
        assert _same_bits(b[i], params[i]), "the backup must be an exact copy"
        _agrees(device, p[i], p_ref[i], dtype)
    for i in _oracle_indices(len(shapes)):
        _close(p[i], _perturb64(params[i], grads[i], scale, eta), dtype, ulps=8)


def _sumsq_values():
    """Sums of squares across the fp32 range: 0, subnormal, tiny, around 1, huge, the
    largest finite, and random ones (log-uniform), plus inf and NaN."""
    gen = torch.Generator().manual_seed(99)
    rand = (10.0 ** (torch.rand(120, generator=gen, dtype=torch.float64) * 76 - 38)).tolist()
    return [0.0, 1e-45, 1e-40, 1e-30, 1e-24, 1.0, 2.0, 3.0, 0.1, 1e10, 3.4e38,
            float("inf"), float("nan")] + rand


@pytest.mark.parametrize("kind", list(PERTURB_KINDS))
@pytest.mark.parametrize("grad_scale", [None, 65536.0, 3.0, 0.7])
@pytest.mark.parametrize("sumsq_dtype", [torch.float32, torch.float64])
def test_perturbation_scale_is_bit_exact(kind, grad_scale, sumsq_dtype):
    """With w = 0 and g = 1 the perturbed weight *is* the scale (SAM/USAM; for ASAM with
    eta = 0 the weight 0 gives e = 0, so ASAM uses w = 1, eta = 0 below), so the kernel's
    scale can be read back and compared bit for bit with torch_ops.perturbation_scale.
    An fp64 sum of squares (a model with fp64 groups too) makes the torch backend compute
    the chain in fp64 and round the scale once: so must the kernel."""
    rho, eps, normalize, eta = PERTURB_KINDS[kind]
    adaptive = eta is not None
    w0 = 1.0 if adaptive else 0.0  # ASAM: e = (|1| + eta)^2 * 1 * scale
    gs = None if grad_scale is None else torch.tensor(grad_scale)
    mismatches = []
    for value in _sumsq_values():
        sumsq = torch.tensor(value, dtype=sumsq_dtype)
        params, grads = [torch.full((3,), w0)], [torch.ones(3)]
        p, _ = _run_perturb("cpp", params, grads, sumsq, kind, gs)
        p_ref, _ = _run_perturb("torch", params, grads, sumsq, kind, gs)
        if not _same_bits(p[0], p_ref[0]):
            mismatches.append((value, p[0][0].item(), p_ref[0][0].item()))
        if not adaptive:
            spec = torch_ops.perturbation_scale(sumsq, rho, eps, normalize, gs)
            assert _same_bits(p[0][:1].reshape(()), spec.to(torch.float32)), (value, spec)
        if not math.isfinite(value):
            assert _same_bits(p[0], params[0]), "a non-finite sumsq must leave w as it is"
        elif not adaptive and value > 1e-30:
            expected = _scale64(value, rho, eps, normalize, grad_scale)
            assert abs(p[0][0].item() - expected) <= 4 * F32_EPS * abs(expected), value
    assert not mismatches, mismatches[:5]


@pytest.mark.parametrize("rho,eps", [(0.05, 1e-12), (2.0, 1e-3), (0.37, 0.0)])
def test_sampa_points_scale_is_bit_exact(rho, eps):
    """sampa_points_ derives the SAM scale (normalize=True) the same way: x = 0, g_y = 1
    make x~ the scale itself."""
    for value in _sumsq_values():
        sumsq = torch.tensor(value)
        out = {}
        for backend in ("cpp", "torch"):
            x, b, y = [torch.zeros(5)], [torch.empty(5)], [torch.empty(5)]
            ops.sampa_points_(x, [torch.ones(5)], None, b, y, sumsq, rho=rho, eps=eps, lr=0.1,
                              backend=backend)
            out[backend] = x[0]
        assert _same_bits(out["cpp"], out["torch"]), value
        spec = torch_ops.perturbation_scale(sumsq, rho, eps, True)
        assert _same_bits(out["cpp"][0].reshape(()), spec), value


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["sam", "usam", "asam"])
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("grad_scale", [None, 128.0])
def test_non_finite_sumsq_leaves_the_weights_exactly(device, dtype, kind, bad, grad_scale, gen):
    """A non-finite sum of squares (an inf/NaN gradient) skips the perturbation: every
    weight keeps its bits even where g itself is inf or NaN (0 * inf would be NaN), the
    backups are still written, and sampa_points_ does the same for x~."""
    shapes = [(9,), (20_000,), (1,), (0,)]
    params = _rand(shapes, dtype, gen, device)
    grads = _rand(shapes, dtype, gen, device)
    grads[0][3], grads[1][7], grads[2][0] = float("inf"), float("nan"), float("-inf")
    gs = None if grad_scale is None else torch.tensor(grad_scale, device=device)
    sumsq = torch.tensor(bad, device=device)
    p, b = _run_perturb(BACKEND[device], params, grads, sumsq, kind, gs)
    p_ref, _ = _run_perturb("torch", params, grads, sumsq, kind, gs)
    for i in range(len(shapes)):
        assert _same_bits(p[i], params[i]) and _same_bits(b[i], params[i])
        assert _same_bits(p_ref[i], params[i])
    x, b, y = _clone(params), _empty_like(params), _empty_like(params)
    ops.sampa_points_(x, grads, None, b, y, sumsq, rho=0.1, eps=1e-12, lr=0.1,
                      backend=BACKEND[device])
    for i in range(len(shapes)):
        assert _same_bits(x[i], params[i]) and _same_bits(b[i], params[i])


def test_float64_sumsq_on_float32_groups_matches_torch():
    """A model with fp64 and fp32 groups has an fp64 global sum of squares: the fp32
    group's kernel computes the chain in fp64 and rounds the scale to fp32 once, as the
    torch backend does (checked on values where rounding first would differ)."""
    gen = torch.Generator().manual_seed(5)
    params = _rand([(4096,), (7,)], torch.float32, gen)
    grads = _rand([(4096,), (7,)], torch.float32, gen)
    for value in [0.123456789123, 7.000000001, 1e-7 + 1e-20, 2.0]:
        sumsq = torch.tensor(value, dtype=torch.float64)
        for kind, gs in [("sam", None), ("sam", torch.tensor(2.0 ** 15)), ("usam", None),
                         ("asam", None)]:
            p, _ = _run_perturb("cpp", params, grads, sumsq, kind, gs)
            p_ref, _ = _run_perturb("torch", params, grads, sumsq, kind, gs)
            assert all(_same_bits(a, b) for a, b in zip(p, p_ref)), (value, kind)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_is_bit_exact(device, dtype, gen):
    shapes = SIZE_SETS["primes"] + SIZE_SETS["with_empty"]
    backups = _rand(shapes, dtype, gen, device)
    backups[1].view(-1)[0] = -0.0
    backups[2].view(-1)[1] = float("nan")
    backups[3].view(-1)[2] = float("-inf")
    params = _rand(shapes, dtype, gen, device)
    ops.restore_(params, backups, backend=BACKEND[device])
    bits = {2: torch.int16, 4: torch.int32}[dtype.itemsize]
    for p, b in zip(params, backups):
        assert torch.equal(p.view(bits), b.view(bits))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_lists_are_no_ops(device):
    torch.ops.sam_fast.perturb_([], [], [], torch.tensor(1.0, device=device), rho=0.05,
                                eps=1e-12, normalize=True, eta=None, grad_scale=None)
    ops.restore_([], [], backend=BACKEND[device])
    # The section 3 ops (the family's: tests/test_family_ops.py, where dot_sumsq and
    # ema_residual_ refuse empty lists as their specification does).
    for name, op in _compiled_ops.OPS.items():
        if name != "grad_sumsq" and name in dispatch.OP_NAMES:
            _, args, kwargs = _opcheck_cases(device)[name]
            op(*[[] if isinstance(a, list) else a for a in args], **kwargs)


# -- restore_sgd_ ----------------------------------------------------------------------------


def _sgd64(x, g, buf, *, lr, momentum, dampening, weight_decay, nesterov, maximize,
           init_buffers, grad_scale=None):
    """torch.optim.SGD's documented update for one tensor, in float64."""
    x, g = x.double(), g.double()
    if grad_scale is not None:
        g = g / grad_scale
    d = -g if maximize else g
    if weight_decay != 0:
        d = d + weight_decay * x
    new_buf = None
    if momentum != 0:
        new_buf = d.clone() if init_buffers else momentum * buf.double() + (1 - dampening) * d
        d = d + momentum * new_buf if nesterov else new_buf
    return x - lr * d, new_buf


SGD_OPTIONS = [
    dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False),
    dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=5e-4, nesterov=False, maximize=False),
    dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True, maximize=False),
    dict(lr=0.2, momentum=0.5, dampening=0.3, weight_decay=0.0, nesterov=False, maximize=True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,sizes", _dtype_sizes(
    ["primes", "chunk_edges", "many", "with_empty"]))
@pytest.mark.parametrize("options", range(len(SGD_OPTIONS)))
@pytest.mark.parametrize("init_buffers", [False, True])
def test_restore_sgd(device, dtype, sizes, options, init_buffers, gen):
    shapes, opts = SIZE_SETS[sizes], SGD_OPTIONS[options]
    backups = _rand(shapes, dtype, gen, device)
    grads = _rand(shapes, dtype, gen, device)
    bufs = _rand(shapes, dtype, gen, device)
    out = {}
    for backend in (BACKEND[device], "torch"):
        p, b = _rand(shapes, dtype, gen, device), _clone(bufs)
        ops.restore_sgd_(p, backups, grads, b if opts["momentum"] else None,
                         init_buffers=init_buffers, backend=backend, **opts)
        out[backend] = (p, b)
    (p, b), (p_ref, b_ref) = out[BACKEND[device]], out["torch"]
    for i in range(len(shapes)):
        _close(p[i], p_ref[i], dtype)
        if opts["momentum"]:
            _close(b[i], b_ref[i], dtype)
        else:
            assert torch.equal(b[i], bufs[i])
    for i in _oracle_indices(len(shapes)):
        x64, buf64 = _sgd64(backups[i], grads[i], bufs[i], init_buffers=init_buffers, **opts)
        _close(p[i], x64, dtype, ulps=8)
        if opts["momentum"]:
            _close(b[i], buf64, dtype, ulps=8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("found", [None, 0.0, 1.0])
def test_restore_sgd_with_grad_scale_and_found_inf(device, found, gen):
    shapes = SIZE_SETS["chunk_edges"]
    opts = SGD_OPTIONS[1]
    backups = _rand(shapes, torch.float32, gen, device)
    grads = _rand(shapes, torch.float32, gen, device, scale=1024.0)
    bufs = _rand(shapes, torch.float32, gen, device)
    scale = torch.tensor(1024.0, device=device)
    flag = None if found is None else torch.tensor(found, device=device)
    out = {}
    for backend in (BACKEND[device], "torch"):
        p, b = _rand(shapes, torch.float32, gen, device), _clone(bufs)
        ops.restore_sgd_(p, backups, grads, b, grad_scale=scale, found_inf=flag, backend=backend,
                         **opts)
        out[backend] = (p, b)
    for i in range(len(shapes)):
        if found == 1.0:
            assert torch.equal(out[BACKEND[device]][0][i], backups[i])
            assert torch.equal(out[BACKEND[device]][1][i], bufs[i])
        else:
            x64, buf64 = _sgd64(backups[i], grads[i], bufs[i], init_buffers=False,
                                grad_scale=1024.0, **opts)
            _close(out[BACKEND[device]][0][i], out["torch"][0][i], torch.float32)
            _close(out[BACKEND[device]][0][i], x64, torch.float32, ulps=8)
            _close(out[BACKEND[device]][1][i], buf64, torch.float32, ulps=8)


# -- restore_adamw_ --------------------------------------------------------------------------


def _adam64(x, g, m, v, vmax, step, *, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
            decoupled_weight_decay, grad_scale=None):
    """torch.optim.Adam / AdamW's documented update for one tensor, in float64."""
    x, g, m, v = x.double(), g.double(), m.double(), v.double()
    if grad_scale is not None:
        g = g / grad_scale
    if maximize:
        g = -g
    if weight_decay != 0:
        if decoupled_weight_decay:
            x = x * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * x
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    if amsgrad:
        vmax = torch.maximum(vmax.double(), v)
        denom = vmax.sqrt() / math.sqrt(1 - beta2**step) + eps
    else:
        denom = v.sqrt() / math.sqrt(1 - beta2**step) + eps
    return x - lr / (1 - beta1**step) * m / denom, m, v, vmax


ADAM_OPTIONS = [
    dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=False,
         maximize=False, decoupled_weight_decay=False),
    dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=False,
         maximize=False, decoupled_weight_decay=True),
    dict(lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=1e-1, amsgrad=True,
         maximize=True, decoupled_weight_decay=False),
    dict(lr=1e-2, beta1=0.6, beta2=0.9, eps=1e-8, weight_decay=1e-2, amsgrad=True,
         maximize=False, decoupled_weight_decay=True),
]


def _adam_state(shapes, dtype, gen, device, step0):
    exp_avgs = _rand(shapes, dtype, gen, device, scale=0.1)
    exp_avg_sqs = _rand(shapes, dtype, gen, device, scale=0.01, positive=True)
    maxes = [v * 1.5 for v in exp_avg_sqs]
    steps = [torch.tensor(float(step0)) for _ in shapes]
    return exp_avgs, exp_avg_sqs, maxes, steps


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,sizes", _dtype_sizes(
    ["primes", "chunk_edges", "many", "with_empty"]))
@pytest.mark.parametrize("options", range(len(ADAM_OPTIONS)))
def test_restore_adamw(device, dtype, sizes, options, gen):
    shapes, opts = SIZE_SETS[sizes], ADAM_OPTIONS[options]
    step0 = 0 if sizes == "primes" else 6  # the first step (no history) and a later one
    backups = _rand(shapes, dtype, gen, device)
    grads = _rand(shapes, dtype, gen, device)
    state = _adam_state(shapes, dtype, gen, device, step0)
    out = {}
    for backend in (BACKEND[device], "torch"):
        p = _rand(shapes, dtype, gen, device)
        m, v, vmax, steps = _clone(state)
        ops.restore_adamw_(p, backups, grads, m, v, vmax if opts["amsgrad"] else None, steps,
                           backend=backend, **opts)
        out[backend] = (p, m, v, vmax, steps)
    ours, ref = out[BACKEND[device]], out["torch"]
    for i in range(len(shapes)):
        assert ours[4][i].item() == step0 + 1 == ref[4][i].item()
        for k in range(3):
            _close(ours[k][i], ref[k][i], dtype)
    for i in _oracle_indices(len(shapes)):
        x64, m64, v64, vmax64 = _adam64(backups[i], grads[i], state[0][i], state[1][i],
                                        state[2][i], step0 + 1, **opts)
        for k, expected in enumerate((x64, m64, v64)):
            _close(ours[k][i], expected, dtype, ulps=16)
        if opts["amsgrad"]:
            _close(ours[3][i], vmax64, dtype, ulps=8)


@pytest.mark.parametrize("device,steps_on_device", [
    ("cpu", False),  # CPU parameters keep their counters on the host: there is no other device
    pytest.param("cuda", False, marks=DEVICES[1].marks),
    pytest.param("cuda", True, marks=DEVICES[1].marks),
])
@pytest.mark.parametrize("found", [None, 0.0, 1.0])
def test_restore_adamw_grad_scale_found_inf_and_step_counters(device, steps_on_device, found,
                                                              gen):
    shapes = SIZE_SETS["chunk_edges"]
    opts = ADAM_OPTIONS[1]
    backups = _rand(shapes, torch.float32, gen, device)
    grads = _rand(shapes, torch.float32, gen, device, scale=256.0)
    state = _adam_state(shapes, torch.float32, gen, device, 3)
    if steps_on_device:
        state = (*state[:3], [s.to(device) for s in state[3]])
    scale = torch.tensor(256.0, device=device)
    flag = None if found is None else torch.tensor(found, device=device)
    out = {}
    for backend in (BACKEND[device], "torch"):
        p = _rand(shapes, torch.float32, gen, device)
        m, v, vmax, steps = _clone(state)
        ops.restore_adamw_(p, backups, grads, m, v, None, steps, grad_scale=scale,
                           found_inf=flag, backend=backend, **opts)
        out[backend] = (p, m, v, steps)
    ours, ref = out[BACKEND[device]], out["torch"]
    for i in range(len(shapes)):
        if found == 1.0:
            assert torch.equal(ours[0][i], backups[i])
            assert torch.equal(ours[1][i], state[0][i]) and torch.equal(ours[2][i], state[1][i])
            assert ours[3][i].item() == 3
        else:
            assert ours[3][i].item() == 4
            x64, m64, v64, _ = _adam64(backups[i], grads[i], state[0][i], state[1][i], None, 4,
                                       grad_scale=256.0, **opts)
            for k, expected in enumerate((x64, m64, v64)):
                _close(ours[k][i], ref[k][i], torch.float32)
                _close(ours[k][i], expected, torch.float32, ulps=16)


# -- SAMPa -----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,sizes", _dtype_sizes(
    ["one", "chunk_edges", "many", "with_empty"]))
@pytest.mark.parametrize("options", range(len(SGD_OPTIONS)))
@pytest.mark.parametrize("init_buffers", [False, True])
def test_sampa_points(device, dtype, sizes, options, init_buffers, gen):
    shapes, opts = SIZE_SETS[sizes], SGD_OPTIONS[options]
    params = _rand(shapes, dtype, gen, device)
    grads_y = _rand(shapes, dtype, gen, device)
    bufs = _rand(shapes, dtype, gen, device)
    sumsq = ops.grad_sumsq(grads_y, backend="torch")
    rho = 0.21
    scale = _scale64(sumsq.item(), rho, 1e-12, True)
    out = {}
    for backend in (BACKEND[device], "torch"):
        p, b, y = _clone(params), _empty_like(params), _empty_like(params)
        ops.sampa_points_(p, grads_y, bufs if opts["momentum"] else None, b, y, sumsq, rho=rho,
                          eps=1e-12, init_buffers=init_buffers, backend=backend, **opts)
        out[backend] = (p, b, y)
    ours, ref = out[BACKEND[device]], out["torch"]
    for i in range(len(shapes)):
        assert torch.equal(ours[1][i], params[i])
        _close(ours[2][i], ref[2][i], dtype)
        _agrees(device, ours[0][i], ref[0][i], dtype)  # x~: the perturbation, bit for bit
    for i in _oracle_indices(len(shapes)):
        y64, _ = _sgd64(params[i], grads_y[i], bufs[i], init_buffers=init_buffers, **opts)
        _close(ours[2][i], y64, dtype, ulps=8)
        _close(ours[0][i], _perturb64(params[i], grads_y[i], scale, None), dtype, ulps=8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,sizes", _dtype_sizes(
    ["one", "chunk_edges", "many", "with_empty"]))
@pytest.mark.parametrize("options", range(len(SGD_OPTIONS)))
@pytest.mark.parametrize("init_buffers", [False, True])
def test_sampa_update(device, dtype, sizes, options, init_buffers, gen):
    shapes, opts = SIZE_SETS[sizes], SGD_OPTIONS[options]
    lam = 0.2
    backups = _rand(shapes, dtype, gen, device)
    g_tilde = _rand(shapes, dtype, gen, device)
    g_y = _rand(shapes, dtype, gen, device)
    bufs = _rand(shapes, dtype, gen, device)
    out = {}
    for backend in (BACKEND[device], "torch"):
        p, b = _rand(shapes, dtype, gen, device), _clone(bufs)
        ops.sampa_update_(p, backups, g_tilde, g_y, b if opts["momentum"] else None, lam=lam,
                          init_buffers=init_buffers, backend=backend, **opts)
        out[backend] = (p, b)
    ours, ref = out[BACKEND[device]], out["torch"]
    for i in range(len(shapes)):
        _close(ours[0][i], ref[0][i], dtype)
        if opts["momentum"]:
            _close(ours[1][i], ref[1][i], dtype)
    for i in _oracle_indices(len(shapes)):
        combined = (1 - lam) * g_tilde[i].double() + lam * g_y[i].double()
        x64, buf64 = _sgd64(backups[i], combined, bufs[i], init_buffers=init_buffers, **opts)
        _close(ours[0][i], x64, dtype, ulps=8)
        if opts["momentum"]:
            _close(ours[1][i], buf64, dtype, ulps=8)


# -- layouts, dtypes, devices, version counters ----------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_mixed_layouts_are_correct(device):
    """Parameters that are a transposed view (dense, not contiguous) and a strided slice
    (not dense); gradients laid out unlike their parameters (contiguous for a transposed
    one, channels-last for a contiguous one) or expanded (stride 0): every layout is
    staged as needed and the results match the torch backend."""

    def src(*shape, seed):
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)

    def params_and_buffers():
        params = [src(5, 6, seed=1).t(), src(9, 16, seed=2)[:, ::2], src(4, 3, 5, 5, seed=3),
                  src(7, 4, seed=4)]
        bufs = [src(5, 6, seed=5).t(), src(9, 16, seed=6)[:, ::2], src(4, 3, 5, 5, seed=7),
                src(7, 4, seed=8)]
        return params, bufs

    backups = [t.clone() for t in params_and_buffers()[0]]
    grads = [src(6, 5, seed=9), src(9, 8, seed=10),
             src(4, 3, 5, 5, seed=11).contiguous(memory_format=torch.channels_last),
             src(7, 1, seed=12).expand(7, 4)]
    opts = SGD_OPTIONS[1]
    out = {}
    for backend in (BACKEND[device], "torch"):
        p, b = params_and_buffers()
        ops.restore_sgd_(p, backups, grads, b, backend=backend, **opts)
        out[backend] = (p, b)
    ours, ref = out[BACKEND[device]], out["torch"]
    for i in range(4):
        _close(ours[0][i], ref[0][i], torch.float32)
        _close(ours[1][i], ref[1][i], torch.float32)
        x64, buf64 = _sgd64(backups[i], grads[i], params_and_buffers()[1][i],
                            init_buffers=False, **opts)
        _close(ours[0][i], x64, torch.float32, ulps=8)
        _close(ours[1][i], buf64, torch.float32, ulps=8)
    assert ours[0][0].stride() == (1, 6) and ours[0][1].stride() == (16, 2)


@pytest.mark.parametrize("device", DEVICES)
def test_writing_an_expanded_tensor_is_refused(device):
    params = [torch.zeros(1, device=device).expand(4)]
    with pytest.raises(RuntimeError, match="share memory"):
        torch.ops.sam_fast.restore_(params, [torch.ones(4, device=device)])


@pytest.mark.parametrize("device", DEVICES)
def test_mismatched_dtype_is_a_clear_error(device):
    with pytest.raises(RuntimeError, match=r"grads\[0\] is .*Half"):
        torch.ops.sam_fast.perturb_([torch.zeros(3, device=device)],
                                    [torch.zeros(3, device=device, dtype=torch.half)],
                                    [torch.zeros(3, device=device)],
                                    torch.tensor(1.0, device=device), rho=0.05, eps=1e-12,
                                    normalize=True, eta=None, grad_scale=None)
    with pytest.raises(RuntimeError, match="float32, float16 and bfloat16"):
        torch.ops.sam_fast.restore_([torch.zeros(3, device=device, dtype=torch.int32)],
                                    [torch.zeros(3, device=device, dtype=torch.int32)])


@pytest.mark.parametrize("device", DEVICES)
def test_float64_groups_use_the_torch_backend(device, gen):
    shapes = SIZE_SETS["primes"]
    params = _rand(shapes, torch.float64, gen, device)
    grads = _rand(shapes, torch.float64, gen, device)
    norm = ops.grad_norm(grads, backend=BACKEND[device])
    assert norm.dtype == torch.float64
    assert torch.equal(norm, ops.grad_norm(grads, backend="torch"))
    out = {}
    for backend in (BACKEND[device], "torch"):
        p, b = _clone(params), _empty_like(params)
        ops.perturb_(p, grads, b, torch.tensor(0.3, dtype=torch.float64, device=device),
                     rho=0.05, backend=backend)
        out[backend] = p
    assert all(torch.equal(a, b) for a, b in zip(out[BACKEND[device]], out["torch"]))


@pytest.mark.parametrize("device", DEVICES)
def test_version_counters_of_written_tensors_move(device):
    p, g, b = (torch.zeros(4, device=device) for _ in range(3))
    versions = [t._version for t in (p, g, b)]
    torch.ops.sam_fast.perturb_([p], [g], [b], torch.tensor(1.0, device=device), rho=0.05,
                                eps=1e-12, normalize=True, eta=None, grad_scale=None)
    assert p._version > versions[0] and b._version > versions[2]
    assert g._version == versions[1]


def test_no_references_are_leaked_or_lost():
    """The boxed Autograd kernel keeps the argument lists alive past the kernel (to drop
    them under one GIL acquisition): afterwards every tensor has exactly the Python
    references it had before, written ones still bumped, failures included."""
    import sys

    p, g, b = ([torch.randn(3) for _ in range(4)] for _ in range(3))
    sumsq = torch.tensor(1.5)
    before = [sys.getrefcount(t) for t in p + g + b + [sumsq]]
    for _ in range(3):
        torch.ops.sam_fast.perturb_(p, g, b, sumsq, rho=0.05, eps=1e-12, normalize=True,
                                    eta=None, grad_scale=None)
        torch.ops.sam_fast.restore_(p, b)
        with pytest.raises(RuntimeError, match="has shape"):
            torch.ops.sam_fast.restore_(p, b[:-1] + [torch.zeros(5)])
    assert [sys.getrefcount(t) for t in p + g + b + [sumsq]] == before
    assert all(t._version > 0 for t in p + b) and all(t._version == 0 for t in g)


def test_ops_from_several_python_threads():
    """Several Python threads calling the ops at once (each drops its arguments under the
    GIL at the end of the call): no deadlock, every result right."""
    import threading

    errors = []

    def work(seed):
        try:
            gen = torch.Generator().manual_seed(seed)
            params = [torch.randn(s, generator=gen) for s in [(7,), (300,), (20_000,)] * 20]
            backups = [torch.empty_like(t) for t in params]
            for _ in range(20):
                original = [t.clone() for t in params]
                torch.ops.sam_fast.perturb_(params, params, backups, torch.tensor(4.0), rho=0.1,
                                            eps=0.0, normalize=False, eta=None, grad_scale=None)
                torch.ops.sam_fast.restore_(params, backups)
                assert all(torch.equal(a, b) for a, b in zip(params, original))
        except Exception as error:  # reported below, in the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "an op call hung"
    assert not errors, errors


def test_refuses_grad_mode_with_tensors_that_require_grad():
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.ops.sam_fast.restore_([w], [torch.ones(3)])
    with torch.no_grad():
        torch.ops.sam_fast.restore_([w], [torch.ones(3)])
    assert torch.equal(w.detach(), torch.ones(3))


# -- torch.library.opcheck -------------------------------------------------------------------


def _opcheck_cases(device):
    """name -> (op, args, kwargs): every op once, perturb_ also as ASAM with GradScaler's
    scale and as USAM (the optional arguments of its schema)."""
    gen = torch.Generator().manual_seed(7)

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    def lists(n=3):
        return [r(5), r(2, 3), r(17)][:n]

    scale = torch.tensor(0.1, device=device)
    sumsq = torch.tensor(2.5, device=device)
    found = torch.tensor(0.0, device=device)
    sgd = dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=1e-2, nesterov=True,
               maximize=False, init_buffers=False)
    adam = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2, amsgrad=True,
                maximize=False, decoupled_weight_decay=True, grad_scale=None, found_inf=found)
    steps = [torch.tensor(2.0) for _ in range(3)]
    return {
        "grad_sumsq": ("grad_sumsq", (lists(), lists(), 0.01), {}),
        "perturb_": ("perturb_", (lists(), lists(), lists(), sumsq),
                     dict(rho=0.05, eps=1e-12, normalize=True, eta=None, grad_scale=None)),
        "perturb_asam_grad_scale": ("perturb_", (lists(), lists(), lists(), sumsq),
                                    dict(rho=0.5, eps=1e-12, normalize=True, eta=0.01,
                                         grad_scale=torch.tensor(1024.0, device=device))),
        "perturb_usam": ("perturb_", (lists(), lists(), lists(), sumsq),
                         dict(rho=0.05, eps=1e-12, normalize=False, eta=None,
                              grad_scale=None)),
        "restore_": ("restore_", (lists(), lists()), {}),
        "restore_sgd_": ("restore_sgd_", (lists(), lists(), lists(), lists()),
                         dict(sgd, grad_scale=scale, found_inf=found)),
        "restore_adamw_": ("restore_adamw_", (lists(), lists(), lists(), lists(),
                                              [t.abs() for t in lists()],
                                              [t.abs() for t in lists()], steps), adam),
        "sampa_points_": ("sampa_points_", (lists(), lists(), lists(), lists(), lists(), sumsq),
                          dict(sgd, rho=0.05, eps=1e-12)),
        "sampa_update_": ("sampa_update_", (lists(), lists(), lists(), lists(), lists()),
                          dict(sgd, lam=0.2)),
    }


OPCHECK_CASES = list(_opcheck_cases("cpu"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(device, case):
    op, args, kwargs = _opcheck_cases(device)[case]
    torch.library.opcheck(getattr(torch.ops.sam_fast, op).default, args, kwargs)


def test_op_table_has_the_torch_backend_signatures():
    """The compiled backends' op table is called exactly like the torch backend's (the
    specifications: torch_ops, torch_family for the SAM family's ops, torch_bsam for
    BSAM's): same
    parameters, kinds, defaults and order."""
    import inspect

    from sam_fast.backends import torch_bsam, torch_family

    assert set(_compiled_ops.OPS) == (set(dispatch.OP_NAMES) | set(dispatch.FAMILY_OP_NAMES)
                                      | set(dispatch.BSAM_OP_NAMES))
    for name, op in _compiled_ops.OPS.items():
        ours = inspect.signature(op).parameters
        spec = {**torch_family.OPS, **torch_bsam.OPS}.get(name) or getattr(torch_ops, name)
        theirs = inspect.signature(spec).parameters
        assert [(p.name, p.kind, p.default) for p in ours.values()] == [
            (p.name, p.kind, p.default) for p in theirs.values()], name


# -- CUDA only: launches that overflow one parameter block ------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_relaunch_for_huge_and_misaligned_tensors(gen):
    """> 320 chunks (several launches, a tensor split across them), and a view whose
    data pointer is not 16-byte aligned (the scalar path)."""
    big = torch.randn(22_000_003, generator=gen).cuda()
    odd = torch.randn(70_001, generator=gen).cuda()[1:]
    grads = [big, odd]
    expected = math.sqrt(_sumsq64(grads))
    assert abs(ops.grad_norm(grads, backend="cuda").item() - expected) <= 1e-5 * expected
    params = [torch.randn_like(g) for g in grads]
    out = {}
    for backend in ("cuda", "torch"):
        p, b = _clone(params), _empty_like(params)
        ops.perturb_(p, grads, b, torch.tensor(0.5, device="cuda"), rho=0.05, backend=backend)
        out[backend] = p
    for a, b in zip(out["cuda"], out["torch"]):
        _close(a, b, torch.float32)


_LAUNCH_SCRIPT = r"""
import math, torch
from sam_fast import ops
gen = torch.Generator().manual_seed(3)
# 1100 small tensors (several launches by tensor count with either metadata size) and one
# of 140M elements: 2137 chunks, more than one launch's block map with 32 KiB (2048) too,
# so a tensor is split across launches on both paths.
shapes = [(1 + (i * 7) % 29,) for i in range(1100)] + [(140_000_000,)]
grads = [torch.randn(s, generator=gen).cuda() for s in shapes]
params = [torch.randn(s, generator=gen).cuda() for s in shapes]
sumsq = {b: ops.grad_sumsq(grads, backend=b) for b in ("cuda", "torch")}
assert abs(sumsq["cuda"].item() - sumsq["torch"].item()) <= 1e-5 * sumsq["torch"].item()
out = {}
for b in ("cuda", "torch"):
    p, bk = [t.clone() for t in params], [torch.empty_like(t) for t in params]
    ops.perturb_(p, grads, bk, sumsq["torch"], rho=0.05, backend=b)
    assert all(torch.equal(x, y) for x, y in zip(bk, params))
    out[b] = p
assert all(torch.equal(x, y) for x, y in zip(out["cuda"], out["torch"])), "perturb_"
print("ok")
"""


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("kernel_params", ["default", "4096"])
def test_cuda_both_metadata_sizes(kernel_params):
    """The 32 KiB metadata path (CUDA >= 12.1 on Volta+) and the 4 KiB one
    (SAM_FAST_KERNEL_PARAMS=4096, read once per process: hence a subprocess) give the
    torch backend's results, relaunches and split tensors included."""
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    env.pop("SAM_FAST_KERNEL_PARAMS", None)
    if kernel_params != "default":
        env["SAM_FAST_KERNEL_PARAMS"] = kernel_params
    done = subprocess.run([sys.executable, "-c", _LAUNCH_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
