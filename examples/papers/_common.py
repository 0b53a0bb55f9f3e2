"""What the paper scripts share: a table printer, the output folder, the run flags."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

import torch

FIGURES = Path(__file__).resolve().parent / "figures"


def parser(doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a reduced run (the test suite's smoke test), not the reported one")
    p.add_argument("--out", type=Path, default=None, help="where to save the plot (PNG)")
    p.add_argument("--no-plot", action="store_true", help="print the table only (no matplotlib)")
    # One thread by default: these models are tiny, and on a shared 2-core machine
    # two threads spin against each other (measured 1.6 ms vs 36 ms per step under load).
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    return p


def setup(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("MPLBACKEND", "Agg")  # no display needed


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-markdown table, so the printout pastes straight into the docs."""
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.rjust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|",
                      *map(line, cells)])


def save(fig, out: Path | None, default: str) -> Path:
    path = out or FIGURES / default
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
