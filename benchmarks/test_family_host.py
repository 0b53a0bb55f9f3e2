"""pytest-benchmark: the host's share of a step of the SAM family (issue 13's target: every
variant's optimizer share at least 2x below ``pytorch-optimizer``'s on ResNet-18's shapes).

The variants, their rivals and how a round drives them are the benchmark CLI's
(:mod:`sam_fast.bench.family`, whose docstring says what is timed): ResNet-18's (CIFAR)
topology with 4-element tensors, fresh gradient clones attached before every pass, one
round one step with an SGD momentum base (five for LookSAM and SAM every 5 steps), against
``pytorch-optimizer``'s implementation or, for the variants that replace it, against
``torch.optim.SGD``'s step. GSAM has no rival here: ``pytorch-optimizer``'s takes the model
and runs the passes itself.

pytest-benchmark times the contenders one after another, so load on a shared machine moves
their ratios; the CLI (``python -m sam_fast.bench``) interleaves them round by round.
Groups put the contenders of a variant side by side. ``--benchmark-timer time.thread_time``
times the thread's CPU time on a busy machine.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pip install 'sam-fast[bench]'")
po = pytest.importorskip("pytorch_optimizer", reason="pip install 'sam-fast[bench]'")

from sam_fast.bench.family import HOST_NUMEL, host_round, host_topology, variants  # noqa: E402

N = host_topology()
_GRADS = [torch.randn(HOST_NUMEL, generator=torch.Generator().manual_seed(i)) for i in range(N)]


def _cases() -> list[tuple[str, str, Any, str, int]]:
    out = []
    for v in variants():
        out.append((v.name, "sam_fast", v.ours, v.protocol, v.steps))
        if v.rival is not None:
            name, factory, protocol = v.rival
            out.append((v.name, name, factory(po), protocol, v.steps))
    return out


CASES = _cases()


@pytest.mark.parametrize("variant, contender, make, protocol, steps", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_family_host_cost(benchmark: Any, variant: str, contender: str, make: Any,
                          protocol: str, steps: int) -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(HOST_NUMEL)) for _ in range(N)]
    one = host_round(make(params), params, _GRADS, protocol, steps)
    for _ in range(3):  # first touch: state, plans, caches
        one()
    benchmark.group = f"family host share, resnet18 topology: {variant} ({steps} step(s))"
    benchmark.pedantic(one, rounds=200, warmup_rounds=5)
