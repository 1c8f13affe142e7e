"""Inference algorithms: learned diffusion samplers and diffusion-bridge importance sampling."""

from . import bridge
from .bridge import LearnedBridge, bridge_log_weights
from .diffusion import DiffusionSampler, StepInfo
from .map import lbfgs_map
from .potential import LogDensityPotential, ModelPotential, Potential
from .precondition import Preconditioner, WhitenedPotential, fit_preconditioner

__all__ = [
    "DiffusionSampler",
    "LearnedBridge",
    "LogDensityPotential",
    "ModelPotential",
    "Potential",
    "Preconditioner",
    "StepInfo",
    "WhitenedPotential",
    "bridge",
    "bridge_log_weights",
    "fit_preconditioner",
    "lbfgs_map",
]
