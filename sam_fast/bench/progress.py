"""A progress bar: tqdm when it is installed, a plain status line when it is not."""

from __future__ import annotations

import sys
import time
from typing import IO, Any


class Progress:
    """``advance()`` when a unit of work is done, ``status(text)`` for what runs now."""

    def __init__(self, total: int, enabled: bool = True, stream: IO[str] | None = None) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.started = time.perf_counter()
        self._bar: Any = None
        self._label = ""
        self._last_plain = 0.0
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=self.total, file=self.stream, unit="cell", leave=True,
                                 dynamic_ncols=True)

    @property
    def uses_tqdm(self) -> bool:
        return self._bar is not None

    def label(self, text: str) -> None:
        """The unit being worked on (the preset and dtype)."""
        self._label = text
        self.status("")

    def status(self, text: str) -> None:
        if not self.enabled:
            return
        line = f"{self._label}: {text}" if text else self._label
        if self._bar is not None:
            self._bar.set_description_str(line, refresh=True)
            return
        self._plain(line)

    def advance(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n)
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
        else:
            self._plain(self._label, force=True)

    def _plain(self, line: str, force: bool = False) -> None:
        now = time.perf_counter()
        tty = getattr(self.stream, "isatty", lambda: False)()
        # On a terminal, redraw one line; in a log, at most a line every 10 s per change.
        if not tty and not force and now - self._last_plain < 10:
            return
        self._last_plain = now
        text = f"[{self.done}/{self.total} {now - self.started:5.0f}s] {line}"
        if tty:
            self.stream.write("\r" + text[:120].ljust(120))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        elif getattr(self.stream, "isatty", lambda: False)():
            self.stream.write("\n")
            self.stream.flush()
