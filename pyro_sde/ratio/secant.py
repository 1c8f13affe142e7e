"""Secant (ISA-DRE) estimator: learn interval-averaged time scores through the Secant Alignment Identity.

Secant ``u(x, l, t) = (1 / (t - l)) int_l^t s(x, tau) dtau`` (``u(x, t, t) = s(x, t)``, the tangent).
Secant Alignment Identity (SAI): ``d/dt [(t - l) u(x, l, t)] = s(x, t)``, i.e.
``s(x, t) = u(x, l, t) + (t - l) d/dt u(x, l, t)`` with ``d/dt`` at fixed ``x``. Training regresses
``u_theta(x_t, l, t)`` on the stop-gradient target ``s_hat(x_t, t) - (t - l) d/dt u_theta(x_t, l, t)``
(``s_hat``: the conditional time score, one forward-mode JVP for ``d/dt u``); its fixed point satisfies
the SAI. Contraction Interval Annealing (CIA) caps ``t - l`` by ``Delta(k)``, growing linearly from
``min_width`` to the whole interval over the first ``anneal_fraction`` of training.
Any-step log ratio: ``log r(x) = sum_i (t_i - t_{i-1}) u(x, t_{i-1}, t_i)``; one step is ``u(x, 0, 1)``.
"""

from __future__ import annotations

import torch

from .paths import time_derivative
from .tangent import _stratified_times, _TimeScoreEstimator

__all__ = ["SecantRatioEstimator", "sai_target"]


def sai_target(secant_fn, x: torch.Tensor, l: torch.Tensor, t: torch.Tensor, tangent: torch.Tensor,
               anchor: str = "right"):
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
    :param float eps: time domain ``[0, 1 - eps]`` (1e-3).
    :param float aligned_fraction: share of the batch with ``l = t`` (pure tangent regression; 0.25).
    :param float grid_fraction: share drawn from the query intervals ``[i/K, (i+1)/K]`` of
        ``grid_steps`` (0.25).
    :param tuple grid_steps: step counts whose intervals are emphasised ((1, 2, 4)).
    :param float anneal_fraction: CIA: the width cap reaches the whole interval after this share of
        training (0.5); ``0`` disables annealing.
    :param float min_width: initial CIA cap (0.05).
    :param str time_grid: ``"uniform"`` or ``"sigmoid"`` (OpenDRE's ``sigmoid(1.5 logit(i/K) + 0.2)``).
    :param int default_num_steps: NFE when ``log_ratio`` gets none (2).
    :param str anchor: ``"right"`` (default, the paper's form): draw ``x`` at ``t``, target
        ``s(x, t) - (t - l) d/dt u``; ``"left"``: draw at ``l``, target ``s(x, l) + (t - l) d/dl u``. Both
        are the SAI; on the Gaussian tests the left anchor was less accurate (``x`` drawn further
        from ``p_1``).
    :param dict network_options: keyword arguments of the network class.
    """

    num_times = 2

    def __init__(self, dim: int, *, path="dre_infinity", network="mlp", eps: float = 1e-3,
                 aligned_fraction: float = 0.25, grid_fraction: float = 0.25, grid_steps=(1, 2, 4),
                 anneal_fraction: float = 0.5, min_width: float = 0.05, time_grid: str = "uniform",
                 default_num_steps: int = 2, anchor: str = "right", network_options: dict | None = None):
        if anchor not in ("left", "right"):
            raise ValueError(f"anchor must be 'left' or 'right', got {anchor!r}")
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
        super().__init__(dim, path=path, network=network, eps=eps, network_options=network_options)
        self.aligned_fraction, self.grid_fraction = float(aligned_fraction), float(grid_fraction)
        self.grid_steps, self.min_width = grid_steps, float(min_width)
        self.anneal_fraction = float(anneal_fraction)
        self.time_grid, self.default_num_steps, self.anchor = time_grid, default_num_steps, anchor
        self._config["anchor"] = anchor
        self._config.update(aligned_fraction=aligned_fraction, grid_fraction=grid_fraction,
                            grid_steps=grid_steps,
                            anneal_fraction=anneal_fraction, min_width=min_width, time_grid=time_grid,
                            default_num_steps=default_num_steps)

    def width_cap(self, progress: float) -> float:
        """CIA cap on ``(t - l) / (1 - eps)`` at training progress in ``[0, 1]``."""
        if self.anneal_fraction == 0:
            return 1.0
        return min(1.0, self.min_width + (1 - self.min_width) * progress / self.anneal_fraction)

    def _intervals(self, t: torch.Tensor, progress: float):
        """``l <= t``: random widths under the CIA cap, aligned (``l = t``) and query-grid intervals."""
        n, T = t.shape[0], self.t_max
        cap = self.width_cap(progress)
        kind = torch.rand_like(t)
        l = (t - cap * T * torch.rand_like(t)).clamp_min(0)
        l = torch.where(kind < self.aligned_fraction, t, l)
        steps = torch.tensor(self.grid_steps, dtype=t.dtype, device=t.device)
        steps = steps[torch.randint(len(self.grid_steps), (n,), device=t.device)]
        i = torch.floor(torch.rand_like(t) * steps)
        on_grid = (kind >= 1 - self.grid_fraction) & (1 / steps <= cap + 1e-9)
        lg, tg = self.grid(steps, i, T)
        return torch.where(on_grid, lg, l), torch.where(on_grid, tg, t)

    def grid(self, steps, i, T):
        """Interval ``i`` of a ``steps``-step query grid on ``[0, T]`` (tensors)."""
        a, b = i / steps, (i + 1) / steps
        if self.time_grid == "sigmoid":
            a, b = _sigmoid_grid(a), _sigmoid_grid(b)
        return a * T, b * T

    def _loss(self, x_num, x_den, progress):
        x1, side = self._sides(x_num, x_den)
        n = x1.shape[0]
        t = _stratified_times(n, self.t_max, x1)
        l, t = self._intervals(t, progress)
        noise = torch.randn_like(x1)
        at = l if self.anchor == "left" else t  # the time where x is drawn and the tangent is regressed
        xa = self.path.interpolate(noise, x1, at)
        tangent = self.path.conditional_time_score(noise, x1, at)
        def secant(x, a, b):
            return self.score(x, torch.stack([a, b], -1), side)

        target, u = sai_target(secant, xa, l, t, tangent, self.anchor)
        return (self.path.weight(at) * (u - target) ** 2).mean() / self.dim

    def secant(self, x: torch.Tensor, l, t) -> torch.Tensor:
        """Learned ``u(x, l, t)`` (side 1: path from ``N(0, I)`` to ``p_num``) at raw ``x`` ``(N, d)``."""
        z = self.standardize(x)
        l = torch.as_tensor(l, dtype=z.dtype, device=z.device).expand(z.shape[:-1])
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device).expand(z.shape[:-1])
        return self.score(z, torch.stack([l, t], -1), torch.ones_like(t))

    def _log_ratio(self, z, num_steps):
        k = self.default_num_steps if num_steps is None else num_steps
        i = torch.arange(k, dtype=z.dtype, device=z.device)
        lo, hi = self.grid(torch.full_like(i, k), i, self.t_max)
        n = z.shape[0]
        zz = z.expand(k, n, self.dim).reshape(k * n, self.dim)
        times = torch.stack([lo, hi], -1)[:, None].expand(k, n, 2).reshape(k * n, 2)
        return ((hi - lo)[:, None] * self._side_difference(zz, times).reshape(k, n)).sum(0)


def _sigmoid_grid(s):
    return torch.sigmoid(1.5 * torch.logit(s) + 0.2).where((s > 0) & (s < 1), s)
