"""``sam-fast-bench`` / ``python -m sam_fast.bench``: is sam_fast worth it on this machine?

Runs with no arguments on a CPU-only machine or a GPU and finishes in a few
minutes; see ``--help`` for what it measures and how to choose.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .. import dispatch
from . import report, traffic
from .contenders import (
    PEER_NAMES,
    Contender,
    Hyper,
    build_contenders,
    interpreted_backend_note,
    sam_fast_backends,
)
from .host import (
    HOST_BUDGET,
    HOST_NUMEL,
    QUICK_HOST_BUDGET,
    WORKLOADS,
    DirectOpFloor,
    measure_host,
)
from .device_model import measure_launch_seconds, model_cell
from .micro import TASKS, run_cell
from .presets import DEFAULT_DTYPES, DTYPES, PRESETS, default_presets, format_count
from .progress import Progress
from .timing import Budget, copy_bandwidth, make_timer

CONTENDER_NAMES = (*PEER_NAMES, "sam_fast")
# torch.compile of a parameter set with more tensors than this takes minutes to build.
COMPILE_MAX_TENSORS = 1000
# Seconds of compiling after which --compile auto starts no new compile cell: compile time
# grows with the tensor count and dominates the run otherwise (the inductor cache makes
# a second run cheaper, so it may cover more cells).
COMPILE_BUDGET_S = 120.0

# Per device type: (warmup, min repeats, max repeats, seconds per measured task).
# The GPU takes many cheap repeats; the 2-core CPU default stays within a few minutes.
# On the CPU the two checked steps of every contender are its warm-up (one more round
# is added where the workspace has several copies).
DEFAULT_BUDGET = {"cuda": (3, 20, 200, 3.0), "cpu": (0, 5, 30, 2.0)}
QUICK_BUDGET = (1, 3, 3, 0.0)
# --host-only without --preset: every real model's topology (tiny tensors make them cheap)
HOST_ONLY_PRESETS = ("resnet50", "vit_b16", "gpt2_medium", "many_small", "huge")

EPILOG = f"""
what is timed: the optimizer's share of a SAM step (norm, perturbation, restore, base
step: everything but forward/backward) per phase and in total, and SAMPa's two fused
updates, for each contender on the same tensors in one process, interleaved round by
round. GPU: CUDA events after warm-up; CPU: a monotonic clock; medians.

host cost: per preset, the same number of tensors with {HOST_NUMEL} elements each (the
arithmetic is about zero: the time is host work), fresh gradients attached before every
pass as backward() makes them, one whole step per contender (SAM + SGD, SAM + AdamW,
SAMPa + SGD step(closure)), interleaved, medians; next to the contenders the direct-op
floor (torch.ops.sam_fast called directly on the lists). On a GPU also on the preset's
real shapes: host time (no synchronize) beside the device time, host-bound cells marked.
--host-only runs only that part (default presets then: {', '.join(HOST_ONLY_PRESETS)}).

contenders: reference (per-parameter loop, davda54/sam), pytorch_optimizer (its SAM;
skipped if not installed), foreach (torch._foreach_*), compile (torch.compile of the
foreach step), sam_fast (one column per registered backend that can run here).

presets: {', '.join(f'{p.name} ({p.num_tensors} tensors, {format_count(p.num_elements)})'
                    for p in PRESETS.values())}.
defaults: on a GPU {', '.join(default_presets('cuda'))}; on the CPU
{', '.join(default_presets('cpu'))} (the larger presets take minutes per contender on a
few cores); dtypes {', '.join(DEFAULT_DTYPES)}.

--compile auto compiles fp32 cells of at most {COMPILE_MAX_TENSORS} tensors until
--compile-budget seconds went to compiling, and the end-to-end models on a GPU only:
each graph costs 5-30 s to build on a CPU. --compile all compiles every cell.
"""


def _e2e_sizes(settings: "Settings") -> Any:
    """The end-to-end models' sizes on this device, with ``--cnn-batch`` applied."""
    from dataclasses import replace

    from .e2e import E2E_SIZES

    sizes = E2E_SIZES["cuda" if settings.device.type == "cuda" else "cpu"]
    return sizes if settings.cnn_batch is None else replace(sizes, cnn_batch=settings.cnn_batch)


@dataclass
class Settings:
    device: torch.device
    presets: list[str]
    dtypes: list[str]
    contenders: list[str]
    backends: list[str]
    compile: str
    compile_budget: float
    tasks: list[str]
    micro: bool
    e2e: bool
    host: bool
    budget: Budget
    host_budget: Budget
    out: Path | None
    progress: bool
    seed: int
    model: bool = True
    family: bool = True
    family_only: bool = False
    cnn_batch: int | None = None  # ResNet-18's end-to-end batch (default: the device's)


def _split(values: Sequence[str] | None) -> list[str]:
    out: list[str] = []
    for v in values or []:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return list(dict.fromkeys(out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sam-fast-bench",
        description="Measure what sam_fast buys on this machine: SAM/SAMPa optimizer steps "
                    "against the reference loop, pytorch-optimizer, torch._foreach_* and "
                    "torch.compile, plus end-to-end training steps.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", action="append", metavar="NAME[,NAME]",
                   help=f"parameter sets to time: {', '.join(PRESETS)} or 'all' "
                        "(default: depends on the device)")
    p.add_argument("--dtype", action="append", metavar="NAME[,NAME]",
                   help=f"storage dtypes: {', '.join(DTYPES)} "
                        f"(default: {','.join(DEFAULT_DTYPES)})")
    p.add_argument("--device", default="auto",
                   help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--backend", action="append", metavar="NAME[,NAME]",
                   help="sam_fast backends to time (default: every registered backend that "
                        "can run on the device)")
    p.add_argument("--contenders", action="append", metavar="NAME[,NAME]",
                   help=f"subset of {', '.join(CONTENDER_NAMES)} (default: all)")
    p.add_argument("--compile", choices=("auto", "all", "off"), default="auto",
                   help="which cells run the torch.compile contender (default: auto, see below)")
    p.add_argument("--compile-budget", type=float, default=COMPILE_BUDGET_S, metavar="S",
                   help="with --compile auto, no new compile cell starts once S seconds went "
                        f"to compiling (default {COMPILE_BUDGET_S:.0f})")
    p.add_argument("--tasks", action="append", metavar="NAME[,NAME]",
                   help=f"microbenchmark tasks: {', '.join(TASKS)} (default: all)")
    e2e = p.add_mutually_exclusive_group()
    e2e.add_argument("--no-e2e", action="store_true", help="skip the end-to-end training steps")
    e2e.add_argument("--e2e-only", action="store_true", help="only the end-to-end training steps")
    e2e.add_argument("--family-only", action="store_true",
                     help="only the SAM family's part (its host share and its training steps "
                          "against SGD's)")
    e2e.add_argument("--host-only", action="store_true",
                     help="only the host cost of a step (tiny tensors; on a GPU also the "
                          "real shapes' host and device time), far quicker than the rest")
    p.add_argument("--no-host", action="store_true", help="skip the host-cost measurement")
    p.add_argument("--no-family", action="store_true",
                   help="skip the SAM family (GSAM, WSAM, Friendly-SAM, LookSAM, SAM every k "
                        "steps, Momentum-SAM): their host share against pytorch-optimizer's "
                        "and their training step against SGD's")
    p.add_argument("--warmup", type=int, metavar="N", help="untimed rounds per task")
    p.add_argument("--repeats", type=int, metavar="N", help="least timed rounds per task")
    p.add_argument("--max-repeats", type=int, metavar="N", help="most timed rounds per task")
    p.add_argument("--max-time", type=float, metavar="S",
                   help="seconds per task after which no more rounds start "
                        "(once --repeats are done)")
    p.add_argument("--no-model", action="store_true",
                   help="skip the device-time model (bytes and kernel launches of each "
                        "contender's step, counted on meta tensors)")
    p.add_argument("--quick", action="store_true",
                   help="1 warm-up and 3 timed rounds per task: a smoke run, not a measurement")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="write results.json, results.md and PNG plots there")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads of PyTorch (default: PyTorch's choice; on a machine "
                        "shared with other jobs, fewer threads than cores are steadier)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tensors")
    p.add_argument("--cnn-batch", type=int, default=None, metavar="N",
                   help="ResNet-18's batch in the end-to-end steps, the family's included "
                        "(default: 128 on a GPU, 2 on the CPU, where a step at batch 2 is "
                        "mostly passes over the parameters)")
    p.add_argument("--list", action="store_true",
                   help="list presets, contenders and backends (with why any cannot run) and exit")
    return p


def _device(parser: argparse.ArgumentParser, text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        parser.error(f"--device {text!r} is not a device (use auto, cpu, cuda or cuda:N)")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {text!r}: only cpu and cuda devices are benchmarked")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {text}: CUDA is not available (torch {torch.__version__}, "
                         f"built with CUDA {torch.version.cuda or 'none'})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {text}: there are {torch.cuda.device_count()} CUDA devices")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _choose(parser: argparse.ArgumentParser, flag: str, given: list[str], known: Sequence[str],
            all_means: Sequence[str] | None = None) -> list[str]:
    if all_means is not None and "all" in given:
        return list(all_means)
    unknown = [g for g in given if g not in known]
    if unknown:
        parser.error(f"{flag}: unknown {', '.join(map(repr, unknown))}; choose from "
                     f"{', '.join(known)}")
    return given


def parse_settings(argv: Sequence[str] | None = None) -> tuple[Settings, list[str]]:
    """The run's settings and the notes about what the defaults left out."""
    parser = build_parser()
    args = parser.parse_args(argv)
    notes: list[str] = []
    device = _device(parser, args.device)

    if args.host_only and args.no_host:
        parser.error("--host-only and --no-host exclude each other")
    presets = _split(args.preset) or list(
        HOST_ONLY_PRESETS if args.host_only else default_presets(device.type))
    presets = _choose(parser, "--preset", presets, list(PRESETS), all_means=list(PRESETS))
    dtypes = _choose(parser, "--dtype", _split(args.dtype) or list(DEFAULT_DTYPES), list(DTYPES))
    contenders = _choose(parser, "--contenders", _split(args.contenders) or list(CONTENDER_NAMES),
                         CONTENDER_NAMES)
    tasks = _choose(parser, "--tasks", _split(args.tasks) or list(TASKS), TASKS)

    registered = sam_fast_backends()
    asked = _split(args.backend)
    if asked:
        _choose(parser, "--backend", asked, registered)
        for b in asked:
            why = dispatch.why_unavailable(b, device.type)
            if why is not None:
                parser.error(f"--backend {b}: cannot run on {device.type}: {why}")
        backends = asked
    else:
        backends = []
        for b in registered:
            # not asked for by name: no just-in-time build on the benchmark's behalf
            why = (dispatch.why_unavailable(b, device.type, explicit=False)
                   or interpreted_backend_note(b, device))
            if why is None:
                backends.append(b)
            else:
                notes.append(f"sam_fast[{b}] not measured: {why}")

    warmup, min_rep, max_rep, max_time = QUICK_BUDGET if args.quick else DEFAULT_BUDGET[device.type]
    for name, least in (("warmup", 0), ("repeats", 1), ("max_repeats", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}")
    if args.max_time is not None and args.max_time < 0:
        parser.error("--max-time must not be negative")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)
    if args.compile_budget < 0:
        parser.error("--compile-budget must not be negative")
    warmup = args.warmup if args.warmup is not None else warmup
    min_rep = args.repeats if args.repeats is not None else min_rep
    max_rep = max(args.max_repeats if args.max_repeats is not None else max_rep, min_rep)
    max_time = args.max_time if args.max_time is not None else max_time
    budget = Budget(warmup=warmup, min_repeats=min_rep, max_repeats=max_rep, max_seconds=max_time)
    # The host-cost rounds are cheap: their own defaults, the same overrides.
    hb = QUICK_HOST_BUDGET if args.quick else HOST_BUDGET
    h_min = args.repeats if args.repeats is not None else hb.min_repeats
    host_budget = Budget(
        warmup=args.warmup if args.warmup is not None else hb.warmup, min_repeats=h_min,
        max_repeats=max(args.max_repeats if args.max_repeats is not None else hb.max_repeats,
                        h_min),
        max_seconds=args.max_time if args.max_time is not None else hb.max_seconds)

    settings = Settings(device=device, presets=presets, dtypes=dtypes, contenders=contenders,
                        backends=backends, compile=args.compile,
                        compile_budget=args.compile_budget, tasks=tasks,
                        micro=not (args.e2e_only or args.host_only or args.family_only),
                        e2e=not (args.no_e2e or args.host_only or args.family_only),
                        host=not (args.e2e_only or args.no_host or args.family_only),
                        budget=budget,
                        host_budget=host_budget, out=args.out,
                        progress=not args.no_progress, seed=args.seed,
                        model=not args.no_model, family=not args.no_family,
                        family_only=args.family_only, cnn_batch=args.cnn_batch)
    if args.cnn_batch is not None and args.cnn_batch < 1:
        parser.error("--cnn-batch must be at least 1")
    if args.family_only and args.no_family:
        parser.error("--family-only and --no-family exclude each other")
    if args.list:
        print(list_everything(device))
        raise SystemExit(0)
    return settings, notes


def list_everything(device: torch.device) -> str:
    lines = [f"presets (defaults on {device.type}: {', '.join(default_presets(device.type))}):"]
    for p in PRESETS.values():
        count = format_count(p.num_elements)
        lines.append(f"  {p.name:14s} {p.num_tensors:6d} tensors {count:>7s} elements  "
                     f"{p.description}")
    lines.append(f"contenders on {device}:")
    for c in build_contenders(CONTENDER_NAMES, sam_fast_backends()):
        why = c.unavailable(device, torch.float32)
        lines.append(f"  {c.name:20s} {c.description}" + (f"  [unavailable: {why}]" if why else ""))
    lines.append("byte model (passes over the parameters): "
                 + ", ".join(f"{k} {v}" for k, v in traffic.PASSES.items()))
    return "\n".join(lines)


def _compile_allowed(settings: Settings, dtype: str, num_tensors: int, spent: float,
                     e2e: bool = False) -> str | None:
    """None when the compile contender runs in this cell, else why not."""
    if settings.compile == "all":
        return None
    if settings.compile == "off":
        return "torch.compile contender off (--compile off)"
    if e2e and settings.device.type != "cuda":
        return "torch.compile not run end to end on the CPU by default (--compile all)"
    if dtype != "fp32":
        return f"torch.compile runs on fp32 cells by default (--compile all for {dtype})"
    if num_tensors > COMPILE_MAX_TENSORS:
        return (f"torch.compile skipped: {num_tensors} tensors take minutes to compile "
                "(--compile all)")
    if spent >= settings.compile_budget:
        return (f"torch.compile skipped: {spent:.0f} s of the {settings.compile_budget:.0f} s "
                "compile budget spent (--compile-budget, --compile all)")
    return None


def run(settings: Settings, notes: list[str]) -> dict:
    started = time.perf_counter()
    device = settings.device
    timer = make_timer(device)
    hp = Hyper()
    contenders = build_contenders(settings.contenders, settings.backends)
    usable: list[Contender] = []
    for c in contenders:
        why = c.unavailable(device, torch.float32)
        if why is None:
            usable.append(c)
        else:
            notes.append(f"{c.name} not measured: {why}")
    if "reference" not in settings.contenders:
        notes.append("the reference loop was not selected: no 'vs reference' column")

    def spent() -> float:
        return sum(getattr(c, "compile_seconds", 0.0) for c in usable)

    cells = [(p, d) for p in settings.presets for d in settings.dtypes] if settings.micro else []
    host_kinds = [False, True] if device.type == "cuda" else [False]
    host_steps = len(settings.presets) * len(host_kinds) if settings.host else 0
    family = settings.family and (settings.host or settings.e2e or settings.family_only)
    progress = Progress(len(cells) + 2 * settings.e2e + host_steps
                        + (settings.micro or settings.e2e) + family,
                        enabled=settings.progress)
    payload: dict = {
        "schema": 1,
        "environment": report.environment(device),
        "settings": {**{k: v for k, v in asdict(settings).items() if k not in ("device", "out",
                                                                                 "budget",
                                                                                 "host_budget")},
                     "device": str(device), "budget": asdict(settings.budget),
                     "host_budget": asdict(settings.host_budget),
                     "hyper": asdict(hp)},
        "contenders": {c.name: c.description for c in contenders},
        "byte_model_passes": dict(traffic.PASSES),
        "cells": [],
        "host": None,
        "e2e": None,
        "family": None,
        "notes": notes,
    }
    try:
        if settings.micro or settings.e2e:
            progress.label("copy bandwidth")
            payload["copy_bandwidth_bytes_per_s"] = copy_bandwidth(device, timer)
            progress.advance()
        launch_s: float | None = None
        for preset_name, dtype_name in cells:
            preset, dtype = PRESETS[preset_name], DTYPES[dtype_name]
            progress.label(f"{preset_name} {dtype_name}")
            chosen, cell_notes = [], []
            for c in usable:
                why = c.unavailable(device, dtype)
                if why is None and c.compiles:
                    why = _compile_allowed(settings, dtype_name, preset.num_tensors, spent())
                if why is None:
                    chosen.append(c)
                else:
                    cell_notes.append(why if c.compiles else f"{c.name} not measured: {why}")
            # Measured again next to every cell: on a shared machine it drifts with the load.
            progress.status("copy bandwidth")
            bandwidth = copy_bandwidth(device, timer, repeats=5)
            cell = run_cell(preset, dtype, device, chosen, hp, settings.budget, timer,
                            bandwidth, tasks=settings.tasks, status=progress.status,
                            seed=settings.seed)
            cell.notes[:0] = cell_notes
            cell_json = cell.to_json()
            if settings.model and not cell.skipped:
                progress.status("device-time model")
                if device.type == "cuda" and launch_s is None:
                    launch_s = measure_launch_seconds(device)
                    payload["launch_seconds"] = launch_s
                cell_json["model"] = model_for(cell, preset, dtype, chosen, settings.tasks, hp,
                                               device, launch_s).to_json()
            payload["cells"].append(cell_json)
            progress.advance()
        if settings.host:
            payload["host"] = {}  # filled as it goes: an interrupt keeps what was measured
            run_host(settings, usable, hp, spent, progress, payload["host"])
        if settings.e2e:
            from .e2e import run_e2e

            progress.label("end to end")
            chosen = []
            for c in usable:
                why = _compile_allowed(settings, "fp32", 0, spent(), e2e=True) \
                    if c.compiles else None
                if why is None:
                    chosen.append(c)
                else:
                    notes.append(why)
            result = run_e2e(device, chosen, hp, settings.budget, timer,
                             status=progress.status, sizes=_e2e_sizes(settings))
            payload["e2e"] = result.to_json()
            progress.advance(2)
        if family:
            from .family import run_family

            progress.label("SAM family")
            whole = settings.family_only
            payload["family"] = run_family(
                device, settings.host_budget if settings.host or whole else None,
                settings.budget if settings.e2e or whole else None, timer,
                status=progress.status, seed=settings.seed,
                sizes=_e2e_sizes(settings)).to_json()
            progress.advance()
    except KeyboardInterrupt:
        notes.append("interrupted: partial results")
    finally:
        progress.close()
    payload["wall_seconds"] = time.perf_counter() - started
    payload["environment"]["load_average_after"] = report.load_average()
    notes.extend(report.noise_notes(payload))
    return payload


def model_for(cell: Any, preset: Any, dtype: torch.dtype, chosen: Sequence[Contender],
              tasks: Sequence[str], hp: Hyper, device: torch.device,
              launch_s: float | None) -> Any:
    """The device-time model of a measured cell (on a GPU with the measured times beside)."""
    measured = None
    if device.type == "cuda":
        measured = {(r.contender, r.workload): r.median_s for r in cell.rows}
    return model_cell(preset, dtype, cell.dtype, chosen, tasks, hp, measured=measured,
                      here_bandwidth=cell.copy_bandwidth_bytes_per_s
                      if device.type == "cuda" else None,
                      here_launch_s=launch_s)


def run_host(settings: Settings, usable: Sequence[Contender], hp: Hyper,
             spent: Callable[[], float], progress: Progress, out: dict) -> dict:
    """The host-cost part (:mod:`sam_fast.bench.host`) into ``out``: per preset, tiny
    tensors (and on a GPU the real shapes too), every usable contender plus the
    direct-op floor."""
    device = settings.device
    floor = DirectOpFloor()
    out.update({"numel_per_tensor": HOST_NUMEL, "workloads": list(WORKLOADS),
                "floor": floor.description, "cells": [], "notes": []})
    why = floor.unavailable(device, torch.float32)
    if why is not None:
        out["notes"].append(f"{floor.name} not measured: {why}")
    kinds = [False, True] if device.type == "cuda" else [False]
    for preset_name in settings.presets:
        preset = PRESETS[preset_name]
        for real in kinds:
            label = f"host {preset_name}" + (" (real shapes)" if real else "")
            progress.label(label)
            chosen, cell_notes = [], []
            for c in usable:
                reason = (_compile_allowed(settings, "fp32", preset.num_tensors, spent())
                          if c.compiles else None)
                if reason is None:
                    chosen.append(c)
                else:
                    cell_notes.append(reason)
            if why is None:
                chosen.append(floor)
            # params, two pools, two fresh sets, a temporary; state of up to 4 passes each
            if real and (6 + 4 * len(chosen)) * preset.nbytes(torch.float32) > \
                    0.9 * torch.cuda.mem_get_info(device)[0]:
                out["notes"].append(f"{label} skipped: not enough free GPU memory")
                progress.advance()
                continue
            cell = measure_host(preset, device, chosen, hp, settings.host_budget,
                                real_shapes=real, status=progress.status, seed=settings.seed)
            cell.notes[:0] = cell_notes
            out["cells"].append(cell.to_json())
            progress.advance()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    settings, notes = parse_settings(argv)
    payload = run(settings, notes)
    if settings.out is not None:
        payload["notes"].extend(report.write_outputs(payload, settings.out))
    print(report.render_console(payload))
    if settings.out is not None:
        print(f"\nwrote {settings.out / 'results.json'}, {settings.out / 'results.md'}"
              + (" and plots" if not any("matplotlib" in n for n in payload["notes"]) else ""))
    return 130 if "interrupted: partial results" in payload["notes"] else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
