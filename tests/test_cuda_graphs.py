"""A whole training step, both passes and the optimizer, captured in one CUDA graph and
replayed, on every GPU backend: possible only because no op of the steady-state step
synchronises with the host or uploads anything it could not replay. GPU tests: they run
on a lent GPU (``scripts/gpu_check``)."""

from __future__ import annotations

import pytest
import torch

import oracle
from conftest import params_of
from models import batches, loss_of, make_closure, small_cnn
from sam_fast import SAM, SAMPa

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BACKENDS = ["cuda", "triton"]
SGD_KW = dict(lr=0.05, momentum=0.9, weight_decay=5e-4)


def _sam_step(model, opt, batch):
    loss_of(model, batch).backward()
    opt.first_step(zero_grad=True)
    loss_of(model, batch).backward()
    opt.second_step(zero_grad=True)


def _sampa_step(model, opt, batch):
    opt.step(make_closure(model, batch))


def _graphed_run(make_opt, step, backend):
    """Warm up on a side stream (allocates state and the plan), capture one step, replay
    it over the remaining batches; the eager twin takes the same steps."""
    data = [(x.cuda(), y.cuda()) for x, y in batches(6)]
    graphed, eager = small_cnn(0).cuda(), small_cnn(0).cuda()
    opt_g, opt_e = make_opt(graphed, backend), make_opt(eager, backend)
    static_x, static_y = data[0][0].clone(), data[0][1].clone()
    # The twin reads its batches through static tensors too: a closure SAMPa keeps
    # then sees the current batch in both runs, as the graph's replay does.
    eager_x, eager_y = static_x.clone(), static_y.clone()

    def eager_step(batch):
        eager_x.copy_(batch[0])
        eager_y.copy_(batch[1])
        step(eager, opt_e, (eager_x, eager_y))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for batch in data[:2]:
            static_x.copy_(batch[0])
            static_y.copy_(batch[1])
            step(graphed, opt_g, (static_x, static_y))
    torch.cuda.current_stream().wait_stream(side)
    for batch in data[:2]:
        eager_step(batch)
    graph = torch.cuda.CUDAGraph()
    graphed.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        step(graphed, opt_g, (static_x, static_y))
    for batch in data[2:]:
        static_x.copy_(batch[0])
        static_y.copy_(batch[1])
        graph.replay()
        eager_step(batch)
    torch.cuda.synchronize()
    return params_of(graphed), params_of(eager)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, SGD_KW),
                                     (torch.optim.AdamW, dict(lr=1e-3, capturable=True))],
                         ids=["sgd", "adamw-capturable"])
def test_captured_sam_step_replays_as_eager(backend, base, kw):
    graphed, eager = _graphed_run(lambda m, b: SAM(m.parameters(), base, backend=b, **kw),
                                  _sam_step, backend)
    # same kernels in the same order: only cuDNN's choice of algorithms may differ
    assert oracle.max_rel_diff(graphed, eager) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_captured_sampa_step_replays_as_eager(backend):
    """The graph holds SAMPa's kept closure as a forward on the static batch; both runs
    read their batches through static tensors, so they pair batches alike."""
    graphed, eager = _graphed_run(lambda m, b: SAMPa(m.parameters(), torch.optim.SGD,
                                                     backend=b, **SGD_KW),
                                  _sampa_step, backend)
    assert oracle.max_rel_diff(graphed, eager) < 1e-5


def _family(name):
    from sam_fast import GSAM, WSAM, FriendlySAM, MomentumSAM

    return {
        "gsam": lambda m, b: GSAM(m.parameters(), torch.optim.SGD, backend=b, **SGD_KW),
        "wsam": lambda m, b: WSAM(m.parameters(), torch.optim.SGD, backend=b, **SGD_KW),
        "wsam-coupled": lambda m, b: WSAM(m.parameters(), torch.optim.SGD, decouple=False,
                                          backend=b, **SGD_KW),
        "friendly": lambda m, b: FriendlySAM(m.parameters(), torch.optim.SGD, backend=b,
                                             **SGD_KW),
        "msam": lambda m, b: MomentumSAM(m.parameters(), torch.optim.SGD, backend=b, **SGD_KW),
    }[name]


def _msam_step(model, opt, batch):
    opt.step(make_closure(model, batch))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["gsam", "wsam", "wsam-coupled", "friendly", "msam"])
def test_captured_family_step_replays_as_eager(backend, name):
    """The family members whose every step is alike (LookSAM and SAM every k steps alternate
    two kinds of step, so one graph cannot hold them): their inner products, combinations
    and running averages stay on the device, and their constants are made once."""
    step = _msam_step if name == "msam" else _sam_step
    graphed, eager = _graphed_run(_family(name), step, backend)
    assert oracle.max_rel_diff(graphed, eager) < 1e-5
