"""Logistic-regression density ratio: the classifier baseline.

A classifier ``f`` trained with balanced binary cross-entropy between ``p_num`` (label 1) and ``p_den``
(label 0) has the Bayes-optimal logit ``f(x) = log p_num(x) - log p_den(x) = log r(x)``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .base import MLP, RatioEstimator

__all__ = ["ClassifierRatioEstimator"]


class ClassifierRatioEstimator(RatioEstimator):
    """``log r(x) = f(x)``, ``f`` minimising ``E_num softplus(-f) + E_den softplus(f)``.

    :param int dim: data dimension.
    :param int hidden_dim: MLP width (256). :param int num_layers: hidden layers (3).
    :param nn.Module network: a custom logit network ``(N, d) -> (N,)`` instead of the MLP.
    """

    def __init__(self, dim: int, *, hidden_dim: int = 256, num_layers: int = 3,
                 network: nn.Module | None = None):
        super().__init__(dim)
        if network is None:
            network = MLP(dim, 1, hidden_dim=hidden_dim, num_layers=num_layers)
        self.network = network
        if isinstance(network, MLP):
            self._config.update(hidden_dim=hidden_dim, num_layers=num_layers)

    def _loss(self, x_num, x_den, progress):
        return F.softplus(-self.network(x_num)).mean() + F.softplus(self.network(x_den)).mean()

    def _log_ratio(self, z, num_steps=None):
        return self.network(z)
