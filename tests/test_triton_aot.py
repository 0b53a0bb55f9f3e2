"""The ahead-of-time check of the Triton kernels (``scripts/triton_aot.py``, CI's
``scripts/triton_aot_check``): its PTX reading, its selection and checks on made-up
inputs, and, in a process without TRITON_INTERPRET, the enumeration of a few ops'
variants with the signatures Triton's binder gives them and one compile for sm_90."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("triton_aot", ROOT / "scripts" / "triton_aot.py")
aot = importlib.util.module_from_spec(_spec)
sys.modules["triton_aot"] = aot  # dataclasses look their module up
_spec.loader.exec_module(aot)

PTX = """
	ld.global.b64 	{ %rd5 }, [ %rd6 + 0 ];
	@%p1 bra 	$L__BB0_3;
$L__BB0_2:                              // %.lr.ph
	ld.global.v4.b32 	{ %r1, %r2, %r3, %r4 }, [ %rd25 + 0 ];
	ld.global.L1::evict_last.v2.b64 	{ %rd1, %rd2 }, [ %rd26 + 0 ];
	st.global.v4.b32 	[ %rd29 + 0 ], { %r33, %r34, %r35, %r36 };
	@%p2 bra 	$L__BB0_2;
$L__BB0_3:
	@%p4 ld.global.b16 	{ %rs1 }, [ %rd31 + 0 ];
	@%p4 st.global.b32 	[ %rd35 + 0 ], { %r57 };
	ret;
"""


def test_access_widths():
    assert aot._access_width("ld.global.v4.b32") == ("ld", 16)
    assert aot._access_width("ld.global.L1::evict_last.v2.b64") == ("ld", 16)
    assert aot._access_width("st.global.b16") == ("st", 2)
    assert aot._access_width("ld.global.nc.v2.f32") == ("ld", 8)


def test_vector_report_tells_the_loop_from_the_rest():
    loop, other = aot.vector_report(PTX)
    assert loop == [("ld", 16), ("ld", 16), ("st", 16)]
    assert other == [("ld", 8), ("ld", 2), ("st", 4)]


def _variant(aligned=True, **flags):
    constexprs = (("DT", "fp32"),) + tuple(flags.items()) + (("ALIGNED", aligned),
                                                              ("BLOCK", 1024))
    return aot.Variant("m", "k", "sm_90", (("meta", "*i64"), ("lr", "fp32")) + tuple(
        (n, "constexpr") for n, _ in constexprs), constexprs, (("meta", (("tt.divisibility", 16),)),),
        ())


def test_select_is_a_pairwise_cover_with_the_extremes():
    import itertools

    names = ("A", "B", "C", "D", "E")
    every = [_variant(al, **dict(zip(names, bits)))
             for al in (True, False) for bits in itertools.product((False, True), repeat=5)]
    chosen = aot.select(every)
    assert len(chosen) < len(every) // 2
    for a, b in itertools.combinations(names + ("ALIGNED",), 2):
        for va, vb in itertools.product((False, True), repeat=2):
            assert any(v.constexpr(a) is va and v.constexpr(b) is vb for v in chosen), (a, b)
    for al in (True, False):
        assert _variant(al, **dict.fromkeys(names, True)) in chosen
        assert _variant(al, **dict.fromkeys(names, False)) in chosen


def test_check_names_each_defect():
    v = _variant(True)
    good = aot.Result(v, True, regs=40, spill_stores=0, spill_loads=0, stack=0, local=0,
                      shared=0, loop_widths=(("ld", 16), ("st", 16)))
    assert aot.check(good) == ()
    spills = aot.Result(**{**good.__dict__, "spill_stores": 8, "spill_loads": 8, "stack": 8})
    assert [p.split(" ")[0] for p in aot.check(spills)] == ["spills", "local"]
    assert "registers" in aot.check(aot.Result(**{**good.__dict__, "regs": 200}))[0]
    narrow = aot.Result(**{**good.__dict__, "loop_widths": (("ld", 16), ("st", 4))})
    assert "st 4B" in aot.check(narrow)[0]
    unaligned = aot.Result(**{**narrow.__dict__, "variant": _variant(False)})
    assert aot.check(unaligned) == ()  # unaligned variants may use narrow accesses
    assert "main loop" in aot.check(aot.Result(**{**good.__dict__, "loop_widths": ()}))[0]
    assert aot.check(aot.Result(v, False, error="boom"))[0].startswith("does not compile")


_PROBE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import triton_aot as aot
    e = aot.enumerate_variants(("float32",), ("grad_sumsq", "restore_sgd_"))
    out = {"errors": e.errors, "hazards": aot.hazards(e), "variants": [
        [v.kernel, v.target, dict(v.signature), dict(v.constexprs), dict(v.attrs),
         sorted({(l.case.get("style"), l.case.get("n")) for l in ls})]
        for v, ls in e.variants().items()]}
    aot._KERNELS.update(e.kernels)
    sgd = [v for v in e.variants("sm_90") if v.kernel == "_restore_sgd_kernel"
           and v.constexpr("ALIGNED") and v.constexpr("MOMENTUM") and v.constexpr("HAS_WD")]
    r = aot.compile_variant(sgd[0])
    out["compiled"] = [r.ok, r.error, r.regs, r.spill_stores, r.stack, list(r.loop_widths),
                       list(aot.check(r))]
    print("JSON" + json.dumps(out, default=str))
""")


@pytest.mark.slow
def test_enumeration_signatures_and_one_compile(tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(ROOT / "scripts")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.split("JSON", 1)[1])
    assert out["errors"] == []
    variants = out["variants"]
    kernels = {(k, t) for k, t, *_ in variants}
    assert {("_restore_sgd_kernel", "sm_90"), ("_restore_sgd_kernel", "sm_80"),
            ("_sumsq_partials_kernel", "sm_90"), ("_sum_kernel", "sm_80")} <= kernels
    sgd = [v for v in variants if v[0] == "_restore_sgd_kernel" and v[1] == "sm_90"]
    # The binder's mapping: the block map and the address rows are int64 pointers, the
    # block count an unspecialised i32, hyperparameters fp32 whatever Python type they
    # came as (the backend passes float()), DT a constexpr.
    for _, _, sig, consts, attrs, _ in sgd:
        assert sig["blocks"] == "*i64"
        assert all(sig[r] == "*i64" for r in ("p_row", "b_row", "g_row", "m_row"))
        assert sig["B"] == "i32" and "B" not in attrs
        assert sig["lr"] == "fp32" and sig["DT"] == "constexpr" and consts["DT"] == "fp32"
    assert {c["ALIGNED"] for _, _, _, c, _, _ in sgd} == {True, False}
    # The options that only select (GradScaler's scalars, maximize, the first step) are
    # runtime flags, one u1 (a Python bool) each: the matrix turns them all, yet the variants are only
    # weight decay x (no momentum, momentum, nesterov) x aligned.
    for _, _, sig, consts, _, _ in sgd:
        assert all(sig[f] == "u1" for f in ("has_scale", "has_inf", "maximize", "init"))
        assert sig["grad_scale"] == sig["found_inf"] == "*fp32"
        assert not {"HAS_SCALE", "HAS_INF", "MAXIMIZE", "INIT"} & set(consts)
    shapes = {(c["HAS_WD"], c["MOMENTUM"], c["NESTEROV"], c["ALIGNED"])
              for _, _, _, c, _, _ in sgd}
    assert len(sgd) == len(shapes) == 12
    assert (False, False, True, True) not in shapes  # nesterov means nothing without momentum
    # torch.optim's int 0 defaults compile the same variant as floats: fp32, no attributes.
    momentum_off = {(sig["momentum"], tuple(map(tuple, attrs.get("momentum", ()))), style)
                    for _, _, sig, c, attrs, cases in sgd if not c["MOMENTUM"]
                    for style, _ in cases}
    assert {m for m, _, _ in momentum_off} == {"fp32"}
    assert {a for _, a, _ in momentum_off} == {()}
    # The ordered sum's length is not specialised: one variant for 1, 3 and 16 blocks.
    sums = {(sig["n"], consts.get("n"), bool(attrs.get("n"))): sorted(n for _, n in cases)
            for k, t, sig, consts, attrs, cases in variants if k == "_sum_kernel" and t == "sm_90"}
    assert sums == {("i32", None, False): [1, 3, 16]}
    text = "\n".join(out["hazards"])
    assert "_sum_kernel(n)" not in text and "_restore_sgd_kernel(momentum)" not in text
    ok, error, regs, spills, stack, loop, problems = out["compiled"]
    assert ok, error
    assert regs > 0 and spills == 0 and stack == 0 and problems == []
    assert loop and all(w == 16 for _, w in loop)
