"""Density-ratio estimation: ``log r(x) = log p_num(x) - log p_den(x)`` from samples.

Estimators share one interface (:class:`RatioEstimator`: ``fit``, ``log_ratio(x, num_steps)``, ``losses``,
``save``/``load``): the logistic :class:`ClassifierRatioEstimator`, telescoping
:class:`TelescopingRatioEstimator` (TRE), the time-score :class:`TangentRatioEstimator` (DRE-infinity /
CTSM, quadrature) and :class:`SecantRatioEstimator` (ISA-DRE, Secant Alignment Identity, any-step).
:func:`mutual_information` estimates MI with a bootstrap error; :class:`RatioTilted` and
:class:`RatioLikelihood` bring ratios into Pyro models. :class:`FlowGuidedGenerator` (FDRL) is a generative
model driven by a learned ratio; :class:`FDRLDistribution` makes it a Pyro sample site.
"""

from .base import MLP, QuadraticTimeScore, RatioEstimator, TimeScoreNetwork, check_samples
from .classifier import ClassifierRatioEstimator
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
from .pyro import RatioLikelihood, RatioTilted
from .secant import SecantRatioEstimator, sai_target
from .tangent import TangentRatioEstimator, gauss_legendre
from .telescoping import TelescopingRatioEstimator

__all__ = [
    "ClassifierRatioEstimator",
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
    "RatioTilted",
    "SecantRatioEstimator",
    "TangentRatioEstimator",
    "TelescopingRatioEstimator",
    "TimeScoreNetwork",
    "TrigonometricPath",
    "VPPath",
    "check_samples",
    "energy_distance",
    "fit_gaussian",
    "gauss_legendre",
    "get_path",
    "mutual_information",
    "sai_target",
]
