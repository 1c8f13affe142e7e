"""Density-ratio estimation: ``log r(x) = log p_num(x) - log p_den(x)`` from samples.

Estimators share one interface (:class:`RatioEstimator`: ``fit``, ``log_ratio(x, num_steps)``, ``losses``,
``save``/``load``): the logistic :class:`ClassifierRatioEstimator`, telescoping
:class:`TelescopingRatioEstimator` (TRE), the time-score :class:`TangentRatioEstimator` (DRE-infinity /
CTSM, quadrature) and :class:`SecantRatioEstimator` (ISA-DRE, Secant Alignment Identity, any-step).
:func:`mutual_information` estimates MI with a bootstrap error; :class:`RatioTilted` and
:class:`RatioLikelihood` bring ratios into Pyro models; simulation-based inference (likelihood from
simulations, :class:`RatioPosterior`) lives in :mod:`.sbi`, its calibration diagnostics in
:mod:`.calibration`. :class:`FlowGuidedGenerator` (FDRL) is a generative
model driven by a learned ratio; :class:`FDRLDistribution` makes it a Pyro sample site.
"""

from ..nn.ratio_networks import MLP, QuadraticTimeScore, SBIRatioNetwork, TimeScoreNetwork
from .base import RatioEstimator, check_samples
from .calibration import (
    CoverageResult,
    SBCResult,
    expected_coverage,
    plot_coverage,
    plot_sbc_ranks,
    posterior_predictive_pvalues,
    sbc_ranks,
    simulation_based_calibration,
    tarp_coverage,
)
from .classifier import ClassifierRatioEstimator, ContrastiveRatioEstimator, contrastive_ratio_loss
from .fdrl import FlowGuidedGenerator, energy_distance, fit_gaussian
from .fdrl_distribution import FDRLDistribution
from .mutual_information import MutualInformation, mutual_information
from .paths import (
    CosinePath,
    DREInfinityPath,
    GaussianPath,
    InterpolationPath,
    LinearPath,
    TrigonometricPath,
    VPPath,
    get_path,
)
from .pyro import RatioTilted
from .sbi import ESTIMATORS, RatioLikelihood, RatioPosterior, make_sbi_estimator
from .secant import SecantRatioEstimator, sai_target
from .tangent import TangentRatioEstimator, gauss_legendre
from .telescoping import TelescopingRatioEstimator

__all__ = [
    "ClassifierRatioEstimator",
    "ContrastiveRatioEstimator",
    "CoverageResult",
    "ESTIMATORS",
    "CosinePath",
    "DREInfinityPath",
    "FDRLDistribution",
    "FlowGuidedGenerator",
    "GaussianPath",
    "InterpolationPath",
    "LinearPath",
    "MLP",
    "MutualInformation",
    "QuadraticTimeScore",
    "RatioEstimator",
    "RatioLikelihood",
    "RatioPosterior",
    "RatioTilted",
    "SBCResult",
    "SBIRatioNetwork",
    "SecantRatioEstimator",
    "TangentRatioEstimator",
    "TelescopingRatioEstimator",
    "TimeScoreNetwork",
    "TrigonometricPath",
    "VPPath",
    "check_samples",
    "contrastive_ratio_loss",
    "energy_distance",
    "expected_coverage",
    "fit_gaussian",
    "gauss_legendre",
    "get_path",
    "make_sbi_estimator",
    "mutual_information",
    "plot_coverage",
    "plot_sbc_ranks",
    "posterior_predictive_pvalues",
    "sai_target",
    "sbc_ranks",
    "simulation_based_calibration",
    "tarp_coverage",
]
