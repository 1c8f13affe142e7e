"""The geometric annealing path from a Gaussian reference to the target, and its adaptive temperatures.

``log pi_beta(x) = (1 - beta) log q(x) + beta log rho(x)`` for ``beta`` in ``[0, 1]``, with ``rho`` the
unnormalised target and ``q = N(0, I)`` the reference. In the whitened coordinates ``w = L^{-1} (z - m)``
of a :class:`~pyro_sde.infer.Preconditioner` (see :class:`~pyro_sde.infer.WhitenedPotential`) ``q`` is the
preconditioning Gaussian ``N(m, L L^T)``; without one it is ``N(0, I)`` in unconstrained space.

The next temperature is chosen by bisection on the conditional ESS of Zhou, Johansen & Aston (2016):
with normalised weights ``W_i`` and ``u_i = (rho / q)(x_i)^delta`` the incremental weights of
``beta -> beta + delta``, ``CESS(delta) = (sum_i W_i u_i)^2 / sum_i W_i u_i^2`` in ``(0, 1]``; the step is
the largest ``delta`` with ``CESS(delta) >= target``. The CESS sees the bulk of the weights, not their
tail: optionally the step is shortened until the PSIS Pareto k of the new weights ``W_i u_i`` is at most
``max_pareto_k`` too (heavy-tailed weights: one step from a Gaussian reference to a target with heavier
tails has a k near 1 at a CESS above 0.9).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

from .. import diagnostics
from .potential import Potential

__all__ = ["GeometricPath", "PathPoint", "conditional_ess", "next_temperature", "weights_pareto_k"]

_LOG_2PI = math.log(2 * math.pi)


class PathPoint(NamedTuple):
    """The path's ingredients at a batch of points ``x`` (N, dim): one target evaluation per row."""

    log_target: torch.Tensor  #: ``log rho(x)`` (N,); NaN mapped to ``-inf``
    log_reference: torch.Tensor  #: ``log q(x)`` (N,)
    target_score: torch.Tensor  #: ``grad log rho(x)`` (N, dim); 0 where ``log rho`` is not finite

    @property
    def log_likelihood_ratio(self) -> torch.Tensor:
        """``log (rho / q)(x)`` in float64 (N,): the log incremental weight per unit of temperature."""
        return self.log_target.double() - self.log_reference.double()


class GeometricPath:
    """``log pi_beta = (1 - beta) log q + beta log rho`` with ``q = N(0, I)`` on ``R^dim``.

    :param Potential target: ``rho``, batched ``(N, dim) -> (N,)`` with a score (autograd or closed form).
    """

    def __init__(self, target: Potential):
        if not isinstance(target, Potential):
            raise TypeError(f"target must be a Potential, got {type(target).__name__}")
        self.target = target
        self.dim, self.dtype, self.device = target.dim, target.dtype, target.device
        self.num_nan = 0  #: points at which ``log rho`` was NaN (taken as ``-inf``)

    def sample_reference(self, num_samples: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``num_samples`` draws of ``q = N(0, I)``, shape ``(num_samples, dim)``."""
        return torch.randn(num_samples, self.dim, dtype=self.dtype, device=self.device, generator=generator)

    def reference_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log N(x; 0, I)``, ``(N, dim) -> (N,)``."""
        return -0.5 * (x * x).sum(-1) - 0.5 * self.dim * _LOG_2PI

    def evaluate(self, x: torch.Tensor) -> PathPoint:
        """``log rho``, ``log q`` and ``grad log rho`` at ``x`` (N, dim), detached."""
        log_target, score = self.target.log_density_and_score(x)
        log_target, score = log_target.detach(), score.detach()
        nan = torch.isnan(log_target)
        if nan.any():
            self.num_nan += int(nan.sum())
            log_target = torch.where(nan, torch.full_like(log_target, -math.inf), log_target)
        finite = torch.isfinite(log_target)[:, None] & torch.isfinite(score)
        score = torch.where(finite, score, torch.zeros_like(score))
        return PathPoint(log_target, self.reference_log_prob(x.detach()), score)

    @staticmethod
    def log_density(beta: float, point: PathPoint) -> torch.Tensor:
        """``log pi_beta`` (N,) (unnormalised) from the ingredients at the points; ``beta > 0`` or finite
        ``log rho``."""
        if beta == 0:
            return point.log_reference
        return (1 - beta) * point.log_reference + beta * point.log_target

    @staticmethod
    def score(beta: float, x: torch.Tensor, point: PathPoint) -> torch.Tensor:
        """``grad log pi_beta = -(1 - beta) x + beta grad log rho`` (N, dim)."""
        return -(1 - beta) * x + beta * point.target_score

    def log_density_and_score_fn(
        self, beta: float
    ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, PathPoint]]:
        """``fn(x) -> (log pi_beta, grad log pi_beta, PathPoint)``: what a move kernel targets."""

        def fn(x):
            point = self.evaluate(x)
            return self.log_density(beta, point), self.score(beta, x, point), point

        return fn


def _incremental(log_likelihood_ratio: torch.Tensor, delta: float) -> torch.Tensor:
    """``delta * log (rho / q)`` with ``0 * (-inf) = 0`` (float64, (N,))."""
    if delta == 0:
        return torch.zeros_like(log_likelihood_ratio)
    return delta * log_likelihood_ratio


def conditional_ess(log_weights: torch.Tensor, log_likelihood_ratio: torch.Tensor, delta: float) -> float:
    """Normalised conditional ESS ``(sum W u)^2 / sum W u^2`` of the step ``delta``, ``u = exp(delta l)``.

    :param log_weights: current log weights (N,), normalised or not.
    :param log_likelihood_ratio: ``l = log (rho / q)`` at the particles (N,).
    """
    log_w = log_weights.double() - log_weights.double().logsumexp(0)
    log_u = _incremental(log_likelihood_ratio.double(), delta)
    value = 2 * (log_w + log_u).logsumexp(0) - (log_w + 2 * log_u).logsumexp(0)
    return float(value.exp()) if torch.isfinite(value) else 0.0


def weights_pareto_k(log_weights: torch.Tensor, log_likelihood_ratio: torch.Tensor, delta: float) -> float:
    """PSIS Pareto k of the reweighted particles ``log W + delta l`` (their non-zero weights); ``nan`` when
    no tail can be fitted (20 or fewer non-zero weights, or ties in the tail)."""
    log_w = log_weights.double() + _incremental(log_likelihood_ratio.double(), delta)
    log_w = log_w[log_w > -math.inf]
    if log_w.numel() <= 20:
        return math.nan
    k = diagnostics._pareto_k(log_w)
    return k if k < math.inf else math.nan


def next_temperature(
    beta: float,
    log_weights: torch.Tensor,
    log_likelihood_ratio: torch.Tensor,
    target_conditional_ess: float,
    *,
    max_pareto_k: float | None = None,
    min_step_fraction: float = 1 / 16,
    num_bisection_steps: int = 50,
) -> float:
    """The next temperature ``beta' = beta + delta <= 1``: the largest ``delta`` in ``(0, 1 - beta]``
    (to a relative ``2^-num_bisection_steps``) with ``CESS(delta) >= target_conditional_ess``; 1 if the
    whole remaining step keeps it; always ``> beta``.

    With ``max_pareto_k``, a step whose new weights have a Pareto k above it
    (:func:`weights_pareto_k`) is shortened, by bisection, to the largest with k at most
    ``max_pareto_k``, but not below ``min_step_fraction`` of the CESS step (a target whose
    ``log (rho / q)`` is itself heavy-tailed cannot reach the bound; the final weights then say so)."""
    if not 0 <= beta < 1:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    if not 0 < target_conditional_ess < 1:
        raise ValueError(f"target_conditional_ess must be in (0, 1), got {target_conditional_ess!r}")
    remaining = 1.0 - beta
    if conditional_ess(log_weights, log_likelihood_ratio, remaining) >= target_conditional_ess:
        delta = remaining
    else:
        lo, hi = 0.0, remaining  # CESS(lo) >= target > CESS(hi)
        for _ in range(num_bisection_steps):
            mid = 0.5 * (lo + hi)
            if conditional_ess(log_weights, log_likelihood_ratio, mid) >= target_conditional_ess:
                lo = mid
            else:
                hi = mid
        # lo = 0 only when any step loses the target (zero-weight particles): the smallest tried step then
        delta = lo if lo > 0 else hi
    if max_pareto_k is not None and weights_pareto_k(log_weights, log_likelihood_ratio, delta) > max_pareto_k:
        lo, hi = min_step_fraction * delta, delta  # k(hi) > max_pareto_k; lo is the floor
        for _ in range(num_bisection_steps // 2):
            mid = 0.5 * (lo + hi)
            k = weights_pareto_k(log_weights, log_likelihood_ratio, mid)
            if k <= max_pareto_k or math.isnan(k):
                lo = mid
            else:
                hi = mid
        delta = lo
    if delta >= remaining:
        return 1.0
    return min(beta + delta, 1.0) if beta + delta > beta else math.nextafter(beta, 2.0)


def check_initial_point(point: PathPoint, num_nan: int) -> None:
    """Refuse initial particles where ``log rho`` is ``+inf`` anywhere or finite nowhere; warn of NaN ones."""
    if (point.log_target == math.inf).any():
        raise ValueError("the log density is +inf at a particle drawn from the reference: it must be finite")
    finite = int(torch.isfinite(point.log_target).sum())
    n = point.log_target.numel()
    if finite == 0:
        raise ValueError(
            f"the log density is not finite (NaN or -inf) at any of the {n} particles drawn from the "
            "reference Gaussian: check the log density (or the model) near its initial point"
        )
    if num_nan:
        warnings.warn(
            f"the log density is NaN at {num_nan} of {n} initial particles: they are given zero weight",
            RuntimeWarning,
            stacklevel=3,
        )
