"""pytest-benchmark suite of the SAM/SAMPa contenders (see test_sam_ops.py).

Not part of the test command (``testpaths = ["tests"]``). Run it with::

    pytest benchmarks/ --benchmark-only                       # compare contenders
    pytest benchmarks/ --benchmark-only --benchmark-autosave  # save a baseline
    pytest benchmarks/ --benchmark-only --benchmark-compare   # against the last one

Options: ``--sam-presets tiny,resnet18`` (any preset of sam_fast.bench.presets),
``--sam-dtypes fp32`` and ``--sam-device auto|cpu|cuda`` choose the cases,
``--sam-rounds`` the timed rounds per benchmark; ``--sam-host-presets resnet50`` and
``--sam-host-rounds`` the host-cost cases of test_host_cost.py.
"""

from __future__ import annotations

import pytest
import torch

from sam_fast.bench.presets import DTYPES, PRESETS


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("sam_fast benchmarks")
    group.addoption("--sam-presets", default="tiny,resnet18",
                    help=f"comma-separated presets ({', '.join(PRESETS)}); default tiny,resnet18")
    group.addoption("--sam-dtypes", default="fp32",
                    help=f"comma-separated dtypes ({', '.join(DTYPES)}); default fp32")
    group.addoption("--sam-device", default="auto", help="auto, cpu or cuda[:N]")
    group.addoption("--sam-rounds", type=int, default=10, help="timed rounds per benchmark")
    group.addoption("--sam-host-presets", default="resnet50",
                    help="comma-separated presets whose topology test_host_cost.py times with "
                         "tiny tensors; default resnet50 (161 tensors)")
    group.addoption("--sam-host-rounds", type=int, default=200,
                    help="timed rounds per host-cost benchmark (they are cheap)")


def _split(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        config = metafunc.config
        presets = _split(config.getoption("--sam-presets"))
        dtypes = _split(config.getoption("--sam-dtypes"))
        for name in presets:
            if name not in PRESETS:
                raise pytest.UsageError(f"--sam-presets: unknown {name!r} ({', '.join(PRESETS)})")
        for name in dtypes:
            if name not in DTYPES:
                raise pytest.UsageError(f"--sam-dtypes: unknown {name!r} ({', '.join(DTYPES)})")
        cases = [(p, d) for p in presets for d in dtypes]
        metafunc.parametrize("case", cases, ids=[f"{p}-{d}" for p, d in cases], scope="module")
    if "host_preset" in metafunc.fixturenames:
        names = _split(metafunc.config.getoption("--sam-host-presets"))
        for name in names:
            if name not in PRESETS:
                raise pytest.UsageError(
                    f"--sam-host-presets: unknown {name!r} ({', '.join(PRESETS)})")
        metafunc.parametrize("host_preset", names, scope="module")


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    text = pytestconfig.getoption("--sam-device")
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--sam-device cuda: CUDA is not available")
    return device


@pytest.fixture(scope="session")
def host_rounds(pytestconfig: pytest.Config) -> int:
    return max(1, pytestconfig.getoption("--sam-host-rounds"))


@pytest.fixture(scope="session")
def rounds(pytestconfig: pytest.Config) -> int:
    return max(1, pytestconfig.getoption("--sam-rounds"))
