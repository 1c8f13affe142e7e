"""Reference processes of the learned diffusion samplers, as discrete-time Gaussian chains.

A sampler simulates the controlled generative chain on a grid ``0 = t_0 < ... < t_K = T``::

    x_{k+1} = a_k x_k + c_k v(t_k, x_k) + s_k xi_k,    xi_k ~ N(0, I),

where ``v`` is the control in score units (the drift of the SDE is ``f + sigma^2 v``). The target
path measure ``Q`` is built from the same reference so that the importance weight of a path is
exact for the *discrete* chain, ``E_P[w] = Z`` for any control and any step size:

* ``kind == "forward"`` (PIS, DDS): ``Q`` is the uncontrolled chain (``v = 0``) reweighted at the end,
  ``log w = log rho(x_K) - log p^ref_K(x_K) + sum_k [log F^ref_k - log F^v_k]``.
* ``kind == "backward"`` (DIS): ``Q`` starts at the target and runs a fixed noising chain backwards,
  ``x_k | x_{k+1} ~ N(b_k x_{k+1}, s_k^2)``, and
  ``log w = log rho(x_K) - log p_0(x_0) + sum_k [log B_k - log F^v_k]``. The two-control bridge
  adds a learned backward control ``u``: ``x_k | x_{k+1} ~ N(b_k x_{k+1} + c_k u(t_{k+1}, x_{k+1}), s_k^2)``.

The per-step log-ratio lives in :func:`pyro_sde.sde.integrate.log_ratio_increment`; the boundary
term lives here (:meth:`ReferenceProcess.boundary_log_weight`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = ["StepCoefficients", "ReferenceProcess", "BrownianReference", "VPReference", "OUReference"]


class StepCoefficients(NamedTuple):
    """Per-step coefficients of the chain, each a tensor of shape ``(K,)``."""

    times: torch.Tensor  #: (K + 1,) grid, ``times[k]`` is the time fed to the control at step k
    drift_scale: torch.Tensor  #: a_k, uncontrolled mean is ``a_k x_k``
    control_scale: torch.Tensor  #: c_k, the control enters the mean as ``c_k v``
    noise_std: torch.Tensor  #: s_k
    backward_scale: torch.Tensor | None  #: b_k for ``kind == "backward"``, else None


class ReferenceProcess:
    """Base class: a Gaussian reference chain with ``num_steps`` steps on ``[0, T]``.

    Subclasses define :meth:`_coefficients` (float64 tensors) and the initial distribution.
    """

    kind: str = "forward"

    def __init__(self, num_steps: int, T: float):
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        T = float(T)
        if not (T > 0 and math.isfinite(T)):
            raise ValueError(f"T must be positive and finite, got {T!r}")
        self.num_steps = num_steps
        self.T = T
        self._cache: dict = {}

    # -- to be provided by subclasses -------------------------------------------------------
    def _coefficients(self) -> StepCoefficients:  # float64
        raise NotImplementedError

    def sample_initial(
        self, num_samples: int, dim: int, *, dtype: torch.dtype | None, device: torch.device | str | None
    ) -> torch.Tensor:
        """Draw ``x_0``, shape ``(num_samples, dim)``."""
        raise NotImplementedError

    def boundary_log_weight(self, x0: torch.Tensor, xK: torch.Tensor) -> torch.Tensor:
        """The boundary part of ``log w`` other than ``log rho(x_K)``, shape ``(N,)``."""
        raise NotImplementedError

    def initial_log_prob(self, x0: torch.Tensor) -> torch.Tensor:
        """``log p_0(x_0)``; ``-inf`` off the support of a point mass."""
        raise NotImplementedError

    def initial_score(self, x: torch.Tensor) -> torch.Tensor:
        """``grad log p_0``, used by the DIS guide (lerp between prior and target scores)."""
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------------
    def coefficients(
        self, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None
    ) -> StepCoefficients:
        """Step coefficients cast to ``dtype``/``device`` (cached)."""
        key = (dtype, str(device))
        if key not in self._cache:
            c64 = self._coefficients()
            self._cache[key] = StepCoefficients(
                *(None if c is None else c.to(dtype=dtype, device=device) for c in c64)
            )
        return self._cache[key]

    def __repr__(self):
        return f"{type(self).__name__}(num_steps={self.num_steps}, T={self.T})"


class BrownianReference(ReferenceProcess):
    """Scaled Brownian motion from the origin (PIS): ``dX = sigma dW``, ``X_0 = 0``.

    The Euler chain is exact: ``x_K ~ N(0, sigma^2 T I)``, which is the reference terminal law.
    Defaults follow PIS / Richter & Berner: ``sigma = sqrt(0.2)``, ``T = 5`` (so ``Var X_T = 1``).
    """

    kind = "forward"

    def __init__(self, num_steps: int = 100, *, sigma: float = math.sqrt(0.2), T: float = 5.0):
        super().__init__(num_steps, T)
        sigma = float(sigma)
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.sigma = sigma

    def _coefficients(self):
        K, h, s2 = self.num_steps, self.T / self.num_steps, self.sigma**2
        ones = torch.ones(K, dtype=torch.float64)
        return StepCoefficients(
            times=torch.linspace(0.0, self.T, K + 1, dtype=torch.float64),
            drift_scale=ones,
            control_scale=ones * (s2 * h),
            noise_std=ones * math.sqrt(s2 * h),
            backward_scale=None,
        )

    def sample_initial(
        self, num_samples: int, dim: int, *, dtype: torch.dtype | None, device: torch.device | str | None
    ) -> torch.Tensor:
        return torch.zeros(num_samples, dim, dtype=dtype, device=device)

    def terminal_log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log N(x; 0, sigma^2 T I)``."""
        var = self.sigma**2 * self.T
        d = x.shape[-1]
        return -0.5 * (x * x).sum(-1) / var - 0.5 * d * math.log(2 * math.pi * var)

    def boundary_log_weight(self, x0: torch.Tensor, xK: torch.Tensor) -> torch.Tensor:
        return -self.terminal_log_prob(xK)

    def initial_log_prob(self, x0: torch.Tensor) -> torch.Tensor:
        return torch.where((x0 == 0).all(-1), 0.0, -math.inf).to(x0.dtype)

    def initial_score(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a point mass has no score")

    def __repr__(self):
        return f"BrownianReference(num_steps={self.num_steps}, sigma={self.sigma:.4g}, T={self.T})"


class VPReference(ReferenceProcess):
    """Variance-preserving (OU) noising process (DIS), run backwards from the target.

    Noising in diffusion time ``s``: ``dY = -beta(s)/2 Y ds + sqrt(beta(s)) dB`` with
    ``beta(s) = beta_min + (beta_max - beta_min) s / T``; its stationary law ``N(0, I)`` is the
    generative prior. Generative time is ``t = T - s``. On step k both kernels use the
    step-average ``beta_k = (1/h) int beta`` over the step (Euler):

    * generative ``x_{k+1} = (1 + beta_k h / 2) x_k + beta_k h v + sqrt(beta_k h) xi``
      (the ideal ``v`` is the score of the noised target, the reverse-time drift),
    * noising ``x_k | x_{k+1} ~ N((1 - beta_k h / 2) x_{k+1}, beta_k h I)``.

    Defaults follow DIS / Richter & Berner: ``beta`` from 0.1 to 10, ``T = 1``.
    """

    kind = "backward"

    def __init__(
        self, num_steps: int = 100, *, beta_min: float = 0.1, beta_max: float = 10.0, T: float = 1.0
    ):
        super().__init__(num_steps, T)
        if not (0 <= beta_min <= beta_max) or beta_max <= 0:
            raise ValueError(f"need 0 <= beta_min <= beta_max, beta_max > 0; got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max = float(beta_min), float(beta_max)
        h = self.T / num_steps
        if 0.5 * self.beta_max * h >= 1:
            raise ValueError(
                f"num_steps={num_steps} is too small for beta_max={beta_max}: need beta_max*T/num_steps < 2"
            )

    def beta(self, s: torch.Tensor) -> torch.Tensor:
        return self.beta_min + (self.beta_max - self.beta_min) * s / self.T

    def _coefficients(self):
        K, h = self.num_steps, self.T / self.num_steps
        times = torch.linspace(0.0, self.T, K + 1, dtype=torch.float64)
        # beta is linear, so its average over a step is its value at the midpoint (in s = T - t).
        beta_h = self.beta(self.T - 0.5 * (times[:-1] + times[1:])) * h
        return StepCoefficients(
            times=times,
            drift_scale=1 + 0.5 * beta_h,
            control_scale=beta_h,
            noise_std=beta_h.sqrt(),
            backward_scale=1 - 0.5 * beta_h,
        )

    def sample_initial(
        self, num_samples: int, dim: int, *, dtype: torch.dtype | None, device: torch.device | str | None
    ) -> torch.Tensor:
        return torch.randn(num_samples, dim, dtype=dtype, device=device)

    def initial_log_prob(self, x0: torch.Tensor) -> torch.Tensor:
        d = x0.shape[-1]
        return -0.5 * (x0 * x0).sum(-1) - 0.5 * d * math.log(2 * math.pi)

    def initial_score(self, x: torch.Tensor) -> torch.Tensor:
        return -x

    def boundary_log_weight(self, x0: torch.Tensor, xK: torch.Tensor) -> torch.Tensor:
        return -self.initial_log_prob(x0)

    def __repr__(self):
        return (
            f"VPReference(num_steps={self.num_steps}, beta_min={self.beta_min}, "
            f"beta_max={self.beta_max}, T={self.T})"
        )


class OUReference(ReferenceProcess):
    """Stationary Ornstein-Uhlenbeck reference with exponential-integrator steps (DDS, Vargas et al.).

    ``dX = -beta(t)/2 X dt + sigma sqrt(beta(t)) dW`` started at its invariant law ``N(0, sigma^2 I)``;
    ``beta`` runs from ``beta_max`` at ``t = 0`` down to ``beta_min`` at ``t = T`` (fine steps near the
    target). With ``B_k = int beta`` over step k the uncontrolled transition is exact,
    ``a_k = exp(-B_k / 2)``, ``s_k = sigma sqrt(1 - a_k^2)``, so every marginal is ``N(0, sigma^2 I)`` and
    the reference terminal law is known at any step size; the control enters through the integrated
    drift ``c_k = 2 sigma^2 (1 - a_k)`` (``~ sigma^2 beta_k h``). ``kind == "forward"``.
    """

    kind = "forward"

    def __init__(
        self,
        num_steps: int = 100,
        *,
        sigma: float = 1.0,
        beta_min: float = 0.1,
        beta_max: float = 10.0,
        T: float = 1.0,
    ):
        super().__init__(num_steps, T)
        if not (0 <= beta_min <= beta_max) or beta_max <= 0:
            raise ValueError(f"need 0 <= beta_min <= beta_max, beta_max > 0; got {beta_min}, {beta_max}")
        sigma = float(sigma)
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.sigma, self.beta_min, self.beta_max = sigma, float(beta_min), float(beta_max)

    def _coefficients(self):
        K, h = self.num_steps, self.T / self.num_steps
        times = torch.linspace(0.0, self.T, K + 1, dtype=torch.float64)
        s_mid = self.T - 0.5 * (times[:-1] + times[1:])  # noising time at the step's midpoint
        B = (self.beta_min + (self.beta_max - self.beta_min) * s_mid / self.T) * h
        a = torch.exp(-0.5 * B)
        return StepCoefficients(
            times=times,
            drift_scale=a,
            control_scale=-2 * self.sigma**2 * torch.expm1(-0.5 * B),
            noise_std=self.sigma * (-torch.expm1(-B)).sqrt(),
            backward_scale=None,
        )

    def sample_initial(
        self, num_samples: int, dim: int, *, dtype: torch.dtype | None, device: torch.device | str | None
    ) -> torch.Tensor:
        return self.sigma * torch.randn(num_samples, dim, dtype=dtype, device=device)

    def initial_log_prob(self, x0: torch.Tensor) -> torch.Tensor:
        d, var = x0.shape[-1], self.sigma**2
        return -0.5 * (x0 * x0).sum(-1) / var - 0.5 * d * math.log(2 * math.pi * var)

    terminal_log_prob = initial_log_prob  # stationary

    def initial_score(self, x: torch.Tensor) -> torch.Tensor:
        return -x / self.sigma**2

    def boundary_log_weight(self, x0: torch.Tensor, xK: torch.Tensor) -> torch.Tensor:
        return -self.terminal_log_prob(xK)

    def __repr__(self):
        return (
            f"OUReference(num_steps={self.num_steps}, sigma={self.sigma:.4g}, beta_min={self.beta_min}, "
            f"beta_max={self.beta_max}, T={self.T})"
        )
