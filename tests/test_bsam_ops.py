"""BSAM's three ops (sam_fast.bsam_ops) on the compiled backends (``cpp`` on the CPU,
``cuda`` on a GPU) against the torch specification (sam_fast/backends/torch_bsam.py), bit
for bit: every storage dtype (fp16, bf16, fp32; fp64 in fp64), awkward sizes and layouts,
every option, the skip flag of any dtype; the same bits for any number of CPU threads;
their schemas under ``torch.library.opcheck``; routing through ``sam_fast.dispatch``.

The kernels evaluate the specification's expressions in its order with each product and
quotient rounded on its own (csrc/bsam.h); the square roots are torch.sqrt's on either
device (correctly rounded on CUDA; on the CPU the kernels take them from ATen's sqrt,
which is not correctly rounded there), so nothing here needs a tolerance.
"""

from __future__ import annotations

import pytest
import torch

from sam_fast import bsam_ops, dispatch

CPP_REASON = dispatch.why_unavailable("cpp", "cpu")
HAS_CUDA = torch.cuda.is_available()
COMPILED = {"cpu": "cpp", "cuda": "cuda"}
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        CPP_REASON is not None, reason=f"cpp: {CPP_REASON}")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not HAS_CUDA, reason="needs a CUDA device (the cuda kernels compile here, "
        "scripts/build_cuda_check, but run only on a GPU)")]),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
OPS = list(dispatch.BSAM_OP_NAMES)

# One element, primes, both chunk sizes' edges (CPU 16384, CUDA 65536), zero-size tensors
# among others and only zero-size ones, 2000 small tensors (CUDA: several launches), n-d.
SIZE_SETS = {
    "one": [(1,)],
    "primes": [(2,), (7,), (1021,), (16411,)],
    "chunk_edges": [(16383,), (16384,), (16385,), (3 * 16384 + 7,), (65536,), (65537,)],
    "zero_size": [(0,), (5,), (0, 3), (17,)],
    "only_empty": [(0,), (0, 4)],
    "many": [(k % 37 + 1,) for k in range(2000)],
    "nd": [(13, 17), (3, 5, 7), (2, 3, 4, 5)],
}
# contiguous; strided (staged through a temporary); dense but permuted; offset by one
# element (not 16-byte aligned: CUDA's scalar path).
LAYOUTS = ["contiguous", "strided", "permuted", "offset"]


def _tensor(shape, dtype, device, gen, layout, kind):
    def draw(*size):
        x = torch.randn(*size, generator=gen, dtype=torch.float64)
        if kind == "positive":  # s: a precision, never 0 (awkward roots and quotients)
            x = x.abs() * 3.0 + 0.05
        return x.to(device=device, dtype=dtype)

    s = shape
    if layout == "strided" and len(s) == 2:
        t = draw(s[0], 2 * s[1])[:, ::2]
    elif layout == "strided" and len(s) == 1:
        t = draw(2 * s[0])[::2]
    elif layout == "permuted" and len(s) >= 2:
        t = draw(*s[::-1]).permute(*range(len(s) - 1, -1, -1))
    elif layout == "offset" and len(s) == 1:
        t = draw(s[0] + 1)[1:]
    else:
        t = draw(*s)
    assert t.shape == torch.Size(s)
    return t


def _state(shapes, dtype, device, seed, layout="contiguous"):
    """w, backup, g, m, s, gs (the group's dtype) and the fp32 noise z."""
    gen = torch.Generator().manual_seed(seed)
    kinds = {"w": "normal", "backup": "normal", "g": "normal", "m": "normal",
             "s": "positive", "gs": "positive"}
    out = {k: [_tensor(sh, dtype, device, gen, layout, kind) for sh in shapes]
           for k, kind in kinds.items()}
    out["z"] = [_tensor(sh, torch.float32, device, gen, layout, "normal") for sh in shapes]
    return out


def _clone(state):
    return {k: [t.clone() for t in v] for k, v in state.items()}


# Options per op: (num_data,) / (rho, grad_scale, skip) / (lr, beta1, beta2, weight_decay,
# damping, new_s, grad_scale, skip). Scalars that are not exact in any dtype, a grad scale
# whose reciprocal rounds (3), zero weight decay (d = g + w0 * 0), both variants.
OPTIONS = {
    "bsam_noise_": [(1000.0,), (0.3,), (50_000.0,)],
    "bsam_ascent_": [(0.05, None, None), (0.7, 3.0, 0.0), (0.05, 1024.0, None)],
    "bsam_update_": [(0.1, 0.9, 0.999, 1e-3, 0.1, True, None, None),
                     (0.5, 0.7, 0.95, 0.0, 0.3, False, 3.0, 0.0),
                     (0.05, 0.0, 0.5, 1e-4, 0.0, True, 1024.0, None)],
}


def _call(op, backend, device, state, options, skip_dtype=torch.float32):
    """Runs ``op`` of ``backend`` on ``state`` (in place); grad_scale and skip are made on
    ``device`` from the floats in ``options``."""
    fn = dispatch.lookup(op, backend, torch.device(device))
    st = state
    if op == "bsam_noise_":
        fn(st["w"], st["backup"], st["z"], st["s"], *options)
        return
    *scalars, grad_scale, skip = options
    gs = None if grad_scale is None else torch.tensor(grad_scale, device=device)
    sk = None if skip is None else torch.tensor(skip, device=device).to(skip_dtype)
    if op == "bsam_ascent_":
        fn(st["w"], st["backup"], st["g"], st["s"], st["gs"], *scalars, gs, sk)
    else:
        fn(st["w"], st["backup"], st["g"], st["m"], st["s"], st["gs"], *scalars, gs, sk)


_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t):
    return t.detach().cpu().contiguous().view(-1).view(_INT[t.element_size()])


def _equal_bits(xs, ys):
    """Bit for bit (signed zeros and NaNs included), dtypes and shapes too."""
    return len(xs) == len(ys) and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(_bits(x), _bits(y))
        for x, y in zip(xs, ys))


def _same_state(a, b):
    return all(_equal_bits(a[k], b[k]) for k in a)


def _compiled_and_spec(op, device, state, options, **kw):
    ours, spec = _clone(state), _clone(state)
    _call(op, COMPILED[device], device, ours, options, **kw)
    _call(op, "torch", device, spec, options, **kw)
    return ours, spec


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op", OPS)
def test_compiled_equals_the_specification(op, device, dtype, layout):
    """Every option of every op writes the specification's bits, on awkward layouts."""
    shapes = SIZE_SETS["primes"] + SIZE_SETS["nd"] + SIZE_SETS["zero_size"]
    state = _state(shapes, dtype, device, seed=1, layout=layout)
    for options in OPTIONS[op]:
        ours, spec = _compiled_and_spec(op, device, state, options)
        assert _same_state(ours, spec), options
        assert not _same_state(ours, state)  # it did write


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sizes", list(SIZE_SETS))
@pytest.mark.parametrize("op", OPS)
def test_compiled_sizes_equal_the_specification(op, device, dtype, sizes):
    state = _state(SIZE_SETS[sizes], dtype, device, seed=2)
    ours, spec = _compiled_and_spec(op, device, state, OPTIONS[op][0])
    assert _same_state(ours, spec)


TRITON_REASON = dispatch.why_unavailable("triton", "cpu")
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


# Under the interpreter numpy evaluates the masked-off tail lanes (zeros) too.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
@pytest.mark.skipif(TRITON_REASON is not None, reason=f"triton on CPU: {TRITON_REASON}")
@pytest.mark.parametrize("dtype", list(EPS), ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
@pytest.mark.parametrize("op", OPS)
def test_triton_agrees_with_the_specification(op, dtype, layout, monkeypatch):
    """The Triton kernels (fp32 math for fp32, fp16 and bf16 storage, the noise fp32)
    within an ulp of the storage dtype of the specification: their square roots are
    correctly rounded, torch's CPU ones are not, so an fp32 result may differ in its last
    bit and a rounded one by one storage ulp. Contiguous lists run on the kernels alone;
    strided positions go to the specification."""
    from sam_fast.backends import triton_bsam

    shapes = SIZE_SETS["primes"] + SIZE_SETS["nd"] + SIZE_SETS["zero_size"]
    state = _state(shapes, dtype, "cpu", seed=8, layout=layout)
    assert dispatch.served_by(op, "triton", torch.device("cpu")) == "triton"
    if layout == "contiguous":
        monkeypatch.setattr(triton_bsam, "_spec", lambda name: pytest.fail(
            f"triton handed a dense {dtype} group of {name} to the specification"))
    for options in OPTIONS[op]:
        ours, spec = _clone(state), _clone(state)
        _call(op, "triton", "cpu", ours, options)
        _call(op, "torch", "cpu", spec, options)
        for key in ours:
            for x, y in zip(ours[key], spec[key]):
                assert x.dtype == y.dtype
                torch.testing.assert_close(x.double(), y.double(), rtol=EPS[dtype],
                                           atol=1e-6, msg=f"{key} {options}")
        assert not _same_state(ours, state)


def test_cpu_roots_are_torch_sqrt_not_correctly_rounded_ones():
    """The CPU kernels take their square roots from ATen, as the specification does:
    where torch's CPU sqrt is not correctly rounded (a vector math library; MKL on x86
    is within an ulp on some CPUs), correctly rounded roots would differ from it. Here:
    gs = sqrt(s) * |g| with g = 1 (exact), so gs is the root itself."""
    if CPP_REASON is not None:
        pytest.skip(f"cpp: {CPP_REASON}")
    gen = torch.Generator().manual_seed(3)
    s = [torch.rand(100_003, generator=gen) * 100 + 0.01]
    ones = [torch.ones_like(s[0])]
    gs = [torch.empty_like(s[0])]
    w = [torch.empty_like(s[0])]
    dispatch.lookup("bsam_ascent_", "cpp", torch.device("cpu"))(
        w, [torch.zeros_like(s[0])], ones, s, gs, 0.05, None, None)
    assert torch.equal(gs[0], torch.sqrt(s[0]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flag", [torch.tensor(1.0), torch.tensor(True), torch.tensor(3),
                                  torch.tensor(1e-300, dtype=torch.float64),
                                  torch.tensor(float("nan")), torch.tensor(0.0),
                                  torch.tensor(False), torch.tensor(0, dtype=torch.int32)],
                         ids=lambda t: f"{t.dtype}-{t.item()}")
@pytest.mark.parametrize("op", ["bsam_ascent_", "bsam_update_"])
def test_compiled_skip_flag(op, device, flag):
    """GradScaler's skip: any non-zero flag (of any dtype, NaN included, as ``skip != 0``)
    makes the ascent w <- backup, gs <- 0 and the update w <- backup (m, s untouched);
    zero runs the op. Compiled == specification either way."""
    state = _state([(5,), (16411,)], torch.float32, device, seed=4)
    state["g"][1][7] = float("inf")
    options = {"bsam_ascent_": (0.05, 2.0, 0.0),
               "bsam_update_": (0.1, 0.9, 0.999, 1e-3, 0.1, True, 2.0, 0.0)}[op]
    results = {}
    for backend in (COMPILED[device], "torch"):
        st = _clone(state)
        fn = dispatch.lookup(op, backend, torch.device(device))
        gscale, skip = torch.tensor(2.0, device=device), flag.to(device)
        if op == "bsam_ascent_":
            fn(st["w"], st["backup"], st["g"], st["s"], st["gs"], 0.05, gscale, skip)
        else:
            fn(st["w"], st["backup"], st["g"], st["m"], st["s"], st["gs"], *options[:6],
               gscale, skip)
        results[backend] = st
    ours, spec = results.values()
    assert _same_state(ours, spec)
    if bool(flag != 0):
        assert _equal_bits(ours["w"], state["backup"])
        if op == "bsam_ascent_":
            assert all(torch.equal(t, torch.zeros_like(t)) for t in ours["gs"])
        else:
            assert _equal_bits(ours["m"] + ours["s"], state["m"] + state["s"])
    else:
        assert not _equal_bits(ours["w"], state["backup"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_compiled_skip_flag_every_dtype(device, dtype):
    state = _state(SIZE_SETS["primes"] + SIZE_SETS["zero_size"], dtype, device, seed=5,
                   layout="strided")
    for op, options in [("bsam_ascent_", (0.05, 3.0, 1.0)),
                        ("bsam_update_", (0.1, 0.9, 0.999, 1e-3, 0.1, False, 3.0, 1.0))]:
        ours, spec = _compiled_and_spec(op, device, state, options)
        assert _same_state(ours, spec), op
        assert _equal_bits(ours["w"], state["backup"])


def test_cpp_does_not_depend_on_the_thread_count():
    """The same bits for 1 to 4 threads (the calls are over the serial threshold, so
    at::parallel_for splits them; the roots' ATen sqrt is elementwise)."""
    if CPP_REASON is not None:
        pytest.skip(f"cpp: {CPP_REASON}")
    shapes = [(70001,), (16411,), (3,)] + [(k % 37 + 1,) for k in range(300)]
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3, 4):
            torch.set_num_threads(threads)
            per_op = []
            for dtype in (torch.float32, torch.bfloat16):
                for op in OPS:
                    st = _state(shapes, dtype, "cpu", seed=6)
                    _call(op, "cpp", "cpu", st, OPTIONS[op][1])
                    per_op.append(st)
            results.append(per_op)
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(_same_state(a, b) for a, b in zip(results[0], other))


def _opcheck_args(op, dtype, device):
    st = _state([(3,), (2, 5)], dtype, device, seed=7)
    gs, skip = torch.tensor(4.0, device=device), torch.tensor(0.0, device=device)
    return {
        "bsam_noise_": (st["w"], st["backup"], st["z"], st["s"], 100.0),
        "bsam_ascent_": (st["w"], st["backup"], st["g"], st["s"], st["gs"], 0.05, gs, skip),
        "bsam_update_": (st["w"], st["backup"], st["g"], st["m"], st["s"], st["gs"], 0.1, 0.9,
                         0.999, 1e-3, 0.1, True, gs, skip),
    }[op]


# On the CPU the schema ops run the cpp kernels when sam_fast._C is built (the composite
# torch specification otherwise); on a GPU the cuda kernels.
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")])])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_opcheck(op, dtype, device):
    torch.library.opcheck(getattr(torch.ops.sam_fast, op).default,
                          _opcheck_args(op, dtype, device))


def test_every_backend_serves_the_bsam_ops_itself():
    cpu = torch.device("cpu")
    for op in OPS:
        assert bsam_ops.impl(op, "torch", cpu) is bsam_ops.SPEC[op]
        assert dispatch.served_by(op, "torch", cpu) == "torch"
        if CPP_REASON is None:
            assert dispatch.served_by(op, "cpp", cpu) == "cpp"
            assert dispatch.served_by(op, "auto", cpu) == "cpp"
            assert bsam_ops.impl(op, "auto", cpu) is dispatch.lookup(op, "cpp", cpu)
    dispatch.register_backend("partial_test", {}, unavailable_reason=None)
    try:
        with pytest.raises(RuntimeError, match="implements no 'bsam_update_'"):
            dispatch.lookup("bsam_update_", "partial_test", cpu)
    finally:
        del dispatch._BACKENDS["partial_test"]
        dispatch._RESOLVED.clear()


def test_compiled_kernels_are_registered():
    if CPP_REASON is not None:
        pytest.skip(f"cpp: {CPP_REASON}")
    for op in OPS:
        for key in ("CPU", "Autograd", "ADInplaceOrView"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sam_fast::{op}", key), (
                op, key)
        if HAS_CUDA and dispatch.why_unavailable("cuda", "cuda", False) is None:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sam_fast::{op}", "CUDA")


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_errors(device):
    x = [torch.ones(3, device=device)]
    with pytest.raises(RuntimeError, match="the kernels take Float noise"):
        torch.ops.sam_fast.bsam_noise_(x, [torch.ones(3, device=device)],
                                       [torch.ones(3, device=device, dtype=torch.half)], x,
                                       10.0)
    with pytest.raises(RuntimeError, match="noise has 0 tensors but params has 1"):
        torch.ops.sam_fast.bsam_noise_(x, x, [], x, 10.0)
    with pytest.raises(RuntimeError, match="must share the parameters' dtype"):
        torch.ops.sam_fast.bsam_ascent_(x, x, [torch.ones(3, device=device).double()], x, x,
                                        0.1, None, None)
    with pytest.raises(RuntimeError, match=r"gs\[0\] has shape"):
        torch.ops.sam_fast.bsam_update_(x, x, x, x, x, [torch.ones(4, device=device)], 0.1,
                                        0.9, 0.9, 0.0, 0.1, True, None, None)
    i = [torch.ones(3, device=device, dtype=torch.int32)]
    with pytest.raises(RuntimeError, match="float32, float16, bfloat16 and float64"):
        torch.ops.sam_fast.bsam_update_(i, i, i, i, i, i, 0.1, 0.9, 0.9, 0.0, 0.1, True,
                                        None, None)
    with pytest.raises(RuntimeError, match="skip must hold one element"):
        torch.ops.sam_fast.bsam_ascent_(x, x, x, x, [torch.ones(3, device=device)], 0.1, None,
                                        torch.zeros(2, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_ops_refuse_grad_and_bump_versions(device):
    """The Autograd / ADInplaceOrView kernels of csrc/ops.cpp serve these ops too."""
    w = [torch.ones(4, device=device, requires_grad=True)]
    other = [[torch.ones(4, device=device)] for _ in range(5)]
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.ops.sam_fast.bsam_update_(w, *other, 0.1, 0.9, 0.9, 0.0, 0.1, True, None, None)
    with torch.no_grad():
        b, g, m, s, gs = other
        before = [t._version for t in w + b + g + m + s + gs]
        torch.ops.sam_fast.bsam_update_(w, b, g, m, s, gs, 0.1, 0.9, 0.9, 0.0, 0.1, True, None,
                                        None)
        after = [t._version for t in w + b + g + m + s + gs]
    written = [True, False, False, True, True, False]
    assert [a > v for a, v in zip(after, before)] == written


_LAUNCH_SCRIPT = """
import torch
import sam_fast
from sam_fast import dispatch
gen = torch.Generator().manual_seed(0)
shapes = [(k % 37 + 1,) for k in range(1500)] + [(200_003,), (65536 * 3 + 1,)]
def lists(dtype, positive=False):
    out = [torch.randn(s, generator=gen) for s in shapes]
    return [(t.abs() + 0.05 if positive else t).to("cuda", dtype) for t in out]
cuda = torch.device("cuda")
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    base = [lists(dtype) for _ in range(4)] + [lists(dtype, True), lists(dtype, True)]
    z = lists(torch.float32)
    out = {}
    for k in ("cuda", "torch"):
        w, b, g, m, s, gs = [[t.clone() for t in x] for x in base]
        dispatch.lookup("bsam_noise_", k, cuda)(w, b, z, s, 1000.0)
        dispatch.lookup("bsam_ascent_", k, cuda)(w, b, g, s, gs, 0.05,
                                                 torch.tensor(3.0, device=cuda), None)
        dispatch.lookup("bsam_update_", k, cuda)(w, b, g, m, s, gs, 0.1, 0.9, 0.999, 1e-3,
                                                 0.1, True, None,
                                                 torch.tensor(0.0, device=cuda))
        out[k] = w + b + m + s + gs
    assert all(torch.equal(x, y) for x, y in zip(out["cuda"], out["torch"])), dtype
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
