"""pytest-benchmark: the contenders of ``sam-fast-bench``, op by op, at small sizes.

One benchmark per (case, workload, contender), grouped by case and workload so
that pytest-benchmark's table puts the contenders of one workload side by
side, and ``--benchmark-compare`` tracks each of them across commits.

The workloads are the CLI's (docs/design.md section 3): ``grad_norm``,
``first_step`` (norm + perturbation), ``second_step`` (restore + SGD step),
``sam_step`` (both; it includes attaching the gradients between the two,
a few microseconds per hundred tensors), ``sampa_points``, ``sampa_update``.
Every phase is timed alone: the phases before it run untimed in the setup.
On a GPU each round ends with a synchronize, so the time is the device's.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pip install 'sam-fast[bench]'")

from sam_fast.bench import micro, traffic  # noqa: E402
from sam_fast.bench.cli import CONTENDER_NAMES  # noqa: E402
from sam_fast.bench.contenders import (  # noqa: E402
    Hyper,
    Workspace,
    build_contenders,
    interpreted_backend_note,
    sam_fast_backends,
)
from sam_fast.bench.presets import DTYPES, PRESETS, dtype_size  # noqa: E402

CONTENDERS = {c.name: c for c in build_contenders(CONTENDER_NAMES, sam_fast_backends())}
WORKLOADS = ("grad_norm", "first_step", "second_step", "sam_step", "sampa_points",
             "sampa_update")
TASK_OF = {phase: task for task, phases in traffic.TASK_PHASES.items() for phase in phases}
TASK_OF.update({task: task for task in traffic.TASK_PHASES})

_current_case: dict[str, Any] = {}


@pytest.fixture(scope="module")
def workspace(case: tuple[str, str], device: torch.device) -> Workspace:
    preset, dtype = case
    return Workspace(PRESETS[preset], DTYPES[dtype], device, seed=0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Cycle:
    """Keeps a runner's phases in their order: ``prepare(phase)`` runs, untimed, every
    phase due before ``phase`` (a second_step needs its first_step)."""

    def __init__(self, runner: Any, device: torch.device) -> None:
        self.runner, self.device = runner, device
        self.phases = runner.phases
        self.due = 0

    def _step(self, phase: str) -> None:
        self.runner.pre(phase)
        self.runner.run(phase)
        self.due = (self.phases.index(phase) + 1) % len(self.phases)

    def prepare(self, workload: str) -> None:
        first = self.phases[0] if workload not in self.phases else workload
        while self.phases[self.due] != first:
            self._step(self.phases[self.due])
        if workload in self.phases:
            self.runner.pre(workload)
        _sync(self.device)

    def timed(self, workload: str) -> None:
        if workload in self.phases:
            self.runner.run(workload)
            self.due = (self.phases.index(workload) + 1) % len(self.phases)
        else:  # a whole task: every phase, gradients attached in between
            for phase in self.phases:
                self._step(phase)
        _sync(self.device)


@pytest.mark.parametrize("workload", WORKLOADS)
@pytest.mark.parametrize("name", list(CONTENDERS))
def test_sam_ops(benchmark: Any, case: tuple[str, str], workspace: Workspace,
                 device: torch.device, rounds: int, name: str, workload: str) -> None:
    contender = CONTENDERS[name]
    preset, dtype_name = case
    dtype = DTYPES[dtype_name]
    why = contender.unavailable(device, dtype)
    if why is None and hasattr(contender, "backend"):
        why = interpreted_backend_note(contender.backend, device)
    if why is not None:
        pytest.skip(f"{name}: {why}")
    task = TASK_OF[workload]
    if task not in contender.tasks:
        pytest.skip(f"{name} has no {task}")
    if _current_case.get(name) != case:  # compiled graphs: a clean cache per case
        contender.reset()
        _current_case[name] = case

    runner = micro._make_runner(contender, task, workspace, Hyper())
    if runner is None:
        pytest.skip(f"{name} has no {task} here")
    cycle = _Cycle(runner, device)
    cycle.prepare(workload)
    cycle.timed(workload)  # compile / first-touch outside the rounds

    benchmark.group = f"{preset}-{dtype_name}-{workload}"
    nbytes = traffic.min_bytes(workload, PRESETS[preset].num_elements, dtype_size(dtype))
    benchmark.extra_info.update(contender=name, workload=workload, min_bytes=nbytes,
                                device=str(device))
    benchmark.pedantic(cycle.timed, args=(workload,), setup=lambda: cycle.prepare(workload),
                       rounds=rounds, warmup_rounds=1, iterations=1)
