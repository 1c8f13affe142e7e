"""Pyro integration: a density ratio as an unnormalised density or a likelihood.

* :class:`RatioTilted` -- ``log_prob(x) = base.log_prob(x) + log r(x)``: with ``r = p / base`` this is
  ``log p`` up to the estimator's error (normalised when ``r`` is exact). Use it as a ``pyro.sample``
  site under NUTS or :class:`~pyro_sde.infer.DiffusionSampler`, or add ``log r`` with ``pyro.factor``.
* :class:`RatioLikelihood` -- neural ratio estimation for simulation-based inference: fit
  ``r(theta, x) = p(theta, x) / (p(theta) p(x)) = p(x | theta) / p(x)`` on simulated pairs, then
  ``p(theta | x_obs) ∝ p(theta) r(theta, x_obs)`` (:meth:`RatioLikelihood.posterior_model`).
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import torch
from pyro import poutine
from pyro.distributions import TorchDistribution
from pyro.infer import Predictive
from torch.distributions import constraints

from .base import RatioEstimator, check_samples

__all__ = ["RatioTilted", "RatioLikelihood"]


def _check_fitted(estimator):
    if not isinstance(estimator, RatioEstimator):
        raise TypeError(f"estimator must be a RatioEstimator, got {type(estimator).__name__}")
    if not estimator.is_fitted:
        raise ValueError("the estimator must be fitted first")


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

    def __init__(self, base, estimator: RatioEstimator, *, num_steps: int | None = None,
                 num_proposals: int = 64, validate_args=None):
        _check_fitted(estimator)
        if tuple(base.event_shape) != (estimator.dim,):
            raise ValueError(f"base.event_shape must be ({estimator.dim},), got {tuple(base.event_shape)}")
        self.base, self.estimator = base, estimator
        self.num_steps, self.num_proposals = num_steps, int(num_proposals)
        super().__init__(base.batch_shape, base.event_shape, validate_args=validate_args)

    @constraints.dependent_property(is_discrete=False, event_dim=1)
    def support(self):
        return self.base.support

    def expand(self, batch_shape, _instance=None):
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
    def sample(self, sample_shape=()):
        """Approximate draws by sampling-importance-resampling from ``base`` with weights ``r``."""
        sample_shape = torch.Size(sample_shape)
        shape = self._extended_shape(sample_shape)
        proposals = self.base.sample((self.num_proposals,) + tuple(sample_shape))  # (M, *shape)
        logits = self.log_ratio(proposals)  # (M, *shape[:-1])
        idx = torch.distributions.Categorical(logits=logits.movedim(0, -1)).sample()
        return proposals.gather(0, idx[None, ..., None].expand((1,) + shape)).squeeze(0)


class RatioLikelihood:
    """Neural ratio estimation of a simulator's likelihood ``p(x | theta) / p(x)``.

    Example::

        def prior():
            pyro.sample("theta", dist.Normal(torch.zeros(2), 1.).to_event(1))
        def simulator(params):                      # batched: dict of (N, ...) -> (N, d_x)
            return params["theta"] + 0.5 * torch.randn_like(params["theta"])
        lik = RatioLikelihood(prior, simulator, ClassifierRatioEstimator(dim=4))
        lik.fit(num_simulations=20_000, num_iterations=3000)
        mcmc = MCMC(NUTS(lik.posterior_model(x_obs)), 500, warmup_steps=300); mcmc.run()

    :param callable prior: a Pyro model (no observed sites) sampling the parameters.
    :param callable simulator: ``dict site -> (N, *shape)`` tensors ``-> (N, d_x)`` simulated data (it may
        solve an SDE: only samples are needed, never its likelihood).
    :param RatioEstimator estimator: over ``d_theta + d_x`` dims (parameters flattened in site order).
    """

    def __init__(self, prior: Callable, simulator: Callable, estimator: RatioEstimator):
        if not isinstance(estimator, RatioEstimator):
            raise TypeError(f"estimator must be a RatioEstimator, got {type(estimator).__name__}")
        self.prior, self.simulator, self.estimator = prior, simulator, estimator
        self.sites: dict[str, torch.Size] | None = None

    def _flatten(self, params: dict, n: int) -> torch.Tensor:
        return torch.cat([params[k].reshape(n, -1) for k in self.sites], -1)

    def simulate(self, num_simulations: int, *args, **kwargs):
        """``(theta, x)``: ``(N, d_theta)`` flattened prior draws and ``(N, d_x)`` simulations."""
        params = Predictive(self.prior, num_samples=num_simulations)(*args, **kwargs)
        trace = poutine.trace(self.prior).get_trace(*args, **kwargs)
        sites = {name: site["value"].shape for name, site in trace.nodes.items()
                 if site["type"] == "sample" and not site["is_observed"]}
        if self.sites is None:
            self.sites = sites
        theta = self._flatten({k: params[k] for k in self.sites}, num_simulations)
        x = self.simulator({k: params[k] for k in self.sites})
        x = check_samples(x.reshape(num_simulations, -1), "simulator output")
        return theta, x

    def fit(self, num_simulations: int = 10_000, *args, **fit_kwargs) -> RatioLikelihood:
        """Simulate pairs, then fit ``r`` on joint pairs vs. re-paired (shuffled) ones."""
        theta, x = self.simulate(num_simulations, *args)
        if theta.shape[-1] + x.shape[-1] != self.estimator.dim:
            raise ValueError(f"estimator.dim is {self.estimator.dim}, but theta and x have "
                             f"{theta.shape[-1]} + {x.shape[-1]} dims")
        self.x_dim = x.shape[-1]
        n = num_simulations

        def shuffled(k):
            return torch.cat([theta[torch.randint(n, (k,))], x[torch.randint(n, (k,))]], -1)

        self.estimator.fit(torch.cat([theta, x], -1), shuffled, **fit_kwargs)
        return self

    def log_likelihood(self, params: dict, x_obs: torch.Tensor) -> torch.Tensor:
        """``log r(theta, x_obs) = log p(x_obs | theta) - log p(x_obs)`` for ``params`` of batch
        shape ``(N,)`` (or unbatched) -> ``(N,)`` (or scalar)."""
        _check_fitted(self.estimator)
        first = next(iter(self.sites))
        batch = params[first].shape[: params[first].dim() - len(self.sites[first])]
        n = int(torch.Size(batch).numel())
        theta = self._flatten(params, n)
        x = torch.as_tensor(x_obs, dtype=theta.dtype, device=theta.device).reshape(1, -1).expand(n, -1)
        return self.estimator.log_ratio(torch.cat([theta, x], -1)).reshape(batch)

    def posterior_model(self, x_obs: torch.Tensor) -> Callable:
        """A Pyro model ``prior`` + ``pyro.factor(log r(theta, x_obs))`` whose posterior is
        ``p(theta | x_obs)`` (for NUTS, SVI or DiffusionSampler)."""
        if self.sites is None:
            raise RuntimeError("call fit first")

        def model(*args, **kwargs):
            trace = poutine.trace(self.prior).get_trace(*args, **kwargs)
            params = {k: trace.nodes[k]["value"] for k in self.sites}
            pyro.factor("ratio_likelihood", self.log_likelihood(params, x_obs))

        return model
