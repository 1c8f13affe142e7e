"""Diagnostics for importance-weighted samples: ESS, log evidence, PSIS, resampling, ArviZ export.

Every sampler of the package returns samples ``x_i`` with log importance weights
``log w_i = log p~(x_i) - log q(x_i)`` (unnormalised target over proposal). This module turns them
into the usual numbers:

* :func:`effective_sample_size`: normalised ESS ``(sum w)^2 / (N sum w^2)`` in ``(0, 1]``;
* :func:`log_evidence`: ``log Z ~= log mean w`` with its delta-method standard error and the
  ELBO-type lower bound ``mean log w``;
* :func:`psis`: Pareto-smoothed importance sampling and its ``k-hat`` reliability diagnostic;
* :func:`systematic_resample`: low-variance unbiased resampling;
* :func:`weighted_summary`, :func:`print_weighted_summary`: reporting;
* :func:`to_inference_data`: ArviZ ``InferenceData`` with ``log_likelihood``, ``observed_data`` and
  ``posterior_predictive`` (defined in ``pyro_sde._arviz``).

Every estimate computed from weights (evidence, summaries, printed tables, ArviZ export) checks the
PSIS Pareto ``k`` of its weights and warns with :class:`UnreliableEstimateWarning` when
``k > 0.7`` (ArviZ's threshold): the standard error is then not to be trusted.

All functions take log weights as a 1-D tensor of shape ``(N,)`` on any device/dtype and raise
:class:`ValueError` on NaN or ``+inf`` entries, on all-``-inf`` weights (``-inf`` alone is a valid
zero weight) and on a wrong shape.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from itertools import product
from typing import NamedTuple

import torch
from pyro.ops.stats import fit_generalized_pareto, weighed_quantile

__all__ = [
    "LogEvidence",
    "PARETO_K_UNRELIABLE",
    "UnreliableEstimateWarning",
    "effective_sample_size",
    "log_evidence",
    "psis",
    "pareto_k_threshold",
    "systematic_resample",
    "weighted_summary",
    "print_weighted_summary",
    "to_inference_data",
]


#: ArviZ's threshold: importance-sampling estimates with a Pareto k above it are unreliable.
PARETO_K_UNRELIABLE = 0.7
#: weighted draws with fewer effective samples give posterior means a Monte Carlo error above 0.1
#: posterior sd (``1 / sqrt(100)``); Stan warns below 100 per chain too
MIN_EFFECTIVE_SAMPLES = 100


class UnreliableEstimateWarning(RuntimeWarning):
    """An estimate computed from importance weights whose PSIS Pareto k exceeds 0.7."""


class _LogEvidenceFields(NamedTuple):
    log_z: torch.Tensor  #: ``log (1/N) sum_i w_i``
    stderr: torch.Tensor  #: delta-method standard error of ``log_z``: ``std(w) / (mean w sqrt N)``
    lower_bound: torch.Tensor  #: ``(1/N) sum_i log w_i <= log Z`` in expectation (ELBO-type bound)
    ess: torch.Tensor  #: normalised effective sample size in ``(0, 1]``


class LogEvidence(_LogEvidenceFields):
    """Importance-sampling estimate of the log normalising constant (all 0-d tensors).

    A NamedTuple ``(log_z, stderr, lower_bound, ess)`` (unpacks into these four) with the extra
    attributes ``pareto_k`` (PSIS k-hat of the weights, float), ``reliable`` (``pareto_k <= 0.7``:
    otherwise ``stderr`` is not to be trusted) and ``num_dropped`` (paths dropped for a non-finite
    log weight before the estimate).
    """

    def __new__(cls, log_z, stderr, lower_bound, ess, pareto_k: float = math.nan, num_dropped: int = 0):
        self = super().__new__(cls, log_z, stderr, lower_bound, ess)
        self.pareto_k = float(pareto_k)
        self.num_dropped = int(num_dropped)
        return self

    @property
    def reliable(self) -> bool:
        """``pareto_k <= 0.7`` (ArviZ's threshold)."""
        return self.pareto_k <= PARETO_K_UNRELIABLE

    def __getnewargs__(self):
        return (*self, self.pareto_k, self.num_dropped)

    def _replace(self, **changes):
        extras = {name: changes.pop(name, getattr(self, name)) for name in ("pareto_k", "num_dropped")}
        return LogEvidence(*super()._replace(**changes), **extras)

    def __repr__(self):
        return (
            f"LogEvidence(log_z={float(self.log_z):.6g}, stderr={float(self.stderr):.3g}, "
            f"lower_bound={float(self.lower_bound):.6g}, ess={float(self.ess):.3g}, "
            f"pareto_k={self.pareto_k:.3g}, reliable={self.reliable}, num_dropped={self.num_dropped})"
        )


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------


def _check_log_weights(log_weights, min_samples: int = 1) -> torch.Tensor:
    """Validate and return log weights as a floating 1-D tensor of shape ``(N,)``."""
    lw = torch.as_tensor(log_weights)
    if not torch.is_floating_point(lw):
        lw = lw.to(torch.get_default_dtype())
    if lw.dim() != 1:
        raise ValueError(
            f"log_weights must be a 1-D tensor of shape (N,), got shape {tuple(lw.shape)}"
        )
    if lw.numel() < min_samples:
        raise ValueError(f"need at least {min_samples} log weights, got {lw.numel()}")
    if torch.isnan(lw).any():
        raise ValueError("log_weights contain NaN")
    if (lw == math.inf).any():
        raise ValueError("log_weights contain +inf")
    if (lw == -math.inf).all():
        raise ValueError("all log_weights are -inf (every weight is zero)")
    return lw


def _check_samples(samples: Mapping, num_samples: int | None = None) -> dict:
    """Validate a dict ``site -> (N, *site_shape)`` with a common ``N`` (= ``num_samples``)."""
    if not isinstance(samples, Mapping) or len(samples) == 0:
        raise ValueError("samples must be a non-empty dict mapping site names to tensors")
    out = {}
    for name, value in samples.items():
        value = torch.as_tensor(value)
        if value.dim() == 0:
            raise ValueError(f"site '{name}' must have a leading sample dimension, got a scalar")
        n = value.shape[0] if num_samples is None else num_samples
        if value.shape[0] != n:
            raise ValueError(
                f"site '{name}' has {value.shape[0]} samples, expected {n} "
                "(the number of log weights / of samples in the other sites)"
            )
        num_samples = n
        out[name] = value
    return out


# --------------------------------------------------------------------------------------------------
# weights diagnostics
# --------------------------------------------------------------------------------------------------


def effective_sample_size(log_weights: torch.Tensor) -> torch.Tensor:
    """Normalised importance ESS ``(sum w)^2 / (N sum w^2)`` in ``(0, 1]``, computed in log space.

    :param torch.Tensor log_weights: unnormalised log weights, shape ``(N,)``.
    :returns: 0-d tensor; 1 for equal weights, ``1/N`` for a single non-zero weight.
    """
    return _log_ess(_check_log_weights(log_weights)).exp()


def _log_ess(lw: torch.Tensor) -> torch.Tensor:
    """``log`` of the normalised ESS along dim 0 of ``(N, *batch)`` log weights (unchecked); ``(*batch)``."""
    top = lw.amax(0)
    lw = lw - torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # 2 lw must not overflow
    return 2 * lw.logsumexp(0) - (2 * lw).logsumexp(0) - math.log(lw.shape[0])


def log_evidence(log_weights: torch.Tensor) -> LogEvidence:
    """Estimate ``log Z = log E_q[w]`` by ``log mean w``, with error bar and lower bound.

    ``stderr = std(w) / (mean(w) sqrt(N))`` (delta method, unbiased ``std``) is computed on the
    weights shifted by ``max log w``, so it is scale invariant and never overflows.

    Warns (:class:`UnreliableEstimateWarning`) when the weights' Pareto k exceeds 0.7; the result's
    ``pareto_k`` / ``reliable`` attributes record it.

    :param torch.Tensor log_weights: unnormalised log weights, shape ``(N,)``, ``N >= 2``.
    :rtype: LogEvidence
    """
    lw = _check_log_weights(log_weights, min_samples=2)
    n = lw.numel()
    log_z = lw.logsumexp(0) - math.log(n)
    w = (lw - lw.max()).exp()
    stderr = w.std() / (w.mean() * math.sqrt(n))
    k = _pareto_k(lw)
    _warn_if_unreliable(k, f"log Z = {float(log_z):.4g} +- {float(stderr):.2g}")
    lower_bound = lw.max() + (lw - lw.max()).mean()  # shifted: a sum of huge log weights overflows
    return LogEvidence(log_z, stderr, lower_bound, _log_ess(lw).exp(), pareto_k=k)


def pareto_k_threshold(num_samples: int) -> float:
    """Sample-size dependent PSIS reliability threshold for k-hat: ``min(1 - 1/log10 S, 0.7)``."""
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples}")
    return min(1.0 - 1.0 / math.log10(num_samples), 0.7)


def _psis_tail_length(num_samples: int) -> int:
    """PSIS tail length ``M = min(ceil(0.2 N), ceil(3 sqrt(N)))`` (relative efficiency 1)."""
    return int(math.ceil(min(0.2 * num_samples, 3.0 * math.sqrt(num_samples))))


def _gpd_quantile(probs: torch.Tensor, k: float, sigma: float) -> torch.Tensor:
    """Generalized Pareto quantile ``sigma ((1 - p)^-k - 1) / k`` (``-sigma log(1 - p)`` if k=0)."""
    if abs(k) < torch.finfo(probs.dtype).eps:
        return -sigma * torch.log1p(-probs)
    return sigma * torch.expm1(-k * torch.log1p(-probs)) / k


def psis(log_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pareto-smoothed importance sampling (Vehtari, Simpson, Gelman, Yao & Gabry, 2024).

    The largest ``M = min(ceil(0.2 N), ceil(3 sqrt(N)))`` weights are replaced by the expected order
    statistics of a generalized Pareto fit to the tail exceedances, ``log(u + F^-1((i - 1/2) / M))``
    with ``u`` the threshold weight, truncated at the largest raw weight. The GPD shape ``k-hat`` is
    the reliability diagnostic: estimates are reliable for ``k < pareto_k_threshold(N)`` (<= 0.7).
    Matches :func:`arviz.psislw` with ``reff=1`` (up to the additive normalisation of the output).
    If fewer than 5 weights exceed the threshold (``N <= 20``, or ties) or the fit fails, the
    weights are returned unsmoothed with ``k = inf``, as ArviZ does. Not differentiable.

    :param torch.Tensor log_weights: unnormalised log weights, shape ``(N,)``, ``N >= 2``.
    :returns: ``(smoothed_log_weights, pareto_k)``: shape ``(N,)`` on the input's scale (not
        normalised) and order, and a 0-d tensor.
    """
    lw = _check_log_weights(log_weights, min_samples=2).detach()
    n = lw.numel()
    max_lw = lw.max()
    sorted_lw, order = (lw - max_lw).sort()
    cutoff = max(sorted_lw[-_psis_tail_length(n) - 1].item(), math.log(torch.finfo(lw.dtype).tiny))
    tail_len = int((sorted_lw > cutoff).sum())  # the tail is a suffix of the sorted weights
    smoothed, k = lw.clone(), math.inf
    if tail_len > 4:
        exceedances = sorted_lw[n - tail_len :].exp() - math.exp(cutoff)
        k, sigma = fit_generalized_pareto(exceedances.cpu())  # Pyro's fit works on CPU float64
        if math.isfinite(k) and sigma > 0:
            probs = (torch.arange(tail_len, dtype=lw.dtype, device=lw.device) + 0.5) / tail_len
            tail = (_gpd_quantile(probs, k, sigma) + math.exp(cutoff)).log().clamp(max=0.0)
            smoothed[order[n - tail_len :]] = tail + max_lw
        else:
            k = math.inf
    return smoothed, torch.tensor(k, dtype=lw.dtype, device=lw.device)


def _pareto_k(lw: torch.Tensor) -> float:
    """PSIS k-hat of checked log weights ``(N,)``; ``-inf`` for exactly equal finite weights (a perfect
    proposal: zero variance, nothing to fit), ``inf`` when there are too few weights to fit a tail."""
    finite = lw[lw > -math.inf]
    if finite.numel() == lw.numel() and bool((finite == finite[0]).all()):
        return -math.inf
    return float(psis(lw)[1])


def _warn_if_few_effective(log_weights: torch.Tensor, what: str, advice: str, stacklevel: int = 3) -> None:
    """Warn (:class:`UnreliableEstimateWarning`) when the weights ``(N,)`` hold fewer than
    :data:`MIN_EFFECTIVE_SAMPLES` effective samples (``N`` times the normalised ESS). A single heavy
    weight can leave the Pareto k below 0.7 and still dominate the moments: this is the check for it."""
    effective = float(effective_sample_size(log_weights)) * log_weights.numel()
    if effective >= MIN_EFFECTIVE_SAMPLES:
        return
    warnings.warn(
        f"{what} rest on an effective sample size of {effective:.1f} (< {MIN_EFFECTIVE_SAMPLES}): posterior "
        f"means and quantiles carry a Monte Carlo error of more than 0.1 posterior sd; {advice}",
        UnreliableEstimateWarning,
        stacklevel=stacklevel + 1,
    )


def _warn_if_unreliable(pareto_k: float, what: str, stacklevel: int = 3) -> bool:
    """Warn (:class:`UnreliableEstimateWarning`) when ``pareto_k > 0.7``; returns whether it is reliable.

    The one check behind every estimate computed from importance weights."""
    if pareto_k <= PARETO_K_UNRELIABLE:
        return True
    reason = "fewer than 21 weights or ties in the tail" if pareto_k == math.inf else "heavy-tailed weights"
    warnings.warn(
        f"{what} is unreliable: the Pareto k of the importance weights is {pareto_k:.2f} > "
        f"{PARETO_K_UNRELIABLE} ({reason}): the estimate and its standard error are not to be trusted. "
        "Train longer, draw more samples, or use a better proposal.",
        UnreliableEstimateWarning,
        stacklevel=stacklevel + 1,
    )
    return False


def _drop_nonfinite(log_weights: torch.Tensor, *tensors: torch.Tensor, stacklevel: int = 3):
    """The policy for a sampler's own draws: paths with a NaN or ``+inf`` log weight are dropped
    (``-inf`` is a valid zero weight and is kept), counted and reported with a ``RuntimeWarning``.

    :returns: ``(log_weights[keep], *(t[keep] for t in tensors), num_dropped)``.
    :raises FloatingPointError: if every path is dropped.
    """
    keep = ~(torch.isnan(log_weights) | (log_weights == math.inf))
    num_dropped = int(log_weights.numel() - keep.sum())
    if num_dropped == log_weights.numel():
        raise FloatingPointError(
            f"all {num_dropped} paths have a NaN or +inf log weight: check the model's log density"
        )
    if num_dropped:
        warnings.warn(
            f"{num_dropped} of {log_weights.numel()} paths had a NaN or +inf log weight and were dropped "
            "from the estimates (counted in num_dropped)",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )
        return (log_weights[keep], *(t[keep] for t in tensors), num_dropped)
    return (log_weights, *tensors, 0)


def systematic_resample(
    log_weights: torch.Tensor,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Systematic resampling: indices ``i`` with ``C_{i-1} <= (u + j) / M < C_i``, ``u ~ U(0, 1)``.

    ``C`` is the cumulative sum of the normalised weights; each index is drawn ``M w_i`` times in
    expectation (unbiased) and ``floor``/``ceil`` of it almost surely (low variance).

    :param torch.Tensor log_weights: unnormalised log weights, shape ``(N,)``.
    :param int num_samples: number of draws ``M`` (default ``N``).
    :param torch.Generator generator: optional generator (on the weights' device) for ``u``.
    :returns: sorted ``LongTensor`` of indices in ``[0, N)``, shape ``(M,)``, on the weights'
        device.
    """
    lw = _check_log_weights(log_weights).detach()
    m = lw.numel() if num_samples is None else int(num_samples)
    if m < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    cdf = (lw - lw.logsumexp(0)).exp().cumsum(0)
    cdf = cdf / cdf[-1]
    u = torch.rand(1, generator=generator, dtype=lw.dtype, device=lw.device)
    positions = (u + torch.arange(m, dtype=lw.dtype, device=lw.device)) / m
    return torch.searchsorted(cdf, positions, right=True).clamp_(max=lw.numel() - 1)


# --------------------------------------------------------------------------------------------------
# summaries
# --------------------------------------------------------------------------------------------------


def _quantile_keys(prob: float) -> tuple[str, str]:
    return f"{100 * (1 - prob) / 2:.1f}%", f"{100 * (1 + prob) / 2:.1f}%"


def weighted_summary(samples: dict, log_weights: torch.Tensor, prob: float = 0.9) -> dict:
    """Importance-weighted mean, std, median and central ``prob`` interval of each site element.

    With normalised weights ``w~``: ``mean = sum w~ x``, ``std = sqrt(sum w~ (x - mean)^2)``;
    quantiles by :func:`pyro.ops.stats.weighed_quantile`.

    :param dict samples: site name -> tensor of shape ``(N, *site_shape)``.
    :param torch.Tensor log_weights: unnormalised log weights, shape ``(N,)``.
    :param float prob: mass of the central interval, in ``(0, 1)``.
    :returns: site name -> ``{"mean", "std", "median", "5.0%", "95.0%"}`` (for ``prob=0.9``), each a
        tensor of shape ``site_shape``. Warns when the weights' Pareto k exceeds 0.7.
    """
    if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 < prob < 1.0:
        raise ValueError(f"prob must be a number in (0, 1), got {prob!r}")
    lw = _check_log_weights(log_weights)
    samples = _check_samples(samples, lw.numel())
    if lw.numel() >= 2:
        _warn_if_unreliable(_pareto_k(lw), "the weighted summary")
    w = (lw - lw.logsumexp(0)).exp()
    low, high = _quantile_keys(prob)
    probs = [(1 - prob) / 2, 0.5, (1 + prob) / 2]
    summary = {}
    for name, value in samples.items():
        site_shape = value.shape[1:]
        x = value.reshape(value.shape[0], -1).to(lw.dtype)  # (N, D)
        mean = w @ x
        std = (w @ (x - mean).square()).sqrt()
        q = weighed_quantile(x, probs, lw, dim=0)  # (3, D)
        stats = {"mean": mean, "std": std, "median": q[1], low: q[0], high: q[2]}
        summary[name] = {key: v.reshape(site_shape) for key, v in stats.items()}
    return summary


def print_weighted_summary(summary_dict: dict, log_evidence: LogEvidence | None = None) -> None:
    """Print :func:`weighted_summary` output as a table (one row per site element), like
    :func:`pyro.infer.mcmc.util.print_summary`, then ``log Z +- stderr``, lower bound and ESS."""
    if len(summary_dict) == 0:
        return
    columns = list(next(iter(summary_dict.values())).keys())
    rows = []
    for name, stats in summary_dict.items():
        shape = tuple(stats["mean"].shape)
        for idx in product(*map(range, shape)):
            label = name + ("[{}]".format(",".join(map(str, idx))) if shape else "")
            rows.append((label, [float(stats[c][idx]) for c in columns]))
    width = max(10, max(len(label) for label, _ in rows))
    print()
    print(f"{'':>{width}}" + "".join(f" {c:>9}" for c in columns))
    for label, values in rows:
        print(f"{label:>{width}}" + "".join(f" {v:>9.2f}" for v in values))
    if log_evidence is not None:
        k = getattr(log_evidence, "pareto_k", math.nan)
        unreliable = f" (unreliable: k={k:.2f})" if k > PARETO_K_UNRELIABLE else ""
        dropped = getattr(log_evidence, "num_dropped", 0)
        print(
            f"\nlog Z = {float(log_evidence.log_z):.4f} +- {float(log_evidence.stderr):.4f}{unreliable}"
            f"  (lower bound {float(log_evidence.lower_bound):.4f}),"
            f"  ESS = {float(log_evidence.ess):.3f}"
            + (f", {dropped} non-finite paths dropped" if dropped else "")
        )
    print()


# --------------------------------------------------------------------------------------------------
# ArviZ (in its own module, which builds on the functions above)
# --------------------------------------------------------------------------------------------------

from ._arviz import to_inference_data  # noqa: E402
