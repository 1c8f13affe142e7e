"""Diffusion-bridge importance sampling for discretely observed SDEs (seed 002).

:func:`bridge_log_weights` / :func:`bridge_log_prob` (euler / forward / mdb / guided / guided_euler
proposals, from :mod:`pyro_sde.sde.bridges`), :class:`LearnedBridge` (score
matching with the inversion-free objective, at one parameter value) and :class:`AmortisedBridge` (the
same, conditioned on the SDE parameters: one fit for a whole inference run) give importance weights
whose log-mean-exp estimates the transition log-density;
:class:`~pyro_sde.sde.distributions.DiscretelyObservedSDE` wraps them as a Pyro distribution.
"""

from .amortised import AmortisedBridge
from .learned import LearnedBridge, ScoreNetwork, stable_score_loss
from .proposals import PROPOSALS, SUBSTEP_GRIDS, bridge_log_prob, bridge_log_weights, guided_moments

__all__ = [
    "AmortisedBridge",
    "PROPOSALS",
    "SUBSTEP_GRIDS",
    "LearnedBridge",
    "ScoreNetwork",
    "bridge_log_prob",
    "bridge_log_weights",
    "guided_moments",
    "stable_score_loss",
]
