"""Gradient accumulation and gradient clipping with SAM in a plain PyTorch loop.

The recipes (README, "Gradient accumulation and clipping"):

- accumulation over k micro-batches: accumulate the first pass over all k (each
  mean-reduced loss scaled by 1/k), ``first_step``, accumulate the second pass over
  the same k at ``w + e``, ``second_step``. That is SAM on the concatenated batch.
- clipping: before ``second_step`` (the usual place: it bounds the step); after the
  first backward a global-norm clip scales every gradient by one factor, which SAM's
  normalised perturbation ``rho g / ||g||`` does not see (USAM's ``rho g`` does).
- with GradScaler, ``scaler.unscale_(opt)`` only after the second backward.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sam_fast

K = 4  # micro-batches
MICRO = 4  # examples per micro-batch
STEPS = 3
RHO = 0.05


def _net(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    # Smooth (tanh): float32 trajectories stay close to the float64 ones (tests/models.py).
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).to(dtype)


def _data(dtype: torch.dtype, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(K * MICRO, 6, generator=gen).to(dtype),
             torch.randint(0, 4, (K * MICRO,), generator=gen)) for _ in range(STEPS)]


def _loss(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def _micro(x, y):
    return zip(x.split(MICRO), y.split(MICRO))


def _opt(model, **kwargs):
    return sam_fast.SAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=0.1, momentum=0.9,
                        **kwargs)


def _full_batch(dtype):
    model = _net(dtype)
    opt = _opt(model)
    for x, y in _data(dtype):
        _loss(model, x, y).backward()
        opt.first_step(zero_grad=True)
        _loss(model, x, y).backward()
        opt.second_step(zero_grad=True)
    return [p.detach().clone() for p in model.parameters()]


def _accumulated(dtype, *, perturb_from_last_only: bool = False):
    model = _net(dtype)
    opt = _opt(model)
    for x, y in _data(dtype):
        for i, (xm, ym) in enumerate(_micro(x, y)):
            if perturb_from_last_only and i < K - 1:
                continue  # the mistake the recipe avoids (what a Trainer's micro-step sees)
            (_loss(model, xm, ym) / K).backward()
        opt.first_step(zero_grad=True)
        for xm, ym in _micro(x, y):
            (_loss(model, xm, ym) / K).backward()
        opt.second_step(zero_grad=True)
    return [p.detach().clone() for p in model.parameters()]


def _max_diff(a, b) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def test_accumulation_equals_the_concatenated_batch():
    """Summing K mean-reduced micro-batch gradients scaled by 1/K is the full batch's
    mean gradient up to the order of the additions. In float64 that reassociation costs
    ~1e-16 relative per sum, so after 3 steps the runs agree far inside 1e-12; in float32
    the same reassociation is ~1e-7 relative, and the bar 1e-5 (weights are O(1), about
    80 float32 ulps) leaves room for its growth over 3 steps of lr 0.1 on a smooth model.
    Perturbing from one micro-batch (the mistake) misses by orders more than either bar."""
    assert _max_diff(_accumulated(torch.float64), _full_batch(torch.float64)) < 1e-12
    full32 = _full_batch(torch.float32)
    assert _max_diff(_accumulated(torch.float32), full32) < 1e-5
    wrong = _max_diff(_accumulated(torch.float32, perturb_from_last_only=True), full32)
    assert wrong > 1e-3


def _run_clipped(dtype, *, first: str | None, second: float | None, normalize: bool = True,
                 scaler: bool = False):
    """SAM steps with optional clipping after the first backward (``first``: "norm" for
    a global-norm clip to 0.1, "value" for clip_grad_value_ 0.01) and/or before
    second_step (``second``: the max norm), optionally through a GradScaler."""
    model = _net(dtype)
    opt = _opt(model, normalize=normalize)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if scaler else None

    def backward(loss):
        (grad_scaler.scale(loss) if scaler else loss).backward()

    for x, y in _data(dtype):
        backward(_loss(model, x, y))
        if first == "norm":
            assert not scaler  # unscale_ before first_step is refused (test below)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        elif first == "value":
            torch.nn.utils.clip_grad_value_(model.parameters(), 0.01)
        opt.first_step(zero_grad=True, grad_scaler=grad_scaler)
        backward(_loss(model, x, y))
        if scaler:
            grad_scaler.unscale_(opt)
        if second is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), second)
        if scaler:
            grad_scaler.step(opt)
            grad_scaler.update()
            opt.zero_grad()
        else:
            opt.second_step(zero_grad=True)
    return [p.detach().clone() for p in model.parameters()]


def _oracle(dtype, *, first: str | None, second: float | None, normalize: bool = True):
    """The same SAM by hand with torch.func: e = rho g / ||g|| (or rho g), the gradient at
    w + e, the clip, then SGD with momentum, none of it through sam_fast."""
    model = _net(dtype)
    names = [n for n, _ in model.named_parameters()]
    w = [p.detach().clone() for p in model.parameters()]
    bufs: list[torch.Tensor] | None = None

    def grads_at(ws, x, y):
        params = {n: t.detach().requires_grad_() for n, t in zip(names, ws)}
        loss = _loss(lambda inp: torch.func.functional_call(model, params, (inp,)), x, y)
        return list(torch.autograd.grad(loss, list(params.values())))

    def clip_norm(gs, max_norm):
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in gs]))
        factor = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return [g * factor for g in gs]

    for x, y in _data(dtype):
        g = grads_at(w, x, y)
        if first == "norm":
            g = clip_norm(g, 0.1)
        elif first == "value":
            g = [t.clamp(-0.01, 0.01) for t in g]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g]))
        scale = RHO / (norm + 1e-12) if normalize else RHO
        g2 = grads_at([a + scale * b for a, b in zip(w, g)], x, y)
        if second is not None:
            g2 = clip_norm(g2, second)
        bufs = [t.clone() for t in g2] if bufs is None else [
            0.9 * b + t for b, t in zip(bufs, g2)]
        w = [a - 0.1 * b for a, b in zip(w, bufs)]
    return w


# (first-pass clip, second-pass clip, normalize)
CASES = [
    (None, 0.05, True),     # the usual: clip the gradient that steps
    ("norm", None, True),   # a global-norm clip before first_step: SAM does not see it
    ("norm", 0.05, True),
    ("norm", None, False),  # USAM sees it: e = rho * clipped g
    ("value", None, True),  # an elementwise clip changes the direction
]


@pytest.mark.parametrize("first,second,normalize", CASES)
def test_clipping_matches_the_oracle(first, second, normalize):
    """float64, so that the bar can be tight: the only differences are the order of the
    norm's additions (~1e-16 relative), far inside 1e-10 after 3 steps."""
    got = _run_clipped(torch.float64, first=first, second=second, normalize=normalize)
    want = _oracle(torch.float64, first=first, second=second, normalize=normalize)
    assert _max_diff(got, want) < 1e-10
    # the clip mattered here (the comparison could fail), except where SAM ignores it
    unclipped = _oracle(torch.float64, first=None, second=None, normalize=normalize)
    if (first, second, normalize) == ("norm", None, True):
        assert _max_diff(got, unclipped) < 1e-10
    else:
        assert _max_diff(got, unclipped) > 1e-6


def test_grad_scaler_with_clipping_equals_unscaled():
    """GradScaler with a power-of-two scale and no overflow: scaling the loss and
    unscaling the gradients are exact in float32, so the second gradients, the clip and
    the step are the unscaled run's. The perturbation is computed from the scaled
    gradients and the scale (grad_scaler=); where SAM's eps enters relative to the
    scale can move e by an ulp, so the bar is 1e-6 (weights O(1)), not equality. The
    clip is active (the unclipped run is far away)."""
    scaled = _run_clipped(torch.float32, first=None, second=0.05, scaler=True)
    plain = _run_clipped(torch.float32, first=None, second=0.05)
    assert _max_diff(scaled, plain) < 1e-6
    assert _max_diff(plain, _run_clipped(torch.float32, first=None, second=None)) > 1e-4


def test_unscale_before_first_step_is_refused():
    model = _net(torch.float32)
    opt = _opt(model)
    scaler = torch.amp.GradScaler("cpu")
    x, y = _data(torch.float32)[0]
    scaler.scale(_loss(model, x, y)).backward()
    scaler.unscale_(opt)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="unscale_"):
        opt.first_step(grad_scaler=scaler)
    assert _max_diff([p.detach() for p in model.parameters()], before) == 0
