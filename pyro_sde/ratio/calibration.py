r"""Calibration diagnostics of amortised posteriors: simulation-based calibration, coverage and TARP.

All take ground-truth parameters ``theta`` ``(N, d)`` drawn from the prior, with data simulated at them, and
``L`` posterior draws per simulation ``posterior_samples`` ``(L, N, d)`` (for a fitted
:class:`~pyro_sde.ratio.RatioLikelihood`: ``likelihood.sample_posteriors(x, L)``, or any sampler). A
calibrated posterior makes each diagnostic uniform / diagonal; an over-confident one (too narrow) piles SBC
ranks at both ends and puts coverage below the diagonal.

* :func:`simulation_based_calibration` (Talts et al. 2018): per coordinate the rank
  ``#{l: theta^(l)_k < theta_k}`` in ``{0, ..., L}``, uniform for the exact posterior; a chi-square test on
  ``num_bins`` equal bins gives a p-value per coordinate. :func:`plot_sbc_ranks` draws the histograms.
* :func:`expected_coverage` (highest-posterior-density regions, Hermans et al. 2022): the credibility level
  of the smallest HPD region holding ``theta``, ``alpha_i = P_post(log q(theta') > log q(theta_i))``;
  coverage at level ``c`` is ``mean_i [alpha_i <= c]``, ``= c`` when calibrated.
* :func:`tarp_coverage` (Lemos et al. 2023): distances to a random reference point per simulation,
  ``f_i = #{l: |theta^(l) - ref_i| < |theta_i - ref_i|} / L``; expected coverage ``mean_i [f_i <= c]``
  equals ``c`` for every ``c`` if and only if the posterior is exact (for references independent of it).
* :func:`posterior_predictive_pvalues`: where the observation falls among data simulated at posterior
  draws, per summary; a p-value near 0 flags a summary the fitted model does not reproduce.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.axes import Axes

__all__ = [
    "CoverageResult",
    "SBCResult",
    "expected_coverage",
    "plot_coverage",
    "plot_sbc_ranks",
    "posterior_predictive_pvalues",
    "sbc_ranks",
    "simulation_based_calibration",
    "tarp_coverage",
]


def _check_draws(theta: torch.Tensor, posterior_samples: torch.Tensor) -> None:
    if not (isinstance(theta, torch.Tensor) and isinstance(posterior_samples, torch.Tensor)):
        raise TypeError("theta and posterior_samples must be tensors")
    if theta.dim() != 2:
        raise ValueError(f"theta must have shape (N, d), got {tuple(theta.shape)}")
    if posterior_samples.dim() != 3 or posterior_samples.shape[1:] != theta.shape:
        raise ValueError(f"posterior_samples must have shape (L, N, d) = (L, {theta.shape[0]}, "
                         f"{theta.shape[1]}), got {tuple(posterior_samples.shape)}")
    if posterior_samples.shape[0] < 1:
        raise ValueError("posterior_samples needs at least one draw per simulation")


def sbc_ranks(theta: torch.Tensor, posterior_samples: torch.Tensor) -> torch.Tensor:
    """Ranks ``(N, d)`` in ``{0, ..., L}``: how many of the ``L`` posterior draws lie below ``theta`` per
    coordinate (``theta`` ``(N, d)``, ``posterior_samples`` ``(L, N, d)``)."""
    _check_draws(theta, posterior_samples)
    return (posterior_samples < theta[None]).sum(0)


class SBCResult(NamedTuple):
    """Simulation-based calibration: ranks and a chi-square uniformity test per coordinate."""

    ranks: torch.Tensor  #: ``(N, d)`` in ``{0, ..., L}``
    num_posterior_samples: int  #: ``L``
    num_bins: int  #: bins of the test (and plot)
    chi2: torch.Tensor  #: ``(d,)`` chi-square statistics on ``num_bins`` bins
    p_values: torch.Tensor  #: ``(d,)`` their p-values (``num_bins - 1`` degrees of freedom)


def _bin_counts(ranks: torch.Tensor, num_posterior_samples: int, num_bins: int) -> torch.Tensor:
    """Counts ``(num_bins, d)`` of ranks in ``num_bins`` equal bins of ``{0, ..., L}`` (``L + 1`` values)."""
    bins = (ranks.long() * num_bins) // (num_posterior_samples + 1)
    return torch.stack([torch.bincount(b, minlength=num_bins) for b in bins.T], -1)


def simulation_based_calibration(theta: torch.Tensor, posterior_samples: torch.Tensor, *,
                                 num_bins: int | None = None) -> SBCResult:
    """SBC ranks of ``theta`` ``(N, d)`` among ``posterior_samples`` ``(L, N, d)`` and a chi-square test of
    their uniformity per coordinate.

    :param int num_bins: equal bins of the ``L + 1`` rank values (default ``min(20, L + 1, N // 5)``, at least
        2); ``L + 1`` should be a multiple of it for exactly equal bins.
    """
    ranks = sbc_ranks(theta, posterior_samples)
    n, num_samples = theta.shape[0], posterior_samples.shape[0]
    if num_bins is None:
        num_bins = max(2, min(20, num_samples + 1, n // 5))
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or not 2 <= num_bins <= num_samples + 1:
        raise ValueError(f"num_bins must be an int in [2, L + 1 = {num_samples + 1}], got {num_bins!r}")
    counts = _bin_counts(ranks, num_samples, num_bins).double()
    # expected count per bin: its share of the L + 1 equally likely ranks
    edges = torch.arange(num_bins + 1, dtype=torch.float64) * (num_samples + 1) / num_bins
    width = torch.ceil(edges[1:]) - torch.ceil(edges[:-1])
    expected = n * width / (num_samples + 1)
    chi2 = ((counts - expected[:, None]) ** 2 / expected[:, None]).sum(0)
    dof = torch.tensor((num_bins - 1) / 2, dtype=torch.float64)
    p_values = torch.special.gammaincc(dof, chi2 / 2)  # the chi-square survival function
    return SBCResult(ranks, num_samples, num_bins, chi2, p_values)


def plot_sbc_ranks(
    result: SBCResult,
    *,
    axes: Sequence[Axes] | np.ndarray | None = None,
    names: list[str] | None = None,
    band: float = 0.99,
) -> np.ndarray:
    """Histograms of the SBC ranks, one panel per coordinate, with the central ``band`` interval of a bin
    count under uniformity shaded (normal approximation of the binomial). Returns the matplotlib axes
    ``(d,)``."""
    import matplotlib.pyplot as plt
    import numpy as np

    n, d = result.ranks.shape
    if axes is None:
        _, axes = plt.subplots(1, d, figsize=(2.6 * d, 2.2), squeeze=False)
        axes = axes[0]
    axes = np.atleast_1d(axes)
    if len(axes) != d:
        raise ValueError(f"axes must have {d} panels, got {len(axes)}")
    counts = _bin_counts(result.ranks, result.num_posterior_samples, result.num_bins).numpy()
    p = 1.0 / result.num_bins
    z = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((1 + band) / 2)).item()
    low, high = n * p - z * math.sqrt(n * p * (1 - p)), n * p + z * math.sqrt(n * p * (1 - p))
    for k, ax in enumerate(axes):
        ax.axhspan(low, high, color="0.85", zorder=0)
        ax.bar(np.arange(result.num_bins), counts[:, k], width=1.0, color="C0", edgecolor="white", zorder=1)
        ax.set_title(names[k] if names else f"theta[{k}]  p = {float(result.p_values[k]):.2g}", fontsize=9)
        ax.set_xticks([])
    return axes


class CoverageResult(NamedTuple):
    """Expected coverage of credible regions at each credibility level."""

    levels: torch.Tensor  #: ``(M,)`` credibility levels in ``[0, 1]``
    coverage: torch.Tensor  #: ``(M,)`` fraction of simulations whose ``theta`` lies in the region
    scores: torch.Tensor  #: ``(N,)`` per simulation: the smallest level whose region holds ``theta``


def _coverage(scores: torch.Tensor, levels: torch.Tensor | Sequence[float] | None) -> CoverageResult:
    levels = torch.linspace(0, 1, 21, dtype=torch.float64) if levels is None else torch.as_tensor(
        levels, dtype=torch.float64)
    scores = scores.double()
    coverage = (scores[None] <= levels[:, None] + 1e-12).double().mean(-1)
    return CoverageResult(levels, coverage, scores)


def expected_coverage(log_prob_true: torch.Tensor, log_prob_samples: torch.Tensor,
                      levels: torch.Tensor | Sequence[float] | None = None) -> CoverageResult:
    """HPD coverage from posterior log densities: ``log_prob_true`` ``(N,)`` at the true ``theta_i``, and
    ``log_prob_samples`` ``(L, N)`` at ``L`` posterior draws for each simulation (normalisation not needed).

    :param levels: credibility levels (default 0, 0.05, ..., 1).
    """
    if (log_prob_true.dim() != 1 or log_prob_samples.dim() != 2
            or log_prob_samples.shape[1] != log_prob_true.shape[0]):
        raise ValueError("log_prob_true must be (N,) and log_prob_samples (L, N), got "
                         f"{tuple(log_prob_true.shape)} and {tuple(log_prob_samples.shape)}")
    scores = (log_prob_samples > log_prob_true[None]).double().mean(0)
    return _coverage(scores, levels)


def tarp_coverage(theta: torch.Tensor, posterior_samples: torch.Tensor, *,
                  references: torch.Tensor | None = None,
                  levels: torch.Tensor | Sequence[float] | None = None,
                  generator: torch.Generator | None = None) -> CoverageResult:
    """TARP expected coverage of ``posterior_samples`` ``(L, N, d)`` for ``theta`` ``(N, d)``.

    Coordinates are standardised by ``theta``'s mean and std; references ``(N, d)`` default to uniform draws
    on the bounding box of the standardised ``theta`` (as the ``tarp`` package).
    """
    _check_draws(theta, posterior_samples)
    mean, std = theta.mean(0), theta.std(0).clamp_min(1e-12)
    z, zs = (theta - mean) / std, (posterior_samples - mean) / std
    if references is None:
        low, high = z.min(0).values, z.max(0).values
        u = torch.rand(z.shape, generator=generator, dtype=z.dtype, device=z.device)
        references = low + (high - low) * u
    else:
        if references.shape != theta.shape:
            raise ValueError(f"references must have shape {tuple(theta.shape)}, "
                             f"got {tuple(references.shape)}")
        references = (references - mean) / std
    true_distance = (z - references).norm(dim=-1)  # (N,)
    sample_distance = (zs - references[None]).norm(dim=-1)  # (L, N)
    scores = (sample_distance < true_distance[None]).double().mean(0)
    return _coverage(scores, levels)


def plot_coverage(result: CoverageResult, *, ax: Axes | None = None, label: str | None = None) -> Axes:
    """Coverage against credibility level with the diagonal (calibrated). Returns the matplotlib axis."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(3, 3))
    ax.plot([0, 1], [0, 1], color="0.6", ls="--", lw=1)
    ax.plot(result.levels.numpy(), result.coverage.numpy(), label=label)
    ax.set_xlabel("credibility level")
    ax.set_ylabel("expected coverage")
    return ax


def posterior_predictive_pvalues(x_obs: torch.Tensor, x_predictive: torch.Tensor) -> torch.Tensor:
    """Two-sided posterior predictive p-values ``(d_x,)``: ``2 min(P(x_rep <= x_obs), P(x_rep >= x_obs))``
    per coordinate, for the observation ``x_obs`` ``(d_x,)`` and data ``x_predictive`` ``(L, d_x)`` simulated
    at ``L`` posterior draws (``simulator(posterior.sample((L,)))``). Not uniform for a correct model (the
    data are used twice: they concentrate above 0.5); small values flag a misfit."""
    x_obs = torch.as_tensor(x_obs).reshape(-1)
    if x_predictive.dim() != 2 or x_predictive.shape[1] != x_obs.shape[0]:
        raise ValueError(f"x_predictive must have shape (L, {x_obs.shape[0]}), "
                         f"got {tuple(x_predictive.shape)}")
    below = (x_predictive <= x_obs).double().mean(0)
    above = (x_predictive >= x_obs).double().mean(0)
    return (2 * torch.minimum(below, above)).clamp_max(1.0)
