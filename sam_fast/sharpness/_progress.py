"""An optional tqdm progress bar (tqdm is an optional dependency)."""

from __future__ import annotations

import sys
import warnings
from typing import Any


class _NoBar:
    """What the estimators call when no bar is shown."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(enabled: bool | None, total: int | None, desc: str) -> Any:
    """A tqdm bar, or a silent stand-in.

    ``enabled=None`` shows the bar only when stderr is a terminal, so that
    tests, logs and notebooks' captured output stay clean by default.
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        warnings.warn("progress=True needs tqdm (pip install 'sam-fast[sharpness]'); "
                      "running without a progress bar", stacklevel=3)
        return _NoBar()
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)
