"""Networks of the density-ratio estimators (:mod:`pyro_sde.ratio`).

* :class:`MLP` -- logits ``(N, d) -> (N,)`` (classifier, TRE heads, FDRL).
* :class:`TimeScoreNetwork`, :class:`QuadraticTimeScore` -- time scores ``s(x, times, side)`` with
  forward-mode time jets (:func:`time_jets`) for the tangent and secant estimators.
* :class:`SBIRatioNetwork` -- ``f(theta, x) = g([theta, embed(x)])`` on joint vectors ``[theta, x]``, with an
  optional embedding network for ``x`` (simulation-based inference).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .._checks import positive_int
from .control import FourierTimeEmbedding

__all__ = [
    "MLP",
    "QuadraticTimeScore",
    "SBIRatioNetwork",
    "TimeScoreNetwork",
    "gelu_derivatives",
    "make_time_score_network",
    "sequential_jets",
    "time_jets",
]



class MLP(nn.Module):
    """``x -> R^out``: ``num_layers`` hidden GELU layers of width ``hidden_dim``; ``(N, d) -> (N, out)``
    (``(N,)`` when ``out_dim == 1`` and ``squeeze``)."""

    def __init__(self, dim: int, out_dim: int = 1, *, hidden_dim: int = 256, num_layers: int = 3,
                 squeeze: bool = True):
        super().__init__()
        sizes = [dim] + [hidden_dim] * num_layers
        layers = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(n_in, n_out), nn.GELU()]
        layers.append(nn.Linear(sizes[-1], out_dim))
        self.net = nn.Sequential(*layers)
        self.squeeze = squeeze and out_dim == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out.squeeze(-1) if self.squeeze else out


_SQRT2, _INV_SQRT_2PI = math.sqrt(2.0), 1.0 / math.sqrt(2.0 * math.pi)


def gelu_derivatives(h: torch.Tensor, order: int = 1) -> tuple[torch.Tensor, ...]:
    """``(gelu(h), gelu'(h)[, gelu''(h)])`` of the exact GELU ``h Phi(h)``, elementwise (``order`` 1 or 2)."""
    cdf = 0.5 * (1 + torch.erf(h / _SQRT2))
    pdf = _INV_SQRT_2PI * torch.exp(-0.5 * h * h)
    out = (h * cdf, cdf + h * pdf)
    return out + (pdf * (2 - h * h),) if order > 1 else out


def _activation_jets(act: nn.Module, h, hd, hdd):
    """Value and first/second directional derivatives of an elementwise activation (GELU or SiLU)."""
    if isinstance(act, nn.GELU) and act.approximate == "none":
        y, d1, d2 = gelu_derivatives(h, order=2)
    elif isinstance(act, nn.SiLU):
        sig = torch.sigmoid(h)
        d1 = sig * (1 + h * (1 - sig))
        d2 = sig * (1 - sig) * (2 + h * (1 - 2 * sig))
        y = h * sig
    else:
        raise TypeError(f"no time derivatives for activation {type(act).__name__}; use GELU or SiLU")
    return y, d1 * hd, None if hdd is None else d2 * hd * hd + d1 * hdd


def sequential_jets(
    seq: nn.Sequential, h: torch.Tensor, hd: torch.Tensor, hdd: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Forward-mode jets through ``Linear``/``GELU``/``SiLU`` layers: ``(f(h), J hd, second order)``.

    ``hd`` is the derivative of the input along one scalar direction (``t``), ``hdd`` its second
    derivative (None: first order only). Two or three matrix products per layer, differentiable by
    ordinary backpropagation (cheaper than forward-mode AD's dual tensors)."""
    for layer in seq:
        if isinstance(layer, nn.Linear):
            h = layer(h)
            hd = hd @ layer.weight.T
            hdd = None if hdd is None else hdd @ layer.weight.T
        else:
            h, hd, hdd = _activation_jets(layer, h, hd, hdd)
    return h, hd, hdd


class _TimeFeatures(nn.Module):
    """Fourier features of ``num_times`` time columns plus a side flag: ``(N, k), (N,) -> (N, 2 F k + 1)``."""

    def __init__(self, num_times: int, num_frequencies: int, max_frequency: float):
        super().__init__()
        self.num_times = num_times
        self.embedding = FourierTimeEmbedding(num_frequencies, max_frequency)
        self.out_dim = 2 * num_frequencies * num_times + 1

    def forward(self, times, side):
        emb = self.embedding(times[..., None]).flatten(-2)
        return torch.cat([emb, side[..., None].to(emb.dtype)], dim=-1)

    def jets(self, times, side, order: int):
        """Features and their first (and second, ``order=2``) derivatives in the last time column."""
        feats = self.forward(times, side)
        w = self.embedding.frequencies.to(times.dtype)
        phase = times[..., -1:] * w  # (N, F)
        sin, cos = phase.sin(), phase.cos()
        lead = feats.shape[-1] - 1 - 2 * w.shape[0]  # features of the other time columns

        def pad(block):
            z = block.new_zeros(block.shape[:-1] + (lead,))
            return torch.cat([z, block, block.new_zeros(block.shape[:-1] + (1,))], dim=-1)

        d1 = pad(torch.cat([w * cos, -w * sin], dim=-1))
        d2 = pad(torch.cat([-w * w * sin, -w * w * cos], dim=-1)) if order > 1 else None
        return feats, d1, d2


class TimeScoreNetwork(nn.Module):
    """MLP time score ``s(x, times, side) -> R``: ``times`` ``(N, k)`` (``k = 1``: ``t``; ``k = 2``:
    ``(l, t)`` for secants), ``side`` ``(N,)`` in {0, 1} (which end a two-sided estimator models).

    ``h = W_x x + W_t phi(times, side)``, then ``num_layers`` GELU layers of width ``hidden_dim``.
    :meth:`time_jets` gives ``d/dt`` and ``d^2/dt^2`` in the last time column. Leading dimensions
    broadcast (``x`` ``(G, m, d)`` with ``times`` ``(G, 1, k)`` runs the time branch once per group).
    """

    broadcasts = True

    def __init__(self, dim: int, num_times: int = 1, *, hidden_dim: int = 256, num_layers: int = 3,
                 num_frequencies: int = 16, max_frequency: float = 20.0):
        super().__init__()
        self.features = _TimeFeatures(num_times, num_frequencies, max_frequency)
        self.input_x = nn.Linear(dim, hidden_dim)
        self.input_t = nn.Linear(self.features.out_dim, hidden_dim)
        layers = []
        for _ in range(num_layers - 1):
            layers += [nn.GELU(), nn.Linear(hidden_dim, hidden_dim)]
        layers += [nn.GELU(), nn.Linear(hidden_dim, 1)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, times: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        h = self.input_x(x) + self.input_t(self.features(times, side))
        return self.body(h).squeeze(-1)

    def time_jets(
        self, x: torch.Tensor, times: torch.Tensor, side: torch.Tensor, order: int = 1
    ) -> tuple[torch.Tensor, ...]:
        """``(s, ds/dt[, d^2 s/dt^2])``, each ``(N,)``; ``t`` is the last column of ``times``."""
        f, fd, fdd = self.features.jets(times, side, order)
        w = self.input_t.weight.T
        h = self.input_x(x) + self.input_t(f)
        out = sequential_jets(self.body, h, fd @ w, None if fdd is None else fdd @ w)
        return tuple(o.squeeze(-1) for o in out[: order + 1])


class QuadraticTimeScore(nn.Module):
    """Gaussian-family time score, a sum over principal axes: ``s = sum_k s_k``,
    ``s_k = c0_k + c_k q_k^2 + e_k q_k``, ``q = U_side x``.

    Time coefficients ``(c0, c, e) = MLP(phi(times, side))`` (``3 rank`` outputs); one direction
    matrix ``U_side`` ``(rank, d)`` per side (numerator 1, denominator 0). For ``p_0 = N(0, I)``,
    ``p_1 = N(mu, Sigma)`` every path marginal ``N(beta_t mu, alpha_t^2 I + beta_t^2 Sigma)`` is
    diagonal in the eigenbasis of ``Sigma``, so with ``U`` = those eigenvectors the exact time score
    (and secant) is in the family (DRE-infinity's "param" model), one component per axis.
    :meth:`init_directions` sets ``U`` to the principal axes of samples (called by ``fit``).
    Shapes ``(..., d), (..., k), (...) -> (...)`` (leading dimensions broadcast).
    """

    broadcasts = True

    def __init__(self, dim: int, num_times: int = 1, *, rank: int | None = None, hidden_dim: int = 128,
                 num_layers: int = 2, num_frequencies: int = 16, max_frequency: float = 20.0):
        super().__init__()
        rank = dim if rank is None else int(rank)
        if rank < 1:
            raise ValueError(f"rank must be positive, got {rank}")
        self.dim, self.rank = dim, rank
        self.features = _TimeFeatures(num_times, num_frequencies, max_frequency)
        self.directions = nn.Parameter(torch.eye(rank, dim).repeat(2, 1))  # (2 rank, d): [side 0; side 1]
        self.coefficients = MLP(self.features.out_dim, 3 * rank, hidden_dim=hidden_dim,
                                num_layers=num_layers, squeeze=False)
        last = self.coefficients.net[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    @torch.no_grad()
    def init_directions(self, x_num: torch.Tensor, x_den: torch.Tensor | None = None) -> None:
        """``U_1`` = principal axes of ``x_num`` ``(N, d)`` (largest variance first), ``U_0`` those of
        ``x_den`` (or ``U_1`` when None); with ``rank > d`` the extra rows keep their values."""
        for side, x in ((1, x_num), (0, x_num if x_den is None else x_den)):
            x = x.to(self.directions.dtype)
            cov = torch.atleast_2d(torch.cov(x.T))
            vecs = torch.linalg.eigh(cov)[1].flip(-1).T  # (d, d), rows = axes
            k = min(self.rank, self.dim)
            self.directions[side * self.rank : side * self.rank + k] = vecs[:k]

    def project(self, x: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        """``q = U_side x``: ``(..., d), (...) -> (..., rank)``."""
        q = x @ self.directions.T  # (..., 2 rank)
        r = self.rank
        return torch.where((side > 0.5)[..., None], q[..., r:], q[..., :r])

    def coefficient_jets(
        self, times: torch.Tensor, side: torch.Tensor, order: int = 0
    ) -> tuple[torch.Tensor, ...]:
        """``(c, dc/dt, d^2c/dt^2)[: order + 1]``, each ``(..., 3 rank)`` = ``[c0, c, e]``."""
        if order == 0:
            return (self.coefficients(self.features(times, side)),)
        return sequential_jets(self.coefficients.net, *self.features.jets(times, side, order))[: order + 1]

    def components(
        self, q: torch.Tensor, coeffs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-axis ``s_k``, ``d s_k / d q_k`` and ``d^2 s_k / d q_k^2`` for coefficients ``[c0, c, e]``."""
        c0, c, e = coeffs.split(self.rank, -1)
        return c0 + (c * q + e) * q, 2 * c * q + e, 2 * c

    def time_jets(
        self, x: torch.Tensor, times: torch.Tensor, side: torch.Tensor, order: int = 1
    ) -> tuple[torch.Tensor, ...]:
        """``(s, ds/dt, d^2 s/dt^2)[: order + 1]`` in the last column of ``times``: only the
        coefficients depend on time (one extra pass of the small coefficient MLP per order)."""
        q = self.project(x, side)
        return tuple(self.components(q, c)[0].sum(-1) for c in self.coefficient_jets(times, side, order))

    def forward(self, x: torch.Tensor, times: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
        return self.time_jets(x, times, side, order=0)[0]


def time_jets(
    network: nn.Module, x: torch.Tensor, times: torch.Tensor, side: torch.Tensor, order: int = 1
) -> tuple[torch.Tensor, ...]:
    """``(s, ds/dt, d^2 s/dt^2)[: order + 1]`` of a time-score network, derivatives in the last column of
    ``times``. ``x`` ``(..., d)``, ``times`` ``(..., k)``, ``side`` ``(...)`` broadcast together.

    Uses the network's own ``time_jets`` when it has one, else (nested) forward-mode AD
    (``torch.func.jvp``). A network without ``broadcasts = True`` gets flat ``(M, d), (M, k), (M,)``
    inputs."""
    if not getattr(network, "broadcasts", False):
        shape = torch.broadcast_shapes(x.shape[:-1], times.shape[:-1], side.shape)
        flat = (x.expand(shape + x.shape[-1:]).reshape(-1, x.shape[-1]),
                times.expand(shape + times.shape[-1:]).reshape(-1, times.shape[-1]),
                side.expand(shape).reshape(-1))
        return tuple(o.reshape(shape) for o in _time_jets(network, *flat, order))
    return _time_jets(network, x, times, side, order)


def _time_jets(network, x, times, side, order):
    if order == 0:
        return (network(x, times, side),)
    if hasattr(network, "time_jets"):
        return network.time_jets(x, times, side, order)[: order + 1]
    from torch.func import jvp

    lead = times[..., :-1]

    def f(t):
        return network(x, torch.cat([lead, t[..., None]], -1), side)

    def d1(t):
        return jvp(f, (t,), (torch.ones_like(t),))

    t = times[..., -1].contiguous()
    if order == 1:
        return d1(t)
    (s, sd), (_, sdd) = jvp(d1, (t,), (torch.ones_like(t),))
    return s, sd, sdd


def make_time_score_network(network: str | nn.Module, dim: int, num_times: int, **kwargs: Any) -> nn.Module:
    """``"mlp"`` -> :class:`TimeScoreNetwork`, ``"quadratic"`` -> :class:`QuadraticTimeScore`, or a module."""
    if isinstance(network, nn.Module):
        return network
    if network == "mlp":
        return TimeScoreNetwork(dim, num_times, **kwargs)
    if network == "quadratic":
        return QuadraticTimeScore(dim, num_times, **kwargs)
    raise ValueError(f"network must be 'mlp', 'quadratic' or an nn.Module, got {network!r}")


class SBIRatioNetwork(nn.Module):
    """Logit of a joint row: ``f([theta, x]) = g([theta, e(x)])``, ``(..., d_theta + d_x) -> (...)``.

    :param int theta_dim: ``d_theta`` (the first columns). :param int x_dim: ``d_x`` (the last ones).
    :param nn.Module embedding: ``e: (..., d_x) -> (..., d_e)`` (None: the identity), trained with ``g``.
    :param int embedding_dim: ``d_e`` (default: found by calling ``e`` on one row of zeros).
    :param int hidden_dim: width of the MLP ``g``. :param int num_layers: its hidden layers.
    """

    def __init__(self, theta_dim: int, x_dim: int, *, embedding: nn.Module | None = None,
                 embedding_dim: int | None = None, hidden_dim: int = 64, num_layers: int = 2):
        super().__init__()
        positive_int(theta_dim, "theta_dim")
        positive_int(x_dim, "x_dim")
        if embedding is not None and not isinstance(embedding, nn.Module):
            raise TypeError(f"embedding must be an nn.Module, got {type(embedding).__name__}")
        if embedding is None:
            embedding_dim = x_dim
        elif embedding_dim is None:
            with torch.no_grad():
                probe = next(iter(embedding.parameters()), torch.zeros(()))
                embedding_dim = int(embedding(probe.new_zeros(1, x_dim)).shape[-1])
        self.theta_dim, self.x_dim = theta_dim, x_dim
        self.embedding = embedding
        self.head = MLP(theta_dim + embedding_dim, 1, hidden_dim=hidden_dim, num_layers=num_layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        theta, x = z[..., : self.theta_dim], z[..., self.theta_dim :]
        if x.shape[-1] != self.x_dim:
            raise ValueError(f"rows must have {self.theta_dim + self.x_dim} columns, got {z.shape[-1]}")
        if self.embedding is not None:
            x = self.embedding(x.reshape(-1, self.x_dim))
            x = x.reshape(theta.shape[:-1] + x.shape[-1:])
        return self.head(torch.cat([theta, x], -1))
