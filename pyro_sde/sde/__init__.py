"""SDE objects, reference processes, the integrator and bridge proposals."""

from .bridges import PROPOSALS, SUBSTEP_GRIDS, bridge_log_prob, bridge_log_weights
from .distributions import DiscretelyObservedSDE, EulerMaruyama, SDEPath
from .integrate import (
    PathSample,
    euler_maruyama,
    euler_maruyama_step,
    log_ratio_increment,
    log_ratio_surrogate,
    path_log_prob,
    path_log_ratio,
    torchsde_euler,
)
from .models import (
    CIR,
    SDE,
    DiffusionFactor,
    GeometricBrownianMotion,
    KunitaFlow,
    LandmarkBrownian,
    LinearAuxiliary,
    OrnsteinUhlenbeck,
    StochasticLotkaVolterra,
    TorchsdeModel,
    gaussian_kernel,
    linear_sde_moments,
)
from .reference import BrownianReference, OUReference, ReferenceProcess, StepCoefficients, VPReference

__all__ = [
    "PROPOSALS",
    "SUBSTEP_GRIDS",
    "bridge_log_prob",
    "bridge_log_weights",
    "CIR",
    "SDE",
    "DiffusionFactor",
    "DiscretelyObservedSDE",
    "EulerMaruyama",
    "GeometricBrownianMotion",
    "KunitaFlow",
    "LandmarkBrownian",
    "LinearAuxiliary",
    "OrnsteinUhlenbeck",
    "SDEPath",
    "StochasticLotkaVolterra",
    "TorchsdeModel",
    "gaussian_kernel",
    "linear_sde_moments",
    "BrownianReference",
    "OUReference",
    "PathSample",
    "ReferenceProcess",
    "StepCoefficients",
    "VPReference",
    "euler_maruyama",
    "euler_maruyama_step",
    "log_ratio_increment",
    "log_ratio_surrogate",
    "path_log_prob",
    "path_log_ratio",
    "torchsde_euler",
]
