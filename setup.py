"""Build script. The pure-Python package needs nothing compiled; the C++/CUDA
extension ``sam_fast._C`` joins here (DESIGN.md section 5) when csrc/ exists.

The Triton kernels live in the top-level ``kernels/`` directory and ship inside
the wheel as ``sam_fast.kernels`` (a top-level ``kernels`` package would clash
with an existing PyPI distribution of that name).
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

packages = find_packages(include=["sam_fast", "sam_fast.*"])
package_dir = {"": "."}
if (ROOT / "kernels" / "__init__.py").exists():
    packages.append("sam_fast.kernels")
    package_dir["sam_fast.kernels"] = "kernels"

setup(packages=packages, package_dir=package_dir)
