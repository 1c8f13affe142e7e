"""Benchmark targets with an exact log normalising constant.

Each target is an *unnormalised* density ``rho`` on ``R^dim`` with a known ``log Z = log int rho``,
exact samples from ``rho / Z``, exact marginal moments and, where it has one, a mode structure:

* :class:`Gaussian`: ``rho(x) = exp(log_Z) N(x; loc, Sigma)``;
* :class:`GaussianMixture` / :func:`GMM9`: ``rho(x) = exp(log_Z) sum_k w_k N(x; mu_k, s_k^2 I)``;
* :class:`Funnel`: ``rho(x) = N(x_1; 0, sigma^2) prod_{i>1} N(x_i; 0, e^{x_1})``, ``log Z = 0``;
* :class:`ManyWell`: ``rho(x) = exp(-sum_{i<=m} (x_i^2 - delta)^2 - 1/2 sum_{i>m} x_i^2)``.

All densities are torch-first: :meth:`Target.log_prob` takes ``x`` of shape ``(..., dim)`` on any
device and floating dtype and returns shape ``(...)`` in the same dtype and device (parameters are
cast to ``x`` inside). Reference quantities (:attr:`Target.mean`, :attr:`Target.marginal_std`,
:attr:`Target.mode_weights`) are float64 CPU tensors. :meth:`Target.model` wraps a target as a Pyro
model whose marginal likelihood is exactly ``exp(log_Z)``::

    target = ManyWell(dim=5, num_wells=5, delta=4.0)
    target.log_Z                      # -0.541056
    x = target.sample(10_000)         # (10000, 5) exact samples
    target.mode_index(x)              # (10000,) in [0, 32)
    sampler = DiffusionSampler(target.model)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import product

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from ._checks import positive_int as _check_positive_int

__all__ = [
    "Target",
    "Gaussian",
    "GaussianMixture",
    "GMM9",
    "Funnel",
    "ManyWell",
    "get_target",
    "target_names",
]

_LOG_2PI = math.log(2 * math.pi)
_F64 = torch.float64


def _as_float64(value, name: str) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=_F64).detach().cpu()
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite, got {value!r}")
    return t


class Target:
    """Base class of the benchmark targets: an unnormalised density with exact ``log Z``.

    Subclasses set :attr:`dim`, :attr:`log_Z` and :attr:`name` and implement :meth:`_log_prob`,
    :meth:`_sample`, :attr:`mean` and :attr:`marginal_std`. The default mode structure is a single
    mode holding all the mass.
    """

    name: str = "target"
    dim: int
    log_Z: float  #: exact ``log int rho(x) dx`` of the unnormalised density
    num_modes: int = 1

    # -- public API -----------------------------------------------------------------------------
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Unnormalised log density ``log rho(x)``: ``(..., dim) -> (...)``, dtype/device of x."""
        return self._log_prob(self._validate(x))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_prob(x)

    def sample(
        self,
        num_samples: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Exact samples from ``rho / Z``, shape ``(num_samples, dim)``.

        ``device`` defaults to the generator's device (else the CPU); ``dtype`` must be floating.
        """
        _check_positive_int(num_samples, "num_samples", minimum=0)
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        if num_samples == 0:
            return torch.empty(0, self.dim, dtype=dtype, device=device)
        return self._sample(num_samples, generator, dtype, torch.device(device))

    def model(self) -> torch.Tensor:
        """Pyro model ``x ~ ImproperUniform(R^dim); factor(log rho(x))``, evidence ``exp(log_Z)``.

        Vectorises over outer plates: ``x`` may carry leading batch dimensions.
        """
        x = pyro.sample("x", dist.ImproperUniform(constraints.real_vector, (), (self.dim,)))
        pyro.factor("log_density", self.log_prob(x))
        return x

    @property
    def mean(self) -> torch.Tensor:
        """Exact mean of ``rho / Z``, float64 tensor of shape ``(dim,)``."""
        raise NotImplementedError

    @property
    def marginal_std(self) -> torch.Tensor:
        """Exact marginal standard deviations of ``rho / Z``, float64 tensor of shape ``(dim,)``."""
        raise NotImplementedError

    def mode_index(self, x: torch.Tensor) -> torch.Tensor:
        """Mode each point belongs to: ``(..., dim) -> LongTensor (...)`` in ``[0, num_modes)``."""
        x = self._validate(x)
        return torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)

    @property
    def mode_weights(self) -> torch.Tensor:
        """Exact probability mass of each mode, float64 tensor of shape ``(num_modes,)``."""
        return torch.ones(1, dtype=_F64)

    # -- helpers --------------------------------------------------------------------------------
    def _log_prob(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _sample(self, n, generator, dtype, device) -> torch.Tensor:
        raise NotImplementedError

    def _validate(self, x) -> torch.Tensor:
        x = torch.as_tensor(x)
        if not x.is_floating_point():
            x = x.to(torch.get_default_dtype())
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(
                f"{self.name}: expected x of shape (..., {self.dim}), got {tuple(x.shape)}"
            )
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, log_Z={self.log_Z:.6f})"


# --------------------------------------------------------------------------------------------------
# Gaussian
# --------------------------------------------------------------------------------------------------


class Gaussian(Target):
    """Gaussian target ``rho(x) = exp(log_Z) N(x; loc, Sigma)``.

    :param loc: mean, shape ``(dim,)``.
    :param scale: standard deviations, scalar or shape ``(dim,)`` (diagonal ``Sigma``); default 1.
    :param covariance: full covariance, shape ``(dim, dim)``; mutually exclusive with ``scale``.
    :param float log_Z: log normalising constant of ``rho``.
    """

    name = "gaussian"

    def __init__(
        self,
        loc: torch.Tensor | Sequence[float],
        scale: float | torch.Tensor | Sequence[float] | None = None,
        covariance: torch.Tensor | Sequence[Sequence[float]] | None = None,
        log_Z: float = 0.0,
    ):
        loc = _as_float64(loc, "loc")
        if loc.dim() != 1 or loc.numel() == 0:
            raise ValueError(f"loc must have shape (dim,), got {tuple(loc.shape)}")
        self.dim = loc.numel()
        self.log_Z = float(log_Z)
        self._loc = loc
        if scale is not None and covariance is not None:
            raise ValueError("give at most one of scale and covariance")
        if covariance is not None:
            cov = _as_float64(covariance, "covariance")
            if cov.shape != (self.dim, self.dim):
                raise ValueError(
                    f"covariance must have shape {(self.dim, self.dim)}, got {tuple(cov.shape)}"
                )
            if not torch.allclose(cov, cov.T, rtol=1e-10, atol=1e-12):
                raise ValueError("covariance must be symmetric")
            L, info = torch.linalg.cholesky_ex(cov)
            if info != 0:
                raise ValueError("covariance must be positive definite")
            self._scale = None
            self._scale_tril = L
            self._covariance = cov
            diag = L.diagonal()
        else:
            s = _as_float64(1.0 if scale is None else scale, "scale")
            s = s.expand(self.dim).clone() if s.dim() == 0 else s
            if s.shape != (self.dim,) or not (s > 0).all():
                raise ValueError(f"scale must be positive, scalar or of shape ({self.dim},)")
            self._scale = s
            self._scale_tril = None
            self._covariance = torch.diag(s * s)
            diag = s
        # log rho = -|z|^2 / 2 + _const,  z = L^{-1} (x - loc)
        self._const = self.log_Z - 0.5 * self.dim * _LOG_2PI - diag.log().sum().item()

    @property
    def covariance(self) -> torch.Tensor:
        """Covariance ``Sigma``, float64 ``(dim, dim)``."""
        return self._covariance

    def _whiten(self, diff: torch.Tensor) -> torch.Tensor:
        if self._scale is not None:
            return diff / self._scale.to(diff)
        L = self._scale_tril.to(diff)
        flat = diff.reshape(-1, self.dim)
        z = torch.linalg.solve_triangular(L, flat.T, upper=False).T
        return z.reshape(diff.shape)

    def _log_prob(self, x):
        z = self._whiten(x - self._loc.to(x))
        return -0.5 * (z * z).sum(-1) + self._const

    def _sample(self, n, generator, dtype, device):
        eps = torch.randn(n, self.dim, generator=generator, dtype=dtype, device=device)
        loc = self._loc.to(dtype=dtype, device=device)
        if self._scale is not None:
            return loc + eps * self._scale.to(loc)
        return loc + eps @ self._scale_tril.to(loc).T

    @property
    def mean(self) -> torch.Tensor:
        return self._loc.clone()

    @property
    def marginal_std(self) -> torch.Tensor:
        return self._covariance.diagonal().sqrt()


# --------------------------------------------------------------------------------------------------
# Gaussian mixtures
# --------------------------------------------------------------------------------------------------


class GaussianMixture(Target):
    """Isotropic Gaussian mixture ``rho(x) = exp(log_Z) sum_k w_k N(x; mu_k, s_k^2 I)``.

    Each component is one mode; :meth:`mode_index` assigns a point to its nearest mean.

    :param locs: component means ``mu_k``, shape ``(K, dim)``.
    :param scale: component standard deviations ``s_k``, scalar or shape ``(K,)``.
    :param weights: positive weights, shape ``(K,)``, normalised internally; default equal weights.
    :param float log_Z: log normalising constant of ``rho``.
    """

    name = "gaussian_mixture"

    def __init__(
        self,
        locs: torch.Tensor | Sequence[Sequence[float]],
        scale: float | torch.Tensor | Sequence[float] = 1.0,
        weights: torch.Tensor | Sequence[float] | None = None,
        log_Z: float = 0.0,
    ):
        locs = _as_float64(locs, "locs")
        if locs.dim() != 2 or locs.numel() == 0:
            raise ValueError(f"locs must have shape (K, dim), got {tuple(locs.shape)}")
        K, self.dim = locs.shape
        scale = _as_float64(scale, "scale")
        scale = scale.expand(K).clone() if scale.dim() == 0 else scale
        if scale.shape != (K,) or not (scale > 0).all():
            raise ValueError(f"scale must be positive, scalar or of shape ({K},)")
        if weights is None:
            weights = torch.full((K,), 1.0 / K, dtype=_F64)
        else:
            weights = _as_float64(weights, "weights")
            if weights.shape != (K,) or not (weights > 0).all():
                raise ValueError(f"weights must be positive of shape ({K},)")
            weights = weights / weights.sum()
        self._locs, self._scale, self._weights = locs, scale, weights
        self.num_modes = K
        self.log_Z = float(log_Z)
        # log w_k - d/2 log(2 pi s_k^2) + log_Z
        self._log_coef = weights.log() - self.dim * (0.5 * _LOG_2PI + scale.log()) + self.log_Z

    @property
    def locs(self) -> torch.Tensor:
        """Component means, float64 ``(K, dim)``."""
        return self._locs

    def _sq_dist(self, x):  # (..., dim) -> (..., K)
        return (x.unsqueeze(-2) - self._locs.to(x)).pow(2).sum(-1)

    def _log_prob(self, x):
        var = self._scale.to(x) ** 2
        return torch.logsumexp(self._log_coef.to(x) - 0.5 * self._sq_dist(x) / var, dim=-1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Closed-form ``grad log rho(x) = sum_k r_k(x) (mu_k - x) / s_k^2`` (``r``: responsibilities)."""
        x = self._validate(x)
        var = self._scale.to(x) ** 2
        resp = torch.softmax(self._log_coef.to(x) - 0.5 * self._sq_dist(x) / var, dim=-1)
        locs = self._locs.to(x)
        return (resp / var) @ locs - (resp / var).sum(-1, keepdim=True) * x

    def _sample(self, n, generator, dtype, device):
        k = torch.multinomial(self._weights.to(device), n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=dtype, device=device)
        locs = self._locs.to(dtype=dtype, device=device)
        return locs[k] + self._scale.to(dtype=dtype, device=device)[k, None] * eps

    @property
    def mean(self) -> torch.Tensor:
        return self._weights @ self._locs

    @property
    def marginal_std(self) -> torch.Tensor:
        second = self._weights @ (self._locs**2 + self._scale[:, None] ** 2)
        return (second - self.mean**2).sqrt()

    def mode_index(self, x: torch.Tensor) -> torch.Tensor:
        return self._sq_dist(self._validate(x)).argmin(-1)

    @property
    def mode_weights(self) -> torch.Tensor:
        return self._weights.clone()


class GMM9(GaussianMixture):
    """The 9-mode grid: ``rho(x) = 1/9 sum_{mu in {-5,0,5}^2} N(x; mu, 0.3 I_2)``, ``log Z = 0``.

    Marginal std ``sqrt(0.3 + 50/3) = 4.119`` per coordinate.
    """

    name = "gmm9"

    def __init__(self):
        locs = torch.tensor(list(product([-5.0, 0.0, 5.0], repeat=2)), dtype=_F64)
        super().__init__(locs, scale=math.sqrt(0.3))

    def __repr__(self) -> str:
        return "GMM9()"


# --------------------------------------------------------------------------------------------------
# Funnel
# --------------------------------------------------------------------------------------------------


class Funnel(Target):
    """Neal's funnel ``rho(x) = N(x_1; 0, sigma^2) prod_{i>=2} N(x_i; 0, e^{x_1})``, log Z = 0.

    Marginal std: ``sigma`` for ``x_1`` and ``exp(sigma^2 / 4)`` for the others (heavy-tailed).
    """

    name = "funnel"

    def __init__(self, dim: int = 10, sigma: float = 3.0):
        self.dim = _check_positive_int(dim, "dim", minimum=2)
        sigma = float(sigma)
        if not (sigma > 0 and math.isfinite(sigma)):
            raise ValueError(f"sigma must be positive, got {sigma!r}")
        self.sigma = sigma
        self.log_Z = 0.0

    def _log_prob(self, x):
        x1, rest = x[..., 0], x[..., 1:]
        m = self.dim - 1
        lp1 = -0.5 * (x1 / self.sigma) ** 2 - math.log(self.sigma) - 0.5 * _LOG_2PI
        lp_rest = -0.5 * rest.pow(2).sum(-1) * torch.exp(-x1) - 0.5 * m * (x1 + _LOG_2PI)
        return lp1 + lp_rest

    def _sample(self, n, generator, dtype, device):
        eps = torch.randn(n, self.dim, generator=generator, dtype=dtype, device=device)
        x1 = self.sigma * eps[:, :1]
        return torch.cat([x1, torch.exp(0.5 * x1) * eps[:, 1:]], dim=-1)

    @property
    def mean(self) -> torch.Tensor:
        return torch.zeros(self.dim, dtype=_F64)

    @property
    def marginal_std(self) -> torch.Tensor:
        std = torch.full((self.dim,), math.exp(self.sigma**2 / 4), dtype=_F64)
        std[0] = self.sigma
        return std

    def __repr__(self) -> str:
        return f"Funnel(dim={self.dim}, sigma={self.sigma})"


# --------------------------------------------------------------------------------------------------
# ManyWell
# --------------------------------------------------------------------------------------------------


class ManyWell(Target):
    """Multi-well ``rho(x) = exp(-sum_{i<=m} (x_i^2 - delta)^2 - 1/2 sum_{i>m} x_i^2)``.

    ``log Z = m log Z_1(delta) + (d - m)/2 log(2 pi)``, ``Z_1(delta) = int exp(-(x^2 - delta)^2)``
    computed by float64 trapezoidal quadrature on a fine grid (``2^18 + 1`` points on ``[-L, L]``,
    ``L = max(12, sqrt(delta) + 8)``); the well coordinates are sampled exactly by inverse CDF on
    the same grid. The ``2^m`` modes are the sign patterns of ``x_{1:m}``, each of mass ``2^-m``.

    :param int dim: dimension ``d``.
    :param int num_wells: number ``m <= d`` of double-well coordinates.
    :param float delta: well parameter; the wells sit at ``+-sqrt(delta)``.
    """

    name = "manywell"
    _GRID_SIZE = 2**18 + 1

    def __init__(self, dim: int = 5, num_wells: int = 5, delta: float = 4.0):
        self.dim = _check_positive_int(dim, "dim")
        self.num_wells = _check_positive_int(num_wells, "num_wells", minimum=0)
        if num_wells > dim:
            raise ValueError(f"num_wells ({num_wells}) must be <= dim ({dim})")
        delta = float(delta)
        if not math.isfinite(delta):
            raise ValueError(f"delta must be finite, got {delta!r}")
        self.delta = delta
        self.num_modes = 2**num_wells

        half = max(12.0, math.sqrt(max(delta, 0.0)) + 8.0)
        grid = torch.linspace(-half, half, self._GRID_SIZE, dtype=_F64)
        h = grid[1] - grid[0]
        log_f = -((grid**2 - delta) ** 2)
        shift = log_f.max()
        f = torch.exp(log_f - shift)
        Z1 = torch.trapezoid(f, dx=h.item())
        self.log_Z1 = (Z1.log() + shift).item()  #: ``log Z_1(delta)``
        self.well_std = torch.sqrt(torch.trapezoid(grid**2 * f, dx=h.item()) / Z1).item()
        cdf = torch.cat([f.new_zeros(1), torch.cumsum(0.5 * (f[1:] + f[:-1]) * h, 0)])
        self._grid, self._cdf = grid, cdf / cdf[-1]
        self._grid_cache: dict = {}
        self.log_Z = num_wells * self.log_Z1 + 0.5 * (dim - num_wells) * _LOG_2PI

    def _log_prob(self, x):
        w, r = x[..., : self.num_wells], x[..., self.num_wells :]
        return -((w * w - self.delta) ** 2).sum(-1) - 0.5 * (r * r).sum(-1)

    def _grid_on(self, device):
        if device not in self._grid_cache:
            self._grid_cache[device] = (self._grid.to(device), self._cdf.to(device))
        return self._grid_cache[device]

    def _sample(self, n, generator, dtype, device):
        m = self.num_wells
        grid, cdf = self._grid_on(device)
        u = torch.rand(n, m, generator=generator, dtype=_F64, device=device)
        # inverse of the piecewise-linear CDF: cdf[i-1] <= u < cdf[i]
        i = torch.searchsorted(cdf, u, right=True).clamp_(1, cdf.numel() - 1)
        c0, c1 = cdf[i - 1], cdf[i]
        t = ((u - c0) / (c1 - c0)).clamp_(0.0, 1.0)
        wells = grid[i - 1] + t * (grid[i] - grid[i - 1])
        rest = torch.randn(n, self.dim - m, generator=generator, dtype=_F64, device=device)
        return torch.cat([wells, rest], dim=-1).to(dtype)

    @property
    def mean(self) -> torch.Tensor:
        return torch.zeros(self.dim, dtype=_F64)

    @property
    def marginal_std(self) -> torch.Tensor:
        std = torch.ones(self.dim, dtype=_F64)
        std[: self.num_wells] = self.well_std
        return std

    def mode_index(self, x: torch.Tensor) -> torch.Tensor:
        x = self._validate(x)
        bits = (x[..., : self.num_wells] > 0).long()
        powers = 2 ** torch.arange(self.num_wells, device=x.device)
        return (bits * powers).sum(-1)

    @property
    def mode_weights(self) -> torch.Tensor:
        return torch.full((self.num_modes,), 2.0**-self.num_wells, dtype=_F64)

    def __repr__(self) -> str:
        return f"ManyWell(dim={self.dim}, num_wells={self.num_wells}, delta={self.delta})"


# --------------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------------

_REGISTRY = {
    "gaussian": Gaussian,
    "gaussian_mixture": GaussianMixture,
    "gmm9": GMM9,
    "funnel": Funnel,
    "manywell": ManyWell,
}


def target_names() -> list[str]:
    """Names accepted by :func:`get_target`."""
    return sorted(_REGISTRY)


def get_target(name: str, **kwargs) -> Target:
    """Build a target by name (``"gaussian"``, ``"gmm9"``, ``"funnel"``, ``"manywell"``, ...)."""
    key = str(name).lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(f"unknown target {name!r}; choose from {target_names()}")
    return _REGISTRY[key](**kwargs)
