"""The SAM family in the benchmark (docs/family.md): each variant's host share of a step
against ``pytorch-optimizer``'s (or against ``torch.optim.SGD``'s step where the variant
replaces it), and its whole training step against an SGD step end to end.

Host share: ResNet-18's (CIFAR) topology with tiny tensors, so the arithmetic is about zero
and the time is host work; the gradients are re-created before every pass (fresh clones
attached to ``p.grad``, as ``backward()`` leaves them), inside the timed round and the same
for every contender, so the ratios understate ours a little. One round is one step with an
SGD momentum base (five for the variants that take the ascent every 5 steps: one SAM step,
four plain ones). The contenders of a variant are timed interleaved, round by round; the
ratio is the median over rounds of theirs over ours.

End to end: the models of :mod:`sam_fast.bench.e2e`; each variant's step (``k`` steps for
LookSAM and SAM every ``k`` steps) right after as many SGD steps on a copy of the model, the
ratio the median of those pairs. Two forward/backward passes make about 2.0 the floor of a
SAM step (and of BSAM's); Momentum-SAM takes one, the variants every 5 steps six in five
steps (1.2); ESAM three forward passes and two backward, the second on half the batch.
ESAM is measured end to end only: its step backpropagates the per-example losses itself.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from .timing import Budget, Stats, Task, Timer, measure_interleaved, paired_ratio

SGD_KW = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
HOST_NUMEL = 4

Make = Callable[[list[nn.Parameter]], Any]


@dataclass(frozen=True)
class Variant:
    """One family member: how to build ours and how a step is driven.

    ``protocol``: ``two`` (backward, first_step, backward, second_step), ``closure``
    (backward, ``step(closure)``: one pass on the plain steps), ``one`` (``step(closure)``
    alone: Momentum-SAM, BSAM) or ``esam`` (``step(closure)`` with per-example losses).
    ``steps``: steps per timed round."""

    name: str
    title: str
    ours: Make
    protocol: str
    steps: int = 1
    # The contender on the host share: (its name, factory(module) -> make, its protocol);
    # the factory gets pytorch_optimizer's module (None when it is not installed).
    rival: tuple[str, Callable[[Any], Make | None], str] | None = None
    host: bool = True  # measured on the host share (tiny tensors, gradients attached)


def _po(build: Callable[[Any, list[nn.Parameter]], Any]) -> Callable[[Any], Make | None]:
    return lambda po: None if po is None else (lambda ps: build(po, ps))


def _holder(params: list[nn.Parameter]) -> nn.Module:
    holder = nn.Module()
    holder.ps = nn.ParameterList(params)
    return holder


def _sgd_step() -> tuple[str, Callable[[Any], Make | None], str]:
    """torch.optim.SGD's own step, the rival of the variants that replace it."""
    return ("torch.optim.SGD", lambda po: (lambda ps: torch.optim.SGD(ps, **SGD_KW)), "plain")


def variants() -> list[Variant]:
    """The variants measured, in the README's order."""
    import sam_fast as sf

    sgd = torch.optim.SGD
    return [
        Variant("sam", "SAM", lambda ps: sf.SAM(ps, sgd, rho=0.05, **SGD_KW), "two",
                rival=("pytorch_optimizer", _po(lambda po, ps: po.SAM(ps, sgd, rho=0.05,
                                                                       **SGD_KW)), "two")),
        Variant("gsam", "GSAM", lambda ps: sf.GSAM(ps, sgd, rho=0.05, alpha=0.4, **SGD_KW),
                "two"),  # pytorch-optimizer's GSAM takes the model and runs the passes itself
        Variant("wsam", "WSAM", lambda ps: sf.WSAM(ps, sgd, rho=0.05, gamma=0.9, **SGD_KW),
                "two", rival=("pytorch_optimizer", _po(lambda po, ps: po.WSAM(
                    _holder(ps), ps, sgd, rho=0.05, gamma=0.9, **SGD_KW)), "two")),
        Variant("friendly_sam", "Friendly-SAM",
                lambda ps: sf.FriendlySAM(ps, sgd, rho=0.05, **SGD_KW), "two",
                rival=("pytorch_optimizer", _po(lambda po, ps: po.FriendlySAM(
                    ps, sgd, rho=0.05, **SGD_KW)), "two")),
        Variant("looksam_k5", "LookSAM (k=5)",
                lambda ps: sf.LookSAM(ps, sgd, rho=0.1, k=5, **SGD_KW), "closure", steps=5,
                rival=("pytorch_optimizer", _po(lambda po, ps: po.LookSAM(
                    ps, sgd, rho=0.1, k=5, **SGD_KW)), "two")),
        Variant("sam_interval5", "SAM every 5 steps",
                lambda ps: sf.SAM(ps, sgd, rho=0.05, interval=5, **SGD_KW), "closure", steps=5,
                rival=_sgd_step()),
        Variant("momentum_sam", "Momentum-SAM",
                lambda ps: sf.MomentumSAM(ps, sgd, rho=0.3, **SGD_KW), "one",
                rival=_sgd_step()),
        # Its step takes per-example losses and backpropagates them itself: end to end only
        # (no rival has it).
        Variant("esam", "ESAM", lambda ps: sf.ESAM(ps, sgd, rho=0.05, beta=0.5, gamma=0.5,
                                                  seed=0, **SGD_KW), "esam", host=False),
        # pytorch-optimizer's BSAM computes another update (docs/family.md) with the same
        # three passes: its host share is the comparison that exists. Its foreach path
        # fails here (4.1: "Tensor list must have same number of elements as scalar list"),
        # so its per-parameter loop runs.
        # Both driven as "closure" (gradients there before step): pytorch-optimizer's
        # first_step makes its state only for parameters that already have a gradient.
        Variant("bsam", "BSAM", lambda ps: sf.BSAM(ps, num_data=50_000, lr=0.5, rho=0.05,
                                                  seed=0), "closure",
                rival=("pytorch_optimizer", _po(lambda po, ps: po.BSAM(
                    ps, num_data=50_000, lr=0.5, rho=0.05, foreach=False)), "closure")),
    ]


# -- host share ---------------------------------------------------------------------------------


def host_round(opt: Any, params: list[nn.Parameter], grads: list[Tensor], protocol: str,
                steps: int) -> Callable[[], None]:
    def attach() -> None:
        for p, g in zip(params, grads):
            p.grad = g.clone()

    def closure() -> Tensor:
        attach()
        return torch.zeros(())

    def two() -> None:
        attach()
        opt.first_step(zero_grad=True)
        attach()
        opt.second_step(zero_grad=True)

    def with_closure() -> None:
        attach()
        opt.step(closure)

    def one() -> None:
        opt.step(closure)

    def plain() -> None:
        attach()
        opt.step()

    step = {"two": two, "closure": with_closure, "one": one, "plain": plain}[protocol]
    if steps == 1:
        return step

    def several() -> None:
        for _ in range(steps):
            step()
    return several


class _Once:
    phases = ("step",)

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn

    def pre(self, phase: str) -> None:
        pass

    def run(self, phase: str) -> None:
        self.fn()


@dataclass
class FamilyHostRow:
    variant: str
    contender: str
    steps: int
    median_s: float
    q1_s: float
    q3_s: float
    repeats: int
    # theirs over ours, the median over rounds (on the row of ours)
    rival_over_ours: float | None = None


def _pytorch_optimizer() -> Any:
    try:
        import pytorch_optimizer
    except ImportError:
        return None
    return pytorch_optimizer


def host_topology() -> int:
    from .presets import resnet18_cifar_shapes

    return len(resnet18_cifar_shapes())


def measure_family_host(device: torch.device, budget: Budget, timer: Timer,
                        status: Callable[[str], None] = lambda s: None,
                        names: Sequence[str] | None = None, seed: int = 0
                        ) -> tuple[list[FamilyHostRow], list[str]]:
    """Each variant's host share against its rival, interleaved; (rows, notes)."""
    po = _pytorch_optimizer()
    notes = [] if po is not None else [
        "family host share: pytorch-optimizer not installed (pip install 'sam-fast[bench]'): "
        "the variants measured alone"]
    n = host_topology()
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(HOST_NUMEL, generator=gen).to(device) for _ in range(n)]
    rows: list[FamilyHostRow] = []
    for v in variants():
        if not v.host or (names is not None and v.name not in names):
            continue
        status(f"family host {v.name}")
        makers: list[tuple[str, Make, str]] = [("sam_fast", v.ours, v.protocol)]
        if v.rival is not None:
            rival_name, factory, protocol = v.rival
            make = factory(po)
            if make is not None:
                makers.append((rival_name, make, protocol))
        tasks: list[Task] = []
        for label, make, protocol in makers:
            torch.manual_seed(seed)
            params = [nn.Parameter(torch.randn(HOST_NUMEL, device=device)) for _ in range(n)]
            opt = make(params)
            run = host_round(opt, params, grads, protocol, v.steps)
            tasks.append(Task(label, [_Once(run)], _Once.phases))
        # One untimed round at least: state, plans and caches are made on the first steps.
        out = measure_interleaved(tasks, timer, replace(budget, warmup=max(budget.warmup, 3)))
        notes += [f"family host {v.name}: {label} failed: {e}" for label, e in out.failed.items()]
        ours = out.phases.get("sam_fast", {}).get("step", [])
        for label in out.phases:
            samples = out.phases[label]["step"]
            if not samples:
                continue
            st = Stats(samples)
            row = FamilyHostRow(v.name, label, v.steps, st.median, st.q1, st.q3, len(samples))
            if label == "sam_fast" and len(tasks) > 1:
                row.rival_over_ours = paired_ratio(out.phases[tasks[1].name]["step"], ours)
            rows.append(row)
    return rows, notes


# -- end to end ---------------------------------------------------------------------------------


def _e2e_step(opt: Any, model: nn.Module, batch: Any, loss_fn: Callable, protocol: str,
              steps: int) -> Callable[[], None]:
    def closure() -> Tensor:
        loss = loss_fn(model, batch)
        loss.backward()
        return loss

    def two() -> None:
        loss_fn(model, batch).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model, batch).backward()
        opt.second_step(zero_grad=True)

    def with_closure() -> None:
        loss_fn(model, batch).backward()
        opt.step(closure)
        opt.zero_grad(set_to_none=True)

    def one() -> None:
        opt.step(closure)
        opt.zero_grad(set_to_none=True)

    def esam() -> None:
        opt.step(lambda idx=None: per_example(model, batch, idx))

    per_example = _per_example_loss(loss_fn)
    step = {"two": two, "closure": with_closure, "one": one, "esam": esam}[protocol]

    def several() -> None:
        for _ in range(steps):
            step()
    return several


def _per_example_loss(loss_fn: Callable) -> Callable:
    """ESAM's closure: the per-example losses of the batch (or of its examples ``idx``),
    cross-entropy as the e2e models' mean loss (a sequence's mean over its tokens)."""
    import torch.nn.functional as F

    def losses(model: nn.Module, batch: Any, idx: Tensor | None) -> Tensor:
        x, y = batch if idx is None else (batch[0][idx], batch[1][idx])
        out = model(x)
        if out.dim() == 2:  # images: logits per example
            return F.cross_entropy(out, y, reduction="none")
        per_token = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1),
                                    reduction="none")
        return per_token.view(y.shape).mean(1)
    return losses


def _sgd_run(model: nn.Module, batch: Any, loss_fn: Callable, steps: int) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), **SGD_KW)

    def run() -> None:
        for _ in range(steps):
            opt.zero_grad()
            loss_fn(model, batch).backward()
            opt.step()
    return run


class _Pair:
    phases = ("sgd", "step")

    def __init__(self, sgd: Callable[[], None], step: Callable[[], None]) -> None:
        self.sgd, self.step = sgd, step

    def pre(self, phase: str) -> None:
        pass

    def run(self, phase: str) -> None:
        (self.sgd if phase == "sgd" else self.step)()


@dataclass
class FamilyE2ERow:
    model: str
    variant: str
    steps: int
    median_s: float  # the variant's `steps` steps
    sgd_median_s: float  # as many SGD steps
    ratio_to_sgd: float | None
    repeats: int


@dataclass
class FamilyResult:
    device: str
    host_tensors: int
    host: list[FamilyHostRow] = field(default_factory=list)
    e2e: list[FamilyE2ERow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_family_e2e(device: torch.device, budget: Budget, timer: Timer,
                   status: Callable[[str], None] = lambda s: None, sizes: Any = None,
                   models: Sequence[str] = ("resnet18", "gpt"),
                   names: Sequence[str] | None = None) -> tuple[list[FamilyE2ERow], list[str]]:
    """Each variant's training step over an SGD step on the e2e models; (rows, notes)."""
    from .e2e import E2E_SIZES, e2e_problems

    sizes = sizes or E2E_SIZES["cuda" if device.type == "cuda" else "cpu"]
    rows: list[FamilyE2ERow] = []
    notes: list[str] = []
    for name, base_model, batch, loss_fn in e2e_problems(device, sizes):
        short = name.split()[0]
        if short not in models:
            continue
        status(f"family e2e {short}: building")
        tasks, steps_of = [], {}
        for v in variants():
            if names is not None and v.name not in names:
                continue
            try:
                model = copy.deepcopy(base_model)
                opt = v.ours(list(model.parameters()))
                step = _e2e_step(opt, model, batch, loss_fn, v.protocol, v.steps)
                sgd = _sgd_run(copy.deepcopy(base_model), batch, loss_fn, v.steps)
            except Exception as e:  # reported, not fatal
                notes.append(f"{name}: {v.name} failed: {type(e).__name__}: {e}"[:300])
                continue
            tasks.append(Task(v.name, [_Pair(sgd, step)], _Pair.phases))
            steps_of[v.name] = v.steps
        out = measure_interleaved(tasks, timer, replace(budget, warmup=max(budget.warmup, 1)),
                                  lambda: status(f"family e2e {short}"))
        notes += [f"{name}: {label} failed: {e}" for label, e in out.failed.items()]
        for label, phases in out.phases.items():
            if not phases["step"]:
                continue
            rows.append(FamilyE2ERow(name, label, steps_of[label], Stats(phases["step"]).median,
                                     Stats(phases["sgd"]).median,
                                     paired_ratio(phases["step"], phases["sgd"]),
                                     len(phases["step"])))
    return rows, notes


def run_family(device: torch.device, host_budget: Budget | None, budget: Budget | None,
               timer: Timer, status: Callable[[str], None] = lambda s: None,
               seed: int = 0, sizes: Any = None) -> FamilyResult:
    """The family's part of the benchmark: the host share when ``host_budget`` is given, end
    to end when ``budget`` is."""
    result = FamilyResult(str(device), host_topology())
    if host_budget is not None:
        result.host, notes = measure_family_host(device, host_budget, timer, status, seed=seed)
        result.notes += notes
    if budget is not None:
        result.e2e, notes = run_family_e2e(device, budget, timer, status, sizes=sizes)
        result.notes += notes
    return result
