"""Timers, the interleaved measurement loop, copy bandwidth and peak memory.

Why the loop looks the way it does (docs/design.md section 6):

- Contenders are timed *interleaved*: every round times each contender once,
  in an order that rotates from round to round, so load from other processes
  on a shared machine hits all of them alike and the ratios stay meaningful.
- Each phase starts on an idle device (a synchronize before it) and ends with
  one, so a contender's host-side launch overhead is counted in full. On a
  GPU the time is that of CUDA events around the phase; on the CPU that of
  ``time.perf_counter_ns``. The statistic is the median over rounds.
- When one copy of the working set would fit in the last-level cache, the
  workspace holds several copies and consecutive calls use different ones,
  so no contender finds its inputs already cached by the previous call.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch


class Timer(Protocol):
    def time(self, fn: Callable[[], object]) -> float:
        """Seconds one call of ``fn`` takes, on an idle device."""


class CpuTimer:
    def time(self, fn: Callable[[], object]) -> float:
        start = time.perf_counter_ns()
        fn()
        return (time.perf_counter_ns() - start) * 1e-9


class CudaTimer:
    """CUDA events on the current stream of ``device``, after a synchronize."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        with torch.cuda.device(device):
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)

    def time(self, fn: Callable[[], object]) -> float:
        with torch.cuda.device(self.device):
            # An idle stream when the start event is recorded: the elapsed time then
            # includes the host's launch overhead whenever the host is the bottleneck.
            torch.cuda.synchronize(self.device)
            self.start.record()
            fn()
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end) * 1e-3


def make_timer(device: torch.device) -> Timer:
    return CudaTimer(device) if device.type == "cuda" else CpuTimer()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- statistics ------------------------------------------------------------------------------


@dataclass
class Stats:
    """Summary of the samples of one (contender, workload), in seconds."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def q1(self) -> float:
        return _quantile(self.samples, 0.25)

    @property
    def q3(self) -> float:
        return _quantile(self.samples, 0.75)

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median: how noisy the cell was."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else math.nan


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def paired_ratio(numerator: list[float], denominator: list[float]) -> float | None:
    """The median over rounds of ``numerator[r] / denominator[r]``.

    Both were timed in the same interleaved round, so load that drifts over
    the run cancels in each ratio; with unequal lengths (no pairing), the ratio
    of the medians.
    """
    if not numerator or not denominator:
        return None
    if len(numerator) != len(denominator):
        return Stats(numerator).median / Stats(denominator).median
    ratios = [a / b for a, b in zip(numerator, denominator) if b > 0]
    return Stats(ratios).median if ratios else None


# -- the interleaved loop --------------------------------------------------------------------


class Runner(Protocol):
    """One contender bound to one copy of the workspace."""

    def pre(self, phase: str) -> None:
        """Untimed preparation of ``phase`` (attach the gradients it reads)."""

    def run(self, phase: str) -> None:
        """The timed work of ``phase``."""


@dataclass
class Task:
    name: str
    runners: list[Runner]  # one per workspace copy
    phases: tuple[str, ...]


@dataclass
class Budget:
    warmup: int = 2
    min_repeats: int = 5
    max_repeats: int = 50
    max_seconds: float = 5.0  # per measured cell, once min_repeats are done


@dataclass
class Measured:
    total: dict[str, list[float]] = field(default_factory=dict)  # task -> per-round totals
    phases: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # task -> the error that dropped it


def measure_interleaved(tasks: Sequence[Task], timer: Timer, budget: Budget,
                        on_round: Callable[[], None] | None = None) -> Measured:
    """Time every task's phases round by round; returns per-round samples.

    Round ``r`` times each task once, starting from task ``r mod len(tasks)``;
    call number ``k`` (over all tasks) uses workspace copy ``k mod copies``.
    A task whose phase raises is dropped (its samples too) and named in ``failed``;
    the others go on.
    """
    out = Measured()
    for t in tasks:
        out.total[t.name] = []
        out.phases[t.name] = {p: [] for p in t.phases}
    if not tasks:
        return out
    copies = len(tasks[0].runners)
    call = 0
    started = time.perf_counter()
    rounds = budget.warmup + budget.max_repeats
    for r in range(rounds):
        timed = r >= budget.warmup
        if timed and r == budget.warmup:
            started = time.perf_counter()
        for i in range(len(tasks)):
            task = tasks[(r + i) % len(tasks)]
            if task.name in out.failed:
                continue
            runner = task.runners[call % copies]
            call += 1
            total = 0.0
            try:
                for phase in task.phases:
                    runner.pre(phase)
                    dt = timer.time(functools.partial(runner.run, phase))
                    total += dt
                    if timed:
                        out.phases[task.name][phase].append(dt)
            except Exception as e:  # reported by the caller, not fatal to the others
                out.failed[task.name] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
                out.total[task.name] = []
                out.phases[task.name] = {p: [] for p in task.phases}
                continue
            if timed:
                out.total[task.name].append(total)
        if on_round is not None:
            on_round()
        done = r + 1 - budget.warmup
        if done >= budget.min_repeats and time.perf_counter() - started > budget.max_seconds:
            break
    return out


# -- the device's copy bandwidth ------------------------------------------------------------


def last_level_cache_bytes(device: torch.device) -> int:
    """L2 of a GPU, the largest CPU cache the kernel reports, or a 32 MiB guess."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    with contextlib.suppress(OSError):
        for entry in os.listdir(base):
            with contextlib.suppress(OSError, ValueError):
                with open(os.path.join(base, entry, "size")) as f:
                    text = f.read().strip().upper()
                mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
                best = max(best, int(text.rstrip("KMG")) * mult)
    return best or (32 << 20)


def copy_bandwidth(device: torch.device, timer: Timer, nbytes: int | None = None,
                   repeats: int = 10) -> float:
    """Bytes per second of ``dst.copy_(src)`` (read + write) on a buffer far beyond the cache.

    This is the ceiling the bandwidth fractions are quoted against: what the
    device's memory system gives PyTorch's own copy kernel in this process.
    """
    if nbytes is None:
        nbytes = max(8 * last_level_cache_bytes(device), 256 << 20)
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults are not bandwidth
    samples = [timer.time(lambda: dst.copy_(src)) for _ in range(repeats)]
    return 2 * n * 4 / statistics.median(samples)


# -- peak extra memory -----------------------------------------------------------------------


@dataclass
class PeakMemory:
    bytes: int | None = None


@contextlib.contextmanager
def peak_extra_memory(device: torch.device) -> Iterator[PeakMemory]:
    """The peak of memory allocated inside the block beyond what was allocated before it.

    CUDA: the caching allocator's own statistics. CPU: the allocation events of
    the PyTorch profiler (``profile_memory=True``), summed in time order, since
    the CPU allocator keeps no statistics of its own.
    """
    result = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield result
        torch.cuda.synchronize(device)
        result.bytes = int(torch.cuda.max_memory_allocated(device) - base)
        return
    from torch.profiler import ProfilerActivity, profile

    with _quiet_native_stderr():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            yield result
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        if e.device_type() == torch.autograd.DeviceType.CPU:
            current += e.nbytes()
            peak = max(peak, current)
    result.bytes = peak


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence what native code prints on fd 2 (the profiler logs its start and stop
    there), so the progress bar stays readable. Python exceptions are unaffected."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, fd)
    finally:
        os.close(saved)
