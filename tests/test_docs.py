"""The project documents itself: every relative link in its Markdown files resolves inside
the repository, and no file points outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _tracked(*patterns: str) -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", *patterns], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (the files to check are the tracked ones)")
    return [ROOT / line for line in out.splitlines() if line]


def test_relative_links_resolve_inside_the_repository():
    broken = []
    for md in _tracked("*.md"):
        for target in _LINK.findall(md.read_text(encoding="utf-8")):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue  # a URL or an anchor in the same file
            path = (md.parent / target.split("#", 1)[0]).resolve()
            if not path.exists() or ROOT not in (path, *path.parents):
                broken.append(f"{md.relative_to(ROOT)}: {target}")
    assert not broken, "links that do not resolve inside the repository:\n" + "\n".join(broken)


def test_no_file_points_outside_the_repository():
    """The design lives in docs/design.md; nothing cites a file beside the checkout (the
    shared folder, the design file there, this machine's work tree)."""
    # Built, not written out, so that this file does not name them itself.
    outside = ("..".join(["", "/shared"]), "DESIGN" + ".md", "/wo" + "rk/")
    offenders = []
    for f in _tracked("*.py", "*.md", "*.cpp", "*.h", "*.cu", "*.cuh", "*.toml", "scripts/*",
                      ".ci/*"):
        if f.suffix in (".png", ".json") or not f.is_file():
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        offenders += [f"{f.relative_to(ROOT)}: {bad}" for bad in outside if bad in text]
    assert not offenders, "\n".join(offenders)
