"""Classical bridge proposals (euler / forward / mdb / guided / guided_euler), re-exported from
:mod:`pyro_sde.sde.bridges`, where they live so that :class:`~pyro_sde.sde.DiscretelyObservedSDE`
imports downwards only (``sde`` never imports ``infer``)."""

from ...sde.bridges import (
    PROPOSALS,
    SUBSTEP_GRIDS,
    bridge_log_prob,
    bridge_log_weights,
    check_noise,
    coarsen_noise,
    guided_moments,
    substep_fractions,
)

__all__ = [
    "PROPOSALS",
    "SUBSTEP_GRIDS",
    "bridge_log_prob",
    "bridge_log_weights",
    "check_noise",
    "coarsen_noise",
    "guided_moments",
    "substep_fractions",
]
