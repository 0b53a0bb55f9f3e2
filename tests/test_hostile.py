"""Real training scripts against the optimizers (issue 10): torch.optim's semantics, or a
clear error at the call that is wrong, before any weight is touched; never silent damage.

Every case runs on every backend that can run here (the Triton kernels under
TRITON_INTERPRET=1, as CI runs them).
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from conftest import params_of, run_sam
from models import batches, loss_of, make_closure, small_cnn, small_convnet
from oracle import F64, Problem, SGD64, max_rel_diff
from sam_fast import SAM, SAMPa, dispatch

BACKENDS = [b for b in ("torch", "cpp", "triton") if dispatch.why_unavailable(b, "cpu") is None]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def _state_snapshot(opt):
    return {(i, k): v.clone() for i, p in enumerate(opt.param_groups[0]["params"])
            for k, v in opt.base_optimizer.state[p].items() if isinstance(v, torch.Tensor)}


# -- 1. a skipped first AMP step creates no state -------------------------------------------


def _amp_step(model, opt, scaler, batch, inf_in_second=False):
    scaler.scale(loss_of(model, batch)).backward()
    opt.first_step(zero_grad=True, grad_scaler=scaler)
    scaler.scale(loss_of(model, batch)).backward()
    if inf_in_second:
        next(model.parameters()).grad.view(-1)[0] = float("inf")
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()


@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1)),
                                     (torch.optim.AdamW, dict(lr=1e-3))], ids=["sgd", "adamw"])
def test_skipped_first_amp_step_leaves_no_state(backend, base, kw):
    """GradScaler's first steps are often skipped (init scale 2^16); torch.optim creates no
    state then, so the run must equal one that never saw those steps, bit for bit."""
    data = batches(4)
    a, b = small_cnn(0), small_cnn(0)
    skipped = SAM(a.parameters(), base, backend=backend, **kw)
    clean = SAM(b.parameters(), base, backend=backend, **kw)
    scaler_a = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler_b = torch.amp.GradScaler("cpu", init_scale=2.0**9)
    _amp_step(a, skipped, scaler_a, data[0], inf_in_second=True)
    assert all(len(skipped.base_optimizer.state[p]) == 0 for p in a.parameters())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    for batch in data[1:]:
        _amp_step(a, skipped, scaler_a, batch)
        _amp_step(b, clean, scaler_b, batch)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.isfinite(p).all()
        assert torch.equal(p, q)


# -- 2. a gradient only in the second pass is stepped ---------------------------------------


class TwoHeads(nn.Module):
    """A shared trunk and two heads; ``use_b`` routes the batch through the second head too."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Linear(4, 3)
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(3, 2)

    def forward(self, x, use_b):
        h = torch.tanh(self.trunk(x))
        return self.a(h).sum() + (self.b(h).sum() if use_b else 0.0)


@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)),
                                     (torch.optim.Adam, dict(lr=0.01)),
                                     (torch.optim.RMSprop, dict(lr=0.01))],
                         ids=["sgd", "adam", "rmsprop"])
def test_a_gradient_only_in_the_second_pass_is_stepped(backend, base, kw):
    model = TwoHeads()
    opt = SAM(model.parameters(), base, backend=backend, **kw)
    plain = copy.deepcopy(model.b)
    start = [p.detach().clone() for p in model.b.parameters()]
    plain_opt = base(plain.parameters(), **kw)
    x = torch.randn(5, 4)
    model(x, use_b=False).backward()
    opt.first_step(zero_grad=True)
    model(x, use_b=True).backward()
    grads_b = [p.grad.clone() for p in model.b.parameters()]
    opt.second_step(zero_grad=True)
    # the head's e is zero: its step is torch.optim's step with the gradient at w
    for p, g in zip(plain.parameters(), grads_b):
        p.grad = g
    plain_opt.step()
    for p, q, w in zip(model.b.parameters(), plain.parameters(), start):
        if backend == "torch":  # the foreach calls of torch.optim, one by one
            assert torch.equal(p, q)
        else:
            # w - lr * d as one FMA or as a rounded product and a sum: Triton contracts it,
            # the cpp kernels do not, ATen's CPU kernels do where their build has FMA
            # (AVX2) and not elsewhere. A few roundings of the step and the result apart.
            bound = 2.0**-22 * (q.abs() + (q - w).abs())
            assert ((p - q).abs() <= bound).all()


def test_a_gradient_only_in_the_first_pass_restores_without_stepping(backend):
    model = TwoHeads()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    before = [p.detach().clone() for p in model.b.parameters()]
    x = torch.randn(5, 4)
    model(x, use_b=True).backward()
    opt.first_step(zero_grad=True)
    model(x, use_b=False).backward()
    opt.second_step(zero_grad=True)
    assert all(torch.equal(p, w) for p, w in zip(model.b.parameters(), before))
    assert all("momentum_buffer" not in opt.base_optimizer.state[p] for p in model.b.parameters())


# -- 3 and 4. SAMPa's look-ahead leaves no trace ------------------------------------------------


class CountingSGD(torch.optim.Optimizer):
    """Plain SGD whose step size decays with a counter; ``where`` says where it keeps the
    counter: in the param group (as several published optimizers do) or per parameter."""

    def __init__(self, params, lr=0.1, where="group"):
        super().__init__(params, dict(lr=lr, where=where))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if group["where"] == "group":
                group["count"] = group.get("count", 0) + 1
            for p in group["params"]:
                if p.grad is None:
                    continue
                if group["where"] == "group":
                    count = group["count"]
                else:
                    state = self.state[p]
                    state["count"] = state.get("count", 0) + 1
                    count = state["count"]
                p.add_(p.grad, alpha=-group["lr"] / count)


def _run_sampa(model, opt, data):
    for batch in data:
        opt.step(make_closure(model, batch))


def test_sampa_look_ahead_leaves_the_param_groups_as_they_were(backend):
    data = batches(5)
    a, b = small_convnet(0), small_convnet(0)
    in_groups = SAMPa(a.parameters(), CountingSGD, lr=0.1, where="group", backend=backend)
    in_state = SAMPa(b.parameters(), CountingSGD, lr=0.1, where="param", backend=backend)
    _run_sampa(a, in_groups, data)
    _run_sampa(b, in_state, data)
    assert in_groups.updates == 4
    assert in_groups.param_groups[0]["count"] == in_groups.updates
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
                                     (torch.optim.RMSprop, dict(lr=1e-3))], ids=["sgd", "rmsprop"])
def test_sampa_fires_step_hooks_once_per_update(backend, base, kw):
    model = small_convnet(0)
    opt = SAMPa(model.parameters(), base, backend=backend, **kw)
    seen = []
    opt.base_optimizer.register_step_post_hook(
        lambda o, args, kwargs: seen.append([p.detach().clone() for p in model.parameters()]))
    data = batches(4)
    for batch in data:
        opt.step(make_closure(model, batch))
    assert len(seen) == opt.updates == 3
    # each hook saw the committed x, never the look-ahead y
    assert all(torch.equal(p, q) for p, q in zip(seen[-1], model.parameters()))


def test_sampa_closure_without_backward_after_the_first_call_raises_at_x(backend):
    model = small_convnet(0)
    opt = SAMPa(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, backend=backend)
    data = batches(3)
    opt.step(make_closure(model, data[0]))
    opt.step(make_closure(model, data[1]))
    x = params_of(model)
    with pytest.raises(RuntimeError, match="produced no gradient"):
        opt.step(lambda: loss_of(model, data[2]))  # forgot backward()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), x))


# -- 5. a tensor listed twice ---------------------------------------------------------------


def test_a_parameter_listed_twice_is_refused():
    w = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="listed twice"):
        SAM([w, w], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="listed twice|more than one parameter group"):
        SAM([{"params": [w]}, {"params": [w]}], torch.optim.SGD, lr=0.1)
    tied = nn.Linear(3, 3)
    other = nn.Linear(3, 3)
    other.weight = tied.weight
    with pytest.raises(ValueError, match="listed twice"):
        SAM(list(tied.parameters()) + [other.weight], torch.optim.SGD, lr=0.1)


# -- 6. first_step is all or nothing ---------------------------------------------------------


def test_an_error_in_a_later_group_touches_no_weight(backend):
    dense = nn.Linear(3, 2)
    emb = nn.Embedding(10, 3, sparse=True)
    opt = SAM([{"params": dense.parameters()}, {"params": emb.parameters()}], torch.optim.SGD,
              lr=0.1, backend=backend)
    (dense(emb(torch.tensor([1, 2]))).sum()).backward()
    before = [p.detach().clone() for p in list(dense.parameters()) + list(emb.parameters())]
    with pytest.raises(RuntimeError, match="sparse"):
        opt.first_step()
    after = list(dense.parameters()) + list(emb.parameters())
    assert all(torch.equal(p, w) for p, w in zip(after, before))
    assert not opt._perturbed
    opt.restore()  # nothing to do, and no error
    assert all(torch.equal(p, w) for p, w in zip(after, before))


@pytest.mark.parametrize("bad_rho", [float("nan"), "0.05", torch.tensor(0.05)])
def test_a_bad_option_in_a_later_group_touches_no_weight(backend, bad_rho):
    first, second = nn.Linear(3, 2), nn.Linear(2, 1)
    opt = SAM([{"params": first.parameters()}, {"params": second.parameters()}],
              torch.optim.SGD, lr=0.1, backend=backend)
    opt.param_groups[1]["rho"] = bad_rho  # e.g. a schedule gone wrong
    second(first(torch.randn(4, 3))).sum().backward()
    before = [p.detach().clone() for p in list(first.parameters()) + list(second.parameters())]
    with pytest.raises(ValueError, match="rho"):
        opt.first_step()
    after = list(first.parameters()) + list(second.parameters())
    assert all(torch.equal(p, w) for p, w in zip(after, before))
    assert not opt._perturbed


# -- 7. copies keep working ----------------------------------------------------------------------


def _continue(model, opt, data):
    run_sam(model, opt, data)
    return params_of(model)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_copies_continue_exactly_as_the_original(backend, how):
    data = batches(5)
    model = small_cnn(0)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, backend=backend)
    run_sam(model, opt, data[:2])
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    elif how == "pickle":
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    else:
        buf = io.BytesIO()
        torch.save((model, opt), buf)
        buf.seek(0)
        model2, opt2 = torch.load(buf, weights_only=False)
    assert opt2.backend == backend
    a = _continue(model, opt, data[2:])
    b = _continue(model2, opt2, data[2:])
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_sampa_copy_asks_for_the_previous_closure():
    data = batches(4)
    model = small_convnet(0)
    opt = SAMPa(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9)
    for batch in data[:2]:
        opt.step(make_closure(model, batch))
    model2, opt2 = copy.deepcopy((model, opt))
    with pytest.raises(RuntimeError, match="previous_closure"):
        opt2.step(make_closure(model2, data[2]))
    opt2.step(make_closure(model2, data[2]), previous_closure=make_closure(model2, data[1]))
    opt.step(make_closure(model, data[2]))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model2.parameters()))


# -- 8. checkpoints of other optimizers, groups added on the base ----------------------------


def test_loading_a_plain_torch_optim_checkpoint(backend):
    data = batches(4)
    model = small_cnn(0)
    plain = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_of(model, data[0]).backward()
    plain.step()
    plain.zero_grad()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.07, lr=0.05, momentum=0.9,
              backend=backend)
    opt.load_state_dict(plain.state_dict())
    assert opt.param_groups[0]["rho"] == 0.07 and opt.param_groups[0]["perturb_eps"] == 1e-12
    run_sam(model, opt, data[1:])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_loading_a_davda54_sam_checkpoint(backend):
    """The reference's state dict is its wrapper's: ``old_p`` per parameter, groups with
    ``rho`` and ``adaptive`` only."""
    model = small_cnn(0)
    params = list(model.parameters())
    reference_like = {
        "state": {i: {"old_p": p.detach().clone()} for i, p in enumerate(params)},
        "param_groups": [dict(rho=0.05, adaptive=False, lr=0.05, momentum=0.9, dampening=0,
                              weight_decay=0, nesterov=False, maximize=False, foreach=None,
                              differentiable=False, fused=None,
                              params=list(range(len(params))))],
    }
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, backend=backend)
    opt.load_state_dict(reference_like)
    assert all("old_p" not in opt.base_optimizer.state[p] for p in params)
    run_sam(model, opt, batches(2))
    assert all(torch.isfinite(p).all() for p in params)


def test_a_group_added_on_the_base_optimizer_gets_the_wrapper_keys(backend):
    first, second = nn.Linear(3, 2), nn.Linear(2, 1)
    opt = SAM(first.parameters(), torch.optim.SGD, rho=0.03, lr=0.1, backend=backend)
    opt.base_optimizer.add_param_group({"params": second.parameters()})
    second(first(torch.randn(4, 3))).sum().backward()
    before = [p.detach().clone() for p in second.parameters()]
    opt.first_step(zero_grad=True)
    assert opt.param_groups[1]["rho"] == 0.03
    assert not all(torch.equal(p, w) for p, w in zip(second.parameters(), before))
    second(first(torch.randn(4, 3))).sum().backward()
    opt.second_step(zero_grad=True)


# -- 9. parameters moved to another dtype, state kept ----------------------------------------


def test_model_to_bfloat16_mid_training_steps_as_the_torch_backend(backend):
    data = batches(4)
    runs = {}
    for name in dict.fromkeys(("torch", backend)):
        model = small_convnet(0)
        opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, backend=name)
        run_sam(model, opt, data[:2])
        model.to(torch.bfloat16)
        assert all(s["momentum_buffer"].dtype == torch.float32
                   for s in opt.base_optimizer.state.values())
        run_sam(model, opt, [(x.to(torch.bfloat16), y) for x, y in data[2:]])
        runs[name] = params_of(model)
    assert all(p.dtype == torch.bfloat16 for p in runs[backend])
    assert all(torch.equal(p, q) for p, q in zip(runs[backend], runs["torch"]))


# -- 11. refused at construction -------------------------------------------------------------


def test_a_base_optimizer_that_needs_a_closure_is_refused():
    with pytest.raises(TypeError, match="requires a closure"):
        SAM(nn.Linear(2, 1).parameters(), torch.optim.LBFGS, lr=0.1)


@pytest.mark.parametrize("rho", [float("inf"), float("nan"), -1.0])
def test_rho_must_be_finite_and_non_negative(rho):
    with pytest.raises(ValueError, match="rho"):
        SAM(nn.Linear(2, 1).parameters(), torch.optim.SGD, rho=rho, lr=0.1)
    with pytest.raises(ValueError, match="rho"):
        SAMPa(nn.Linear(2, 1).parameters(), torch.optim.SGD, rho=rho, lr=0.1)


# -- 12. unscale_ before first_step --------------------------------------------------------------


def test_unscale_before_first_step_is_refused(backend):
    model = small_cnn(0)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05, backend=backend)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    scaler.scale(loss_of(model, batches(1)[0])).backward()
    scaler.unscale_(opt)
    before = params_of(model)
    with pytest.raises(RuntimeError, match="unscale_"):
        opt.first_step(grad_scaler=scaler)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), before))


# -- step(closure) conventions and wrappers that copy the optimizer's __dict__ -------------------


def test_step_with_a_closure_and_no_gradients_runs_both_passes(backend):
    """torch.optim's closure convention (Lightning's automatic optimization)."""
    data = batches(3)
    a, b = small_cnn(0), small_cnn(0)
    by_closure = SAM(a.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, backend=backend)
    by_hand = SAM(b.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, backend=backend)
    for batch in data:
        def closure(batch=batch):
            by_closure.zero_grad()
            loss = loss_of(a, batch)
            loss.backward()
            return loss
        loss = by_closure.step(closure)
        by_closure.zero_grad()
        first = loss_of(b, batch)
        first.backward()
        by_hand.first_step(zero_grad=True)
        loss_of(b, batch).backward()
        by_hand.second_step(zero_grad=True)
        assert torch.equal(loss, first)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_step_with_a_closure_after_first_step_finishes_the_step(backend):
    data = batches(2)
    a, b = small_cnn(0), small_cnn(0)
    opt_a = SAM(a.parameters(), torch.optim.SGD, lr=0.05, backend=backend)
    opt_b = SAM(b.parameters(), torch.optim.SGD, lr=0.05, backend=backend)
    for batch in data:
        loss_of(a, batch).backward()
        opt_a.first_step(zero_grad=True)
        opt_a.step(make_closure(a, batch))
        opt_a.zero_grad()
    run_sam(b, opt_b, data)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_a_wrapper_sharing_the_dict_sees_the_step_state(backend):
    """LightningOptimizer copies the optimizer's __dict__ and calls its methods on the copy."""
    model = small_cnn(0)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.05, backend=backend)
    wrapper = object.__new__(type(opt))
    wrapper.__dict__ = {k: v for k, v in opt.__dict__.items()}
    batch = batches(1)[0]
    loss_of(model, batch).backward()
    wrapper.first_step(zero_grad=True)
    assert opt.last_grad_norm is not None and opt._perturbed
    loss_of(model, batch).backward()
    opt.second_step(zero_grad=True)
    assert not wrapper._perturbed


# -- SAMPa as the authors' script runs it ----------------------------------------------------------


def _script_trajectory(problem, calls, rho, lam, lr, momentum, weight_decay):
    """A float64 port of the update rule of LIONS-EPFL/SAMPa's train.py, both ranks
    emulated in one process: g_y starts at zero, the batch before the first is the first,
    and while no momentum buffer exists y = x - lr * g_y (no weight decay)."""
    x = problem.initial()
    g_y = [torch.zeros_like(t) for t in x]
    buf = None
    out = [x]
    for k in range(calls):
        norm = torch.sqrt(sum((g ** 2).sum() for g in g_y))
        scale = rho / (norm + 1e-12)
        x_tilde = [xi + scale * gi for xi, gi in zip(x, g_y)]
        if buf is None:
            y = [xi - lr * gi for xi, gi in zip(x, g_y)]
        else:
            y = [xi - lr * (gi + weight_decay * xi + momentum * bi)
                 for xi, gi, bi in zip(x, g_y, buf)]
        g_tilde = problem.grad(x_tilde, max(k - 1, 0))
        g_y = problem.grad(y, k)
        agg = [(1 - lam) * a + lam * b for a, b in zip(g_tilde, g_y)]
        d = [a + weight_decay * xi for a, xi in zip(agg, x)]
        buf = [di.clone() for di in d] if buf is None else [momentum * b + di
                                                             for b, di in zip(buf, d)]
        x = [xi - lr * bi for xi, bi in zip(x, buf)]
        out.append(x)
    return out


@pytest.mark.parametrize("weight_decay", [0.0, 5e-3])
def test_sampa_code_variant_follows_the_authors_script(weight_decay):
    data = batches(6)
    model = small_convnet(0).to(F64)
    problem = Problem(model, data, loss_of)
    want = _script_trajectory(problem, len(data), rho=0.1, lam=0.2, lr=0.05, momentum=0.9,
                              weight_decay=weight_decay)
    opt = SAMPa(model.parameters(), torch.optim.SGD, rho=0.1, lam=0.2, lr=0.05, momentum=0.9,
                weight_decay=weight_decay, variant="code")
    for batch in data:
        opt.step(make_closure(model, (batch[0].to(F64), batch[1])))
    assert opt.updates == len(data)
    assert max_rel_diff(list(model.parameters()), want[-1]) < 1e-12


def test_sampa_variant_is_checked():
    with pytest.raises(ValueError, match="variant"):
        SAMPa(nn.Linear(2, 1).parameters(), variant="authors")


# -- local_ascent() gradients applied by an update (DDP: every rank would differ) ----------


class _NoSyncModel(nn.Module):
    """A stand-in for DistributedDataParallel: local_ascent() only needs ``no_sync()``
    (tests/test_distributed.py runs the real one)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)

    def no_sync(self):
        import contextlib

        return contextlib.nullcontext()


@pytest.fixture
def no_local_grads():
    from sam_fast import distributed

    distributed._local_grads.clear()
    yield
    distributed._local_grads.clear()


def _local_backward(model, batch):
    from sam_fast.distributed import local_ascent

    with local_ascent(model):
        loss_of(model, batch).backward()


def test_local_ascent_is_sams_first_pass_only(no_local_grads):
    from sam_fast import GSAM, WSAM, LookSAM

    data = batches(3, batch_size=8)
    model = _NoSyncModel(small_convnet(0))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9)
    for batch in data[:2]:  # SAM's own use, by hand and through step(closure)
        _local_backward(model, batch)
        opt.first_step(zero_grad=True)
        loss_of(model, batch).backward()
        opt.second_step(zero_grad=True)
    _local_backward(model, data[2])
    opt.step(make_closure(model, data[2]))

    # The second pass under local_ascent(): refused, the weights back at w.
    model.zero_grad(set_to_none=True)
    loss_of(model, data[0]).backward()
    w = params_of(model)
    opt.first_step(zero_grad=True)
    _local_backward(model, data[0])
    with pytest.raises(RuntimeError, match=r"second_step\(\) \(the weights are back at w"):
        opt.second_step(zero_grad=True)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))

    # GSAM, WSAM and LookSAM read the first pass's gradient in their update.
    for cls in (GSAM, WSAM, LookSAM):
        model = _NoSyncModel(small_convnet(0))
        opt = cls(model.parameters(), torch.optim.SGD, lr=0.05)
        _local_backward(model, data[0])
        w = params_of(model)
        with pytest.raises(RuntimeError, match=f"{cls.__name__}'s update reads the first"):
            opt.first_step()
        with pytest.raises(RuntimeError, match=f"{cls.__name__}'s update reads the first"):
            opt.step(make_closure(model, data[0]))
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))
        assert not opt.base_optimizer.state


def test_local_ascent_on_a_plain_step_of_sam_every_k_steps_is_refused(no_local_grads):
    data = batches(2, batch_size=8)
    model = _NoSyncModel(small_convnet(0))
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, interval=2, lr=0.05, momentum=0.9)
    _local_backward(model, data[0])
    opt.step(make_closure(model, data[0]))  # a SAM step: fine
    _local_backward(model, data[1])  # a plain step's only pass: its gradient is the update's
    w = params_of(model)
    state = _state_snapshot(opt)
    with pytest.raises(RuntimeError, match=r"a plain step of SAM\(interval=k\)"):
        opt.step(make_closure(model, data[1]))
    with pytest.raises(RuntimeError, match=r"a plain step of SAM\(interval=k\)"):
        opt.first_step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), w))
    assert all(torch.equal(v, _state_snapshot(opt)[k]) for k, v in state.items())
