r"""Simulation-based inference with density ratios: a likelihood from simulations and its posterior.

Neural ratio estimation fits ``r(theta, x) = p(theta, x) / (p(theta) p(x)) = p(x | theta) / p(x)`` on joint
pairs ``(theta_i, x_i)`` against re-paired ones, then ``p(theta | x_obs) ∝ p(theta) r(theta, x_obs)`` for any
``x_obs`` without retraining (amortised)::

    lik = RatioLikelihood.from_simulations(theta, x, prior=prior, estimator="contrastive")  # (N, d), (N, d_x)
    posterior = lik.posterior(x_obs)          # tempered SMC from the prior: copes with several modes
    posterior.sample((1000,))                 # (1000, d)
    posterior.log_prob(theta)                 # normalised with the SMC evidence estimate
    posterior.map()                           # (d,)
    pyro_sde.to_inference_data(posterior)     # ArviZ

Estimators (``estimator=``): ``"contrastive"`` (NRE-C, the default), ``"classifier"`` (NRE-A, binary
cross-entropy), ``"balanced"`` (BNRE), ``"telescoping"``, ``"tangent"``, ``"secant"`` (time-score
estimators, fixed training length), or a :class:`~pyro_sde.ratio.RatioEstimator` over ``d_theta + d_x``
dims. The classifiers train with early stopping on a validation split, so training time grows with the
data. Calibration diagnostics are in :mod:`pyro_sde.ratio.calibration`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pyro
import torch
from pyro import poutine
from pyro.distributions import Distribution
from pyro.infer import Predictive
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to

from .. import diagnostics
from .._checks import positive_int
from ..nn.ratio_networks import SBIRatioNetwork
from .base import RatioEstimator, check_fitted, check_samples
from .classifier import ClassifierRatioEstimator, ContrastiveRatioEstimator

if TYPE_CHECKING:
    import arviz
    import xarray

    from ..infer import SMCSampler

__all__ = ["ESTIMATORS", "RatioLikelihood", "RatioPosterior", "make_sbi_estimator"]

#: names accepted by ``estimator=`` (sbi's names as aliases)
ESTIMATORS = ("classifier", "nre_a", "balanced", "bnre", "contrastive", "nre_c", "telescoping", "tangent",
              "secant")


def make_sbi_estimator(name: str, theta_dim: int, x_dim: int, *, embedding: torch.nn.Module | None = None,
                       hidden_dim: int = 64, num_layers: int = 2, **options: Any) -> RatioEstimator:
    """An unfitted estimator over rows ``[theta, x]`` of ``theta_dim + x_dim`` columns.

    :param str name: one of :data:`ESTIMATORS`.
    :param nn.Module embedding: for the classifiers, an embedding network ``(..., d_x) -> (..., d_e)`` for
        ``x`` (:class:`~pyro_sde.nn.ratio_networks.SBIRatioNetwork`).
    :param int hidden_dim: network width (64). :param int num_layers: hidden layers (2).
    :param options: estimator options: ``num_contrasts`` / ``gamma`` (contrastive, 5 / 1.0), ``balance``
        (balanced, 100), ``network`` / ``network_options`` (time-score estimators) and so on.
    """
    if name not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS} or a RatioEstimator, got {name!r}")
    dim = theta_dim + x_dim
    if name in ("classifier", "nre_a", "balanced", "bnre", "contrastive", "nre_c"):
        network = options.pop("network", None) or SBIRatioNetwork(
            theta_dim, x_dim, embedding=embedding, hidden_dim=hidden_dim, num_layers=num_layers)
        if name in ("contrastive", "nre_c"):
            return ContrastiveRatioEstimator(dim, theta_dim=theta_dim, network=network, **options)
        if name in ("balanced", "bnre"):
            options.setdefault("balance", 100.0)
        return ClassifierRatioEstimator(dim, network=network, **options)
    if embedding is not None:
        raise ValueError(f"embedding= goes with the classifier estimators, not {name!r}")
    from .secant import SecantRatioEstimator
    from .tangent import TangentRatioEstimator
    from .telescoping import TelescopingRatioEstimator

    if name == "telescoping":
        return TelescopingRatioEstimator(dim, hidden_dim=hidden_dim, num_layers=num_layers, **options)
    klass = TangentRatioEstimator if name == "tangent" else SecantRatioEstimator
    if options.get("network", "mlp") == "mlp":
        options.setdefault("network_options", {"hidden_dim": hidden_dim, "num_layers": num_layers})
    return klass(dim, **options)


def _default_batch_size(num_train: int) -> int:
    """``clip(num_train // 8, 32, 256)``: at least 8 steps per epoch (fewer rows per step on small data)."""
    return max(32, min(256, num_train // 8))


class _FlatPrior:
    """A Pyro prior model over latent sites ``sites`` (name -> shape, in theta's column order), seen on
    flattened rows ``(..., D)`` (each site's value flattened, concatenated in that order, as ``simulate``
    does), with the per-site bijections ``theta_k = T_k(u_k)`` from unconstrained ``u``
    (``biject_to(support)``). ``log_prob`` runs the model conditioned on the rows, so a site's distribution
    may depend on earlier sites' values; supports may not (checked on two prior traces)."""

    def __init__(self, model: Callable, sites: dict[str, torch.Size]):
        self.model, self.sites = model, {k: torch.Size(v) for k, v in sites.items()}
        self.sizes = [int(shape.numel()) for shape in self.sites.values()]
        self.dim = sum(self.sizes)
        with torch.random.fork_rng(devices=[]):
            traces = [poutine.trace(model).get_trace() for _ in range(2)]
        self.transforms, self._batch_dims = {}, {}
        for name, shape in self.sites.items():
            fns = [trace.nodes[name]["fn"] for trace in traces]
            if not _same_support(fns[0].support, fns[1].support):
                raise NotImplementedError(f"posterior() needs supports that do not depend on other sites; "
                                          f"site {name!r} has {fns[0].support} varying between prior draws")
            transform = biject_to(fns[0].support)
            if tuple(transform.inverse_shape(shape)) != tuple(shape):
                raise NotImplementedError(f"posterior() needs sites whose unconstrained space has their "
                                          f"shape; site {name!r} ({fns[0].support}) has not")
            self.transforms[name] = transform
            self._batch_dims[name] = len(fns[0].batch_shape)
        self._plate_nesting = max([0, *self._batch_dims.values()])
        self._inside = torch.cat([traces[0].nodes[k]["value"].reshape(-1) for k in self.sites])  # (D,)

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Rows ``(..., D)`` -> ``{site: (..., *shape)}``."""
        out = {}
        for (name, shape), part in zip(self.sites.items(), theta.split(self.sizes, -1)):
            out[name] = part.reshape(theta.shape[:-1] + shape)
        return out

    def log_prob(self, theta: torch.Tensor) -> torch.Tensor:
        """``log p(theta)`` of rows ``(..., D) -> (...)`` (the model's joint log density, float64 sums);
        ``-inf`` outside the support."""
        lead = theta.shape[:-1]
        rows = theta.reshape(-1, self.dim)
        n = rows.shape[0]
        values = {}  # (n, 1 x (nesting - site batch dims), *shape): sites line up with the model's plates
        for name, value in self.unflatten(rows).items():
            pad = (1,) * (self._plate_nesting - self._batch_dims[name])
            values[name] = value.reshape((n,) + pad + self.sites[name])
        with pyro.validation_enabled(False), pyro.plate("_rows", n, dim=-self._plate_nesting - 1):
            trace = poutine.trace(poutine.condition(self.model, data=values)).get_trace()
        lp = rows.new_zeros(n, dtype=torch.float64)
        inside = torch.ones(n, dtype=torch.bool, device=rows.device)
        for name in self.sites:
            fn, value = trace.nodes[name]["fn"], trace.nodes[name]["value"]
            inside = inside & fn.support.check(value).reshape(n, -1).all(-1)
            lp = lp + fn.log_prob(value).reshape(n, -1).double().sum(-1)
        lp = torch.where(inside, lp, torch.full_like(lp, -math.inf))
        return lp.to(theta.dtype).reshape(lead)

    def sample_like(self, rows: torch.Tensor) -> torch.Tensor:
        """A fixed point of the support (one prior draw), broadcast to rows ``(..., D)``."""
        return self._inside.to(rows).expand_as(rows)

    def sample(self, n: int) -> torch.Tensor:
        """``n`` prior draws as rows ``(n, D)``."""
        draws = Predictive(self.model, num_samples=n, return_sites=list(self.sites), parallel=True)()
        return torch.cat([draws[k].reshape(n, -1) for k in self.sites], -1)

    def constrain(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(theta, log |det dT/du|)`` for unconstrained rows ``u`` ``(..., D)``."""
        lead = u.shape[:-1]
        parts, log_det = [], u.new_zeros(lead)
        for name, uu in self.unflatten(u).items():
            transform = self.transforms[name]
            value = transform(uu)
            parts.append(value.reshape(lead + (-1,)))
            log_det = log_det + transform.log_abs_det_jacobian(uu, value).reshape(lead + (-1,)).sum(-1)
        return torch.cat(parts, -1), log_det

    def unconstrain(self, theta: torch.Tensor) -> torch.Tensor:
        lead = theta.shape[:-1]
        return torch.cat([self.transforms[k].inv(v).reshape(lead + (-1,))
                          for k, v in self.unflatten(theta).items()], -1)


def _same_support(a, b) -> bool:
    """Whether two constraints are the same (same type and equal parameters)."""
    if type(a) is not type(b):
        return False
    for key, va in vars(a).items():
        vb = vars(b).get(key)
        if isinstance(va, torch.Tensor) or isinstance(vb, torch.Tensor):
            if not (isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape
                    and bool(torch.equal(va, vb))):
                return False
        elif hasattr(va, "check") and hasattr(vb, "check"):  # a wrapped constraint
            if not _same_support(va, vb):
                return False
        elif va != vb:
            return False
    return True


def _prior_model(distribution: Distribution) -> Callable:
    def prior():
        pyro.sample("theta", distribution)

    return prior


class RatioLikelihood:
    """Neural ratio estimation of a simulator's likelihood ``r(theta, x) = p(x | theta) / p(x)``.

    Example (from a simulator; :meth:`from_simulations` for given pairs)::

        def prior():
            pyro.sample("theta", dist.Normal(torch.zeros(2), 1.).to_event(1))
        def simulator(params):                      # batched: dict of (N, ...) -> (N, d_x)
            return params["theta"] + 0.5 * torch.randn_like(params["theta"])
        lik = RatioLikelihood(prior, simulator, "contrastive").fit(num_simulations=10_000)
        lik.posterior(x_obs).sample((1000,))        # or NUTS on lik.posterior_model(x_obs)

    :param prior: a Pyro model (no observed sites) sampling the parameters, or a distribution over one
        parameter (``batch_shape ()``; its site is called ``"theta"``). :meth:`posterior` evaluates the
        model on batches of parameters (leading dimension), so it must broadcast (plates with ``dim=``).
    :param callable simulator: ``dict site -> (N, *shape)`` tensors ``-> (N, d_x)`` simulated data (it may
        solve an SDE: only samples are needed, never its likelihood); None with given simulations.
    :param estimator: a name from :data:`ESTIMATORS` (default ``"contrastive"``, NRE-C: the most accurate on
        sbibm's tasks; built at the first fit) or a
        :class:`RatioEstimator` over ``d_theta + d_x`` dims (parameters flattened in site order, then ``x``).
    :param dict estimator_options: options of :func:`make_sbi_estimator` with a name.
    :param sites: the prior's latent site names in theta's column order (each site's value flattened,
        then concatenated; default: the order in which the prior samples them).
    """

    def __init__(self, prior: Callable | Distribution, simulator: Callable | None = None,
                 estimator: str | RatioEstimator = "contrastive", *, estimator_options: dict | None = None,
                 sites: list[str] | tuple[str, ...] | None = None):
        if isinstance(estimator, str):
            if estimator not in ESTIMATORS:
                raise ValueError(f"estimator must be one of {ESTIMATORS} or a RatioEstimator, "
                                 f"got {estimator!r}")
        elif not isinstance(estimator, RatioEstimator):
            raise TypeError(f"estimator must be a RatioEstimator or a name, got {type(estimator).__name__}")
        elif estimator_options:
            raise ValueError("estimator_options go with an estimator name, not an estimator object")
        self._flat_prior: _FlatPrior | None = None
        if sites is not None and (isinstance(sites, str) or not all(isinstance(k, str) for k in sites)
                                  or len(set(sites)) != len(sites) or not sites):
            raise ValueError(f"sites must be a list of distinct site names, got {sites!r}")
        self._site_order = None if sites is None else list(sites)
        if isinstance(prior, Distribution):
            if tuple(prior.batch_shape) != ():
                raise ValueError("a prior distribution must have batch_shape () (use .to_event()), got "
                                 f"{tuple(prior.batch_shape)}")
            prior = _prior_model(prior)
        elif not callable(prior):
            raise TypeError(f"prior must be a Pyro model or a distribution, got {type(prior).__name__}")
        if simulator is not None and not callable(simulator):
            raise TypeError(f"simulator must be callable, got {type(simulator).__name__}")
        self.prior, self.simulator = prior, simulator
        self.estimator = estimator
        self.estimator_options = dict(estimator_options or {})
        self.sites: dict[str, torch.Size] | None = None
        self.x_dim: int | None = None

    # construction --------------------------------------------------------------------------------
    @classmethod
    def from_simulations(cls, theta: torch.Tensor, x: torch.Tensor, *, prior: Callable | Distribution,
                         estimator: str | RatioEstimator = "contrastive",
                         estimator_options: dict | None = None, sites: list[str] | None = None,
                         **fit_options: Any) -> RatioLikelihood:
        """A likelihood fitted on given pairs: ``theta`` ``(N, d_theta)`` drawn from ``prior`` (its sites'
        values flattened and concatenated in ``sites`` order), ``x`` ``(N, d_x)`` (or ``(N, *shape)``,
        flattened) simulated at them.

        :param prior: as in the constructor (the posterior needs it; it is not sampled here).
        :param sites: as in the constructor. :param fit_options: as :meth:`fit_simulations`.
        """
        lik = cls(prior, None, estimator, estimator_options=estimator_options, sites=sites)
        return lik.fit_simulations(theta, x, **fit_options)

    @classmethod
    def from_fitted(cls, estimator: RatioEstimator, *, prior: Callable | Distribution,
                    sites: list[str] | None = None) -> RatioLikelihood:
        """A likelihood around an already fitted estimator over rows ``[theta, x]`` (e.g. a saved one, or
        another library's network wrapped as a :class:`RatioEstimator`); ``prior``, ``sites`` as in the
        constructor."""
        check_fitted(estimator)
        lik = cls(prior, None, estimator, sites=sites)
        lik._record_sites()
        lik.x_dim = estimator.dim - lik.theta_dim
        if lik.x_dim < 1:
            raise ValueError(f"estimator.dim = {estimator.dim} leaves no x columns after {lik.theta_dim} "
                             "parameters")
        return lik

    def _record_sites(self, *args, **kwargs):
        """Site shapes (in ``sites=`` order) from one prior trace, leaving the RNG as it was (so that given
        simulations and the simulator's own give the same fit under one seed)."""
        with torch.random.fork_rng(devices=[]):
            trace = poutine.trace(self.prior).get_trace(*args, **kwargs)
        sites = {name: site for name, site in trace.nodes.items()  # latent sample sites, not plates
                 if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)}
        if not sites:
            raise ValueError("the prior has no latent sample sites")
        if self.sites is None:
            order = list(sites) if self._site_order is None else self._site_order
            if sorted(order) != sorted(sites):
                raise ValueError(f"sites must name the prior's latent sites {sorted(sites)} (any order), got "
                                 f"{order}")
            self.sites = {name: sites[name]["value"].shape for name in order}
        return trace

    @property
    def theta_dim(self) -> int:
        if self.sites is None:
            raise RuntimeError("call fit or from_simulations first")
        return sum(int(torch.Size(s).numel()) for s in self.sites.values())

    def _flatten(self, params: dict, n: int) -> torch.Tensor:
        return torch.cat([params[k].reshape(n, -1) for k in self.sites], -1)

    def simulate(self, num_simulations: int, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(theta, x)``: ``(N, d_theta)`` flattened prior draws (drawn in one vectorised prior call) and
        ``(N, d_x)`` simulations."""
        if self.simulator is None:
            raise RuntimeError("this likelihood has no simulator (built from given simulations)")
        positive_int(num_simulations, "num_simulations")
        params = Predictive(self.prior, num_samples=num_simulations, parallel=True)(*args, **kwargs)
        self._record_sites(*args, **kwargs)
        params = {k: params[k].reshape((num_simulations,) + self.sites[k]) for k in self.sites}
        theta = self._flatten(params, num_simulations)
        x = self.simulator(params)
        x = check_samples(x.reshape(num_simulations, -1), "simulator output")
        return theta, x

    def fit(self, num_simulations: int = 10_000, *args: Any, **fit_options: Any) -> RatioLikelihood:
        """Simulate ``num_simulations`` pairs (``args`` go to the prior), then :meth:`fit_simulations`."""
        theta, x = self.simulate(num_simulations, *args)
        return self.fit_simulations(theta, x, **fit_options)

    def fit_simulations(self, theta: torch.Tensor, x: torch.Tensor, *, validation_fraction: float = 0.1,
                        patience: int = 20, batch_size: int | None = None, lr: float | None = None,
                        max_num_iterations: int | None = None, **fit_kwargs: Any) -> RatioLikelihood:
        """Fit ``r`` on joint pairs against re-paired ones (``theta_i`` with ``x_j`` at random ``i, j``).

        Estimators with early stopping (the classifiers) hold out ``validation_fraction`` of the pairs,
        check the validation loss once per epoch (``ceil(N_train / batch_size)`` steps) at a constant
        learning rate, and stop after ``patience`` epochs without improvement (keeping the best weights), or
        at ``max_num_iterations`` steps (default ``max(2000, 200 epochs)``); ``lr`` defaults to 3e-3. Others
        train for ``num_iterations`` (2000) with a cosine schedule from ``lr`` (default 1e-3).
        ``batch_size`` defaults to ``clip(N_train // 8, 32, 256)``: at least 8 steps an epoch, so that on
        small data sets, where the 2000-step floor rather than early stopping ends training, the training
        cost scales with the data (``batch x steps``) instead of being that of 2000 full-size batches.

        :param theta: ``(N, d_theta)``. :param x: ``(N, d_x)`` or ``(N, *shape)``.
        :param fit_kwargs: overrides of :meth:`RatioEstimator.fit`'s options (e.g. ``ema_decay``,
            ``progress_bar``, ``num_iterations``).
        :returns: ``self``.
        """
        if self.sites is None:
            self._record_sites()
        theta = torch.as_tensor(theta)
        if theta.dim() != 2 or theta.shape[-1] != self.theta_dim:
            shapes = ", ".join(f"{k}: {tuple(v)}" for k, v in self.sites.items())
            raise ValueError(f"theta must have shape (N, {self.theta_dim}): the prior's sites ({shapes}) "
                             f"flattened in that order; got {tuple(theta.shape)}")
        theta = check_samples(theta, "theta", self.theta_dim, 2)
        x = torch.as_tensor(x)
        if x.dim() < 2 or x.shape[0] != theta.shape[0]:
            raise ValueError(f"x must have shape (N, ...) with N = {theta.shape[0]} (theta's), "
                             f"got {tuple(x.shape)}")
        x = check_samples(x.reshape(x.shape[0], -1), "x")
        if x.dtype != theta.dtype or x.device != theta.device:
            raise ValueError("theta and x must share dtype and device")
        if self.x_dim is not None and x.shape[-1] != self.x_dim:
            raise ValueError(f"x has {x.shape[-1]} dims; this likelihood was fitted with {self.x_dim}")
        if not 0 <= validation_fraction < 1:
            raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
        if isinstance(self.estimator, str):
            self.estimator = make_sbi_estimator(self.estimator, theta.shape[-1], x.shape[-1],
                                                **self.estimator_options)
        if theta.shape[-1] + x.shape[-1] != self.estimator.dim:
            raise ValueError(f"estimator.dim is {self.estimator.dim}, but theta and x have "
                             f"{theta.shape[-1]} + {x.shape[-1]} dims")
        self.x_dim = x.shape[-1]
        n = theta.shape[0]
        options = dict(progress_bar=False)
        if self.estimator.supports_validation and validation_fraction > 0:
            n_val = max(math.ceil(validation_fraction * n), 2 + getattr(self.estimator, "num_contrasts", 0))
            if n - n_val < 8:
                raise ValueError(f"{n} simulations are too few for a validation split of {n_val}")
            perm = torch.randperm(n, device=theta.device)
            val, train = perm[:n_val], perm[n_val:]
            theta_val, x_val = theta[val], x[val]
            shifted = torch.roll(torch.arange(n_val, device=theta.device), 1)  # theta_{i-1} with x_i
            validation = (torch.cat([theta_val, x_val], -1), torch.cat([theta_val[shifted], x_val], -1))
            theta, x = theta[train], x[train]
            batch_size = _default_batch_size(theta.shape[0]) if batch_size is None else batch_size
            batch_size = min(batch_size, theta.shape[0])
            epoch = math.ceil(theta.shape[0] / batch_size)
            cap = max(2000, 200 * epoch) if max_num_iterations is None else max_num_iterations
            options.update(num_iterations=cap, validation=validation, patience=patience,
                           validation_interval=epoch, lr_schedule="constant", lr=3e-3 if lr is None else lr)
        else:
            batch_size = min(256 if batch_size is None else batch_size, n)
            options.update(num_iterations=2000, lr=1e-3 if lr is None else lr)
        options.update(batch_size=batch_size)
        options.update(fit_kwargs)
        m = theta.shape[0]

        def repaired(k):
            return torch.cat([theta[torch.randint(m, (k,), device=theta.device)],
                              x[torch.randint(m, (k,), device=theta.device)]], -1)

        self.estimator.fit(torch.cat([theta, x], -1), repaired, **options)
        return self

    # evaluation ----------------------------------------------------------------------------------
    def log_ratio(self, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``log r(theta, x)`` for flattened ``theta`` ``(..., d_theta)`` and ``x`` ``(..., d_x)`` (leading
        dimensions broadcast) ``-> (...)``."""
        check_fitted(self.estimator)
        x = torch.as_tensor(x, dtype=theta.dtype, device=theta.device)
        if theta.shape[-1] != self.theta_dim or x.shape[-1] != self.x_dim:
            raise ValueError(f"theta must be (..., {self.theta_dim}) and x (..., {self.x_dim}), got "
                             f"{tuple(theta.shape)} and {tuple(x.shape)}")
        shape = torch.broadcast_shapes(theta.shape[:-1], x.shape[:-1])
        rows = torch.cat([theta.expand(shape + theta.shape[-1:]), x.expand(shape + x.shape[-1:])], -1)
        return self.estimator.log_ratio(rows)

    def log_likelihood(self, params: dict, x_obs: torch.Tensor) -> torch.Tensor:
        """``log r(theta, x_obs) = log p(x_obs | theta) - log p(x_obs)`` for ``params`` of batch
        shape ``(N,)`` (or unbatched) -> ``(N,)`` (or scalar)."""
        check_fitted(self.estimator)
        first = next(iter(self.sites))
        batch = params[first].shape[: params[first].dim() - len(self.sites[first])]
        n = int(torch.Size(batch).numel())
        theta = self._flatten(params, n)
        x = torch.as_tensor(x_obs, dtype=theta.dtype, device=theta.device).reshape(1, -1).expand(n, -1)
        return self.estimator.log_ratio(torch.cat([theta, x], -1)).reshape(batch)

    def posterior_model(self, x_obs: torch.Tensor) -> Callable:
        """A Pyro model ``prior`` + ``pyro.factor(log r(theta, x_obs))`` whose posterior is
        ``p(theta | x_obs)`` (for NUTS, SVI or DiffusionSampler)."""
        if self.sites is None or not self.estimator_is_fitted:
            raise RuntimeError("call fit first")

        def model(*args, **kwargs):
            trace = poutine.trace(self.prior).get_trace(*args, **kwargs)
            params = {k: trace.nodes[k]["value"] for k in self.sites}
            pyro.factor("ratio_likelihood", self.log_likelihood(params, x_obs))

        return model

    @property
    def estimator_is_fitted(self) -> bool:
        return isinstance(self.estimator, RatioEstimator) and self.estimator.is_fitted

    def _prior(self) -> _FlatPrior:
        """The prior on flattened rows (built at first use; ``NotImplementedError`` for sites whose support
        depends on other sites or whose unconstrained space has another shape: use
        :meth:`posterior_model` with NUTS there)."""
        if self._flat_prior is None:
            if self.sites is None:
                raise RuntimeError("call fit or from_simulations first")
            self._flat_prior = _FlatPrior(self.prior, self.sites)
        return self._flat_prior

    def posterior(self, x_obs: torch.Tensor, **options: Any) -> RatioPosterior:
        """The posterior ``p(theta | x_obs) ∝ p(theta) r(theta, x_obs)`` (:class:`RatioPosterior`; ``options``
        go to it). Cheap: nothing is trained, and sampling starts at the first call that needs it."""
        return RatioPosterior(self, x_obs, **options)

    @torch.no_grad()
    def sample_posteriors(
        self, x: torch.Tensor, num_samples: int, *, num_proposals: int = 4096
    ) -> torch.Tensor:
        """Approximate posterior draws ``(num_samples, N, d_theta)`` for ``N`` observations ``x``
        ``(N, d_x)`` at once: sampling-importance-resampling of ``num_proposals`` shared prior draws
        weighted by ``r`` (fast, for calibration; good while the posterior is not much narrower than the
        prior)."""
        check_fitted(self.estimator)
        prior = self._prior()
        x = torch.as_tensor(x).reshape(-1, self.x_dim)
        proposals = prior.sample(num_proposals).to(x)  # (M, D)
        log_r = self.log_ratio(proposals[None], x[:, None])  # (N, M)
        idx = torch.distributions.Categorical(logits=log_r.double()).sample((num_samples,))  # (L, N)
        return proposals[idx]


class RatioPosterior:
    """``p(theta | x_obs) ∝ p(theta) r(theta, x_obs)`` of a fitted :class:`RatioLikelihood`, sampled by
    tempered SMC (:class:`~pyro_sde.infer.SMCSampler`) from the prior to the posterior, in the prior's
    unconstrained coordinates, with a Gaussian reference moment-matched to prior draws: the particles start
    spread over the whole prior, so separated modes are found and weighted by their mass.

    :param likelihood: fitted. :param x_obs: the observation (``d_x`` values).
    :param int num_particles: SMC particles per run (2048). :param int num_runs: independent runs (1).
    :param dict smc_options: further :class:`~pyro_sde.infer.SMCSampler` options.
    """

    def __init__(self, likelihood: RatioLikelihood, x_obs: torch.Tensor, *, num_particles: int = 2048,
                 num_runs: int = 1, smc_options: dict | None = None):
        if not isinstance(likelihood, RatioLikelihood):
            raise TypeError(f"likelihood must be a RatioLikelihood, got {type(likelihood).__name__}")
        if not likelihood.estimator_is_fitted:
            raise ValueError("the likelihood must be fitted first")
        self.likelihood, self.prior = likelihood, likelihood._prior()
        est = likelihood.estimator
        self.dtype, self.device = est.shift.dtype, est.shift.device
        x_obs = torch.as_tensor(x_obs, dtype=self.dtype, device=self.device)
        if x_obs.numel() != likelihood.x_dim:
            raise ValueError(f"x_obs must have {likelihood.x_dim} values, got shape {tuple(x_obs.shape)}")
        if not bool(torch.isfinite(x_obs).all()):
            raise ValueError("x_obs contains NaN or infinite values")
        self.x_obs = x_obs.reshape(-1)
        self.num_particles, self.num_runs = num_particles, num_runs
        self.smc_options = dict(smc_options or {})
        self._smc = None

    @property
    def dim(self) -> int:
        return self.prior.dim

    def unnormalized_log_prob(self, theta: torch.Tensor) -> torch.Tensor:
        """``log p(theta) + log r(theta, x_obs)``, rows ``(..., d) -> (...)``; ``-inf`` off the support."""
        theta = torch.as_tensor(theta, dtype=self.dtype, device=self.device)
        lp = self.prior.log_prob(theta)
        inside = torch.isfinite(lp)
        safe = torch.where(inside[..., None], theta, self.prior.sample_like(theta))
        return torch.where(inside, lp + self.likelihood.log_ratio(safe, self.x_obs), lp)

    def _log_density_unconstrained(self, u: torch.Tensor) -> torch.Tensor:
        """The posterior density of ``u`` (Jacobian included); ``-inf`` where ``T(u)`` overflows (e.g. ``exp``
        of a far move), with zero gradient there."""
        with torch.no_grad():
            ok = torch.isfinite(self.prior.constrain(u)[0]).all(-1)
        theta, log_det = self.prior.constrain(torch.where(ok[..., None], u, torch.zeros_like(u)))
        out = self.prior.log_prob(theta) + log_det + self.likelihood.log_ratio(theta, self.x_obs)
        return torch.where(ok, out, torch.full_like(out, -math.inf))

    @property
    def smc(self) -> SMCSampler:
        """The fitted :class:`~pyro_sde.infer.SMCSampler` (run at first use)."""
        if self._smc is None:
            from ..infer import SMCSampler

            with torch.no_grad():
                u = self.prior.unconstrain(self.prior.sample(8192).to(self.dtype))
                u = u[torch.isfinite(u).all(-1)]
                loc = u.mean(0)
                cov = torch.atleast_2d(torch.cov(u.T))
                cov = cov + 1e-6 * torch.eye(self.dim, dtype=u.dtype, device=u.device)
            options = dict(num_particles=self.num_particles, num_runs=self.num_runs,
                           precondition=(loc, torch.linalg.cholesky(cov)))
            options.update(self.smc_options)
            smc = SMCSampler(log_density=self._log_density_unconstrained, dim=self.dim, dtype=self.dtype,
                             device=self.device, **options)
            self._smc = smc.run()
        return self._smc

    def get_weighted_samples(
        self, num_samples: int | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``({site: (M, *shape)}, log_weights (M,))`` from the SMC particles (as
        :meth:`SMCSampler.get_weighted_samples`; :func:`~pyro_sde.to_inference_data` takes this object)."""
        samples, log_w = self.smc.get_weighted_samples(num_samples)
        with torch.no_grad():
            theta = self.prior.constrain(samples["x"].to(self.dtype))[0]
        return self.prior.unflatten(theta), log_w

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        """Draws ``(*sample_shape, d)`` resampled (systematic, then shuffled) from the SMC particles."""
        sample_shape = torch.Size(sample_shape)
        n = max(1, sample_shape.numel())
        samples, log_w = self.smc.get_weighted_samples()
        idx = diagnostics.systematic_resample(log_w, n)
        idx = idx[torch.randperm(n, device=idx.device)]
        theta = self.prior.constrain(samples["x"][idx].to(self.dtype))[0]
        return theta.reshape(sample_shape + (self.dim,))

    def log_evidence(self) -> diagnostics.LogEvidence:
        """``log Z = log int p(theta) r(theta, x_obs) dtheta`` (1 for an exact ratio), from the SMC run."""
        return self.smc.log_evidence()

    def log_prob(self, theta: torch.Tensor) -> torch.Tensor:
        """``log p(theta | x_obs) = log p(theta) + log r(theta, x_obs) - log Z`` (``Z`` the SMC evidence
        estimate), rows ``(..., d) -> (...)``."""
        log_z = self.log_evidence().log_z
        return self.unnormalized_log_prob(theta) - log_z.to(self.dtype)

    def map(self, *, num_starts: int = 16, num_iterations: int = 300, lr: float = 0.05) -> torch.Tensor:
        """The posterior mode ``(d,)``: Adam in unconstrained coordinates (where the prior's Jacobian is left
        out, so this is the mode in ``theta``) from the ``num_starts`` best SMC particles."""
        with torch.no_grad():
            start = self.sample((4 * num_starts,))
            best = self.unnormalized_log_prob(start).argsort(descending=True)[:num_starts]
            u = self.prior.unconstrain(start[best]).clone()
        u.requires_grad_(True)
        opt = torch.optim.Adam([u], lr=lr)
        for _ in range(num_iterations):
            opt.zero_grad()
            theta = self.prior.constrain(u)[0]
            loss = -(self.prior.log_prob(theta) + self.likelihood.log_ratio(theta, self.x_obs)).sum()
            loss.backward()
            opt.step()
        with torch.no_grad():
            theta = self.prior.constrain(u)[0]
            return theta[self.unnormalized_log_prob(theta).argmax()].detach()

    def to_inference_data(self, num_samples: int | None = None) -> arviz.InferenceData | xarray.DataTree:
        """ArviZ data of the posterior draws (:func:`pyro_sde.to_inference_data`)."""
        return diagnostics.to_inference_data(self, num_samples)

    def __repr__(self):
        return f"RatioPosterior(dim={self.dim}, x_obs={self.x_obs.tolist()})"
