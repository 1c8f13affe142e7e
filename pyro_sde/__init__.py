"""pyro_sde: SDE-based inference for Pyro.

Learned diffusion samplers with importance weights and evidence estimates, and bridge importance
sampling for discretely observed SDEs (:mod:`pyro_sde.infer`); the integrator, reference processes,
SDE models and path distributions (:mod:`pyro_sde.sde`); diagnostics and ArviZ conversion
(:mod:`pyro_sde.diagnostics`); density-ratio estimators, mutual information and the FDRL generator
(:mod:`pyro_sde.ratio`); score change of variables (:mod:`pyro_sde.scores`); benchmark targets with
exact log Z (:mod:`pyro_sde.targets`).
"""

from . import diagnostics, infer, nn, ratio, scores, sde, targets
from .diagnostics import effective_sample_size, log_evidence, psis, to_inference_data
from .infer import Chains, DiffusionSampler, SCLDSampler, SMCSampler

__version__ = "0.1.0"

__all__ = [
    "Chains",
    "DiffusionSampler",
    "SCLDSampler",
    "SMCSampler",
    "diagnostics",
    "effective_sample_size",
    "infer",
    "log_evidence",
    "nn",
    "psis",
    "ratio",
    "scores",
    "sde",
    "targets",
    "to_inference_data",
]
