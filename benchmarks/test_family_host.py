"""pytest-benchmark: the host's share of a step of the SAM family (issue 13's target: every
variant's optimizer share at least 2x below ``pytorch-optimizer``'s on ResNet-18's shapes).

ResNet-18's (CIFAR) topology with 4-element tensors, so the arithmetic is about zero and
the time is host work; the gradients are re-created before every pass (fresh clones
attached to ``p.grad``, as ``backward()`` leaves them). The clones are inside the timed
round (about 1 us per tensor per pass here), the same for every contender, so the ratios
understate ours a little. One round is one step of the variant with an SGD momentum base:

- SAM, WSAM, Friendly-SAM: ``first_step`` + ``second_step`` (the two passes' gradients
  attached before each; the same protocol for both contenders);
- LookSAM (k = 5) and SAM every 5 steps: five steps (one SAM step, four plain ones); ours
  through ``step(closure)``, which takes one pass on the plain steps, ``pytorch-optimizer``'s
  LookSAM through its two phases on every step (how it is used);
- Momentum-SAM: ``step(closure)`` (no ``pytorch-optimizer`` counterpart; against
  ``torch.optim.SGD.step()``, the step it replaces).

GSAM is left out: ``pytorch-optimizer``'s takes the model and runs the passes itself.
Groups put the contenders of a variant side by side. ``--benchmark-timer
time.thread_time`` times the thread's CPU time on a busy machine.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="pip install 'sam-fast[bench]'")
po = pytest.importorskip("pytorch_optimizer", reason="pip install 'sam-fast[bench]'")

import sam_fast  # noqa: E402
from sam_fast.bench.presets import resnet18_cifar_shapes  # noqa: E402

SGD = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
N = len(resnet18_cifar_shapes())


def _params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4)) for _ in range(N)]


_GRADS = [torch.randn(4, generator=torch.Generator().manual_seed(i)) for i in range(N)]


def _attach(params: list[torch.nn.Parameter]) -> None:
    for p, g in zip(params, _GRADS):
        p.grad = g.clone()


def _module_of(params: list[torch.nn.Parameter]) -> torch.nn.Module:
    holder = torch.nn.Module()
    holder.ps = torch.nn.ParameterList(params)
    return holder


# variant -> contender -> (make(params) -> optimizer, protocol)
VARIANTS: dict[str, dict[str, tuple[Callable, str]]] = {
    "sam": {
        "sam_fast": (lambda ps: sam_fast.SAM(ps, torch.optim.SGD, rho=0.05, **SGD), "two"),
        "pytorch_optimizer": (lambda ps: po.SAM(ps, torch.optim.SGD, rho=0.05, **SGD), "two"),
    },
    "wsam": {
        "sam_fast": (lambda ps: sam_fast.WSAM(ps, torch.optim.SGD, rho=0.05, gamma=0.9, **SGD),
                     "two"),
        "pytorch_optimizer": (lambda ps: po.WSAM(_module_of(ps), ps, torch.optim.SGD, rho=0.05,
                                                 gamma=0.9, **SGD), "two"),
    },
    "friendly_sam": {
        "sam_fast": (lambda ps: sam_fast.FriendlySAM(ps, torch.optim.SGD, rho=0.05, **SGD),
                     "two"),
        "pytorch_optimizer": (lambda ps: po.FriendlySAM(ps, torch.optim.SGD, rho=0.05, **SGD),
                              "two"),
    },
    "looksam_k5-5_steps": {
        "sam_fast": (lambda ps: sam_fast.LookSAM(ps, torch.optim.SGD, rho=0.1, k=5, **SGD),
                     "closure5"),
        "pytorch_optimizer": (lambda ps: po.LookSAM(ps, torch.optim.SGD, rho=0.1, k=5, **SGD),
                              "two5"),
    },
    "sam_interval5-5_steps": {
        "sam_fast": (lambda ps: sam_fast.SAM(ps, torch.optim.SGD, rho=0.05, interval=5, **SGD),
                     "closure5"),
        "torch_sgd": (lambda ps: torch.optim.SGD(ps, **SGD), "plain5"),
    },
    "momentum_sam": {
        "sam_fast": (lambda ps: sam_fast.MomentumSAM(ps, torch.optim.SGD, rho=0.3, **SGD),
                     "msam"),
        "torch_sgd": (lambda ps: torch.optim.SGD(ps, **SGD), "plain"),
    },
}
CASES = [(v, c) for v, contenders in VARIANTS.items() for c in contenders]


def _round(opt: Any, params: list[torch.nn.Parameter], protocol: str) -> Callable[[], None]:
    def closure() -> torch.Tensor:
        _attach(params)
        return torch.zeros(())

    def two() -> None:
        _attach(params)
        opt.first_step(zero_grad=True)
        _attach(params)
        opt.second_step(zero_grad=True)

    def closure_step() -> None:
        _attach(params)
        opt.step(closure)

    def plain() -> None:
        _attach(params)
        opt.step()

    if protocol == "two":
        return two
    if protocol == "msam":
        return lambda: opt.step(closure)
    if protocol == "plain":
        return plain
    step = {"two5": two, "closure5": closure_step, "plain5": plain}[protocol]

    def five() -> None:
        for _ in range(5):
            step()
    return five


@pytest.mark.parametrize("variant, contender", CASES, ids=[f"{v}-{c}" for v, c in CASES])
def test_family_host_cost(benchmark: Any, variant: str, contender: str) -> None:
    make, protocol = VARIANTS[variant][contender]
    params = _params()
    opt = make(params)
    one = _round(opt, params, protocol)
    for _ in range(3):  # first touch: state, plans, caches
        one()
    benchmark.group = f"family host share, resnet18 topology: {variant}"
    benchmark.pedantic(one, rounds=200, warmup_rounds=5)
