"""The benchmark of sam_fast: ``sam-fast-bench`` or ``python -m sam_fast.bench``.

Modules, one job each: :mod:`.presets` (parameter shapes of real models),
:mod:`.traffic` (the byte model), :mod:`.contenders` (the implementations
compared), :mod:`.timing` (timers, interleaved loop, copy bandwidth, peak
memory), :mod:`.micro` (one preset x dtype cell), :mod:`.e2e` (training
steps), :mod:`.report` (tables, JSON, plots), :mod:`.progress`, :mod:`.cli`.
"""

from .cli import main

__all__ = ["main"]
