"""The SAM family's generic ops (sam_fast.family_ops) against float64 formulas, the triton
kernels (interpreter on the CPU) and the compiled kernels (``cpp`` on the CPU, ``cuda`` on
a GPU) against the torch specification, their schemas under ``torch.library.opcheck``.

Tolerances as in test_triton_ops: the elementwise outputs are fp32 math rounded once to
the storage dtype (half an ulp of the storage dtype relative, plus a few fp32 roundings
of the O(scale) intermediates absolute); reductions accumulate in fp32 in a fixed order,
so against float64 they are off by ~n * eps32 relative at worst (sizes here: < 1e-4).
"""

from __future__ import annotations

import pytest
import torch

from sam_fast import dispatch, family_ops

TRITON_REASON = dispatch.why_unavailable("triton", "cpu")
CPP_REASON = dispatch.why_unavailable("cpp", "cpu")
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    TRITON_REASON is not None, reason=f"triton on CPU: {TRITON_REASON}")), "cpp", "auto"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# One element, a prime, around BLOCK (1024) and CHUNK (16384), empty, several dims.
SHAPES = [(1,), (7,), (1021,), (1025,), (16411,), (0,), (13, 17), (3, 5, 7)]
EPS = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11,
       torch.float64: 2.0**-53}


def _lists(dtype, shapes=SHAPES, seed=0, n=2, non_contiguous=False):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        lst = []
        for s in shapes:
            t = torch.randn(s, generator=gen, dtype=torch.float64)
            if non_contiguous and t.dim() == 2:  # a slice with gaps: not one dense run
                t = torch.randn(s[0], 2 * s[1], generator=gen, dtype=torch.float64)[:, ::2]
            elif non_contiguous and t.dim() == 3:  # dense but permuted
                t = torch.randn(s[::-1], generator=gen, dtype=torch.float64).permute(2, 1, 0)
            lst.append(t.to(dtype))
        out.append(lst)
    return out


def _f64(ts):
    return [t.double().clone() for t in ts]


def _close(actual, expected, dtype, scale=1.0, ops=8):
    """Storage rounding (relative) plus a few fp32 roundings of O(scale) values (absolute)."""
    tol = EPS[dtype] * expected.abs() + ops * EPS[torch.float32] * scale + 1e-300
    assert ((actual.double() - expected).abs() <= tol).all(), (actual, expected)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("non_contiguous", [False, True])
def test_dot_sumsq_against_float64(backend, dtype, non_contiguous):
    a, b = _lists(dtype, non_contiguous=non_contiguous)
    out = family_ops.dot_sumsq(a, b, backend=backend)
    assert out.shape == (3,)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    wa, wb = _f64(a), _f64(b)
    expected = torch.stack([sum((x * y).sum() for x, y in zip(wa, wb)),
                            sum((x * x).sum() for x in wa), sum((y * y).sum() for y in wb)])
    # fp32 accumulation over ~35k terms: |error| <= n * eps32 * sum|terms| (far below here)
    bound = 1e-4 * torch.stack([sum((x * y).abs().sum() for x, y in zip(wa, wb)),
                                expected[1], expected[2]])
    assert ((out.double() - expected).abs() <= bound).all(), (out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dot_sumsq_is_deterministic_and_sees_non_finite(backend):
    a, b = _lists(torch.float32, n=2, seed=3)
    first = family_ops.dot_sumsq(a, b, backend=backend)
    assert all(torch.equal(first, family_ops.dot_sumsq(a, b, backend=backend)) for _ in range(3))
    b[2].view(-1)[5] = float("inf")
    out = family_ops.dot_sumsq(a, b, backend=backend)
    assert not torch.isfinite(out[2]) and torch.isfinite(out[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dot_sumsq_many_tensors_and_mixed_groups(backend):
    a, b = _lists(torch.float32, shapes=[(k % 37 + 1,) for k in range(300)], seed=4)
    a[5], b[5] = a[5].to(torch.bfloat16), b[5].to(torch.bfloat16)  # a second group
    out = family_ops.dot_sumsq(a, b, backend=backend)
    wa, wb = _f64(a), _f64(b)
    expected = torch.stack([sum((x * y).sum() for x, y in zip(wa, wb)),
                            sum((x * x).sum() for x in wa), sum((y * y).sum() for y in wb)])
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("non_contiguous", [False, True])
def test_combine_against_float64(backend, dtype, non_contiguous):
    a, b = _lists(dtype, seed=1, non_contiguous=non_contiguous)
    wa, wb = _f64(a), _f64(b)
    coef = torch.tensor([1.25, -0.375])  # exact in every dtype: the formula is exact
    family_ops.combine_(a, b, coef, backend=backend)
    for x, ya, yb in zip(a, wa, wb):
        _close(x, 1.25 * ya - 0.375 * yb, dtype, scale=float(torch.cat([ya.abs().reshape(-1), yb.abs().reshape(-1), torch.ones(1, dtype=ya.dtype)]).max()) * 2)


@pytest.mark.parametrize("dtype", DTYPES[:3], ids=str)
def test_combine_triton_equals_torch_bit_for_bit(dtype):
    if TRITON_REASON is not None:
        pytest.skip(TRITON_REASON)
    a, b = _lists(dtype, seed=2)
    a2 = [t.clone() for t in a]
    coef = torch.tensor([0.7, -1.3])  # not exact: both round the same products
    family_ops.combine_(a, b, coef, backend="triton")
    family_ops.combine_(a2, b, coef, backend="torch")
    assert all(torch.equal(x, y) for x, y in zip(a, a2))


def _ema64(m, g, decay, sigma, updated, scale):
    g = [x.double().clone() for x in g]
    m = [x.double().clone() for x in m]
    u = [x / scale for x in g]
    new = [decay * x.double() + (1 - decay) * y for x, y in zip(m, u)]
    ref = new if updated else [x.double() for x in m]
    d = [y - sigma * r for y, r in zip(u, ref)]
    return new, d


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("updated", [True, False])
@pytest.mark.parametrize("scaled", [False, True])
def test_ema_residual_against_float64(backend, dtype, updated, scaled):
    m, g = _lists(dtype, seed=5, non_contiguous=True)
    scale = 1024.0 if scaled else 1.0
    if scaled:
        g = [(t.double() * scale).to(dtype) for t in g]
    new, d = _ema64(m, g, 0.9, 0.8, updated, scale)
    total = family_ops.ema_residual_(m, g, decay=0.9, sigma=0.8, updated=updated,
                                     grad_scale=torch.tensor(scale) if scaled else None,
                                     backend=backend)
    for x, y in zip(m, new):
        _close(x, y, dtype, scale=4.0)
    for x, y in zip(g, d):
        _close(x, y, dtype, scale=8.0)
    # The norm is that of the residual as stored.
    stored = sum((x.double() ** 2).sum() for x in g)
    torch.testing.assert_close(total.double(), stored, rtol=1e-5, atol=0)


# Under the interpreter numpy evaluates inf - inf before the store is masked off.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_residual_skip_writes_nothing(backend):
    m, g = _lists(torch.float32, seed=6)
    m0, g0 = [t.clone() for t in m], [t.clone() for t in g]
    g[1].view(-1)[0] = float("inf")
    g0[1].view(-1)[0] = float("inf")
    total = family_ops.ema_residual_(m, g, decay=0.5, sigma=1.0, skip=torch.tensor(1.0),
                                     backend=backend)
    assert torch.isnan(total)
    assert all(torch.equal(x, y) for x, y in zip(m + g, m0 + g0))
    family_ops.ema_residual_(m, g, decay=0.5, sigma=1.0, skip=torch.tensor(0.0),
                             backend=backend)
    assert not torch.equal(m[0], m0[0])


@pytest.mark.parametrize("dtype", DTYPES[:3], ids=str)
def test_ema_residual_triton_elementwise_equals_torch(dtype):
    if TRITON_REASON is not None:
        pytest.skip(TRITON_REASON)
    m, g = _lists(dtype, seed=7)
    m2, g2 = [t.clone() for t in m], [t.clone() for t in g]
    s1 = family_ops.ema_residual_(m, g, decay=0.95, sigma=1.0, grad_scale=torch.tensor(8.0),
                                  backend="triton")
    s2 = family_ops.ema_residual_(m2, g2, decay=0.95, sigma=1.0, grad_scale=torch.tensor(8.0),
                                  backend="torch")
    assert all(torch.equal(x, y) for x, y in zip(m + g, m2 + g2))
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=0)  # another summation order


def test_errors_name_the_lists():
    a, b = _lists(torch.float32, shapes=[(3,), (4,)])
    with pytest.raises(RuntimeError, match=r"b\[1\] has shape"):
        family_ops.dot_sumsq(a, [b[0], torch.zeros(5)])
    with pytest.raises(ValueError, match="b has 1 tensors"):
        family_ops.combine_(a, b[:1], torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="two elements"):
        family_ops.combine_(a, b, torch.tensor(1.0))
    with pytest.raises(ValueError, match="at least one"):
        family_ops.dot_sumsq([], [])


def test_every_backend_serves_the_family_ops_itself():
    cpu = torch.device("cpu")
    assert not hasattr(dispatch, "TORCH_FALLBACK")
    for op in dispatch.FAMILY_OP_NAMES:
        if CPP_REASON is None:
            assert dispatch.served_by(op, "cpp", cpu) == "cpp"
            assert dispatch.served_by(op, "auto", cpu) == "cpp"
        if TRITON_REASON is None:
            assert dispatch.served_by(op, "triton", cpu) == "triton"
        assert dispatch.served_by(op, "torch", cpu) == "torch"
    # a backend without an implementation of a family op is refused, not handed to torch
    dispatch.register_backend("partial_test", {}, unavailable_reason=None)
    try:
        with pytest.raises(RuntimeError, match="implements no 'dot_sumsq'"):
            dispatch.lookup("dot_sumsq", "partial_test", cpu)
        with pytest.raises(RuntimeError, match="implements no 'combine_'"):
            dispatch.served_by("combine_", "partial_test", cpu)
    finally:
        del dispatch._BACKENDS["partial_test"]
        dispatch._RESOLVED.clear()


def _opcheck_args(dtype=torch.float32, device="cpu"):
    a, b = _lists(dtype, shapes=[(3,), (2, 5)])
    a, b = [t.to(device) for t in a], [t.to(device) for t in b]
    return {
        "dot_sumsq": (a, b),
        "combine_": ([t.clone() for t in a], b, torch.tensor([0.5, 2.0], device=device)),
        "ema_residual_": ([t.clone() for t in a], [t.clone() for t in b], 0.9, 1.0, True,
                          torch.tensor(2.0, device=device), torch.tensor(0.0, device=device)),
    }


# On the CPU the schema ops run the cpp kernels when sam_fast._C is built (the composite
# torch specification otherwise); on a GPU the cuda kernels.
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                        reason="needs a CUDA device")])])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", list(dispatch.FAMILY_OP_NAMES))
def test_opcheck(op, dtype, device):
    args = _opcheck_args(dtype, device)[op]
    torch.library.opcheck(getattr(torch.ops.sam_fast, op).default, args)


def test_schema_op_matches_the_backends():
    a, b = _lists(torch.float32, shapes=[(3,), (2, 5)])
    served = "torch" if CPP_REASON is not None else "cpp"
    torch.testing.assert_close(torch.ops.sam_fast.dot_sumsq(a, b),
                               family_ops.dot_sumsq(a, b, backend=served), rtol=0, atol=0)


# -- the compiled kernels (cpp on the CPU, cuda on a GPU) ------------------------------------
#
# The elementwise outputs (combine_'s a, ema_residual_'s m and g) must be the torch
# specification's bits: the kernels evaluate its expressions in its order with each
# product rounded on its own. The sums are checked against float64 with the bound of
# recursive summation: a chain of d additions in unit roundoff u is off by at most
# about (d + 1) * u * sum|terms|. The kernels' longest chain: a lane of a CPU chunk
# (16384 elements over 8 lanes for dot_sumsq, 16 for ema_residual_, then the pairwise
# levels) or a CUDA thread's share of a
# chunk (65536 elements over 512 threads, then 10 tree levels), plus one per chunk
# partial (summed in fp64: far less, counted anyway), the rounded product and the final
# rounding. fp64 storage accumulates in fp64 (u = 2^-53).

HAS_CUDA = torch.cuda.is_available()
COMPILED = {"cpu": "cpp", "cuda": "cuda"}
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        CPP_REASON is not None, reason=f"cpp: {CPP_REASON}")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not HAS_CUDA, reason="needs a CUDA device (the cuda kernels compile here, "
        "scripts/build_cuda_check, but run only on a GPU)")]),
]
CHAIN = {"cpu": 16384 // 8 + 3, "cuda": 65536 // 512 + 10}
CHUNK = {"cpu": 16384, "cuda": 65536}
UNIT = {torch.float64: 2.0**-53}

# One element, primes, both chunk sizes' edges (CPU 16384, CUDA 65536), one tensor over
# the CPU's serial threshold (65536 elements in a call), zero-size tensors among others
# and only zero-size ones, 2000 small tensors (CUDA: several launches), n-d shapes.
SIZE_SETS = {
    "one": [(1,)],
    "primes": [(2,), (7,), (1021,), (16411,)],
    "chunk_edges": [(16383,), (16384,), (16385,), (3 * 16384 + 7,), (65536,), (65537,)],
    "zero_size": [(0,), (5,), (0, 3), (17,)],
    "only_empty": [(0,), (0, 4)],
    "many": [(k % 37 + 1,) for k in range(2000)],
    "nd": [(13, 17), (3, 5, 7), (2, 3, 4, 5)],
}
# contiguous; strided (a 2-d column slice, a 1-d step-2 slice: staged through a temporary);
# dense but permuted; offset by one element (not 16-byte aligned: CUDA's scalar path).
LAYOUTS = ["contiguous", "strided", "permuted", "offset"]


def _make(shapes, dtype, device, gen, layout="contiguous", scale=1.0):
    out = []
    for s in shapes:
        def rand(*size):
            return (torch.randn(*size, generator=gen, dtype=torch.float64) * scale).to(
                device=device, dtype=dtype)
        if layout == "strided" and len(s) == 2:
            t = rand(s[0], 2 * s[1])[:, ::2]
        elif layout == "strided" and len(s) == 1:
            t = rand(2 * s[0])[::2]
        elif layout == "permuted" and len(s) >= 2:
            t = rand(*s[::-1]).permute(*range(len(s) - 1, -1, -1))
        elif layout == "offset" and len(s) == 1:
            t = rand(s[0] + 1)[1:]
        else:
            t = rand(*s)
        assert t.shape == torch.Size(s)
        out.append(t)
    return out


def _sum_bound(device, dtype, shapes, abs_terms):
    """The bound of the kernels' summation (see above) for sum|terms| = abs_terms."""
    u = UNIT.get(dtype, 2.0**-24)
    chunks = sum(-(-torch.Size(s).numel() // CHUNK[device]) for s in shapes)
    return (CHAIN[device] + chunks + 3) * u * abs_terms


_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t):
    return t.detach().cpu().contiguous().view(-1).view(_INT[t.element_size()])


def _equal_bits(xs, ys):
    """Bit for bit (signed zeros and NaNs included), dtypes and shapes too."""
    return len(xs) == len(ys) and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(_bits(x), _bits(y))
        for x, y in zip(xs, ys))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sizes", list(SIZE_SETS))
def test_compiled_dot_sumsq_against_float64(device, dtype, sizes):
    shapes = SIZE_SETS[sizes]
    gen = torch.Generator().manual_seed(11)
    a, b = _make(shapes, dtype, device, gen), _make(shapes, dtype, device, gen, scale=3.0)
    out = family_ops.dot_sumsq(a, b, backend=COMPILED[device])
    assert out.shape == (3,) and out.device.type == device
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    wa, wb = _f64(a), _f64(b)
    expected = torch.stack([sum((x * y).sum() for x, y in zip(wa, wb)),
                            sum((x * x).sum() for x in wa), sum((y * y).sum() for y in wb)])
    abs_terms = torch.stack([sum((x * y).abs().sum() for x, y in zip(wa, wb)),
                             expected[1], expected[2]])
    bound = _sum_bound(device, dtype, shapes, abs_terms.cpu())
    assert ((out.cpu().double() - expected.cpu()).abs() <= bound).all(), (out, expected, bound)
    if sizes == "only_empty":
        assert torch.equal(out.cpu(), torch.zeros(3, dtype=out.dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_elementwise_equals_the_specification(device, dtype, layout):
    """combine_ and ema_residual_ (every option) write the torch specification's bits,
    on awkward sizes and layouts; their sums agree with it within the bound."""
    shapes = SIZE_SETS["primes"] + SIZE_SETS["nd"] + SIZE_SETS["zero_size"]
    gen = torch.Generator().manual_seed(12)
    a, b = _make(shapes, dtype, device, gen, layout), _make(shapes, dtype, device, gen, layout)
    # 0.7 and -1.3 are not exact in any dtype: both sides round the same products.
    for coef in (torch.tensor([0.7, -1.3], dtype=torch.float64, device=device),
                 torch.tensor([1.0, 0.1], device=device)):
        ours, spec = [t.clone() for t in a], [t.clone() for t in a]
        family_ops.combine_(ours, b, coef, backend=COMPILED[device])
        family_ops.combine_(spec, b, coef, backend="torch")
        assert _equal_bits(ours, spec)
    for updated, scale, decay, sigma in [(True, None, 0.9, 0.8), (False, 3.0, 0.95, 1.0),
                                         (True, 4096.0, 0.0, 0.0), (False, None, 0.5, -2.0)]:
        m0 = _make(shapes, dtype, device, gen, layout)
        g0 = _make(shapes, dtype, device, gen, layout, scale=scale or 1.0)
        gs = None if scale is None else torch.tensor(scale, device=device)
        (m1, g1), (m2, g2) = [([t.clone() for t in m0], [t.clone() for t in g0])
                              for _ in range(2)]
        s1 = family_ops.ema_residual_(m1, g1, decay=decay, sigma=sigma, updated=updated,
                                      grad_scale=gs, backend=COMPILED[device])
        s2 = family_ops.ema_residual_(m2, g2, decay=decay, sigma=sigma, updated=updated,
                                      grad_scale=gs, backend="torch")
        assert _equal_bits(m1 + g1, m2 + g2), (updated, scale, decay, sigma)
        assert s1.dtype == s2.dtype and s1.shape == ()
        stored = sum((x.double() ** 2).sum() for x in g1).cpu()
        assert abs(s1.cpu().double() - stored) <= _sum_bound(device, dtype, shapes, stored)


def test_compiled_grad_scale_multiplies_by_the_rounded_reciprocal():
    """u = g * fl(1/S), as the specification (and torch's own unscale) computes, not g / S:
    with S = 3 the two differ in some elements, and the kernel gives the former's bits."""
    if CPP_REASON is not None:
        pytest.skip(f"cpp: {CPP_REASON}")
    gen = torch.Generator().manual_seed(13)
    m, g = _make([(4099,)], torch.float32, "cpu", gen), _make([(4099,)], torch.float32, "cpu", gen)
    raw = g[0].clone()
    three = torch.tensor(3.0)
    # decay 0, sigma 0: m <- u and g <- u exactly
    family_ops.ema_residual_(m, g, decay=0.0, sigma=0.0, grad_scale=three, backend="cpp")
    assert torch.equal(g[0], raw * torch.reciprocal(three))
    assert not torch.equal(g[0], raw / three)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sizes", ["one", "chunk_edges", "many", "only_empty"])
def test_compiled_ema_residual_against_float64(device, dtype, sizes):
    shapes = SIZE_SETS[sizes]
    gen = torch.Generator().manual_seed(14)
    m, g = _make(shapes, dtype, device, gen), _make(shapes, dtype, device, gen, scale=1024.0)
    new, d = _ema64([x.cpu() for x in m], [x.cpu() for x in g], 0.9, 0.8, True, 1024.0)
    total = family_ops.ema_residual_(m, g, decay=0.9, sigma=0.8,
                                     grad_scale=torch.tensor(1024.0, device=device),
                                     backend=COMPILED[device])
    for x, y in zip(m, new):
        _close(x.cpu(), y, dtype, scale=4.0)
    for x, y in zip(g, d):
        _close(x.cpu(), y, dtype, scale=8.0)
    stored = sum((x.cpu().double() ** 2).sum() for x in g)
    assert abs(total.cpu().double() - stored) <= _sum_bound(device, dtype, shapes, stored)
    if sizes == "only_empty":
        assert total.item() == 0.0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flag", [torch.tensor(1.0), torch.tensor(True), torch.tensor(3),
                                  torch.tensor(1e-300, dtype=torch.float64),
                                  torch.tensor(float("nan")), torch.tensor(0.0),
                                  torch.tensor(False), torch.tensor(0, dtype=torch.int32)],
                         ids=lambda t: f"{t.dtype}-{t.item()}")
def test_compiled_skip_flag(device, flag):
    """GradScaler's skip: any non-zero flag (of any dtype, NaN included, as ``skip != 0``)
    writes nothing and returns NaN; zero runs the update. Compiled == specification."""
    gen = torch.Generator().manual_seed(15)
    m, g = _make([(5,), (16411,)], torch.float32, device, gen), \
        _make([(5,), (16411,)], torch.float32, device, gen)
    g[1][7] = float("inf")
    results = {}
    for backend in (COMPILED[device], "torch"):
        mm, gg = [t.clone() for t in m], [t.clone() for t in g]
        total = family_ops.ema_residual_(mm, gg, decay=0.5, sigma=1.0, skip=flag.to(device),
                                         grad_scale=torch.tensor(2.0, device=device),
                                         backend=backend)
        results[backend] = (total, mm, gg)
    (t1, m1, g1), (t2, m2, g2) = results.values()
    skipped = bool(flag != 0)
    assert bool(torch.isnan(t1)) == bool(torch.isnan(t2))
    assert _equal_bits(m1 + g1, m2 + g2)
    if skipped:
        assert torch.isnan(t1) and _equal_bits(m1 + g1, m + g)
    else:
        assert not torch.equal(m1[0], m[0])


def test_cpp_sums_do_not_depend_on_the_thread_count():
    """Chunk partials in chunk order: the same bits for 1 to 4 threads (the call is over
    the serial threshold, so at::parallel_for splits it)."""
    if CPP_REASON is not None:
        pytest.skip(f"cpp: {CPP_REASON}")
    shapes = [(70001,), (16411,), (3,)] + [(k % 37 + 1,) for k in range(300)]
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 4):
            torch.set_num_threads(threads)
            gen = torch.Generator().manual_seed(16)
            a, b = _make(shapes, torch.float32, "cpu", gen), _make(shapes, torch.bfloat16, "cpu", gen)
            dot = family_ops.dot_sumsq(a, [t.float() for t in b], backend="cpp")
            total = family_ops.ema_residual_(b, [t.clone() for t in b], decay=0.9, sigma=0.5,
                                             backend="cpp")
            results.append((dot, total, b))
    finally:
        torch.set_num_threads(before)
    first = results[0]
    for other in results[1:]:
        assert torch.equal(first[0], other[0]) and torch.equal(first[1], other[1])
        assert _equal_bits(first[2], other[2])


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_errors_and_dtypes(device):
    backend = COMPILED[device]
    ops = {op: dispatch.lookup(op, backend, torch.device(device))
           for op in dispatch.FAMILY_OP_NAMES}
    x = [torch.ones(3, device=device)]
    with pytest.raises(ValueError, match="at least one"):
        ops["dot_sumsq"]([], [])
    with pytest.raises(ValueError, match="at least one"):
        ops["ema_residual_"]([], [], decay=0.5, sigma=1.0)
    assert ops["combine_"]([], [], torch.ones(2, device=device)) is None
    with pytest.raises(RuntimeError, match="b has 0 tensors but a has 1"):
        torch.ops.sam_fast.dot_sumsq(x, [])
    with pytest.raises(RuntimeError, match="must share the parameters' dtype"):
        torch.ops.sam_fast.combine_(x, [torch.ones(3, device=device, dtype=torch.half)],
                                    torch.ones(2, device=device))
    with pytest.raises(RuntimeError, match=r"b\[0\] has shape"):
        torch.ops.sam_fast.dot_sumsq(x, [torch.ones(4, device=device)])
    with pytest.raises(RuntimeError, match="float32, float16, bfloat16 and float64"):
        torch.ops.sam_fast.dot_sumsq([torch.ones(3, dtype=torch.int32, device=device)] * 2,
                                     [torch.ones(3, dtype=torch.int32, device=device)] * 2)
    with pytest.raises(RuntimeError, match="two elements"):
        torch.ops.sam_fast.combine_(x, x, torch.ones(3, device=device))
    with pytest.raises(RuntimeError, match="has elements that share memory"):
        torch.ops.sam_fast.combine_([torch.ones(1, device=device).expand(4)],
                                    [torch.ones(4, device=device)], torch.ones(2, device=device))
    if device == "cuda":
        with pytest.raises(RuntimeError, match="is on"):
            torch.ops.sam_fast.dot_sumsq(x, [torch.ones(3)])


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_ops_refuse_grad_and_bump_versions(device):
    """The Autograd / ADInplaceOrView kernels of csrc/ops.cpp serve these ops too."""
    a = [torch.ones(4, device=device, requires_grad=True)]
    b = [torch.ones(4, device=device)]
    coef = torch.tensor([1.0, 2.0], device=device)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.ops.sam_fast.combine_(a, b, coef)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.ops.sam_fast.dot_sumsq(a, b)
    with torch.no_grad():
        m, g = [torch.ones(4, device=device)], [torch.ones(4, device=device)]
        versions = [t._version for t in a + m + g + b]
        torch.ops.sam_fast.combine_(a, b, coef)
        torch.ops.sam_fast.ema_residual_(m, g, 0.5, 1.0, True, None, None)
        after = [t._version for t in a + m + g + b]
    assert after[0] > versions[0] and after[1] > versions[1] and after[2] > versions[2]
    assert after[3] == versions[3]  # read only
    assert torch.equal(a[0].detach(), torch.full((4,), 3.0, device=device))


def test_compiled_kernels_are_registered():
    if CPP_REASON is not None:
        pytest.skip(f"cpp: {CPP_REASON}")
    for op in dispatch.FAMILY_OP_NAMES:
        for key in ("CPU", "Autograd", "ADInplaceOrView"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sam_fast::{op}", key), (
                op, key)
        if HAS_CUDA and dispatch.why_unavailable("cuda", "cuda", False) is None:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sam_fast::{op}", "CUDA")


_LAUNCH_SCRIPT = """
import torch
import sam_fast
from sam_fast import family_ops
gen = torch.Generator().manual_seed(0)
shapes = [(k % 37 + 1,) for k in range(1500)] + [(200_003,), (65536 * 3 + 1,)]
a = [torch.randn(s, generator=gen).cuda() for s in shapes]
b = [torch.randn(s, generator=gen).cuda() for s in shapes]
d = {k: family_ops.dot_sumsq(a, b, backend=k) for k in ("cuda", "torch")}
assert torch.allclose(d["cuda"], d["torch"], rtol=1e-5, atol=0), d
out = {}
for k in ("cuda", "torch"):
    x = [t.clone() for t in a]
    family_ops.combine_(x, b, torch.tensor([0.7, -1.3], device="cuda"), backend=k)
    m, g = [t.clone() for t in a], [t.clone() for t in b]
    s = family_ops.ema_residual_(m, g, decay=0.9, sigma=0.8, backend=k)
    out[k] = (x + m + g, s)
assert all(torch.equal(x, y) for x, y in zip(out["cuda"][0], out["torch"][0]))
assert torch.allclose(out["cuda"][1], out["torch"][1], rtol=1e-5, atol=0)
print("ok")
"""


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("kernel_params", ["default", "4096"])
def test_cuda_both_metadata_sizes(kernel_params):
    """The 32 KiB and the 4 KiB metadata (SAM_FAST_KERNEL_PARAMS=4096, read once per
    process: hence a subprocess), relaunches and split tensors included."""
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
