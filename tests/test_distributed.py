"""Multi-process tests on the CPU with gloo, 2 processes each (tests/dist_workers.py).

Every launch is bounded in time: a hang fails the test instead of stalling CI.
float64 models keep the comparisons tight: a data-parallel run differs from a
single process only in how the per-rank gradients are averaged (one rounding
at 2^-53), so 1e-12 relative after a few steps leaves ample headroom while
any algorithmic difference shows at 1e-3 or more.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import oracle
from conftest import params_of, run_sam
from dist_workers import (FAMILY_STEPS, FSDP_CASES, RANDOM, STEPS, _family_cases, _shard,
                          family_model, family_steps)
from models import batches, loss_of, small_convnet
from sam_fast import SAM

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch built without torch.distributed")

WORKER = Path(__file__).with_name("dist_workers.py")
F64 = torch.float64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: str, tmp_path: Path, world: int = 2, timeout: float = 180,
           dist_timeout: float = 60) -> list[dict]:
    """Run ``scenario`` in ``world`` processes; their result dicts, by rank."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               WORLD_SIZE=str(world), DIST_TIMEOUT=str(dist_timeout), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen([sys.executable, str(WORKER), scenario, str(tmp_path)],
                         env=dict(env, RANK=str(rank)), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
        for rank in range(world)
    ]
    logs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            logs.append(out.decode(errors="replace")[-3000:])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"{scenario}: processes still running after {timeout}s (a hang)")
    results = []
    for rank in range(world):
        path = tmp_path / f"rank{rank}.pt"
        results.append(torch.load(path, weights_only=False) if path.exists() else
                       {"ok": False, "error": f"no result; log:\n{logs[rank]}"})
    return results


def _assert_ok(results):
    for rank, r in enumerate(results):
        assert r["ok"], f"rank {rank} failed:\n{r.get('error')}"


@pytest.fixture(scope="module")
def single_thread():
    """The workers run with one thread; so do the references, for the same reductions."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_ddp_global_and_local_ascent(tmp_path, single_thread):
    results = launch("ddp", tmp_path)
    _assert_ok(results)
    data = batches(STEPS, batch_size=8, dtype=F64)

    # global ascent == single-process SAM on the concatenated batch
    model = small_convnet(0, F64)
    run_sam(model, SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.05, momentum=0.9,
                       weight_decay=5e-4), data)
    for r in results:
        assert oracle.max_rel_diff(r["global"], params_of(model)) < 1e-12

    # local ascent == each rank perturbed along its own gradient, second gradients averaged
    shards = [_shard(b, rank, 2) for b in data for rank in range(2)]
    problem = oracle.Problem(small_convnet(0, F64), shards, loss_of)
    sgd = oracle.SGD64(0.05, 0.9, 0, 5e-4)
    w = problem.initial()
    for step in range(STEPS):
        second = []
        for rank in range(2):
            k = 2 * step + rank
            g = problem.grad(w, k)
            scale = 0.1 / (torch.sqrt(sum((gi * gi).sum() for gi in g)) + 1e-12)
            second.append(problem.grad([wi + scale * gi for wi, gi in zip(w, g)], k))
        w = sgd.step(w, [(a + b) / 2 for a, b in zip(*second)])
    for r in results:
        assert oracle.max_rel_diff(r["local"], w) < 1e-12
    # the two modes really differ (so the local test could fail)
    assert oracle.max_rel_diff(results[0]["local"], results[0]["global"]) > 1e-6
    # replicas agree bit for bit
    assert all(torch.equal(a, b) for a, b in zip(results[0]["local"], results[1]["local"]))


def test_fsdp2_equals_unsharded(tmp_path, single_thread):
    pytest.importorskip("torch.distributed.fsdp")
    results = launch("fsdp2", tmp_path)
    _assert_ok(results)
    data = batches(STEPS, batch_size=8, dtype=F64)
    for name, (base, kw, sam_kw) in FSDP_CASES.items():
        model = small_convnet(0, F64)
        run_sam(model, SAM(model.parameters(), base, **sam_kw, **kw), data)
        for r in results:
            assert oracle.max_rel_diff(r[name], params_of(model)) < 1e-12, name


def test_two_rank_sampa_equals_sequential_sampa(tmp_path):
    results = launch("sampa_parallel", tmp_path, timeout=300)
    _assert_ok(results)
    for r in results:
        assert len(r["mismatches"]) == 8
        assert all(not calls for calls in r["mismatches"].values()), r["mismatches"]


def test_sampa_rank_failure_fails_every_rank_without_a_hang(tmp_path):
    results = launch("sampa_failure", tmp_path, dist_timeout=60, timeout=120)
    _assert_ok(results)
    assert results[1]["raised"].startswith("ValueError: rank 1's data loader died")
    assert "rank(s) [1] failed" in results[0]["raised"]
    assert results[0]["at"] == results[1]["at"] == 2
    assert results[0]["restored"] and results[1]["restored"]


def test_ddp_rank_crash_fails_the_peer_without_a_hang(tmp_path):
    results = launch("ddp_failure", tmp_path, dist_timeout=10, timeout=120)
    assert results[0]["ok"], results[0].get("error")
    assert results[0]["raised"], "rank 0 must see an error when rank 1 dies"
    assert not results[1]["ok"]  # it crashed without writing a result


# -- the SAM family (docs/family.md) ------------------------------------------------------------


def _family_single_process():
    data = batches(FAMILY_STEPS, batch_size=8, dtype=F64)
    out = {}
    for name, (make, one_pass) in _family_cases().items():
        model = family_model()
        family_steps(model, make(model.parameters()), data, one_pass)
        out[name] = params_of(model)
    return out


@pytest.mark.parametrize("scenario", ["family_ddp", "family_fsdp2"])
def test_family_data_parallel_equals_one_process(tmp_path, single_thread, scenario):
    # DDP all-reduces both passes' gradients; FSDP2 shards them, so GSAM's and LookSAM's
    # inner products and Friendly-SAM's and ESAM's norms are sums over the ranks' shards, and
    # ESAM's mask and BSAM's noise are each shard's part of one process's draw (a shard of 3
    # rows and one of 2, an empty shard). Either way the run is the single process's on the
    # whole batch, to float64 rounding of the averages.
    if scenario == "family_fsdp2":
        pytest.importorskip("torch.distributed.fsdp")
    results = launch(scenario, tmp_path, timeout=300)
    _assert_ok(results)
    want = _family_single_process()
    start = params_of(family_model())
    for name, w in want.items():
        assert oracle.max_rel_diff(w, start) > 1e-4, name  # it moved, so the check can fail
        for r in results:
            assert oracle.max_rel_diff(r[name], w) < 1e-12, name
    # The random draws matter: ESAM's two granularities and BSAM's two variants differ.
    for a, b in (("esam", "esam-tensor"), ("bsam", "bsam-official"), ("esam", "interval")):
        assert oracle.max_rel_diff(want[a], want[b]) > 1e-6, (a, b)
    if scenario == "family_fsdp2":
        for r in results:
            for name in RANDOM:  # the resumed run, generator states from the checkpoint
                assert all(torch.equal(a, b) for a, b in zip(r[name + "/resumed"], r[name])), \
                    name
            assert "gamma < 1 (SDS) does not take FSDP2's sharded" in r["esam-sds"]
            for name in ("esam-shard1", "bsam-shard1"):
                assert "sharded along dim 0 (FSDP2's Shard(0)) or replicated, got " \
                       "placements (Shard(dim=1),)" in r[name], r[name]


def test_family_under_local_ascent(tmp_path, single_thread):
    results = launch("family_local_ascent", tmp_path)
    _assert_ok(results)
    for r in results:
        assert "GSAM's update reads the first pass's gradients" in r["gsam"]
        assert r["gsam_untouched"]
    # Friendly-SAM climbs along each rank's own residual; the step's gradient is
    # all-reduced, so the replicas stay equal bit for bit.
    assert all(torch.equal(a, b) for a, b in zip(results[0]["friendly"], results[1]["friendly"]))
