"""Argument checks shared by the package's public entry points (one message format everywhere)."""

from __future__ import annotations

import math


def positive_int(value, name: str, minimum: int = 1) -> int:
    """``value`` if it is an int ``>= minimum`` (not a bool), else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def nonnegative_float(value, name: str, positive: bool = False) -> float:
    """``value`` as a float if it is a finite number ``>= 0`` (``> 0`` with ``positive``)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
        or (positive and value == 0)
    ):
        kind = "positive" if positive else "non-negative"
        raise ValueError(f"{name} must be a {kind} finite number, got {value!r}")
    return float(value)


def positive_float(value, name: str) -> float:
    """``value`` as a float if it is a finite number ``> 0``."""
    return nonnegative_float(value, name, positive=True)
