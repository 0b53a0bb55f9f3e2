"""Pointer tables and block maps for the multi-tensor kernels, built once per tensor list and cached.

A launch covers every tensor of one (device, dtype) group. Program ``pid``
finds its work in one int64 device tensor, ``meta``, laid out as::

    meta[0        : B      ]  tensor index of block pid          (B = number of blocks)
    meta[B        : 2B     ]  element offset of block pid's chunk in that tensor
    meta[2B       : 2B+T   ]  numel of tensor t                   (T = number of tensors)
    meta[2B+T+j*T : +T     ]  address (data_ptr) of operand j of tensor t, j = 0..L-1

so one host-to-device copy uploads a table, and a kernel needs only three
arguments for it (``meta``, ``B``, ``T``). Every tensor is cut into chunks of
``CHUNK`` elements; a program handles one chunk, ``BLOCK`` elements per loop
iteration. Chunk offsets are int64: a program advances its tensor's base
pointer by the offset (a 64-bit scalar add) and then indexes within the chunk
with int32, so tensors of more than 2^31 elements need no int64 vector math.

Tables depend only on the addresses, sizes, strides and dtypes of the tensors
(:func:`fingerprint`), never on values, so they are cached under that
fingerprint (:class:`TableCache`). A new address (gradients re-allocated by
``zero_grad(set_to_none=True)``, ``load_state_dict``, ``.to()``) is a
different fingerprint, hence a new table: a cached table is never used for
tensors it was not built from.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from operator import attrgetter

import torch
from torch import Tensor

# Elements per program (its chunk) and per loop iteration inside it. BLOCK=1024
# with 4 warps gives each thread 8 consecutive elements: two 16-byte fp32
# accesses or one 16-byte bf16/fp16 access per operand. A 16K-element chunk
# keeps the grid at ~60 programs per million parameters, enough to fill a
# 132-SM H100 several times over for models above ~10M parameters while
# keeping the per-program table lookups negligible; small tensors finish after
# their first iteration (the loop bound is the tensor's remaining size).
BLOCK = 1024
CHUNK = 16 * BLOCK
NUM_WARPS = 4

# Options of every launch. FMA contraction is Triton 3.9's default (3.10 turns
# it off) and is kept explicitly: PyTorch's own CUDA kernels are built with
# nvcc's default --fmad=true, so this stays closest to them.
LAUNCH = {"num_warps": NUM_WARPS, "enable_fp_fusion": True}

# Addresses 16-byte aligned let the kernels promise vector accesses to the compiler.
ALIGNMENT = 16

_data_ptr = Tensor.data_ptr
_numel = Tensor.numel
_stride = Tensor.stride
_is_contiguous = Tensor.is_contiguous
_dtype = attrgetter("dtype")


@dataclass(frozen=True)
class Table:
    """A device-resident block map and pointer table over ``n_tensors`` tensors."""

    meta: Tensor
    n_blocks: int
    n_tensors: int
    aligned: bool
    """Every address is a multiple of :data:`ALIGNMENT` bytes."""


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


def build_table(lists: Sequence[Sequence[Tensor]], device: torch.device, chunk: int = CHUNK
                ) -> Table | None:
    """The table over the parallel ``lists`` (operand j of tensor t is ``lists[j][t]``).

    ``lists[0]`` gives the sizes; the other lists must match it element for
    element. None when there is no element to process.
    """
    numels = [t.numel() for t in lists[0]]
    index, starts = block_map(numels, chunk)
    n_blocks = len(index)
    if n_blocks == 0:
        return None
    addresses = [t.data_ptr() for lst in lists for t in lst]
    meta = torch.tensor(index + starts + numels + addresses, dtype=torch.int64)
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "sam_fast (triton backend): these tensors have no pointer table yet and one "
                "cannot be uploaded during CUDA graph capture; run one step eagerly before "
                "capturing (tables are cached from then on)"
            )
        # From pinned memory without blocking: a rebuild costs host time only,
        # never a wait for the GPU (a pageable copy would synchronize the stream).
        meta = meta.pin_memory().to(device, non_blocking=True)
    elif meta.device != device:
        meta = meta.to(device)
    aligned = all(a % ALIGNMENT == 0 for a in addresses)
    return Table(meta=meta, n_blocks=n_blocks, n_tensors=len(numels), aligned=aligned)


def fingerprint(lists: Sequence[Sequence[Tensor]]) -> tuple:
    """Everything a plan (its table and its layout checks) depends on.

    Per operand list: every tensor's address; its layout (``True`` when all
    are contiguous, since then only the flat order matters, else every
    tensor's strides); its dtype (one for the whole list, else each tensor's).
    Then the sizes of the first list (the others have the same shapes).

    This is the per-call host cost of a cached launch: a few C calls per
    tensor, the summaries keeping the key cheap to hash and compare.
    """
    parts: list[Hashable] = [len(lists)]
    for lst in lists:
        parts.append(tuple(map(_data_ptr, lst)))
        parts.append(True if all(map(_is_contiguous, lst)) else tuple(map(_stride, lst)))
        dtypes = frozenset(map(_dtype, lst))
        parts.append(dtypes if len(dtypes) == 1 else tuple(map(_dtype, lst)))
    parts.append(tuple(map(_numel, lists[0])))
    return tuple(parts)


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
    """How one call's positions are served: the kernels take ``kernel`` (through
    ``table``), the torch backend takes ``other`` (tensors the kernels cannot
    address as one dense run: see :func:`dense_strides`, or a dtype that differs
    from the group's)."""

    kernel: tuple[int, ...]
    other: tuple[int, ...]
    table: Table | None


def make_plan(lists: Sequence[Sequence[Tensor]], n_elementwise: int, dtype: torch.dtype,
              device: torch.device, chunk: int = CHUNK) -> Plan:
    """Split positions by whether the kernels can serve them, and build the table.

    ``lists[:n_elementwise]`` are the elementwise operands (same shape at each
    position); any further lists are per-tensor scalars whose addresses ride in
    the table (Adam's on-device step counters).
    """
    kernel: list[int] = []
    other: list[int] = []
    for i, lead in enumerate(lists[0]):
        tensors = [lst[i] for lst in lists[:n_elementwise]]
        if not all(t.dtype == dtype for t in tensors):
            ok = False
        elif all(t.is_contiguous() for t in tensors):
            ok = True  # the common case; same shapes, so the same layout
        else:
            layout = dense_strides(lead)
            ok = layout is not None and all(dense_strides(t) == layout for t in tensors)
        (kernel if ok else other).append(i)
    table = None
    if kernel:
        table = build_table([[lst[i] for i in kernel] for lst in lists], device, chunk)
    return Plan(kernel=tuple(kernel), other=tuple(other), table=table)


class TableCache:
    """A bounded LRU map from a fingerprint to what was built from it.

    Entries are immutable and keyed by every address they contain, so a hit is
    always valid; the bound only limits the memory kept for address sets that
    will not come back (old gradients, a model moved to another device).
    """

    def __init__(self, capacity: int = 128) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, object] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, build: Callable[[], object]) -> object:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry
        self.misses += 1
        entry = build()
        self._entries[key] = entry
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return entry

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
