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

For simulation-based inference (rows ``[theta, x]``, numerator the joint ``p(theta, x)``, denominator
``p(theta) p(x)``) two variants of sbi's NRE family:

* ``balance=lambda`` (BNRE, Delaunoy et al. 2022): adds ``lambda (E_num sigmoid(f) + E_den sigmoid(f) - 1)^2``
  to the cross-entropy, which pushes the classifier towards conservative (not over-confident) posteriors.
* :class:`ContrastiveRatioEstimator` (NRE-C, Miller et al. 2022): a ``K + 1``-way classification of which of
  ``K`` candidate ``theta`` (or none) goes with ``x``; its optimum is ``log r`` exactly, with no constant.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import nonnegative_float, positive_float, positive_int
from ..nn.ratio_networks import MLP
from .base import RatioEstimator

__all__ = ["ClassifierRatioEstimator", "ContrastiveRatioEstimator", "contrastive_ratio_loss"]


def _bce(logit_num: torch.Tensor, logit_den: torch.Tensor) -> torch.Tensor:
    return F.softplus(-logit_num).mean() + F.softplus(logit_den).mean()


def contrastive_ratio_loss(logits: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """NRE-C loss (Miller et al. 2022, eq. 8) from logits ``(B, K + 1)``: column 0 ``f(theta_i, x_i)`` of the
    joint pair, columns ``1..K`` ``f(theta_j, x_i)`` of contrasts ``j != i``.

    With ``p_0 = 1 / (1 + gamma)``, ``p_K = gamma / (1 + gamma)``, ``g = log gamma`` and the marginal set
    ``M = columns 1..K`` and the joint set ``J = columns 0..K-1`` (the joint pair first)::

        loss = -p_0 E[log K - logsumexp(g + f_M, log K)] - p_K E[g + f_0 - logsumexp(g + f_J, log K)]

    ``K = 1, gamma = 1`` gives half the balanced binary cross-entropy of :class:`ClassifierRatioEstimator`.
    """
    num_contrasts = logits.shape[-1] - 1
    if num_contrasts < 1:
        raise ValueError(f"logits must have shape (B, K + 1) with K >= 1, got {tuple(logits.shape)}")
    log_gamma = math.log(gamma)
    log_k = logits.new_full(logits.shape[:-1] + (1,), math.log(num_contrasts))
    marginal = torch.cat([log_gamma + logits[..., 1:], log_k], -1).logsumexp(-1)
    joint = torch.cat([log_gamma + logits[..., :-1], log_k], -1).logsumexp(-1)
    log_p_marginal = log_k[..., 0] - marginal
    log_p_joint = log_gamma + logits[..., 0] - joint
    return -(log_p_marginal.mean() + gamma * log_p_joint.mean()) / (1 + gamma)


class ClassifierRatioEstimator(RatioEstimator):
    """``log r(x) = f(x)``, ``f`` minimising ``E_num softplus(-f) + E_den softplus(f)``.

    :param int dim: data dimension.
    :param int hidden_dim: MLP width (256). :param int num_layers: hidden layers (3).
    :param nn.Module network: a custom logit network ``(N, d) -> (N,)`` instead of the MLP.
    :param bool quadratic: add a closed-form Gaussian log ratio (module docstring) to the network's
        logit; the MLP's last layer then starts at zero.
    :param float balance: BNRE's ``lambda`` (0: plain cross-entropy; Delaunoy et al. use 100).
    """

    supports_validation = True

    def __init__(self, dim: int, *, hidden_dim: int = 256, num_layers: int = 3,
                 network: nn.Module | None = None, quadratic: bool = False, balance: float = 0.0):
        super().__init__(dim)
        if not isinstance(quadratic, bool):
            raise TypeError(f"quadratic must be a bool, got {quadratic!r}")
        self.balance = nonnegative_float(balance, "balance")
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
        if balance:
            self._config.update(balance=self.balance)

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
        logit_num, logit_den = self._logit(x_num), self._logit(x_den)
        loss = _bce(logit_num, logit_den)
        if self.balance:
            gap = torch.sigmoid(logit_num).mean() + torch.sigmoid(logit_den).mean() - 1
            loss = loss + self.balance * gap.square()
        return loss

    _validation_loss = _loss

    def _log_ratio(self, z, num_steps=None):
        return self._logit(z)


class ContrastiveRatioEstimator(ClassifierRatioEstimator):
    """NRE-C on rows ``[theta, x]`` (``theta`` the first ``theta_dim`` columns): ``log r = f``, ``f``
    minimising :func:`contrastive_ratio_loss`; row i's ``K`` contrasts are ``theta`` of other rows.

    Only numerator (joint) rows enter the loss: ``fit``'s denominator sets the standardisation (give the
    product of marginals, which has the same per-coordinate moments) and is otherwise unused.

    :param int dim: ``d_theta + d_x``. :param int theta_dim: ``d_theta``.
    :param int num_contrasts: ``K`` (5). :param float gamma: odds of "a candidate is the joint one" against
        "none is" (1.0). Other options as :class:`ClassifierRatioEstimator`.
    """

    def __init__(self, dim: int, *, theta_dim: int, num_contrasts: int = 5, gamma: float = 1.0,
                 hidden_dim: int = 256, num_layers: int = 3, network: nn.Module | None = None):
        super().__init__(dim, hidden_dim=hidden_dim, num_layers=num_layers, network=network)
        if isinstance(theta_dim, bool) or not isinstance(theta_dim, int) or not 1 <= theta_dim < dim:
            raise ValueError(f"theta_dim must be an int in [1, dim), got {theta_dim!r}")
        positive_int(num_contrasts, "num_contrasts")
        positive_float(gamma, "gamma")
        self.theta_dim, self.num_contrasts, self.gamma = theta_dim, num_contrasts, float(gamma)
        del self._config["quadratic"]
        self._config.update(theta_dim=theta_dim, num_contrasts=num_contrasts, gamma=self.gamma)

    def contrast_logits(self, z: torch.Tensor, contrasts: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K + 1)`` of standardised joint rows ``z`` ``(B, d)``: column 0 ``f(z_i)``, column
        ``k`` ``f(theta_{contrasts[i, k - 1]}, x_i)`` for indices ``contrasts`` ``(B, K)``."""
        theta, x = z[:, : self.theta_dim], z[:, self.theta_dim :]
        candidates = torch.cat([theta[:, None], theta[contrasts]], 1)  # (B, K + 1, d_theta)
        rows = torch.cat([candidates, x[:, None].expand(-1, candidates.shape[1], -1)], -1)
        return self._logit(rows)

    def _check_batch(self, n: int) -> None:
        if n <= self.num_contrasts:
            raise ValueError(f"NRE-C needs more than num_contrasts={self.num_contrasts} rows per batch, "
                             f"got {n}")

    def _loss(self, x_num, x_den=None, progress=None):
        b = x_num.shape[0]
        self._check_batch(b)
        offsets = torch.randint(1, b, (b, self.num_contrasts), device=x_num.device)  # never the row itself
        contrasts = (torch.arange(b, device=x_num.device)[:, None] + offsets) % b
        return contrastive_ratio_loss(self.contrast_logits(x_num, contrasts), self.gamma)

    def _validation_loss(self, z_num, z_den=None):
        """The loss with fixed contrasts: row ``i`` against rows ``i + 1, ..., i + K`` (cyclically)."""
        n = z_num.shape[0]
        self._check_batch(n)
        idx = torch.arange(n, device=z_num.device)
        contrasts = (idx[:, None] + torch.arange(1, self.num_contrasts + 1, device=z_num.device)) % n
        return contrastive_ratio_loss(self.contrast_logits(z_num, contrasts), self.gamma)
