"""The eleven posteriordb posteriors of ``../shared/posteriordb`` as Pyro models (one translation each).

Each Stan program is translated once, keeping Stan's priors: an unbounded parameter without a prior
gets Stan's improper flat prior (:class:`FlatPrior`, log density 0 on its support), ``real<lower=0>`` a site
with positive support, a proper prior on a constrained parameter its normalised version (Stan's ``~``
drops constants; e.g. ``sigma ~ cauchy(0, 2.5)`` with ``<lower=0>`` is ``HalfCauchy(2.5)``), so that
``log Z`` is the evidence with respect to Lebesgue measure on the flat parameters.

The models take float64 tensors and are vectorisable: scalar latents broadcast as ``(...)``, vector
coefficients as ``(..., D)`` with ``.to_event(1)``, the linear predictor is ``beta @ X.T`` (``(..., n)``),
and observations are one ``.to_event(1)`` site (no data plate), so a leading particle dimension
broadcasts. The HMM and ARMA(1, 1) likelihoods are recursions over time (a Python loop, vectorised
over particles).

Usage::

    post = POSTERIORS["kidiq-kidscore_momhsiq"]
    args = post.model_args()                  # float64 tensors from data/<data>.json.zip
    reference = post.reference_draws()        # {"beta[1]": (10000,), ...} from reference_draws/
    draws = post.to_reference(samples)        # site samples {"beta": (S, 3), ...} -> the same names
"""

from __future__ import annotations

import functools
import json
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from torch.distributions import biject_to

POSTERIORDB_DIR = Path(
    os.environ.get("POSTERIORDB_DIR", Path(__file__).resolve().parents[2] / "shared" / "posteriordb")
)


# -- priors and likelihood pieces ----------------------------------------------------------------------
class FlatPrior(dist.TorchDistribution):
    """Stan's improper flat prior on ``support``: log density 0. Sampling (for initialisation) draws a
    standard normal in unconstrained space; ``like`` sets dtype and device."""

    arg_constraints = {}

    def __init__(self, like: torch.Tensor, event_shape=(), support=constraints.real, batch_shape=()):
        self._like, self._base_support = like.new_zeros(()), support
        extra_dims = len(event_shape) - biject_to(support).codomain.event_dim
        self._flat_support = constraints.independent(support, extra_dims) if extra_dims else support
        super().__init__(torch.Size(batch_shape), torch.Size(event_shape), validate_args=False)

    @constraints.dependent_property
    def support(self):
        return self._flat_support

    def expand(self, batch_shape, _instance=None):
        return FlatPrior(self._like, self.event_shape, self._base_support, batch_shape)

    def sample(self, sample_shape=()):
        shape = torch.Size(sample_shape) + self.batch_shape + self.event_shape  # the bijections keep shapes
        return biject_to(self._flat_support)(self._like.new_zeros(shape).normal_())

    def log_prob(self, value):
        return value.new_zeros(value.shape[: value.dim() - len(self.event_shape)])


def _normal_observations(y: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor):
    """Stan's ``y ~ normal(mean, sigma)``: ``y`` (n,), ``mean`` (..., n), ``sigma`` (...)."""
    pyro.sample("y", dist.Normal(mean, sigma[..., None]).to_event(1), obs=y)


# -- the Stan programs -----------------------------------------------------------------------------------
def flat_regression(X, y):
    """``logearn_interaction``, ``logmesquite``, ``nes``: ``y ~ normal(X beta, sigma)``, flat priors on
    ``beta`` (D,) and ``sigma > 0``; ``X`` (n, D) holds the intercept column."""
    beta = pyro.sample("beta", FlatPrior(X, (X.shape[-1],)))
    sigma = pyro.sample("sigma", FlatPrior(X, support=constraints.positive))
    _normal_observations(y, beta @ X.T, sigma)


def kidscore_momhsiq(X, y):
    """``kid_score ~ normal(beta[1] + beta[2] mom_hs + beta[3] mom_iq, sigma)``, flat ``beta``,
    ``sigma ~ cauchy(0, 2.5)`` on ``sigma > 0``; ``X = [1, mom_hs, mom_iq]`` (n, 3)."""
    beta = pyro.sample("beta", FlatPrior(X, (3,)))
    sigma = pyro.sample("sigma", dist.HalfCauchy(X.new_tensor(2.5)))
    _normal_observations(y, beta @ X.T, sigma)


def blr(X, y):
    """``beta ~ normal(0, 10)`` (D,), ``sigma ~ normal(0, 10)`` on ``sigma > 0``,
    ``y ~ normal(X beta, sigma)``."""
    beta = pyro.sample("beta", dist.Normal(X.new_zeros(X.shape[-1]), 10.0).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(X.new_tensor(10.0)))
    _normal_observations(y, beta @ X.T, sigma)


def kilpisjarvi(x, y, prior_loc, prior_scale):
    """``alpha ~ normal(prior_loc[0], prior_scale[0])``, ``beta ~ normal(prior_loc[1], prior_scale[1])``,
    flat ``sigma > 0``, ``y ~ normal(alpha + beta x, sigma)`` (x: calendar years)."""
    alpha = pyro.sample("alpha", dist.Normal(prior_loc[0], prior_scale[0]))
    beta = pyro.sample("beta", dist.Normal(prior_loc[1], prior_scale[1]))
    sigma = pyro.sample("sigma", FlatPrior(x, support=constraints.positive))
    _normal_observations(y, alpha[..., None] + beta[..., None] * x, sigma)


def diamonds(Xc, y):
    """brms: ``b ~ normal(0, 1)`` (K-1,), ``Intercept ~ student_t(3, 8, 10)``, ``sigma ~ student_t(3, 0, 10)``
    on ``sigma > 0`` (normalised: a half Student t), ``y ~ normal(Intercept + Xc b, sigma)``, ``Xc`` the
    centred design matrix without its intercept column (n, K-1)."""
    b = pyro.sample("b", dist.Normal(Xc.new_zeros(Xc.shape[-1]), 1.0).to_event(1))
    intercept = pyro.sample("Intercept", dist.StudentT(3.0, Xc.new_tensor(8.0), 10.0))
    sigma = pyro.sample("sigma", dist.FoldedDistribution(dist.StudentT(3.0, Xc.new_tensor(0.0), 10.0)))
    _normal_observations(y, intercept[..., None] + b @ Xc.T, sigma)


def eight_schools_theta(theta_trans, mu, tau):
    """The schools' effects ``theta = mu + tau theta_trans``: ``theta_trans`` (..., J), ``mu, tau`` (...)."""
    return mu[..., None] + tau[..., None] * theta_trans


def eight_schools_noncentered(y, sigma):
    """``theta_trans ~ normal(0, 1)`` (J,), ``mu ~ normal(0, 5)``, ``tau ~ cauchy(0, 5)`` on ``tau > 0``,
    ``y ~ normal(mu + tau theta_trans, sigma)``."""
    theta_trans = pyro.sample("theta_trans", dist.Normal(y.new_zeros(len(y)), 1.0).to_event(1))
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(y.new_tensor(5.0)))
    theta = pyro.deterministic("theta", eight_schools_theta(theta_trans, mu, tau), event_dim=1)
    pyro.sample("y", dist.Normal(theta, sigma).to_event(1), obs=y)


def gp_regr(x, y):
    """``rho ~ gamma(25, 4)``, ``alpha ~ normal(0, 2)``, ``sigma ~ normal(0, 1)`` (all > 0),
    ``y ~ multi_normal(0, K)`` with ``K_ij = alpha^2 exp(-(x_i - x_j)^2 / (2 rho^2)) + sigma delta_ij``
    (Stan adds ``sigma``, not ``sigma^2``, to the diagonal)."""
    rho = pyro.sample("rho", dist.Gamma(x.new_tensor(25.0), 4.0))
    alpha = pyro.sample("alpha", dist.HalfNormal(x.new_tensor(2.0)))
    sigma = pyro.sample("sigma", dist.HalfNormal(x.new_tensor(1.0)))
    squared_distance = (x[:, None] - x[None, :]) ** 2
    rho, alpha, sigma = rho[..., None, None], alpha[..., None, None], sigma[..., None, None]
    cov = alpha**2 * torch.exp(-0.5 * squared_distance / rho**2) + sigma * torch.eye(len(x), dtype=x.dtype)
    pyro.sample("y", dist.MultivariateNormal(x.new_zeros(len(x)), covariance_matrix=cov), obs=y)


def arma11(y):
    """ARMA(1, 1): ``mu ~ normal(0, 10)``, ``phi, theta ~ normal(0, 2)``, ``sigma ~ cauchy(0, 2.5)`` on
    ``sigma > 0``; ``err_1 = y_1 - (mu + phi mu)``, ``err_t = y_t - (mu + phi y_{t-1} + theta err_{t-1})``,
    ``err ~ normal(0, sigma)``."""
    mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 10.0))
    phi = pyro.sample("phi", dist.Normal(y.new_tensor(0.0), 2.0))
    theta = pyro.sample("theta", dist.Normal(y.new_tensor(0.0), 2.0))
    sigma = pyro.sample("sigma", dist.HalfCauchy(y.new_tensor(2.5)))
    err = [y[0] - (mu + phi * mu)]
    for t in range(1, len(y)):
        err.append(y[t] - (mu + phi * y[t - 1] + theta * err[-1]))
    err = torch.stack(err, -1)
    pyro.factor("err", dist.Normal(0.0, sigma[..., None]).log_prob(err).sum(-1))


def hmm_example(y):
    """Two-state Gaussian HMM: rows ``theta1, theta2`` of the transition matrix uniform on the simplex,
    ``mu`` positive ordered with ``mu[1] ~ normal(3, 1)``, ``mu[2] ~ normal(10, 1)``,
    ``y_t ~ normal(mu[z_t], 1)``;
    the states are marginalised by the forward algorithm (``gamma_t = logsumexp(gamma_{t-1} + log theta)
    + log p(y_t | mu)``)."""
    theta1 = pyro.sample("theta1", dist.Dirichlet(y.new_ones(2)))
    theta2 = pyro.sample("theta2", dist.Dirichlet(y.new_ones(2)))
    mu = pyro.sample("mu", FlatPrior(y, (2,), constraints.positive_ordered_vector))
    pyro.factor("mu_prior", dist.Normal(y.new_tensor([3.0, 10.0]), 1.0).log_prob(mu).sum(-1))
    log_transition = torch.stack([theta1, theta2], -2).log()  # (..., from, to)
    log_emission = dist.Normal(mu[..., None, :], 1.0).log_prob(y[:, None])  # (..., T, K)
    gamma = log_emission[..., 0, :]
    for t in range(1, len(y)):
        gamma = torch.logsumexp(gamma[..., :, None] + log_transition, -2) + log_emission[..., t, :]
    pyro.factor("y", torch.logsumexp(gamma, -1))


# -- Stan data -> model arguments ------------------------------------------------------------------------
def _tensor(values) -> torch.Tensor:
    return torch.as_tensor(values, dtype=torch.float64)


def _columns(*columns) -> torch.Tensor:
    """Design matrix (n, 1 + len(columns)) with an intercept column."""
    return torch.stack([torch.ones_like(columns[0]), *columns], -1)


def _earnings_args(d):
    height, male = _tensor(d["height"]), _tensor(d["male"])
    return _columns(height, male, height * male), _tensor(d["earn"]).log()


def _mesquite_args(d):
    logs = [_tensor(d[k]).log() for k in ("diam1", "diam2", "canopy_height", "total_height", "density")]
    return _columns(*logs, _tensor(d["group"])), _tensor(d["weight"]).log()


def _nes_args(d):
    age = torch.as_tensor(d["age_discrete"])
    ages = [(age == k).double() for k in (2, 3, 4)]
    first = [_tensor(d[k]) for k in ("real_ideo", "race_adj")]
    last = [_tensor(d[k]) for k in ("educ1", "gender", "income")]
    return _columns(*first, *ages, *last), _tensor(d["partyid7"])


def _diamonds_args(d):
    X = _tensor(d["X"])[:, 1:]
    return X - X.mean(0), _tensor(d["Y"])


def _kilpisjarvi_args(d):
    prior_loc, prior_scale = _tensor([d["pmualpha"], d["pmubeta"]]), _tensor([d["psalpha"], d["psbeta"]])
    return _tensor(d["x"]), _tensor(d["y"]), prior_loc, prior_scale


def _eight_schools_derived(samples):
    return {"theta": eight_schools_theta(samples["theta_trans"], samples["mu"], samples["tau"])}


# -- the posteriors --------------------------------------------------------------------------------------
def _read_json_zip(path: Path):
    if not path.exists():
        raise FileNotFoundError(
            f"posteriordb file {path} not found: the benchmark needs the shared posteriordb subset beside "
            "the repository (../shared/posteriordb) or its location in POSTERIORDB_DIR"
        )
    with zipfile.ZipFile(path) as archive:
        (name,) = archive.namelist()
        return json.loads(archive.read(name))


def flatten_sites(samples: dict) -> dict:
    """Site samples ``{name: (S, *shape)}`` -> scalar draws under Stan's names ``{"beta[2]": (S,)}``."""
    out = {}
    for name, value in samples.items():
        if value.dim() == 1:
            out[name] = value
        else:
            value = value.reshape(value.shape[0], -1)
            out.update({f"{name}[{i + 1}]": value[:, i] for i in range(value.shape[1])})
    return out


@dataclass(frozen=True)
class Posterior:
    """One posteriordb posterior: its Pyro model, how to build the model's arguments from the Stan data,
    and the map from site samples to the reference draws' scalar names."""

    name: str
    model: Callable
    make_args: Callable[[dict], tuple]
    derived: Callable[[dict], dict] | None = None  # site samples -> extra sites named as in Stan

    @property
    def record(self) -> dict:
        return json.loads((POSTERIORDB_DIR / "posteriors" / f"{self.name}.json").read_text())

    @property
    def dimension(self) -> int:
        """Number of scalar parameters in the posterior's record (constrained, e.g. a simplex counts K)."""
        return sum(self.record["dimensions"].values())

    def stan_data(self) -> dict:
        return _read_json_zip(POSTERIORDB_DIR / "data" / f"{self.record['data_name']}.json.zip")

    def model_args(self) -> tuple:
        return _model_args(self.name)

    def reference_draws(self) -> dict:
        """``{name: (10 * 1000,)}`` float64: the 10 reference chains concatenated."""
        return _reference_draws(self.name)

    def to_reference(self, samples: dict) -> dict:
        """Latent site samples ``{site: (S, *shape)}`` -> ``{reference name: (S,)}`` (only the names in the
        reference draws; a missing one raises)."""
        samples = dict(samples)
        if self.derived is not None:
            samples.update(self.derived(samples))
        flat_draws = flatten_sites(samples)
        names = list(self.reference_draws())
        missing = [n for n in names if n not in flat_draws]
        if missing:
            raise KeyError(f"{self.name}: no samples for reference parameters {missing}")
        return {n: flat_draws[n] for n in names}


@functools.cache
def _model_args(name: str) -> tuple:
    post = POSTERIORS[name]
    return post.make_args(post.stan_data())


@functools.cache
def _reference_draws(name: str) -> dict:
    chains = _read_json_zip(POSTERIORDB_DIR / "reference_draws" / f"{name}.json.zip")
    return {k: torch.cat([_tensor(chain[k]) for chain in chains]) for k in chains[0]}


POSTERIORS = {
    p.name: p
    for p in [
        Posterior(
            "eight_schools-eight_schools_noncentered",
            eight_schools_noncentered,
            lambda d: (_tensor(d["y"]), _tensor(d["sigma"])),
            derived=_eight_schools_derived,
        ),
        Posterior(
            "kidiq-kidscore_momhsiq",
            kidscore_momhsiq,
            lambda d: (_columns(_tensor(d["mom_hs"]), _tensor(d["mom_iq"])), _tensor(d["kid_score"])),
        ),
        Posterior("mesquite-logmesquite", flat_regression, _mesquite_args),
        Posterior("nes1972-nes", flat_regression, _nes_args),
        Posterior("sblrc-blr", blr, lambda d: (_tensor(d["X"]), _tensor(d["y"]))),
        Posterior("diamonds-diamonds", diamonds, _diamonds_args),
        Posterior("gp_pois_regr-gp_regr", gp_regr, lambda d: (_tensor(d["x"]), _tensor(d["y"]))),
        Posterior("earnings-logearn_interaction", flat_regression, _earnings_args),
        Posterior("arma-arma11", arma11, lambda d: (_tensor(d["y"]),)),
        Posterior("hmm_example-hmm_example", hmm_example, lambda d: (_tensor(d["y"]),)),
        Posterior("kilpisjarvi_mod-kilpisjarvi", kilpisjarvi, _kilpisjarvi_args),
    ]
}
