"""The benchmark's device-time model (sam_fast/bench/device_model.py): its launch counts
against the multi-tensor-apply rules they implement, its byte counts against the byte
model of docs/design.md section 3 and against passes counted by hand."""

from __future__ import annotations

import math

import pytest
import torch

from sam_fast.bench import device_model as dm
from sam_fast.bench import traffic
from sam_fast.bench.contenders import Foreach, Hyper, Reference, SamFast
from sam_fast.bench.presets import PRESETS, Preset


def test_multi_tensor_apply_launches():
    # PyTorch's 32 KiB configuration: 110*7 = 770 tensors per launch with one list
    assert dm.torch_foreach_launches([1] * 770, 1) == 1
    assert dm.torch_foreach_launches([1] * 771, 1) == 2
    assert dm.torch_foreach_launches([1] * 771, 5) == math.ceil(771 / 210)
    # blocks: 2240 chunks of 65536 per launch; a tensor split across launches
    assert dm.torch_foreach_launches([2240 * 65536], 2) == 1
    assert dm.torch_foreach_launches([2240 * 65536 + 1], 2) == 2
    assert dm.torch_foreach_launches([0, 0, 5], 1) == 1  # empty tensors are skipped
    assert dm.torch_foreach_launches([], 1) == 0
    # ours: 2048 blocks, as many tensors as 32 KiB less the map and the op's room holds
    fit3 = (32764 - 256 - 2048 * 6 - 16) // (3 * 8 + 8)
    assert dm.ours_launches([1] * fit3, 3) == 1
    assert dm.ours_launches([1] * (fit3 + 1), 3) == 2
    assert dm.ours_launches([2048 * 65536 + 1], 1) == 2


SMALL = Preset("model_test", "three awkward tensors", ((3, 5), (70000,), (1,)))


@pytest.mark.parametrize("task", ["grad_norm", "sam_step", "sampa_step"])
def test_fused_bytes_are_the_byte_model(task):
    counts = dm.count_fused(task, SMALL, torch.float32, Hyper())
    n = SMALL.num_elements
    assert counts["cuda"].bytes == traffic.min_bytes(task, n, 4)
    assert counts["triton"].bytes == counts["cuda"].bytes
    ops = {"grad_norm": 1, "sam_step": 3, "sampa_step": 3}[task]  # norm, perturb, restore+step
    assert counts["cuda"].ops == ops
    # grad_sumsq's final sum is the one extra launch; the rest fit one launch per op
    assert counts["cuda"].launches == ops + 1
    assert counts["triton"].launches == ops + 1


def test_bf16_bytes_halve():
    fp32 = dm.count_fused("sam_step", SMALL, torch.float32, Hyper())["cuda"].bytes
    bf16 = dm.count_fused("sam_step", SMALL, torch.bfloat16, Hyper())["cuda"].bytes
    assert bf16 * 2 == fp32


def test_foreach_step_counted_by_hand():
    """The foreach SAM step, pass by pass (sam_fast/bench/contenders.py): first step
    norm 1, copy 2, mul 2, add_ 3; second step copy 2, add 3, mul_ 2, add_ 3, add_ 3:
    21 passes, plus a few scalars (the norms, the scale)."""
    counts = dm.count_pytorch(Foreach(), "sam_step", SMALL, torch.float32, Hyper())
    passes = 21 * SMALL.num_elements * 4
    assert passes <= counts.bytes <= passes + 64 * 4
    # one launch per foreach op (three tensors: one launch each), _foreach_norm's cleanup,
    # and the scalar ops on the norm
    assert 10 <= counts.launches <= 20


def test_reference_loop_launches_per_tensor():
    """davda54/sam's loop launches kernels per parameter: many more than the foreach step."""
    preset = PRESETS["resnet18"]
    ref = dm.count_pytorch(Reference(), "sam_step", preset, torch.float32, Hyper())
    fe = dm.count_pytorch(Foreach(), "sam_step", preset, torch.float32, Hyper())
    assert ref.launches > 4 * preset.num_tensors
    assert fe.launches < 40


def test_model_cell_predicts_from_the_counts():
    contenders = [Reference(), Foreach(), SamFast("torch"), SamFast("cpp")]
    cell = dm.model_cell(SMALL, torch.float32, "fp32", contenders, ["sam_step"], Hyper())
    names = {r.contender for r in cell.rows}
    assert names == {"reference", "foreach", "sam_fast[torch]", "sam_fast[cuda]",
                     "sam_fast[triton]"}
    for r in cell.rows:
        assert r.predicted_s == pytest.approx(
            r.bytes / dm.H200_COPY_BANDWIDTH + r.launches * dm.DEFAULT_LAUNCH_S)
        assert r.measured_s is None and r.predicted_here_s is None
    fused = next(r for r in cell.rows if r.contender == "sam_fast[cuda]")
    assert all(fused.bytes <= r.bytes for r in cell.rows)
    # with a GPU's measurements: the ratio against the prediction made with them
    cell = dm.model_cell(SMALL, torch.float32, "fp32", contenders, ["sam_step"], Hyper(),
                         measured={("foreach", "sam_step"): 1e-4}, here_bandwidth=2e12,
                         here_launch_s=5e-6)
    fe = next(r for r in cell.rows if r.contender == "foreach")
    assert fe.predicted_here_s == pytest.approx(fe.bytes / 2e12 + fe.launches * 5e-6)
    assert fe.measured_over_predicted == pytest.approx(1e-4 / fe.predicted_here_s)


def test_the_model_leaves_torch_optim_as_it_was():
    from torch.optim import optimizer as optim_module

    before = optim_module._default_to_fused_or_foreach
    dm.count_pytorch(Reference(), "sam_step", SMALL, torch.float32, Hyper())
    assert optim_module._default_to_fused_or_foreach is before
    from sam_fast import dispatch

    table = dict(dispatch._BACKENDS["torch"].ops)
    dm.count_fused("sam_step", SMALL, torch.float32, Hyper())
    assert dispatch._BACKENDS["torch"].ops == table


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_launch_cost_is_measured_on_a_gpu():
    seconds = dm.measure_launch_seconds(torch.device("cuda"))
    assert 1e-7 < seconds < 1e-4
