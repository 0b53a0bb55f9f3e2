"""torch.distributed support: DTensor shards (FSDP2), DDP's local ascent, and the
collective SAMPa's two-sided step uses.

- FSDP2 (``fully_shard``) hands the optimizer DTensor parameters and
  gradients. The fused ops run on the local shards; only the gradient norm
  needs the other ranks: it is the square root of the sum, over the ranks that
  hold different shards, of the local sums of squares (one small all-reduce).
  ESAM's and BSAM's random draws per element: every rank draws for the whole
  tensors, as one process would, and each shard takes its rows' part
  (:func:`shard_of_draw`).
- DDP: :func:`local_ascent` makes SAM's first forward/backward skip DDP's
  gradient all-reduce, so each rank climbs along its own gradient.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # torch built without distributed support
    DTensor = None  # type: ignore[assignment,misc]


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (sharing its storage); any other tensor as it is."""
    return t._local_tensor if is_dtensor(t) else t


def locals_of(tensors: Sequence[Tensor] | None) -> list[Tensor] | None:
    return None if tensors is None else [local(t) for t in tensors]


def check_drawable(params: Iterable[Tensor], who: str) -> bool:
    """For optimizers that draw random numbers per element (ESAM's subset, BSAM's noise):
    whether any parameter is a DTensor, after checking that each one's local shard is a
    block of the whole tensor that :func:`shard_of_draw` can cut out of a draw made for the
    whole tensor (placements ``Shard(0)``, as FSDP2's, and ``Replicate``). Raised at
    construction, before anything is touched."""
    sharded = False
    for p in params:
        if not is_dtensor(p):
            continue
        sharded = True
        for placement in p.placements:
            if type(placement) is Replicate or (type(placement) is Shard and placement.dim == 0):
                continue
            raise NotImplementedError(
                f"{who} takes DTensor parameters sharded along dim 0 (FSDP2's Shard(0)) or "
                f"replicated, got placements {tuple(p.placements)}: its random draw per element "
                "is cut out of the whole tensor's draw by rows")
    return sharded


def shard_of_draw(flat: Tensor, p: Tensor) -> Tensor:
    """The part of ``flat`` (a draw of ``p.numel()`` numbers for the whole tensor ``p``, in
    row-major order) that ``p``'s local shard holds, as a view shaped like the shard: the
    draw one process would use for those elements. A plain tensor gets all of it. Uneven
    and empty shards come from the DTensor's own metadata (its rows' global offset)."""
    if not is_dtensor(p):
        return flat.view(p.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    if tuple(shape) != tuple(p._local_tensor.shape):
        raise RuntimeError(
            f"sam_fast: a DTensor parameter's local shard has shape "
            f"{tuple(p._local_tensor.shape)}, its placements say {tuple(shape)}")
    whole = flat.view(p.shape)
    if p.dim() == 0:
        return whole
    # Shard(0) / Replicate only (check_drawable): a block of whole rows, contiguous.
    return whole[offset[0]:offset[0] + shape[0]]


def shard_groups(t: Tensor) -> list:
    """The process groups over which a DTensor's local shards differ (its Shard mesh dims).

    Summing a local reduction over these groups gives the reduction of the
    whole tensor; Replicate dims hold copies and must not be summed."""
    if not is_dtensor(t):
        return []
    groups = []
    mesh = t.device_mesh
    for dim, placement in enumerate(t.placements):
        if isinstance(placement, Shard):
            groups.append(mesh.get_group(dim))
        elif not isinstance(placement, Replicate):
            raise RuntimeError(
                f"sam_fast needs gradients that are sharded or replicated DTensors, got "
                f"placement {placement} (reduce partial gradients before the optimizer step)"
            )
    return groups


def all_reduce_sumsq(partial: Tensor, like: Sequence[Tensor]) -> Tensor:
    """Complete a local sum of squares over the shard groups of the DTensors in ``like``."""
    if not like or not is_dtensor(like[0]):
        return partial
    signature = (like[0].device_mesh, tuple(like[0].placements))
    for t in like:
        if not is_dtensor(t) or (t.device_mesh, tuple(t.placements)) != signature:
            raise RuntimeError(
                "sam_fast: gradients with different DTensor meshes or placements in one norm; "
                "every parameter of one optimizer must be sharded the same way"
            )
    for group in shard_groups(like[0]):
        torch.distributed.all_reduce(partial, op=torch.distributed.ReduceOp.SUM, group=group)
    return partial


@contextlib.contextmanager
def local_ascent(model: torch.nn.Module) -> Iterator[None]:
    """Run SAM's *first* forward and backward inside this context to climb along the
    local gradient: under ``DistributedDataParallel`` it is ``model.no_sync()``.

    ``with local_ascent(model): loss_fn(model(x), y).backward()``

    Each rank then perturbs along its own mini-batch gradient (the
    "m-sharpness" of the SAM paper with m = the per-rank batch) and the step
    saves one gradient all-reduce; the second backward all-reduces as usual,
    and the restore is a copy, so every rank ends the step with the same
    weights. On a model that is not DDP-wrapped it does nothing.
    """
    no_sync = getattr(model, "no_sync", None)
    if no_sync is None:
        yield
        return
    with no_sync():
        yield
    _local_grads.update(map(id, model.parameters()))


# The parameters (by id) whose gradients the last local_ascent() block left local to this
# rank, until the next SAM first step reads them. An update must not apply such a gradient:
# every rank would step differently (a plain step of SAM every k steps, the second pass of
# any step, the first gradient GSAM, WSAM and LookSAM mix into theirs). Empty unless a
# DDP-wrapped model ran local_ascent(), so the optimizers' check costs one truth test.
_local_grads: set[int] = set()


def local_grads_among(params: Iterable[Tensor]) -> bool:
    """Whether any of ``params`` holds a gradient from a local_ascent() block not yet read by
    a first step."""
    return bool(_local_grads) and not _local_grads.isdisjoint(map(id, params))


def forget_local_grads() -> None:
    """A first step read the local gradients (SAM's ascent: what local ascent is for)."""
    _local_grads.clear()


def refuse_local_grads(what: str) -> None:
    """Raise the error for an update that would read local gradients (``what`` says which)."""
    raise RuntimeError(
        f"{what} from a local_ascent() block: DDP did not all-reduce them, so every rank "
        "would step differently. Run only SAM's first pass (the ascent) under "
        "local_ascent(); GSAM, WSAM and LookSAM need that pass all-reduced too, since their "
        "update reads its gradient")


class TwoSidedExchange:
    """SAMPa across two sets of ranks: the first half of ``group`` evaluates the
    gradient at ``x~``, the second half the gradient at ``y``, each half on its own
    share of the batch; one all-reduce then gives every rank both (averaged over
    its half), the loss at ``y``, and whether any rank failed.

    With 2 ranks this is the paper's two-device form; with 2m ranks, each half
    is also data-parallel over m ranks (rank ``r`` and rank ``r + m`` should read
    the same shard, of the previous and of the current batch respectively).
    """

    def __init__(self, group=None) -> None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("SAMPa(parallel=...) needs torch.distributed to be initialized")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if self.world < 2 or self.world % 2:
            raise ValueError(
                f"SAMPa's parallel form needs an even number of ranks (2 or 2m), got {self.world}"
            )
        self.half = self.world // 2
        self.role = "x_tilde" if self.rank < self.half else "y"

    def exchange(
        self,
        params: Sequence[Tensor],
        mine: dict[Tensor, Tensor],
        loss: Tensor | None,
        failed: bool,
    ) -> tuple[dict[Tensor, Tensor], dict[Tensor, Tensor], Tensor]:
        """All-reduce this rank's gradients into (g~, g_y, loss at y) on every rank.

        Raises a RuntimeError naming the ranks when another rank reports a
        failure, so no rank waits for a peer that will never arrive; a rank that
        failed itself (``failed=True``) gets its result back and raises its own
        error.
        """
        import torch.distributed as dist

        n = len(params)
        locals_ = [local(p) for p in params]
        acc = torch.float64 if any(p.dtype == torch.float64 for p in locals_) else torch.float32
        device = locals_[0].device
        sizes = [p.numel() for p in locals_]
        total = sum(sizes)
        # [g~ | g_y | has g~ | has g_y | loss | failure flag per rank]
        buf = torch.zeros(2 * total + 2 * n + 1 + self.world, dtype=acc, device=device)
        side = 0 if self.role == "x_tilde" else 1
        grads_part = buf[side * total:(side + 1) * total]
        present = buf[2 * total + side * n:2 * total + (side + 1) * n]
        offset = 0
        for i, (p, size) in enumerate(zip(params, sizes)):
            g = mine.get(p)
            if g is not None:
                grads_part[offset:offset + size].copy_(local(g).reshape(-1))
                present[i] = 1
            offset += size
        if self.half > 1:
            grads_part.div_(self.half)
        if loss is not None and side == 1:
            buf[2 * total + 2 * n] = loss.detach().to(acc) / self.half
        buf[2 * total + 2 * n + 1 + self.rank] = 1.0 if failed else 0.0
        try:
            dist.all_reduce(buf, group=self.group)
        except Exception as exc:  # a peer died or the process group timed out
            raise RuntimeError(
                "SAMPa: the all-reduce that combines the two gradients failed; a peer rank "
                "died or did not arrive within the process group's timeout"
            ) from exc
        # One small device-to-host read per step: which gradients exist, and whether a
        # rank failed (which must become an exception on every rank).
        tail = buf[2 * total:].tolist()
        has_by_side = (tail[:n], tail[n:2 * n])
        flags = tail[2 * n + 1:]
        if any(flags) and not failed:  # a failing rank raises its own error instead
            ranks = [r for r in range(self.world) if flags[r] != 0]
            raise RuntimeError(
                f"SAMPa: rank(s) {ranks} failed during this step's gradient evaluation; the "
                "weights are back at x on every rank (see the failing rank's error)"
            )
        out = []
        for s in (0, 1):
            grads, offset = {}, 0
            part = buf[s * total:(s + 1) * total]
            for i, (p, size) in enumerate(zip(params, sizes)):
                if has_by_side[s][i] != 0:
                    shard = part[offset:offset + size].view(locals_[i].shape).to(locals_[i].dtype)
                    grads[p] = _like(p, shard)
                offset += size
            out.append(grads)
        return out[0], out[1], buf[2 * total + 2 * n]


def _like(p: Tensor, shard: Tensor) -> Tensor:
    """A gradient for ``p`` holding ``shard`` (a DTensor with p's layout for DTensor params)."""
    if not is_dtensor(p):
        return shard
    return DTensor.from_local(shard, p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())
