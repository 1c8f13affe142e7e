"""Secant (ISA-DRE) estimator: learn interval-averaged time scores through the Secant Alignment Identity.

Secant ``u(x, l, t) = (1 / (t - l)) int_l^t s(x, tau) dtau`` (``u(x, t, t) = s(x, t)``, the tangent).
Secant Alignment Identity (SAI): ``d/dt [(t - l) u(x, l, t)] = s(x, t)``, i.e.
``s(x, t) = u(x, l, t) + (t - l) d/dt u(x, l, t)`` with ``d/dt`` at fixed ``x``.

So ``F(x, l, t) = (t - l) u_theta(x, l, t)`` vanishes at ``t = l`` by construction and its ``t``-derivative
``u + (t - l) du/dt`` is a tangent model for every start ``l``: training that tangent to the true time
score on ``[l, b]`` makes ``F(x, l, t) = int_l^t s`` for all ``t`` in ``[l, b]``, i.e. ``u`` the secant.
The tangent is trained with the target-free objectives of :mod:`pyro_sde.ratio.tangent`:

* ``"stein"`` (per-axis networks, default for ``"quadratic"``): per-axis conditional time-score
  matching with the target integrated out by Stein's lemma, applied to ``d/dt F``;
* ``"tsm"``: time-score matching by parts on ``[l, b]`` (needs ``d^2/dt^2 F``: second-order jets);
* ``"ctsm"``: the paper's self-consistency regression of ``u_theta(x_t, l, t)`` on the stop-gradient
  target ``s_hat(x_t, t) - (t - l) d/dt u_theta`` with the conditional time score ``s_hat``
  (:func:`sai_target`); noisy near ``t = 1`` like the tangent's ``"ctsm"`` (kept for comparison).

Contraction Interval Annealing (CIA) caps the interval width ``b - l`` by ``Delta(k)``, growing linearly
from ``min_width`` to the whole time range over the first ``anneal_fraction`` of training.
Any-step log ratio: ``log r(x) = sum_i (t_i - t_{i-1}) u(x, t_{i-1}, t_i)``; one step is ``u(x, 0, 1)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from ..nn.ratio_networks import time_jets
from .paths import time_derivative
from .tangent import _TimeScoreEstimator

if TYPE_CHECKING:
    from torch import nn

    from .paths import InterpolationPath

__all__ = ["SecantRatioEstimator", "sai_target"]


def sai_target(secant_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
               l: torch.Tensor, t: torch.Tensor, tangent: torch.Tensor,
               anchor: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """SAI regression target and ``u(x, l, t)``; ``secant_fn(x, l, t) -> (N,)``.

    ``anchor="right"``: ``tangent = s(x, t)`` and target ``s(x, t) - (t - l) d/dt u`` (the paper's form);
    ``anchor="left"``: ``tangent = s(x, l)`` and target ``s(x, l) + (t - l) d/dl u`` (from
    ``d/dl [(t - l) u] = -s(x, l)``). The returned ``u`` keeps its graph, the target is detached. With the
    exact secant and tangent, ``target == u`` (the identity; tested).
    """
    if anchor == "right":
        u, du = time_derivative(lambda s: secant_fn(x, l, s), t)
        return (tangent - (t - l) * du).detach(), u
    if anchor == "left":
        u, du = time_derivative(lambda s: secant_fn(x, s, t), l)
        return (tangent + (t - l) * du).detach(), u
    raise ValueError(f"anchor must be 'left' or 'right', got {anchor!r}")


class SecantRatioEstimator(_TimeScoreEstimator):
    """ISA-DRE: learned secant ``u_theta(x, l, t)``; ``log r`` from ``num_steps`` secant evaluations.

    :param int dim: data dimension.
    :param path: interpolation path (name or instance; ``"dre_infinity"``).
    :param network: ``"mlp"``, ``"quadratic"`` or a module ``(x, times (N, 2) = [l, t], side) -> (N,)``.
    :param str objective: ``"stein"`` (default for per-axis networks such as ``"quadratic"``), ``"tsm"``
        (default otherwise) or ``"ctsm"`` (the paper's SAI regression); see the module docstring.
    :param float eps: time domain ``[0, 1 - eps]`` (default 0; 1e-3 for ``"ctsm"``).
    :param float aligned_fraction: share of time groups with ``l = t`` (the tangent itself; 0.1; not
        used by ``"tsm"``, where a zero-width interval carries no loss).
    :param float grid_fraction: share of groups on the query intervals ``[i/K, (i+1)/K]`` of
        ``grid_steps`` (0.5).
    :param tuple grid_steps: step counts whose intervals are emphasised ((1, 2, 4)).
    :param float anneal_fraction: CIA: the width cap reaches the whole range after this share of
        training (0: no annealing, the default for the target-free objectives, 0.5 for ``"ctsm"``).
    :param float min_width: initial CIA cap (0.05).
    :param str time_grid: ``"uniform"`` or ``"sigmoid"`` (OpenDRE's ``sigmoid(1.5 logit(i/K) + 0.2)``).
    :param int default_num_steps: NFE when ``log_ratio`` gets none (2).
    :param int time_groups: distinct ``(l, t)`` pairs per batch and side (64).
    :param dict network_options: keyword arguments of the network class.
    """

    num_times = 2

    def __init__(self, dim: int, *, path: str | InterpolationPath = "dre_infinity",
                 network: str | nn.Module = "mlp", objective: str | None = None,
                 eps: float | None = None, aligned_fraction: float = 0.1, grid_fraction: float = 0.5,
                 grid_steps: Sequence[int] = (1, 2, 4), anneal_fraction: float | None = None,
                 min_width: float = 0.05, time_grid: str = "uniform", default_num_steps: int = 2,
                 time_groups: int = 64, network_options: dict | None = None):
        if anneal_fraction is None:
            anneal_fraction = 0.5 if objective == "ctsm" else 0.0
        for name, v in (("aligned_fraction", aligned_fraction), ("grid_fraction", grid_fraction),
                        ("anneal_fraction", anneal_fraction), ("min_width", min_width)):
            if not 0 <= v <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        if aligned_fraction + grid_fraction > 1:
            raise ValueError("aligned_fraction + grid_fraction must be <= 1")
        if time_grid not in ("uniform", "sigmoid"):
            raise ValueError(f"time_grid must be 'uniform' or 'sigmoid', got {time_grid!r}")
        grid_steps = tuple(int(k) for k in grid_steps)
        if not grid_steps or min(grid_steps) < 1:
            raise ValueError("grid_steps must be positive ints")
        super().__init__(dim, path=path, network=network, eps=eps, objective=objective,
                         time_groups=time_groups, network_options=network_options)
        self.aligned_fraction, self.grid_fraction = float(aligned_fraction), float(grid_fraction)
        self.grid_steps, self.min_width = grid_steps, float(min_width)
        self.anneal_fraction = float(anneal_fraction)
        self.time_grid, self.default_num_steps = time_grid, default_num_steps
        self._config.update(aligned_fraction=aligned_fraction, grid_fraction=grid_fraction,
                            grid_steps=grid_steps, anneal_fraction=anneal_fraction, min_width=min_width,
                            time_grid=time_grid, default_num_steps=default_num_steps)

    def width_cap(self, progress: float) -> float:
        """CIA cap on ``(b - l) / (1 - eps)`` at training progress in ``[0, 1]``."""
        if self.anneal_fraction == 0:
            return 1.0
        return min(1.0, self.min_width + (1 - self.min_width) * progress / self.anneal_fraction)

    def _intervals(self, g: int, progress: float, like: torch.Tensor):
        """``(l, b)`` per time group, each ``(G, 1)``: random starts with ``b = min(T, l + cap T)``,
        query-grid intervals (when not wider than the cap) and aligned ``l = b``."""
        T, cap = self.t_max, self.width_cap(progress)
        u = (torch.arange(g, dtype=like.dtype, device=like.device)
             + torch.rand(g, dtype=like.dtype, device=like.device))[torch.randperm(g, device=like.device)] / g
        l = u * T
        b = (l + cap * T).clamp_max(T)
        kind = torch.rand_like(l)
        aligned = kind < self.aligned_fraction
        b = torch.where(aligned, l, b)
        steps = torch.tensor(self.grid_steps, dtype=like.dtype, device=like.device)
        steps = steps[torch.randint(len(self.grid_steps), (g,), device=like.device)]
        i = torch.floor(torch.rand_like(l) * steps)
        lg, bg = self.grid(steps, i, T)
        on_grid = (kind >= 1 - self.grid_fraction) & (bg - lg <= cap * T + 1e-9)
        return torch.where(on_grid, lg, l)[:, None], torch.where(on_grid, bg, b)[:, None]

    def grid(self, steps: torch.Tensor, i: torch.Tensor, T: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Interval ``i`` of a ``steps``-step query grid on ``[0, T]`` (tensors)."""
        a, b = i / steps, (i + 1) / steps
        if self.time_grid == "sigmoid":
            a, b = _sigmoid_grid(a), _sigmoid_grid(b)
        return a * T, b * T

    # the tangent of F = (t - l) u ------------------------------------------------------------------
    def _tangent_jets(self, x, l, t, side, order):
        """``d/dt F`` (and ``d^2/dt^2 F``) with ``F = (t - l) u_theta(x, l, t)``."""
        times = torch.stack(torch.broadcast_tensors(l, t), -1)
        jets = time_jets(self.network, x, times, side, order + 1)
        w = t - l
        if order == 0:
            return (jets[0] + w * jets[1],)
        return jets[0] + w * jets[1], 2 * jets[1] + w * jets[2]

    def _tangent_coefficients(self, l, t, side):
        times = torch.stack(torch.broadcast_tensors(l, t), -1)
        c, dc = self.network.coefficient_jets(times, side, 1)
        return c + (t - l)[..., None] * dc

    def _loss(self, x_num, x_den, progress):
        x1, side = self._groups(x_num, x_den)
        l, b = self._intervals(x1.shape[0], progress, x1)
        if self.objective == "tsm":
            return self._tsm(x1, side, l, b)
        t = l + (b - l) * torch.rand_like(l)
        if self.objective == "stein":
            return self._stein(x1, side, l, t)
        noise = torch.randn_like(x1)  # "ctsm": the SAI self-consistency regression
        xt = self.path.interpolate(noise, x1, t)
        tangent = self.path.conditional_time_score(noise, x1, t)

        def secant(x, a, c):
            return self.score(x, torch.stack(torch.broadcast_tensors(a, c), -1), side)

        target, u = sai_target(secant, xt, l, t, tangent)
        return (self.path.weight(t) * (u - target) ** 2).mean() / self.dim

    def secant(self, x: torch.Tensor, l: float | torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """Learned ``u(x, l, t)`` (side 1: path from ``N(0, I)`` to ``p_num``) at raw ``x`` ``(N, d)``."""
        z = self.standardize(x)
        l = torch.as_tensor(l, dtype=z.dtype, device=z.device).expand(z.shape[:-1])
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device).expand(z.shape[:-1])
        return self.score(z, torch.stack([l, t], -1), torch.ones_like(t))

    def _log_ratio(self, z, num_steps):
        k = self.default_num_steps if num_steps is None else num_steps
        i = torch.arange(k, dtype=z.dtype, device=z.device)
        lo, hi = self.grid(torch.full_like(i, k), i, self.t_max)
        times = torch.stack([lo, hi], -1)[:, None]  # (K, 1, 2)
        return ((hi - lo)[:, None] * self._side_difference(z.expand(k, *z.shape), times)).sum(0)


def _sigmoid_grid(s):
    return torch.sigmoid(1.5 * torch.logit(s) + 0.2).where((s > 0) & (s < 1), s)
