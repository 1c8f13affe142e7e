"""Scores through bijections, the reverse-time Ito lemma, and score-matching losses.

* :mod:`~pyro_sde.scores.transform`: the score change of variables (:func:`transform_score`,
  :func:`pushforward_score`, :func:`pullback_score`), :class:`AdditiveLogisticTransform`, and
  :func:`constrained_score` for the constrained sites of Pyro models;
* :mod:`~pyro_sde.scores.reverse`: :class:`TransformedReverseSDE`, a diffusion whose score is known in
  ``x`` reversed in ``y = phi(x)`` (e.g. on the probability simplex);
* :mod:`~pyro_sde.scores.matching`: denoising, sliced and generalised sliced score matching.
"""

from .matching import (
    denoising_score_matching,
    generalized_sliced_score_matching,
    sliced_score_matching,
)
from .reverse import VPSDE, LangevinSDE, TransformedReverseSDE
from .transform import (
    AdditiveLogisticTransform,
    TransformedScore,
    constrained_score,
    log_abs_det_jacobian_grad,
    pullback_score,
    pushforward_score,
    transform_score,
)

__all__ = [
    "AdditiveLogisticTransform",
    "LangevinSDE",
    "TransformedReverseSDE",
    "TransformedScore",
    "VPSDE",
    "constrained_score",
    "denoising_score_matching",
    "generalized_sliced_score_matching",
    "log_abs_det_jacobian_grad",
    "pullback_score",
    "pushforward_score",
    "sliced_score_matching",
    "transform_score",
]
