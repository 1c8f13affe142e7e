"""Interpolation paths between a denominator density ``p_0`` (t = 0) and a numerator ``p_1`` (t = 1).

A path is ``x_t = alpha_t x_0 + beta_t x_1`` with ``x_0 ~ p_0``, ``x_1 ~ p_1`` independent; the
time-score estimators use ``log r(x) = log p_1(x) - log p_0(x) = int_0^1 d/dt log p_t(x) dt``.
``alpha_0 = 1, beta_0 = 0`` always; ``alpha_1 = 0, beta_1 = 1`` for every path here except ``"vp"``
(``alpha_1 = exp(-5.05)``, so its t = 1 end is ``p_1`` blurred by a 0.0064 fraction of ``p_0``).

Derivatives in ``t`` come from forward-mode AD of :meth:`InterpolationPath.coefficients`, so a new path
only defines ``alpha, beta``. :class:`GaussianPath` gives the exact marginals, time score, secant and
log ratio for ``p_0 = N(0, I)``, ``p_1 = N(mu, Sigma)``: the analytic reference of tests and benchmarks.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as fwAD

__all__ = [
    "InterpolationPath",
    "DREInfinityPath",
    "LinearPath",
    "VPPath",
    "CosinePath",
    "TrigonometricPath",
    "GaussianPath",
    "get_path",
    "time_derivative",
]


def time_derivative(
    fn: Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, ...]], t: torch.Tensor
) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor | tuple[torch.Tensor, ...]]:
    """``(fn(t), d fn / dt)`` by forward-mode AD (``fn`` may return a tensor or a tuple of tensors)."""
    with fwAD.dual_level():
        t = t.contiguous()
        out = fn(fwAD.make_dual(t, torch.ones_like(t)))
        if isinstance(out, tuple):
            pairs = [fwAD.unpack_dual(o) for o in out]
            return tuple(p.primal for p in pairs), tuple(_tangent(p) for p in pairs)
        p = fwAD.unpack_dual(out)
        return p.primal, _tangent(p)


def _tangent(p):
    return p.tangent if p.tangent is not None else torch.zeros_like(p.primal)


class InterpolationPath:
    """Base class: ``x_t = alpha_t x_0 + beta_t x_1``; subclasses define :meth:`coefficients`."""

    name = "path"

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, beta_t)``, each of the shape of ``t``."""
        raise NotImplementedError

    def coefficients_and_derivatives(
        self, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(alpha, beta, d alpha/dt, d beta/dt)``, each of the shape of ``t``."""
        (a, b), (da, db) = time_derivative(self.coefficients, t)
        return a, b, da, db

    def alpha_squared(self, t: torch.Tensor) -> torch.Tensor:
        """``alpha_t^2`` (override with a form that stays smooth where ``alpha_t = 0``)."""
        return self.coefficients(t)[0] ** 2

    def alpha_alpha_dot(self, t: torch.Tensor) -> torch.Tensor:
        """``alpha_t alpha_t' = (1/2) d/dt alpha_t^2`` (finite at ``t = 1`` for the paths here)."""
        return 0.5 * time_derivative(self.alpha_squared, t)[1]

    def interpolate(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = alpha_t x_0 + beta_t x_1``; ``x0, x1`` ``(..., d)``, ``t`` ``(...)``."""
        a, b = self.coefficients(t)
        return a[..., None] * x0 + b[..., None] * x1

    def conditional_time_score(self, noise: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """CTSM target ``d/dt log N(x_t; beta_t x_1, alpha_t^2 I)`` at ``x_t = alpha_t noise + beta_t x_1``:
        ``(|noise|^2 - d) alpha'/alpha + <noise, x_1> beta'/alpha``. Its mean given ``x_t`` is the marginal
        time score of the path from ``N(0, I)``. Shapes ``(N, d), (N, d), (N,) -> (N,)``."""
        a, _, da, db = self.coefficients_and_derivatives(t)
        d = noise.shape[-1]
        return ((noise * noise).sum(-1) - d) * (da / a) + (noise * x1).sum(-1) * (db / a)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        """Loss weight ``lambda(t) = alpha^2 / (2 alpha'^2 + beta'^2)`` ~ 1 / Var(CTSM target) * d (finite
        on ``[0, 1)``; equals ``(1 - t^2)^2 / (1 + t^2)`` on the DRE-infinity path)."""
        a, _, da, db = self.coefficients_and_derivatives(t)
        return a * a / (2 * da * da + db * db)

    def __repr__(self):
        return f"{type(self).__name__}()"


class DREInfinityPath(InterpolationPath):
    """``alpha_t = sqrt(1 - t^2), beta_t = t`` (DRE-infinity's toy/MI path; "Follmer" in OpenDRE)."""

    name = "dre_infinity"

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (1 - t * t).clamp_min(0).sqrt(), t

    def alpha_squared(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - t * t


class LinearPath(InterpolationPath):
    """``alpha_t = 1 - t, beta_t = t``."""

    name = "linear"

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return 1 - t, t


class TrigonometricPath(InterpolationPath):
    """``alpha_t = cos(pi t / 2), beta_t = sin(pi t / 2)``."""

    name = "trigonometric"

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)


class VPPath(InterpolationPath):
    """Score-SDE VP: ``alpha_t = exp(-t^2 (b_max - b_min) / 4 - t b_min / 2)``,
    ``beta_t = sqrt(1 - alpha_t^2)``."""

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0):
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.exp(-0.25 * t * t * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min)
        return a, (1 - a * a).clamp_min(0).sqrt()


class CosinePath(InterpolationPath):
    """iDDPM cosine: ``abar_t = cos((t+s)/(1+s) pi/2) / cos(s/(1+s) pi/2)``, ``alpha = sqrt(abar)``,
    ``beta = sqrt(1 - abar)``."""

    name = "cosine"

    def __init__(self, s: float = 0.008):
        self.s = float(s)

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.s
        abar = torch.cos((t + s) / (1 + s) * 0.5 * math.pi) / math.cos(s / (1 + s) * 0.5 * math.pi)
        abar = abar.clamp(0, 1)
        return abar.sqrt(), (1 - abar).sqrt()

    def alpha_squared(self, t: torch.Tensor) -> torch.Tensor:
        s = self.s
        return torch.cos((t + s) / (1 + s) * 0.5 * math.pi) / math.cos(s / (1 + s) * 0.5 * math.pi)


_PATHS = {
    "dre_infinity": DREInfinityPath,
    "follmer": DREInfinityPath,
    "linear": LinearPath,
    "vp": VPPath,
    "cosine": CosinePath,
    "trigonometric": TrigonometricPath,
}


def get_path(path: str | InterpolationPath) -> InterpolationPath:
    """An :class:`InterpolationPath` from an instance or a name in
    ``{"dre_infinity", "follmer", "linear", "vp", "cosine", "trigonometric"}``."""
    if isinstance(path, InterpolationPath):
        return path
    if isinstance(path, str) and path in _PATHS:
        return _PATHS[path]()
    raise ValueError(f"unknown path {path!r}; expected an InterpolationPath or one of {sorted(_PATHS)}")


class GaussianPath:
    """Exact marginals of a path from ``p_0 = N(0, I)`` to ``p_1 = N(mean, cov)``.

    ``p_t = N(beta_t mean, alpha_t^2 I + beta_t^2 cov)``; with ``cov = Q diag(lam) Q^T`` every ``p_t``
    is diagonal in the ``Q`` basis, so ``log p_t``, the time score ``d/dt log p_t(x)`` (forward AD), the
    secant ``(log p_t - log p_l) / (t - l)`` and ``log r = log p_1 - log p_0`` cost O(N d^2).

    :param path: an :class:`InterpolationPath` or its name.
    :param mean: ``(d,)``; :param cov: ``(d, d)`` symmetric positive definite.
    """

    def __init__(self, path: str | InterpolationPath, mean: torch.Tensor, cov: torch.Tensor):
        self.path = get_path(path)
        self.mean = torch.as_tensor(mean)
        cov = torch.as_tensor(cov, dtype=self.mean.dtype, device=self.mean.device)
        if self.mean.dim() != 1 or cov.shape != (self.mean.shape[0],) * 2:
            raise ValueError(
                f"mean must be (d,) and cov (d, d), got {tuple(self.mean.shape)}, {tuple(cov.shape)}")
        self.eigenvalues, self.eigenvectors = torch.linalg.eigh(cov)
        if not bool((self.eigenvalues > 0).all()):
            raise ValueError("cov must be positive definite")
        self.dim = self.mean.shape[0]

    def log_prob(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``log p_t(x)``; ``x`` ``(N, d)``, ``t`` broadcastable to ``(N,)``."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[:-1])
        b = self.path.coefficients(t)[1]
        var = self.path.alpha_squared(t)[..., None] + b[..., None] ** 2 * self.eigenvalues  # (N, d)
        z = (x - b[..., None] * self.mean) @ self.eigenvectors
        return -0.5 * (z * z / var + var.log() + math.log(2 * math.pi)).sum(-1)

    def time_score(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``d/dt log p_t(x)`` at fixed ``x`` (the tangent), shape ``(N,)``."""
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[:-1])
        return time_derivative(lambda s: self.log_prob(x, s), t)[1]

    def secant(self, x: torch.Tensor, l: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``u(x, l, t) = (log p_t(x) - log p_l(x)) / (t - l)`` (``l < t``), shape ``(N,)``."""
        return (self.log_prob(x, t) - self.log_prob(x, l)) / (t - l)

    def log_ratio(self, x: torch.Tensor) -> torch.Tensor:
        """``log p_1(x) - log p_0(x)`` with the path's own end points, shape ``(N,)``."""
        one = torch.ones((), dtype=x.dtype, device=x.device)
        return self.log_prob(x, one) - self.log_prob(x, 0 * one)

    def sample(
        self, num_samples: int, t: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``num_samples`` draws of ``p_t``, shape ``(num_samples, d)``."""
        t = torch.tensor(float(t), dtype=self.mean.dtype, device=self.mean.device)
        a, b = self.path.coefficients(t)
        shape = (num_samples, self.dim)
        eps0 = torch.randn(shape, dtype=self.mean.dtype, device=self.mean.device, generator=generator)
        eps1 = torch.randn(shape, dtype=self.mean.dtype, device=self.mean.device, generator=generator)
        x1 = self.mean + (eps1 * self.eigenvalues.sqrt()) @ self.eigenvectors.T
        return a * eps0 + b * x1
