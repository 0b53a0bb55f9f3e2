"""Fake (meta) implementations of the ``torch.ops.sam_fast`` ops.

They let FakeTensor propagation, ``torch.compile`` and ``torch.library.opcheck``
reason about the C++ ops without running them: the in-place ops return
nothing (their schemas declare what they mutate), ``grad_sumsq`` returns a
0-dim fp32 tensor on the gradients' device. csrc/ops.cpp names this module in
``set_python_module``, so PyTorch imports it on demand too.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


@torch.library.register_fake("sam_fast::grad_sumsq")
def _grad_sumsq(grads: Sequence[Tensor], params: Sequence[Tensor], eta: float) -> Tensor:
    return grads[0].new_empty((), dtype=torch.float32)


def _mutates_only(*args: object, **kwargs: object) -> None:
    return None


for _name in ("perturb_", "restore_", "restore_sgd_", "restore_adamw_", "sampa_points_",
              "sampa_update_"):
    torch.library.register_fake(f"sam_fast::{_name}")(_mutates_only)
