"""SDE models on the torchsde protocol, with parameters as tensors so that Pyro sample sites feed them.

Every model is an :class:`SDE`: ``dX = f(t, X) dt + g(t, X) dW`` (Ito), with

* ``f(t, y) -> (..., d)`` and ``g(t, y) -> (..., d)`` (``noise_type="diagonal"``) or ``(..., d, m)``
  (``"general"``), for ``y`` of shape ``(..., d)``; ``t`` is a tensor broadcastable to ``y.shape[:-1]``
  (0-d when called by torchsde);
* parameters stored as tensors with a declared number of event dims, whose broadcast batch shape is
  :attr:`SDE.batch_shape` and broadcasts from the right against the leading dims of ``y``;
* :meth:`SDE.diffusion_factor`, a triangular (or diagonal) ``L`` with ``L L^T = g g^T = a``, computed by
  QR of ``g^T`` (no Gram matrix, no inverse) -- what the bridge estimators solve against;
* :meth:`SDE.linear_auxiliary`, the linear process ``dX~ = (B~ X~ + beta~) dt + sqrt(a~) dW`` that the
  guided proposals use (autograd linearisation of ``f`` at the end point by default);
* :meth:`SDE.transition_log_prob`, the exact transition density where one exists (OU, GBM, fixed-kernel
  landmarks), used as a fast path and as a test oracle.

User models subclass :class:`SDE` (implement ``f`` and ``g``, register tensors with
:meth:`SDE.register_params`) or wrap an existing torchsde module with :class:`TorchsdeModel`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from pyro.distributions import is_validation_enabled

__all__ = [
    "SDE",
    "TorchsdeModel",
    "DiffusionFactor",
    "LinearAuxiliary",
    "OrnsteinUhlenbeck",
    "GeometricBrownianMotion",
    "CIR",
    "StochasticLotkaVolterra",
    "LandmarkBrownian",
    "KunitaFlow",
    "gaussian_kernel",
    "linear_sde_moments",
]

_LOG_2PI = math.log(2 * math.pi)


# --------------------------------------------------------------------------------------------------
# factors and linear-Gaussian helpers
# --------------------------------------------------------------------------------------------------


class DiffusionFactor:
    """A square root ``L`` of the diffusion matrix ``a = L L^T``.

    ``tril`` has shape ``(..., d)`` (diagonal ``L``) or ``(..., d, d)`` (lower triangular ``L``).
    All operations are broadcasting triangular solves / products: no inverse, no determinant.
    """

    __slots__ = ("tril", "diagonal")

    def __init__(self, tril: torch.Tensor, diagonal: bool):
        self.tril, self.diagonal = tril, diagonal

    def solve(self, r: torch.Tensor) -> torch.Tensor:
        """``L^{-1} r`` for ``r`` of shape ``(..., d)``."""
        if self.diagonal:
            return r / self.tril
        if self.tril.dim() == 2:  # one factor for all rows: a single solve with many right-hand sides
            flat = r.reshape(-1, r.shape[-1]).transpose(0, 1)
            return (
                torch.linalg.solve_triangular(self.tril, flat, upper=False).transpose(0, 1).reshape(r.shape)
            )
        return torch.linalg.solve_triangular(self.tril, r.unsqueeze(-1), upper=False).squeeze(-1)

    def solve_transpose(self, r: torch.Tensor) -> torch.Tensor:
        """``L^{-T} r``."""
        if self.diagonal:
            return r / self.tril
        if self.tril.dim() == 2:
            flat = r.reshape(-1, r.shape[-1]).transpose(0, 1)
            out = torch.linalg.solve_triangular(self.tril.transpose(0, 1), flat, upper=True)
            return out.transpose(0, 1).reshape(r.shape)
        return torch.linalg.solve_triangular(
            self.tril.transpose(-1, -2), r.unsqueeze(-1), upper=True
        ).squeeze(-1)

    def matvec(self, r: torch.Tensor) -> torch.Tensor:
        """``L r``."""
        if self.diagonal:
            return self.tril * r
        if self.tril.dim() == 2:
            return r @ self.tril.transpose(0, 1)
        return (self.tril @ r.unsqueeze(-1)).squeeze(-1)

    def rmatvec(self, r: torch.Tensor) -> torch.Tensor:
        """``L^T r``."""
        if self.diagonal:
            return self.tril * r
        if self.tril.dim() == 2:
            return r @ self.tril
        return (self.tril.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1)

    def log_abs_det(self) -> torch.Tensor:
        """``log |det L| = 1/2 log det a``, shape ``(...)``."""
        diag = self.tril if self.diagonal else self.tril.diagonal(dim1=-2, dim2=-1)
        return diag.abs().log().sum(-1)

    def matrix(self) -> torch.Tensor:
        """``a = L L^T`` as ``(..., d)`` (diagonal) or ``(..., d, d)``."""
        if self.diagonal:
            return self.tril * self.tril
        return self.tril @ self.tril.transpose(-1, -2)

    def log_normal(self, r: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """``log N(r; 0, scale * a)``, shape ``r.shape[:-1]``; ``scale`` broadcasts to that shape."""
        z = self.solve(r)
        d = r.shape[-1]
        scale = torch.as_tensor(scale, dtype=r.dtype, device=r.device)
        return -0.5 * (z * z).sum(-1) / scale - self.log_abs_det() - 0.5 * d * (_LOG_2PI + scale.log())


def factor_from_g(g: torch.Tensor, diagonal: bool) -> DiffusionFactor:
    """:class:`DiffusionFactor` of ``a = g g^T``: ``g`` itself if diagonal, else ``R^T`` of ``g^T = Q R``."""
    if diagonal:
        return DiffusionFactor(g, True)
    if g.shape[-1] < g.shape[-2]:
        raise ValueError(f"g of shape {tuple(g.shape)} gives a singular diffusion matrix (m < d)")
    # mode "r" has no derivative: compute Q too where a gradient may flow through g
    mode = "reduced" if torch.is_grad_enabled() and g.requires_grad else "r"
    r = torch.linalg.qr(g.transpose(-1, -2), mode=mode)[1]
    return DiffusionFactor(r.transpose(-1, -2), False)


def _phi1(z: torch.Tensor) -> torch.Tensor:
    """``(e^z - 1) / z`` with the limit 1 at 0."""
    small = z.abs() < 1e-6
    safe = torch.where(small, torch.ones_like(z), z)
    return torch.where(small, 1 + 0.5 * z, torch.expm1(safe) / safe)


def linear_sde_moments(
    A: torch.Tensor, c: torch.Tensor, Q: torch.Tensor, tau: float | torch.Tensor, diagonal: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Moments of ``dX = (A X + c) dt + sqrt(Q) dW`` over a time ``tau``: ``X_tau ~ N(E x + m, V)``.

    Returns ``(E, m, V)`` with ``E = e^{A tau}``, ``m = int_0^tau e^{A r} c dr``,
    ``V = int_0^tau e^{A r} Q e^{A^T r} dr``. Diagonal ``A``, ``Q`` of shape ``(..., d)``: closed form with
    ``expm1``; full ``(..., d, d)``: one Van Loan matrix exponential of
    ``[[A, Q, c], [0, -A^T, 0], [0, 0, 0]] tau`` (size ``2d + 1``). ``tau`` broadcasts to ``A.shape[:-1]``
    (diagonal) or ``A.shape[:-2]`` (full).
    """
    if diagonal:
        tau = tau[..., None] if torch.is_tensor(tau) and tau.dim() > 0 else tau
        At = A * tau
        return At.exp(), c * tau * _phi1(At), Q * tau * _phi1(2 * At)
    d = A.shape[-1]
    tau_t = torch.as_tensor(tau, dtype=A.dtype, device=A.device)
    batch = torch.broadcast_shapes(A.shape[:-2], Q.shape[:-2], c.shape[:-1], tau_t.shape)
    M = A.new_zeros(batch + (2 * d + 1, 2 * d + 1))
    M[..., :d, :d] = A
    M[..., :d, d : 2 * d] = Q
    M[..., d : 2 * d, d : 2 * d] = -A.transpose(-1, -2)
    M[..., :d, -1] = c
    G = torch.linalg.matrix_exp(M * tau_t[..., None, None])
    E = G[..., :d, :d]
    V = G[..., :d, d : 2 * d] @ E.transpose(-1, -2)
    return E, G[..., :d, -1], 0.5 * (V + V.transpose(-1, -2))


def _mvn_log_prob(x, loc, cov, diagonal: bool):
    """``log N(x; loc, cov)``, ``cov`` diagonal ``(..., d)`` or full ``(..., d, d)`` (Cholesky solve)."""
    r = x - loc
    if diagonal:
        return (-0.5 * r * r / cov - 0.5 * cov.log() - 0.5 * _LOG_2PI).sum(-1)
    return DiffusionFactor(torch.linalg.cholesky(cov), False).log_normal(r)


class LinearAuxiliary(NamedTuple):
    """Linear auxiliary process ``dX~ = (B~ X~ + beta~) dt + sqrt(a~) dW`` of a guided proposal.

    ``drift_matrix`` ``B~`` and ``diffusion`` ``a~`` are ``(..., d)`` when ``diagonal`` else ``(..., d, d)``;
    ``drift_offset`` ``beta~`` is ``(..., d)``.
    """

    drift_matrix: torch.Tensor
    drift_offset: torch.Tensor
    diffusion: torch.Tensor
    diagonal: bool


# --------------------------------------------------------------------------------------------------
# base class
# --------------------------------------------------------------------------------------------------


class SDE(torch.nn.Module):
    """Base class of Ito SDE models ``dX = f(t, X) dt + g(t, X) dW`` on the torchsde protocol.

    Subclasses set :attr:`noise_type` (``"diagonal"``: ``g`` returns ``(..., d)``; ``"general"``:
    ``(..., d, m)``), :attr:`state_independent_diffusion` (``g`` depends on neither ``t`` nor ``x``:
    the bridge estimators then factor ``a`` once), implement :meth:`f` and :meth:`g`, and register
    their tensor parameters with :meth:`register_params`.

    :param int dim: state dimension ``d``.
    """

    sde_type = "ito"
    noise_type = "diagonal"
    state_independent_diffusion = False

    def __init__(self, dim: int):
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim = dim
        self._param_event_dims: dict[str, int] = {}

    # -- parameters -------------------------------------------------------------------------
    def register_params(self, **params: tuple[float | list[float] | torch.Tensor, int]) -> None:
        """Store parameters as tensors: ``name=(value, event_dim)``; floats become 0-d tensors of the
        dtype/device of the tensor parameters (or the default dtype). NaN / inf values raise ValueError
        while Pyro validation is enabled (with it disabled, as on a sampler's hot path, they flow into
        a NaN log density for the affected particles)."""
        ref = next((v for v, _ in params.values() if torch.is_tensor(v) and v.is_floating_point()), None)
        dtype = ref.dtype if ref is not None else torch.get_default_dtype()
        device = ref.device if ref is not None else None
        for name, (value, event_dim) in params.items():
            if torch.is_tensor(value):
                if not value.is_floating_point():
                    value = value.to(dtype)
            else:
                value = torch.as_tensor(value, dtype=dtype, device=device)
            if value.dim() < event_dim:
                raise ValueError(f"{name} needs at least {event_dim} dims, got shape {tuple(value.shape)}")
            if _validating() and not torch.isfinite(value).all():
                bad = "NaN" if torch.isnan(value).any() else "inf"
                raise ValueError(f"parameter {name} contains {bad}")
            setattr(self, name, value)
            self._param_event_dims[name] = event_dim

    def params(self) -> dict[str, torch.Tensor]:
        """The registered parameters, name -> tensor."""
        return {name: getattr(self, name) for name in self._param_event_dims}

    @property
    def batch_shape(self) -> torch.Size:
        """Broadcast of the parameters' batch shapes."""
        shapes = [
            getattr(self, n).shape[: getattr(self, n).dim() - e] for n, e in self._param_event_dims.items()
        ]
        return torch.broadcast_shapes(*shapes) if shapes else torch.Size()

    # -- torchsde protocol --------------------------------------------------------------------
    def f(self, t: float | torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def g(self, t: float | torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- what the estimators use --------------------------------------------------------------
    def diffusion_factor(self, t: float | torch.Tensor, y: torch.Tensor) -> DiffusionFactor:
        """``L`` with ``L L^T = g g^T`` at ``(t, y)`` (QR of ``g^T`` for general noise)."""
        return factor_from_g(self.g(t, y), self.noise_type == "diagonal")

    def linear_auxiliary(self, t: float | torch.Tensor, v: torch.Tensor) -> LinearAuxiliary:
        """Linearisation of the model at ``v`` (``(..., d)``): ``B~ = df/dx(t, v)`` (autograd, ``d``
        backward passes), ``beta~ = f(t, v) - B~ v``, ``a~ = a(t, v)`` (full matrices). Differentiable."""
        with torch.enable_grad():
            x = v.detach().requires_grad_(True)
            fx = self.f(t, x)
            create = torch.is_grad_enabled() and any(p.requires_grad for p in self.params().values())
            rows = [
                torch.autograd.grad(fx[..., i].sum(), x, create_graph=create, retain_graph=True)[0]
                for i in range(self.dim)
            ]
        B = torch.stack(rows, -2)
        fv = self.f(t, v)
        beta = fv - (B @ v.unsqueeze(-1)).squeeze(-1)
        a = self.diffusion_factor(t, v)
        amat = a.matrix()
        if a.diagonal:
            amat = torch.diag_embed(amat)
        return LinearAuxiliary(B, beta, amat, False)

    def transition_log_prob(
        self, t0: float | torch.Tensor, x0: torch.Tensor, t1: float | torch.Tensor, x1: torch.Tensor
    ) -> torch.Tensor:
        """Exact ``log p(x1 at t1 | x0 at t0)``, shape ``x1.shape[:-1]`` (where known)."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-form transition density")

    @property
    def has_transition_log_prob(self) -> bool:
        return type(self).transition_log_prob is not SDE.transition_log_prob

    def extra_repr(self) -> str:
        return f"dim={self.dim}, batch_shape={tuple(self.batch_shape)}"


class TorchsdeModel(SDE):
    """Wrap any object with torchsde's ``f``, ``g``, ``noise_type`` (``"diagonal"`` or ``"general"``).

    :param module: the torchsde SDE (an ``nn.Module`` or any object with ``f(t, y)``, ``g(t, y)``).
    :param int dim: state dimension.
    :param dict params: optional tensors it depends on (``name -> (value, event_dim)``), for
        :attr:`batch_shape` and :meth:`params`.
    """

    def __init__(self, module: Any, dim: int, *, params: dict | None = None):
        super().__init__(dim)
        noise_type = getattr(module, "noise_type", "diagonal")
        if noise_type not in ("diagonal", "general"):
            raise ValueError(f"noise_type must be 'diagonal' or 'general', got {noise_type!r}")
        if getattr(module, "sde_type", "ito") != "ito":
            raise ValueError("only Ito SDEs are supported")
        self.noise_type = noise_type
        self.module = module
        self.register_params(**(params or {}))

    def f(self, t: float | torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.module.f(t, y)

    def g(self, t: float | torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.module.g(t, y)


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------


def _validating() -> bool:
    return is_validation_enabled() and not torch._C._get_tracing_state()


def _check_positive(name, value):
    """``value`` if it is positive. With Pyro validation disabled (a sampler's hot path), non-positive
    entries of a tensor become NaN (a NaN log density for those particles) instead of an error."""
    if torch.is_tensor(value):
        if torch._C._get_tracing_state():
            return value
        if is_validation_enabled() or not value.is_floating_point():  # integers are the user's
            if not (value > 0).all():
                raise ValueError(f"{name} must be positive, got {_describe(value)}")
            return value
        return torch.where(value > 0, value, torch.full_like(value, math.nan))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive number or tensor, got {type(value).__name__}")
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return value


def _describe(value: torch.Tensor) -> str:
    if value.numel() == 1:
        return f"{value.item()}"
    return f"min {value.min().item()} (shape {tuple(value.shape)})"


class OrnsteinUhlenbeck(SDE):
    """Multivariate Ornstein-Uhlenbeck process ``dX = -B (X - mean) dt + sigma dW``.

    :param theta: rate, ``B = theta I``; shape ``batch_shape`` (event dim 0). Alternatively
    :param drift_matrix: full ``B``, shape ``batch_shape + (d, d)`` (eigenvalues with positive real part
        for stationarity; not checked).
    :param mean: long-run mean, a float or shape ``batch_shape + (d,)`` / ``batch_shape + (1,)``.
    :param sigma: isotropic diffusion scale, shape ``batch_shape`` (``g = sigma I``, diagonal noise).
        Alternatively
    :param diffusion_matrix: ``g`` of shape ``batch_shape + (d, m)`` (general noise).
    :param int dim: ``d``.

    Exact transition: ``N(mean + e^{-Bt}(x0 - mean), int_0^t e^{-Br} a e^{-B^T r} dr)``.
    """

    state_independent_diffusion = True

    def __init__(
        self,
        theta: float | torch.Tensor | None = None,
        mean: float | torch.Tensor = 0.0,
        sigma: float | torch.Tensor | None = None,
        *,
        dim: int = 1,
        drift_matrix: torch.Tensor | None = None,
        diffusion_matrix: torch.Tensor | None = None,
    ):
        super().__init__(dim)
        if (theta is None) == (drift_matrix is None):
            raise ValueError("give exactly one of theta and drift_matrix")
        if (sigma is None) == (diffusion_matrix is None):
            raise ValueError("give exactly one of sigma and diffusion_matrix")
        params = {}
        if theta is not None:
            theta = _check_positive("theta", theta)
            params["theta"] = (theta, 0)
        else:
            params["drift_matrix"] = (drift_matrix, 2)
        if sigma is not None:
            sigma = _check_positive("sigma", sigma)
            params["sigma"] = (sigma, 0)
        else:
            params["diffusion_matrix"] = (diffusion_matrix, 2)
        params["mean"] = (mean if torch.is_tensor(mean) else [float(mean)], 1)
        self.register_params(**params)
        if self.mean.shape[-1] not in (1, dim):
            raise ValueError(
                f"mean must have trailing dimension 1 or {dim}, got shape {tuple(self.mean.shape)}"
            )
        for name in ("drift_matrix",):
            if name in params and getattr(self, name).shape[-2:] != (dim, dim):
                raise ValueError(f"{name} must have shape (..., {dim}, {dim})")
        if diffusion_matrix is not None and self.diffusion_matrix.shape[-2] != dim:
            raise ValueError(f"diffusion_matrix must have shape (..., {dim}, m)")
        self.noise_type = "diagonal" if sigma is not None else "general"
        self._scalar_rate = theta is not None

    def f(self, t: float | torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        r = y - self.mean
        if self._scalar_rate:
            return -self.theta.unsqueeze(-1) * r
        return -(self.drift_matrix @ r.unsqueeze(-1)).squeeze(-1)

    def g(self, t: float | torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.noise_type == "diagonal":
            return self.sigma.unsqueeze(-1).expand(y.shape[:-1] + (self.dim,))
        return self.diffusion_matrix.expand(y.shape[:-1] + self.diffusion_matrix.shape[-2:])

    def diffusion_factor(self, t: float | torch.Tensor | None, y: torch.Tensor | None) -> DiffusionFactor:
        if self.noise_type == "diagonal":  # no need to expand a constant
            return DiffusionFactor(self.sigma.unsqueeze(-1).expand(self.sigma.shape + (self.dim,)), True)
        return factor_from_g(self.diffusion_matrix, False)

    def _linear(self):
        """``(A, c, Q, diagonal)`` of ``dX = (A X + c) dt + sqrt(Q) dW``."""
        if self._scalar_rate and self.noise_type == "diagonal":
            A = -self.theta.unsqueeze(-1).expand(self.theta.shape + (self.dim,))
            Q = (self.sigma**2).unsqueeze(-1).expand(self.sigma.shape + (self.dim,))
            return A, -A * self.mean, Q, True
        if self._scalar_rate:
            A = -self.theta[..., None, None] * torch.eye(
                self.dim, dtype=self.theta.dtype, device=self.theta.device
            )
        else:
            A = -self.drift_matrix
        Q = self.diffusion_factor(None, None).matrix()
        if self.noise_type == "diagonal":
            Q = torch.diag_embed(Q)
        c = -(A @ self.mean.expand(self.mean.shape[:-1] + (self.dim,)).unsqueeze(-1)).squeeze(-1)
        return A, c, Q, False

    def linear_auxiliary(self, t: float | torch.Tensor, v: torch.Tensor) -> LinearAuxiliary:
        A, c, Q, diagonal = self._linear()
        return LinearAuxiliary(A, c, Q, diagonal)

    def transition_log_prob(
        self, t0: float | torch.Tensor, x0: torch.Tensor, t1: float | torch.Tensor, x1: torch.Tensor
    ) -> torch.Tensor:
        A, c, Q, diagonal = self._linear()
        tau = torch.as_tensor(t1, dtype=x1.dtype, device=x1.device) - t0
        E, m, V = linear_sde_moments(A, c, Q, tau, diagonal)
        loc = (E * x0 if diagonal else (E @ x0.unsqueeze(-1)).squeeze(-1)) + m
        return _mvn_log_prob(x1, loc, V, diagonal)


class GeometricBrownianMotion(SDE):
    """Geometric Brownian motion ``dX = mu X dt + sigma X dW`` (each of ``dim`` coordinates independent).

    :param mu: drift rate, shape ``batch_shape``. :param sigma: volatility (> 0), shape ``batch_shape``.
    Exact transition: ``log X_t ~ N(log x0 + (mu - sigma^2 / 2) t, sigma^2 t)``.
    """

    def __init__(self, mu: float | torch.Tensor = 0.0, sigma: float | torch.Tensor = 1.0, *, dim: int = 1):
        super().__init__(dim)
        sigma = _check_positive("sigma", sigma)
        self.register_params(mu=(mu, 0), sigma=(sigma, 0))

    def f(self, t: float | torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.mu.unsqueeze(-1) * y

    def g(self, t: float | torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.sigma.unsqueeze(-1) * y

    def linear_auxiliary(self, t: float | torch.Tensor, v: torch.Tensor) -> LinearAuxiliary:
        B = self.mu.unsqueeze(-1).expand(v.shape)
        return LinearAuxiliary(B, torch.zeros_like(v), (self.sigma.unsqueeze(-1) * v) ** 2, True)

    def transition_log_prob(
        self, t0: float | torch.Tensor, x0: torch.Tensor, t1: float | torch.Tensor, x1: torch.Tensor
    ) -> torch.Tensor:
        tau = (torch.as_tensor(t1, dtype=x1.dtype, device=x1.device) - t0).unsqueeze(-1)
        mu, s2 = self.mu.unsqueeze(-1), self.sigma.unsqueeze(-1) ** 2
        log_x1 = x1.log()
        r = log_x1 - x0.log() - (mu - 0.5 * s2) * tau
        var = s2 * tau
        return (-0.5 * r * r / var - 0.5 * (_LOG_2PI + var.log()) - log_x1).sum(-1)


class CIR(SDE):
    """Cox-Ingersoll-Ross process ``dX = kappa (theta - X) dt + sigma sqrt(X) dW`` (per coordinate).

    :param kappa: mean-reversion rate (> 0). :param theta: long-run mean (> 0). :param sigma: (> 0).
    All of shape ``batch_shape``. ``sqrt`` is taken of ``max(X, eps)`` so that Euler paths that step
    below zero get a vanishing (finite) weight rather than NaN. Exact transition: ``2 c X_t`` is
    non-central chi-square with ``4 kappa theta / sigma^2`` degrees of freedom and non-centrality
    ``2 c x0 e^{-kappa t}``, ``c = 2 kappa / (sigma^2 (1 - e^{-kappa t}))`` (:meth:`transition_log_prob`,
    differentiable).
    """

    def __init__(
        self,
        kappa: float | torch.Tensor = 1.0,
        theta: float | torch.Tensor = 1.0,
        sigma: float | torch.Tensor = 1.0,
        *,
        dim: int = 1,
    ):
        super().__init__(dim)
        kappa, theta, sigma = (
            _check_positive(name, v) for name, v in (("kappa", kappa), ("theta", theta), ("sigma", sigma))
        )
        self.register_params(kappa=(kappa, 0), theta=(theta, 0), sigma=(sigma, 0))

    def f(self, t: float | torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.kappa.unsqueeze(-1) * (self.theta.unsqueeze(-1) - y)

    def g(self, t: float | torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(y.dtype).eps
        return self.sigma.unsqueeze(-1) * y.clamp(min=eps).sqrt()

    def linear_auxiliary(self, t: float | torch.Tensor, v: torch.Tensor) -> LinearAuxiliary:
        k = self.kappa.unsqueeze(-1)
        B = (-k).expand(v.shape)
        a = self.sigma.unsqueeze(-1) ** 2 * v.clamp(min=torch.finfo(v.dtype).eps)
        return LinearAuxiliary(B, (k * self.theta.unsqueeze(-1)).expand(v.shape), a, True)

    def transition_log_prob(
        self, t0: float | torch.Tensor, x0: torch.Tensor, t1: float | torch.Tensor, x1: torch.Tensor
    ) -> torch.Tensor:
        """``log p = log c - u - w + (q / 2) log(w / u) + log I_q(2 sqrt(u w))``, ``u = c x0 e^{-kappa t}``,
        ``w = c x1``, ``q = 2 kappa theta / sigma^2 - 1`` (``-inf`` for ``x1 <= 0``), summed over the
        coordinates."""
        tau = (torch.as_tensor(t1, dtype=x1.dtype, device=x1.device) - t0).unsqueeze(-1)
        k, s2 = self.kappa.unsqueeze(-1), self.sigma.unsqueeze(-1) ** 2
        c = 2 * k / (s2 * -torch.expm1(-k * tau))
        tiny = torch.finfo(x1.dtype).tiny
        u, w = c * x0 * torch.exp(-k * tau), c * x1.clamp(min=tiny)
        q = 2 * k * self.theta.unsqueeze(-1) / s2 - 1
        log_p = c.log() - u - w + 0.5 * q * (w.log() - u.log()) + _log_bessel_i(q, 2 * (u * w).sqrt())
        return torch.where(x1 > 0, log_p, torch.full_like(log_p, -math.inf)).sum(-1)


def _log_bessel_i(order, z):
    """``log I_order(z)`` for ``order > -1``, ``z > 0`` (broadcast). Power series in log space,
    ``logsumexp_k [(2k + order) log(z / 2) - lgamma(k + 1) - lgamma(k + order + 1)]`` with enough terms to
    pass the largest (``k ~ z / 2``), where ``z <= max(50, 2 order^2)``; beyond, Hankel's expansion
    ``z - log(2 pi z) / 2 + log(1 + sum_k prod_j (mu - (2j - 1)^2) / (k! (8 z)^k))``, ``mu = 4 order^2``
    (12 terms: relative error < 1e-13 there)."""
    order, z = torch.broadcast_tensors(order, z)
    use_series = z <= torch.clamp(2 * order * order, min=50.0)
    z_s = torch.where(use_series, z, torch.ones_like(z))  # the series only where it is used
    z_max = float(z_s.detach().max()) if z.numel() else 0.0
    K = int(z_max / 2 + 12 * math.sqrt(z_max) + 40)
    k = torch.arange(K, dtype=z.dtype, device=z.device).view((K,) + (1,) * z.dim())
    terms = (2 * k + order) * (z_s / 2).log() - torch.lgamma(k + 1) - torch.lgamma(k + order + 1)
    series = terms.logsumexp(0)
    z_h = torch.where(use_series, torch.full_like(z, 1e3), z)
    mu, term, total = 4 * order * order, torch.ones_like(z), torch.ones_like(z)
    for j in range(1, 13):
        term = -term * (mu - (2 * j - 1) ** 2) / (j * 8 * z_h)
        total = total + term
    hankel = z_h - 0.5 * (2 * math.pi * z_h).log() + total.log()
    return torch.where(use_series, series, hankel)


class StochasticLotkaVolterra(SDE):
    """Predator-prey Lotka-Volterra with multiplicative noise (state: prey ``X1``, predators ``X2``, > 0).

    ``dX1 = X1 (alpha - beta X2) dt + sigma X1 dW1``, ``dX2 = X2 (delta X1 - gamma) dt + sigma X2 dW2``.
    With ``log_scale=True`` (default) the state is ``Y = log X`` and the model is its exact Ito transform
    ``dY1 = (alpha - beta e^{Y2} - sigma^2 / 2) dt + sigma dW1``,
    ``dY2 = (delta e^{Y1} - gamma - sigma^2 / 2) dt + sigma dW2``: constant diffusion, every Euler state
    positive after ``exp``, and densities in ``Y`` (``p_X(x) = p_Y(log x) / (x1 x2)``). With
    ``log_scale=False`` the state is ``X`` itself (Euler steps may leave the positive quadrant). No
    closed-form transition density.

    :param alpha: prey growth rate (> 0). :param beta: predation rate (> 0). :param gamma: predator death rate
        (> 0). :param delta: predator growth per prey (> 0). :param sigma: noise scale (> 0), common to both
        species. All of shape ``batch_shape``.
    :param bool log_scale: state ``log X`` (default) or ``X``.
    """

    def __init__(
        self,
        alpha: float | torch.Tensor = 1.0,
        beta: float | torch.Tensor = 0.5,
        gamma: float | torch.Tensor = 1.0,
        delta: float | torch.Tensor = 0.5,
        sigma: float | torch.Tensor = 0.1,
        *,
        log_scale: bool = True,
    ):
        super().__init__(2)
        if not isinstance(log_scale, bool):
            raise TypeError(f"log_scale must be a bool, got {type(log_scale).__name__}")
        values = {n: _check_positive(n, v) for n, v in
                  (("alpha", alpha), ("beta", beta), ("gamma", gamma), ("delta", delta), ("sigma", sigma))}
        self.register_params(**{n: (v, 0) for n, v in values.items()})
        self.log_scale = log_scale
        self.state_independent_diffusion = log_scale

    def _rates(self, y):
        """``(alpha - beta X2, delta X1 - gamma)`` per unit of each species, shape ``y.shape``."""
        x1, x2 = (y.exp() if self.log_scale else y).unbind(-1)
        prey, predator = self.alpha - self.beta * x2, self.delta * x1 - self.gamma
        return torch.stack(torch.broadcast_tensors(prey, predator), -1)

    def f(self, t: float | torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        rates = self._rates(y)
        if self.log_scale:
            return rates - 0.5 * self.sigma.unsqueeze(-1) ** 2
        return y * rates

    def g(self, t: float | torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sigma = self.sigma.unsqueeze(-1)
        if self.log_scale:
            return sigma.expand(torch.broadcast_shapes(sigma.shape[:-1], y.shape[:-1]) + (2,))
        return sigma * y

    def diffusion_factor(self, t: float | torch.Tensor | None, y: torch.Tensor | None) -> DiffusionFactor:
        if self.log_scale:  # a constant: no need to expand it to the states
            return DiffusionFactor(self.sigma.unsqueeze(-1).expand(self.sigma.shape + (2,)), True)
        return DiffusionFactor(self.g(t, y), True)


# --------------------------------------------------------------------------------------------------
# landmarks
# --------------------------------------------------------------------------------------------------


def gaussian_kernel(
    x: torch.Tensor, y: torch.Tensor, alpha: float | torch.Tensor, gamma: float | torch.Tensor
) -> torch.Tensor:
    """``K_ij = alpha exp(-|x_i - y_j|^2 / (2 gamma))`` for ``x`` ``(..., k, m)``, ``y`` ``(..., l, m)``."""
    sq = (x.unsqueeze(-2) - y.unsqueeze(-3)).pow(2).sum(-1)
    return alpha * torch.exp(-0.5 * sq / gamma)


class _Landmarks(SDE):
    noise_type = "general"

    def __init__(
        self, num_landmarks: int, landmark_dim: int, sigma: float | torch.Tensor, alpha: float, gamma: float
    ):
        if num_landmarks < 1 or landmark_dim < 1:
            raise ValueError("num_landmarks and landmark_dim must be positive")
        super().__init__(num_landmarks * landmark_dim)
        sigma = _check_positive("sigma", sigma)
        _check_positive("alpha", alpha)
        _check_positive("gamma", gamma)
        self.num_landmarks, self.landmark_dim = num_landmarks, landmark_dim
        self.alpha, self.gamma = float(alpha), float(gamma)
        self.register_params(sigma=(sigma, 0))

    def _kernel_kron(self, q):
        """``K(q) kron I_m`` of shape ``(..., d, d)`` for landmarks ``q`` of shape ``(..., k, m)``."""
        K = gaussian_kernel(q, q, self.alpha, self.gamma)
        eye = torch.eye(self.landmark_dim, dtype=K.dtype, device=K.device)
        return (K[..., :, None, :, None] * eye[:, None, :]).reshape(K.shape[:-2] + (self.dim, self.dim))

    def _g_from_shape(self, q):
        """``sigma K(q) kron I_m``."""
        return self.sigma[..., None, None] * self._kernel_kron(q)

    def f(self, t: float | torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(y)

    def linear_auxiliary(self, t: float | torch.Tensor, v: torch.Tensor) -> LinearAuxiliary:
        a = self.diffusion_factor(t, v).matrix()
        B = torch.zeros(a.shape, dtype=v.dtype, device=v.device)
        return LinearAuxiliary(B, torch.zeros_like(v), a, False)


class LandmarkBrownian(_Landmarks):
    """Brownian motion of ``k`` landmarks in ``R^m`` with a fixed Gaussian-kernel covariance.

    ``dX = sigma (K(q) kron I_m) dW``, ``K_ij = alpha exp(-|q_i - q_j|^2 / (2 gamma))`` evaluated at a
    fixed reference shape ``q`` (``(k, m)``). State: landmarks flattened row-major to ``d = k m``.
    Exact transition ``N(x0, sigma^2 t (K K^T kron I))`` -- a high-dimensional exact test case.

    :param reference: ``(k, m)`` reference shape. :param sigma: scale, shape ``batch_shape``.
    :param float alpha: kernel amplitude. :param float gamma: kernel variance (squared length scale).
    """

    state_independent_diffusion = True

    def __init__(
        self,
        reference: torch.Tensor,
        sigma: float | torch.Tensor = 1.0,
        *,
        alpha: float = 1.0,
        gamma: float = 0.1,
    ):
        if not torch.is_tensor(reference) or reference.dim() != 2:
            raise ValueError("reference must be a (num_landmarks, landmark_dim) tensor")
        super().__init__(reference.shape[0], reference.shape[1], sigma, alpha, gamma)
        self.reference = reference
        self._unit_factor = None

    def _unit(self, dtype, device):
        """QR factor of ``K(q) kron I`` (sigma = 1), computed once."""
        if self._unit_factor is None or self._unit_factor.tril.dtype != dtype:
            q = self.reference.to(dtype=dtype, device=device)
            self._unit_factor = factor_from_g(self._kernel_kron(q), False)
        return self._unit_factor

    def g(self, t: float | torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        g = self._g_from_shape(self.reference.to(dtype=y.dtype, device=y.device))
        return g.expand(y.shape[:-1] + (self.dim, self.dim))

    def diffusion_factor(self, t: float | torch.Tensor | None, y: torch.Tensor | None) -> DiffusionFactor:
        dtype = torch.promote_types(self.sigma.dtype, self.reference.dtype)
        unit = self._unit(dtype, self.sigma.device)
        return DiffusionFactor(self.sigma[..., None, None] * unit.tril, False)

    def transition_log_prob(
        self, t0: float | torch.Tensor, x0: torch.Tensor, t1: float | torch.Tensor, x1: torch.Tensor
    ) -> torch.Tensor:
        tau = torch.as_tensor(t1, dtype=x1.dtype, device=x1.device) - t0
        return self.diffusion_factor(None, None).log_normal(x1 - x0, tau)


class KunitaFlow(_Landmarks):
    """Kunita flow of landmarks: ``dX = sigma (K(X_t) kron I_m) dW`` with the kernel at the current
    shape (state-dependent diffusion; no closed-form transition).

    :param int num_landmarks: ``k``. :param int landmark_dim: ``m``. :param sigma: shape ``batch_shape``.
    :param float alpha: kernel amplitude. :param float gamma: kernel variance.
    """

    def __init__(
        self,
        num_landmarks: int,
        sigma: float | torch.Tensor = 1.0,
        *,
        landmark_dim: int = 2,
        alpha: float = 1.0,
        gamma: float = 0.1,
    ):
        super().__init__(num_landmarks, landmark_dim, sigma, alpha, gamma)

    def g(self, t: float | torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._g_from_shape(y.reshape(y.shape[:-1] + (self.num_landmarks, self.landmark_dim)))
