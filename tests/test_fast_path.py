"""The eager fast path (csrc/fast_path.cpp, sam_fast/plan.py): the buckets' C++ handles.

On the compiled backends every step goes through handles that keep the static lists in
C++ and read the gradients themselves. These tests check that it is taken, that it gives
the Python path's results bit for bit (the same ops run), and that every change of the
parameters that a stale plan would get wrong is seen: the handle answers and a new plan
is built, or the general path runs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from models import batches, loss_of, make_closure, small_cnn
from sam_fast import SAM, SAMPa, _extension, dispatch, plan

pytestmark = [
    pytest.mark.skipif(dispatch.why_unavailable("cpp", "cpu") is not None,
                       reason="needs sam_fast._C (the cpp backend)"),
    # The fast path is the version-matched library's (it needs ATen's Python bindings);
    # under the portable one (SAM_FAST_ABI=stable) the optimizers take the Python path,
    # which the rest of the suite tests.
    pytest.mark.skipif(_extension.abi() == "stable",
                       reason="the C++ fast path is in the version-matched sam_fast._C only"),
]


class _Counting:
    """plan.fast with a count of the calls of each function."""

    def __init__(self, module):
        self._module = module
        self.calls: dict[str, int] = {}

    def __getattr__(self, name):
        value = getattr(self._module, name)
        if not callable(value) or isinstance(value, type):
            return value

        def counted(*args):
            self.calls[name] = self.calls.get(name, 0) + 1
            return value(*args)

        return counted


@pytest.fixture
def counting(monkeypatch):
    plan._fast_module()
    proxy = _Counting(plan.fast)
    monkeypatch.setattr(plan, "fast", proxy)
    return proxy


@pytest.fixture
def python_path(monkeypatch):
    """Plans built inside ``with python_path():`` take the Python path."""

    class Switch:
        def __enter__(self):
            monkeypatch.setattr(plan, "FAST_PATH", False)

        def __exit__(self, *exc):
            monkeypatch.setattr(plan, "FAST_PATH", True)

    return Switch


def _sam_run(model, opt, data, use_closure=False):
    for batch in data:
        loss_of(model, batch).backward()
        if use_closure:
            opt.step(make_closure(model, batch))
            opt.zero_grad()
        else:
            opt.first_step(zero_grad=True)
            loss_of(model, batch).backward()
            opt.second_step(zero_grad=True)


def _assert_same(model_a, model_b, opt_a, opt_b):
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)
        sa, sb = opt_a.base_optimizer.state[pa], opt_b.base_optimizer.state[pb]
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert torch.equal(sa[k], sb[k]), k


def _mixed_groups(model):
    """Three groups; the middle one holds fp32 and bf16 tensors (two buckets of one group)."""
    params = list(model.parameters())
    return [{"params": params[:2]}, {"params": params[2:5], "rho": 0.02},
            {"params": params[5:], "weight_decay": 0.0}]


CASES = {
    "sgd-momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=5e-4)),
    "sgd-nesterov": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True,
                                           dampening=0.0)),
    "sgd-plain": (torch.optim.SGD, dict(lr=0.05)),
    "adam": (torch.optim.Adam, dict(lr=1e-3, weight_decay=1e-2)),
    "adamw-amsgrad": (torch.optim.AdamW, dict(lr=1e-3, amsgrad=True)),
    "asam": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, adaptive=True, rho=0.5)),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("use_closure", [False, True], ids=["two-calls", "closure"])
def test_fast_path_equals_python_path(case, use_closure, counting, python_path):
    base, kw = CASES[case]
    a, b = small_cnn(0), small_cnn(0)
    # a bf16 tensor in the middle group: one group in two buckets
    for m in (a, b):
        m[1].weight.data = m[1].weight.data.to(torch.bfloat16).float()
    fast = SAM(_mixed_groups(a), base, backend="cpp", **kw)
    with python_path():
        slow = SAM(_mixed_groups(b), base, backend="cpp", **kw)
        data = batches(6)
        _sam_run(b, slow, data, use_closure)
    _sam_run(a, fast, data, use_closure)
    assert fast._step_state.plan.fast and not slow._step_state.plan.fast
    assert counting.calls.get("perturb", 0) >= 6
    stepped = counting.calls.get("restore_sgd", 0) + counting.calls.get("restore_adamw", 0)
    assert stepped >= 3 * 4  # three groups, from the step after the state exists
    _assert_same(a, b, fast, slow)


def test_mixed_dtypes_in_one_group_use_positions(counting):
    """A group whose tensors have two dtypes has two buckets, each handle reading its own
    positions of the group's list."""
    torch.manual_seed(0)
    w32 = nn.Parameter(torch.randn(5))
    w16 = nn.Parameter(torch.randn(3).to(torch.bfloat16))
    v32 = nn.Parameter(torch.randn(7))
    ref = [t.detach().clone() for t in (w32, w16, v32)]
    opt = SAM([w32, w16, v32], torch.optim.SGD, lr=0.1, backend="cpp")
    refs = [nn.Parameter(t) for t in ref]
    ref_opt = SAM(refs, torch.optim.SGD, lr=0.1, backend="torch")
    for o, ps in ((opt, [w32, w16, v32]), (ref_opt, refs)):
        for p in ps:
            p.grad = torch.ones_like(p)
        o.first_step(zero_grad=True)
        for p in ps:
            p.grad = torch.full_like(p, 0.5)
        o.second_step(zero_grad=True)
    assert len(opt._step_state.plan.buckets) == 2
    for p, r in zip((w32, w16, v32), refs):
        assert torch.equal(p, r)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("variant", ["paper", "code"])
def test_sampa_fast_path_equals_python_path(momentum, variant, counting, python_path):
    a, b = small_cnn(0), small_cnn(0)
    kw = dict(lr=0.05, momentum=momentum, weight_decay=5e-4, rho=0.05, lam=0.3,
              variant=variant)
    fast = SAMPa(_mixed_groups(a), backend="cpp", **kw)
    data = batches(6)
    with python_path():
        slow = SAMPa(_mixed_groups(b), backend="cpp", **kw)
        for batch in data:
            slow.step(make_closure(b, batch))
    for batch in data:
        fast.step(make_closure(a, batch))
    assert fast._step_state.plan.fast and not slow._step_state.plan.fast
    assert counting.calls.get("sampa_update", 0) >= 3 * 4
    _assert_same(a, b, fast, slow)
    for p in a.parameters():
        assert p.grad is None  # between calls .grad is None (g_y is kept by the optimizer)
    # the kept g_y goes to checkpoints as on the Python path
    sa, sb = fast.state_dict()["sam_fast"], slow.state_dict()["sam_fast"]
    assert sa["grad_y"].keys() == sb["grad_y"].keys()
    for k in sa["grad_y"]:
        assert torch.equal(sa["grad_y"][k], sb["grad_y"][k])


def test_sampa_fast_path_resumes_from_a_checkpoint_and_a_copy():
    data = batches(6)
    model = small_cnn(0)
    opt = SAMPa(model.parameters(), lr=0.05, momentum=0.9, backend="cpp")
    for batch in data[:3]:
        opt.step(make_closure(model, batch))
    twin = copy.deepcopy(model)
    twin_opt = SAMPa(twin.parameters(), lr=0.05, momentum=0.9, backend="cpp")
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    first = True
    for batch in data[3:]:
        opt.step(make_closure(model, batch))
        twin_opt.step(make_closure(twin, batch),
                      previous_closure=make_closure(twin, data[2]) if first else None)
        first = False
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_sampa_missing_gradients_count_as_zeros_on_the_fast_path(python_path):
    """A parameter without a gradient in one evaluation: the handle answers INCOMPLETE
    and the zeros of the Python path fill in, bit for bit."""

    def run(model, opt):
        data = batches(5)
        for i, batch in enumerate(data):
            def closure(batch=batch, i=i):
                loss = loss_of(model, batch)
                if i % 2:  # the head's bias gets no gradient in every other evaluation
                    loss = loss + 0 * model[-1].weight.sum()
                loss.backward()
                if i % 2:
                    model[-1].bias.grad = None
                return loss
            opt.step(closure)

    a, b = small_cnn(0), small_cnn(0)
    fast = SAMPa(a.parameters(), lr=0.05, momentum=0.9, backend="cpp")
    run(a, fast)
    with python_path():
        slow = SAMPa(b.parameters(), lr=0.05, momentum=0.9, backend="cpp")
        run(b, slow)
    _assert_same(a, b, fast, slow)


# -- every change of the parameters is seen ---------------------------------------------------


def _one_step(model, opt, batch):
    loss_of(model, batch).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, batch).backward()
    opt.second_step(zero_grad=True)


def _twins(base=torch.optim.SGD, **kw):
    kw = kw or dict(lr=0.05, momentum=0.9)
    a, b = small_cnn(0), small_cnn(0)
    return a, b, SAM(a.parameters(), base, backend="cpp", **kw), \
        SAM(b.parameters(), base, backend="torch", **kw)


def test_new_storage_gives_a_new_plan():
    """``p.data = ...`` (what Module.to does) keeps the object and gives it new storage."""
    a, b, fast, ref = _twins()
    data = batches(4)
    _one_step(a, fast, data[0])
    _one_step(b, ref, data[0])
    old = fast._step_state.plan
    for m in (a, b):
        for p in m.parameters():
            p.data = p.data.clone()
    for batch in data[1:]:
        _one_step(a, fast, batch)
        _one_step(b, ref, batch)
    assert fast._step_state.plan is not old
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_dtype_change_between_steps_is_seen():
    """model.to(bfloat16) with the fp32 state kept: the new plan sends those parameters
    to the torch backend, as on the Python path."""
    a, b = small_cnn(0), small_cnn(0)
    fast = SAM(a.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, backend="cpp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plan, "FAST_PATH", False)
        slow = SAM(b.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, backend="cpp")
        data = batches(4, dtype=torch.float32)
        _one_step(b, slow, data[0])
        b.to(torch.bfloat16)
        for batch in data[1:]:
            _one_step(b, slow, (batch[0].to(torch.bfloat16), batch[1]))
    _one_step(a, fast, data[0])
    a.to(torch.bfloat16)
    for batch in data[1:]:
        _one_step(a, fast, (batch[0].to(torch.bfloat16), batch[1]))
    _assert_same(a, b, fast, slow)


def test_swapped_tensors_give_a_new_plan():
    """torch.utils.swap_tensors gives the parameter object another TensorImpl."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6))
    opt = SAM([w], torch.optim.SGD, lr=0.1, backend="cpp")
    w.grad = torch.ones(6)
    opt.first_step(zero_grad=True)
    w.grad = torch.ones(6)
    opt.second_step(zero_grad=True)
    old = opt._step_state.plan
    other = nn.Parameter(torch.randn(6))
    torch.utils.swap_tensors(w, other)
    before = w.detach().clone()
    w.grad = torch.ones(6)
    opt.first_step(zero_grad=True)
    w.grad = torch.zeros(6)
    opt.second_step(zero_grad=True)
    assert opt._step_state.plan is not old
    # SGD with zero gradient and momentum 0: w is back where it was, exactly
    assert torch.equal(w.detach(), before)


def test_replaced_and_appended_parameters_give_a_new_plan(counting):
    torch.manual_seed(0)
    w, v = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(3))
    opt = SAM([w, v], torch.optim.SGD, lr=0.1, backend="cpp")

    def step(params):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.first_step(zero_grad=True)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.second_step(zero_grad=True)

    step([w, v])
    new = nn.Parameter(torch.zeros(4))
    opt.param_groups[0]["params"][0] = new  # same length, another object
    step([new, v])
    assert not torch.equal(new.detach(), torch.zeros(4))  # the new parameter was stepped
    extra = nn.Parameter(torch.zeros(2))
    opt.param_groups[0]["params"].append(extra)
    step([new, v, extra])
    assert not torch.equal(extra.detach(), torch.zeros(2))
    assert counting.calls["bucket"] == 3


def test_storage_shared_after_the_fact_is_refused():
    """``p.data = q.data`` after the optimizer was built: the new plan's overlap check
    refuses it (each would save and restore the other's perturbation)."""
    torch.manual_seed(0)
    w, v = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
    opt = SAM([w, v], torch.optim.SGD, lr=0.1, backend="cpp")
    for p in (w, v):
        p.grad = torch.ones(4)
    opt.first_step(zero_grad=True)
    for p in (w, v):
        p.grad = torch.ones(4)
    opt.second_step(zero_grad=True)
    v.data = w.data
    for p in (w, v):
        p.grad = torch.ones(4)
    before = w.detach().clone()
    with pytest.raises(ValueError, match="share memory"):
        opt.first_step()
    assert torch.equal(w.detach(), before)


def test_load_state_dict_gives_a_new_plan():
    a, b, fast, ref = _twins()
    data = batches(3)
    _one_step(a, fast, data[0])
    old = fast._step_state.plan
    fast.load_state_dict(fast.state_dict())
    _one_step(a, fast, data[1])
    assert fast._step_state.plan is not old


def test_missing_and_late_gradients_take_the_general_path(python_path):
    """A parameter without a gradient in the first pass (INCOMPLETE): the general path,
    bit for bit the Python path's result."""

    def run(model, opt):
        for i, batch in enumerate(batches(4)):
            loss_of(model, batch).backward()
            if i == 1:
                model[-1].bias.grad = None  # late: a gradient only in the second pass
            opt.first_step(zero_grad=True)
            loss_of(model, batch).backward()
            if i == 2:
                model[0].weight.grad = None  # idle: perturbed, then no gradient
            opt.second_step(zero_grad=True)

    a, b = small_cnn(0), small_cnn(0)
    fast = SAM(a.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, backend="cpp")
    run(a, fast)
    with python_path():
        slow = SAM(b.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, backend="cpp")
        run(b, slow)
    _assert_same(a, b, fast, slow)


def test_sparse_gradient_is_refused_before_anything_is_touched():
    emb = nn.Embedding(10, 3, sparse=True)
    head = nn.Linear(3, 1)
    opt = SAM(list(emb.parameters()) + list(head.parameters()), torch.optim.SGD, lr=0.1,
              backend="cpp")
    head(emb(torch.tensor([1, 2]))).sum().backward()
    before = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    with pytest.raises((RuntimeError, ValueError), match="sparse|layout|strided"):
        opt.first_step()
    for p, q in zip(opt.param_groups[0]["params"], before):
        assert torch.equal(p.detach(), q)


def test_version_counters_are_bumped():
    """The handles run the registered ops: autograd still sees the in-place writes."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5))
    opt = SAM([w], torch.optim.SGD, lr=0.1, backend="cpp")
    w.grad = torch.ones(5)
    v0 = w._version
    opt.first_step(zero_grad=True)
    v1 = w._version
    w.grad = torch.ones(5)
    opt.second_step(zero_grad=True)
    assert opt._step_state.plan.fast
    assert v0 < v1 < w._version


# -- the handle itself --------------------------------------------------------------------------


def _handle(params, **kw):
    plan._fast_module()
    group = list(params)
    return group, plan.fast.bucket(group, list(range(len(group))),
                                   [torch.empty_like(p) for p in group])


def test_handle_answers():
    fast = plan._fast_module()
    group, h = _handle([torch.randn(3), torch.randn(2)])
    assert fast.check(h) == fast.OK
    assert fast.sumsq((h,), None, -1) == fast.INCOMPLETE  # no gradients
    for p in group:
        p.grad = torch.ones_like(p)
    total = fast.sumsq((h,), None, -1)
    assert isinstance(total, torch.Tensor) and total.item() == 5.0
    group.append(torch.randn(1))
    assert fast.check(h) == fast.LAYOUT_CHANGED
    assert fast.sumsq((h,), None, -1) == fast.LAYOUT_CHANGED
    group.pop()
    group[0].data = torch.randn(4)  # another shape
    assert fast.check(h) == fast.LAYOUT_CHANGED


def test_handle_refuses_bad_arguments():
    fast = plan._fast_module()
    group, h = _handle([torch.randn(3)])
    with pytest.raises(TypeError):
        fast.bucket(group, [0])
    with pytest.raises(RuntimeError, match="backups"):
        fast.bucket(group, [0], [])
    with pytest.raises(RuntimeError, match="out of range"):
        fast.bucket(group, [4], [torch.empty(3)])
    with pytest.raises(RuntimeError, match="shape"):
        fast.bucket(group, [0], [torch.empty(2)])
    with pytest.raises(TypeError, match="Bucket"):
        fast.check(object())
    with pytest.raises(RuntimeError, match="slot"):
        fast.bucket_set(h, 99, None)
    with pytest.raises(RuntimeError, match="momentum"):
        fast.restore_sgd(h, 0.1, 0.9, 0.0, 0.0, False, False, None, None)
    with pytest.raises(TypeError):
        fast.perturb(h, torch.ones(()), "rho", 0.0, True, None, None)


# -- on a GPU: the cuda backend's handles, and a captured fast step ---------------------------

HAS_CUDA = torch.cuda.is_available() and dispatch.why_unavailable("cuda", "cuda") is None
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")]


@pytest.mark.parametrize("case", ["sgd-momentum", "adamw-amsgrad"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_fast_path_equals_python_path(case, counting, python_path):
    base, kw = CASES[case]
    a, b = small_cnn(0).cuda(), small_cnn(0).cuda()
    data = [(x.cuda(), y.cuda()) for x, y in batches(5)]
    fast = SAM(a.parameters(), base, backend="cuda", **kw)
    with python_path():
        slow = SAM(b.parameters(), base, backend="cuda", **kw)
        _sam_run(b, slow, data)
    _sam_run(a, fast, data)
    assert fast._step_state.plan.fast and counting.calls.get("perturb", 0) == 5
    _assert_same(a, b, fast, slow)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
def test_cuda_graph_captures_a_fast_step():
    """A whole SAM step with static gradients, captured once and replayed, against eager."""
    torch.manual_seed(0)
    shapes = [(64, 3, 3, 3), (64,), (1000, 64), (1000,), (7,)]
    ws = [nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    twins = [nn.Parameter(w.detach().clone()) for w in ws]
    g1 = [torch.randn_like(w) for w in ws]
    g2 = [torch.randn_like(w) for w in ws]
    opt = SAM(ws, torch.optim.SGD, lr=0.1, momentum=0.9, backend="cuda")
    ref = SAM(twins, torch.optim.SGD, lr=0.1, momentum=0.9, backend="cuda")

    def step(o, params):
        for p, g in zip(params, g1):
            p.grad = g
        o.first_step()
        for p, g in zip(params, g2):
            p.grad = g
        o.second_step()

    for _ in range(2):  # warm up: the momentum buffers exist, the steady state is reached
        step(opt, ws)
        step(ref, twins)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step(opt, ws)
        step(ref, twins)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(opt, ws)
    for _ in range(3):
        graph.replay()
        step(ref, twins)
    torch.cuda.synchronize()
    for w, t in zip(ws, twins):
        assert torch.equal(w, t)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_sampa_keeps_momentum_made_on_the_general_path(backend):
    """Call 0 leaves one parameter without g_y: call 1 takes the general path, which makes
    the momentum buffers in the base optimizer's state. The fast path of call 2 must use
    those buffers, not lists it cached before they existed (which would start the momentum
    again from zero). Against a base optimizer that always takes the general path."""

    class PlainSGD(torch.optim.SGD):  # a subclass: no fused step, the general path always
        pass

    def run(model, opt):
        for i, batch in enumerate(batches(5)):
            def closure(batch=batch, i=i):
                loss = loss_of(model, batch)
                loss.backward()
                if i == 0:
                    model[-1].bias.grad = None
                return loss
            opt.step(closure)

    a, b = small_cnn(0), small_cnn(0)
    fast = SAMPa(a.parameters(), lr=0.1, momentum=0.9, backend=backend)
    general = SAMPa(b.parameters(), PlainSGD, lr=0.1, momentum=0.9, backend=backend)
    run(a, fast)
    run(b, general)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_zero_grad_through_the_handles_and_after_a_layout_change(counting):
    torch.manual_seed(0)
    w, v = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(3))
    opt = SAM([w, v], torch.optim.SGD, lr=0.1, backend="cpp")
    for p in (w, v):
        p.grad = torch.ones_like(p)
    opt.first_step(zero_grad=True)  # the plan exists from here on
    assert w.grad is None and v.grad is None
    assert counting.calls.get("clear_grads", 0) == 1
    extra = nn.Parameter(torch.zeros(2))
    opt.param_groups[0]["params"].append(extra)  # the handle no longer covers the group
    for p in (w, v, extra):
        p.grad = torch.ones_like(p)
    opt.zero_grad()
    assert w.grad is None and v.grad is None and extra.grad is None
