"""sam_fast.sharpness against models whose Hessian is known.

Tolerances come from the numerics, not from tuning:
- exact claims (Lanczos on an n-dimensional problem, a diagonal Hessian's
  Hutchinson estimate) are checked in float64 to a few hundred ulps of the
  problem's scale, ``C * n * eps * ||H||``;
- stochastic estimates (Hutchinson on a non-diagonal Hessian) are checked
  against bars of 5 standard errors, the standard error computed exactly
  from the known Hessian: Var(vᵀHv) = 2(‖H‖_F² − Σ H_ii²) for Rademacher v.
  With a fixed seed each check is deterministic; 5σ is what a correct
  estimator fails with probability 6e-7 for a random seed.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models import batches, small_cnn
from sam_fast.sharpness import (adaptive_sharpness, hessian_top_eigenvalues, hessian_trace,
                                worst_case_sharpness)

F64_EPS = torch.finfo(torch.float64).eps


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These problems are tiny: on a shared 2-core machine two threads only spin
    against each other (an order of magnitude slower per op under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
Z = 5.0  # standard errors in a stochastic bar


# -- models with a known Hessian --------------------------------------------------------------

class Quadratic(nn.Module):
    """``L(w) = ½ wᵀAw + bᵀw``: Hessian A, gradient ``Aw + b``, anywhere."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor | None = None, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        n = a.shape[0]
        self.register_buffer("a", a)
        self.register_buffer("b", torch.zeros(n, dtype=a.dtype) if b is None else b)
        self.w = nn.Parameter(torch.randn(n, generator=gen, dtype=a.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.w @ self.a @ self.w + self.b @ self.w


def own_output(out, _targets):
    """The quadratic's output is its loss."""
    return out


ONE = (torch.zeros(1), torch.zeros(1))  # a dummy batch for the quadratic


def spd_like(n: int, seed: int, shift: float = 0.0, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(n, n, generator=gen, dtype=dtype)
    return m @ m.T / n - shift * torch.eye(n, dtype=dtype)


def with_spectrum(values: list[float], seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=gen, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(values, dtype=torch.float64)) @ q.T


def hutchinson_sd(h: torch.Tensor) -> float:
    """The exact standard deviation of one Rademacher probe's ``vᵀHv``."""
    return math.sqrt(2 * (float((h * h).sum()) - float((h.diagonal() ** 2).sum())))


def half_mse(out, y):
    return 0.5 * ((out.squeeze(-1) - y) ** 2).mean()


def least_squares(n: int = 40, d: int = 5, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randn(n, generator=gen, dtype=torch.float64)
    model = nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=gen, dtype=torch.float64))
    return model, x, y


def small_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def full_hessian(model: nn.Module, loss_fn, x, y) -> torch.Tensor:
    """The Hessian in all parameters, flattened, by torch.autograd.functional.hessian."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_of(w):
        ps = {n: t.view(s) for n, t, s in zip(names, w.split(sizes), shapes)}
        return loss_fn(torch.func.functional_call(model, ps, (x,)), y)

    return torch.autograd.functional.hessian(loss_of, flat)


def trust_region_max(a: torch.Tensor, g: torch.Tensor, rho: float) -> float:
    """``max_{‖e‖≤ρ} gᵀe + ½eᵀAe`` when A has a positive eigenvalue (boundary solution):
    ``e = (μI − A)⁻¹g`` with ``μ > λ_max`` and ``‖e‖ = ρ``, found by bisection on μ."""
    lam, u = torch.linalg.eigh(a)
    c = u.T @ g
    lo, hi = float(lam[-1]), float(lam[-1]) + float(g.norm()) / rho + 1.0
    for _ in range(200):
        mu = 0.5 * (lo + hi)
        if float(((c / (mu - lam)) ** 2).sum().sqrt()) > rho:
            lo = mu
        else:
            hi = mu
    e = u @ (c / (hi - lam))
    return float(g @ e + 0.5 * e @ a @ e)


# -- Hessian trace -------------------------------------------------------------------------------

def test_trace_of_a_diagonal_hessian_is_exact():
    a = torch.diag(torch.linspace(-1.0, 3.0, 12, dtype=torch.float64))
    r = hessian_trace(Quadratic(a), own_output, ONE, max_probes=30)
    # Every probe gives exactly sum A_ii (v_i² = 1): only summation rounding remains.
    assert abs(r.trace - float(a.trace())) <= 12 * F64_EPS * float(a.abs().sum())
    assert r.stderr <= 12 * F64_EPS * float(a.abs().sum())
    assert r.converged and r.probes == 10  # min_probes: a zero spread meets the rule at once


def test_trace_of_a_quadratic_within_its_standard_error():
    a = spd_like(20, seed=1, shift=0.5)
    r = hessian_trace(Quadratic(a), own_output, ONE, max_probes=400, rtol=0.0, probes_per_pass=50)
    exact_se = hutchinson_sd(a) / math.sqrt(r.probes)
    assert r.probes == 400 and not r.converged and r.passes == 8 and r.hvps == 400
    assert abs(r.trace - float(a.trace())) <= Z * exact_se
    # The reported standard error estimates the exact one; the sample sd's own
    # relative error is about 1/sqrt(2N) (4% at N = 400): 25% is a wide bar.
    assert abs(r.stderr / exact_se - 1) <= 0.25
    assert float(r.samples.mean()) == pytest.approx(r.trace, rel=1e-15)


def test_trace_stopping_rule():
    a = spd_like(20, seed=2)
    r = hessian_trace(Quadratic(a), own_output, ONE, rtol=0.05, max_probes=2000, probes_per_pass=5)
    assert r.converged and r.probes < 2000 and r.probes % 5 == 0
    assert r.stderr <= 0.05 * abs(r.trace)
    # The rule did not stop early: one block fewer had not met it.
    prev = r.samples[:-5]
    assert float(prev.std()) / math.sqrt(prev.numel()) > 0.05 * abs(float(prev.mean()))


def test_trace_of_least_squares_over_batches():
    model, x, y = least_squares(n=40, d=6)
    h = x.T @ x / 40
    # Unequal batches: the Hessian is that of the mean over all 40 examples.
    data = [(x[:7], y[:7]), (x[7:30], y[7:30]), (x[30:], y[30:])]
    r = hessian_trace(model, half_mse, data, max_probes=300, rtol=0.0, probes_per_pass=30)
    assert abs(r.trace - float(h.trace())) <= Z * hutchinson_sd(h) / math.sqrt(300)
    # Same probes on one concatenated batch: the same values, to rounding.
    one = hessian_trace(model, half_mse, (x, y), max_probes=300, rtol=0.0, probes_per_pass=30)
    assert torch.allclose(r.samples, one.samples, rtol=0, atol=100 * F64_EPS * float(h.abs().sum()))


def test_trace_of_a_network_vs_the_full_hessian():
    model = small_mlp()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    h = full_hessian(model, loss_fn, x, y)
    r = hessian_trace(model, loss_fn, (x, y), max_probes=400, rtol=0.0, probes_per_pass=40)
    assert abs(r.trace - float(h.trace())) <= Z * hutchinson_sd(h) / math.sqrt(400)
    looped = hessian_trace(model, loss_fn, (x, y), max_probes=40, rtol=0.0, probes_per_pass=40,
                           batched=False)
    # The vmapped and the looped double backward compute the same products.
    assert torch.allclose(r.samples[:40], looped.samples, rtol=1e-12, atol=1e-12)


# -- top eigenvalues -----------------------------------------------------------------------------

def _spectral_tol(a: torch.Tensor) -> float:
    # Lanczos with full reorthogonalisation is backward stable: eigenvalue errors
    # of order n * eps * ||A||; 100 covers the constants.
    return 100 * a.shape[0] * F64_EPS * float(torch.linalg.matrix_norm(a, 2))


def test_eigenvalues_of_a_quadratic_are_exact():
    a = spd_like(15, seed=4, shift=1.0)  # indefinite: "largest" and "magnitude" differ
    exact = torch.linalg.eigvalsh(a)
    r = hessian_top_eigenvalues(Quadratic(a), own_output, ONE, k=4, tol=0.0)
    assert torch.allclose(r.eigenvalues, exact.flip(0)[:4], rtol=0, atol=_spectral_tol(a))
    assert r.converged and r.passes == r.iterations == r.hvps == 15
    mag = hessian_top_eigenvalues(Quadratic(a), own_output, ONE, k=3, which="magnitude", tol=0.0)
    want = exact[exact.abs().argsort(descending=True)[:3]]
    assert torch.allclose(mag.eigenvalues, want, rtol=0, atol=_spectral_tol(a))


def test_repeated_eigenvalues_are_all_found():
    # One Krylov space holds a repeated eigenvalue once; the restart finds the others.
    a = with_spectrum([5.0, 5.0, 5.0, 2.0, 1.0, 0.5, -1.0, 0.0])
    r = hessian_top_eigenvalues(Quadratic(a), own_output, ONE, k=4, tol=0.0)
    want = torch.tensor([5.0, 5.0, 5.0, 2.0], dtype=torch.float64)
    assert torch.allclose(r.eigenvalues, want, rtol=0, atol=_spectral_tol(a))


def test_eigenvalues_of_least_squares_and_eigenvectors():
    model, x, y = least_squares(n=50, d=8, seed=5)
    h = x.T @ x / 50
    data = [(x[:20], y[:20]), (x[20:], y[20:])]
    r = hessian_top_eigenvalues(model, half_mse, data, k=2, tol=0.0, return_eigenvectors=True)
    assert torch.allclose(r.eigenvalues, torch.linalg.eigvalsh(h).flip(0)[:2], rtol=0,
                          atol=_spectral_tol(h))
    for lam, (vec,) in zip(r.eigenvalues, r.eigenvectors):
        v = vec.reshape(-1)
        assert vec.shape == model.weight.shape
        assert float(v.norm()) == pytest.approx(1.0, abs=1e-12)
        assert torch.allclose(h @ v, lam * v, atol=_spectral_tol(h))


def test_eigenvalues_of_a_network_vs_the_full_hessian():
    model = small_mlp(seed=1)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    h = full_hessian(model, loss_fn, x, y)
    exact = torch.linalg.eigvalsh(h).flip(0)
    r = hessian_top_eigenvalues(model, loss_fn, (x, y), k=3, tol=1e-10, max_iter=h.shape[0])
    assert r.converged
    # Stopped on the residual bound |θ − λ| ≤ ‖Hx − θx‖ (≤ tol·max|θ|), plus rounding.
    bound = r.residuals.max() + _spectral_tol(h)
    assert torch.allclose(r.eigenvalues, exact[:3], rtol=0, atol=float(bound))


def test_float32_eigenvalues():
    a = with_spectrum([4.0, 3.0, 1.0, 0.5, 0.25, 0.1]).float()
    r = hessian_top_eigenvalues(Quadratic(a), own_output, ONE, k=2)
    eps32 = torch.finfo(torch.float32).eps
    assert torch.allclose(r.eigenvalues, torch.tensor([4.0, 3.0], dtype=torch.float64),
                          rtol=0, atol=100 * 6 * eps32 * 4.0)


# -- worst-case and adaptive sharpness ---------------------------------------------------------

def test_worst_case_sharpness_of_a_quadratic_is_the_trust_region_maximum():
    a = spd_like(10, seed=7, shift=0.3)
    q = Quadratic(a, b=torch.linspace(-1, 1, 10, dtype=torch.float64), seed=8)
    g = (a @ q.w + q.b).detach()
    rho = 0.3
    exact = trust_region_max(a, g, rho)
    r = worst_case_sharpness(q, own_output, ONE, rho=rho, steps=100)
    one_step = worst_case_sharpness(q, own_output, ONE, rho=rho, steps=1)
    # Every reported value is L at a point of the ball: never above the maximum.
    assert r.sharpness <= exact + 1e-12 and one_step.sharpness <= r.sharpness
    assert r.sharpness == pytest.approx(exact, rel=1e-6)
    assert r.evaluations == r.passes == 101 and r.chunks == 1


def test_worst_case_sharpness_at_a_critical_point():
    # g = 0: the ascent starts from a random direction; the maximum is ½ρ²λ_max.
    a = with_spectrum([3.0, 1.0, 0.5, -2.0])
    q = Quadratic(a)
    with torch.no_grad():
        q.w.zero_()
    r = worst_case_sharpness(q, own_output, ONE, rho=0.5, steps=200)
    assert r.sharpness == pytest.approx(0.5 * 0.25 * 3.0, rel=1e-6)


def test_m_sharpness_of_least_squares():
    model, x, y = least_squares(n=12, d=3, seed=9)
    w = model.weight.detach().reshape(-1)
    rho = 0.2
    # Per example i: L_i(w + e) − L_i(w) = r_i x_iᵀe + ½(x_iᵀe)², maximised at
    # e = ±ρ x_i/‖x_i‖ with the sign of r_i: |r_i| ρ‖x_i‖ + ½ρ²‖x_i‖².
    resid = x @ w - y
    per = resid.abs() * rho * x.norm(dim=1) + 0.5 * rho ** 2 * x.norm(dim=1) ** 2
    r = worst_case_sharpness(model, half_mse, [(x[:5], y[:5]), (x[5:], y[5:])], rho=rho, m=1,
                             steps=30)
    assert r.chunks == 12 and r.m == 1
    assert r.sharpness == pytest.approx(float(per.mean()), rel=1e-9)
    # m = the batch size is the whole-batch ascent; m=None the same on one batch.
    whole = worst_case_sharpness(model, half_mse, (x, y), rho=rho, steps=30)
    m_all = worst_case_sharpness(model, half_mse, (x, y), rho=rho, steps=30, m=12)
    assert m_all.sharpness == whole.sharpness
    h = x.T @ x / 12
    assert whole.sharpness == pytest.approx(trust_region_max(h, h @ w - x.T @ y / 12, rho),
                                            rel=1e-6)


def test_adaptive_sharpness_is_the_scaled_trust_region_maximum():
    a = spd_like(8, seed=10, shift=0.2)
    q = Quadratic(a, b=torch.ones(8, dtype=torch.float64), seed=11)
    w = q.w.detach()
    eta, rho = 0.1, 0.2
    t = w.abs() + eta
    # With e = t ⊙ δ: gradient t ⊙ g and Hessian T A T in δ, in the plain ball.
    exact = trust_region_max(t[:, None] * a * t[None, :], t * (a @ w + q.b), rho)
    r = adaptive_sharpness(q, own_output, ONE, rho=rho, eta=eta, steps=100)
    assert r.sharpness <= exact + 1e-12
    assert r.sharpness == pytest.approx(exact, rel=1e-6)


def test_adaptive_sharpness_ignores_relu_rescaling():
    torch.manual_seed(12)
    net = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    scaled = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2)).double()
    c = 4.0
    with torch.no_grad():  # layer 1 up by c, layer 2 down by c: the same function
        scaled[0].weight.copy_(net[0].weight * c)
        scaled[0].bias.copy_(net[0].bias * c)
        scaled[2].weight.copy_(net[2].weight / c)
        scaled[2].bias.copy_(net[2].bias)
    gen = torch.Generator().manual_seed(13)
    data = (torch.randn(20, 5, generator=gen, dtype=torch.float64),
            torch.randint(0, 2, (20,), generator=gen))
    loss_fn = nn.CrossEntropyLoss()
    kw = dict(rho=0.05, steps=10)
    params = lambda m: [m[0].weight, m[0].bias, m[2].weight]  # noqa: E731  (the scaled ones)
    a1 = adaptive_sharpness(net, loss_fn, data, params=params(net), **kw)
    a2 = adaptive_sharpness(scaled, loss_fn, data, params=params(scaled), **kw)
    assert a2.sharpness == pytest.approx(a1.sharpness, rel=1e-9)
    w1 = worst_case_sharpness(net, loss_fn, data, params=params(net), **kw)
    w2 = worst_case_sharpness(scaled, loss_fn, data, params=params(scaled), **kw)
    assert abs(w2.sharpness / w1.sharpness - 1) > 0.1  # the plain ball is not invariant


# -- what every measurement guarantees ---------------------------------------------------------

def _snapshot(model):
    return ([p.detach().clone() for p in model.parameters()],
            [b.clone() for b in model.buffers()],
            [m.training for m in model.modules()])


def _assert_same(model, snap):
    params, buffers, modes = snap
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), params))
    assert all(torch.equal(b, s) for b, s in zip(model.buffers(), buffers))
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())


MEASURES = {
    "trace": lambda m, d, **kw: hessian_trace(m, nn.CrossEntropyLoss(), d, max_probes=4,
                                              probes_per_pass=2, **kw),
    "eigen": lambda m, d, **kw: hessian_top_eigenvalues(m, nn.CrossEntropyLoss(), d, k=1,
                                                        max_iter=4, **kw),
    "worst": lambda m, d, **kw: worst_case_sharpness(m, nn.CrossEntropyLoss(), d, rho=0.05,
                                                     steps=3, **kw),
    "m-sharp": lambda m, d, **kw: worst_case_sharpness(m, nn.CrossEntropyLoss(), d, rho=0.05,
                                                       steps=2, m=4, **kw),
    "adaptive": lambda m, d, **kw: adaptive_sharpness(m, nn.CrossEntropyLoss(), d, rho=0.05,
                                                      steps=3, **kw),
}


@pytest.mark.parametrize("eval_mode", [True, False])
@pytest.mark.parametrize("name", sorted(MEASURES))
def test_model_left_bit_for_bit_and_repeatable(name, eval_mode):
    model = small_cnn(0)
    model.train()
    data = batches(2)
    snap = _snapshot(model)
    rng = torch.get_rng_state()
    first = MEASURES[name](model, data, eval_mode=eval_mode, seed=3)
    _assert_same(model, snap)  # parameters, BatchNorm statistics, modes, .grad
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is not drawn from
    again = MEASURES[name](model, iter(data), eval_mode=eval_mode, seed=3)  # a one-shot iterator
    assert repr(first) == repr(again)


def test_seed_changes_the_probes():
    model = small_cnn(0)
    a = hessian_trace(model, nn.CrossEntropyLoss(), batches(1), max_probes=4, seed=0)
    b = hessian_trace(model, nn.CrossEntropyLoss(), batches(1), max_probes=4, seed=1)
    assert not torch.equal(a.samples, b.samples)


def test_progress_bar_can_be_shown_and_hidden(capsys):
    pytest.importorskip("tqdm")
    a = spd_like(6, seed=14)
    hessian_trace(Quadratic(a), own_output, ONE, max_probes=4, progress=True)
    assert "hessian trace" in capsys.readouterr().err
    hessian_trace(Quadratic(a), own_output, ONE, max_probes=4, progress=False)
    assert capsys.readouterr().err == ""


# -- bad input, refused before any work ------------------------------------------------------

class CountingModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        return self.lin(x)


GOOD = (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))


@pytest.mark.parametrize("call, match", [
    (lambda m: worst_case_sharpness(m, nn.CrossEntropyLoss(), GOOD, rho=0.0), "rho"),
    (lambda m: worst_case_sharpness(m, nn.CrossEntropyLoss(), GOOD, rho=-1.0), "rho"),
    (lambda m: adaptive_sharpness(m, nn.CrossEntropyLoss(), GOOD, rho=float("nan")), "rho"),
    (lambda m: adaptive_sharpness(m, nn.CrossEntropyLoss(), GOOD, rho=0.1, eta=-1), "eta"),
    (lambda m: worst_case_sharpness(m, nn.CrossEntropyLoss(), GOOD, rho=0.1, m=0), "m must"),
    (lambda m: worst_case_sharpness(m, nn.CrossEntropyLoss(), GOOD, rho=0.1, steps=0), "steps"),
    (lambda m: hessian_top_eigenvalues(m, nn.CrossEntropyLoss(), GOOD, k=9), "larger than the "
                                                                            "number of param"),
    (lambda m: hessian_top_eigenvalues(m, nn.CrossEntropyLoss(), GOOD, k=0), "k must"),
    (lambda m: hessian_top_eigenvalues(m, nn.CrossEntropyLoss(), GOOD, which="x"), "which"),
    (lambda m: hessian_trace(m, nn.CrossEntropyLoss(), GOOD, max_probes=0), "max_probes"),
    (lambda m: hessian_trace(m, nn.CrossEntropyLoss(), GOOD, params=[]), "no parameters"),
    (lambda m: hessian_trace(m, nn.CrossEntropyLoss(), [], max_probes=2), "empty"),
    (lambda m: hessian_trace(m, nn.CrossEntropyLoss(), iter([]), max_probes=2), "empty"),
    (lambda m: hessian_trace(m, nn.CrossEntropyLoss(), torch.zeros(3)), "not a single tensor"),
])
def test_bad_input_is_refused_before_any_work(call, match):
    model = CountingModel()
    with pytest.raises((ValueError, TypeError), match=match):
        call(model)
    assert model.forwards == 0


@pytest.mark.parametrize("call", [
    lambda m, f: hessian_trace(m, f, GOOD),
    lambda m, f: hessian_top_eigenvalues(m, f, GOOD),
    lambda m, f: worst_case_sharpness(m, f, GOOD, rho=0.1),
])
def test_a_loss_that_is_not_a_scalar(call):
    model = CountingModel()
    with pytest.raises(ValueError, match="must be a scalar"):
        call(model, nn.CrossEntropyLoss(reduction="none"))
    assert model.forwards == 1  # the one check, then nothing


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    model = small_mlp(seed=2)
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=gen)
    loss_fn = nn.CrossEntropyLoss()
    cpu = hessian_trace(model, loss_fn, (x, y), max_probes=20, rtol=0)
    eig_cpu = hessian_top_eigenvalues(model, loss_fn, (x, y), k=2)
    wc_cpu = worst_case_sharpness(model, loss_fn, (x, y), rho=0.1, steps=5)
    model.cuda()  # the data stays on the CPU: batches follow the parameters
    gpu = hessian_trace(model, loss_fn, (x, y), max_probes=20, rtol=0)
    eig_gpu = hessian_top_eigenvalues(model, loss_fn, (x, y), k=2)
    wc_gpu = worst_case_sharpness(model, loss_fn, (x, y), rho=0.1, steps=5)
    # The probes are drawn on the CPU: the same on both devices, so the values agree to rounding.
    assert torch.allclose(cpu.samples, gpu.samples, rtol=1e-10, atol=1e-12)
    assert torch.allclose(eig_cpu.eigenvalues, eig_gpu.eigenvalues, rtol=1e-8)
    assert wc_gpu.sharpness == pytest.approx(wc_cpu.sharpness, rel=1e-8)


# -- the paper examples, at a reduced size -------------------------------------------------------

PAPERS = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "papers"


def _load_example(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"paper_{name}", PAPERS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _plot_args(tmp_path) -> list[str]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return ["--no-plot"]
    return ["--out", str(tmp_path / "figure.png")]


def _fake_digits():
    """A digits-shaped stand-in for a machine without scikit-learn (64 features, 10 classes)."""
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 10
    return torch.rand(300, 64, generator=gen) + 0.5 * torch.nn.functional.one_hot(y, 64), y


@pytest.mark.parametrize("name", ["chen2023_two_patch", "wen2023_xor", "shin2023_width"])
def test_paper_example_smoke(name, tmp_path, capsys):
    module = _load_example(name)
    argv = ["--quick", "--threads", "1", *_plot_args(tmp_path)]
    if name == "shin2023_width":
        import importlib.util
        digits = module.load_digits if importlib.util.find_spec("sklearn") else _fake_digits
        module.main(argv, digits=digits)
    else:
        module.main(argv)
    out = capsys.readouterr().out
    assert out.count("|") > 10  # the table was printed
    if "--out" in argv:
        assert (tmp_path / "figure.png").stat().st_size > 0
