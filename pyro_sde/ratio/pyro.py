"""Pyro integration: a density ratio as an unnormalised density or a likelihood.

* :class:`RatioTilted` -- ``log_prob(x) = base.log_prob(x) + log r(x)``: with ``r = p / base`` this is
  ``log p`` up to the estimator's error (normalised when ``r`` is exact). Use it as a ``pyro.sample``
  site under NUTS or :class:`~pyro_sde.infer.DiffusionSampler`, or add ``log r`` with ``pyro.factor``.
* :class:`RatioLikelihood` -- neural ratio estimation for simulation-based inference (its home is
  :mod:`pyro_sde.ratio.sbi`, with the posterior object and calibration; importable from here too).
"""

from __future__ import annotations

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints

from .base import RatioEstimator, check_fitted

__all__ = ["RatioTilted", "RatioLikelihood"]


class RatioTilted(TorchDistribution):
    """Unnormalised ``base`` tilted by a density ratio: ``log_prob(x) = base.log_prob(x) + log r(x)``.

    :param base: a distribution with ``event_shape == (d,)``.
    :param RatioEstimator estimator: fitted, over ``d`` dims.
    :param int num_steps: NFE of ``log_ratio``.
    :param int num_proposals: base draws per sample for :meth:`sample` (sampling-importance-resampling,
        approximate; exact as ``num_proposals -> inf``).
    """

    arg_constraints = {}
    has_rsample = False

    def __init__(self, base: torch.distributions.Distribution, estimator: RatioEstimator, *,
                 num_steps: int | None = None, num_proposals: int = 64, validate_args: bool | None = None):
        check_fitted(estimator)
        if tuple(base.event_shape) != (estimator.dim,):
            raise ValueError(f"base.event_shape must be ({estimator.dim},), got {tuple(base.event_shape)}")
        self.base, self.estimator = base, estimator
        self.num_steps, self.num_proposals = num_steps, int(num_proposals)
        super().__init__(base.batch_shape, base.event_shape, validate_args=validate_args)

    @constraints.dependent_property(is_discrete=False, event_dim=1)
    def support(self) -> constraints.Constraint:
        return self.base.support

    def expand(
        self, batch_shape: torch.Size | tuple[int, ...], _instance: RatioTilted | None = None
    ) -> RatioTilted:
        new = self._get_checked_instance(RatioTilted, _instance)
        new.base = self.base.expand(batch_shape)
        new.estimator, new.num_steps, new.num_proposals = self.estimator, self.num_steps, self.num_proposals
        super(RatioTilted, new).__init__(new.base.batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_ratio(self, value: torch.Tensor) -> torch.Tensor:
        """``log r(value)``, shape ``value.shape[:-1]``."""
        return self.estimator.log_ratio(value, self.num_steps)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        return self.base.log_prob(value) + self.log_ratio(value)

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        """Approximate draws by sampling-importance-resampling from ``base`` with weights ``r``."""
        sample_shape = torch.Size(sample_shape)
        shape = self._extended_shape(sample_shape)
        proposals = self.base.sample((self.num_proposals,) + tuple(sample_shape))  # (M, *shape)
        logits = self.log_ratio(proposals)  # (M, *shape[:-1])
        idx = torch.distributions.Categorical(logits=logits.movedim(0, -1)).sample()
        return proposals.gather(0, idx[None, ..., None].expand((1,) + shape)).squeeze(0)


from .sbi import RatioLikelihood  # noqa: E402  (its old home)
