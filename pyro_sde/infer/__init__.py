"""Inference algorithms: learned diffusion samplers and diffusion-bridge importance sampling."""

from . import bridge
from .bridge import LearnedBridge, bridge_log_weights
from .diffusion import DiffusionSampler, StepInfo
from .map import lbfgs_map
from .potential import LogDensityPotential, ModelPotential, Potential

__all__ = [
    "DiffusionSampler",
    "LearnedBridge",
    "LogDensityPotential",
    "ModelPotential",
    "Potential",
    "StepInfo",
    "bridge",
    "bridge_log_weights",
    "lbfgs_map",
]
