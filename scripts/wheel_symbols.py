"""Inspect a sam_fast wheel's compiled libraries, auditwheel-style (docs/extension.md,
"Wheels for clusters"): for each library, what it links and which symbols it imports.

- ``sam_fast/_C_stable*.so`` (portable) must import no C++ symbol of torch's (``c10::``,
  ``at::``, ``torch::``, ``caffe2``): only the stable ABI's C shims (``aoti_torch_*``,
  ``torch_*``), the limited Python API and the C/C++ runtime; and must not link
  ``libtorch_python``.
- ``sam_fast/_C_stable_cuda*.so`` (the portable CUDA kernels, docs/extension.md, "The portable CUDA library")
  obeys the same rules, and also must not link ``libcudart`` or ``libc10_cuda``
  dynamically nor export any CUDA runtime symbol (its runtime is linked statically and
  hidden: the torch it is loaded in may carry another CUDA's libcudart); its CUDA code
  (architectures, via ``cuobjdump``) is reported.
- ``sam_fast/_C*.so`` (version-matched) is reported: the torch it needs, its CUDA code.

Usage: ``python scripts/wheel_symbols.py WHEEL [--expect portable|both|matched]
[--expect-cuda]``; exit status 1 on a violation or a wheel whose libraries are not the
expected ones (``--expect-cuda``: the portable CUDA library must be there, with CUDA code).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

TORCH_CXX = re.compile(r"\b(c10|at|torch|caffe2)::")


def _run(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def undefined_symbols(so: Path) -> list[str]:
    names = [line.split()[-1] for line in _run("nm", "-D", "--undefined-only", str(so)).splitlines()
             if line.strip()]
    demangled = _run("c++filt", *names).splitlines() if names else []
    return demangled if len(demangled) == len(names) else names


def _cuobjdump() -> str | None:
    """SAM_FAST_CUOBJDUMP, PATH, $CUDA_HOME/bin, or the copy Triton ships (a minimal
    toolkit has none)."""
    candidates = [os.environ.get("SAM_FAST_CUOBJDUMP"), shutil.which("cuobjdump"),
                  str(Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"))]
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        candidates.append(str(Path(spec.origin).parent / "backends" / "nvidia" / "bin" /
                              "cuobjdump"))
    return next((c for c in candidates if c and Path(c).is_file()), None)


def cuda_code(so: Path) -> list[str] | None:
    """The architectures of the library's device code (SASS sm_*, PTX compute_*), or
    None when cuobjdump is not here."""
    tool = _cuobjdump()
    if tool is None:
        return None
    listing = subprocess.run([tool, "--list-elf", "--list-ptx", str(so)],
                             capture_output=True, text=True).stdout
    return sorted(set(re.findall(r"sm_\d+a?|compute_\d+", listing)))


def needed(so: Path) -> list[str]:
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", _run("readelf", "-d", str(so)))


def check_portable(so: Path) -> list[str]:
    problems = []
    symbols = undefined_symbols(so)
    cxx = [s for s in symbols if TORCH_CXX.search(s)]
    if cxx:
        problems.append(f"{so.name} imports {len(cxx)} C++ symbols of torch's, e.g. {cxx[:3]}")
    libs = needed(so)
    if any("torch_python" in lib for lib in libs):
        problems.append(f"{so.name} links libtorch_python")
    shims = [s for s in symbols if s.startswith(("aoti_torch_", "torch_"))]
    python = sorted(s for s in symbols if s.startswith(("Py", "_Py")))
    print(f"{so.name}: portable; links {', '.join(libs)}; imports {len(shims)} stable-ABI C "
          f"shims and {len(python)} Python API functions ({', '.join(python)}); "
          f"{len(cxx)} C++ symbols of torch's")
    return problems


def check_portable_cuda(so: Path, expect_cuda: bool) -> list[str]:
    problems = []
    libs = needed(so)
    for bad in ("libcudart", "libc10_cuda", "libc10.so"):
        if any(lib.startswith(bad) for lib in libs):
            problems.append(f"{so.name} links {bad} dynamically")
    exported = [line.split()[-1] for line in
                _run("nm", "-D", "--defined-only", str(so)).splitlines() if line.strip()]
    runtime = [s for s in exported if s.startswith(("cuda", "__cuda"))]
    if runtime:
        problems.append(f"{so.name} exports {len(runtime)} CUDA runtime symbols, e.g. "
                        f"{runtime[:3]} (link libcudart_static with --exclude-libs)")
    if not any(lib.startswith("libtorch_cuda") for lib in libs):
        problems.append(f"{so.name} does not link libtorch_cuda (the CUDA stream shims)")
    found = cuda_code(so)
    if found is None:
        code = "cuobjdump not found"
    else:
        code = " ".join(found) or "none"
        if expect_cuda and not found:
            problems.append(f"{so.name} has no CUDA code")
    linkage = "dynamic" if any(lib.startswith("libcudart") for lib in libs) else "static"
    print(f"{so.name}: portable CUDA kernels; CUDA runtime linked {linkage}; CUDA code: {code}")
    return problems


def report_matched(so: Path) -> None:
    libs = needed(so)
    archs = ""
    found = cuda_code(so)
    if found is not None:
        archs = f"; CUDA code: {' '.join(found) or 'none'}"
    print(f"{so.name}: version-matched (the torch it was built with only); links "
          f"{', '.join(libs)}{archs}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("--expect", choices=("portable", "both", "matched"))
    parser.add_argument("--expect-cuda", action="store_true",
                        help="the portable CUDA library (_C_stable_cuda) must be there")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(args.wheel) as zf:
            zf.extractall(tmp)
        libs = sorted(Path(tmp, "sam_fast").glob("_C*.so"))
        portable = [so for so in libs if so.name.startswith("_C_stable")]
        matched = [so for so in libs if not so.name.startswith("_C_stable")]
        problems = []
        for so in portable:
            problems += check_portable(so)
        portable_cuda = [so for so in portable if so.name.startswith("_C_stable_cuda")]
        for so in portable_cuda:
            problems += check_portable_cuda(so, args.expect_cuda)
        if args.expect_cuda and not portable_cuda:
            problems.append("expected the portable CUDA library _C_stable_cuda, found none")
        for so in matched:
            report_matched(so)
        kind = ("both" if portable and matched else "portable" if portable else
                "matched" if matched else "none")
        print(f"{args.wheel.name}: libraries: {kind}")
        if args.expect and kind != args.expect:
            problems.append(f"expected {args.expect} libraries, found {kind}")
    for problem in problems:
        print(f"wheel_symbols: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
