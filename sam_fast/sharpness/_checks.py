"""Argument checks shared by the estimators (all run before any work)."""

from __future__ import annotations

import math


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def positive_float(name: str, value: object) -> float:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not (x > 0 and math.isfinite(x)):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return x


def non_negative_float(name: str, value: object) -> float:
    x = float(value)  # type: ignore[arg-type]
    if not (x >= 0 and math.isfinite(x)):
        raise ValueError(f"{name} must be >= 0 and finite, got {value!r}")
    return x
