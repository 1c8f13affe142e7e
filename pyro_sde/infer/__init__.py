"""Inference algorithms: learned diffusion samplers, tempered SMC and diffusion-bridge importance sampling."""

from . import annealing, bridge, kernels
from .bridge import AmortisedBridge, LearnedBridge, bridge_log_weights
from .chains import Chains
from .diffusion import DiffusionSampler, StepInfo
from .map import lbfgs_map
from .potential import LogDensityPotential, ModelPotential, Potential
from .precondition import Preconditioner, WhitenedPotential, fit_preconditioner, widen_to_draws
from .scld import SCLDInfo, SCLDSampler
from .smc import SMCInfo, SMCSampler, SMCState

__all__ = [
    "AmortisedBridge",
    "Chains",
    "DiffusionSampler",
    "LearnedBridge",
    "LogDensityPotential",
    "ModelPotential",
    "Potential",
    "Preconditioner",
    "SCLDInfo",
    "SCLDSampler",
    "SMCInfo",
    "SMCSampler",
    "SMCState",
    "StepInfo",
    "WhitenedPotential",
    "annealing",
    "bridge",
    "bridge_log_weights",
    "fit_preconditioner",
    "kernels",
    "lbfgs_map",
    "widen_to_draws",
]
