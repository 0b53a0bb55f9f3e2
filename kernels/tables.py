"""Block maps and address rows for the multi-tensor kernels, and the cache that keeps them.

A launch covers every tensor of one (device, dtype) group and reads two kinds
of small int64 device tensors:

- the **block map**, ``blocks``, laid out as::

      blocks[0  : B ]  tensor index of block pid              (B = number of blocks)
      blocks[B  : 2B]  element offset of block pid's chunk     (a multiple of CHUNK)
      blocks[2B : 3B]  elements in block pid's chunk           (at most CHUNK)

  It depends on the tensors' sizes alone, so it is cached under the tuple of
  numels (and the device): parameters keep their sizes for the whole run, so
  it is built once.
- one **address row** per operand list: ``row[t]`` is the ``data_ptr`` of
  tensor ``t`` of that list. A row is cached under that list's addresses.
  Parameters, backups and optimizer state keep their storage from step to
  step and hit; gradients are usually re-allocated by every backward, so
  their row is new (a miss, one small upload) about once per step.

A kernel takes ``(blocks, B, row_0, ..., row_{L-1}, scalars...)``. Every
tensor is cut into chunks of ``CHUNK`` elements; a program handles one chunk,
``BLOCK`` elements per loop iteration. Chunk offsets are int64: a program
advances its operand's base pointer by the offset (a 64-bit scalar add) and
then indexes within the chunk with int32, so tensors of more than 2^31
elements need no int64 vector math.

Uploads never wait for the GPU: CUDA uploads go from pinned host memory with
``non_blocking=True``, which is also how they work inside CUDA graph capture
(the captured memcpy node reads the same pinned buffer at every replay).

Capture rules (see :class:`TableCache`): anything looked up or built while
the current stream is capturing is *captured*: it is never evicted or freed
(the graph holds its device address), and a pinned buffer a captured upload
reads is kept alive and never reused. Nothing is ever built from tensor
values, so a hit is always valid: the key is all the content.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from functools import reduce
from operator import attrgetter, or_
from typing import Any

import torch
from torch import Tensor

# Elements per program (its chunk) and per loop iteration inside it. BLOCK=1024
# with 4 warps gives each thread 8 consecutive elements: two 16-byte fp32
# accesses or one 16-byte bf16/fp16 access per operand. A 16K-element chunk
# keeps the grid at ~60 programs per million parameters, enough to fill a
# 132-SM H100 several times over for models above ~10M parameters while
# keeping the per-program table lookups negligible; small tensors finish after
# their first iteration (the loop bound is the chunk's size).
BLOCK = 1024
CHUNK = 16 * BLOCK
NUM_WARPS = 4

# Options of every launch. FMA contraction is Triton 3.9's default (3.10 turns
# it off) and is kept explicitly: PyTorch's own CUDA kernels are built with
# nvcc's default --fmad=true, so this stays closest to them. Where the spec
# needs an add kept apart from a product (the perturbation scale), the kernel
# says so itself (see perturb.scale_of).
LAUNCH = {"num_warps": NUM_WARPS, "enable_fp_fusion": True}

# Addresses 16-byte aligned let the kernels promise vector accesses to the compiler.
ALIGNMENT = 16

# The byte bound of the evictable entries of the process-wide cache: ~25000
# address rows of a 161-tensor model (1288 bytes each), or the block map of a
# ~20-billion parameter one (24 bytes per 16K-element chunk). Captured entries
# are outside the bound (they cannot be freed).
DEFAULT_CAPACITY_BYTES = 32 << 20

_data_ptr = Tensor.data_ptr
_numel = Tensor.numel
_stride = Tensor.stride
_is_contiguous = Tensor.is_contiguous
_dtype = attrgetter("dtype")


@dataclass(frozen=True, eq=False)
class BlockMap:
    """A device-resident block map over ``n_blocks`` chunks (layout: module docstring)."""

    tensor: Tensor
    n_blocks: int
    stand_in: Tensor
    """The map's bytes viewed as fp32: what a kernel gets for an absent device scalar."""


@dataclass(frozen=True, eq=False)
class Row:
    """A device-resident row of addresses, one per tensor of an operand list."""

    tensor: Tensor
    aligned: bool
    """Every address is a multiple of :data:`ALIGNMENT` bytes."""


@dataclass(frozen=True, eq=False)
class Table:
    """What one launch reads: the block map and one address row per operand."""

    blocks: Tensor
    n_blocks: int
    rows: tuple[Tensor, ...]
    aligned: bool
    """Every address of the elementwise operands is :data:`ALIGNMENT`-byte aligned."""
    stand_in: Tensor | None = None
    """An fp32 device buffer (the block map's bytes) passed for an absent grad scale or
    found_inf flag: the kernels read it and ignore the value (a runtime flag says so), so
    present and absent scalars compile one variant. None: made from ``blocks``."""


def block_map(numels: Sequence[int], chunk: int = CHUNK) -> tuple[list[int], list[int]]:
    """(tensor index, chunk start) of every block.

    A tensor of ``n`` elements gets ``ceil(n / chunk)`` blocks; empty tensors get none.
    """
    index: list[int] = []
    starts: list[int] = []
    for t, n in enumerate(numels):
        count = -(-n // chunk)
        index.extend([t] * count)
        starts.extend(range(0, count * chunk, chunk))
    return index, starts


def block_map_values(numels: Sequence[int], chunk: int = CHUNK) -> list[int]:
    """The content of a block map tensor: index, chunk starts, chunk sizes."""
    index, starts = block_map(numels, chunk)
    counts = [min(numels[t] - s, chunk) for t, s in zip(index, starts)]
    return index + starts + counts


def aligned(addresses: Sequence[int]) -> bool:
    """Every address a multiple of :data:`ALIGNMENT` (a power of two): their OR is."""
    return reduce(or_, addresses, 0) % ALIGNMENT == 0


def capturing(device: torch.device) -> bool:
    """Whether work issued now on ``device`` is being captured into a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


# -- uploads ---------------------------------------------------------------------------------


class CaptureStaging:
    """Pinned host memory for uploads issued during CUDA graph capture.

    A captured host-to-device copy reads its source at every replay, so that
    memory must stay allocated and unchanged as long as the graph can be
    replayed: slices handed out here are never handed out again, and the
    cache entry they were uploaded for keeps them referenced. Slabs are
    allocated outside capture when possible (:meth:`top_up`, on every eager
    upload): allocating pinned memory during capture makes PyTorch's host
    allocator query events, which global-mode capture forbids in some
    PyTorch versions. If a capture needs more than the slab holds, a new slab
    is allocated then; should that fail, the error says to warm up eagerly.
    """

    SLAB = 1 << 15  # int64 elements: 256 KiB, ~200 rows of a 161-tensor model

    def __init__(self) -> None:
        self._slab: Tensor | None = None
        self._used = 0

    def _alloc(self, n: int) -> Tensor:
        return torch.empty(n, dtype=torch.int64, pin_memory=True)

    def top_up(self) -> None:
        """Outside capture: make sure at least half a slab is free. The old slab is
        not freed while a captured entry holds a slice of it."""
        if self._slab is None or self._used > self.SLAB // 2:
            self._slab = self._alloc(self.SLAB)
            self._used = 0

    def take(self, n: int) -> Tensor:
        """``n`` int64 elements of pinned memory that will never be reused."""
        if self._slab is None or self._used + n > self._slab.numel():
            try:
                self._slab = self._alloc(max(self.SLAB, n))
            except RuntimeError as exc:
                raise RuntimeError(
                    "sam_fast (triton backend): a pointer table is needed during CUDA graph "
                    "capture and no pinned staging memory could be allocated while capturing; "
                    "run one step eagerly before capturing (tables and staging memory are "
                    "prepared then)") from exc
            self._used = 0
        out = self._slab[self._used:self._used + n]
        self._used += n + (n & 1)  # keep every slice 16-byte aligned
        return out


def upload(values: Sequence[int], device: torch.device, staging: CaptureStaging | None,
           captured: bool) -> tuple[Tensor, Tensor | None]:
    """An int64 tensor on ``device`` holding ``values``, and the host buffer that must
    be kept alive with it (the pinned source of a captured copy), if any.

    CUDA: from pinned memory with ``non_blocking=True``, never a wait for the GPU
    (a pageable source would synchronize the stream). Outside capture the
    pinned buffer can be dropped at once: PyTorch's host allocator records the
    copy's event and does not reuse the block before the copy has run.
    """
    # Through an array: a quarter of torch.tensor(list)'s host time for a row.
    host = (torch.frombuffer(array("q", values), dtype=torch.int64) if len(values)
            else torch.empty(0, dtype=torch.int64))  # (frombuffer refuses an empty buffer)
    if device.type != "cuda":
        return (host if device.type == "cpu" else host.to(device)), None
    assert staging is not None
    if captured:
        pinned = staging.take(len(values))
        pinned.copy_(host)
    else:
        staging.top_up()
        pinned = host.pin_memory()
    out = torch.empty(len(values), dtype=torch.int64, device=device)
    out.copy_(pinned, non_blocking=True)
    return out, (pinned if captured else None)


# -- plans: which positions the kernels serve ------------------------------------------------


def dense_strides(t: Tensor) -> tuple[int, ...] | None:
    """The strides of the dimensions longer than 1 when ``t``'s elements fill
    ``numel`` consecutive slots (contiguous, channels-last, any permutation of
    a contiguous layout); None when they do not (slices with gaps, expanded
    or overlapping views).

    Two dense tensors with the same such strides hold element ``k`` of their
    flat storage at the same index, which is all an elementwise kernel needs.
    """
    dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return None
        expected *= size
    return tuple(stride for size, stride in zip(t.shape, t.stride()) if size != 1)


@dataclass(frozen=True)
class Plan:
    """How one call's positions are served: the kernels take ``kernel``, the torch
    backend takes ``other`` (tensors the kernels cannot address as one dense run:
    see :func:`dense_strides`, or a dtype that differs from the group's).
    ``numels`` are the sizes of the kernel positions (the block map's key), computed
    once here with their block count, not on every call."""

    kernel: tuple[int, ...]
    other: tuple[int, ...]
    numels: tuple[int, ...]
    n_blocks: int
    """Blocks over the kernel positions (0: nothing to launch)."""


def layout_key(lists: Sequence[Sequence[Tensor]], numels: tuple[int, ...]) -> tuple:
    """Everything a :class:`Plan` depends on, addresses excluded: the sizes, and per
    list its layout (``True`` when all its tensors are contiguous, since then only
    the flat order matters, else every tensor's strides) and its dtype (one for the
    whole list, else each tensor's). A few C calls per tensor."""
    parts: list[Hashable] = [numels]
    for lst in lists:
        parts.append(True if all(map(_is_contiguous, lst)) else tuple(map(_stride, lst)))
        dtypes = frozenset(map(_dtype, lst))
        parts.append(dtypes if len(dtypes) == 1 else tuple(map(_dtype, lst)))
    return tuple(parts)


def make_plan(lists: Sequence[Sequence[Tensor]], n_elementwise: int, dtype: torch.dtype,
              numels: tuple[int, ...], chunk: int = CHUNK,
              list_dtypes: tuple[torch.dtype | None, ...] | None = None) -> Plan:
    """Split positions by whether the kernels can serve them.

    ``lists[:n_elementwise]`` are the elementwise operands (same shape at each
    position); any further lists are per-tensor scalars whose addresses ride in
    rows of their own (Adam's on-device step counters). Every elementwise operand
    must be ``dtype``, except a list whose entry in ``list_dtypes`` names another
    (BSAM's fp32 noise beside a bf16 group).
    """
    wanted = [dtype if list_dtypes is None or list_dtypes[j] is None else list_dtypes[j]
              for j in range(n_elementwise)]
    kernel: list[int] = []
    other: list[int] = []
    for i, lead in enumerate(lists[0]):
        tensors = [lst[i] for lst in lists[:n_elementwise]]
        if not all(t.dtype == want for t, want in zip(tensors, wanted)):
            ok = False
        elif all(t.is_contiguous() for t in tensors):
            ok = True  # the common case; same shapes, so the same layout
        else:
            layout = dense_strides(lead)
            ok = layout is not None and all(dense_strides(t) == layout for t in tensors)
        (kernel if ok else other).append(i)
    kernel_numels = tuple(numels[i] for i in kernel)
    return Plan(kernel=tuple(kernel), other=tuple(other), numels=kernel_numels,
                n_blocks=sum(-(-n // chunk) for n in kernel_numels))


# -- the cache -------------------------------------------------------------------------------


class _Entry:
    __slots__ = ("value", "nbytes", "keep")

    def __init__(self, value: Any, nbytes: int, keep: Tensor | None) -> None:
        self.value = value
        self.nbytes = nbytes
        self.keep = keep  # the pinned source of a captured upload, kept alive with it


class TableCache:
    """Block maps and address rows, bounded in bytes, with captured entries kept.

    - Block maps are keyed by (device, numels), rows by (device, addresses): a
      hit is always valid, since the key is the whole content.
    - Evictable entries are kept in LRU order and evicted once their device
      bytes exceed ``capacity_bytes``. Evicting during eager execution is safe:
      a kernel already launched with an evicted tensor runs before any later
      allocation on that stream can reuse its memory.
    - An entry looked up or built while the current stream is capturing a CUDA
      graph becomes *captured*: the graph's kernels hold its device address
      (and a captured upload's memcpy its pinned source), and no library can
      learn when a graph is destroyed, so it is never evicted and never freed
      by :meth:`clear` unless asked (``captured=True``: only once no graph that
      used the cache can be replayed). ``captured_bytes`` says what this holds:
      a few KiB per captured step (the gradients' rows).
    - Plans (which positions the kernels serve) are host objects without device
      memory, kept in a count-bounded LRU of their own.
    """

    def __init__(self, capacity_bytes: int = DEFAULT_CAPACITY_BYTES,
                 plan_capacity: int = 256) -> None:
        self.capacity_bytes = capacity_bytes
        self.plan_capacity = plan_capacity
        self._lru: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._captured: dict[Hashable, _Entry] = {}
        self._plans: OrderedDict[Hashable, Plan] = OrderedDict()
        self._staging: dict[torch.device, CaptureStaging] = {}
        self.nbytes = 0
        """Device bytes of the evictable entries (at most ``capacity_bytes`` after a call)."""
        self.captured_bytes = 0
        """Device bytes of the captured entries (never freed)."""
        self.hits = 0
        self.misses = 0

    # -- lookups

    def _get(self, key: Hashable, values: Any, device: torch.device, captured: bool,
             make: Any) -> Any:
        """The cached value under ``key``, built with ``make(tensor)`` from an upload
        of ``values()`` on a miss; marked captured when ``captured``."""
        entry = self._lru.get(key)
        if entry is None:
            entry = self._captured.get(key)
            if entry is not None:
                self.hits += 1
                return entry.value
            self.misses += 1
            staging = None
            if device.type == "cuda":
                staging = self._staging.setdefault(device, CaptureStaging())
            tensor, keep = upload(values(), device, staging, captured)
            entry = _Entry(make(tensor), tensor.numel() * tensor.element_size(), keep)
        else:
            self.hits += 1
            if not captured:
                self._lru.move_to_end(key)
                return entry.value
            del self._lru[key]
            self.nbytes -= entry.nbytes
        if captured:
            self._captured[key] = entry
            self.captured_bytes += entry.nbytes
        else:
            self._lru[key] = entry
            self.nbytes += entry.nbytes
            self._evict()
        return entry.value

    def _evict(self) -> None:
        # The newest entry stays even when it alone exceeds the bound: the
        # caller is about to launch with it.
        while self.nbytes > self.capacity_bytes and len(self._lru) > 1:
            _, old = self._lru.popitem(last=False)
            self.nbytes -= old.nbytes

    def block_map(self, numels: tuple[int, ...], device: torch.device, captured: bool,
                  chunk: int = CHUNK) -> BlockMap:
        """The block map over tensors of these sizes (at least one element in all)."""
        return self._get(("blocks", device, chunk, numels),
                         lambda: block_map_values(numels, chunk), device, captured,
                         lambda tensor: BlockMap(tensor, tensor.numel() // 3,
                                                 tensor.view(torch.float32)))

    def row(self, addresses: tuple[int, ...], device: torch.device, captured: bool) -> Row:
        """The address row holding ``addresses``."""
        return self._get(("row", device, addresses), lambda: addresses, device, captured,
                         lambda tensor: Row(tensor, aligned(addresses)))

    def plan(self, lists: Sequence[Sequence[Tensor]], n_elementwise: int, dtype: torch.dtype,
             device: torch.device,
             list_dtypes: tuple[torch.dtype | None, ...] | None = None) -> Plan:
        """The cached :class:`Plan` for these lists (keyed by sizes, layouts, dtypes)."""
        numels = tuple(map(_numel, lists[0]))
        key = (device, dtype, n_elementwise, len(lists), list_dtypes,
               layout_key(lists, numels))
        plan = self._plans.get(key)
        if plan is None:
            plan = make_plan(lists, n_elementwise, dtype, numels, list_dtypes=list_dtypes)
            self._plans[key] = plan
            if len(self._plans) > self.plan_capacity:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def table(self, lists: Sequence[Sequence[Tensor]], n_elementwise: int | None = None,
              list_dtypes: tuple[torch.dtype | None, ...] | None = None
              ) -> tuple[Plan, Table | None]:
        """The plan of one call over the parallel ``lists`` (operand j of tensor t is
        ``lists[j][t]``) and the table of its kernel positions (None: nothing to launch);
        ``list_dtypes`` as in :func:`make_plan`.

        Per call: the plan's key, one address tuple per list and one dict lookup
        per row and for the block map; a miss uploads only what is new.
        """
        lead = lists[0][0]
        device = lead.device
        n = len(lists) if n_elementwise is None else n_elementwise
        plan = self.plan(lists, n, lead.dtype, device, list_dtypes)
        if plan.n_blocks == 0:  # no kernel position, or nothing but empty tensors
            return plan, None
        captured = capturing(device)
        blocks = self.block_map(plan.numels, device, captured)
        if plan.other:
            rows = [self.row(tuple(_data_ptr(lst[i]) for i in plan.kernel), device, captured)
                    for lst in lists]
        else:
            rows = [self.row(tuple(map(_data_ptr, lst)), device, captured) for lst in lists]
        aligned = all(r.aligned for r in rows[:n])
        return plan, Table(blocks=blocks.tensor, n_blocks=blocks.n_blocks,
                           rows=tuple(r.tensor for r in rows), aligned=aligned,
                           stand_in=blocks.stand_in)

    # -- maintenance

    def clear(self, captured: bool = False) -> None:
        """Drop the evictable entries and the plans; with ``captured=True`` also the
        captured entries (only safe once no CUDA graph that used them can replay)."""
        self._lru.clear()
        self._plans.clear()
        self.nbytes = 0
        if captured:
            self._captured.clear()
            self._staging.clear()
            self.captured_bytes = 0

    def __len__(self) -> int:
        return len(self._lru) + len(self._captured)
