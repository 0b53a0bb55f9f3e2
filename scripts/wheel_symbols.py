"""Inspect a sam_fast wheel's compiled libraries, auditwheel-style (docs/extension.md,
"Wheels for clusters"): for each library, what it links and which symbols it imports.

- ``sam_fast/_C_stable*.so`` (portable) must import no C++ symbol of torch's (``c10::``,
  ``at::``, ``torch::``, ``caffe2``): only the stable ABI's C shims (``aoti_torch_*``,
  ``torch_*``), the limited Python API and the C/C++ runtime; and must not link
  ``libtorch_python``.
- ``sam_fast/_C*.so`` (version-matched) is reported: the torch it needs, its CUDA code.

Usage: ``python scripts/wheel_symbols.py WHEEL [--expect portable|both|matched]``;
exit status 1 on a violation or a wheel whose libraries are not the expected ones.
"""

from __future__ import annotations

import argparse
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


def report_matched(so: Path) -> None:
    libs = needed(so)
    archs = ""
    if shutil.which("cuobjdump"):
        listing = subprocess.run(["cuobjdump", "--list-elf", "--list-ptx", str(so)],
                                 capture_output=True, text=True).stdout
        found = sorted(set(re.findall(r"sm_\d+a?|compute_\d+", listing)))
        archs = f"; CUDA code: {' '.join(found) or 'none'}"
    print(f"{so.name}: version-matched (the torch it was built with only); links "
          f"{', '.join(libs)}{archs}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("--expect", choices=("portable", "both", "matched"))
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
