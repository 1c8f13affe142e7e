"""Telescoping density-ratio estimation (TRE, Rhodes, Xu & Gutmann 2020).

Waymarks ``w_k = alpha_{t_k} x_0 + beta_{t_k} x_1`` at ``t_k = k / M`` (``x_0 ~ p_den``, ``x_1 ~ p_num``)
bridge the two densities; classifier ``k`` separates ``w_k`` from ``w_{k-1}``, and
``log r(x) = sum_{k=1}^M f_k(x)`` telescopes ``log p_{t_k} / p_{t_{k-1}}``. One network with ``M`` heads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.ratio_networks import MLP
from .base import RatioEstimator
from .paths import get_path

if TYPE_CHECKING:
    from .paths import InterpolationPath

__all__ = ["TelescopingRatioEstimator"]


class TelescopingRatioEstimator(RatioEstimator):
    """TRE with ``num_bridges`` classifiers sharing one MLP body.

    :param int dim: data dimension.
    :param int num_bridges: ``M`` telescoping factors (4).
    :param path: waymark path (name or :class:`~pyro_sde.ratio.paths.InterpolationPath`; default
        ``"dre_infinity"``, TRE's linear-combination waymarks ``sqrt(1 - t^2) x_0 + t x_1``).
    :param int hidden_dim: MLP width (256). :param int num_layers: hidden layers (3).
    :param nn.Module network: custom ``(N, d) -> (N, M)`` logits network.
    """

    def __init__(self, dim: int, *, num_bridges: int = 4, path: str | InterpolationPath = "dre_infinity",
                 hidden_dim: int = 256, num_layers: int = 3, network: nn.Module | None = None):
        super().__init__(dim)
        if isinstance(num_bridges, bool) or not isinstance(num_bridges, int) or num_bridges < 1:
            raise ValueError(f"num_bridges must be a positive int, got {num_bridges!r}")
        self.num_bridges = num_bridges
        self.path = get_path(path)
        self.network = network if network is not None else MLP(
            dim, num_bridges, hidden_dim=hidden_dim, num_layers=num_layers, squeeze=False)
        self._config.update(num_bridges=num_bridges)
        if isinstance(path, str):
            self._config["path"] = path
        if network is None:
            self._config.update(hidden_dim=hidden_dim, num_layers=num_layers)

    def _loss(self, x_num, x_den, progress):
        m = self.num_bridges
        t = torch.linspace(0, 1, m + 1, dtype=x_num.dtype, device=x_num.device)
        waymarks = self.path.interpolate(x_den, x_num, t[:, None].expand(m + 1, x_num.shape[0]))
        logits = self.network(waymarks)  # (M+1, B, M)
        k = torch.arange(m, device=x_num.device)
        pos = logits[k + 1, :, k]  # head k on w_{k+1}: (M, B)
        neg = logits[k, :, k]  # head k on w_k
        return (F.softplus(-pos) + F.softplus(neg)).mean(-1).sum()

    def _log_ratio(self, z, num_steps=None):
        return self.network(z).sum(-1)
