"""Exponential moving average of network weights, with the warm-up every trainer here uses."""

from __future__ import annotations

import torch


@torch.no_grad()
def ema_update_(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float, step: int) -> None:
    """In place ``ema <- d ema + (1 - d) params`` with ``d = min(decay, (1 + step) / (10 + step))``."""
    d = min(decay, (1 + step) / (10 + step))
    torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - d)
