"""Logistic-regression density ratio: the classifier baseline.

A classifier ``f`` trained with balanced binary cross-entropy between ``p_num`` (label 1) and ``p_den``
(label 0) has the Bayes-optimal logit ``f(x) = log p_num(x) - log p_den(x) = log r(x)``.

Two options regularise it on small samples in many dimensions:

* ``quadratic=True`` adds a Gaussian log ratio ``log N(x; m, S_1) - log N(x; 0, S_0)`` to the logit,
  fitted in closed form before training (in the coordinates whitened by the denominator's covariance;
  only the eigen-directions of the numerator's covariance clearly outside the Marchenko-Pastur noise bulk
  are kept, the mean shift only when it exceeds its noise level). The network's last layer starts at zero,
  so training starts from the Gaussian ratio and the network learns the non-Gaussian residual. Exact
  for two Gaussians.
* ``fit(..., validation=(x_num_val, x_den_val))``: early stopping on the held-out cross-entropy
  (:meth:`RatioEstimator.fit`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import MLP, RatioEstimator

__all__ = ["ClassifierRatioEstimator"]


def _bce(logit_num: torch.Tensor, logit_den: torch.Tensor) -> torch.Tensor:
    return F.softplus(-logit_num).mean() + F.softplus(logit_den).mean()


class ClassifierRatioEstimator(RatioEstimator):
    """``log r(x) = f(x)``, ``f`` minimising ``E_num softplus(-f) + E_den softplus(f)``.

    :param int dim: data dimension.
    :param int hidden_dim: MLP width (256). :param int num_layers: hidden layers (3).
    :param nn.Module network: a custom logit network ``(N, d) -> (N,)`` instead of the MLP.
    :param bool quadratic: add a closed-form Gaussian log ratio (module docstring) to the network's
        logit; the MLP's last layer then starts at zero.
    """

    supports_validation = True

    def __init__(self, dim: int, *, hidden_dim: int = 256, num_layers: int = 3,
                 network: nn.Module | None = None, quadratic: bool = False):
        super().__init__(dim)
        if not isinstance(quadratic, bool):
            raise TypeError(f"quadratic must be a bool, got {quadratic!r}")
        if network is None:
            network = MLP(dim, 1, hidden_dim=hidden_dim, num_layers=num_layers)
            if quadratic:
                nn.init.zeros_(network.net[-1].weight)
                nn.init.zeros_(network.net[-1].bias)
        self.network = network
        self.quadratic = quadratic
        if quadratic:  # logit term x^T A x + b^T x + c on standardised inputs
            self.register_buffer("quad_matrix", torch.zeros(dim, dim))
            self.register_buffer("quad_linear", torch.zeros(dim))
            self.register_buffer("quad_const", torch.zeros(()))
            self.register_buffer("quad_rank", torch.zeros((), dtype=torch.long))
        if isinstance(network, MLP):
            self._config.update(hidden_dim=hidden_dim, num_layers=num_layers)
        self._config.update(quadratic=quadratic)

    # quadratic term ------------------------------------------------------------------------------
    def _quadratic(self, z: torch.Tensor) -> torch.Tensor:
        return ((z @ self.quad_matrix) * z).sum(-1) + z @ self.quad_linear + self.quad_const

    @torch.no_grad()
    def _initialize(self, sample_num, sample_den):
        if not self.quadratic or sample_den is None:
            return
        zn = sample_num(16384).double()  # a data tensor gives all its rows (up to 16384)
        zd = sample_den(max(16384, 4 * zn.shape[0])).double()
        d = self.dim
        n_eff = 1.0 / (1.0 / (zn.shape[0] - 1) + 1.0 / (zd.shape[0] - 1))
        mu0 = zd.mean(0)
        vals0, vecs0 = torch.linalg.eigh(torch.atleast_2d(torch.cov(zd.T)))
        whiten = vecs0 @ torch.diag(vals0.clamp_min(1e-12).rsqrt()) @ vecs0.T  # S_0^(-1/2)
        lam, vecs = torch.linalg.eigh(whiten @ torch.atleast_2d(torch.cov(zn.T)) @ whiten)
        edge = 1.5 * math.sqrt(d / n_eff)  # 1.5 x the bulk's half-width: room for edge fluctuations
        keep = (lam > (1 + edge) ** 2) | (lam < (1 - edge) ** 2)
        lam, vecs = lam[keep].clamp_min(1e-6), vecs[:, keep]
        shift = whiten @ (zn.mean(0) - mu0)
        if n_eff * shift.square().sum() < d + 4 * math.sqrt(2 * d):  # within noise: no mean shift
            shift = torch.zeros_like(shift)
        # u = W (z - mu0);  log r = -1/2 (u - m)^T P (u - m) + 1/2 u^T u - 1/2 sum log lam,
        # P = I + V diag(1/lam - 1) V^T
        low = vecs * (1 / lam - 1)
        precision = torch.eye(d, dtype=zn.dtype) + low @ vecs.T
        quad_u = -0.5 * low @ vecs.T  # -1/2 (P - I)
        lin_u = precision @ shift
        const_u = -0.5 * shift @ precision @ shift - 0.5 * lam.log().sum()
        a = whiten.T @ quad_u @ whiten
        b = whiten.T @ lin_u - 2 * a @ mu0
        c = const_u + mu0 @ a @ mu0 - lin_u @ (whiten @ mu0)
        self.quad_matrix.copy_(a)
        self.quad_linear.copy_(b)
        self.quad_const.copy_(c)
        self.quad_rank.fill_(int(keep.sum()))

    def _logit(self, z: torch.Tensor) -> torch.Tensor:
        out = self.network(z)
        return out + self._quadratic(z) if self.quadratic else out

    # training ------------------------------------------------------------------------------------
    def _loss(self, x_num, x_den, progress=None):
        return _bce(self._logit(x_num), self._logit(x_den))

    _validation_loss = _loss

    def _log_ratio(self, z, num_steps=None):
        return self._logit(z)
