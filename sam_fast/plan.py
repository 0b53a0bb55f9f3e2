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
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor

from . import dispatch, ops
from .distributed import is_dtensor, local

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


@dataclass(eq=False)
class Plan:
    key: tuple
    buckets: list[Bucket]
    norm_parts: list[NormPart]
    home: torch.device
    dtensor: bool
    params: list[Tensor]


def group_layout(groups: Sequence[dict]) -> tuple:
    """The O(number of groups) part of the layout key."""
    return tuple((id(g), id(g["params"]), len(g["params"])) for g in groups)


def layout_key(groups: list[dict], state: Any, params: Sequence[Tensor],
               dtensor: bool = True) -> tuple:
    """What a plan over ``params`` (the flat parameter list of ``groups``) is valid for.

    ``dtensor=False`` (the plan has no DTensor) reads the addresses with one C-level
    map; DTensors stand for their local shards."""
    addresses = tuple(map(_address if dtensor else _data_ptr, params))
    return (id(groups), id(state), group_layout(groups), addresses)


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
        by_kind: dict[tuple, list[Tensor]] = defaultdict(list)
        for i, p in enumerate(group["params"]):
            ops.check_tensor(p, f"param group {gi} parameter {i}")
            t = local(p)
            by_kind[(t.device, t.dtype)].append(p)
        for (device, dtype), params in by_kind.items():
            tensors = [local(p) for p in params]
            backups = [_backup(state_of(p), t) for p, t in zip(params, tensors)]
            impls = {op: dispatch.lookup(op, backend, device) for op in ops_needed}
            buckets.append(Bucket(gi, params, tensors, backups, device, dtype,
                                  any(map(is_dtensor, params)), impls))
    parts: dict[tuple, NormPart] = {}
    for bi, b in enumerate(buckets):
        eta = adaptive(groups[b.group_index])
        part = parts.get((b.device, b.dtype, eta))
        if part is None:
            part = parts[(b.device, b.dtype, eta)] = NormPart(
                dispatch.lookup("grad_sumsq", backend, b.device), [], eta, [])
        part.buckets.append(bi)
        if eta is not None:
            part.weights.extend(b.tensors)
    home = buckets[0].device if buckets else torch.device("cpu")
    return Plan(key, buckets, list(parts.values()), home, any(b.dtensor for b in buckets),
                flat_params(groups))


def _backup(state: dict, t: Tensor) -> Tensor:
    buf = state.get("backup")
    if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or buf.device != t.device:
        buf = torch.empty_like(t, memory_format=torch.preserve_format)
        state["backup"] = buf
    return buf


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
    if len(partials) == 1:
        total = partials[0]
    else:
        acc = torch.float64 if any(p.dtype == torch.float64 for p in partials) else torch.float32
        total = torch.stack([p.to(plan.home, acc, non_blocking=True) for p in partials]).sum()
    if plan.dtensor:
        from .distributed import all_reduce_sumsq

        total = all_reduce_sumsq(total, like)
    return total
