"""The byte model: the least memory traffic each timed workload needs.

docs/design.md section 3 gives, per fused op, the bytes it must move for N fp32
elements ("4N" = one read or write of one tensor). Here every entry is a
number of *passes* over the parameters, so the bytes of any dtype are
``passes * N * itemsize`` (the momentum buffers and backups share the
parameters' dtype in every contender).

The optimizer's share of one SAM step with ``torch.optim.SGD(momentum>0)``:

- ``grad_norm``    reads g                                   1 pass  (4N)
- ``first_step``   = grad_norm + ``perturb_``
                   (reads w, g; writes w, backup)            1 + 4 = 5 passes (20N)
- ``second_step``  = ``restore_sgd_``
                   (reads backup, g', buf; writes w, buf)    5 passes (20N)
- ``sam_step``     = first_step + second_step                10 passes (40N)

SAMPa's two fused updates (plus the norm of ``g_y`` that scales ``x~``):

- ``sampa_points`` = grad_norm(g_y) + ``sampa_points_``
                   (reads x, g_y, buf; writes x~, y, backup) 1 + 6 = 7 passes (28N)
- ``sampa_update`` = ``sampa_update_``
                   (reads x, g~, g_y, buf; writes x, buf)    6 passes (24N)
- ``sampa_step``   = sampa_points + sampa_update             13 passes (52N)

``sampa_points_`` also writes the backup of ``x`` (``sampa_update_`` reads
``x`` from it, because the parameters hold ``y`` by then): 24N, where
docs/design.md's table says 20N (reads x, g_y, buf; writes x~, y). We count the
24N the op must move.
"""

from __future__ import annotations

PASSES: dict[str, int] = {
    "grad_norm": 1,
    "first_step": 5,
    "second_step": 5,
    "sam_step": 10,
    "sampa_points": 7,
    "sampa_update": 6,
    "sampa_step": 13,
}

# The workloads the CLI times, in report order; the *_step ones are totals of phases.
WORKLOADS: tuple[str, ...] = tuple(PASSES)

# Which timed task produces each workload: a task runs its phases back to back
# and the total is the per-repeat sum of the phases.
TASK_PHASES: dict[str, tuple[str, ...]] = {
    "grad_norm": ("grad_norm",),
    "sam_step": ("first_step", "second_step"),
    "sampa_step": ("sampa_points", "sampa_update"),
}


def min_bytes(workload: str, num_elements: int, itemsize: int) -> int:
    """The least bytes ``workload`` moves over ``num_elements`` parameters of ``itemsize``."""
    try:
        passes = PASSES[workload]
    except KeyError:
        raise ValueError(f"unknown workload {workload!r} (known: {', '.join(PASSES)})") from None
    return passes * num_elements * itemsize
