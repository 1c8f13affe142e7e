"""Batched MCMC move kernels (MALA, HMC) on ``R^dim`` for population methods such as SMC.

A kernel moves every row of a batch ``x`` (N, dim) by one Metropolis-Hastings step that leaves a target
``pi`` invariant, optionally in the coordinates ``u = S^{-1} x`` of a proposal scale ``S`` (a vector of
scales (dim,) or a lower-triangular (dim, dim) matrix, e.g. :func:`population_scale` of an SMC
population: the proposal covariance is then ``eps^2 S S^T``). The target is a function
``fn(x) -> (log pi(x) (N,), grad log pi(x) (N, dim), extras)`` whose ``extras`` (a NamedTuple or tuple
of tensors with leading dimension N, e.g. the ingredients of an annealing path) travel with the
accepted points, so nothing is evaluated twice. All arithmetic is over the whole batch; the step size
is one number for the batch, adapted from its mean acceptance rate by :func:`adapt_step_size`.

* MALA: ``y = x + (eps^2 / 2) S S^T grad log pi(x) + eps S xi``, accepted with probability
  ``min(1, pi(y) q(x | y) / (pi(x) q(y | x)))`` (one target evaluation per step; optimal acceptance
  about 0.574, Roberts & Rosenthal 1998).
* HMC: ``L`` leapfrog steps of size ``eps`` with the mass matrix ``(S S^T)^{-1}``, accepted with probability
  ``min(1, exp(-H(y, p') + H(x, p)))`` (``L`` target evaluations per step; target acceptance 0.65).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from .._checks import positive_int, unit_interval

__all__ = [
    "HMC", "MALA", "KernelState", "MoveKernel", "adapt_step_size", "get_kernel", "init_state",
    "population_scale",
]


class KernelState(NamedTuple):
    """A batch of points with their target values."""

    position: torch.Tensor  #: ``x`` (N, dim)
    log_density: torch.Tensor  #: ``log pi(x)`` (N,)
    score: torch.Tensor  #: ``grad log pi(x)`` (N, dim)
    extras: tuple  #: tensors (N, ...) computed with ``log pi`` (the path's ingredients)


def _scale_rows(scale, v):
    """``S v`` for each row ``v`` of (N, dim); ``S = None`` is the identity."""
    if scale is None:
        return v
    return v * scale if scale.dim() == 1 else v @ scale.T


def _unscale_rows(scale, v):
    """``S^{-1} v`` for each row of (N, dim)."""
    if scale is None:
        return v
    if scale.dim() == 1:
        return v / scale
    return torch.linalg.solve_triangular(scale, v.T, upper=False).T


def _scale_score(scale, g):
    """``S^T g``: the score in the coordinates ``u = S^{-1} x``."""
    if scale is None:
        return g
    return g * scale if scale.dim() == 1 else g @ scale


def population_scale(
    x: torch.Tensor, log_weights: torch.Tensor, kind: str = "diagonal"
) -> torch.Tensor | None:
    """A proposal scale from a weighted population ``x`` (N, dim): the weighted standard deviations (dim,)
    (``"diagonal"``), the Cholesky factor of the weighted covariance (dim, dim) (``"dense"``; the
    diagonal where it is singular), or ``None`` (``"identity"``). Scales are floored at 1e-6 of the
    largest (a collapsed direction must not stop the moves)."""
    if kind == "identity":
        return None
    weights = (log_weights.double() - log_weights.double().logsumexp(0)).exp().to(x)
    mean = weights @ x
    centred = x - mean
    variances = weights @ centred**2
    floor = 1e-12 * float(variances.max()) + torch.finfo(x.dtype).tiny
    if kind == "diagonal" or x.shape[1] == 1:
        return variances.clamp(min=floor).sqrt()
    cov = (centred * weights[:, None]).T @ centred
    cov = cov + floor * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    L, info = torch.linalg.cholesky_ex(cov)
    if int(info) != 0 or not torch.isfinite(L).all():
        return variances.clamp(min=floor).sqrt()
    return L


def init_state(fn: Callable, x: torch.Tensor) -> KernelState:
    """The kernel state of ``x`` (N, dim) under ``fn``."""
    log_density, score, extras = fn(x)
    return KernelState(x, log_density, score, extras)


def _select(accept: torch.Tensor, new, old):
    """Row-wise ``new if accept else old`` for a tensor or a (Named)tuple of tensors (N, ...)."""
    if isinstance(new, torch.Tensor):
        mask = accept.reshape(accept.shape + (1,) * (new.dim() - 1))
        return torch.where(mask, new, old)
    values = [_select(accept, a, b) for a, b in zip(new, old)]
    return type(new)(*values) if hasattr(new, "_fields") else type(new)(values)


def _accept(log_alpha: torch.Tensor, proposal: KernelState, state: KernelState, generator):
    """Metropolis-Hastings: keep ``proposal`` where ``log U < log_alpha``; non-finite ``log_alpha`` rejects.

    Returns the new state and the acceptance probabilities ``min(1, alpha)`` (N,) in float64."""
    log_alpha = log_alpha.double()
    log_alpha = torch.where(torch.isnan(log_alpha), torch.full_like(log_alpha, -math.inf), log_alpha)
    log_alpha = log_alpha.clamp(max=0.0)
    u = torch.rand(log_alpha.shape, dtype=torch.float64, device=log_alpha.device, generator=generator)
    log_u = u.log()
    accept = log_u < log_alpha
    new = KernelState(
        _select(accept, proposal.position, state.position),
        _select(accept, proposal.log_density, state.log_density),
        _select(accept, proposal.score, state.score),
        _select(accept, proposal.extras, state.extras),
    )
    return new, log_alpha.exp()


class MoveKernel:
    """Interface of a batched move: ``step(fn, state, step_size) -> (state, acceptance_probs (N,))``.

    Attributes: ``name``, ``target_acceptance`` (what :func:`adapt_step_size` steers to) and
    ``evaluations_per_step`` (target evaluations per point and step)."""

    name: str
    target_acceptance: float
    evaluations_per_step: int

    def initial_step_size(self, dim: int) -> float:
        """A step size for ``pi = N(0, I_dim)`` (the start of an annealing path in whitened coordinates)."""
        raise NotImplementedError

    def step(
        self,
        fn: Callable,
        state: KernelState,
        step_size: float,
        *,
        scale: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[KernelState, torch.Tensor]:
        """One move of every row; ``scale``: ``S`` (dim,) or (dim, dim), or ``None`` (identity)."""
        raise NotImplementedError


def _check_acceptance(value) -> float:
    return unit_interval(value, "target_acceptance", closed_right=False)


class MALA(MoveKernel):
    """Metropolis-adjusted Langevin: ``y = x + (eps^2 / 2) grad log pi(x) + eps xi``, ``xi ~ N(0, I)``.

    :param float target_acceptance: acceptance rate the step size is adapted to (0.574).
    """

    name = "mala"
    evaluations_per_step = 1

    def __init__(self, target_acceptance: float = 0.574):
        self.target_acceptance = _check_acceptance(target_acceptance)

    def initial_step_size(self, dim: int) -> float:
        return 1.65 * dim ** (-1 / 6)  # eps^2 = 1.65^2 dim^(-1/3): acceptance 0.574 on N(0, I) (large dim)

    def step(
        self,
        fn: Callable,
        state: KernelState,
        step_size: float,
        *,
        scale: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[KernelState, torch.Tensor]:
        x, eps = state.position, step_size
        noise = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
        # in u = S^{-1} x: u' = u + (eps^2 / 2) S^T g(x) + eps xi
        drift_x = 0.5 * eps**2 * _scale_score(scale, state.score)
        y = x + _scale_rows(scale, drift_x + eps * noise)
        proposal = init_state(fn, y)
        drift_y = 0.5 * eps**2 * _scale_score(scale, proposal.score)
        # log q(x | y) - log q(y | x) with q(u' | u) = N(u + drift(u), eps^2 I) (the Jacobians cancel)
        back = _unscale_rows(scale, x - y) - drift_y
        log_q_ratio = (-(back**2).sum(-1) / eps**2 + (noise**2).sum(-1)) * 0.5
        log_alpha = proposal.log_density.double() - state.log_density.double() + log_q_ratio.double()
        return _accept(log_alpha, proposal, state, generator)

    def __repr__(self):
        return f"MALA(target_acceptance={self.target_acceptance})"


class HMC(MoveKernel):
    """Hamiltonian Monte Carlo with ``num_leapfrog_steps`` leapfrog steps and an identity mass matrix.

    :param int num_leapfrog_steps: ``L`` (5).
    :param float target_acceptance: acceptance rate the step size is adapted to (0.65).
    """

    name = "hmc"

    def __init__(self, num_leapfrog_steps: int = 5, target_acceptance: float = 0.65):
        self.num_leapfrog_steps = positive_int(num_leapfrog_steps, "num_leapfrog_steps")
        self.evaluations_per_step = num_leapfrog_steps
        self.target_acceptance = _check_acceptance(target_acceptance)

    def initial_step_size(self, dim: int) -> float:
        return dim ** (-1 / 4)

    def step(
        self,
        fn: Callable,
        state: KernelState,
        step_size: float,
        *,
        scale: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[KernelState, torch.Tensor]:
        x, eps = state.position, step_size
        # leapfrog in u = S^{-1} x with momentum p ~ N(0, I): x += eps S p, p += eps S^T g(x)
        momentum0 = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
        momentum = momentum0 + 0.5 * eps * _scale_score(scale, state.score)
        proposal = state
        for i in range(self.num_leapfrog_steps):
            position = proposal.position + eps * _scale_rows(scale, momentum)
            proposal = init_state(fn, position)
            # a point off the density's support: no gradient, the path is rejected at the end
            ok = torch.isfinite(proposal.log_density)[:, None]
            score = torch.where(ok, _scale_score(scale, proposal.score), torch.zeros_like(proposal.score))
            momentum = momentum + (eps if i < self.num_leapfrog_steps - 1 else 0.5 * eps) * score
        kinetic0 = 0.5 * (momentum0.double() ** 2).sum(-1)
        kinetic = 0.5 * (momentum.double() ** 2).sum(-1)
        log_alpha = proposal.log_density.double() - kinetic - state.log_density.double() + kinetic0
        return _accept(log_alpha, proposal, state, generator)

    def __repr__(self):
        return (
            f"HMC(num_leapfrog_steps={self.num_leapfrog_steps}, "
            f"target_acceptance={self.target_acceptance})"
        )


_KERNELS = {"mala": MALA, "hmc": HMC}


def get_kernel(
    kernel: str | MoveKernel,
    *,
    num_leapfrog_steps: int | None = None,
    target_acceptance: float | None = None,
) -> MoveKernel:
    """A :class:`MoveKernel` from a name (``"mala"``, ``"hmc"``) and its options (``None``: the kernel's
    default), or the kernel itself; ``num_leapfrog_steps`` goes with ``"hmc"`` only."""
    options = {}
    if num_leapfrog_steps is not None:
        if kernel != "hmc":
            raise ValueError("num_leapfrog_steps goes with kernel='hmc'")
        options["num_leapfrog_steps"] = num_leapfrog_steps
    if target_acceptance is not None:
        options["target_acceptance"] = target_acceptance
    if isinstance(kernel, MoveKernel):
        if options:
            raise ValueError(f"options {sorted(options)} go with a kernel name, not a kernel object")
        return kernel
    if not isinstance(kernel, str) or kernel not in _KERNELS:
        raise ValueError(f"kernel must be one of {tuple(_KERNELS)} or a MoveKernel, got {kernel!r}")
    return _KERNELS[kernel](**options)


def adapt_step_size(
    step_size: float,
    acceptance_rate: float,
    target_acceptance: float,
    *,
    rate: float = 2.0,
    bounds: tuple[float, float] = (1e-6, 1e3),
) -> float:
    """``eps * exp(rate * (acceptance_rate - target_acceptance))``, clamped to ``bounds``."""
    if not math.isfinite(acceptance_rate):
        acceptance_rate = 0.0
    new = step_size * math.exp(rate * (acceptance_rate - target_acceptance))
    return min(max(new, bounds[0]), bounds[1])
