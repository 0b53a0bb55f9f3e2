"""The host's share of a step (docs/design.md section 3, "The host's share"; issue 9).

For every contender and preset: the preset's tensor *topology* (as many
tensors as the model has) with tiny tensors (:data:`HOST_NUMEL` elements each),
so the arithmetic is about zero and what is timed is host work: Python, the
dispatcher, checks, list building, launches. Before every pass the gradients
are re-created as ``backward()`` leaves them (fresh tensors assigned to
``p.grad``, cloned outside the timed region), so nothing keyed on a
gradient's storage can hit a cache. One whole step is timed per contender,
interleaved round by round, medians. Each call's host time is taken twice: wall time
(``perf_counter``) and the thread's CPU time (``thread_time``); the ratios use the CPU
time, which a machine shared with other jobs disturbs far less.

Workloads:

- ``sam_sgd``: ``first_step`` + ``second_step`` of SAM around ``torch.optim.SGD``
  (momentum 0.9, weight decay), the other benchmarks' configuration;
- ``sam_adamw``: the same around ``torch.optim.AdamW`` (contenders that have it);
- ``sampa_sgd``: one ``SAMPa.step(closure)`` (two closure calls), against a
  per-parameter reference SAMPa loop written the way the reference writes SAM.

Next to them the *direct-op floor*: ``torch.ops.sam_fast.*`` called directly on
the same lists (read every ``p.grad``, ``grad_sumsq``, ``perturb_``,
``restore_sgd_`` / ``restore_adamw_``, and ``p.grad = None`` after each phase
as every contender does): what a step that passes its lists from Python to the
ops cannot go below. sam_fast's fast path (csrc/fast_path.cpp) keeps its static
lists in C++ and reads the gradients there, so it can go below this floor.

On a GPU the same runs once more on CUDA tensors of the preset's real shapes:
the host time (``perf_counter`` around the call, no synchronize inside it)
beside the device time (CUDA events around the same work queued behind a sleep
kernel, so that the events time the kernels and not the host's launch gaps).
A cell whose host time is at least its device time is *host-bound*: the GPU
waits for Python.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from .. import dispatch
from .contenders import Contender, Hyper
from .presets import Preset
from .timing import Budget, Stats, paired_ratio

HOST_NUMEL = 4
WORKLOADS = ("sam_sgd", "sam_adamw", "sampa_sgd")
WORKLOAD_TITLES = {
    "sam_sgd": "SAM + SGD (momentum 0.9, weight decay)",
    "sam_adamw": "SAM + AdamW",
    "sampa_sgd": "SAMPa + SGD (one step(closure))",
}
FLOOR = "direct-op floor"
# Host-cost rounds are cheap: many of them (per preset and shape kind, all workloads).
HOST_BUDGET = Budget(warmup=3, min_repeats=15, max_repeats=200, max_seconds=3.0)
QUICK_HOST_BUDGET = Budget(warmup=1, min_repeats=3, max_repeats=3, max_seconds=0.0)


# -- the tensors -------------------------------------------------------------------------------


class HostWorkspace:
    """The parameters of one preset's topology and two gradient pools to clone from."""

    def __init__(self, preset: Preset, device: torch.device, real_shapes: bool = False,
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        shapes = preset.shapes if real_shapes else [(HOST_NUMEL,)] * preset.num_tensors
        gen = torch.Generator(device=device).manual_seed(seed)

        def rand(shape: tuple[int, ...], std: float) -> Tensor:
            t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32)
            return t.mul_(std).to(dtype)

        self.device = device
        self.params = [torch.nn.Parameter(rand(s, 0.02)) for s in shapes]
        self.g1 = [rand(s, 1e-3) for s in shapes]
        self.g2 = [rand(s, 1e-3) for s in shapes]

    @staticmethod
    def fresh(pool: Sequence[Tensor]) -> list[Tensor]:
        """New gradient tensors at new addresses, as a backward pass makes them."""
        return [g.clone() for g in pool]

    def attach(self, grads: Sequence[Tensor]) -> None:
        for p, g in zip(self.params, grads):
            p.grad = g

    def detach(self) -> None:
        for p in self.params:
            p.grad = None


# -- runners: pre (untimed) and run (timed) per phase -----------------------------------------


class SamHostRunner:
    """``first_step`` and ``second_step``, each after fresh gradients were attached."""

    phases = ("first_step", "second_step")

    def __init__(self, ws: HostWorkspace, stepper: Any) -> None:
        self.ws, self.stepper = ws, stepper

    def pre(self, phase: str) -> None:
        self.ws.attach(self.ws.fresh(self.ws.g1 if phase == "first_step" else self.ws.g2))

    @torch.no_grad()
    def run(self, phase: str) -> None:
        if phase == "first_step":
            self.stepper.first_step()
        else:
            self.stepper.second_step()


class SampaHostRunner:
    """One ``step(closure)``; each closure call attaches a fresh gradient set made
    (untimed) before the step. Attaching is timed alike for every contender."""

    phases = ("step",)

    def __init__(self, ws: HostWorkspace, optimizer: Any) -> None:
        self.ws, self.opt = ws, optimizer
        self.queue: list[list[Tensor]] = []
        self.loss = torch.zeros((), device=ws.device)

    def closure(self) -> Tensor:
        self.ws.attach(self.queue.pop() if self.queue else self.ws.fresh(self.ws.g1))
        return self.loss

    def pre(self, phase: str) -> None:
        # popped last first: the closure at x~ (the kept one) gets g2, the one at y g1
        self.queue[:] = [self.ws.fresh(self.ws.g1), self.ws.fresh(self.ws.g2)]

    def run(self, phase: str) -> None:
        self.opt.step(self.closure)


# -- the reference SAMPa loop -------------------------------------------------------------------


class ReferenceSAMPa:
    """SAMPa-λ with SGD written the way ``davda54/sam`` writes SAM: a Python loop per
    parameter, state dictionaries, a clone of ``x`` and a new ``y`` every step, the
    closures run as the optimizer's API asks (``step(closure)``; call 0 only keeps g_y)."""

    def __init__(self, params: Sequence[Tensor], hp: Hyper) -> None:
        self.params, self.hp = list(params), hp
        self.state: dict[Tensor, dict[str, Tensor]] = {p: {} for p in self.params}
        self.pending: Callable[[], Any] | None = None

    def _take_grads(self) -> dict[Tensor, Tensor]:
        out = {}
        for p in self.params:
            if p.grad is not None:
                out[p] = p.grad
                p.grad = None
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], Any]) -> Any:
        hp = self.hp
        if self.pending is None:
            with torch.enable_grad():
                loss = closure()
            for p, g in self._take_grads().items():
                self.state[p]["grad_y"] = g
            self.pending = closure
            return loss
        norm = torch.norm(torch.stack([self.state[p]["grad_y"].norm(p=2) for p in self.params]),
                          p=2)
        scale = hp.sampa_rho / (norm + hp.eps)
        for p in self.params:
            st = self.state[p]
            g = st["grad_y"]
            st["old_p"] = p.data.clone()
            d = g.add(p, alpha=hp.weight_decay)
            buf = st.get("buf")
            st["y"] = p - hp.lr * d if buf is None else p - hp.lr * (hp.momentum * buf + d)
            p.add_(g * scale)
        with torch.enable_grad():
            self.pending()
        g_tilde = self._take_grads()
        for p in self.params:
            p.data.copy_(self.state[p].pop("y"))
        with torch.enable_grad():
            loss = closure()
        g_y = self._take_grads()
        for p in self.params:
            st = self.state[p]
            x = st.pop("old_p")
            d = (1 - hp.lam) * g_tilde[p] + hp.lam * g_y[p]
            d.add_(x, alpha=hp.weight_decay)
            if "buf" in st:
                st["buf"].mul_(hp.momentum).add_(d)
            else:
                st["buf"] = d.clone()
            p.data.copy_(x).add_(st["buf"], alpha=-hp.lr)
            st["grad_y"] = g_y[p]
        self.pending = closure
        return loss


# -- the direct-op floor ------------------------------------------------------------------------


def floor_backend(device: torch.device) -> str:
    return "cuda" if device.type == "cuda" else "cpp"


class _FloorSam:
    """``torch.ops.sam_fast`` on the parameters' lists: no checks, no grouping, no plan."""

    def __init__(self, params: Sequence[Tensor], hp: Hyper, adamw: bool) -> None:
        self.params, self.hp, self.adamw = list(params), hp, adamw
        self.ops = torch.ops.sam_fast
        self.backups = [torch.empty_like(p) for p in self.params]
        if adamw:
            self.exp_avgs = [torch.zeros_like(p) for p in self.params]
            self.exp_avg_sqs = [torch.zeros_like(p) for p in self.params]
            # host step counters, as torch.optim.AdamW keeps them (capturable=False)
            self.steps = [torch.zeros((), dtype=torch.float32) for _ in self.params]
        else:
            # zero buffers: SGD's first step (buf = d) exactly, with dampening 0
            self.bufs = [torch.zeros_like(p) for p in self.params]

    def _zero(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def first_step(self) -> None:
        hp = self.hp
        grads = [p.grad for p in self.params]
        sumsq = self.ops.grad_sumsq(grads, [], 0.0)
        self.ops.perturb_(self.params, grads, self.backups, sumsq, rho=hp.rho, eps=hp.eps,
                          normalize=True, eta=None, grad_scale=None)
        self._zero()

    @torch.no_grad()
    def second_step(self) -> None:
        hp = self.hp
        grads = [p.grad for p in self.params]
        if self.adamw:
            self.ops.restore_adamw_(
                self.params, self.backups, grads, self.exp_avgs, self.exp_avg_sqs, [],
                self.steps, lr=hp.adamw_lr, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=hp.adamw_weight_decay, amsgrad=False, maximize=False,
                decoupled_weight_decay=True, grad_scale=None, found_inf=None)
        else:
            self.ops.restore_sgd_(
                self.params, self.backups, grads, self.bufs, lr=hp.lr, momentum=hp.momentum,
                dampening=0.0, weight_decay=hp.weight_decay, nesterov=False, maximize=False,
                init_buffers=False, grad_scale=None, found_inf=None)
        self._zero()


class _FloorSampa:
    """SAMPa's step on ``torch.ops.sam_fast`` directly: grad_sumsq, sampa_points_, the
    closure at x~, restore_ (params <- y), the closure at y, sampa_update_."""

    def __init__(self, params: Sequence[Tensor], hp: Hyper) -> None:
        self.params, self.hp = list(params), hp
        self.ops = torch.ops.sam_fast
        self.backups = [torch.empty_like(p) for p in self.params]
        self.ys = [torch.empty_like(p) for p in self.params]
        self.bufs = [torch.zeros_like(p) for p in self.params]
        self.grads_y: list[Tensor] | None = None
        self.pending: Callable[[], Any] | None = None

    def _take(self) -> list[Tensor]:
        grads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        return grads

    @torch.no_grad()
    def step(self, closure: Callable[[], Any]) -> Any:
        hp = self.hp
        sgd = dict(lr=hp.lr, momentum=hp.momentum, dampening=0.0, weight_decay=hp.weight_decay,
                   nesterov=False, maximize=False, init_buffers=False)
        if self.grads_y is None:
            loss = closure()
            self.grads_y, self.pending = self._take(), closure
            return loss
        assert self.pending is not None
        sumsq = self.ops.grad_sumsq(self.grads_y, [], 0.0)
        self.ops.sampa_points_(self.params, self.grads_y, self.bufs, self.backups, self.ys,
                               sumsq, rho=hp.sampa_rho, eps=hp.eps, **sgd)
        self.pending()
        g_tilde = self._take()
        self.ops.restore_(self.params, self.ys)
        loss = closure()
        g_y = self._take()
        self.ops.sampa_update_(self.params, self.backups, g_tilde, g_y, self.bufs, lam=hp.lam,
                               **sgd)
        self.grads_y, self.pending = g_y, closure
        return loss


class DirectOpFloor(Contender):
    name = FLOOR
    description = ("torch.ops.sam_fast called directly on the parameters' lists (cpp on the "
                   "CPU, cuda on a GPU): read p.grad, the ops, p.grad = None")

    def unavailable(self, device, dtype):
        return dispatch.why_unavailable(floor_backend(device), device.type)

    def sam_stepper(self, params, hp):
        return _FloorSam(params, hp, adamw=False)

    def sam_adamw_stepper(self, params, hp):
        return _FloorSam(params, hp, adamw=True)

    def sampa_optimizer(self, params, hp):
        return _FloorSampa(params, hp)


def make_runner(c: Contender, workload: str, ws: HostWorkspace, hp: Hyper):
    """The runner of ``workload`` for ``c``, or None when ``c`` has no such step."""
    from .contenders import Reference

    if workload == "sam_sgd":
        stepper = c.sam_stepper(ws.params, hp)
        return None if stepper is None else SamHostRunner(ws, stepper)
    if workload == "sam_adamw":
        stepper = c.sam_adamw_stepper(ws.params, hp)
        return None if stepper is None else SamHostRunner(ws, stepper)
    if workload == "sampa_sgd":
        if isinstance(c, Reference):
            return SampaHostRunner(ws, ReferenceSAMPa(ws.params, hp))
        opt = c.sampa_optimizer(ws.params, hp)
        return None if opt is None else SampaHostRunner(ws, opt)
    raise ValueError(f"unknown host workload {workload!r}")


# -- timers -----------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_time(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """Seconds the host spends in ``fn``, the device idle before it and not waited for
    inside it: (wall time by ``perf_counter``, this thread's CPU time by ``thread_time``).

    The CPU time is what the call itself used of a core: on a machine shared with other
    jobs it does not count the time the thread waited to be scheduled, which the wall
    time does (and a short call escapes preemption more often than a long one, which
    skews wall-time ratios)."""
    _sync(device)
    start, cpu = time.perf_counter_ns(), time.thread_time_ns()
    fn()
    return (time.perf_counter_ns() - start) * 1e-9, (time.thread_time_ns() - cpu) * 1e-9


class DeviceTimer:
    """CUDA-event time of the work ``fn`` queues, queued behind a sleep kernel long enough
    for the host to finish queueing: the events see the kernels back to back, without
    the host's launch gaps. ``late`` counts calls whose queueing outlasted the sleep
    (their device time then includes host gaps: an upper bound)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        with torch.cuda.device(device):
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(1000)  # load the kernel
            torch.cuda.synchronize(device)
            cycles = 20_000_000
            self.start.record()
            torch.cuda._sleep(cycles)
            self.end.record()
            self.end.synchronize()
            self.cycles_per_s = cycles / max(self.start.elapsed_time(self.end) * 1e-3, 1e-9)
        self.late = 0
        self.calls = 0

    def time(self, fn: Callable[[], object], lead_s: float) -> float:
        with torch.cuda.device(self.device):
            torch.cuda.synchronize(self.device)
            torch.cuda._sleep(int(lead_s * self.cycles_per_s))
            self.start.record()
            t0 = time.perf_counter()
            fn()
            queued = time.perf_counter() - t0
            self.end.record()
            self.end.synchronize()
            self.calls += 1
            self.late += queued > lead_s
            return self.start.elapsed_time(self.end) * 1e-3


# -- the measurement --------------------------------------------------------------------------


@dataclass
class HostRow:
    """One contender's step. ``host_*``: wall time of the host (perf_counter);
    ``host_cpu_*``: the thread's CPU time, which the ratios use."""

    contender: str
    host_median_s: float | None = None
    host_q1_s: float | None = None
    host_q3_s: float | None = None
    repeats: int = 0
    host_samples_s: list[float] = field(default_factory=list, repr=False)
    host_cpu_median_s: float | None = None
    host_cpu_q1_s: float | None = None
    host_cpu_q3_s: float | None = None
    host_cpu_samples_s: list[float] = field(default_factory=list, repr=False)
    device_median_s: float | None = None
    device_samples_s: list[float] = field(default_factory=list, repr=False)
    host_bound: bool | None = None  # GPU only: host (wall) time >= device time
    vs_reference: float | None = None  # reference host CPU time / this one (paired by round)
    vs_floor: float | None = None  # this host CPU time / the direct-op floor's (paired)
    error: str | None = None


@dataclass
class HostCell:
    preset: str
    device: str
    num_tensors: int
    shapes: str  # "tiny" (HOST_NUMEL elements per tensor) or "real" (the preset's shapes)
    numel_per_tensor: int | None
    workloads: dict[str, list[HostRow]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Timed:
    name: str
    runner: Any
    host: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    device: list[float] = field(default_factory=list)
    failed: str | None = None


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


def _one_pass(t: _Timed, device: torch.device, dev_timer: DeviceTimer | None,
              timed: bool) -> None:
    total_host = total_cpu = 0.0
    phase_host: dict[str, float] = {}
    for phase in t.runner.phases:
        t.runner.pre(phase)
        wall, cpu = host_time(lambda: t.runner.run(phase), device)
        phase_host[phase] = wall
        total_host += wall
        total_cpu += cpu
    if dev_timer is not None:
        total_dev = 0.0
        for phase in t.runner.phases:
            t.runner.pre(phase)
            lead = 2 * phase_host[phase] + 5e-4
            total_dev += dev_timer.time(lambda: t.runner.run(phase), lead)
        if timed:
            t.device.append(total_dev)
    if timed:
        t.host.append(total_host)
        t.cpu.append(total_cpu)


def measure_host(
    preset: Preset,
    device: torch.device,
    contenders: Sequence[Contender],
    hp: Hyper,
    budget: Budget,
    real_shapes: bool = False,
    workloads: Sequence[str] = WORKLOADS,
    status: Callable[[str], None] = lambda s: None,
    seed: int = 0,
) -> HostCell:
    """Host time (and on CUDA device time) of one step per contender and workload."""
    cell = HostCell(preset.name, str(device), preset.num_tensors,
                    "real" if real_shapes else "tiny", None if real_shapes else HOST_NUMEL)
    ws = HostWorkspace(preset, device, real_shapes=real_shapes, seed=seed)
    dev_timer = DeviceTimer(device) if device.type == "cuda" else None
    for c in contenders:
        c.reset()
    for workload in workloads:
        rows: list[HostRow] = []
        timed: list[_Timed] = []
        for c in contenders:
            status(f"host {workload}: warming up {c.name}")
            try:
                runner = make_runner(c, workload, ws, hp)
                if runner is None:
                    continue
                for _ in range(2):  # compile, first touch, SAMPa's call 0
                    for phase in runner.phases:
                        runner.pre(phase)
                        runner.run(phase)
                _sync(device)
            except Exception as e:  # reported in the table, not fatal to the others
                ws.detach()
                rows.append(HostRow(c.name, error=_error(e)))
                cell.notes.append(f"{c.name} failed on {workload}: {_error(e)}")
                continue
            timed.append(_Timed(c.name, runner))
        if dev_timer is not None:
            dev_timer.late = dev_timer.calls = 0
        started = time.perf_counter()
        for r in range(budget.warmup + budget.max_repeats):
            is_timed = r >= budget.warmup
            if r == budget.warmup:
                started = time.perf_counter()
            for i in range(len(timed)):
                t = timed[(r + i) % len(timed)]
                if t.failed is not None:
                    continue
                try:
                    _one_pass(t, device, dev_timer, is_timed)
                except Exception as e:
                    t.failed = _error(e)
                    ws.detach()
            status(f"host {workload}: round {r + 1}")
            done = r + 1 - budget.warmup
            if done >= budget.min_repeats and time.perf_counter() - started > budget.max_seconds:
                break
        if dev_timer is not None and dev_timer.late:
            cell.notes.append(
                f"{workload}: {dev_timer.late} of {dev_timer.calls} device-timed phases queued "
                "work longer than the sleep in front of them: their device time includes host "
                "gaps (an upper bound)")
        by_name = {t.name: t for t in timed}
        ref = by_name.get("reference")
        floor = by_name.get(FLOOR)
        for t in timed:
            if t.failed is not None or not t.host:
                rows.append(HostRow(t.name, error=t.failed or "no samples"))
                cell.notes.append(f"{t.name} failed while timing {workload}: {t.failed}")
                continue
            st, sc = Stats(t.host), Stats(t.cpu)
            row = HostRow(t.name, st.median, st.q1, st.q3, len(t.host), list(t.host),
                          sc.median, sc.q1, sc.q3, list(t.cpu))
            if t.device:
                row.device_median_s = statistics.median(t.device)
                row.device_samples_s = list(t.device)
                row.host_bound = row.host_median_s >= row.device_median_s
            if ref is not None and ref.failed is None and ref.cpu:
                row.vs_reference = paired_ratio(ref.cpu, t.cpu)
            if floor is not None and floor.failed is None and floor.cpu:
                row.vs_floor = paired_ratio(t.cpu, floor.cpu)
            rows.append(row)
        order = [c.name for c in contenders]
        rows.sort(key=lambda row: order.index(row.contender))
        if rows:
            cell.workloads[workload] = rows
        del timed
        ws.detach()
        gc.collect()
    if device.type == "cuda":
        del ws
        gc.collect()
        torch.cuda.empty_cache()
    return cell
