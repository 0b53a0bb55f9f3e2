"""The two compiled libraries (docs/extension.md, "Two libraries"): the version-matched
``sam_fast._C`` and the portable ``sam_fast._C_stable`` (PyTorch's stable ABI), which
one the loader picks, and that the portable one computes the same bits.

Each library registers the ``sam_fast`` namespace for good, so whatever needs the other
library than this process's runs in a subprocess. ``scripts/portable_wheel_check`` runs
this file, with the cpp tests, against one portable wheel installed under several
torch versions (``SAM_FAST_EXPECT_ABI=stable``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sam_fast import _extension

HERE = Path(__file__).resolve().parent


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SAM_FAST_")}
    full_env.update(env)
    full_env["PYTHONPATH"] = os.pathsep.join([str(HERE)] + sys.path)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full_env,
                          capture_output=True, text=True, timeout=300)


def _portable_built() -> bool:
    import importlib.util

    return importlib.util.find_spec("sam_fast._C_stable") is not None


def test_the_expected_library_serves():
    """The loader's choice: SAM_FAST_EXPECT_ABI when a harness sets it, else the
    version-matched library wherever it was built for this torch."""
    expected = os.environ.get("SAM_FAST_EXPECT_ABI")
    if expected is None:
        if _extension.load() is None:
            pytest.skip(f"no compiled library: {_extension.cpp_reason()}")
        built, _ = _extension._built()
        if built is None or _extension.abi_choice() != "auto":
            pytest.skip("this installation has no version-matched library, or SAM_FAST_ABI "
                        "chooses")
        expected = "matched" if built.split("+")[0] == torch.__version__.split("+")[0] else "stable"
    assert _extension.abi() == expected, _extension.cpp_reason()
    info = _extension.build_info()
    assert info["abi"] == expected
    if expected == "stable":
        assert info["module"] == "sam_fast._C_stable"
        assert info["target_version"] == "%d.%d" % _extension.STABLE_TARGET
        assert info["with_cuda"] is False


_STEPS = """
    import json, torch
    from models import batches, loss_of, small_cnn
    from sam_fast import SAM, _extension
    torch.manual_seed(0)
    model = small_cnn(0, torch.float32)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
              weight_decay=5e-4, backend="cpp")
    for batch in batches(4, batch_size=8, dtype=torch.float32):
        loss_of(model, batch).backward()
        opt.first_step(zero_grad=True)
        loss_of(model, batch).backward()
        opt.second_step(zero_grad=True)
    g = [torch.randn(7), torch.randn(3, 5).t(), torch.randn(1)]
    print(json.dumps({
        "abi": _extension.abi(),
        "weights": [p.detach().flatten().tolist() for p in model.parameters()],
        "sumsq": torch.ops.sam_fast.grad_sumsq(g, [], 0.0).item(),
        "sumsq64": sum(float((t.double() ** 2).sum()) for t in g),
    }))
"""


def _steps(abi: str) -> dict:
    done = _run(_STEPS, SAM_FAST_ABI=abi, SAM_FAST_REQUIRE_EXT="1")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not _portable_built(), reason="the portable sam_fast._C_stable is not built "
                    "(SAM_FAST_BUILD=matched, or a torch older than 2.10 at build time)")
def test_portable_library_gives_the_matched_librarys_bits():
    """Same source, same kernels: four SAM + SGD steps of a small CNN end on the same
    bits under either library, and a sum of squares agrees with float64 to fp32 rounding."""
    if _extension._built()[0] is None and os.environ.get("SAM_FAST_EXPECT_ABI") == "stable":
        pytest.skip("only the portable library is installed here")
    matched, portable = _steps("matched"), _steps("stable")
    assert (matched["abi"], portable["abi"]) == ("matched", "stable")
    assert portable["weights"] == matched["weights"]
    assert portable["sumsq"] == matched["sumsq"]
    # 23 squares summed in fp32: relative error within a few units of 2**-24 per term.
    assert abs(portable["sumsq"] - portable["sumsq64"]) <= 23 * 2**-23 * portable["sumsq64"]


@pytest.mark.skipif(not _portable_built(), reason="the portable sam_fast._C_stable is not built")
def test_portable_library_runs_a_sam_step_here():
    out = _steps("stable")
    assert out["abi"] == "stable"
    assert all(all(v == v for v in w) for w in out["weights"])  # finite: no NaN
    assert abs(out["sumsq"] - out["sumsq64"]) <= 23 * 2**-23 * out["sumsq64"]


@pytest.mark.skipif(not _portable_built(), reason="the portable sam_fast._C_stable is not built")
def test_portable_direct_calls_keep_the_autograd_behaviour():
    """The optimizers' calls around the Python autograd hop (sam_fast._stable.direct_call)
    still bump every written list's version counters and nothing else, take inference
    tensors, and under grad mode refuse an argument that requires grad, as the op does."""
    code = """
        import torch
        from sam_fast import _compiled_ops, _extension
        assert _extension.abi() == "stable"
        p, b = [torch.randn(3), torch.randn(2, 2)], [torch.randn(3), torch.randn(2, 2)]
        before = [t._version for t in p + b]
        with torch.no_grad():
            _compiled_ops.restore_(p, b)
        assert all(torch.equal(x, y) for x, y in zip(p, b))
        after = [t._version for t in p + b]
        assert all(a > v for a, v in zip(after[:2], before[:2])), (before, after)
        assert after[2:] == before[2:], (before, after)
        with torch.inference_mode():
            q, c = [torch.randn(4)], [torch.randn(4)]
            _compiled_ops.restore_(q, c)
        assert torch.equal(q[0], c[0])
        w = torch.randn(3, requires_grad=True)
        try:
            _compiled_ops.restore_([w], [torch.randn(3)])
        except RuntimeError as e:
            assert "not differentiable" in str(e), e
        else:
            raise AssertionError("grad mode with a tensor that requires grad was not refused")
        print("ok")
    """
    done = _run(code, SAM_FAST_ABI="stable", SAM_FAST_REQUIRE_EXT="1")
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_a_torch_older_than_the_target_falls_back_with_one_warning():
    """Under a torch older than 2.10 the portable library is not imported (it would
    fail on missing shims): the cpp backend is unavailable with the reason, and
    backend='auto' takes the torch backend after one warning."""
    code = """
        import warnings, torch
        torch.__version__ = "2.9.1"   # as an older torch reports itself
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from sam_fast import SAM, _extension, dispatch
            assert _extension.load() is None
            reason = dispatch.why_unavailable("cpp", "cpu")
            assert "predates 2.10" in reason, reason
            w = torch.nn.Parameter(torch.randn(5))
            opt = SAM([w], torch.optim.SGD, lr=0.1)
            for _ in range(3):
                w.grad = torch.randn(5)
                opt.first_step(zero_grad=True)
                w.grad = torch.randn(5)
                opt.second_step(zero_grad=True)
        ours = [str(c.message) for c in caught if "sam_fast" in str(c.message)]
        assert len(ours) == 1 and "predates 2.10" in ours[0], ours
        print("ok")
    """
    done = _run(code, SAM_FAST_ABI="stable")
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_a_bad_abi_choice_is_a_clear_error():
    done = _run("from sam_fast import _extension; _extension.load()", SAM_FAST_ABI="portable")
    assert done.returncode != 0
    assert "SAM_FAST_ABI='portable'; expected one of ('auto', 'matched', 'stable')" in done.stderr


# The portable CUDA kernels (sam_fast._C_stable_cuda, docs/extension.md, "The portable CUDA library"): the same
# source as the matched library's, so the same bits; run on a lent GPU only.
_CUDA_STEPS = """
    import json, sys, torch
    from models import batches, loss_of, small_cnn
    from sam_fast import SAM, _extension
    backend = sys.argv[1]
    out = {"abi": _extension.abi(), "cuda_kernels": _extension.build_info().get("cuda_kernels")}
    for name, base, kwargs in (
            ("sgd", torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
            # capturable: the step counters live on the device (the portable build bumps
            # them with a kernel of its own, the matched one with _foreach_add_)
            ("adamw", torch.optim.AdamW, dict(lr=1e-3, weight_decay=1e-2, capturable=True))):
        torch.manual_seed(0)
        model = small_cnn(0, torch.float32).cuda()
        opt = SAM(model.parameters(), base, rho=0.05, backend=backend, **kwargs)
        for x, y in batches(4, batch_size=8, dtype=torch.float32):
            batch = (x.cuda(), y.cuda())
            loss_of(model, batch).backward()
            opt.first_step(zero_grad=True)
            loss_of(model, batch).backward()
            opt.second_step(zero_grad=True)
        torch.cuda.synchronize()
        out[name] = [p.detach().cpu().flatten().tolist() for p in model.parameters()]
        if name == "adamw":
            out["steps"] = [float(s["step"]) for s in opt.base_optimizer.state.values()
                            if "step" in s] if hasattr(opt, "base_optimizer") else []
    g = [torch.randn(7, device="cuda"), torch.randn(3, 5, device="cuda").t(),
         torch.randn(1, device="cuda")]
    out["sumsq"] = torch.ops.sam_fast.grad_sumsq(g, [], 0.0).item()
    print(json.dumps(out))
"""


def _cuda_steps(abi: str, backend: str = "cuda") -> dict:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_CUDA_STEPS), backend],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("SAM_FAST_")},
             "SAM_FAST_ABI": abi, "SAM_FAST_REQUIRE_EXT": "1", "SAM_FAST_JIT": "0",
             "PYTHONPATH": os.pathsep.join([str(HERE)] + sys.path)},
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _matched_has_cuda() -> bool:
    built, _ = _extension._built()
    if built is None or built.split("+")[0] != torch.__version__.split("+")[0]:
        return False
    done = _run("""
        import torch
        from sam_fast import _extension
        _extension.load()
        print(_extension.abi() == "matched" and _extension.build_info().get("with_cuda"))
    """, SAM_FAST_ABI="matched")
    return done.returncode == 0 and done.stdout.strip().endswith("True")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.skipif(not _portable_built(), reason="the portable sam_fast._C_stable is not built")
def test_portable_cuda_library_gives_the_matched_librarys_bits():
    """Four SAM + SGD and SAM + AdamW(capturable) steps of a small CNN on CUDA with
    backend='cuda' through the portable library end on the matched library's bits (the
    same kernels from the same source); where only the portable library is installed,
    close to the torch backend's."""
    portable = _cuda_steps("stable")
    assert portable["abi"] == "stable"
    assert portable["cuda_kernels"]["source"] == "sam_fast._C_stable_cuda"
    assert portable["cuda_kernels"]["loaded"], portable["cuda_kernels"]
    assert all(s == 4.0 for s in portable["steps"]), portable["steps"]
    if _matched_has_cuda():
        matched = _cuda_steps("matched")
        assert matched["abi"] == "matched"
        for key in ("sgd", "adamw", "steps", "sumsq"):
            assert portable[key] == matched[key], key
    else:
        reference = _cuda_steps("stable", backend="torch")
        for key in ("sgd", "adamw"):
            for a, b in zip(portable[key], reference[key]):
                assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-6), key
