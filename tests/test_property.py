"""Property-based test of SAM (Hypothesis): random param-group structures, shapes,
dtypes, missing gradients and base-optimizer options.

Each example builds the same parameters once per backend, drives a few SAM steps
with gradients of a known smooth loss, and checks:

- every backend available here against the ``torch`` backend (the executable
  specification), within the rounding bars derived below;
- the ``torch`` backend's fused restore+step against ``torch.optim``'s own step
  (the fallback path, forced by a subclass of the base optimizer), bit for bit
  for float32/float64 weights, as the README claims;
- every backend against a float64 oracle written from docs/design.md section 2 and
  the textbook optimizer formulas (``tests/oracle.py``), for float32/float64;
- the bit-exact restore: after ``first_step`` + ``restore()``, and for every
  parameter ``second_step`` does not step (no gradient in the second pass), the
  weights equal the originals bit for bit; parameters without a first gradient
  are not moved by ``first_step``.

Semantics (issue 10, torch.optim's): a parameter whose gradient appears only in
the second pass is stepped (its ``e`` is zero); one without a gradient in the
second pass is restored and not stepped; one with no gradient at all is left
alone (and its optimizer state untouched).

Views of one buffer. Parameters that are disjoint views of one storage (the two
halves, or the even and odd elements, of one buffer) are separate parameters
that share no element: every backend must treat them exactly as independent
tensors, which is what this test checks. Views that share elements (or the same
tensor listed twice) have no per-element meaning for SAM (``e`` would be added
twice, one backup would be overwritten by the other); issue 10 case 5 asks the
library to refuse them at construction or follow torch.optim, and
``test_overlapping_parameters_are_refused_or_follow_torch_optim`` checks that.

The loss. Parameter ``i`` has the gradient ``g_i(w) = a_i * w_i + b_i`` with
``a_i`` in [0.1, 0.3] and ``|b_i|`` in [1, 2], computed in float64 from the
stored weights and rounded once to the parameter's dtype. Its weights stay in
[-2, 2] over the few steps drawn (|w0| <= 1, each step moves a weight by at most
lr * |d| <= 0.1 * 4, e by at most rho * T <= 0.5 * 2), so ``|g| >= 0.4``: no
gradient element is near zero, and Adam, which divides by ``|g|``, amplifies
rounding by at most ~1/0.4. The loss is smooth (no kinks), so rounding errors
propagate continuously and the bars below do not depend on the machine.

Bars (per element, after step k = 1, 2, ..., scale ``|reference| + 1``):
``(C + N) * k * u`` with ``u`` the unit roundoff of the dtype the comparison
is limited by. Per step a weight sees at most ~20 roundings of quantities of
size <= |w| + 1 (the perturbation: 3-4; the gradient: 1, plus 0.3x the error
of ``w + e``; SGD: <= 7 with weight decay, momentum, nesterov; Adam: <= 12 on an
update of size lr * |m / sqrt(v)| <= 0.4, amplified <= 2.5x by the division),
so C = 64 covers it with room; the global norm is accumulated in float32 over
N elements, whose worst-case relative error is N * u (docs/design.md: fp32
accumulation; any order of summation is within that), and it scales ``e``,
hence the ``+ N``. The map from one step's weights to the next has Lipschitz
constant <= 1 + lr * 0.3 * 2.5 < 1.1, so errors of successive steps add (the
factor k). bfloat16/float16 weights are rounded to their dtype at every step:
two backends whose float32 math differs in the last bits may round to adjacent
half-precision values, so the bar is 16 * k half-precision unit roundoffs (torch.optim's own
step on half-precision weights rounds ~8 times per step, the fused ops once or twice). An algorithmic slip
(a missing step, a wrong rho, a parameter stepped twice) moves a weight by at
least ~lr * 0.4 = 4e-3 or rho * 0.4 / sqrt(N) >= 1e-3, far above every bar
for float32/float64.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch

import oracle
from sam_fast import SAM, dispatch

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is a test dependency")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

BACKENDS = [b for b in dispatch.registered_backends() if dispatch.why_unavailable(b, "cpu") is None]
HALF = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
KINDS = ("0d", "empty", "one", "prime", "matrix", "noncontig", "channels_last", "halves",
         "interleaved")
SHAPES = {"0d": (), "empty": (0, 3), "one": (1,), "prime": (7,), "matrix": (3, 5)}
PATTERNS = ("both", "first", "none")  # + "second": gradient only in the second pass

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# -- what an example is ----------------------------------------------------------------------


@dataclasses.dataclass
class Spec:
    base: str  # "sgd", "adam", "adamw"
    base_kw: dict
    groups: list  # per group: dict(options=..., kinds=[(kind, dtype)])
    patterns: list  # per parameter (flattened, in group order), per step: a PATTERN
    steps: int
    seed: int


def _n_params(kinds) -> int:
    return sum(2 if k in ("halves", "interleaved") else 1 for k, _ in kinds)


@st.composite
def specs(draw, patterns=PATTERNS, force_second=False):
    base = draw(st.sampled_from(("sgd", "adam", "adamw")))
    if base == "sgd":
        momentum = draw(st.sampled_from((0.0, 0.5, 0.9)))
        nesterov = momentum > 0 and draw(st.booleans())
        base_kw = dict(momentum=momentum, nesterov=nesterov,
                       dampening=0.0 if nesterov else draw(st.sampled_from((0.0, 0.3))),
                       maximize=draw(st.booleans()))
    else:
        base_kw = dict(amsgrad=draw(st.booleans()), maximize=draw(st.booleans()),
                       betas=draw(st.sampled_from(((0.9, 0.999), (0.8, 0.99)))),
                       eps=draw(st.sampled_from((1e-8, 1e-3))))
    mixed = draw(st.booleans())
    group_dtype = draw(st.sampled_from(DTYPES))
    groups = []
    for _ in range(draw(st.integers(1, 3))):
        options = dict(
            lr=draw(st.sampled_from((0.01, 0.1))),
            weight_decay=draw(st.sampled_from((0.0, 1e-2, 0.1))),
            rho=draw(st.sampled_from((0.0, 0.05, 0.5))),
            adaptive=draw(st.booleans()),
            eta=draw(st.sampled_from((0.0, 0.01))),
            normalize=draw(st.booleans()),
            perturb_eps=draw(st.sampled_from((1e-12, 1e-3))),
        )
        n = draw(st.integers(1, 3))
        kinds = [(draw(st.sampled_from(KINDS)),
                  draw(st.sampled_from(DTYPES)) if mixed else group_dtype) for _ in range(n)]
        groups.append(dict(options=options, kinds=kinds))
    steps = draw(st.integers(1, 3))
    n_params = sum(_n_params(g["kinds"]) for g in groups)
    pats = [[draw(st.sampled_from(patterns)) for _ in range(steps)] for _ in range(n_params)]
    if force_second:
        if n_params == 1:  # a second parameter to carry the first pass's gradient
            groups[0]["kinds"].append(("one", groups[0]["kinds"][0][1]))
            pats.append(["both"] * steps)
            n_params = 2
        i, k = draw(st.integers(0, n_params - 1)), draw(st.integers(0, steps - 1))
        pats[i][k] = "second"
    # Every group gets a first-pass gradient at every step: first_step needs one somewhere
    # (else it raises, as documented); a group without any beside an adaptive one is
    # test_group_without_gradients_beside_an_adaptive_group below.
    for gi, g in enumerate(groups):
        start = sum(_n_params(h["kinds"]) for h in groups[:gi])
        idx = range(start, start + _n_params(g["kinds"]))
        for k in range(steps):
            if not any(pats[i][k] in ("both", "first") for i in idx):
                j = next((i for i in idx if pats[i][k] != "second"), None)
                if j is None:  # the group's only parameter is the forced "second" one
                    g["kinds"].append(("one", g["kinds"][0][1]))
                    pats.insert(idx.stop, ["both"] * steps)
                    break
                pats[j][k] = "both"
    return Spec(base, base_kw, groups, pats, steps, draw(st.integers(0, 2**16)))


# -- building and running it -------------------------------------------------------------------


def _tensor(kind, dtype, gen):
    """Weights uniform in [-1, 1] (float64 drawn, rounded once), in the layout of ``kind``."""
    def draw(*shape):
        return (torch.rand(shape, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)

    if kind in SHAPES:
        return [draw(*SHAPES[kind])]
    if kind == "noncontig":
        return [draw(5, 3).t()]  # a transposed view: strides (1, 3)
    if kind == "channels_last":
        return [draw(2, 3, 2, 2).contiguous(memory_format=torch.channels_last)]
    buf = draw(10)  # two disjoint views of one buffer
    return [buf[:5], buf[5:]] if kind == "halves" else [buf[0::2], buf[1::2]]


def build(spec: Spec):
    """Fresh parameters (same bits every call), their loss coefficients, and the groups."""
    gen = torch.Generator().manual_seed(spec.seed)
    params, coeffs, groups = [], [], []
    for g in spec.groups:
        ps = []
        for kind, dtype in g["kinds"]:
            for t in _tensor(kind, dtype, gen):
                p = torch.nn.Parameter(t)  # aliases t (so views stay views of one buffer)
                a = torch.rand(t.shape, generator=gen, dtype=torch.float64) * 0.2 + 0.1
                sign = torch.randint(0, 2, t.shape, generator=gen).double() * 2 - 1
                b = sign * (torch.rand(t.shape, generator=gen, dtype=torch.float64) + 1)
                ps.append(p)
                coeffs.append((a, b))
        params.extend(ps)
        groups.append(dict(params=ps, **g["options"]))
    return params, coeffs, groups


def grad_of(p, coeff):
    a, b = coeff
    return (a * p.detach().double() + b).to(p.dtype)


BASES = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
UNFUSED = {name: type(f"Unfused{cls.__name__}", (cls,), {}) for name, cls in BASES.items()}


def snap(params):
    return [p.detach().clone() for p in params]


def assert_bits(got, want, what):
    for i, (x, y) in enumerate(zip(got, want)):
        assert x.dtype == y.dtype and x.shape == y.shape, (what, i)
        assert torch.equal(x, y) or (x.numel() == 0), f"{what}: parameter {i} is not bit-exact"


def run(spec: Spec, backend: str, fused: bool = True):
    """SAM on the example; the weights after each first_step and each second_step, and the
    base optimizer's state per parameter at the end."""
    params, coeffs, groups = build(spec)
    base = BASES[spec.base] if fused else UNFUSED[spec.base]
    opt = SAM(groups, base, backend=backend, **spec.base_kw)
    out = []
    for k in range(spec.steps):
        pats = [p[k] for p in spec.patterns]
        before = snap(params)
        for p, c, pat in zip(params, coeffs, pats):
            p.grad = grad_of(p, c) if pat in ("both", "first") else None
        opt.first_step()
        perturbed = snap(params)
        opt.restore()
        assert_bits(snap(params), before, f"{backend}: step {k}: first_step + restore()")
        opt.first_step()
        assert_bits(snap(params), perturbed, f"{backend}: step {k}: first_step after restore()")
        for i, pat in enumerate(pats):
            if pat in ("none", "second"):
                assert torch.equal(params[i], before[i]), (
                    f"{backend}: step {k}: first_step moved parameter {i}, which has no gradient")
        for p, c, pat in zip(params, coeffs, pats):
            p.grad = grad_of(p, c) if pat in ("both", "second") else None
        opt.second_step()
        after = snap(params)
        for i, pat in enumerate(pats):
            if pat in ("none", "first"):
                assert torch.equal(after[i], before[i]), (
                    f"{backend}: step {k}: parameter {i} has no second gradient: it must be "
                    f"restored bit for bit and not stepped")
        out.append((perturbed, after))
    state = [{key: torch.as_tensor(v).clone() for key, v in opt.base_optimizer.state[p].items()}
             for p in params]
    return out, state


def oracle_run(spec: Spec):
    """The example in float64 from the equations (docs/design.md section 2, torch.optim's semantics
    for missing gradients)."""
    params, coeffs, groups = build(spec)
    w = [p.detach().double() for p in params]
    opts = [g for g in groups for _ in g["params"]]
    state = [{} for _ in params]
    out = []
    for k in range(spec.steps):
        pats = [p[k] for p in spec.patterns]
        first = [i for i, pat in enumerate(pats) if pat in ("both", "first")]
        g = {i: coeffs[i][0] * w[i] + coeffs[i][1] for i in first}
        t = {i: (w[i].abs() + opts[i]["eta"]) if opts[i]["adaptive"] else torch.ones_like(w[i])
             for i in first}
        norm = math.sqrt(sum(((t[i] * g[i]) ** 2).sum().item() for i in first))
        e = [torch.zeros_like(x) for x in w]
        for i in first:
            o = opts[i]
            scale = o["rho"] / (norm + o["perturb_eps"]) if o["normalize"] else o["rho"]
            e[i] = scale * t[i] * t[i] * g[i]
        perturbed = [x + ei for x, ei in zip(w, e)]
        new = list(w)
        for i, pat in enumerate(pats):
            if pat not in ("both", "second"):
                continue
            gp = coeffs[i][0] * perturbed[i] + coeffs[i][1]
            o = opts[i]
            if spec.base == "sgd":
                new[i] = oracle.sgd_step(w[i], gp, state[i], lr=o["lr"],
                                         weight_decay=o["weight_decay"], **spec.base_kw)
            else:
                new[i] = oracle.adam_step(w[i], gp, state[i], lr=o["lr"],
                                          weight_decay=o["weight_decay"],
                                          decoupled=spec.base == "adamw", **spec.base_kw)
        w = new
        out.append((perturbed, list(w)))
    return out


def _unit(dtype):
    return torch.finfo(dtype).eps / 2


def bar(params, k: int):
    """Per-parameter bars (on |difference| / (|reference| + 1)) after step k (0-based), as
    derived in the module docstring."""
    dtypes = [p.dtype for p in params]
    n = sum(p.numel() for p in params)
    u_norm = _unit(torch.float64 if all(d == torch.float64 for d in dtypes) else torch.float32)
    return [16 * (k + 1) * _unit(d) if d in HALF
            else (64 * _unit(d) + n * max(u_norm, _unit(d))) * (k + 1) for d in dtypes]


def assert_close(got, want, bars, what):
    for i, (x, y, b) in enumerate(zip(got, want, bars)):
        if x.numel() == 0:
            continue
        x, y = x.double(), y.double()
        err = ((x - y).abs() / (y.abs() + 1)).max().item()
        assert err <= b, f"{what}: parameter {i} ({x.dtype}): {err:.3g} > bar {b:.3g}"


def check_example(spec: Spec, backend: str):
    built = build(spec)[0]
    dtypes = [p.dtype for p in built]
    ref, ref_state = run(spec, "torch")
    if backend == "torch":
        _check_against_torch_optim(spec, built, ref, ref_state)
        got = ref
    else:
        got, got_state = run(spec, backend)
        for k, ((p1, a1), (p2, a2)) in enumerate(zip(got, ref)):
            bars = bar(built, k)
            assert_close(p1, p2, bars, f"{backend} vs torch, step {k}: w + e")
            assert_close(a1, a2, bars, f"{backend} vs torch, step {k}: weights")
        last = bar(built, spec.steps - 1)
        for i, (s1, s2) in enumerate(zip(got_state, ref_state)):
            assert s1.keys() == s2.keys(), f"{backend}: parameter {i}: state keys"
            for key in s1:
                assert_close([s1[key]], [s2[key]], [0.0 if key == "step" else last[i]],
                             f"{backend}: parameter {i}: state {key!r}")
    # the float64 oracle (float32/float64 examples)
    if not any(d in HALF for d in dtypes):
        for k, ((pert, after), (o_pert, o_after)) in enumerate(zip(got, oracle_run(spec))):
            bars = bar(built, k)
            assert_close(pert, o_pert, bars, f"{backend}, step {k}: w + e vs the oracle")
            assert_close(after, o_after, bars, f"{backend}, step {k}: weights vs the oracle")


def _check_against_torch_optim(spec, built, ref, ref_state):
    """The torch backend's fused restore+step against restore_ + torch.optim's own step()."""
    plain, plain_state = run(spec, "torch", fused=False)
    exact = [p.dtype not in HALF for p in built]
    for k, ((p1, a1), (p2, a2)) in enumerate(zip(ref, plain)):
        assert_bits([x for x, e in zip(p1, exact) if e], [x for x, e in zip(p2, exact) if e],
                    f"step {k}: perturbation, fused vs torch.optim path")
        assert_bits([x for x, e in zip(a1, exact) if e], [x for x, e in zip(a2, exact) if e],
                    f"step {k}: fused restore+step vs torch.optim's step")
        half_bars = [b if not e else math.inf for b, e in zip(bar(built, k), exact)]
        assert_close(a1, a2, half_bars, f"step {k}: half precision, fused vs torch.optim")
    for i, (s1, s2) in enumerate(zip(ref_state, plain_state)):
        assert s1.keys() == s2.keys(), f"parameter {i}: state keys {s1.keys()} vs {s2.keys()}"
        if exact[i]:
            for key in s1:
                assert torch.equal(s1[key], s2[key]), f"parameter {i}: state {key!r}"


# Examples per backend: the Triton interpreter runs a kernel launch ~100x slower than the
# others, so it gets fewer (the whole file stays within ~60 s on a 2-core CI machine).
EXAMPLES = {"triton": 8}


@pytest.mark.parametrize("backend", BACKENDS)
def test_sam_on_random_structures(backend):
    @settings(max_examples=EXAMPLES.get(backend, 40), **SETTINGS)
    @given(spec=specs())
    def prop(spec):
        check_example(spec, backend)

    prop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_only_in_the_second_pass_is_stepped(backend):
    @settings(max_examples=min(EXAMPLES.get(backend, 10), 10),
              phases=(Phase.explicit, Phase.generate), **SETTINGS)
    @given(spec=specs(force_second=True))
    def prop(spec):
        check_example(spec, backend)

    prop()


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_without_gradients_beside_an_adaptive_group(backend):
    """Two groups that differ in ``adaptive``; the second has no gradient this step (frozen,
    or an unused branch). torch.optim skips it; SAM must too."""
    used = torch.nn.Parameter(torch.tensor([0.5, -0.25]))
    unused = torch.nn.Parameter(torch.tensor([1.0]))
    opt = SAM([{"params": [used], "adaptive": True}, {"params": [unused]}], torch.optim.SGD,
              lr=0.1, backend=backend)
    used.grad = torch.tensor([1.0, 2.0])
    before = snap([used, unused])
    opt.first_step()
    opt.restore()
    assert_bits(snap([used, unused]), before, "restore")


@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_counts_the_steps_of_empty_parameters(backend):
    """An empty parameter (a zero-width layer) alone in its dtype group, beside a normal
    one: torch.optim.Adam advances its step counter like any other."""
    # float64 runs on the torch backend everywhere, so the float32 group is the empty one
    full = torch.nn.Parameter(torch.tensor([0.5, -0.25], dtype=torch.float64))
    empty = torch.nn.Parameter(torch.zeros(0, 3))
    opt = SAM([full, empty], torch.optim.Adam, lr=0.1, backend=backend)
    for _ in range(2):
        for _pass in range(2):
            full.grad = torch.tensor([1.0, 2.0], dtype=torch.float64)
            empty.grad = torch.zeros(0, 3)
            opt.first_step() if _pass == 0 else opt.second_step()
    assert opt.base_optimizer.state[full]["step"].item() == 2
    assert opt.base_optimizer.state[empty]["step"].item() == 2


def _overlapping(kind):
    buf = torch.linspace(-1, 1, 8)
    if kind == "same-tensor-twice":
        w = torch.nn.Parameter(buf[:5])
        return buf, [w, w]
    return buf, [torch.nn.Parameter(buf[0:5]), torch.nn.Parameter(buf[3:8])]


@pytest.mark.parametrize("kind", ["same-tensor-twice", "overlapping-views"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_parameters_are_refused_or_follow_torch_optim(backend, kind):
    """Parameters that share elements have no per-element SAM step. The library may refuse
    them when the optimizer is built (an error that says so), or accept them and then
    every backend must do what the torch backend does (torch.optim's semantics: each
    listed tensor is perturbed and stepped with its own gradient, one after the other),
    and the restore must still give back the original bits. Never silent damage."""

    def build_opt(backend):
        buf, params = _overlapping(kind)
        return buf, params, SAM(params, torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.optim's own duplicate-parameter warning
            buf, params, opt = build_opt(backend)
    except (ValueError, RuntimeError) as exc:
        assert any(w in str(exc).lower() for w in ("duplicate", "overlap", "alias", "share",
                                                    "twice", "more than once")), exc
        return

    def steps(buf, params, opt):
        out = []
        for k in range(2):
            before = buf.clone()
            for i, p in enumerate(params):
                p.grad = (p.detach() * 0.2 + 1 + i).clone()
            opt.first_step()
            opt.restore()
            assert torch.equal(buf, before), f"{backend}: restore after first_step is not exact"
            opt.first_step()
            for i, p in enumerate(params):
                p.grad = (p.detach() * 0.2 + 1 + i).clone()
            opt.second_step()
            out.append(buf.clone())
        return out

    got = steps(buf, params, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = steps(*build_opt("torch"))
    for k, (x, y) in enumerate(zip(got, want)):
        torch.testing.assert_close(x, y, rtol=64 * (k + 1) * _unit(torch.float32),
                                   atol=64 * (k + 1) * _unit(torch.float32))
