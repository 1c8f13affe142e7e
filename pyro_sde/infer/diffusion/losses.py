"""Path-space losses of the learned samplers, as functions of the log importance weights.

With ``log w = log dQ/dP^v`` (unnormalised, ``E_{P^v}[w] = Z``) of paths:

* reverse KL (``"kl"``): ``KL(P^v || Q/Z) = E_{P^v}[-log w] + log Z``, differentiated *through* the
  simulation (reparametrisation), the loss of PIS / DIS / DDS;
* log-variance (``"log_variance"``): ``Var_{P^w}[log w^v]`` over paths of a detached reference control
  ``w`` (by default the current control), differentiated only through the controls in the log-ratio;
  at the optimum ``log w`` is constant along paths, so the loss *and its gradient estimator* vanish
  (Richter & Berner). With a fixed reference process its gradient is (twice) the variance-reduced
  log-derivative gradient of the reverse KL;
* reverse KL with the log-derivative trick (``"rkl_ld"``): paths detached,
  ``grad KL = E[-(log w - b) grad log P^v] - E[grad log w]`` with the baseline ``b = mean(log w)``.
  It is the sound choice for the two-control bridge, where both path measures have learned
  parameters: there the log-variance gradient is no longer a gradient of a divergence that respects
  the data-processing inequality (Sanokowski et al. 2025), whereas ``rkl_ld`` is an unbiased gradient
  of the reverse KL. It needs on-policy paths (``exploration_noise = 1``).

Under ``torch.distributed`` each rank holds a slice of the batch: given the global ``count`` and
``mean`` of the log weights, a loss returns this rank's additive share (``sum over ranks = the loss
of the whole batch``, value and gradient), so that summed gradients equal the single-process ones.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["kl_loss", "log_variance_loss", "rkl_log_derivative_loss", "LossSpec", "get_loss"]


def kl_loss(log_weights: torch.Tensor, log_forward: torch.Tensor | None = None, *,
            mean: torch.Tensor | None = None, count: int | None = None) -> torch.Tensor:
    """``mean(-log w)``: reverse KL up to the constant ``log Z`` (a rank's share: ``-sum(log w) / count``)."""
    if count is None:
        return -log_weights.mean()
    return -log_weights.sum() / count


def log_variance_loss(log_weights: torch.Tensor, log_forward: torch.Tensor | None = None, *,
                      mean: torch.Tensor | None = None, count: int | None = None) -> torch.Tensor:
    """Unbiased sample variance of ``log w`` (a rank's share: ``sum((log w - mean)^2) / (count - 1)``
    around the detached global mean, whose gradient term vanishes in the sum over ranks)."""
    if count is None:
        return log_weights.var()
    return (log_weights - mean.to(log_weights.dtype)).square().sum() / (count - 1)


def rkl_log_derivative_loss(log_weights: torch.Tensor, log_forward: torch.Tensor, *,
                            mean: torch.Tensor | None = None, count: int | None = None) -> torch.Tensor:
    """Surrogate whose value is ``mean(-log w)`` and whose gradient is the log-derivative estimator
    ``mean(-(log w - mean log w) grad log P^v - grad log w)`` (paths detached, ``log_forward = log P^v``)."""
    if count is None:
        advantage = (log_weights - log_weights.mean()).detach()
        score_term = -(advantage * log_forward).mean()
        return -log_weights.mean() + (score_term - score_term.detach())
    advantage = (log_weights - mean.to(log_weights.dtype)).detach()
    score_term = -(advantage * log_forward).sum() / count
    return -log_weights.sum() / count + (score_term - score_term.detach())


class LossSpec(NamedTuple):
    name: str
    fn: object
    reparametrized: bool  #: differentiate through the simulated states
    needs_forward_log_prob: bool = False  #: ``fn(log_w, log P^v)``
    off_policy: bool = True  #: valid on paths of a different (exploration) control


_LOSSES = {
    "kl": LossSpec("kl", kl_loss, True, off_policy=False),
    "log_variance": LossSpec("log_variance", log_variance_loss, False),
    "rkl_ld": LossSpec("rkl_ld", rkl_log_derivative_loss, False, True, off_policy=False),
}
_ALIASES = {
    "reverse_kl": "kl",
    "lv": "log_variance",
    "log-variance": "log_variance",
    "rkl_log_derivative": "rkl_ld",
    "reinforce": "rkl_ld",
}


def get_loss(name: str) -> LossSpec:
    key = _ALIASES.get(name, name) if isinstance(name, str) else None
    if key not in _LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(_LOSSES)}")
    return _LOSSES[key]
