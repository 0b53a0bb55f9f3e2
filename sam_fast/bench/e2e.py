"""End to end: whole training steps of two small models, SGD vs SAM vs SAMPa.

The figure of merit is the ratio of a contender's step time to plain SGD's on
the same model and batch: SAM and SAMPa take two forward/backward passes per
step, so about 2.0 is the floor, and what lies above it is the optimizer's
own cost (it dips below 2.0 only where that costs less than twice SGD's own
step). Each contender's step is timed right after an SGD step on a model copy
of its own, and the ratio is the median of those back-to-back pairs, so load
from other processes on the machine cancels. The models are written here (no
torchvision): ResNet-18 for 32x32 images (CIFAR-shaped random data) and a
small GPT on random tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .contenders import Contender, Hyper, SamStepper
from .timing import Budget, Stats, Task, Timer, measure_interleaved, paired_ratio

# -- models --------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or inplanes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: 3x3 stem, no max-pool (the usual CIFAR variant)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        layers, inplanes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes, 1)]
            inplanes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A GPT-2-style decoder (pre-LN, tied embeddings)."""

    def __init__(self, vocab: int, ctx: int, d: int, layers: int, heads: int) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(ctx, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.blocks(self.wte(idx) + self.wpe(pos))
        return self.ln_f(x) @ self.wte.weight.t()


@dataclass(frozen=True)
class E2ESizes:
    cnn_batch: int
    gpt_batch: int
    gpt_ctx: int
    gpt_d: int
    gpt_layers: int
    gpt_heads: int
    gpt_vocab: int
    image_size: int = 32  # CIFAR; the tests shrink it


# GPU: a CIFAR training batch and a ~25M-parameter GPT. CPU (2 cores): small batches so
# that every contender's steps fit in a minute; the ratios are what matter.
E2E_SIZES = {
    "cuda": E2ESizes(cnn_batch=128, gpt_batch=16, gpt_ctx=256, gpt_d=512, gpt_layers=6,
                     gpt_heads=8, gpt_vocab=8192),
    "cpu": E2ESizes(cnn_batch=2, gpt_batch=4, gpt_ctx=64, gpt_d=256, gpt_layers=4,
                    gpt_heads=4, gpt_vocab=2048),
}


def e2e_problems(device: torch.device, sizes: E2ESizes, seed: int = 0
                 ) -> list[tuple[str, nn.Module, tuple[Tensor, Tensor], Callable]]:
    """(name, model, batch, loss function) for each end-to-end model."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    cnn = ResNet18().to(device)
    images = torch.randn(sizes.cnn_batch, 3, sizes.image_size, sizes.image_size,
                         generator=gen).to(device)
    labels = torch.randint(0, 10, (sizes.cnn_batch,), generator=gen).to(device)
    gpt = GPT(sizes.gpt_vocab, sizes.gpt_ctx, sizes.gpt_d, sizes.gpt_layers,
              sizes.gpt_heads).to(device)
    tokens = torch.randint(0, sizes.gpt_vocab, (sizes.gpt_batch, sizes.gpt_ctx + 1), generator=gen)
    tokens = tokens.to(device)

    def cnn_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    def gpt_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        logits = model(batch[0])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))

    return [
        (f"resnet18 ({'CIFAR, ' if sizes.image_size == 32 else ''}batch {sizes.cnn_batch})",
         cnn, (images, labels), cnn_loss),
        (f"gpt ({sizes.gpt_layers}x{sizes.gpt_d}, ctx {sizes.gpt_ctx}, batch {sizes.gpt_batch})",
         gpt, (tokens[:, :-1], tokens[:, 1:]), gpt_loss),
    ]


# -- one training step per optimizer kind ------------------------------------------------------


class _PairRunner:
    """An SGD step on a model copy of its own, then the contender's step: the two are
    timed back to back, so their ratio is taken under the same machine load."""

    phases = ("sgd", "step")

    def __init__(self, sgd: Callable[[], None], step: Callable[[], None]) -> None:
        self.sgd, self.step = sgd, step

    def pre(self, phase: str) -> None:
        pass

    def run(self, phase: str) -> None:
        (self.sgd if phase == "sgd" else self.step)()


def sgd_step(model: nn.Module, batch, loss_fn, hp: Hyper) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), **hp.sgd_kwargs())

    def step() -> None:
        opt.zero_grad()
        loss_fn(model, batch).backward()
        opt.step()

    return step


def sam_step(model: nn.Module, batch, loss_fn, stepper: SamStepper) -> Callable[[], None]:
    def step() -> None:
        loss_fn(model, batch).backward()
        stepper.first_step()
        loss_fn(model, batch).backward()
        stepper.second_step()

    return step


def sampa_step(model: nn.Module, batch, loss_fn, opt: Any) -> Callable[[], None]:
    def closure() -> Tensor:
        loss = loss_fn(model, batch)
        loss.backward()
        return loss

    return lambda: opt.step(closure)


@dataclass
class E2ERow:
    model: str
    optimizer: str  # "SGD", "SAM", "SAMPa"
    contender: str
    median_s: float
    q1_s: float
    q3_s: float
    repeats: int
    ratio_to_sgd: float | None = None
    samples_s: list[float] = field(default_factory=list, repr=False)


@dataclass
class E2EResult:
    device: str
    sizes: dict[str, int]
    rows: list[E2ERow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_e2e(device: torch.device, contenders: Sequence[Contender], hp: Hyper, budget: Budget,
            timer: Timer, status: Callable[[str], None] = lambda s: None,
            sizes: E2ESizes | None = None, models: Sequence[str] = ("resnet18", "gpt")
            ) -> E2EResult:
    """Time SGD, SAM per contender and SAMPa per contender, interleaved, on each model."""
    sizes = sizes or E2E_SIZES["cuda" if device.type == "cuda" else "cpu"]
    result = E2EResult(str(device), asdict(sizes))
    for c in contenders:
        c.reset()
    for problem in e2e_problems(device, sizes):
        if problem[0].split()[0] in models:
            _run_problem(problem, contenders, hp, budget, timer, status, result)
    return result


def _run_problem(problem: tuple[str, nn.Module, Any, Callable], contenders: Sequence[Contender],
                 hp: Hyper, budget: Budget, timer: Timer, status: Callable[[str], None],
                 result: E2EResult) -> None:
    name, base_model, batch, loss_fn = problem
    short = name.split()[0]
    status(f"e2e {short}: building")
    tasks: list[Task] = []
    kinds: dict[str, tuple[str, str]] = {}

    def add(kind: str, contender: str, make: Callable[[nn.Module], Callable[[], None]]) -> None:
        label = f"{kind} {contender}"
        try:
            # Every contender trains its own copy, next to an SGD copy of its own.
            step = make(copy.deepcopy(base_model))
            sgd = sgd_step(copy.deepcopy(base_model), batch, loss_fn, hp)
        except Exception as e:  # reported, not fatal
            result.notes.append(f"{name}: {label} failed: {type(e).__name__}: {e}"[:300])
            return
        tasks.append(Task(label, [_PairRunner(sgd, step)], _PairRunner.phases))
        kinds[label] = (kind, contender)

    for c in contenders:
        if "sam_step" in c.tasks:
            add("SAM", c.name, lambda m, c=c: sam_step(
                m, batch, loss_fn, c.sam_stepper(list(m.parameters()), hp)))
    for c in contenders:
        if _has_sampa_optimizer(c):
            add("SAMPa", c.name, lambda m, c=c: sampa_step(
                m, batch, loss_fn, c.sampa_optimizer(list(m.parameters()), hp)))

    rounds = [0]

    def on_round() -> None:
        rounds[0] += 1
        status(f"e2e {short}: round {rounds[0]}")

    # At least one untimed round: SAMPa's first call makes no update, compiled
    # contenders compile, and SGD allocates its momentum buffers.
    out = measure_interleaved(tasks, timer, replace(budget, warmup=max(budget.warmup, 1)),
                              on_round)
    result.notes += [f"{name}: {label} failed: {error}" for label, error in out.failed.items()]
    sgd_all = [t for label in out.phases for t in out.phases[label]["sgd"]]
    if sgd_all:
        st = Stats(sgd_all)
        result.rows.append(E2ERow(name, "SGD", "torch.optim.SGD", st.median, st.q1, st.q3,
                                  len(sgd_all), ratio_to_sgd=1.0, samples_s=sgd_all))
    for label, phases in out.phases.items():
        samples = phases["step"]
        if not samples:
            continue
        kind, contender = kinds[label]
        st = Stats(samples)
        result.rows.append(E2ERow(
            name, kind, contender, st.median, st.q1, st.q3, len(samples),
            ratio_to_sgd=paired_ratio(samples, phases["sgd"]), samples_s=list(samples)))


def _has_sampa_optimizer(c: Contender) -> bool:
    return type(c).sampa_optimizer is not Contender.sampa_optimizer
