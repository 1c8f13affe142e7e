"""Inference algorithms."""

from .diffusion import DiffusionSampler, StepInfo
from .potential import LogDensityPotential, ModelPotential, Potential

__all__ = ["DiffusionSampler", "LogDensityPotential", "ModelPotential", "Potential", "StepInfo"]
