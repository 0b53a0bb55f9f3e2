"""The SAM family's generic ops (sam_fast.family_ops) against float64 formulas, the triton
kernels (interpreter on the CPU) against the torch specification, their schemas under
``torch.library.opcheck``, and the explicit fallback of the compiled backends.

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


def test_compiled_backends_fall_back_explicitly():
    cpu = torch.device("cpu")
    for op in dispatch.FAMILY_OP_NAMES:
        assert op in dispatch.TORCH_FALLBACK["cpp"] and op in dispatch.TORCH_FALLBACK["cuda"]
        if dispatch.why_unavailable("cpp", "cpu") is None:
            assert dispatch.served_by(op, "cpp", cpu) == "torch"
            assert dispatch.served_by(op, "auto", cpu) == "torch"
        if TRITON_REASON is None:
            assert dispatch.served_by(op, "triton", cpu) == "triton"
    # a backend with neither an implementation nor a declared fallback is refused
    dispatch.register_backend("partial_test", {}, unavailable_reason=None)
    try:
        with pytest.raises(RuntimeError, match="does not declare a fallback"):
            dispatch.lookup("dot_sumsq", "partial_test", cpu)
    finally:
        del dispatch._BACKENDS["partial_test"]
        dispatch._RESOLVED.clear()


def _opcheck_args():
    a, b = _lists(torch.float32, shapes=[(3,), (2, 5)])
    return {
        "dot_sumsq": (a, b),
        "combine_": ([t.clone() for t in a], b, torch.tensor([0.5, 2.0])),
        "ema_residual_": ([t.clone() for t in a], [t.clone() for t in b], 0.9, 1.0, True,
                          torch.tensor(2.0), torch.tensor(0.0)),
    }


@pytest.mark.parametrize("op", list(dispatch.FAMILY_OP_NAMES))
def test_opcheck(op):
    args = _opcheck_args()[op]
    torch.library.opcheck(getattr(torch.ops.sam_fast, op).default, args)


def test_schema_op_matches_the_backends():
    a, b = _lists(torch.float32, shapes=[(3,), (2, 5)])
    torch.testing.assert_close(torch.ops.sam_fast.dot_sumsq(a, b),
                               family_ops.dot_sumsq(a, b, backend="torch"), rtol=0, atol=0)
