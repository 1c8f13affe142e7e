"""A trained FDRL generator as a Pyro distribution: ``pyro.sample("x", FDRLDistribution(gen))``.

FDRL is an implicit model: samples come from the ratio-driven flow, but its density is not available
(``log r = log q_tilde - log p`` needs the unknown ``q_tilde``), so :meth:`FDRLDistribution.log_prob`
raises :class:`NotImplementedError`. Use it as a latent (unobserved) site, in ``Predictive``, or as a
simulator for likelihood-free inference (e.g. :class:`~pyro_sde.ratio.RatioLikelihood`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints

from .fdrl import FlowGuidedGenerator

__all__ = ["FDRLDistribution"]


class FDRLDistribution(TorchDistribution):
    """Samples of a fitted :class:`FlowGuidedGenerator`, optionally class-conditional.

    ``event_shape = (d,)``; ``batch_shape = label.shape`` for a tensor ``label`` (one class per batch
    element), else ``()``. Class-conditional sampling composes the unconditional ratio with a classifier,
    ``r(x | y) = r(x) / (C p(y | x))`` (FDRL Eq. 12).

    :param FlowGuidedGenerator generator: fitted.
    :param int num_steps: flow steps (default ``K + kappa``). :param float step_size: ``eta``.
    :param float noise_std: ``nu``.
    :param classifier: ``x (N, d) -> (N, C)`` logits or log-probabilities, for class-conditional draws.
    :param label: class index (int) or long tensor of class indices (its shape is the batch shape).
    :param float guidance_scale: weight of ``log p(y | x)`` (1: the exact composition).
    """

    arg_constraints = {}
    support = constraints.real_vector
    has_rsample = False

    def __init__(self, generator: FlowGuidedGenerator, *, num_steps: int | None = None,
                 step_size: float | None = None, noise_std: float | None = None,
                 classifier: Callable | None = None, label: int | torch.Tensor | None = None,
                 guidance_scale: float = 1.0, validate_args: bool | None = None):
        if not isinstance(generator, FlowGuidedGenerator):
            raise TypeError(f"generator must be a FlowGuidedGenerator, got {type(generator).__name__}")
        if not generator.is_fitted:
            raise ValueError("the generator must be fitted first")
        generator._check_flow_options(num_steps, step_size, noise_std)
        if (classifier is None) != (label is None):
            raise ValueError("class-conditional sampling needs both classifier and label")
        if label is not None:
            label = torch.as_tensor(label, device=generator.shift.device)
            if label.is_floating_point() or label.dtype == torch.bool or label.is_complex():
                raise TypeError(f"label must hold integer class indices, got dtype {label.dtype}")
            if bool((label < 0).any()):
                raise ValueError("label must be non-negative")
            label = label.long()
        self.generator, self.classifier, self.label = generator, classifier, label
        self.num_steps, self.step_size, self.noise_std = num_steps, step_size, noise_std
        self.guidance_scale = float(guidance_scale)
        batch_shape = torch.Size() if label is None else label.shape
        super().__init__(batch_shape, torch.Size([generator.dim]), validate_args=validate_args)

    def expand(
        self, batch_shape: torch.Size | tuple[int, ...], _instance: FDRLDistribution | None = None
    ) -> FDRLDistribution:
        new = self._get_checked_instance(FDRLDistribution, _instance)
        batch_shape = torch.Size(batch_shape)
        for k in ("generator", "classifier", "num_steps", "step_size", "noise_std", "guidance_scale"):
            setattr(new, k, getattr(self, k))
        new.label = None if self.label is None else self.label.expand(batch_shape)
        super(FDRLDistribution, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        """Flow draws of shape ``sample_shape + batch_shape + (d,)``."""
        shape = self._extended_shape(torch.Size(sample_shape))
        n = int(torch.Size(shape[:-1]).numel())
        if n == 0:
            return self.generator.shift.new_zeros(shape)
        label = None
        if self.label is not None:
            label = self.label.expand(shape[:-1]).reshape(-1)
        x = self.generator.sample(n, num_steps=self.num_steps, step_size=self.step_size,
                                  noise_std=self.noise_std, classifier=self.classifier, label=label,
                                  guidance_scale=self.guidance_scale)
        return x.reshape(shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "FDRLDistribution is an implicit model: it can be sampled (via the flow) but has no tractable "
            "log_prob. Use it as an unobserved pyro.sample site or as a simulator (e.g. RatioLikelihood); "
            "do not observe it or score it under SVI/MCMC.")

    def __repr__(self):
        return f"{type(self).__name__}(dim={self.generator.dim}, batch_shape={tuple(self.batch_shape)})"
