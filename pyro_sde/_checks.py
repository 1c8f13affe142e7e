"""Argument checks shared by the public entry points (one message format everywhere); the clamp of drifts."""

from __future__ import annotations

import math

import torch


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


def nonnegative_int(value, name: str) -> int:
    """``value`` if it is an int ``>= 0`` (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return value


def unit_interval(value, name: str, *, closed_right: bool) -> float:
    """``value`` as a float if it is in ``(0, 1]`` (``closed_right``) or ``(0, 1)``."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    ok = ok and 0 < value and (value <= 1 if closed_right else value < 1)
    if not ok:
        raise ValueError(f"{name} must be in (0, 1{']' if closed_right else ')'}, got {value!r}")
    return float(value)


class _ClampFinite(torch.autograd.Function):
    """:func:`clamp_finite` with a one-mask backward: the gradient passes where ``|x| <= bound``
    (what ``nan_to_num`` then ``clamp`` pass, at a third of their backward's cost; double backward
    works, the mask being constant)."""

    @staticmethod
    def forward(ctx, x, bound):
        ctx.save_for_backward(x.abs() <= bound)  # False at NaN and +-inf
        return torch.nan_to_num(x, nan=0.0, posinf=bound, neginf=-bound).clamp_(-bound, bound)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None


def clamp_finite(x: torch.Tensor, bound: float) -> torch.Tensor:
    """``x`` with NaN replaced by 0, clamped to ``[-bound, bound]`` (a bounded drift for explicit steps)."""
    if x.requires_grad and torch.is_grad_enabled():
        return _ClampFinite.apply(x, float(bound))
    return torch.nan_to_num(x, nan=0.0, posinf=bound, neginf=-bound).clamp_(-bound, bound)
