"""Mutual information as the mean log ratio of the joint to the product of marginals.

``I(X; Y) = E_{p(x, y)} log r(x, y)``, ``r = p(x, y) / (p(x) p(y))``. Product-of-marginals samples pair
``x_i`` with ``y_j`` at independent random indices (fresh every training batch). The estimate averages
``log r`` over held-out joint pairs; its standard error is a bootstrap over those pairs (it does not
include the training variance of the estimator: repeat over seeds for that).
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch

from .base import MIN_SAMPLES, RatioEstimator, check_samples

__all__ = ["MutualInformation", "mutual_information"]


class MutualInformation(NamedTuple):
    """Result of :func:`mutual_information` (0-d tensors and the per-pair log ratios)."""

    estimate: torch.Tensor  #: mean of ``log r`` over the evaluation pairs (nats)
    stderr: torch.Tensor  #: bootstrap standard error of ``estimate``
    log_ratio: torch.Tensor  #: ``(M,)`` log ratios of the evaluation pairs
    estimator: RatioEstimator  #: the fitted estimator


def mutual_information(
    x: torch.Tensor,
    y: torch.Tensor,
    estimator: RatioEstimator | type | None = None,
    *,
    denominator: str = "shuffle",
    holdout: float = 0.2,
    validation: float = 0.0,
    refit: bool = False,
    num_steps: int | None = None,
    num_bootstrap: int = 200,
    fit: bool = True,
    **fit_kwargs,
) -> MutualInformation:
    """Estimate ``I(X; Y)`` in nats with a density-ratio estimator.

    :param x: ``(N, d_x)`` samples; :param y: ``(N, d_y)`` paired samples.
    :param estimator: an estimator instance over ``d_x + d_y`` dims, an estimator class (built with
        ``dim``), or None (:class:`~pyro_sde.ratio.SecantRatioEstimator`).
    :param str denominator: ``"shuffle"`` (product of marginals by re-pairing) or ``"standard_normal"``
        (the marginals are known to be ``N(0, I)``: the product is ``N(0, I)``, as in DRE-infinity's MI task).
    :param float holdout: share of pairs kept out of training for the estimate (0 uses all).
    :param float validation: share of the training pairs kept out of training as a validation set for
        early stopping (estimators with ``supports_validation``, e.g.
        :class:`~pyro_sde.ratio.ClassifierRatioEstimator`): its joint pairs against 4 times as many
        re-paired ones (``"shuffle"``: from the validation pairs only, so no validation point is ever
        trained on). 0: off.
    :param bool refit: with ``validation > 0``: after early stopping has picked the step count ``k*``
        (the checked step with the lowest validation loss), train a copy of the estimator as it was
        before fitting (same initial weights) on all training pairs, validation pairs included, for
        the first ``k*`` steps of the same ``num_iterations`` schedule (``fit(..., stop_after=k*)``) and
        return that one. ``k* = 0`` (the initial weights won) keeps the early-stopped estimator.
    :param int num_steps: NFE of ``log_ratio``.
    :param int num_bootstrap: bootstrap resamples of the evaluation pairs.
    :param bool fit: fit the estimator (False: use an already fitted one).
    :param fit_kwargs: passed to :meth:`RatioEstimator.fit` (``num_iterations``, ``batch_size``...).
    """
    x = check_samples(x, "x", min_samples=MIN_SAMPLES)
    y = check_samples(y, "y", min_samples=MIN_SAMPLES)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of samples, got {x.shape[0]} and {y.shape[0]}")
    if x.dtype != y.dtype or x.device != y.device:
        raise ValueError("x and y must share dtype and device")
    if denominator not in ("shuffle", "standard_normal"):
        raise ValueError(f"denominator must be 'shuffle' or 'standard_normal', got {denominator!r}")
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must be in [0, 1), got {holdout!r}")
    if not 0 <= validation < 1:
        raise ValueError(f"validation must be in [0, 1), got {validation!r}")
    n, dim = x.shape[0], x.shape[1] + y.shape[1]
    if estimator is None:
        from .secant import SecantRatioEstimator

        estimator = SecantRatioEstimator
    if isinstance(estimator, type):
        estimator = estimator(dim)
    if estimator.dim != dim:
        raise ValueError(f"estimator has dim {estimator.dim}, but x and y have {dim} dims together")
    if not isinstance(refit, bool):
        raise TypeError(f"refit must be a bool, got {refit!r}")
    if refit and not (validation > 0 and fit):
        raise ValueError("refit=True needs validation > 0 and fit=True")
    if validation > 0 and fit and not estimator.supports_validation:
        raise ValueError(f"{type(estimator).__name__} does not support validation (early stopping)")
    perm = torch.randperm(n, device=x.device)
    num_eval = int(round(holdout * n))
    eval_idx, train_idx = perm[:num_eval], perm[num_eval:]
    if num_eval == 0:
        eval_idx = train_idx
    if train_idx.shape[0] < MIN_SAMPLES:
        raise ValueError(f"too few training pairs ({train_idx.shape[0]}); need at least {MIN_SAMPLES}")
    if fit:
        num_val = int(round(validation * train_idx.shape[0]))
        val_idx, train_idx = train_idx[:num_val], train_idx[num_val:]
        if validation > 0 and (num_val < MIN_SAMPLES or train_idx.shape[0] < MIN_SAMPLES):
            raise ValueError(f"validation={validation} leaves {num_val} validation and {train_idx.shape[0]} "
                             f"training pairs; need at least {MIN_SAMPLES} of each")

        def product(idx, k):
            i = idx[torch.randint(idx.shape[0], (k,), device=x.device)]
            j = idx[torch.randint(idx.shape[0], (k,), device=x.device)]
            return torch.cat([x[i], y[j]], -1)

        if num_val:
            val_den = product(val_idx, 4 * num_val) if denominator == "shuffle" else torch.randn(
                4 * num_val, dim, dtype=x.dtype, device=x.device)
            fit_kwargs["validation"] = (torch.cat([x[val_idx], y[val_idx]], -1), val_den)
        initial = copy.deepcopy(estimator) if refit else None
        den = (lambda k: product(train_idx, k)) if denominator == "shuffle" else None
        estimator.fit(torch.cat([x[train_idx], y[train_idx]], -1), den, **fit_kwargs)
        if refit:
            best_step = min(estimator.validation_losses, key=lambda s: s[1])[0]
            if best_step > 0:
                all_idx = torch.cat([val_idx, train_idx])
                fit_kwargs.update(validation=None, stop_after=best_step)
                den = (lambda k: product(all_idx, k)) if denominator == "shuffle" else None
                initial.fit(torch.cat([x[all_idx], y[all_idx]], -1), den, **fit_kwargs)
                initial.validation_losses = estimator.validation_losses
                estimator = initial
    with torch.no_grad():
        lr = estimator.log_ratio(torch.cat([x[eval_idx], y[eval_idx]], -1), num_steps)
    boot = torch.randint(lr.shape[0], (num_bootstrap, lr.shape[0]), device=lr.device)
    return MutualInformation(lr.mean(), lr[boot].mean(-1).std(), lr, estimator)
