"""Learned diffusion samplers (PIS / DIS) with reverse-KL and log-variance path-space losses."""

from .losses import kl_loss, log_variance_loss
from .sampler import DiffusionSampler, StepInfo

__all__ = ["DiffusionSampler", "StepInfo", "kl_loss", "log_variance_loss"]
