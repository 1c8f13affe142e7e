"""Scores through bijections: the score change of variables (CoV) and its pull-back.

For a smooth bijection ``y = phi(x)`` and ``q = phi_# p`` (``q(y) = p(x) |det J(x)|^{-1}``)::

    grad_y log q(y) = J(x)^{-T} [grad_x log p(x) - grad_x log|det J(x)|],    J = d phi / d x.

``transform`` is any :class:`torch.distributions.transforms.Transform` (Pyro's ``biject_to``
transforms and :class:`~torch.distributions.transforms.ComposeTransform` included). Paths, chosen per
part of a composed transform by ``method="auto"``:

* ``"elementwise"``: diagonal ``J``; ``phi'`` and ``grad log|phi'|`` by two batched backward passes;
* closed forms for :class:`AdditiveLogisticTransform` (``J^{-1} = diag(1/y) + 1 1^T / y_{d+1}``);
* ``"triangular"``: ``J`` by forward-mode autodiff, ``grad log|det J|`` from the transform's own
  ``log_abs_det_jacobian``, a triangular solve (e.g. ``StickBreakingTransform``, lower-triangular);
* ``"inverse"``: ``J^{-T} v = (d phi^{-1}/dy)^T v`` as one vector-Jacobian product through the inverse
  (``O(d)``; the ``auto`` choice for ``StickBreakingTransform``);
* ``"jacobian"`` (general fallback): ``J`` by forward-mode autodiff, ``log|det J|`` by ``slogdet`` and
  its gradient by autodiff (trusts nothing but ``phi`` itself), a dense solve.

Simplex-valued transforms (``R^d -> Delta^d``, output ``(..., d+1)``) use the chart of the first ``d``
coordinates (the density convention of :class:`~torch.distributions.Dirichlet` and of
``StickBreakingTransform.log_abs_det_jacobian``): their scores have shape ``(..., d)``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributions import constraints
from torch.distributions.transforms import (
    AffineTransform,
    ComposeTransform,
    IndependentTransform,
    StickBreakingTransform,
    Transform,
)

__all__ = [
    "AdditiveLogisticTransform",
    "TransformedScore",
    "constrained_score",
    "log_abs_det_jacobian_grad",
    "pullback_score",
    "pushforward_score",
    "transform_score",
]

METHODS = ("auto", "elementwise", "triangular", "inverse", "jacobian")


class AdditiveLogisticTransform(Transform):
    """The additive-logistic map ``R^d -> Delta^d``: ``y_i = e^{x_i} / (1 + sum_j e^{x_j})`` (i <= d),
    ``y_{d+1} = 1 / (1 + sum_j e^{x_j})``; inverse ``x_i = log(y_i / y_{d+1})``.

    Chart Jacobian ``J = diag(y) - y y^T`` (``y = y_{1:d}``), ``log|det J| = sum_{i<=d+1} log y_i``.
    Unlike torch's ``StickBreakingTransform`` (also ``R^d -> Delta^d``, lower-triangular ``J``), its
    Jacobian is symmetric with the closed-form inverse ``J^{-1} = diag(1/y) + 1 1^T / y_{d+1}``.
    """

    domain = constraints.real_vector
    codomain = constraints.simplex
    bijective = True

    def __eq__(self, other):
        return isinstance(other, AdditiveLogisticTransform)

    def _call(self, x):
        return torch.softmax(F.pad(x, (0, 1)), dim=-1)

    def _inverse(self, y):
        return y[..., :-1].log() - y[..., -1:].log()

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(F.pad(x, (0, 1)), dim=-1).sum(-1)

    def forward_shape(self, shape: torch.Size | tuple[int, ...]) -> torch.Size | tuple[int, ...]:
        if len(shape) < 1:
            raise ValueError("too few dimensions on input")
        return shape[:-1] + (shape[-1] + 1,)

    def inverse_shape(self, shape: torch.Size | tuple[int, ...]) -> torch.Size | tuple[int, ...]:
        if len(shape) < 1:
            raise ValueError("too few dimensions on input")
        return shape[:-1] + (shape[-1] - 1,)

    # -- closed forms in terms of y = phi(x) (codomain point (..., d+1); chart y_{1:d}) -------------
    @staticmethod
    def jacobian(y: torch.Tensor) -> torch.Tensor:
        """``J = diag(y_{1:d}) - y_{1:d} y_{1:d}^T``, shape ``(..., d, d)``."""
        yc = y[..., :-1]
        return torch.diag_embed(yc) - yc.unsqueeze(-1) * yc.unsqueeze(-2)

    @staticmethod
    def jvp(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``J v = y * v - y (y . v)`` (chart ``y``)."""
        yc = y[..., :-1]
        return yc * v - yc * (yc * v).sum(-1, keepdim=True)

    @staticmethod
    def ladj_grad(y: torch.Tensor) -> torch.Tensor:
        """``grad_x sum_{i<=d+1} log y_i = 1 - (d + 1) y_{1:d}``."""
        return 1 - y.shape[-1] * y[..., :-1]

    @staticmethod
    def inverse_jacobian_transpose_vp(y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``J^{-T} v = v / y_{1:d} + (sum v) / y_{d+1}`` (``J`` is symmetric)."""
        return v / y[..., :-1] + v.sum(-1, keepdim=True) / y[..., -1:]

    @staticmethod
    def weighted_laplacian(y: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
        """``L_i = sum_j g2_j d^2 y_i / dx_j^2 = g2_i y_i (1 - 2 y_i) + y_i sum_j g2_j y_j (2 y_j - 1)``."""
        yc = y[..., :-1]
        g2 = g2.expand_as(yc)
        return g2 * yc * (1 - 2 * yc) + yc * (g2 * yc * (2 * yc - 1)).sum(-1, keepdim=True)


def _uncached(t: Transform) -> Transform:
    """``t`` without its ``(x, y)`` cache: a cached ``t(x)`` would return a stored ``y`` that is not a
    function of ``x`` in the autograd graph (and the CoV differentiates ``t`` at ``x``)."""
    if isinstance(t, ComposeTransform):
        return ComposeTransform([_uncached(p) for p in t.parts])
    if getattr(t, "_cache_size", 0) == 0:
        return t
    try:
        return t.with_cache(0)
    except NotImplementedError:
        c = copy.copy(t)
        c._cache_size = 0
        return c


# -- structure of a transform -----------------------------------------------------------------------
def _is_elementwise(t: Transform) -> bool:
    if isinstance(t, IndependentTransform):
        return _is_elementwise(t.base_transform)
    if isinstance(t, AffineTransform):
        return True
    if isinstance(t, ComposeTransform):
        return all(_is_elementwise(p) for p in t.parts)
    return t.domain.event_dim == 0 and t.codomain.event_dim == 0 and t.bijective


def _changes_shape(t: Transform, x_shape) -> bool:
    return tuple(t.forward_shape(x_shape)) != tuple(x_shape)


def _check_shape_change(t: Transform, x_shape):
    """Only ``R^d -> simplex`` (output ``d + 1`` coordinates, first-``d`` chart) may change shape."""
    if not _changes_shape(t, x_shape):
        return False
    out = tuple(t.forward_shape(x_shape))
    if out[:-1] == tuple(x_shape[:-1]) and out[-1] == x_shape[-1] + 1 and t.codomain.event_dim == 1:
        return True
    raise NotImplementedError(
        f"{type(t).__name__} maps shape {tuple(x_shape)} to {out}; only same-shape bijections and "
        "R^d -> simplex maps (d + 1 outputs, chart of the first d) are supported"
    )


def _chart(t: Transform, simplex: bool) -> Callable:
    return (lambda x: t(x)[..., :-1]) if simplex else t


def _inverse_chart(t: Transform, yc: torch.Tensor, simplex: bool) -> torch.Tensor:
    if simplex:
        yc = torch.cat([yc, 1 - yc.sum(-1, keepdim=True)], dim=-1)
    return t.inv(yc)


def _grad_input(x: torch.Tensor, create_graph: bool) -> torch.Tensor:
    if create_graph and x.requires_grad:
        return x
    return x.detach().requires_grad_()


def _grad(out: torch.Tensor, x: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """``d out.sum() / dx`` (zeros where ``out`` does not depend on ``x``)."""
    if not out.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=create_graph, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def _flat_jacobian(fn: Callable, x: torch.Tensor) -> torch.Tensor:
    """``d fn / dx`` for ``x`` of shape ``(..., d)``: ``(..., d, d)``, by batched forward-mode autodiff."""
    d = x.shape[-1]
    J = torch.func.vmap(torch.func.jacfwd(fn))(x.reshape(-1, d))
    return J.reshape(x.shape[:-1] + J.shape[-2:])


def log_abs_det_jacobian_grad(
    transform: Transform, x: torch.Tensor, *, create_graph: bool = False
) -> torch.Tensor:
    """``grad_x log|det J(x)|`` from ``transform.log_abs_det_jacobian``, shape of ``x``.

    One batched backward pass (samples are independent, so the gradient of the summed log-det is the
    per-sample gradient). Zeros for transforms with constant Jacobian.
    """
    _check_tensor(x, "x")
    transform = _uncached(transform)
    with torch.enable_grad():
        xr = _grad_input(x, create_graph)
        ladj = transform.log_abs_det_jacobian(xr, transform(xr))
        return _grad(ladj, xr, create_graph)


# -- one part ---------------------------------------------------------------------------------------
def _auto_method(t: Transform, simplex: bool) -> str:
    if isinstance(t, AdditiveLogisticTransform):
        return "closed"
    if _is_elementwise(t) and not simplex:
        return "elementwise"
    if isinstance(t, StickBreakingTransform):
        return "inverse"  # one VJP; measured faster than the triangular solve (forward-mode J)
    return "jacobian"


def _pushforward_part(t, x, score_x, method, create_graph):
    """``(y, score_y)`` through one transform, ``y`` in full codomain coordinates."""
    simplex = _check_shape_change(t, x.shape)
    if x.dim() == 0 or (simplex and x.dim() < 1):
        raise ValueError("x must have at least one dimension")
    if method == "auto":
        method = _auto_method(t, simplex)
    with torch.enable_grad():
        xr = _grad_input(x, create_graph)
        if method == "closed":
            y = t(xr)
            score_y = t.inverse_jacobian_transpose_vp(y, score_x - t.ladj_grad(y))
        elif method == "elementwise":
            if simplex:
                raise ValueError(f"{type(t).__name__} is not elementwise")
            y = t(xr)
            dydx = _grad(y, xr, create_graph=True)  # phi'(x), elementwise
            gl = _grad(t.log_abs_det_jacobian(xr, y), xr, create_graph)
            score_y = (score_x - gl) / dydx
        elif method in ("triangular", "jacobian"):
            if x.dim() < 1:
                raise ValueError("x must have an event dimension")
            y = t(xr)
            chart = _chart(t, simplex)
            J = _flat_jacobian(chart, xr)
            if method == "triangular":
                gl = _grad(t.log_abs_det_jacobian(xr, y), xr, create_graph)
                lower = not bool(J.detach().triu(1).any())
                if not lower and bool(J.detach().tril(-1).any()):
                    raise ValueError(f"the Jacobian of {type(t).__name__} is not triangular")
                rhs = (score_x - gl).unsqueeze(-1)
                score_y = torch.linalg.solve_triangular(J.mT, rhs, upper=lower).squeeze(-1)
            else:

                def logdet(xi):
                    return torch.linalg.slogdet(torch.func.jacfwd(chart)(xi))[1]

                d = x.shape[-1]
                gl = torch.func.vmap(torch.func.grad(logdet))(xr.reshape(-1, d)).reshape(x.shape)
                score_y = torch.linalg.solve(J.mT, (score_x - gl).unsqueeze(-1)).squeeze(-1)
        elif method == "inverse":
            y = t(xr)
            gl = _grad(t.log_abs_det_jacobian(xr, y), xr, create_graph)
            yc = _chart(t, simplex)(xr)
            yc = yc if create_graph else yc.detach().requires_grad_()
            x_back = _inverse_chart(t, yc, simplex)
            (score_y,) = torch.autograd.grad(
                x_back, yc, grad_outputs=score_x - gl, create_graph=create_graph
            )
        else:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not create_graph:
        y = y.detach()
    return y, score_y


def _check_tensor(x, name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got {x.dtype}")


def pushforward_score(
    transform: Transform,
    x: torch.Tensor,
    score_x: torch.Tensor,
    *,
    method: str = "auto",
    create_graph: bool = False,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score of ``q = phi_# p`` at ``y = phi(x)`` from the score of ``p`` at ``x``.

    ``grad_y log q(y) = J^{-T}(x) [score_x - grad_x log|det J(x)|]``.

    :param transform: the bijection ``phi`` (a torch/Pyro ``Transform``; composed ones are chained
        part by part with ``method="auto"``).
    :param x: points ``(..., d)`` (or any shape for elementwise transforms).
    :param score_x: ``grad_x log p(x)``, same shape as ``x``.
    :param method: ``"auto"``, ``"elementwise"``, ``"triangular"``, ``"inverse"`` or ``"jacobian"``
        (an explicit method treats a composed transform as one map).
    :param create_graph: keep the result differentiable in ``x`` (for score-matching losses).
    :param validate: check shapes, dtypes and NaNs (a device sync; off on hot paths).
    :returns: ``(y, score_y)``: ``y`` in codomain coordinates (``(..., d+1)`` on the simplex), the
        score in chart coordinates (shape of ``x``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(transform, Transform):
        raise TypeError(f"transform must be a torch.distributions Transform, got {type(transform).__name__}")
    if validate:
        _check_tensor(x, "x")
        _check_tensor(score_x, "score_x")
        if score_x.shape != x.shape:
            raise ValueError(f"score_x must have the shape of x {tuple(x.shape)}, got {tuple(score_x.shape)}")
        for name, value in (("x", x), ("score_x", score_x)):
            if not torch.isfinite(value).all():
                raise ValueError(f"{name} contains {'NaN' if torch.isnan(value).any() else 'inf'}")
    transform = _uncached(transform)
    parts = transform.parts if isinstance(transform, ComposeTransform) and method == "auto" else [transform]
    y, s = x, score_x
    for i, part in enumerate(parts):
        if i < len(parts) - 1 and _changes_shape(part, y.shape):
            raise NotImplementedError(
                f"a shape-changing part ({type(part).__name__}) must be the last of a composed transform"
            )
        y, s = _pushforward_part(part, y, s, method, create_graph)
    return y, s


def pullback_score(
    transform: Transform, x: torch.Tensor, score_y: torch.Tensor, *, create_graph: bool = False
) -> torch.Tensor:
    """Inverse of the CoV: ``grad_x log p(x) = J(x)^T score_y + grad_x log|det J(x)|``.

    :param x: points ``(..., d)``; ``score_y``: ``grad_y log q`` at ``phi(x)`` in chart coordinates.
    One vector-Jacobian product and one backward pass of the log-det; shape of ``x``.
    """
    _check_tensor(x, "x")
    _check_tensor(score_y, "score_y")
    if score_y.shape != x.shape:
        raise ValueError(f"score_y must have the shape of x {tuple(x.shape)}, got {tuple(score_y.shape)}")
    transform = _uncached(transform)
    simplex = _check_shape_change(transform, x.shape)
    with torch.enable_grad():
        xr = _grad_input(x, create_graph)
        y = transform(xr)
        yc = y[..., :-1] if simplex else y
        (jt_s,) = torch.autograd.grad(
            yc, xr, grad_outputs=score_y, create_graph=create_graph, retain_graph=True
        )
        gl = _grad(transform.log_abs_det_jacobian(xr, y), xr, create_graph)
    return jt_s + gl


class TransformedScore:
    """``y -> grad_y log q(y)`` for ``q = phi_# p``, given ``score_fn(x, *args) = grad_x log p(x)``.

    Call with ``y`` in codomain coordinates (``(..., d+1)`` on the simplex) and any extra arguments
    of ``score_fn`` (e.g. time); returns the score ``(..., d)`` in chart coordinates.
    """

    def __init__(self, score_fn: Callable, transform: Transform, *, method: str = "auto"):
        if not callable(score_fn):
            raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
        if not isinstance(transform, Transform):
            raise TypeError(f"transform must be a Transform, got {type(transform).__name__}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.score_fn, self.transform, self.method = score_fn, _uncached(transform), method

    def __call__(self, y: torch.Tensor, *args, create_graph: bool = False, **kwargs) -> torch.Tensor:
        _check_tensor(y, "y")
        if not bool(self.transform.codomain.check(y).all()):
            raise ValueError(f"y is outside the codomain {self.transform.codomain} of the transform")
        x = self.transform.inv(y)
        _, score_y = pushforward_score(
            self.transform, x, self.score_fn(x, *args, **kwargs), method=self.method,
            create_graph=create_graph,
        )
        return score_y

    def __repr__(self):
        return f"TransformedScore({self.transform}, method={self.method!r})"


def transform_score(score_fn: Callable, transform: Transform, *, method: str = "auto") -> TransformedScore:
    """The score of the pushforward ``q = phi_# p`` as a function of ``y`` (see :class:`TransformedScore`).

    ``grad_y log q(y) = J^{-T}(grad_x log p(x) - grad_x log|det J(x)|)`` at ``x = phi^{-1}(y)``.

    Example::

        from torch.distributions.transforms import ExpTransform
        score_y = transform_score(lambda x: -x, ExpTransform())   # LogNormal(0, 1) score
        score_y(torch.tensor([[0.5, 2.0]]))                       # = -(1 + log y) / y
    """
    return TransformedScore(score_fn, transform, method=method)


def constrained_score(
    potential: Any, z: torch.Tensor, *, method: str = "auto"
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Constrained-space values and scores of a Pyro model's latent sites from unconstrained ``z``.

    ``potential`` is a :class:`~pyro_sde.infer.potential.ModelPotential` (or any potential with
    ``site_shapes``, ``transforms`` (site -> ``biject_to(support).inv``) and ``log_density_and_score``).
    Its unconstrained density already carries the log-Jacobian, so each site's constrained score is
    the CoV of its block of ``grad_z log rho(z)`` through ``biject_to(support)``.

    :param z: ``(N, dim)`` unconstrained points.
    :returns: ``(values, scores)``: dicts site -> ``(N, *site_shape)`` constrained values and
        ``(N, *site_shape)`` scores ``grad_x log p(x, data)`` (simplex sites: chart of the first
        ``k - 1`` coordinates, shape ``(N, ..., k - 1)``).
    """
    for attr in ("site_shapes", "transforms", "log_density_and_score", "dim"):
        if not hasattr(potential, attr):
            raise TypeError(f"potential must be a ModelPotential-like object (missing {attr!r})")
    _check_tensor(z, "z")
    if z.dim() != 2 or z.shape[-1] != potential.dim:
        raise ValueError(f"z must have shape (N, {potential.dim}), got {tuple(z.shape)}")
    _, score = potential.log_density_and_score(z)
    values, scores, offset, N = {}, {}, 0, z.shape[0]
    for name, shape in potential.site_shapes.items():
        to_unconstrained = potential.transforms[name]
        unc_shape = tuple(to_unconstrained.forward_shape(shape))
        size = 1
        for s in unc_shape:
            size *= s
        u = z[:, offset : offset + size].reshape((N,) + unc_shape)
        s_u = score[:, offset : offset + size].reshape((N,) + unc_shape)
        offset += size
        values[name], scores[name] = pushforward_score(to_unconstrained.inv, u, s_u, method=method)
    return values, scores
