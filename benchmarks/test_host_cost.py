"""pytest-benchmark: the host's share of a step (docs/design.md section 3, issue 9).

The topology of a preset (default ResNet-50: 161 tensors) with 4-element tensors, so the
arithmetic is about zero and the time is host work; before every round the gradients
are re-created (fresh clones attached to ``p.grad``, untimed) as ``backward()`` leaves
them. One benchmark per (preset, workload, contender), grouped so that pytest-benchmark's
table puts the contenders of a workload side by side, the direct-op floor among them
(``torch.ops.sam_fast`` called directly on the lists).

Workloads: ``sam_sgd-first_step`` and ``sam_sgd-second_step`` (SAM + SGD momentum,
weight decay; each phase timed alone, the gradients it reads attached in the setup),
the same for ``sam_adamw``, and ``sampa_sgd-step`` (one ``SAMPa.step(closure)``; the two
closures attach prepared fresh gradients, timed alike for every contender).
``python -m sam_fast.bench --host-only`` measures the same interleaved, with ratios.
On a GPU the tensors are CUDA tensors and no synchronize is timed: the host's time.
On a machine shared with other jobs, ``--benchmark-timer time.thread_time`` times the
thread's CPU time instead of the wall time (what the CLI's ratios use).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pip install 'sam-fast[bench]'")

from sam_fast.bench import host  # noqa: E402
from sam_fast.bench.cli import CONTENDER_NAMES  # noqa: E402
from sam_fast.bench.contenders import (  # noqa: E402
    Hyper,
    build_contenders,
    interpreted_backend_note,
    sam_fast_backends,
)
from sam_fast.bench.presets import PRESETS  # noqa: E402

CONTENDERS = {c.name: c for c in build_contenders(CONTENDER_NAMES, sam_fast_backends())}
CONTENDERS[host.FLOOR] = host.DirectOpFloor()
PHASES = {"sam_sgd": ("first_step", "second_step"), "sam_adamw": ("first_step", "second_step"),
          "sampa_sgd": ("step",)}
CASES = [(w, ph) for w, phases in PHASES.items() for ph in phases]

_compiled_for: dict[str, str] = {}


@pytest.fixture(scope="module")
def host_workspace(host_preset: str, device: torch.device) -> host.HostWorkspace:
    return host.HostWorkspace(PRESETS[host_preset], device)


@pytest.mark.parametrize("workload, phase", CASES, ids=[f"{w}-{p}" for w, p in CASES])
@pytest.mark.parametrize("name", list(CONTENDERS))
def test_host_cost(benchmark: Any, host_preset: str, host_workspace: host.HostWorkspace,
                   device: torch.device, host_rounds: int, name: str, workload: str,
                   phase: str) -> None:
    contender = CONTENDERS[name]
    why = contender.unavailable(device, torch.float32)
    if why is None and hasattr(contender, "backend"):
        why = interpreted_backend_note(contender.backend, device)
    if why is not None:
        pytest.skip(f"{name}: {why}")
    if contender.compiles and PRESETS[host_preset].num_tensors > 1000:
        pytest.skip(f"{name}: torch.compile of {PRESETS[host_preset].num_tensors} tensors "
                    "takes minutes")
    if contender.compiles and _compiled_for.get(name) != host_preset:
        contender.reset()
        _compiled_for[name] = host_preset
    ws = host_workspace
    ws.detach()
    runner = host.make_runner(contender, workload, ws, Hyper())
    if runner is None:
        pytest.skip(f"{name} has no {workload} step")
    try:  # compile, first touch, SAMPa's call 0; a contender that cannot step is skipped
        for _ in range(2):
            for p in runner.phases:
                runner.pre(p)
                runner.run(p)
    except Exception as e:
        ws.detach()
        pytest.skip(f"{name} fails on {workload}: {type(e).__name__}: {e}".splitlines()[0])

    before = runner.phases[:runner.phases.index(phase)]
    after = runner.phases[runner.phases.index(phase) + 1:]
    pending = [False]  # the phases after the timed one, due before the next round

    def untimed(phases: tuple[str, ...]) -> None:
        for p in phases:
            runner.pre(p)
            runner.run(p)

    def setup() -> None:
        if pending[0]:
            untimed(after)
        untimed(before)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        runner.pre(phase)  # fresh gradients for the timed phase
        pending[0] = True

    benchmark.group = f"host-{host_preset}-{workload}-{phase}"
    benchmark.extra_info.update(contender=name, workload=workload, phase=phase,
                                num_tensors=PRESETS[host_preset].num_tensors,
                                numel_per_tensor=host.HOST_NUMEL, device=str(device))
    benchmark.pedantic(runner.run, args=(phase,), setup=setup, rounds=host_rounds,
                       warmup_rounds=3, iterations=1)
    untimed(after)
    ws.detach()
