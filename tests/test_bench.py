"""The benchmark CLI's machinery (sam_fast.bench): presets, byte model, arguments, a smoke run.

No timing is asserted anywhere here: the runs are tiny and only their shape is checked.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import sys

import pytest
import torch

from sam_fast.bench import cli, contenders, e2e, family, presets, report, timing, traffic
from sam_fast.bench.progress import Progress


def _numels(shapes) -> list[int]:
    return sorted(math.prod(s) for s in shapes)


# -- presets -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, tensors, elements",
    [
        ("resnet50", 161, 25_557_032),  # torchvision resnet50
        ("vit_b16", 152, 86_567_656),  # torchvision vit_b_16
        ("gpt2_medium", 292, 354_823_168),  # Hugging Face gpt2-medium
        ("resnet18", 62, 11_173_962),  # CIFAR ResNet-18
        ("many_small", 10_000, 10_000_000),
        ("many_small_2k", 2_000, 2_000_000),
        ("huge", 1, 16384 * 16384),
    ],
)
def test_preset_counts_match_the_published_models(name, tensors, elements):
    p = presets.PRESETS[name]
    assert p.num_tensors == tensors
    assert p.num_elements == elements


def test_resnet18_preset_is_the_e2e_model():
    with torch.device("meta"):
        model = e2e.ResNet18()
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert sorted(shapes) == sorted(presets.PRESETS["resnet18"].shapes)


def test_gpt2_medium_preset_has_the_tensor_sizes_of_a_gpt2_medium_model():
    # The e2e GPT at GPT-2-medium's sizes has the same tensors (some transposed: HF's Conv1D).
    with torch.device("meta"):
        model = e2e.GPT(vocab=50257, ctx=1024, d=1024, layers=24, heads=16)
    assert _numels(p.shape for p in model.parameters()) == _numels(
        presets.PRESETS["gpt2_medium"].shapes)


def test_resnet50_preset_structure():
    shapes = presets.PRESETS["resnet50"].shapes
    convs = [s for s in shapes if len(s) == 4]
    assert len(convs) == 53  # 1 stem + 16 blocks x 3 + 4 downsample
    assert shapes[0] == (64, 3, 7, 7) and shapes[-2] == (1000, 2048)


def test_default_presets_exist_for_both_devices():
    for device_type in ("cpu", "cuda"):
        for name in presets.default_presets(device_type):
            assert name in presets.PRESETS


# -- byte model -------------------------------------------------------------------------------


def test_byte_model_follows_the_design_table():
    n, fp32 = 1000, 4
    b = {w: traffic.min_bytes(w, n, fp32) for w in traffic.WORKLOADS}
    assert b["grad_norm"] == 4 * n
    assert b["first_step"] == 4 * n + 16 * n  # grad_norm + perturb_
    assert b["second_step"] == 20 * n  # restore_sgd_ with momentum
    assert b["sam_step"] == b["first_step"] + b["second_step"] == 40 * n
    assert b["sampa_update"] == 24 * n
    assert b["sampa_step"] == b["sampa_points"] + b["sampa_update"]
    assert traffic.min_bytes("sam_step", n, 2) == 20 * n  # bf16 halves it
    with pytest.raises(ValueError, match="unknown workload"):
        traffic.min_bytes("nope", n, 4)


def test_every_task_phase_has_a_byte_count():
    for task, phases in traffic.TASK_PHASES.items():
        assert task in traffic.PASSES
        for phase in phases:
            assert phase in traffic.PASSES


# -- arguments --------------------------------------------------------------------------------


def test_defaults_on_the_cpu():
    settings, notes = cli.parse_settings(["--device", "cpu"])
    assert settings.device == torch.device("cpu")
    assert settings.presets == list(presets.default_presets("cpu"))
    assert settings.dtypes == ["fp32", "bf16"]
    assert settings.micro and settings.e2e
    assert "torch" in settings.backends
    for b in settings.backends:
        assert contenders.dispatch.why_unavailable(b, "cpu") is None


def test_lists_by_comma_and_repetition():
    settings, _ = cli.parse_settings(
        ["--device", "cpu", "--preset", "tiny,resnet18", "--preset", "tiny", "--dtype", "bf16",
         "--contenders", "reference,sam_fast", "--backend", "torch", "--no-e2e"])
    assert settings.presets == ["tiny", "resnet18"]
    assert settings.dtypes == ["bf16"]
    assert settings.contenders == ["reference", "sam_fast"]
    assert settings.backends == ["torch"]
    assert not settings.e2e


def test_preset_all():
    settings, _ = cli.parse_settings(["--device", "cpu", "--preset", "all"])
    assert settings.presets == list(presets.PRESETS)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "resnet51"], "unknown 'resnet51'"),
        (["--dtype", "fp8"], "unknown 'fp8'"),
        (["--contenders", "apex"], "unknown 'apex'"),
        (["--backend", "nope"], "unknown 'nope'"),
        (["--tasks", "adam"], "unknown 'adam'"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--device", "meta"], "only cpu and cuda"),
        (["--device", "banana"], "not a device"),
        (["--no-e2e", "--e2e-only"], "not allowed with"),
    ],
)
def test_bad_arguments_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.parse_settings(["--device", "cpu", *argv] if "--device" not in argv else argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only machine")
def test_cuda_on_a_cpu_machine_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        cli.parse_settings(["--device", "cuda"])
    assert "CUDA is not available" in capsys.readouterr().err


def test_compile_policy():
    settings, _ = cli.parse_settings(["--device", "cpu"])
    assert cli._compile_allowed(settings, "fp32", 161, 0.0) is None
    assert "fp32" in cli._compile_allowed(settings, "bf16", 161, 0.0)
    assert "tensors" in cli._compile_allowed(settings, "fp32", 10_000, 0.0)
    assert "budget" in cli._compile_allowed(settings, "fp32", 161, 1e9)
    assert cli._compile_allowed(settings, "fp32", 0, 0.0, e2e=True) is not None  # CPU e2e
    settings.compile = "off"
    assert cli._compile_allowed(settings, "fp32", 161, 0.0) is not None
    settings.compile = "all"
    assert cli._compile_allowed(settings, "bf16", 10_000, 1e9) is None


def test_list_mentions_every_preset_and_backend():
    text = cli.list_everything(torch.device("cpu"))
    for name in presets.PRESETS:
        assert name in text
    for b in contenders.sam_fast_backends():
        assert f"sam_fast[{b}]" in text


# -- timing machinery (no time is asserted) ---------------------------------------------------


class _CountingRunner:
    phases = ("a", "b")

    def __init__(self, log, name, copy):
        self.log, self.name, self.copy = log, name, copy

    def pre(self, phase):
        self.log.append(("pre", self.name, self.copy, phase))

    def run(self, phase):
        self.log.append(("run", self.name, self.copy, phase))


class _FakeTimer:
    def time(self, fn):
        fn()
        return 1.0


def test_interleaved_loop_rotates_order_and_copies():
    log = []
    tasks = [timing.Task(n, [_CountingRunner(log, n, k) for k in range(2)], ("a", "b"))
             for n in ("x", "y", "z")]
    out = timing.measure_interleaved(tasks, _FakeTimer(),
                                     timing.Budget(warmup=1, min_repeats=4, max_repeats=4))
    assert all(len(out.total[n]) == 4 for n in "xyz")
    assert all(v == 2.0 for n in "xyz" for v in out.total[n])  # two phases of 1.0
    assert out.phases["x"]["a"] == [1.0] * 4
    runs = [(name, copy) for kind, name, copy, phase in log if kind == "run" and phase == "a"]
    assert [name for name, _ in runs[:3]] == ["x", "y", "z"]
    assert [name for name, _ in runs[3:6]] == ["y", "z", "x"]  # the order rotates
    assert [copy for _, copy in runs[:4]] == [0, 1, 0, 1]  # consecutive calls, other copies
    assert all(log[i][0] == "pre" and log[i + 1][0] == "run" for i in range(0, len(log), 2))


class _FailingRunner(_CountingRunner):
    def run(self, phase):
        raise RuntimeError("boom")


def test_interleaved_loop_drops_a_failing_task_and_goes_on():
    log = []
    tasks = [timing.Task("ok", [_CountingRunner(log, "ok", 0)], ("a",)),
             timing.Task("bad", [_FailingRunner(log, "bad", 0)], ("a",))]
    out = timing.measure_interleaved(tasks, _FakeTimer(),
                                     timing.Budget(warmup=0, min_repeats=3, max_repeats=3))
    assert out.failed == {"bad": "RuntimeError: boom"}
    assert out.total["ok"] == [1.0] * 3 and out.total["bad"] == []


def test_stats():
    s = timing.Stats([3.0, 1.0, 2.0, 4.0, 100.0])
    assert s.median == 3.0
    assert s.q1 == 2.0 and s.q3 == 4.0
    assert s.spread == pytest.approx(2.0 / 3.0)


def test_paired_ratio_cancels_drift_between_rounds():
    # The machine slows down 10x in the second half; each round's ratio stays 2.
    ref = [2.0, 2.0, 20.0, 20.0, 20.0]
    fast = [1.0, 1.0, 10.0, 10.0, 10.0]
    assert timing.paired_ratio(ref, fast) == 2.0
    assert timing.paired_ratio(ref, fast[:3]) == 20.0  # unpaired: ratio of the medians
    assert timing.paired_ratio([], fast) is None


def test_peak_extra_memory_sees_a_temporary_on_the_cpu():
    with timing.peak_extra_memory(torch.device("cpu")) as peak:
        t = torch.empty(1 << 20, dtype=torch.float32)
        del t
    assert peak.bytes >= 4 << 20


def test_max_relative_difference():
    a = [torch.tensor([1.0, 2.0]), torch.zeros(3)]
    assert contenders.max_relative_difference(a, a) == 0.0
    b = [torch.tensor([1.0, 2.5]), torch.zeros(3)]
    assert contenders.max_relative_difference(a, b) == pytest.approx(0.5 / 2.5)
    nan = [torch.tensor([math.nan])]
    assert contenders.max_relative_difference(nan, [torch.ones(1)]) == math.inf


# -- smoke runs -------------------------------------------------------------------------------


def test_cli_smoke_run_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "res"
    code = cli.main(["--device", "cpu", "--preset", "tiny", "--dtype", "fp32,bf16", "--quick",
                     "--no-e2e", "--no-host", "--compile", "off", "--no-progress",
                     "--backend", "torch",
                     "--contenders", "reference,pytorch_optimizer,foreach,sam_fast",
                     "--out", str(out)])
    assert code == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["environment"]["torch"] == torch.__version__
    assert payload["copy_bandwidth_bytes_per_s"] > 0
    cells = {(c["preset"], c["dtype"]): c for c in payload["cells"]}
    assert set(cells) == {("tiny", "fp32"), ("tiny", "bf16")}
    fp32 = cells[("tiny", "fp32")]
    rows = {(r["contender"], r["workload"]) for r in fp32["rows"]}
    for name in ("reference", "foreach", "sam_fast[torch]"):
        for workload in traffic.WORKLOADS:
            assert (name, workload) in rows, (name, workload)
    ref = next(r for r in fp32["rows"] if (r["contender"], r["workload"]) ==
               ("reference", "sam_step"))
    assert ref["speedup_vs_reference"] == pytest.approx(1.0)
    assert ref["bytes"] == 40 * fp32["num_elements"]
    assert len(ref["samples_s"]) == ref["repeats"] == 3
    for name, checks in fp32["checks"].items():
        for task, check in checks.items():
            assert check["error"] is None, (name, task)
            assert check["max_rel_diff"] < 1e-5, (name, task)
            assert check["peak_extra_bytes"] > 0
    md = (out / "results.md").read_text()
    assert "| contender |" in md and "sam_fast[torch]" in md
    assert payload["host"] is None  # --no-host
    text = capsys.readouterr().out
    assert "SAM: the optimizer's share of one step" in text
    assert "SAMPa" in text
    # the device-time model of every cell: the contenders measured (sam_fast's torch
    # backend; the reference and foreach loops), predicted from their counts
    model = {(r["contender"], r["task"]): r for r in fp32["model"]["rows"]}
    for name in ("reference", "foreach", "sam_fast[torch]"):
        for task in ("grad_norm", "sam_step", "sampa_step"):
            assert model[(name, task)]["predicted_s"] > 0
    assert model[("reference", "sam_step")]["launches"] > model[("foreach", "sam_step")][
        "launches"]
    assert "device-time model" in text and "device-time model" in md


def test_e2e_smoke_run():
    sizes = e2e.E2ESizes(cnn_batch=2, gpt_batch=1, gpt_ctx=8, gpt_d=32, gpt_layers=1,
                         gpt_heads=2, gpt_vocab=64, image_size=8)
    chosen = [contenders.Reference(), contenders.SamFast("torch")]
    result = e2e.run_e2e(torch.device("cpu"), chosen, contenders.Hyper(),
                         timing.Budget(warmup=1, min_repeats=1, max_repeats=1), timing.CpuTimer(),
                         sizes=sizes, models=("gpt",))  # ResNet-18's 11M parameters: too slow
    assert not result.notes
    kinds = {(r.model.split()[0], r.optimizer, r.contender) for r in result.rows}
    for model in ("gpt",):
        assert (model, "SGD", "torch.optim.SGD") in kinds
        assert (model, "SAM", "reference") in kinds
        assert (model, "SAM", "sam_fast[torch]") in kinds
        assert (model, "SAMPa", "sam_fast[torch]") in kinds
    assert all(r.ratio_to_sgd is not None and r.ratio_to_sgd > 0 for r in result.rows)
    text = report.e2e_table(result.to_json())
    assert "step / SGD step" in text


def test_e2e_resnet18_trains_on_small_images():
    torch.manual_seed(0)
    model = e2e.ResNet18()
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_plots_degrade_to_a_note_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    payload = {"cells": [], "e2e": None, "environment": {"device_name": "x"}}
    notes = report.plot(payload, tmp_path)
    assert notes and "matplotlib is not installed" in notes[0]
    assert not list(tmp_path.glob("*.png"))


def test_plain_progress_line_without_tqdm(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    stream = io.StringIO()
    bar = Progress(2, stream=stream)
    assert not bar.uses_tqdm
    bar.label("tiny fp32")
    bar.advance()
    bar.advance()
    bar.close()
    assert "[2/2" in stream.getvalue() and "tiny fp32" in stream.getvalue()


# -- host cost --------------------------------------------------------------------------------

from sam_fast.bench import host  # noqa: E402

_QUICK = timing.Budget(warmup=1, min_repeats=2, max_repeats=2, max_seconds=0.0)


def test_host_only_settings():
    settings, _ = cli.parse_settings(["--device", "cpu", "--host-only"])
    assert settings.host and not settings.micro and not settings.e2e
    assert settings.presets == list(cli.HOST_ONLY_PRESETS)
    assert settings.host_budget.min_repeats == host.HOST_BUDGET.min_repeats
    settings, _ = cli.parse_settings(["--device", "cpu", "--e2e-only"])
    assert not settings.host
    settings, _ = cli.parse_settings(["--device", "cpu", "--no-host", "--quick"])
    assert not settings.host and settings.micro
    settings, _ = cli.parse_settings(["--device", "cpu", "--host-only", "--repeats", "7"])
    assert settings.host_budget.min_repeats == 7


def test_host_only_and_no_host_exclude_each_other(capsys):
    with pytest.raises(SystemExit):
        cli.parse_settings(["--device", "cpu", "--host-only", "--no-host"])
    assert "exclude each other" in capsys.readouterr().err


def test_host_workspace_has_the_topology_with_tiny_tensors():
    p = presets.PRESETS["resnet50"]
    ws = host.HostWorkspace(p, torch.device("cpu"))
    assert len(ws.params) == 161
    assert all(t.numel() == host.HOST_NUMEL for t in ws.params + ws.g1 + ws.g2)
    real = host.HostWorkspace(presets.PRESETS["tiny"], torch.device("cpu"), real_shapes=True)
    assert [tuple(t.shape) for t in real.params] == list(presets.PRESETS["tiny"].shapes)


class _RecordingStepper:
    def __init__(self, params):
        self.params, self.seen = params, []

    def first_step(self):
        self.seen.append([p.grad.data_ptr() for p in self.params])
        for p in self.params:
            p.grad = None

    second_step = first_step


def test_host_runner_attaches_fresh_gradients_before_every_pass():
    ws = host.HostWorkspace(presets.PRESETS["tiny"], torch.device("cpu"))
    stepper = _RecordingStepper(ws.params)
    runner = host.SamHostRunner(ws, stepper)
    keep = []  # hold the gradients so that their memory cannot be reused
    for _ in range(2):
        for phase in runner.phases:
            runner.pre(phase)
            keep.append([p.grad for p in ws.params])
            runner.run(phase)
    pools = {g.data_ptr() for g in ws.g1 + ws.g2}
    ptrs = [ptr for step in stepper.seen for ptr in step]
    assert len(set(ptrs)) == len(ptrs)  # a new tensor every pass
    assert not pools & set(ptrs)  # never the pools themselves


class _Broken(contenders.Contender):
    name = "broken"

    def sam_stepper(self, params, hp):
        raise RuntimeError("no step today")


def _host_contenders():
    chosen = [contenders.Reference(), contenders.Foreach(), contenders.SamFast("torch"),
              _Broken()]
    floor = host.DirectOpFloor()
    if floor.unavailable(torch.device("cpu"), torch.float32) is None:
        chosen.append(floor)
    return chosen


def test_measure_host_reports_every_contender_and_marks_failures():
    chosen = _host_contenders()
    cell = host.measure_host(presets.PRESETS["tiny"], torch.device("cpu"), chosen,
                             contenders.Hyper(), _QUICK)
    assert cell.num_tensors == 15 and cell.shapes == "tiny" and cell.numel_per_tensor == 4
    assert set(cell.workloads) == set(host.WORKLOADS)
    rows = {w: {r.contender: r for r in rs} for w, rs in cell.workloads.items()}
    for name in ("reference", "foreach", "sam_fast[torch]", "broken"):
        assert name in rows["sam_sgd"], name
    assert "foreach" not in rows["sam_adamw"]  # it has no AdamW step
    assert "foreach" not in rows["sampa_sgd"]
    assert set(rows["sampa_sgd"]) >= {"reference", "sam_fast[torch]"}
    broken = rows["sam_sgd"]["broken"]
    assert broken.error == "RuntimeError: no step today" and broken.host_median_s is None
    assert any("broken failed on sam_sgd" in n for n in cell.notes)
    for w in host.WORKLOADS:
        ref = rows[w]["reference"]
        assert ref.vs_reference == pytest.approx(1.0)
        assert ref.repeats == 2 and len(ref.host_samples_s) == len(ref.host_cpu_samples_s) == 2
        assert ref.host_cpu_median_s > 0
        ours = rows[w]["sam_fast[torch]"]
        assert ours.error is None and ours.host_median_s > 0 and ours.vs_reference > 0
        assert ours.device_median_s is None and ours.host_bound is None  # CPU: host only
        if host.FLOOR in rows[w] and rows[w][host.FLOOR].error is None:
            assert rows[w][host.FLOOR].vs_floor == pytest.approx(1.0)
            assert ours.vs_floor > 0
    # the order of the rows is the contenders' order
    assert [r.contender for r in cell.workloads["sam_sgd"]][:3] == [
        "reference", "foreach", "sam_fast[torch]"]


def _closure_from(params, grads):
    it = iter(grads)

    def closure():
        for p, g in zip(params, next(it)):
            p.grad = g.clone()
        return torch.zeros(())

    return closure


def test_reference_sampa_loop_is_sampa():
    from sam_fast import SAMPa

    torch.manual_seed(0)
    shapes = [(3, 2), (4,), (1,)]
    start = [torch.randn(s) for s in shapes]
    seq = [[torch.randn(s) for s in shapes] for _ in range(9)]
    hp = contenders.Hyper()
    ref_params = [torch.nn.Parameter(t.clone()) for t in start]
    ours_params = [torch.nn.Parameter(t.clone()) for t in start]
    ref = host.ReferenceSAMPa(ref_params, hp)
    ours = SAMPa(ours_params, torch.optim.SGD, rho=hp.sampa_rho, lam=hp.lam,
                 perturb_eps=hp.eps, backend="torch", **hp.sgd_kwargs())
    # step k's closures: the kept one (batch k-1) at x~, then batch k at y. The
    # gradient a closure returns here depends only on the call order, alike for both.
    c_ref, c_ours = _closure_from(ref_params, seq), _closure_from(ours_params, seq)
    for _ in range(4):
        ref.step(c_ref)
        ours.step(c_ours)
    for a, b in zip(ref_params, ours_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_direct_op_floor_is_the_sam_step():
    floor = host.DirectOpFloor()
    if floor.unavailable(torch.device("cpu"), torch.float32) is not None:
        pytest.skip("no compiled ops here")
    from sam_fast import SAM

    torch.manual_seed(0)
    hp = contenders.Hyper()
    start = [torch.randn(5), torch.randn(2, 3)]
    grads = [[torch.randn_like(t) for t in start] for _ in range(4)]
    a = [torch.nn.Parameter(t.clone()) for t in start]
    b = [torch.nn.Parameter(t.clone()) for t in start]
    fl = floor.sam_stepper(a, hp)
    ours = SAM(b, torch.optim.SGD, rho=hp.rho, perturb_eps=hp.eps, backend="torch",
               **hp.sgd_kwargs())
    for k in range(0, 4, 2):
        for params, first, second in ((a, fl.first_step, fl.second_step),
                                      (b, lambda: ours.first_step(zero_grad=True),
                                       lambda: ours.second_step(zero_grad=True))):
            for p, g in zip(params, grads[k]):
                p.grad = g.clone()
            first()
            for p, g in zip(params, grads[k + 1]):
                p.grad = g.clone()
            second()
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


def test_host_table_marks_host_bound_cells():
    row = dict(contender="c", host_median_s=2e-3, host_cpu_median_s=1.5e-3,
               device_median_s=1e-3, host_bound=True,
               vs_reference=3.0, vs_floor=1.5, error=None)
    slow = dict(row, contender="d", host_median_s=1e-4, host_cpu_median_s=9e-5,
                host_bound=False)
    bad = dict(contender="e", error="TypeError: x", host_median_s=None)
    cell = {"preset": "p", "device": "cuda:0", "num_tensors": 3, "shapes": "real",
            "numel_per_tensor": None, "workloads": {"sam_sgd": [row, slow, bad]}, "notes": []}
    text = report.host_table(cell, markdown=True)
    assert "| SAM+SGD | c | 1.5 ms | 2 ms | 3.00x | 1.50x | 1 ms | HOST |" in text
    assert "| SAM+SGD | d | 90 us | 100 us | 3.00x | 1.50x | 1 ms | device |" in text
    assert "| SAM+SGD | e | failed |" in text
    assert "real shapes" in report.host_cell_title(cell)


def test_cli_host_only_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "res"
    code = cli.main(["--device", "cpu", "--host-only", "--preset", "tiny", "--quick",
                     "--compile", "off", "--no-progress", "--backend", "torch",
                     "--contenders", "reference,foreach,sam_fast", "--out", str(out)])
    assert code == 0
    payload = json.loads((out / "results.json").read_text())
    assert payload["cells"] == [] and payload["e2e"] is None
    hostp = payload["host"]
    assert hostp["numel_per_tensor"] == host.HOST_NUMEL
    (cell,) = hostp["cells"]
    assert cell["preset"] == "tiny" and cell["shapes"] == "tiny"
    names = {r["contender"] for r in cell["workloads"]["sam_sgd"]}
    assert {"reference", "foreach", "sam_fast[torch]"} <= names
    for r in cell["workloads"]["sam_sgd"]:
        assert r["error"] is None or r["contender"] == host.FLOOR
        if r["error"] is None:
            assert r["host_median_s"] > 0 and len(r["host_samples_s"]) == r["repeats"]
    md = (out / "results.md").read_text()
    assert "## Host cost of one step" in md and "| SAM+SGD | sam_fast[torch] |" in md
    text = capsys.readouterr().out
    assert "host cost: tiny topology" in text
    # the SAM family's host share: every variant, its rival beside it, no end to end here
    fam = payload["family"]
    assert fam["e2e"] == [] and fam["host_tensors"] == len(presets.resnet18_cifar_shapes())
    measured = {(r["variant"], r["contender"]) for r in fam["host"]}
    for v in family.variants():
        assert ((v.name, "sam_fast") in measured) == v.host
        if v.rival is not None and (v.rival[0] != "pytorch_optimizer" or _has_po()):
            assert (v.name, v.rival[0]) in measured
    assert all(r["median_s"] > 0 for r in fam["host"])
    assert "## The SAM family" in md and "the SAM family" in text


def _has_po() -> bool:
    try:
        import pytorch_optimizer  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("protocol", ["two", "closure", "one"])
def test_family_host_rounds_step_the_optimizer(protocol):
    """A timed round really takes the variant's steps (the weights move, the step count)."""
    v = next(v for v in family.variants() if v.protocol == protocol)  # SAM, LookSAM, MSAM
    n = family.host_topology()
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(family.HOST_NUMEL)) for _ in range(n)]
    grads = [torch.randn(family.HOST_NUMEL) for _ in range(n)]
    opt = v.ours(params)
    before = [p.detach().clone() for p in params]
    one = family.host_round(opt, params, grads, v.protocol, v.steps)
    one()
    if protocol == "one":  # Momentum-SAM's first step has no momentum: a plain step
        one()
    assert all(not torch.equal(p, q) for p, q in zip(params, before))
    assert opt._counter["steps"] == v.steps * (2 if protocol == "one" else 1)


def test_family_e2e_smoke_run():
    sizes = e2e.E2ESizes(cnn_batch=2, gpt_batch=1, gpt_ctx=8, gpt_d=32, gpt_layers=1,
                         gpt_heads=2, gpt_vocab=64, image_size=8)
    rows, notes = family.run_family_e2e(
        torch.device("cpu"), timing.Budget(warmup=1, min_repeats=1, max_repeats=1),
        timing.CpuTimer(), sizes=sizes, models=("gpt",))
    assert not notes
    assert {r.variant for r in rows} == {v.name for v in family.variants()}
    assert all(r.ratio_to_sgd is not None and r.ratio_to_sgd > 0 for r in rows)
    assert {r.variant: r.steps for r in rows}["looksam_k5"] == 5
    text = report.family_e2e_table({"e2e": [dataclasses.asdict(r) for r in rows]})
    assert "ratio to SGD" in text and "momentum_sam" in text


def test_family_only_settings(capsys):
    settings, _ = cli.parse_settings(["--device", "cpu", "--family-only"])
    assert settings.family_only and settings.family
    assert not (settings.micro or settings.e2e or settings.host)
    with pytest.raises(SystemExit):
        cli.parse_settings(["--device", "cpu", "--family-only", "--no-family"])
    assert "exclude each other" in capsys.readouterr().err
