"""The microbenchmark of one (preset, dtype) cell: check every contender, then time them
side by side.

Per cell and per task (``grad_norm``, ``sam_step``, ``sampa_step``):

1. the truth: two steps of ``sam_fast``'s ``torch`` backend from a snapshot of
   the parameters (untimed);
2. per contender: (its compile, when it has one, outside any measurement),
   a fresh instance on the restored snapshot running two steps inside the
   peak-memory probe, and the max relative difference of its parameters to
   the truth;
3. the timing: every contender's instances, interleaved round by round
   (:func:`sam_fast.bench.timing.measure_interleaved`).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from . import traffic
from .contenders import (
    Contender,
    Hyper,
    NormRunner,
    SamFast,
    SampaRunner,
    SamRunner,
    Workspace,
    max_relative_difference,
)
from .presets import Preset, dtype_name, dtype_size
from .timing import (
    Budget,
    Stats,
    Task,
    Timer,
    last_level_cache_bytes,
    measure_interleaved,
    paired_ratio,
    peak_extra_memory,
    synchronize,
)

# Rotation: enough copies that 2x the last-level cache is touched between two uses of
# one copy, at most this many (only tiny presets need more than one).
MAX_COPIES = 16
# State one contender may hold, in parameter-sized tensors (SAMPa: backups, ys, buffers),
# plus the temporaries of the foreach step: the memory check before a cell.
_STATE_PASSES = 3
_FIXED_PASSES = 6  # params, g1, g2, snapshot, two truths
_TEMP_PASSES = 3


@dataclass
class Row:
    """One (contender, workload) of one cell."""

    contender: str
    workload: str
    median_s: float
    q1_s: float
    q3_s: float
    repeats: int
    bytes: int
    samples_s: list[float] = field(repr=False)
    speedup_vs_reference: float | None = None
    bandwidth_bytes_per_s: float | None = None
    bandwidth_fraction: float | None = None


@dataclass
class Check:
    """The untimed check of one contender on one task."""

    max_rel_diff: float | None = None
    peak_extra_bytes: int | None = None
    error: str | None = None


@dataclass
class CellResult:
    preset: str
    dtype: str
    device: str
    num_tensors: int
    num_elements: int
    param_bytes: int
    copies: int = 1
    contenders: list[str] = field(default_factory=list)  # in report order
    skipped: str | None = None
    rows: list[Row] = field(default_factory=list)
    checks: dict[str, dict[str, Check]] = field(default_factory=dict)  # contender -> task -> check
    notes: list[str] = field(default_factory=list)
    compile_seconds: float | None = None
    copy_bandwidth_bytes_per_s: float | None = None  # measured right before this cell

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def memory_needed(preset: Preset, dtype: torch.dtype, contenders: int) -> int:
    """A generous estimate of the bytes a cell needs at once (one task's contenders alive)."""
    passes = _FIXED_PASSES + _TEMP_PASSES + _STATE_PASSES * max(contenders, 1)
    return passes * preset.nbytes(dtype)


def memory_available(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not skip


def copies_for(preset: Preset, dtype: torch.dtype, device: torch.device) -> int:
    working_set = 5 * preset.nbytes(dtype)  # params, two grads, backups, buffers
    need = 2 * last_level_cache_bytes(device)
    return max(1, min(MAX_COPIES, math.ceil(need / max(working_set, 1)) + (working_set < need)))


def _reset(params: Sequence[Tensor], snapshot: Sequence[Tensor]) -> None:
    with torch.no_grad():
        torch._foreach_copy_(list(params), list(snapshot))


TASKS = tuple(traffic.TASK_PHASES)


def _make_runner(c: Contender, task: str, ws: Workspace, hp: Hyper):
    """A runner of ``task`` for contender ``c`` on ``ws``, or None when it has none."""
    if task == "sam_step":
        stepper = c.sam_stepper(ws.params, hp)
        return None if stepper is None else SamRunner(ws, stepper)
    if task == "sampa_step":
        impl = c.sampa_ops(ws, hp)
        return None if impl is None else SampaRunner(impl)
    fn = c.norm_fn(ws.params)
    return None if fn is None else NormRunner(ws, fn)


def _run_phases(runner, times: int = 1) -> None:
    for _ in range(times):
        for phase in runner.phases:
            runner.pre(phase)
            runner.run(phase)


def _state_after(runner, ws: Workspace) -> list[Tensor]:
    if isinstance(runner, NormRunner):
        return [runner.last.detach().clone()]
    return [p.detach().clone() for p in ws.params]


def run_cell(
    preset: Preset,
    dtype: torch.dtype,
    device: torch.device,
    contenders: Sequence[Contender],
    hp: Hyper,
    budget: Budget,
    timer: Timer,
    copy_bandwidth: float | None,
    tasks: Sequence[str] = TASKS,
    status: Callable[[str], None] = lambda s: None,
    seed: int = 0,
) -> CellResult:
    """Check and time every contender on one parameter set."""
    result = CellResult(preset.name, dtype_name(dtype), str(device), preset.num_tensors,
                        preset.num_elements, preset.nbytes(dtype))
    need, have = memory_needed(preset, dtype, len(contenders)), memory_available(device)
    if need > 0.9 * have:
        result.skipped = (f"needs about {need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB free on "
                          f"{device}")
        return result
    copies = copies_for(preset, dtype, device)
    result.copies = copies
    result.contenders = [c.name for c in contenders]
    result.copy_bandwidth_bytes_per_s = copy_bandwidth
    status("allocating")
    workspaces = [Workspace(preset, dtype, device, seed=seed + k) for k in range(copies)]
    ws0 = workspaces[0]
    snapshot = [p.detach().clone() for p in ws0.params]
    for c in contenders:
        c.reset()
    compiled_before = sum(getattr(c, "compile_seconds", 0.0) for c in contenders)
    truth_backend = SamFast("torch")

    for task in tasks:
        # 1. the truth
        _reset(ws0.params, snapshot)
        truth_runner = _make_runner(truth_backend, task, ws0, hp)
        with torch.no_grad():
            _run_phases(truth_runner, times=2)
        truth = _state_after(truth_runner, ws0)
        del truth_runner

        # 2. per contender: compile, check, instances on every copy
        timed: list[Task] = []
        for c in contenders:
            if task not in c.tasks:
                continue
            status(f"{task}: checking {c.name}")
            check = Check()
            try:
                if c.compiles:
                    _reset(ws0.params, snapshot)
                    with torch.no_grad():
                        _run_phases(_make_runner(c, task, ws0, hp))
                _reset(ws0.params, snapshot)
                gc.collect()
                with peak_extra_memory(device) as peak, torch.no_grad():
                    runner0 = _make_runner(c, task, ws0, hp)
                    if runner0 is not None:
                        _run_phases(runner0, times=2)
                        synchronize(device)
                if runner0 is None:
                    continue
                check.peak_extra_bytes = peak.bytes
                check.max_rel_diff = max_relative_difference(_state_after(runner0, ws0), truth)
                runners = [runner0] + [_make_runner(c, task, ws, hp) for ws in workspaces[1:]]
            except Exception as e:  # a contender that fails here is reported, not fatal
                check.error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                result.checks.setdefault(c.name, {})[task] = check
                result.notes.append(f"{c.name} failed on {task}: {check.error}")
                continue
            result.checks.setdefault(c.name, {})[task] = check
            timed.append(Task(c.name, runners, runners[0].phases))
        del truth

        # 3. the timing
        if timed:
            rounds = [0]

            def on_round() -> None:
                rounds[0] += 1
                status(f"{task}: timing round {rounds[0]}")

            # The checked steps warmed copy 0; other copies get a round of their own.
            run_budget = replace(budget, warmup=max(budget.warmup, 1 if copies > 1 else 0))
            measured = measure_interleaved(timed, timer, run_budget, on_round)
            for name, error in measured.failed.items():
                result.checks[name][task].error = error
                result.notes.append(f"{name} failed while timing {task}: {error}")
            _add_rows(result, task, measured, preset, dtype, copy_bandwidth)
        del timed
        for ws in workspaces:
            ws.detach()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if any(c.compiles for c in contenders):
        result.compile_seconds = sum(
            getattr(c, "compile_seconds", 0.0) for c in contenders) - compiled_before
    return result


def _add_rows(result: CellResult, task: str, measured, preset: Preset, dtype: torch.dtype,
              copy_bandwidth: float | None) -> None:
    itemsize = dtype_size(dtype)
    series: list[tuple[str, str, list[float]]] = []
    for name, samples in measured.total.items():
        phases = measured.phases[name]
        if len(phases) > 1:
            series.extend((name, phase, s) for phase, s in phases.items())
        series.append((name, task, samples))
    by_workload: dict[str, dict[str, list[float]]] = {}
    for name, workload, samples in series:
        if not samples:
            continue
        st = Stats(samples)
        nbytes = traffic.min_bytes(workload, preset.num_elements, itemsize)
        bw = nbytes / st.median if st.median > 0 else None
        row = Row(name, workload, st.median, st.q1, st.q3, len(samples), nbytes, list(samples),
                  bandwidth_bytes_per_s=bw,
                  bandwidth_fraction=(bw / copy_bandwidth) if bw and copy_bandwidth else None)
        result.rows.append(row)
        by_workload.setdefault(workload, {})[name] = list(samples)
    for row in result.rows:
        ref = by_workload.get(row.workload, {}).get("reference")
        if ref is not None and row.workload in by_workload:
            row.speedup_vs_reference = paired_ratio(ref, row.samples_s)

