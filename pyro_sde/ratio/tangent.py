"""Tangent (DRE-infinity) estimator: learn the time score, integrate it by quadrature.

``log r(x) = int_0^1 s(x, t) dt`` with ``s(x, t) = d/dt log p_t(x)`` along an interpolation path
(:mod:`pyro_sde.ratio.paths`). ``s`` is regressed on the conditional time score (CTSM):
``min E_t E lambda(t) (s_theta(x_t, t) - d/dt log p_t(x_t | x_1))^2``, ``x_t = alpha_t eps + beta_t x_1``,
``eps ~ N(0, I)``: this learns the path from ``N(0, I)`` to ``p_num``. With a denominator sample the
estimator is two-sided: ``s(x, t, side)`` learns both ``log p_num / N(0,I)`` and ``log p_den / N(0,I)``
and ``log r`` is their difference; without one, ``p_den = N(0, I)`` exactly (the DRE-infinity MI setup).
Time is integrated over ``[0, 1 - eps]`` (the conditional target is singular at ``t = 1``).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import RatioEstimator, make_time_score_network
from .paths import get_path

__all__ = ["TangentRatioEstimator", "gauss_legendre"]


def gauss_legendre(num_steps: int, a: float, b: float, like: torch.Tensor):
    """Gauss-Legendre nodes and weights on ``[a, b]`` (``(K,), (K,)``, dtype/device of ``like``)."""
    nodes, weights = np.polynomial.legendre.leggauss(num_steps)
    nodes = torch.as_tensor(nodes, dtype=like.dtype, device=like.device)
    weights = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    return 0.5 * (b - a) * nodes + 0.5 * (b + a), 0.5 * (b - a) * weights


class _TimeScoreEstimator(RatioEstimator):
    """Shared parts of the tangent and secant estimators (path, network, CTSM batches)."""

    allows_standard_normal_denominator = True
    num_times = 1

    def __init__(self, dim, *, path, network, eps, network_options):
        super().__init__(dim)
        if not 0 < eps < 0.5:
            raise ValueError(f"eps must be in (0, 0.5), got {eps!r}")
        self.path = get_path(path)
        self.eps = float(eps)
        self.network = make_time_score_network(network, dim, self.num_times, **(network_options or {}))
        self._config.update(eps=eps, network_options=network_options)
        if isinstance(path, str):
            self._config["path"] = path
        if isinstance(network, str):
            self._config["network"] = network

    @property
    def t_max(self) -> float:
        return 1.0 - self.eps

    def _ctsm_batch(self, x1):
        """``(x_t, t, target, weight)`` for one side; ``t`` stratified on ``[0, 1 - eps]``."""
        n = x1.shape[0]
        t = _stratified_times(n, self.t_max, x1)
        noise = torch.randn_like(x1)
        xt = self.path.interpolate(noise, x1, t)
        return xt, t, self.path.conditional_time_score(noise, x1, t), self.path.weight(t)

    def _sides(self, x_num, x_den):
        """Stack numerator (side 1) and, when two-sided, denominator (side 0) batches."""
        if x_den is None:
            return x_num, torch.ones_like(x_num[:, 0])
        side = torch.cat([torch.ones_like(x_num[:, 0]), torch.zeros_like(x_den[:, 0])])
        return torch.cat([x_num, x_den]), side

    def score(self, z, times, side):
        """Network value at standardised ``z`` ``(N, d)``, ``times`` ``(N, k)``, ``side`` ``(N,)``."""
        return self.network(z, times, side)

    def _side_difference(self, z, times):
        """``f(side=1) - f(side=0)`` (two-sided) or ``f(side=1)``; ``z`` ``(M, d)``, ``times`` ``(M, k)``."""
        one = torch.ones_like(z[:, 0])
        out = self.score(z, times, one)
        if bool(self.two_sided):
            out = out - self.score(z, times, 0 * one)
        return out


class TangentRatioEstimator(_TimeScoreEstimator):
    """DRE-infinity / CTSM: time score ``s_theta(x, t)``, ``log r`` by Gauss-Legendre or trapezoid quadrature.

    :param int dim: data dimension.
    :param path: interpolation path (name or instance; ``"dre_infinity"``).
    :param network: ``"mlp"`` (:class:`~pyro_sde.ratio.base.TimeScoreNetwork`), ``"quadratic"``
        (:class:`~pyro_sde.ratio.base.QuadraticTimeScore`) or a module ``(x, times (N,1), side) -> (N,)``.
    :param float eps: integrate ``t`` over ``[0, 1 - eps]`` (1e-3).
    :param str quadrature: ``"gauss-legendre"`` (default) or ``"trapezoid"``.
    :param int default_num_steps: NFE when ``log_ratio`` gets none (64).
    :param dict network_options: keyword arguments of the network class.

    NFE counts time nodes; a two-sided estimator evaluates the network twice per node.
    """

    def __init__(self, dim: int, *, path="dre_infinity", network="mlp", eps: float = 1e-3,
                 quadrature: str = "gauss-legendre", default_num_steps: int = 64,
                 network_options: dict | None = None):
        if quadrature not in ("gauss-legendre", "trapezoid"):
            raise ValueError(f"quadrature must be 'gauss-legendre' or 'trapezoid', got {quadrature!r}")
        super().__init__(dim, path=path, network=network, eps=eps, network_options=network_options)
        self.quadrature = quadrature
        self.default_num_steps = default_num_steps
        self._config.update(quadrature=quadrature, default_num_steps=default_num_steps)

    def _loss(self, x_num, x_den, progress):
        x1, side = self._sides(x_num, x_den)
        xt, t, target, weight = self._ctsm_batch(x1)
        s = self.score(xt, t[:, None], side)
        return (weight * (s - target) ** 2).mean() / self.dim

    def time_score(self, x: torch.Tensor, t) -> torch.Tensor:
        """Learned ``d/dt log p_t(x)`` (side 1: from ``N(0, I)`` to ``p_num``) at raw ``x`` ``(N, d)``."""
        z = self.standardize(x)
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device).expand(z.shape[:-1])
        return self.score(z, t[:, None], torch.ones_like(t))

    def _log_ratio(self, z, num_steps, quadrature=None):
        k = self.default_num_steps if num_steps is None else num_steps
        quadrature = quadrature or self.quadrature
        if quadrature == "gauss-legendre":
            nodes, weights = gauss_legendre(k, 0.0, self.t_max, z)
        elif quadrature == "trapezoid":
            if k < 2:
                raise ValueError("the trapezoid rule needs num_steps >= 2")
            nodes = torch.linspace(0, self.t_max, k, dtype=z.dtype, device=z.device)
            weights = torch.full_like(nodes, self.t_max / (k - 1))
            weights[0] = weights[-1] = 0.5 * self.t_max / (k - 1)
        else:
            raise ValueError(f"unknown quadrature {quadrature!r}")
        n = z.shape[0]
        zz = z.expand(k, n, self.dim).reshape(k * n, self.dim)
        tt = nodes[:, None].expand(k, n).reshape(k * n, 1)
        return (weights[:, None] * self._side_difference(zz, tt).reshape(k, n)).sum(0)




def _stratified_times(n: int, t_max: float, like: torch.Tensor) -> torch.Tensor:
    """``n`` stratified uniform times on ``[0, t_max]`` in random order, shape ``(n,)``."""
    u = torch.arange(n, dtype=like.dtype, device=like.device)
    u = u + torch.rand(n, dtype=like.dtype, device=like.device)
    return (u * (t_max / n))[torch.randperm(n, device=like.device)]
