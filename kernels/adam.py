"""``torch.optim.Adam`` / ``AdamW``'s update, fused with SAM's restore.

Follows the torch backend's ``restore_adamw_`` operation by operation, in
fp32. The bias corrections come from one of two places, as in PyTorch:

- step counters on the host (non-capturable Adam, PyTorch's default): the
  host computes ``step_size`` and ``sqrt(1 - beta2^t)`` in double precision
  from the counters it holds (no device sync) and passes them as arguments;
  positions whose counters differ go in separate launches;
- step counters on the device (``capturable=True`` / ``fused=True``): each
  program reads its tensor's counter through the table and computes the
  corrections itself, so the step can be captured in a CUDA graph.
"""

from __future__ import annotations

import triton.language as tl
from torch import Tensor

from .common import (amp_args, amp_scalars, chunk_of, device_fn, kernel, mul_rn, operand,
                     pow_int, to_storage)
from .tables import BLOCK, CHUNK, LAUNCH, Table


@device_fn
def _adam_block(p, b, g, m, v, vmax, offs, mask, keep, inv_scale, beta2, lerp_w, one_minus_beta2,
                eps, weight_decay, decay, bc2_sqrt, step_size, maximize, lerp_small,
                DT: tl.constexpr, HAS_WD: tl.constexpr, AMSGRAD: tl.constexpr):
    x_raw = tl.load(b + offs, mask=mask)
    # AdamW's decay factor is 1.0 for Adam and without weight decay, the grad scale's
    # reciprocal 1.0 without a GradScaler: both exact, and never contracted (mul_rn), as
    # PyTorch's separate mul_ and unscale kernels round them.
    x = mul_rn(x_raw.to(tl.float32), decay)
    grad = mul_rn(tl.load(g + offs, mask=mask).to(tl.float32), inv_scale)
    grad = tl.where(maximize, -grad, grad)
    if HAS_WD:  # Adam's coupled weight decay (``grad + 0 * x`` is not ``grad``: a constexpr)
        grad = grad + weight_decay * x
    m_raw = tl.load(m + offs, mask=mask)
    v_raw = tl.load(v + offs, mask=mask)
    exp_avg = m_raw.to(tl.float32)
    exp_avg_sq = v_raw.to(tl.float32)
    # torch.lerp's two-sided formula (the side chosen on the host, a runtime flag),
    # so that it agrees with PyTorch's rounding; 1 - w in fp32 as torch.lerp does (a
    # Python float under the interpreter: cast).
    diff = grad - exp_avg
    new_m = tl.where(lerp_small, exp_avg + lerp_w * diff,
                     grad - diff * (1.0 - tl.cast(lerp_w, tl.float32)))
    new_v = exp_avg_sq * beta2 + (one_minus_beta2 * grad) * grad
    if AMSGRAD:
        max_raw = tl.load(vmax + offs, mask=mask)
        new_max = tl.maximum(max_raw.to(tl.float32), new_v, propagate_nan=tl.PropagateNan.ALL)
        root = tl.sqrt_rn(new_max)
    else:
        root = tl.sqrt_rn(new_v)
    # IEEE division and square root, as PyTorch's kernels (not the approximate ones).
    denom = tl.math.div_rn(root, bc2_sqrt) + eps
    new_x = x + tl.math.div_rn(new_m, denom) * step_size
    # A skipped step (keep false): w restored, the state's old bits written back (sgd.py).
    new_x = tl.where(keep, to_storage(new_x, DT), x_raw)
    new_m = tl.where(keep, to_storage(new_m, DT), m_raw)
    new_v = tl.where(keep, to_storage(new_v, DT), v_raw)
    tl.store(m + offs, new_m, mask=mask)
    tl.store(v + offs, new_v, mask=mask)
    if AMSGRAD:
        new_max = tl.where(keep, to_storage(new_max, DT), max_raw)
        tl.store(vmax + offs, new_max, mask=mask)
    tl.store(p + offs, new_x, mask=mask)


@kernel
def _restore_adam_kernel(blocks, B, p_row, b_row, g_row, m_row, v_row, vmax_row, step_row,
                         grad_scale, found_inf, beta1, beta2, lerp_w, one_minus_beta2,
                         eps, weight_decay, decay, neg_lr, host_step_size, host_bc2_sqrt,
                         has_scale, has_inf, maximize, lerp_small, DT: tl.constexpr,
                         STEP_DT: tl.constexpr, HAS_WD: tl.constexpr, AMSGRAD: tl.constexpr,
                         DEVICE_STEPS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                         CHUNK: tl.constexpr):
    t, start, rem = chunk_of(blocks, B, CHUNK)
    p = operand(p_row, t, start, DT, ALIGNED)
    b = operand(b_row, t, start, DT, ALIGNED)
    g = operand(g_row, t, start, DT, ALIGNED)
    m = operand(m_row, t, start, DT, ALIGNED)
    v = operand(v_row, t, start, DT, ALIGNED)
    vmax = v
    if AMSGRAD:
        vmax = operand(vmax_row, t, start, DT, ALIGNED)
    inv_scale, keep = amp_scalars(grad_scale, found_inf, has_scale, has_inf)
    if DEVICE_STEPS:
        # This tensor's counter (already advanced for this step), from its own row.
        counter = operand(step_row, t, 0, STEP_DT, False)
        n = tl.load(counter).to(tl.int64)
        bc1 = 1.0 - pow_int(beta1, n).to(tl.float32)
        bc2_sqrt = tl.sqrt_rn(1.0 - pow_int(beta2, n).to(tl.float32))
        # PyTorch: -lr / bc1 on tensors is bc1.reciprocal() * -lr.
        step_size = tl.math.div_rn(1.0, bc1) * neg_lr
    else:
        bc2_sqrt = host_bc2_sqrt
        step_size = host_step_size
    n_full = (rem // BLOCK) * BLOCK
    for off in tl.range(0, n_full, BLOCK):
        _adam_block(p, b, g, m, v, vmax, off + tl.arange(0, BLOCK), None, keep, inv_scale, beta2,
                    lerp_w, one_minus_beta2, eps, weight_decay, decay, bc2_sqrt, step_size,
                    maximize, lerp_small, DT, HAS_WD, AMSGRAD)
    if n_full < rem:
        offs = n_full + tl.arange(0, BLOCK)
        _adam_block(p, b, g, m, v, vmax, offs, offs < rem, keep, inv_scale, beta2, lerp_w,
                    one_minus_beta2, eps, weight_decay, decay, bc2_sqrt, step_size, maximize,
                    lerp_small, DT, HAS_WD, AMSGRAD)


def restore_adam(table: Table, dtype: tl.dtype, *, lr: float, beta1: float, beta2: float,
                 eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
                 decoupled_weight_decay: bool, grad_scale: Tensor | None,
                 found_inf: Tensor | None, step_dtype: tl.dtype | None,
                 host_step_size: float = 0.0, host_bc2_sqrt: float = 1.0) -> None:
    """Operands (params, backups, grads, exp_avgs, exp_avg_sqs[, max_exp_avg_sqs][, steps]).

    ``step_dtype`` set: the last operand is the on-device step counters (of that
    dtype), already advanced for this step. None: the host's ``host_step_size``
    (``-lr / (1 - beta1^t)``) and ``host_bc2_sqrt`` (``sqrt(1 - beta2^t)``) apply.
    """
    rows = table.rows
    vmax_row = rows[5] if amsgrad else rows[0]  # never read without AMSGRAD
    step_row = rows[-1] if step_dtype is not None else rows[0]  # nor without DEVICE_STEPS
    lr, beta1, beta2 = float(lr), float(beta1), float(beta2)
    weight_decay = float(weight_decay)
    decoupled = bool(decoupled_weight_decay) and weight_decay != 0
    lerp_w = 1.0 - beta1
    _restore_adam_kernel[(table.n_blocks,)](
        table.blocks, table.n_blocks, rows[0], rows[1], rows[2], rows[3], rows[4], vmax_row,
        step_row, *amp_args(table, grad_scale, found_inf),
        beta1, beta2, lerp_w, 1.0 - beta2, float(eps), weight_decay,
        1.0 - lr * weight_decay if decoupled else 1.0, -lr, float(host_step_size),
        float(host_bc2_sqrt), grad_scale is not None, found_inf is not None, bool(maximize),
        abs(lerp_w) < 0.5,
        DT=dtype, STEP_DT=step_dtype if step_dtype is not None else dtype,
        HAS_WD=weight_decay != 0 and not decoupled, AMSGRAD=bool(amsgrad),
        DEVICE_STEPS=step_dtype is not None, ALIGNED=table.aligned, BLOCK=BLOCK, CHUNK=CHUNK,
        **LAUNCH,
    )
