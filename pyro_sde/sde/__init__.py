"""SDE objects, reference processes and the integrator."""

from .integrate import (
    PathSample,
    euler_maruyama,
    euler_maruyama_step,
    log_ratio_increment,
    path_log_prob,
    path_log_ratio,
    torchsde_euler,
)
from .reference import BrownianReference, OUReference, ReferenceProcess, StepCoefficients, VPReference

__all__ = [
    "BrownianReference",
    "OUReference",
    "PathSample",
    "ReferenceProcess",
    "StepCoefficients",
    "VPReference",
    "euler_maruyama",
    "euler_maruyama_step",
    "log_ratio_increment",
    "path_log_prob",
    "path_log_ratio",
    "torchsde_euler",
]
