"""ESAM's and BSAM's generators: seeded and keyed by the device's ordinal among the
optimizer's devices of its type (sam_fast/family.py, docs/family.md "ESAM and BSAM under
DDP"), so that DDP rank r on cuda:r draws what one process on cuda:0 draws and a checkpoint
resumes on another rank layout; checkpoints with the older ``str(device)`` keys still load;
bad keys are refused before anything is touched.

The ordinal mapping is tested on ``torch.device`` objects (no allocation, no GPU needed);
what only a GPU shows is in the ``gpu`` tests at the end."""

from __future__ import annotations

import copy
import io
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import params_of
from models import batches, loss_of, small_cnn
from sam_fast import BSAM, ESAM
from sam_fast.family import _device_ordinals, _device_seed, _rng_devices, _rng_key

SEED = 5
CPU = torch.device("cpu")
HAS_CUDA = torch.cuda.is_available()
per_example = nn.CrossEntropyLoss(reduction="none")


def cuda(i: int) -> torch.device:
    return torch.device("cuda", i)


def groups(*devices_per_group):
    """Param groups of stand-ins that have only a device (all the ordinals read)."""
    return [{"params": [SimpleNamespace(device=d) for d in ds]} for ds in devices_per_group]


def old_seed(seed: int, device: torch.device) -> int:
    """The seeding before the ordinals: offset by the device index."""
    return (seed + 7919 * (0 if device.index is None else device.index + 1)) % 2**63


def seed_of(seed, device, param_groups):
    ordinals = _device_ordinals(param_groups)
    return _device_seed(seed, device, 0 if device.index is None else ordinals[device])


# -- the ordinals and the seeds ---------------------------------------------------------------

def test_ordinals_are_per_type_in_order_of_first_appearance():
    gs = groups([cuda(3), CPU, cuda(1)], [cuda(3), cuda(0), CPU])
    assert _device_ordinals(gs) == {cuda(3): 0, CPU: 0, cuda(1): 1, cuda(0): 2}
    assert _device_ordinals(groups([])) == {}


def test_one_process_seeds_as_before_on_the_cpu_and_on_cuda0():
    assert seed_of(SEED, CPU, groups([CPU])) == SEED == old_seed(SEED, CPU)
    assert seed_of(SEED, cuda(0), groups([cuda(0)])) == old_seed(SEED, cuda(0))
    # A model on cuda:0 and cuda:1 (in that order): each device its own seed, as before.
    gs = groups([cuda(0), cuda(1)])
    assert [seed_of(SEED, d, gs) for d in (cuda(0), cuda(1))] == [
        old_seed(SEED, cuda(0)), old_seed(SEED, cuda(1))]
    # The CPU (ESAM's swp="tensor" draws there) is offset 0 beside any GPU.
    assert seed_of(SEED, CPU, gs) == SEED


def test_ddp_rank_r_on_cuda_r_seeds_as_one_process_on_cuda0():
    # Under DDP and FSDP2 alike (each rank holds one device and, under FSDP2, draws for the
    # whole model: sam_fast.distributed.shard_of_draw), with no special case for sharding.
    one_process = seed_of(SEED, cuda(0), groups([cuda(0)]))
    assert {seed_of(SEED, cuda(r), groups([cuda(r)])) for r in range(8)} == {one_process}
    # ... while the devices of one process keep their own seeds.
    gs = groups([cuda(2), cuda(5), cuda(7)])
    assert len({seed_of(SEED, d, gs) for d in (cuda(2), cuda(5), cuda(7))}) == 3
    assert seed_of(SEED, cuda(2), gs) == one_process  # the first one is cuda:0's


def test_state_keys_are_ordinals():
    assert _rng_key(cuda(3), 0) == "cuda#0"
    assert _rng_key(CPU, 0) == "cpu#0"


# -- checkpoint keys -> this optimizer's devices -------------------------------------------------

def devices_of(keys, *devices_per_group):
    return _rng_devices(keys, _device_ordinals(groups(*devices_per_group)), "ESAM")


def test_ordinal_keys_go_to_the_device_of_that_ordinal():
    # Saved by rank 0 on cuda:0, loaded by rank 3 on cuda:3 (or one process on cuda:1).
    assert devices_of(["cuda#0", "cpu#0"], [cuda(3)]) == {"cuda#0": cuda(3), "cpu#0": CPU}
    assert devices_of(["cuda#0", "cuda#1"], [cuda(1), cuda(0)]) == {
        "cuda#0": cuda(1), "cuda#1": cuda(0)}
    assert devices_of(["cpu#0"], [CPU]) == {"cpu#0": CPU}
    assert devices_of([], [CPU]) == {}


def test_old_keys_on_their_own_layout_go_to_the_devices_they_name():
    assert devices_of(["cpu"], [CPU]) == {"cpu": CPU}
    assert devices_of(["cuda:3"], [cuda(3)]) == {"cuda:3": cuda(3)}
    # A model on cuda:1 then cuda:0: each state goes back to its own device.
    assert devices_of(["cuda:0", "cuda:1"], [cuda(1), cuda(0)]) == {
        "cuda:0": cuda(0), "cuda:1": cuda(1)}


def test_old_keys_on_another_layout_take_ordinals_by_increasing_index():
    # DDP rank 3's checkpoint ("cuda:3") resumed on rank 0, or by one process on cuda:0.
    assert devices_of(["cuda:3"], [cuda(0)]) == {"cuda:3": cuda(0)}
    assert devices_of(["cuda:5", "cuda:2"], [cuda(0), cuda(1)]) == {
        "cuda:2": cuda(0), "cuda:5": cuda(1)}
    assert devices_of(["cuda:0", "cuda:3"], [cuda(0), cuda(1)]) == {
        "cuda:0": cuda(0), "cuda:3": cuda(1)}


@pytest.mark.parametrize("keys, devices, match", [
    (["cuda#1"], [cuda(0)], "'cuda#1'.*does not have.*cuda:0 \\(cuda#0\\)"),
    (["cuda#0"], [CPU], "'cuda#0'.*does not have.*none"),
    (["cuda:0", "cuda:1"], [cuda(4)], "'cuda:1'.*does not have"),
    (["cpu#1"], [CPU], "'cpu#1'.*does not have"),
    (["gpu:x"], [CPU], "bad generator key 'gpu:x'"),
    ([0], [CPU], "bad generator key 0"),
    (["cuda#"], [cuda(0)], "bad generator key"),
    (["cuda:0", "cuda#0"], [cuda(0)], "'cuda:0' and 'cuda#0' both name cuda:0"),
    (["cpu", "cpu#0"], [CPU], "both name cpu"),
])
def test_bad_keys_are_refused(keys, devices, match):
    with pytest.raises(ValueError, match=match):
        devices_of(keys, devices)


# -- on the CPU, end to end -----------------------------------------------------------------------

def _roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def esam(model, swp="element", seed=SEED):
    return ESAM(model.parameters(), torch.optim.SGD, rho=0.05, beta=0.5, swp=swp, seed=seed,
                lr=0.05, momentum=0.9)


def bsam(model, seed=SEED):
    return BSAM(model.parameters(), num_data=100, lr=0.05, rho=0.05, seed=seed)


def run(model, opt, data):
    for batch in data:
        if isinstance(opt, ESAM):
            opt.step(lambda idx=None, batch=batch: per_example(model(batch[0]), batch[1]))
            continue

        def closure(batch=batch):
            loss = loss_of(model, batch)
            loss.backward()
            return loss

        opt.step(closure)


def rng_of(state):
    extra = state["sam_fast"]
    return extra["esam_rng"] if "esam_rng" in extra else extra["rng"]


CASES = {"esam-element": lambda m, **kw: esam(m, "element", **kw),
         "esam-tensor": lambda m, **kw: esam(m, "tensor", **kw),
         "bsam": bsam}


@pytest.mark.parametrize("case", list(CASES))
def test_cpu_checkpoints_key_by_ordinal(case):
    model = small_cnn(0)
    opt = CASES[case](model)
    assert rng_of(opt.state_dict()) == {}  # nothing drawn yet
    run(model, opt, batches(1))
    assert list(rng_of(opt.state_dict())) == ["cpu#0"]
    assert opt._generator(CPU).initial_seed() == SEED  # the CPU's seed, as before


@pytest.mark.parametrize("case", list(CASES))
def test_a_checkpoint_with_old_keys_resumes_bit_for_bit(case):
    data = batches(6)
    straight = small_cnn(0)
    run(straight, CASES[case](straight), data)
    first = small_cnn(0)
    opt1 = CASES[case](first)
    run(first, opt1, data[:3])
    ckpt = _roundtrip({"model": first.state_dict(), "opt": opt1.state_dict()})
    rng = rng_of(ckpt["opt"])
    rng["cpu"] = rng.pop("cpu#0")  # as the seeding by device index saved it
    resumed = small_cnn(3)
    opt2 = CASES[case](resumed, seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    run(resumed, opt2, data[3:])
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters()))


@pytest.mark.parametrize("case", list(CASES))
def test_a_checkpoint_before_any_draw_remakes_the_generators_from_its_seed(case):
    """A generator the checkpoint has no state for is dropped at load, so that it is made
    from the checkpoint's seed on first use, as in the optimizer that saved it."""
    data = batches(4)
    straight = small_cnn(0)
    run(straight, CASES[case](straight), data)
    fresh = small_cnn(0)
    ckpt = _roundtrip({"model": fresh.state_dict(), "opt": CASES[case](fresh).state_dict()})
    used = small_cnn(0)
    opt = CASES[case](used, seed=123)
    run(used, opt, data[:2])  # its generators have drawn
    used.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    run(used, opt, data)
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), used.parameters()))


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bad, match", [
    ({"cuda#0": None}, "'cuda#0'.*does not have"),
    ({"cuda:1": None}, "'cuda:1'.*does not have"),
    ({"nonsense": None}, "bad generator key 'nonsense'"),
    ({"cpu#0": torch.zeros(16, dtype=torch.uint8)}, "not one of a generator on cpu"),
    ({"cpu#0": [1, 2]}, "must be a CPU uint8 tensor"),
    ([], "must be a dict"),
])
def test_bad_generator_states_are_refused_before_anything_is_touched(case, bad, match):
    model = small_cnn(0)
    opt = CASES[case](model)
    run(model, opt, batches(2))
    good = copy.deepcopy(opt.state_dict())
    state = copy.deepcopy(opt.state_dict())
    state["param_groups"][0]["lr"] = 0.5  # what a load that went ahead would change
    for v in state["state"].values():
        for k, t in v.items():
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                t.add_(1.0)
    state["sam_fast"]["steps"] = 99
    if isinstance(bad, dict):
        rng_of(state).clear()
        rng_of(state).update(bad)
    else:
        state["sam_fast"]["esam_rng" if isinstance(opt, ESAM) else "rng"] = bad
    weights = params_of(model)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state)
    after = opt.state_dict()
    assert after["param_groups"] == good["param_groups"]
    assert after["sam_fast"]["steps"] == good["sam_fast"]["steps"]
    assert all(torch.equal(a, b) for a, b in zip(rng_of(after).values(), rng_of(good).values()))
    for i, v in good["state"].items():
        assert all(not isinstance(t, torch.Tensor) or torch.equal(t, after["state"][i][k])
                   for k, t in v.items())
    assert all(torch.equal(p, q) for p, q in zip(weights, model.parameters()))


def test_generator_given_is_keyed_by_ordinal_and_kept_on_load():
    model = small_cnn(0)
    gen = torch.Generator().manual_seed(11)
    opt = ESAM(model.parameters(), torch.optim.SGD, beta=0.5, generator=gen, lr=0.05)
    run(model, opt, batches(2))
    saved = _roundtrip(opt.state_dict())
    assert list(saved["sam_fast"]["esam_rng"]) == ["cpu#0"]
    run(model, opt, batches(1))
    opt.load_state_dict(saved)  # no seed: the caller's generator is the one set back
    assert opt._generator(CPU) is gen
    assert torch.equal(gen.get_state(), saved["sam_fast"]["esam_rng"]["cpu#0"])


# -- what only a GPU shows -------------------------------------------------------------------------

def _model_on(device):
    return small_cnn(0).to(device)


def _data_on(device, n):
    return [(x.to(device), y.to(device)) for x, y in batches(n)]


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["esam-element", "bsam"])
def test_gpu_first_cuda_device_seeds_as_cuda0_and_resumes_old_rank_keys(case):
    """On cuda:0 the seed is what it was (SEED + 7919) and the state is keyed "cuda#0"; a
    checkpoint DDP rank 3 saved with the older keys ("cuda:3") resumes here bit for bit."""
    device = cuda(0)
    data = _data_on(device, 6)
    straight = _model_on(device)
    opt = CASES[case](straight)
    run(straight, opt, data)
    assert opt._generator(device).initial_seed() == old_seed(SEED, device)
    assert list(rng_of(opt.state_dict())) == ["cuda#0"]
    first = _model_on(device)
    opt1 = CASES[case](first)
    run(first, opt1, data[:3])
    ckpt = _roundtrip({"model": first.state_dict(), "opt": opt1.state_dict()})
    rng = rng_of(ckpt["opt"])
    rng["cuda:3"] = rng.pop("cuda#0")
    resumed = _model_on(device)
    opt2 = CASES[case](resumed, seed=123)
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    run(resumed, opt2, data[3:])
    assert all(torch.equal(p, q) for p, q in zip(straight.parameters(), resumed.parameters()))


# Not marked gpu: the lent machine has one GPU, where this can only skip (and the gpu marker
# turns a skip there into a failure).
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("case", ["esam-element", "bsam"])
def test_gpu_model_on_cuda1_draws_what_a_model_on_cuda0_draws(case):
    """DDP rank 1's model on cuda:1 takes the steps of one process's on cuda:0 (the same
    GPU model: CUDA's draws depend on the launch grid), and a checkpoint moves between them;
    one process over both devices draws differently on each."""
    out = []
    for device in (cuda(0), cuda(1)):
        model = _model_on(device)
        opt = CASES[case](model)
        run(model, opt, _data_on(device, 3))
        out.append(([p.cpu() for p in model.parameters()], _roundtrip(opt.state_dict())))
    assert all(torch.equal(p, q) for p, q in zip(out[0][0], out[1][0]))
    assert list(rng_of(out[1][1])) == ["cuda#0"]
    model = _model_on(cuda(1))
    opt = CASES[case](model)
    opt.load_state_dict(out[0][1])  # saved on cuda:0, loaded on cuda:1
    assert torch.equal(opt._generator(cuda(1)).get_state(), rng_of(out[0][1])["cuda#0"])
    split = small_cnn(0)
    split[0].to(cuda(0))
    split[1:].to(cuda(1))
    opt = CASES[case](split)
    assert opt._generator(cuda(0)).initial_seed() != opt._generator(cuda(1)).initial_seed()
