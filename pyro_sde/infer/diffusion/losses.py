"""Path-space losses of the learned samplers, as functions of the log importance weights.

With ``log w = log dQ/dP^v`` (unnormalised, ``E_{P^v}[w] = Z``) of paths:

* reverse KL: ``KL(P^v || Q) = E_{P^v}[-log w] + log Z``, differentiated *through* the simulation
  (reparametrisation), the loss of PIS / DIS;
* log-variance: ``Var_{P^w}[log w^v]`` over paths of a detached reference control ``w`` (by default
  the current control), differentiated only through ``v`` in the log-ratio; at the optimum
  ``log w`` is constant along paths, so the loss *and its gradient estimator* vanish (Richter & Berner).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["kl_loss", "log_variance_loss", "LossSpec", "get_loss"]


def kl_loss(log_weights: torch.Tensor) -> torch.Tensor:
    """``mean(-log w)``: reverse KL up to the constant ``log Z``."""
    return -log_weights.mean()


def log_variance_loss(log_weights: torch.Tensor) -> torch.Tensor:
    """Unbiased sample variance of ``log w``."""
    return log_weights.var()


class LossSpec(NamedTuple):
    name: str
    fn: object
    reparametrized: bool  #: differentiate through the simulated states


_LOSSES = {
    "kl": LossSpec("kl", kl_loss, True),
    "log_variance": LossSpec("log_variance", log_variance_loss, False),
}
_ALIASES = {"reverse_kl": "kl", "lv": "log_variance", "log-variance": "log_variance"}


def get_loss(name: str) -> LossSpec:
    key = _ALIASES.get(name, name) if isinstance(name, str) else None
    if key not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(_LOSSES)}")
    return _LOSSES[key]
