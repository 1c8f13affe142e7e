"""The reverse-time Ito lemma: reverse in ``y = phi(x)`` a diffusion whose score is known in ``x``.

Forward process on ``[0, T]``: ``dX = f(t, X) dt + g(t) dW`` (diagonal, state-independent ``g``) with
marginal scores ``s(t, x) = grad_x log p_t(x)``. In reverse time ``tau = T - t`` it is
``dX = [-f + g^2 s] dtau + g dB`` (Anderson), and Ito's lemma for ``Y = phi(X)`` gives::

    dY = [J (-f + g^2 s) + L / 2] dtau + J diag(g) dB,      L_i = sum_j g_j^2 d^2 phi_i / dx_j^2,

with ``J = d phi / dx`` at ``x = phi^{-1}(Y)``. This equals the y-space Anderson drift
``-f_Y + div_y(G_Y G_Y^T) + G_Y G_Y^T grad_y log q_t`` with ``grad_y log q_t`` from the score CoV,
but needs neither the y-score nor the divergence of the y-diffusion matrix: train in ``x``, sample in ``y``.

Forward processes provided: :class:`VPSDE` (the VP/OU noising process of
:class:`~pyro_sde.sde.VPReference`) and :class:`LangevinSDE` (stationary, reversible: its marginal
score is the target score at all times). Any object with ``f(t, x)``, ``g(t, x)`` (torchsde
protocol, diagonal noise, ``g`` independent of ``x``) and ``T`` works.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.distributions.transforms import Transform

from ..sde.integrate import euler_maruyama_step

if TYPE_CHECKING:
    from ..sde.reference import VPReference
from .transform import (
    AdditiveLogisticTransform,
    _chart,
    _check_shape_change,
    _flat_jacobian,
    _inverse_chart,
    _is_elementwise,
    _uncached,
)

__all__ = ["VPSDE", "LangevinSDE", "TransformedReverseSDE"]


class VPSDE:
    """VP (OU) noising process ``dX = -beta(t)/2 X dt + sqrt(beta(t)) dW``, ``beta`` linear on ``[0, T]``.

    Marginals: ``X_t | X_0 ~ N(a_t X_0, (1 - a_t^2) I)``, ``a_t = exp(-int_0^t beta / 2)``.
    """

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 10.0, T: float = 1.0):
        if not (0 <= beta_min <= beta_max) or beta_max <= 0:
            raise ValueError(f"need 0 <= beta_min <= beta_max, beta_max > 0; got {beta_min}, {beta_max}")
        if not T > 0:
            raise ValueError(f"T must be positive, got {T}")
        self.beta_min, self.beta_max, self.T = float(beta_min), float(beta_max), float(T)

    @classmethod
    def from_reference(cls, reference: VPReference) -> VPSDE:
        """The noising SDE of a :class:`~pyro_sde.sde.VPReference` (same ``beta`` schedule and ``T``)."""
        return cls(reference.beta_min, reference.beta_max, reference.T)

    def beta(self, t: float | torch.Tensor) -> float | torch.Tensor:
        return self.beta_min + (self.beta_max - self.beta_min) * t / self.T

    def f(self, t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return -0.5 * self.beta(t) * x

    def g(self, t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        beta = self.beta(t)
        beta = beta if isinstance(beta, torch.Tensor) else torch.tensor(beta, dtype=x.dtype, device=x.device)
        return beta.sqrt().expand_as(x)

    def marginal(self, t: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a_t, sigma_t)`` with ``sigma_t^2 = 1 - a_t^2`` (``t`` a float or tensor)."""
        t = torch.as_tensor(t, dtype=torch.get_default_dtype()) if not isinstance(t, torch.Tensor) else t
        integral = self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t / self.T
        a = torch.exp(-0.5 * integral)
        return a, (-torch.expm1(-integral)).sqrt()

    def __repr__(self):
        return f"VPSDE(beta_min={self.beta_min}, beta_max={self.beta_max}, T={self.T})"


class LangevinSDE:
    """Overdamped Langevin diffusion ``dX = grad log pi(X) dt + sqrt(2) dW`` on ``[0, T]``.

    Started at ``pi`` it stays there (``p_t = pi``, so ``score(t, x) = grad log pi(x)`` exactly) and is
    reversible; reversing it with the exact score is again Langevin, which converges to ``pi`` from
    any start. :attr:`score` is the matching exact marginal score ``(t, x) -> grad log pi(x)``.
    """

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, target_score: Callable, T: float = 10.0):
        if not callable(target_score):
            raise TypeError(f"target_score must be callable, got {type(target_score).__name__}")
        if not T > 0:
            raise ValueError(f"T must be positive, got {T}")
        self.target_score, self.T = target_score, float(T)

    def f(self, t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.target_score(x)

    def g(self, t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x.new_full((), math.sqrt(2.0)).expand_as(x)

    def score(self, t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.target_score(x)

    def __repr__(self):
        return f"LangevinSDE(T={self.T})"


class TransformedReverseSDE:
    """The reverse of an x-space diffusion, simulated in ``y = phi(x)`` by the reverse-time Ito lemma.

    :param forward: the x-space forward SDE (``f(t, x)``, ``g(t, x)`` diagonal and independent of
        ``x``, ``T``), e.g. :class:`VPSDE` or :class:`LangevinSDE`.
    :param score_fn: ``(t, x) -> grad_x log p_t(x)`` (exact or learned), ``x`` of shape ``(N, d)``,
        ``t`` a 0-d tensor.
    :param transform: the bijection ``phi`` (``AdditiveLogisticTransform`` and elementwise transforms
        have closed-form/cheap paths; others use forward-mode autodiff for ``J`` and ``L``).

    The state is ``y`` in chart coordinates ``(N, d)`` (the first ``d`` of ``d + 1`` on the simplex).
    It is also a torchsde SDE in reverse time ``tau`` (``noise_type = "general"``): :meth:`f`,
    :meth:`g`.
    """

    noise_type = "general"
    sde_type = "ito"

    def __init__(self, forward: Any, score_fn: Callable, transform: Transform):
        for attr in ("f", "g", "T"):
            if not hasattr(forward, attr):
                raise TypeError(f"forward must have f(t, x), g(t, x) and T (missing {attr!r})")
        if not callable(score_fn):
            raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
        if not isinstance(transform, Transform):
            raise TypeError(f"transform must be a Transform, got {type(transform).__name__}")
        self.forward, self.score_fn, self.transform = forward, score_fn, _uncached(transform)
        self.T = float(forward.T)

    # -- geometry of phi -------------------------------------------------------------------------
    def _simplex(self, d_shape):
        return _check_shape_change(self.transform, d_shape)

    def to_x(self, y: torch.Tensor) -> torch.Tensor:
        """``x = phi^{-1}(y)`` for chart coordinates ``y`` (N, d)."""
        return _inverse_chart(self.transform, y, self._simplex(y.shape))

    def to_codomain(self, y: torch.Tensor) -> torch.Tensor:
        """Chart ``(N, d)`` -> codomain points (``(N, d + 1)`` on the simplex)."""
        if self._simplex(y.shape):
            return torch.cat([y, 1 - y.sum(-1, keepdim=True)], dim=-1)
        return y

    def _geometry(self, x: torch.Tensor, g2: torch.Tensor, y: torch.Tensor | None = None):
        """``(jvp, L)``: ``v -> J(x) v`` and the ``g^2``-weighted Laplacian of ``phi`` at ``x``
        (``y = phi(x)`` in codomain coordinates may be passed to skip recomputing it)."""
        t = self.transform
        if isinstance(t, AdditiveLogisticTransform):
            y = t(x) if y is None else y
            return (lambda v: t.jvp(y, v)), t.weighted_laplacian(y, g2)
        simplex = self._simplex(x.shape)
        if _is_elementwise(t) and not simplex:
            with torch.enable_grad():
                xr = x.detach().requires_grad_()
                (d1,) = torch.autograd.grad(t(xr).sum(), xr, create_graph=True)
                (d2,) = torch.autograd.grad(d1.sum(), xr, allow_unused=True)
            d1 = d1.detach()
            d2 = torch.zeros_like(x) if d2 is None else d2
            return (lambda v: d1 * v), g2 * d2
        chart = _chart(t, simplex)
        d = x.shape[-1]
        J = _flat_jacobian(chart, x.detach())
        H = torch.func.vmap(torch.func.hessian(chart))(x.detach().reshape(-1, d)).reshape(x.shape + (d, d))
        L = (H.diagonal(dim1=-2, dim2=-1) * g2.unsqueeze(-2)).sum(-1)
        return (lambda v: (J @ v.unsqueeze(-1)).squeeze(-1)), L

    def _jacobian(self, x):
        t = self.transform
        if isinstance(t, AdditiveLogisticTransform):
            return t.jacobian(t(x))
        return _flat_jacobian(_chart(t, self._simplex(x.shape)), x.detach())

    # -- drift and diffusion in reverse time ----------------------------------------------------
    def _drift_and_jvp(self, tau, y):
        t = self.T - tau
        y_full = self.to_codomain(y)
        x = self.transform.inv(y_full)
        g = self.forward.g(t, x)
        g2 = (g * g).expand_as(x)
        jvp, L = self._geometry(x, g2, y_full)
        reverse_x_drift = -self.forward.f(t, x) + g2 * self.score_fn(t, x)
        return jvp(reverse_x_drift) + 0.5 * L, jvp, g

    def drift(self, tau: float | torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Reverse-time drift ``J(-f + g^2 s) + L/2`` at chart points ``y`` (N, d); ``tau = T - t``."""
        tau = torch.as_tensor(tau, dtype=y.dtype, device=y.device)
        return self._drift_and_jvp(tau, y)[0]

    def f(self, tau: float | torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """torchsde drift (reverse time)."""
        return self.drift(tau, y)

    def g(self, tau: float | torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """torchsde diffusion ``J(x) diag(g)``, shape ``(N, d, d)``."""
        tau = torch.as_tensor(tau, dtype=y.dtype, device=y.device)
        x = self.to_x(y)
        gx = self.forward.g(self.T - tau, x).expand_as(x)
        return self._jacobian(x) * gx.unsqueeze(-2)

    # -- sampling ---------------------------------------------------------------------------------
    def sample(
        self,
        y0: torch.Tensor,
        num_steps: int,
        *,
        t_end: float = 0.0,
        backend: str = "euler",
        return_path: bool = False,
        progress_bar: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Simulate from ``t = T`` (``y0``) down to ``t = t_end`` with ``num_steps`` Euler steps.

        :param y0: ``(N, D)`` points in the codomain of ``phi`` (``D = d + 1`` on the simplex).
        :param backend: ``"euler"`` (our batched loop with
            :func:`~pyro_sde.sde.integrate.euler_maruyama_step`, ``y + h b + sqrt(h) J g xi``) or
            ``"torchsde"`` (``torchsde.sdeint``, Euler, general noise; slower).
        :param return_path: also return the chart path ``(num_steps + 1, N, d)``.
        :returns: terminal points in codomain coordinates ``(N, d + 1)`` / ``(N, d)`` (and the path).
            Points that left the domain (an Euler step across the boundary) come back as NaN, with
            a warning.
        """
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        if not 0 <= t_end < self.T:
            raise ValueError(f"t_end must be in [0, T={self.T}), got {t_end}")
        if backend not in ("euler", "torchsde"):
            raise ValueError(f"backend must be 'euler' or 'torchsde', got {backend!r}")
        if not isinstance(y0, torch.Tensor) or y0.dim() != 2 or not y0.dtype.is_floating_point:
            raise ValueError(f"y0 must be a floating tensor (N, dim), got {getattr(y0, 'shape', y0)}")
        if not torch.isfinite(y0).all():
            raise ValueError(f"y0 contains {'NaN' if torch.isnan(y0).any() else 'inf'}")
        if not bool(self.transform.codomain.check(y0).all()):
            raise ValueError(f"y0 is outside the codomain {self.transform.codomain} of the transform")
        simplex = tuple(self.transform.inverse_shape(y0.shape))[-1] == y0.shape[-1] - 1
        y = y0[..., :-1] if simplex else y0
        h = (self.T - t_end) / num_steps
        taus = torch.arange(num_steps + 1, dtype=y.dtype, device=y.device) * h
        with torch.no_grad():
            if backend == "torchsde":
                import torchsde

                path = torchsde.sdeint(self, y, taus, method="euler", dt=h)
            else:
                from tqdm.auto import trange

                states = [y] if return_path else None
                for k in trange(num_steps, disable=not progress_bar, desc="reverse SDE"):
                    b, jvp, g = self._drift_and_jvp(taus[k], y)
                    y = euler_maruyama_step(y, 1.0, h, math.sqrt(h), b, jvp(g * torch.randn_like(y)))
                    if return_path:
                        states.append(y)
                path = torch.stack(states) if return_path else y[None]
        out = self.to_codomain(path[-1])
        inside = self.transform.codomain.check(out).reshape(out.shape[0], -1).all(-1)
        bad = ~torch.isfinite(out).all(-1) | ~inside
        num_bad = int(bad.sum())
        if num_bad:
            warnings.warn(f"{num_bad} of {out.shape[0]} paths left the domain; returned as NaN", stacklevel=2)
            out = torch.where(bad.unsqueeze(-1), torch.nan, out)
        return (out, path) if return_path else out

    def __repr__(self):
        return f"TransformedReverseSDE(forward={self.forward}, transform={self.transform})"
