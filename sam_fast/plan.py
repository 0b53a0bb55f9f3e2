"""What a step needs that depends on the parameters alone, built once and reused.

The host's share of a fused step must stay far below the device's (docs/design.md
section 3, "The host's share"). Everything that depends only on the
parameters (their grouping by param group, device and dtype, the checks, the
backup buffers, the resolved op implementations, the base optimizer's state
tensors in launch order) lives in a :class:`Plan`. Per step the optimizer only
reads each ``p.grad``, checks what PyTorch does not guarantee (a gradient may be
missing or sparse), and launches one op per bucket.

A plan is valid for one *layout* (:func:`layout_key`): the param-group list and
its dicts, each group's parameter list, the base optimizer's state dict
object, and every parameter's storage address. Adding a group, changing a
group's parameters, ``load_state_dict`` and ``model.to(...)`` (which gives the
parameters new storage) all change the key, and the next step builds a new
plan. Gradient storage changes every step and is never part of the key.

The fast path: where every bucket runs on the compiled ops (``cpp``/``cuda``
backends, fp32/fp16/bf16, plain tensors), each bucket also gets a C++ handle
(:data:`fast`, csrc/fast_path.cpp) that keeps its static lists, reads the
gradients itself and calls the same registered ops from C++, so no list is
converted from Python per call. Such a plan checks only :func:`head_key`
(O(groups)) in Python; the per-parameter part of the layout (the same objects in
each group's list, their storage address, dtype, device and shape) is checked
by every handle call, which touches nothing and says so when it changed.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor

from . import dispatch, ops
from .distributed import is_dtensor, local

# The C++ handles of the fast path (csrc/fast_path.cpp), or None without sam_fast._C.
fast: Any = None
# SAM_FAST_FAST_PATH=0 keeps every plan on the Python path (for comparisons).
FAST_PATH = os.environ.get("SAM_FAST_FAST_PATH", "1") != "0"
# A fast handle's answers (besides OK = 0), and the Python side's "not in steady state".
OK = 0
LAYOUT_CHANGED = 1
INCOMPLETE = 2
NOT_READY = -1
_FAST_BACKENDS = frozenset({"cpp", "cuda"})
_FAST_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)

_grad = attrgetter("grad")
_layout = attrgetter("layout")
_data_ptr = Tensor.data_ptr


def _address(t: Tensor) -> int:
    return local(t).data_ptr()


@dataclass(eq=False)
class Bucket:
    """The parameters of one param group that share a device and a dtype: one launch per op."""

    group_index: int
    params: list[Tensor]
    """As the user holds them (DTensors under FSDP2)."""
    tensors: list[Tensor]
    """What the ops receive: the parameters, or their local shards."""
    backups: list[Tensor]
    device: torch.device
    dtype: torch.dtype
    dtensor: bool
    impls: dict[str, Callable]
    """op name -> implementation, resolved once."""
    cache: dict[Any, Any] = field(default_factory=dict)
    """Base-optimizer state lists in launch order, by what they were built for."""
    fast: Any = None
    """The C++ handle of the fast path, or None (this bucket takes the Python path)."""

    def grads(self) -> list[Tensor | None]:
        grads = list(map(_grad, self.params))
        if self.dtensor:
            return [None if g is None else local(g) for g in grads]
        return grads


def complete(grads: Sequence[Tensor | None]) -> bool:
    """Whether every gradient is there and dense (PyTorch guarantees shape, dtype and device).

    One pass over C-level attribute reads: a missing gradient has no ``layout``.
    """
    try:
        layouts = set(map(_layout, grads))
    except AttributeError:
        return False
    return layouts == {torch.strided}


def check_grads(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> None:
    """The clear error for a gradient no op handles (sparse, complex, ...)."""
    for g, p in zip(grads, params):
        if g is not None:
            ops.check_tensor(g, f"the gradient of a parameter of shape {tuple(p.shape)}")


@dataclass(eq=False)
class NormPart:
    """Gradients whose sum of squares one launch computes: same device, dtype and ASAM eta."""

    impl: Callable
    buckets: list[int]
    eta: float | None
    weights: list[Tensor]
    """The parameters (ASAM weights ``|w| + eta``); empty for plain SAM."""
    fast: tuple = ()
    """The buckets' C++ handles (fast plans)."""


@dataclass(eq=False)
class Plan:
    key: tuple
    buckets: list[Bucket]
    norm_parts: list[NormPart]
    home: torch.device
    dtensor: bool
    params: list[Tensor]
    fast: bool = False
    """Every bucket has a C++ handle: the plan checks :func:`head_key` (``key[:3]``) in
    Python only."""


def group_layout(groups: Sequence[dict]) -> tuple:
    """The O(number of groups) part of the layout key."""
    return tuple((id(g), id(g["params"]), len(g["params"])) for g in groups)


def head_key(groups: list[dict], state: Any) -> tuple:
    """The part of the layout key a fast plan checks in Python (the handles check the rest):
    ``layout_key(...)[:3]``."""
    return (id(groups), id(state), group_layout(groups))


def _fast_module() -> Any:
    global fast
    if fast is None:
        from . import _extension

        module = _extension.load()
        fast = getattr(module, "fast", None) if module is not None else None
    return fast


def _fast_eligible(backend: str, device: torch.device, dtype: torch.dtype,
                   params: Sequence[Tensor]) -> bool:
    """Whether a bucket's ops are the compiled ones on plain tensors (what a handle calls)."""
    return (FAST_PATH and dtype in _FAST_DTYPES and device.type in ("cpu", "cuda")
            and dispatch.resolve(backend, device) in _FAST_BACKENDS
            and all(type(p) in _PLAIN_TYPES for p in params) and _fast_module() is not None)


def layout_key(groups: list[dict], state: Any, params: Sequence[Tensor],
               dtensor: bool = True) -> tuple:
    """What a plan over ``params`` (the flat parameter list of ``groups``) is valid for.

    ``dtensor=False`` (the plan has no DTensor) reads the addresses with one C-level
    map; DTensors stand for their local shards."""
    addresses = tuple(map(_address if dtensor else _data_ptr, params))
    return (*head_key(groups, state), addresses)


def flat_params(groups: Sequence[dict]) -> list[Tensor]:
    return [p for g in groups for p in g["params"]]


def check_no_duplicates(groups: Sequence[dict]) -> None:
    """A tensor listed twice (``[w, w]``, tied weights listed from two modules) would be
    perturbed and restored twice; refuse it, naming the positions."""
    seen: dict[int, tuple[int, int]] = {}
    for gi, g in enumerate(groups):
        for pi, p in enumerate(g["params"]):
            where = seen.setdefault(id(p), (gi, pi))
            if where != (gi, pi):
                raise ValueError(
                    f"a parameter of shape {tuple(p.shape)} is listed twice (param group "
                    f"{where[0]} position {where[1]}, and param group {gi} position {pi}); "
                    "list each tensor once (tied weights: once for all the modules sharing it)"
                )


def check_no_overlap(groups: Sequence[dict]) -> None:
    """Parameters that share elements (overlapping views of one buffer) have no
    per-element SAM step: each would save and restore the other's perturbation.
    Disjoint views of one buffer (its halves, even and odd elements) are fine.

    Exact: only views whose byte extents intersect are checked element by element,
    with a counter over their storage (views into one flat buffer in consecutive
    chunks never get there)."""
    by_storage: dict[tuple, list[tuple[int, int, int, int, Tensor]]] = defaultdict(list)
    for gi, g in enumerate(groups):
        for pi, p in enumerate(g["params"]):
            t = local(p)
            if t.numel() == 0 or t.device.type == "meta":
                continue
            size = t.element_size()
            lo = t.storage_offset()
            hi = lo + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride())) + 1
            key = (t.device, t.untyped_storage().data_ptr())
            by_storage[key].append((lo * size, hi * size, gi, pi, t))
    for views in by_storage.values():
        if len(views) < 2:
            continue
        views.sort(key=lambda v: v[0])
        active: list[tuple[int, int, int, int, Tensor]] = []
        for lo2, hi2, g2, p2, t2 in views:
            active = [v for v in active if v[1] > lo2]  # extents that reach this view
            for lo1, hi1, g1, p1, t1 in active:
                if t1.dtype != t2.dtype or _share_elements(t1, t2):
                    _overlap_error(g1, p1, g2, p2)
            active.append((lo2, hi2, g2, p2, t2))


def _overlap_error(g1: int, p1: int, g2: int, p2: int) -> None:
    raise ValueError(
        f"the parameters at param group {g1} position {p1} and param group {g2} "
        f"position {p2} share memory (overlapping views of one buffer); each "
        "would save and restore the other's perturbation: pass disjoint tensors"
    )


def _share_elements(a: Tensor, b: Tensor) -> bool:
    """Whether two views of one storage (same dtype) have an element in common."""
    n = a.untyped_storage().nbytes() // a.element_size()
    counter = torch.zeros(n, dtype=torch.int8, device=a.device)
    counter.as_strided(a.shape, a.stride(), a.storage_offset()).fill_(1)
    hits = counter.as_strided(b.shape, b.stride(), b.storage_offset())
    return bool(hits.any())


def build(groups: list[dict], state_of: Callable[[Tensor], dict], backend: str,
          ops_needed: Sequence[str], key: tuple, adaptive: Callable[[dict], float | None]
          ) -> Plan:
    """A new plan over ``groups``: buckets per (group, device, dtype), norm parts per
    (device, dtype, eta), backups allocated in ``state_of(p)["backup"]``."""
    check_no_duplicates(groups)
    check_no_overlap(groups)
    buckets: list[Bucket] = []
    for gi, group in enumerate(groups):
        by_kind: dict[tuple, list[int]] = defaultdict(list)
        for i, p in enumerate(group["params"]):
            ops.check_tensor(p, f"param group {gi} parameter {i}")
            t = local(p)
            by_kind[(t.device, t.dtype)].append(i)
        for (device, dtype), positions in by_kind.items():
            params = [group["params"][i] for i in positions]
            tensors = [local(p) for p in params]
            backups = [_backup(state_of(p), t) for p, t in zip(params, tensors)]
            impls = {op: dispatch.lookup(op, backend, device) for op in ops_needed}
            dtensor = any(map(is_dtensor, params))
            handle = None
            if not dtensor and _fast_eligible(backend, device, dtype, params):
                handle = fast.bucket(group["params"], positions, backups)
            buckets.append(Bucket(gi, params, tensors, backups, device, dtype, dtensor, impls,
                                  fast=handle))
    parts: dict[tuple, NormPart] = {}
    for bi, b in enumerate(buckets):
        eta = adaptive(groups[b.group_index])
        part = parts.get((b.device, b.dtype, eta))
        if part is None:
            part = parts[(b.device, b.dtype, eta)] = NormPart(
                dispatch.lookup("grad_sumsq", backend, b.device), [], eta, [])
        part.buckets.append(bi)
        part.fast += (b.fast,)
        if eta is not None:
            part.weights.extend(b.tensors)
    home = buckets[0].device if buckets else torch.device("cpu")
    is_fast = bool(buckets) and all(b.fast is not None for b in buckets)
    return Plan(key, buckets, list(parts.values()), home, any(b.dtensor for b in buckets),
                flat_params(groups), fast=is_fast)


def _backup(state: dict, t: Tensor) -> Tensor:
    buf = state.get("backup")
    if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.device != t.device:
        buf = torch.empty_like(t, memory_format=torch.preserve_format)
        state["backup"] = buf
    return buf


def fast_total_sumsq(plan: Plan, slot: int = -1) -> Tensor | int:
    """:func:`total_sumsq` of a fast plan, the handles reading the gradients (or a
    gradient slot): the sum, or the first handle's answer (LAYOUT_CHANGED, INCOMPLETE)
    when it is not OK."""
    partials = []
    for part in plan.norm_parts:
        total = fast.sumsq(part.fast, part.eta, slot)
        if type(total) is int:
            return total
        partials.append(total)
    return _sum_partials(plan, partials)


def _sum_partials(plan: Plan, partials: list[Tensor]) -> Tensor:
    """The norm parts' sums of squares as one, on the plan's home device (fp64 if any is)."""
    if len(partials) == 1:
        return partials[0]
    acc = torch.float64 if any(p.dtype == torch.float64 for p in partials) else torch.float32
    return torch.stack([p.to(plan.home, acc, non_blocking=True) for p in partials]).sum()


def total_sumsq(plan: Plan, grads_by_bucket: Sequence[Sequence[Tensor]],
                like: Sequence[Tensor]) -> Tensor:
    """The global sum of squares over every bucket (one launch per norm part, a sum when
    there are several, an all-reduce over the shard groups for FSDP2)."""
    partials = []
    for part in plan.norm_parts:
        if len(part.buckets) == 1:
            grads = grads_by_bucket[part.buckets[0]]
        else:
            grads = [g for bi in part.buckets for g in grads_by_bucket[bi]]
        partials.append(part.impl(grads, part.weights, part.eta) if part.eta is not None
                        else part.impl(grads))
    total = _sum_partials(plan, partials)
    if plan.dtensor:
        from .distributed import all_reduce_sumsq

        total = all_reduce_sumsq(total, like)
    return total
