"""Score-matching losses: denoising (DSM), sliced (SSM) and generalised sliced (GSSM).

All take a score model ``score_fn`` (``(N, d) -> (N, d)``, any extra arguments bound by the caller)
and samples ``x`` of the data distribution ``p``; each returns the mean loss, or per-sample losses with
``reduction="none"`` (for gradient-variance studies). Up to constants independent of the model:

* SSM (Song et al. 2019): ``E_p E_v[v^T grad_x(v^T s) + (v^T s)^2 / 2]`` = half the Fisher divergence
  ``E_p |s - grad log p|^2 / 2``; ``variance_reduced`` replaces ``(v^T s)^2`` by ``|s|^2``.
* GSSM: SSM of the pushforward ``q = phi_# p`` in ``y = phi(x)``, with the model's y-score from the
  CoV ``s_y = J^{-T}(s - grad log|det J|)``: ``E_p E_v[w^T grad_x(v^T s_y) + (v^T s_y)^2 / 2]``,
  ``w = J^{-1} v`` (the projection directions ``w(x)`` follow ``phi``). It is half the y-space Fisher
  divergence ``E_p |J^{-T}(s - grad log p)|^2 / 2`` and reduces to SSM with directions ``A^{-1} v``
  for a linear ``phi(x) = A x``. Same minimiser as SSM (``s = grad log p``), another weighting.
* DSM (Vincent 2011): ``E |sigma s(x_t) + eps|^2`` with ``x_t = a x_0 + sigma eps``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributions.transforms import Transform

from .transform import _chart, _check_shape_change, _inverse_chart, _uncached, pushforward_score

__all__ = ["denoising_score_matching", "sliced_score_matching", "generalized_sliced_score_matching"]


def _check_samples(x):
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.dtype.is_floating_point:
        raise ValueError(f"x must be a floating tensor of shape (N, d), got {getattr(x, 'shape', x)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"x contains {'NaN' if torch.isnan(x).any() else 'inf'}")


def _reduce(loss, reduction):
    if reduction == "mean":
        return loss.mean()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def _slices(num_slices, shape, like, slice_dist, slices):
    """Projection vectors ``(M, N, d)`` with ``E v v^T = I``."""
    if slices is not None:
        if slices.dim() != 3 or slices.shape[1:] != shape:
            raise ValueError(f"slices must have shape (M, {shape[0]}, {shape[1]}), got {tuple(slices.shape)}")
        return slices.to(like)
    if not isinstance(num_slices, int) or num_slices < 1:
        raise ValueError(f"num_slices must be a positive int, got {num_slices!r}")
    v = torch.randn((num_slices,) + tuple(shape), dtype=like.dtype, device=like.device)
    if slice_dist == "rademacher":
        return v.sign()
    if slice_dist != "gaussian":
        raise ValueError(f"slice_dist must be 'gaussian' or 'rademacher', got {slice_dist!r}")
    return v


def _sliced(score_y_fn, y, v, variance_reduced):
    """Per-sample ``mean_v [v^T grad_y(v^T s) + (v^T s)^2 / 2]`` (or ``|s|^2 / 2``), ``s = score_y_fn(y)``.

    ``y`` (N, d) is repeated over the ``M`` slices so one backward pass gives every ``grad_y(v^T s)``.
    """
    M, N, d = v.shape
    with torch.enable_grad():
        yr = y.detach().repeat(M, 1).requires_grad_()
        vf = v.reshape(M * N, d)
        s = score_y_fn(yr)
        sv = (s * vf).sum(-1)
        (grad_sv,) = torch.autograd.grad(sv.sum(), yr, create_graph=True)
        loss = (grad_sv * vf).sum(-1)
        loss = loss + (0.5 * (s * s).sum(-1) if variance_reduced else 0.5 * sv * sv)
    return loss.reshape(M, N).mean(0)


def sliced_score_matching(
    score_fn: Callable,
    x: torch.Tensor,
    *,
    num_slices: int = 1,
    variance_reduced: bool = False,
    slice_dist: str = "gaussian",
    slices: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Sliced score matching ``E_p E_v[v^T grad_x(v^T s(x)) + (v^T s(x))^2 / 2]``.

    :param score_fn: the model score ``(N, d) -> (N, d)`` (differentiable in ``x`` and its parameters).
    :param x: data ``(N, d)``.
    :param num_slices: projections per sample (``M``).
    :param variance_reduced: SSM-VR, ``|s|^2 / 2`` in place of ``(v^T s)^2 / 2`` (Gaussian slices).
    :param slice_dist: ``"gaussian"`` or ``"rademacher"``.
    :param slices: explicit projections ``(M, N, d)`` with ``E v v^T = I`` (overrides the above).
    :param reduction: ``"mean"`` (scalar) or ``"none"`` (``(N,)``).
    """
    _check_samples(x)
    v = _slices(num_slices, x.shape, x, slice_dist, slices)
    return _reduce(_sliced(score_fn, x, v, variance_reduced), reduction)


def generalized_sliced_score_matching(
    score_fn: Callable,
    x: torch.Tensor,
    transform: Transform,
    *,
    num_slices: int = 1,
    variance_reduced: bool = False,
    slice_dist: str = "gaussian",
    slices: torch.Tensor | None = None,
    method: str = "auto",
    reduction: str = "mean",
) -> torch.Tensor:
    """Generalised sliced score matching through the smooth bijection ``phi = transform``.

    ``E_p E_v[w^T grad_x(v^T s_y) + (v^T s_y)^2 / 2]``, ``s_y = J^{-T}(s - grad log|det J|)``,
    ``w = J^{-1} v``: sliced score matching of ``phi_# p`` in ``y`` with the x-space model's score
    carried over by the CoV (evaluated as SSM in the chart coordinates of ``y``).

    :param transform: ``phi`` (any transform supported by
        :func:`~pyro_sde.scores.pushforward_score`; simplex-valued maps use the first-``d`` chart).
    :param method: the CoV path (see :func:`~pyro_sde.scores.pushforward_score`).
    Other options as :func:`sliced_score_matching`; ``slices`` live in ``y`` (chart) coordinates.
    """
    _check_samples(x)
    if not isinstance(transform, Transform):
        raise TypeError(f"transform must be a torch.distributions Transform, got {type(transform).__name__}")
    transform = _uncached(transform)
    simplex = _check_shape_change(transform, x.shape)
    with torch.no_grad():
        y = _chart(transform, simplex)(x)
    v = _slices(num_slices, y.shape, y, slice_dist, slices)

    def score_y_fn(yc):
        xb = _inverse_chart(transform, yc, simplex)
        return pushforward_score(
            transform, xb, score_fn(xb), method=method, create_graph=True, validate=False
        )[1]

    return _reduce(_sliced(score_y_fn, y, v, variance_reduced), reduction)


def denoising_score_matching(
    score_fn: Callable,
    x0: torch.Tensor,
    t: torch.Tensor,
    mean_scale: torch.Tensor,
    std: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Denoising score matching ``E |sigma_t s(t, x_t) + eps|^2``, ``x_t = a_t x_0 + sigma_t eps``.

    The ``sigma_t^2``-weighted DSM loss: its minimiser is the score of the noised marginal
    ``grad log p_t``. For the VP process take ``(a_t, sigma_t) = VPSDE.marginal(t)``.

    :param score_fn: ``(t, x_t) -> (N, d)`` with ``t`` of shape ``(N,)``.
    :param x0: clean data ``(N, d)``; ``t``: times ``(N,)``; ``mean_scale``, ``std``: ``a_t``,
        ``sigma_t`` of shape ``(N,)`` (or scalars).
    :param noise: optional ``eps`` ``(N, d)``.
    """
    _check_samples(x0)
    a = torch.as_tensor(mean_scale, dtype=x0.dtype, device=x0.device)
    sigma = torch.as_tensor(std, dtype=x0.dtype, device=x0.device)
    a = a.unsqueeze(-1) if a.dim() == 1 else a
    sigma = sigma.unsqueeze(-1) if sigma.dim() == 1 else sigma
    if bool((sigma <= 0).any()):
        raise ValueError("std must be positive")
    eps = torch.randn_like(x0) if noise is None else noise
    if eps.shape != x0.shape:
        raise ValueError(f"noise must have shape {tuple(x0.shape)}, got {tuple(eps.shape)}")
    xt = a * x0 + sigma * eps
    loss = ((sigma * score_fn(t, xt) + eps) ** 2).sum(-1)
    return _reduce(loss, reduction)
