"""A device-time model: what each contender's step should take on a GPU.

A prediction, clearly labelled as one, so that a user without a GPU sees what to expect
and a user with one sees the measured time beside it (a ratio far from 1 is a finding):

    predicted = bytes moved / copy bandwidth + kernel launches * cost per launch

Both counts come from running the contender's step once, in its steady state, on
``meta`` tensors of the preset's real shapes (no memory, no arithmetic), as it would
run on CUDA tensors (``torch.optim`` picks its foreach implementation there, so it does
here too):

- the PyTorch contenders (the reference loop, pytorch-optimizer, the foreach step,
  sam_fast's ``torch`` backend): every ATen op the step dispatches, through a
  ``TorchDispatchMode``. An op reads its tensor arguments and writes its outputs and the
  arguments its schema marks written (a destination that is only written, as ``copy_``'s,
  is not read). A ``_foreach_*`` op launches as many kernels as PyTorch's
  ``multi_tensor_apply`` (``ATen/native/cuda/MultiTensorApply.cuh``, its 32 KiB kernel
  arguments: at most 770/448/336/252/210 tensors for 1 to 5 lists and 2240 blocks of
  65536 elements per launch), ``_foreach_norm`` one more (its cleanup); any other op
  that does work one; views and allocations none;
- sam_fast's fused backends: every op of docs/design.md section 3 the step calls, with
  the bytes that op must move (:mod:`sam_fast.bench.traffic`'s passes over its lists)
  and the launches of its kernels: ``cuda`` as csrc/cuda/multi_tensor_apply.cuh splits
  them (32 KiB arguments: a 2048-block map, as many tensors as the rest holds), plus
  one for ``grad_sumsq``'s final sum; ``triton`` one launch per op over the whole list
  (its block map is cached), two for ``grad_sumsq``.

The defaults are an H200's: :data:`H200_COPY_BANDWIDTH` and :data:`DEFAULT_LAUNCH_S`.
On a GPU the benchmark also predicts with the copy bandwidth it measured before the
cell and the launch cost it measures (:func:`measure_launch_seconds`), and reports
measured over predicted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .. import dispatch
from .contenders import Contender, Hyper
from .micro import _make_runner, _run_phases
from .presets import Preset

H200_COPY_BANDWIDTH = 4.3e12
"""Bytes per second: the device-to-device copy rate of an H200 (read + write counted),
below its 4.8 TB/s HBM3e peak."""
DEFAULT_LAUNCH_S = 3e-6
"""Seconds per kernel launched back to back on the device: the order of the smallest
kernels' launch-to-completion on current NVIDIA GPUs (a few microseconds, the gap CUDA
Graphs exist to close). An assumption until a GPU measures it: on one, the benchmark
uses :func:`measure_launch_seconds` as well."""

CHUNK = 65536  # elements per block, PyTorch's multi_tensor_apply and ours
_TORCH_MAX_TENSORS = (770, 448, 336, 252, 210)  # per depth (lists), 32 KiB arguments
_TORCH_MAX_BLOCKS = 2240
_OURS_PARAM_BYTES, _OURS_RESERVED, _OURS_MAX_BLOCKS = 32764, 256, 2048
_OURS_MAP_BYTES = _OURS_MAX_BLOCKS * (2 + 4)  # uint16 tensor index + int32 chunk per block

# Ops that allocate or re-view and launch nothing (the rest launch at least one kernel).
_NO_WORK = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach",
    "alias", "lift_fresh", "_to_copy_meta", "set_", "resize_", "t", "view", "_unsafe_view",
    "expand", "squeeze", "unsqueeze", "reshape", "as_strided", "select", "slice", "unbind",
    "split", "permute", "transpose", "flatten", "_reshape_alias",
    "_record_function_enter", "_record_function_enter_new", "_record_function_exit",
})
# Ops whose first argument is written without being read.
_WRITE_ONLY_SELF = frozenset({"copy_", "zero_", "fill_", "_foreach_copy_", "_foreach_zero_"})

# sam_fast ops: passes over the op's parameter list (one read or write of one tensor per
# element; docs/design.md section 3) and its lists (the kernel's depth).
_FUSED = {
    # name: (passes, lists) given (momentum buffers present, weights present)
    "grad_sumsq": lambda bufs, weights: (1 + weights, 1 + weights),
    "perturb_": lambda bufs, weights: (4, 3),
    "restore_": lambda bufs, weights: (2, 2),
    "restore_sgd_": lambda bufs, weights: (3 + 2 * bufs, 3 + bufs),
    "sampa_points_": lambda bufs, weights: (5 + bufs, 4 + bufs),
    "sampa_update_": lambda bufs, weights: (4 + 2 * bufs, 4 + bufs),
}


def torch_foreach_launches(numels: Sequence[int], depth: int) -> int:
    """Kernels PyTorch's ``multi_tensor_apply`` launches over tensors of ``numels``."""
    max_tensors = _TORCH_MAX_TENSORS[min(depth, 5) - 1]
    return _mta_launches(numels, max_tensors, _TORCH_MAX_BLOCKS)


def ours_launches(numels: Sequence[int], depth: int) -> int:
    """Kernels csrc/cuda/multi_tensor_apply.cuh launches (32 KiB arguments)."""
    per_tensor = depth * 8 + 8
    fit = (_OURS_PARAM_BYTES - _OURS_RESERVED - _OURS_MAP_BYTES - 16) // per_tensor
    return _mta_launches(numels, min(fit, 65536), _OURS_MAX_BLOCKS)


def _mta_launches(numels: Sequence[int], max_tensors: int, max_blocks: int) -> int:
    launches = tensors = blocks = 0
    for n in numels:
        if n == 0:
            continue
        tensors += 1
        chunks = math.ceil(n / CHUNK)
        for c in range(chunks):
            blocks += 1
            last_chunk = c == chunks - 1
            if (tensors == max_tensors and last_chunk) or blocks == max_blocks:
                launches += 1
                blocks = 0
                tensors = 0 if last_chunk else 1
    return launches + (blocks > 0)


@dataclass
class Counts:
    """What one step dispatched: bytes moved and kernels launched."""

    bytes: int = 0
    launches: int = 0
    ops: int = 0

    def add(self, nbytes: int, launches: int) -> None:
        self.bytes += nbytes
        self.launches += launches
        self.ops += 1


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


class _AtenCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts = Counts()
        self.active = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.active:
            self._count(func, args, kwargs, out)
        return out

    def _count(self, func, args, kwargs, out) -> None:
        name = func.overloadpacket.__name__
        if name in _NO_WORK or getattr(func, "is_view", False):
            return
        schema = func._schema
        read = written = 0
        lists: list[list[Tensor]] = []
        for i, arg in enumerate(schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            tensors = [v for v in tree_flatten(value)[0] if isinstance(v, Tensor)]
            if not tensors:
                continue
            if isinstance(value, (list, tuple)):
                lists.append(tensors)
            size = sum(map(_nbytes, tensors))
            is_written = arg.alias_info is not None and arg.alias_info.is_write
            if is_written:
                written += size
            if not (is_written and i == 0 and name in _WRITE_ONLY_SELF):
                read += size
        inputs = {id(v) for v in tree_flatten((args, kwargs))[0] if isinstance(v, Tensor)}
        outputs = [v for v in tree_flatten(out)[0] if isinstance(v, Tensor)]
        new = [t for t in outputs if id(t) not in inputs]
        written += sum(map(_nbytes, new))
        if name.startswith("_foreach_") and lists:
            depth = len(lists) + (1 if new and isinstance(out, (list, tuple)) else 0)
            numels = [t.numel() for t in lists[0]]
            launches = torch_foreach_launches(numels, depth) + (name == "_foreach_norm")
        else:
            launches = 1
        self.counts.add(read + written, launches)


@dataclass
class FusedCall:
    op: str
    numels: list[int]
    bufs: bool
    weights: bool


@contextmanager
def _recording_fused_ops(calls: list[FusedCall]) -> Iterator[None]:
    """The torch backend's ops, recorded as the fused ops they stand for."""
    table = dispatch._BACKENDS["torch"].ops
    saved = dict(table)

    def wrap(name: str, fn: Callable) -> Callable:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            lists = [a for a in args if isinstance(a, (list, tuple))]
            numels = [t.numel() for t in lists[0]] if lists else []
            if name == "grad_sumsq":
                weights = bool(len(lists) > 1 and lists[1])
                bufs = False
            else:
                bufs_arg = kwargs.get("momentum_buffers")
                if bufs_arg is None:
                    index = {"restore_sgd_": 3, "sampa_points_": 2, "sampa_update_": 4}.get(name)
                    bufs_arg = args[index] if index is not None and index < len(args) else None
                momentum = kwargs.get("momentum", 0.0)
                bufs = bool(bufs_arg) and momentum != 0
                weights = False
            if name in _FUSED:
                calls.append(FusedCall(name, numels, bufs, weights))
            return fn(*args, **kwargs)

        return recorded

    try:
        for name, fn in saved.items():
            table[name] = wrap(name, fn)
        yield
    finally:
        table.clear()
        table.update(saved)


@contextmanager
def _cuda_defaults() -> Iterator[None]:
    """torch.optim as on CUDA tensors: its foreach implementation."""
    from torch.optim import optimizer as optim_module

    saved = optim_module._default_to_fused_or_foreach

    def foreach_default(params, differentiable, use_fused=False):
        return False, not differentiable

    optim_module._default_to_fused_or_foreach = foreach_default
    for mod in _optim_modules():
        mod._default_to_fused_or_foreach = foreach_default
    try:
        yield
    finally:
        optim_module._default_to_fused_or_foreach = saved
        for mod in _optim_modules():
            mod._default_to_fused_or_foreach = saved


def _optim_modules() -> list[Any]:
    import sys

    return [m for name, m in list(sys.modules.items())
            if name.startswith("torch.optim.") and hasattr(m, "_default_to_fused_or_foreach")]


class MetaWorkspace:
    """The preset's parameters and two gradient sets as meta tensors (shapes only)."""

    def __init__(self, preset: Preset, dtype: torch.dtype) -> None:
        meta = torch.device("meta")
        self.params = [torch.nn.Parameter(torch.empty(s, dtype=dtype, device=meta))
                       for s in preset.shapes]
        self.g1 = [torch.empty(s, dtype=dtype, device=meta) for s in preset.shapes]
        self.g2 = [torch.empty(s, dtype=dtype, device=meta) for s in preset.shapes]

    def attach(self, grads: Sequence[Tensor]) -> None:
        for p, g in zip(self.params, grads):
            p.grad = g


def count_pytorch(c: Contender, task: str, preset: Preset, dtype: torch.dtype, hp: Hyper
                  ) -> Counts | None:
    """The ATen-level counts of one steady-state step of a PyTorch contender, or None
    when it has no such task."""
    ws = MetaWorkspace(preset, dtype)
    counter = _AtenCounter()
    with _cuda_defaults(), torch.no_grad():
        runner = _make_runner(c, task, ws, hp)  # type: ignore[arg-type]
        if runner is None:
            return None
        counter.active = False
        with counter:
            _run_phases(runner)  # state created (momentum buffers): not the steady state
            counter.active = True
            _run_phases(runner)
    return counter.counts


def count_fused(task: str, preset: Preset, dtype: torch.dtype, hp: Hyper
                ) -> dict[str, Counts] | None:
    """The counts of sam_fast's fused backends ("cuda", "triton") for one steady-state
    step, from the ops sam_fast's own step calls."""
    from .contenders import SamFast

    ws = MetaWorkspace(preset, dtype)
    calls: list[FusedCall] = []
    with _recording_fused_ops(calls), torch.no_grad():
        runner = _make_runner(SamFast("torch"), task, ws, hp)  # type: ignore[arg-type]
        if runner is None:
            return None
        _run_phases(runner)
        calls.clear()
        _run_phases(runner)
    itemsize = torch.empty((), dtype=dtype).element_size()
    cuda, triton = Counts(), Counts()
    for call in calls:
        passes, depth = _FUSED[call.op](call.bufs, call.weights)
        nbytes = passes * sum(call.numels) * itemsize
        extra = call.op == "grad_sumsq"
        cuda.add(nbytes, ours_launches(call.numels, depth) + extra)
        triton.add(nbytes, 1 + extra)
    return {"cuda": cuda, "triton": triton}


@dataclass
class ModelRow:
    contender: str
    task: str
    bytes: int
    launches: int
    predicted_s: float
    """With the H200 defaults."""
    predicted_here_s: float | None = None
    """With this GPU's measured copy bandwidth and launch cost (GPU runs only)."""
    measured_s: float | None = None
    measured_over_predicted: float | None = None


@dataclass
class ModelCell:
    preset: str
    dtype: str
    bandwidth_bytes_per_s: float = H200_COPY_BANDWIDTH
    launch_s: float = DEFAULT_LAUNCH_S
    here_bandwidth_bytes_per_s: float | None = None
    here_launch_s: float | None = None
    rows: list[ModelRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def predict(nbytes: int, launches: int, bandwidth: float, launch_s: float) -> float:
    return nbytes / bandwidth + launches * launch_s


def model_cell(preset: Preset, dtype: torch.dtype, dtype_label: str,
               contenders: Sequence[Contender], tasks: Sequence[str], hp: Hyper,
               measured: dict[tuple[str, str], float] | None = None,
               here_bandwidth: float | None = None, here_launch_s: float | None = None
               ) -> ModelCell:
    """The model of one (preset, dtype) for ``contenders`` (sam_fast's compiled backends are
    modelled as the ``cuda`` and ``triton`` kernels; torch.compile is not modelled: its
    kernels are whatever inductor generates). ``measured``: (contender, task) -> median
    seconds measured on a GPU, for the ratio."""
    cell = ModelCell(preset.name, dtype_label, here_bandwidth_bytes_per_s=here_bandwidth,
                     here_launch_s=here_launch_s)
    names = [c.name for c in contenders]
    fused_wanted = [n for n in ("sam_fast[cuda]", "sam_fast[triton]")
                    if n in names or "sam_fast[cpp]" in names]
    for task in tasks:
        found: list[tuple[str, Counts]] = []
        for c in contenders:
            if c.compiles or c.name.startswith("sam_fast[") and c.name != "sam_fast[torch]":
                continue
            if task not in c.tasks:
                continue
            try:
                counts = count_pytorch(c, task, preset, dtype, hp)
            except Exception as e:  # a contender that needs real data (a host read)
                cell.notes.append(f"{c.name} {task} not modelled: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:160]}")
                continue
            if counts is not None:
                found.append((c.name, counts))
        if fused_wanted:
            fused = count_fused(task, preset, dtype, hp)
            if fused is not None:
                for name in fused_wanted:
                    found.append((name, fused[name[len("sam_fast["):-1]]))
        for name, counts in found:
            row = ModelRow(name, task, counts.bytes, counts.launches,
                           predict(counts.bytes, counts.launches, cell.bandwidth_bytes_per_s,
                                   cell.launch_s))
            if here_bandwidth and here_launch_s:
                row.predicted_here_s = predict(counts.bytes, counts.launches, here_bandwidth,
                                               here_launch_s)
            if measured and (name, task) in measured:
                row.measured_s = measured[(name, task)]
                basis = row.predicted_here_s or row.predicted_s
                row.measured_over_predicted = row.measured_s / basis
            cell.rows.append(row)
    if any(c.compiles for c in contenders):
        cell.notes.append("torch.compile is not modelled (its kernels are inductor's)")
    return cell


def measure_launch_seconds(device: torch.device, launches: int = 2000) -> float:
    """Seconds per tiny kernel launched back to back on ``device`` (CUDA events), queued
    behind a sleep so that the host's launch rate does not set the pace."""
    x = torch.zeros(1, device=device)
    for _ in range(50):
        x.add_(1)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(50_000_000)  # tens of ms of device time to queue the launches behind
    start.record()
    for _ in range(launches):
        x.add_(1)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e-3 / launches
