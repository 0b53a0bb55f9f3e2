"""Everything the run reports: the environment, tables (console and Markdown), JSON, plots.

All of it works on the plain-dict payload that is also written as JSON, so a
saved ``results.json`` can be rendered again with :func:`render_markdown`.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .traffic import PASSES

# -- environment ---------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"{cpu_name()} ({n} thread{'s' if n != 1 else ''})"


def git_commit(path: Path | None = None) -> dict[str, Any] | None:
    """The commit of the sam_fast checkout being measured, and whether it has local changes."""
    where = path or Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": sha, "dirty": bool(dirty)}


def environment(device: torch.device) -> dict[str, Any]:
    from .. import __version__

    env: dict[str, Any] = {
        "device": str(device),
        "device_name": device_name(device),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "sam_fast": __version__,
        "triton": _version("triton"),
        "pytorch_optimizer": _version("pytorch-optimizer") or _version("pytorch_optimizer"),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average_before": load_average(),
        "git": git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(cuda=torch.version.cuda, gpu_memory_bytes=props.total_memory,
                   gpu_l2_bytes=getattr(props, "L2_cache_size", None),
                   capability=f"{props.major}.{props.minor}")
    return env


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def noise_notes(payload: dict[str, Any]) -> list[str]:
    """Warnings that the run's timings are noisier than usual, with the evidence."""
    env = payload["environment"]
    notes = []
    cpus = env.get("cpu_count") or 1
    loads = [x for x in (env.get("load_average_before"), env.get("load_average_after"))
             if x is not None]
    if env["device"] == "cpu" and loads and max(loads) > 0.75 * cpus:
        hint = (", or run again with --threads 1, which is steadier on a shared machine"
                if env.get("cpu_threads", 1) > 1 else "")
        notes.append(f"other processes were using the CPU (load average up to "
                     f"{max(loads):.1f} on {cpus} cores): CPU timings are noisy; trust only "
                     f"large ratios{hint}")
    e2e = payload.get("e2e") or {}
    # Below 2.0 is possible where the SAM optimizer costs less than twice SGD's own step
    # (torch.optim.SGD's per-tensor loop on a CPU), but not far below.
    below = [r for r in e2e.get("rows", []) if r["optimizer"] != "SGD" and r["ratio_to_sgd"]
             and r["ratio_to_sgd"] < 1.5]
    if below:
        notes.append(f"{len(below)} end-to-end ratio(s) fell far below 2.0 (two "
                     "forward/backward passes): those rows were disturbed by other load")
    return notes


# -- formatting helpers --------------------------------------------------------------------


def fmt_time(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} us"


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.2f}x"


def fmt_pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.0f}%"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def fmt_rate(bps: float | None) -> str:
    return "-" if not bps else f"{bps / 1e9:.3g} GB/s"


def fmt_diff(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.1e}"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], markdown: bool = False) -> str:
    rows = [list(r) for r in rows]
    if markdown:
        out = ["| " + " | ".join(headers) + " |",
               "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


# -- the tables ----------------------------------------------------------------------------


def _rows_by(cell: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["contender"], r["workload"]): r for r in cell["rows"]}


def _contenders_in(cell: dict[str, Any]) -> list[str]:
    seen: list[str] = list(cell.get("contenders", []))
    for r in cell["rows"]:
        if r["contender"] not in seen:
            seen.append(r["contender"])
    for name in cell["checks"]:
        if name not in seen:
            seen.append(name)
    return seen


def cell_title(cell: dict[str, Any]) -> str:
    from .presets import format_count

    bw = cell.get("copy_bandwidth_bytes_per_s")
    return (f"{cell['preset']} / {cell['dtype']}: {cell['num_tensors']} tensors, "
            f"{format_count(cell['num_elements'])} elements ({fmt_bytes(cell['param_bytes'])})"
            + (f", copy bandwidth {fmt_rate(bw)}" if bw else ""))


def cell_tables(cell: dict[str, Any], markdown: bool = False) -> str:
    """The SAM and SAMPa tables of one cell."""
    by = _rows_by(cell)
    names = _contenders_in(cell)
    param_bytes = cell["param_bytes"]

    def t(name: str, w: str) -> str:
        r = by.get((name, w))
        return fmt_time(r["median_s"]) if r else "-"

    def check(name: str, task: str) -> dict[str, Any]:
        return cell["checks"].get(name, {}).get(task) or {}

    def mem(name: str, task: str) -> str:
        b = check(name, task).get("peak_extra_bytes")
        return "-" if b is None else f"{fmt_bytes(b)} ({b / param_bytes:.1f}x)"

    out = []
    for task, parts, title in (
        ("sam_step", ("grad_norm", "first_step", "second_step"),
         "SAM: the optimizer's share of one step"),
        ("sampa_step", ("sampa_points", "sampa_update"), "SAMPa: its two fused updates"),
    ):
        rows = []
        for name in names:
            r = by.get((name, task))
            c = check(name, task)
            if r is None and not c:
                continue
            if r is None:
                rows.append([name, *["-"] * (len(parts) + 5), "-", c.get("error") or "-"])
                continue
            rows.append([
                name,
                *(t(name, p) for p in parts),
                fmt_time(r["median_s"]),
                fmt_pct((r["q3_s"] - r["q1_s"]) / r["median_s"] if r["median_s"] else None),
                fmt_ratio(r.get("speedup_vs_reference")),
                fmt_rate(r.get("bandwidth_bytes_per_s")),
                fmt_pct(r.get("bandwidth_fraction")),
                mem(name, task),
                fmt_diff(c.get("max_rel_diff")),
            ])
        if not rows:
            continue
        min_bytes = PASSES[task] * param_bytes
        head = f"{title} (least traffic {fmt_bytes(min_bytes)}; medians)"
        headers = ["contender", *(p.replace("_", " ") for p in parts), "total", "IQR",
                   "vs reference",
                   "achieved", "of copy bw", "peak extra mem", "max rel diff"]
        if markdown:
            out.append(f"**{head}**\n\n" + table(headers, rows, markdown=True))
        else:
            out.append(head + "\n" + table(headers, rows))
    return "\n\n".join(out)


MODEL_EXPLANATION = (
    "Device-time model (a prediction, not a measurement): bytes moved / copy bandwidth + "
    "kernel launches x cost per launch, both counted from one steady-state step on meta "
    "tensors of the preset's shapes (sam_fast/bench/device_model.py). \"H200 model\": "
    "4.3 TB/s and 3 us per launch; on a GPU also with its measured copy bandwidth and "
    "launch cost, beside the measured time.")


def model_table(model: dict[str, Any], markdown: bool = False) -> str:
    """The device-time model of one cell."""
    here = model.get("here_launch_s") is not None
    rows = []
    for r in model["rows"]:
        row = [r["contender"], r["task"].replace("_", " "), str(r["launches"]),
               fmt_bytes(r["bytes"]), fmt_time(r["predicted_s"])]
        if here:
            row += [fmt_time(r.get("predicted_here_s")), fmt_time(r.get("measured_s")),
                    fmt_ratio(r.get("measured_over_predicted"))]
        rows.append(row)
    if not rows:
        return ""
    headers = ["contender", "task", "launches", "bytes", "H200 model"]
    if here:
        headers += ["model here", "measured", "measured / model"]
    head = "device-time model (predicted, not measured)"
    if here:
        head += (f": here {fmt_rate(model.get('here_bandwidth_bytes_per_s'))}, "
                 f"{model['here_launch_s'] * 1e6:.2f} us per launch")
    body = table(headers, rows, markdown=markdown)
    return (f"**{head}**\n\n" + body) if markdown else (head + "\n" + body)


HOST_TITLES = {
    "sam_sgd": "SAM+SGD",
    "sam_adamw": "SAM+AdamW",
    "sampa_sgd": "SAMPa+SGD",
}


def host_cell_title(cell: dict[str, Any]) -> str:
    what = (f"{cell['num_tensors']} tensors of {cell['numel_per_tensor']} elements"
            if cell["shapes"] == "tiny" else f"{cell['num_tensors']} tensors, real shapes")
    return f"host cost: {cell['preset']} topology ({what}) on {cell['device']}"


def host_table(cell: dict[str, Any], markdown: bool = False) -> str:
    """One host-cost cell: per workload and contender the host time and its ratios to the
    reference loop and the direct-op floor; with device times (GPU) the device time too and
    what bounds the step."""
    rows_by_workload = [(w, cell["workloads"][w]) for w in HOST_TITLES if w in cell["workloads"]]
    with_device = any(r.get("device_median_s") is not None
                      for _, rows in rows_by_workload for r in rows)
    headers = ["workload", "contender", "host CPU", "host wall", "ref/x", "x/floor"]
    if with_device:
        headers += ["device", "bound by"]
    out = []
    for w, rows in rows_by_workload:
        for r in rows:
            if r.get("error"):
                line = [HOST_TITLES[w], r["contender"], "failed", "-", "-", "-"]
                if with_device:
                    line += ["-", "-"]
                out.append(line)
                continue
            line = [HOST_TITLES[w], r["contender"], fmt_time(r.get("host_cpu_median_s")),
                    fmt_time(r["host_median_s"]), fmt_ratio(r.get("vs_reference")), fmt_ratio(r.get("vs_floor"))]
            if with_device:
                bound = r.get("host_bound")
                line += [fmt_time(r.get("device_median_s")),
                         "-" if bound is None else ("HOST" if bound else "device")]
            out.append(line)
    return table(headers, out, markdown)


def host_tables(host: dict[str, Any], markdown: bool = False) -> str:
    out = []
    for cell in host.get("cells", []):
        title = host_cell_title(cell)
        body = host_table(cell, markdown)
        out.append(f"**{title}**\n\n{body}" if markdown else f"{title}\n{body}")
    return "\n\n".join(out)


HOST_EXPLANATION = (
    "Host cost: each preset's number of tensors, 4 elements each (the arithmetic is about "
    "zero, so the time is host work), fresh gradients attached before every pass as "
    "backward() makes them, one whole step (SAM: first_step + second_step; SAMPa: one "
    "step(closure)), medians of interleaved rounds. \"host CPU\": the thread's CPU time in "
    "the step; \"host wall\": its wall time (it also counts waiting for a core on a busy "
    "machine). \"ref/x\": the reference loop's CPU time over the contender's in the same "
    "round; \"x/floor\": the contender's over the direct-op floor's (torch.ops.sam_fast called directly on the lists: read p.grad, the ops, "
    "p.grad = None). Real shapes (GPU): host wall time (no synchronize) beside the device "
    "time of the same work queued behind a sleep kernel; \"bound by HOST\": host wall time "
    ">= device time, the GPU waits for Python.")


def e2e_table(e2e: dict[str, Any], markdown: bool = False) -> str:
    rows = [[r["model"], r["optimizer"], r["contender"], fmt_time(r["median_s"]),
             "-" if r["ratio_to_sgd"] is None else f"{r['ratio_to_sgd']:.2f}"]
            for r in e2e["rows"]]
    return table(["model", "optimizer", "contender", "step (median)", "step / SGD step"], rows,
                 markdown)


def family_host_table(family: dict[str, Any], markdown: bool = False) -> str:
    rows = [[r["variant"], r["contender"], str(r["steps"]), fmt_time(r["median_s"]),
             "" if r["rival_over_ours"] is None else f"{r['rival_over_ours']:.2f}x"]
            for r in family["host"]]
    return table(["variant", "contender", "steps", "host time (median)", "rival / ours"],
                 rows, markdown)


def family_e2e_table(family: dict[str, Any], markdown: bool = False) -> str:
    rows = [[r["model"], r["variant"], str(r["steps"]), fmt_time(r["median_s"]),
             fmt_time(r["sgd_median_s"]),
             "-" if r["ratio_to_sgd"] is None else f"{r['ratio_to_sgd']:.2f}"]
            for r in family["e2e"]]
    return table(["model", "variant", "steps", "its steps (median)", "as many SGD steps",
                  "ratio to SGD"], rows, markdown)


FAMILY_EXPLANATION = (
    "The SAM family (docs/family.md). Host share: ResNet-18's topology with tiny tensors "
    "(the time is host work, fresh gradient clones before every pass included), one round "
    "= one step with an SGD momentum base (5 steps for LookSAM and SAM every 5 steps); "
    "\"rival / ours\": pytorch-optimizer's (torch.optim.SGD's step for the variants that "
    "replace it) over ours, the median over interleaved rounds. End to end: the variant's "
    "steps over as many SGD steps timed right before them on a copy of the model (median of "
    "the pairs): two passes make about 2.0 a SAM step's floor (BSAM's too), Momentum-SAM "
    "takes one pass (1.0), the variants every 5 steps six passes in five steps (1.2), ESAM "
    "(beta = gamma = 0.5) three forward passes and two backward, one on half the batch.")


def family_tables(family: dict[str, Any], markdown: bool = False) -> str:
    parts = []
    if family.get("host"):
        parts.append(family_host_table(family, markdown))
    if family.get("e2e"):
        parts.append(family_e2e_table(family, markdown))
    return "\n\n".join(parts)


def _header_lines(payload: dict[str, Any]) -> list[str]:
    env = payload["environment"]
    git = env.get("git") or {}
    commit = git.get("commit", "unknown")[:12]
    if git.get("dirty"):
        commit += " (with local changes)"
    bw = payload.get("copy_bandwidth_bytes_per_s")
    return [
        f"device: {env['device_name']} ({env['device']})",
        *([f"copy bandwidth at the start: {fmt_rate(bw)} (dst.copy_(src), read + write)"]
          if bw else []),
        f"torch {env['torch']}, sam_fast {env['sam_fast']}, commit {commit}, "
        f"pytorch-optimizer {env.get('pytorch_optimizer') or 'not installed'}, "
        f"triton {env.get('triton') or 'not installed'}",
        f"run took {payload.get('wall_seconds', 0):.0f} s on {env['date_utc']}",
    ]


def render_console(payload: dict[str, Any]) -> str:
    parts = ["sam_fast benchmark", *_header_lines(payload), ""]
    for cell in payload["cells"]:
        parts.append("== " + cell_title(cell) + " ==")
        if cell.get("skipped"):
            parts.append(f"skipped: {cell['skipped']}\n")
            continue
        parts.append(cell_tables(cell))
        if cell.get("model"):
            parts.append("")
            parts.append(model_table(cell["model"]))
        parts.append("")
    if (payload.get("host") or {}).get("cells"):
        parts.append("== " + "host cost of one step (tiny tensors: the time is host work) ==")
        parts.append(host_tables(payload["host"]))
        parts.append("")
    if payload.get("e2e"):
        parts.append("== end to end: training step time relative to SGD's (about 2.00 = "
                     "two forward/backward passes and a free optimizer) ==")
        parts.append(e2e_table(payload["e2e"]))
        parts.append("")
    if payload.get("family") and (payload["family"]["host"] or payload["family"]["e2e"]):
        parts.append("== the SAM family: host share against pytorch-optimizer's, training "
                     "step against SGD's ==")
        parts.append(family_tables(payload["family"]))
        parts.append("")
    notes = all_notes(payload)
    if notes:
        parts.append("notes:")
        parts += [f"- {n}" for n in notes]
    return "\n".join(parts)


def all_notes(payload: dict[str, Any]) -> list[str]:
    notes = list(payload.get("notes", []))
    for cell in payload["cells"]:
        tag = f"{cell['preset']}/{cell['dtype']}"
        if cell.get("skipped"):
            notes.append(f"{tag} skipped: {cell['skipped']}")
        notes += [f"{tag}: {n}" for n in cell.get("notes", [])]
        notes += [f"{tag} model: {n}" for n in (cell.get("model") or {}).get("notes", [])]
    host = payload.get("host") or {}
    notes += host.get("notes", [])
    for cell in host.get("cells", []):
        tag = f"host {cell['preset']} ({cell['shapes']} tensors)"
        notes += [f"{tag}: {n}" for n in cell.get("notes", [])]
    if payload.get("e2e"):
        notes += payload["e2e"].get("notes", [])
    if payload.get("family"):
        notes += payload["family"].get("notes", [])
    return notes


def render_markdown(payload: dict[str, Any]) -> str:
    out = ["# sam_fast benchmark", ""]
    out += [f"- {line}" for line in _header_lines(payload)]
    out += ["", "Times are medians of interleaved repeats in one process (IQR: the "
            "interquartile range over the median, the cell's noise); \"vs reference\" is "
            "the median over rounds of the reference loop's time over the contender's in the "
            "same round, on the same tensors. "
            "\"of copy bw\" is the least traffic of the workload (docs/design.md section 3) per "
            "second over the copy bandwidth measured right before the cell (over 100%: caches "
            "served part of the traffic). \"max rel diff\" is against "
            "sam_fast's torch backend after two steps from the same start.", "",
            MODEL_EXPLANATION, ""]
    for cell in payload["cells"]:
        out += [f"## {cell_title(cell)}", ""]
        if cell.get("skipped"):
            out += [f"Skipped: {cell['skipped']}", ""]
            continue
        out += [cell_tables(cell, markdown=True), ""]
        if cell.get("model"):
            out += [model_table(cell["model"], markdown=True), ""]
    if (payload.get("host") or {}).get("cells"):
        out += ["## Host cost of one step", "", HOST_EXPLANATION, "",
                host_tables(payload["host"], markdown=True), ""]
    if payload.get("e2e"):
        e2e = payload["e2e"]
        out += ["## End to end", "",
                "One training step (forward/backward passes plus the optimizer) over an SGD "
                "step timed right before it on the same model and batch (median of the "
                "pairs). SAM and SAMPa run two forward/backward passes, so about 2.00 is the "
                "floor; it dips below 2.00 only where their optimizer work costs less than "
                "twice SGD's own step.", "", e2e_table(e2e, markdown=True), ""]
    family = payload.get("family")
    if family and (family["host"] or family["e2e"]):
        out += ["## The SAM family", "", FAMILY_EXPLANATION, "",
                family_tables(family, markdown=True), ""]
    notes = all_notes(payload)
    if notes:
        out += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(out)


# -- files ---------------------------------------------------------------------------------


def write_outputs(payload: dict[str, Any], out_dir: Path) -> list[str]:
    """results.json, results.md and the plots; returns notes on what was not written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(payload, indent=1, default=_json_default))
    notes = plot(payload, out_dir)
    (out_dir / "results.md").write_text(render_markdown(payload))
    return notes


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (torch.dtype, torch.device, Path)):
        return str(x)
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


def plot(payload: dict[str, Any], out_dir: Path) -> list[str]:
    """speedup.png, bandwidth.png (and e2e.png); a note instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["PNG plots not written: matplotlib is not installed "
                "(pip install 'sam-fast[bench]')"]
    from matplotlib.ticker import FormatStrFormatter

    cells = [c for c in payload["cells"] if not c.get("skipped") and c["rows"]]
    # One color per contender across every subplot and file.
    order = list(dict.fromkeys(r["contender"] for c in cells for r in c["rows"]))
    palette = plt.get_cmap("tab10")
    colors = {name: palette(i % 10) for i, name in enumerate(order)}
    written = []
    for fname, key, ylabel, line in (
        ("speedup.png", "speedup_vs_reference", "speedup over the reference loop", 1.0),
        ("bandwidth.png", "bandwidth_fraction", "fraction of measured copy bandwidth", None),
    ):
        if not cells:
            break
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), squeeze=False)
        for ax, workload, title in zip(axes[0], ("sam_step", "sampa_step"),
                                       ("SAM step (optimizer share)", "SAMPa step")):
            _bars(ax, cells, workload, key, colors)
            ax.set_title(title)
            ax.set_ylabel(ylabel)
            if line is not None:
                ax.axhline(line, color="black", linewidth=0.8)
            if key == "speedup_vs_reference":
                ax.set_yscale("log")
                ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
                ax.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
                ax.tick_params(axis="y", which="minor", labelsize=7)
        fig.suptitle(f"sam_fast on {payload['environment']['device_name']}")
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=120)
        plt.close(fig)
        written.append(fname)
    e2e = payload.get("e2e")
    if e2e and e2e["rows"]:
        models = list(dict.fromkeys(r["model"] for r in e2e["rows"]))
        fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
        for ax, model in zip(axes[0], models):
            rows = [r for r in e2e["rows"] if r["model"] == model and r["optimizer"] != "SGD"]
            labels = [f"{r['optimizer']}\n{r['contender']}" for r in rows]
            ax.bar(range(len(rows)), [r["ratio_to_sgd"] or 0 for r in rows], color="tab:blue")
            ax.axhline(2.0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=8)
            ax.set_ylabel("step time / SGD step time")
            ax.set_title(model, fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / "e2e.png", dpi=120)
        plt.close(fig)
    return []


def _bars(ax: Any, cells: list[dict[str, Any]], workload: str, key: str,
          colors: dict[str, Any]) -> None:
    names: list[str] = []
    for c in cells:
        for r in c["rows"]:
            if r["workload"] == workload and r["contender"] not in names:
                names.append(r["contender"])
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        ys = []
        for c in cells:
            r = next((r for r in c["rows"] if r["contender"] == name and r["workload"] == workload),
                     None)
            ys.append((r or {}).get(key) or math.nan)
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(cells))]
        ax.bar(xs, ys, width, label=name, color=colors.get(name))
    ax.set_xticks(range(len(cells)), [f"{c['preset']}\n{c['dtype']}" for c in cells], fontsize=8)
    ax.legend(fontsize=7)


def load(path: os.PathLike[str] | str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
