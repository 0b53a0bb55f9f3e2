"""The framework examples run as a user runs them (`python examples/...`) and learn.

Each prints its held-out accuracy on 512 examples. The bar is chance plus ten standard
deviations of a chance-level classifier's accuracy on 512 examples
(``sqrt(p (1 - p) / 512)``): a model that did not learn cannot pass it, and what the
examples reach (0.93 and 1.00 here) is far above it.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = 512


def _bar(classes: int) -> float:
    p = 1.0 / classes
    return p + 10 * math.sqrt(p * (1 - p) / HELD_OUT)


@pytest.mark.parametrize("script,package,classes", [
    ("lightning_sam.py", "lightning", 4),
    ("hf_trainer_sam.py", "transformers", 2),
])
def test_example_trains(script, package, classes, tmp_path):
    pytest.importorskip(package)  # the test extra installs it: CI runs this
    # Run from a scratch directory, as a user would: the checkout's root is not on
    # sys.path (its top-level kernels/ would shadow Hugging Face's `kernels`).
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = re.search(r"held-out accuracy ([0-9.]+)", done.stdout)
    assert found, done.stdout[-2000:]
    assert float(found.group(1)) > _bar(classes)
