"""Learned backward diffusion bridge (Heng et al. 2021) trained with the inversion-free objective.

The network learns the score of the *unconditioned* transition from the start ``u``,
``s(t, x) ~ grad_x log p(t, x | 0, u)`` (valid for every end point ``v`` and every interval length
``<= T``), by minimising over forward Euler paths from ``u``

    ``sum_m  delta s_m^T a_{m-1} s_m + 2 s_m^T (X_m - X_{m-1} - delta b_{m-1})``,   ``s_m = s(t_m, X_m)``,

which equals Heng's ``delta |s - g|_a^2`` up to a constant but needs no ``a^{-1}`` (the seed's
numerically stable objective; ``s^T a s = |L^T s|^2``). Amortised over ``u`` (an input), so one fit serves
all intervals of a data set. The bridge is then proposed backwards from ``v``:

    ``x_m = x_{m+1} + delta [-b + a s](t_{m+1}, x_{m+1}) + sqrt(delta t_m / t_{m+1}) L xi``

and weighted by Euler-density ratios (:mod:`.proposals`), so the estimate stays unbiased for the
Euler density whatever the network's quality; only its variance depends on the fit.
Parametrisation: ``s = L0^{-T} NN(t / T, z, u) / sqrt(t)``, ``z = L0^{-1}(x - u) / sqrt(t)``, ``L0 L0^T =
a(0, u)`` (triangular solves, no inverse), with a linear skip initialised to ``-z``: the network starts
at the Brownian score from ``u`` (the ``1/t`` singular part) and learns the correction.

Gradients in the SDE parameters flow through the reparametrised proposal paths and the network (the
pathwise gradient of ``log p^``). Holding the paths fixed instead (Fisher's identity,
``sum_j w~_j grad log p_theta(X_j)``) is cheaper but degenerates for diffusion parameters: the Euler
path density's score in ``sigma`` has variance growing with the number of substeps ``M`` (the bridge
laws for different ``sigma`` become mutually singular as ``M -> infinity``); measured on OU with
``M = 50``, 200 intervals, it was 26 against an exact 1.4, so it is not offered.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import trange

from ..._checks import positive_float, positive_int
from ...nn.control import FourierTimeEmbedding
from ...sde.integrate import euler_maruyama_step
from ...sde.models import SDE, DiffusionFactor
from .proposals import check_noise

__all__ = ["ScoreNetwork", "LearnedBridge", "stable_score_loss"]


class ScoreNetwork(nn.Module):
    """``p(t, z; u) = W z + MLP(emb(t / T), z, u)`` with ``W`` initialised to ``-I`` and a zero last layer
    (at initialisation the score is the Brownian one from ``u``, the ``1/t`` singular part).

    :param int dim: state dimension. :param int hidden_dim: width (default ``max(64, 2 dim)``).
    :param int num_layers: hidden layers. :param int num_frequencies: Fourier features of time.
    Shapes: ``t`` broadcastable to ``z.shape[:-1]``, ``z``/``u`` ``(..., d)``; returns ``(..., d)``.
    """

    def __init__(
        self, dim: int, *, hidden_dim: int | None = None, num_layers: int = 2, num_frequencies: int = 16
    ):
        super().__init__()
        h = hidden_dim or max(64, 2 * dim)
        self.dim = dim
        self.time_embedding = FourierTimeEmbedding(num_frequencies, max_frequency=20.0)
        self.time_net = nn.Linear(2 * num_frequencies, h)
        self.state_net = nn.Linear(2 * dim, h)
        self.hidden = nn.ModuleList([nn.Linear(h, h) for _ in range(num_layers - 1)])
        self.out = nn.Linear(h, dim)
        self.skip = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        with torch.no_grad():
            self.skip.weight.copy_(-torch.eye(dim))
        self.register_buffer("horizon", torch.tensor(1.0))

    def forward(self, t: float | torch.Tensor, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device)
        emb = self.time_embedding((t / self.horizon).unsqueeze(-1))
        hidden = self.time_net(emb) + self.state_net(torch.cat([z, u.expand_as(z)], -1))
        for layer in self.hidden:
            hidden = layer(F.silu(hidden))
        return self.skip(z) + self.out(F.silu(hidden))


def stable_score_loss(
    score: torch.Tensor,
    L: DiffusionFactor,
    drift: torch.Tensor,
    x_prev: torch.Tensor,
    x_next: torch.Tensor,
    delta: float | torch.Tensor,
) -> torch.Tensor:
    """``delta |L^T s|^2 + 2 s^T (x_next - x_prev - delta b)`` per step (no ``a^{-1}``).

    Shapes: all ``(..., d)`` (``L`` broadcasting); returns ``x_next.shape[:-1]``."""
    Lts = L.rmatvec(score)
    return delta * (Lts * Lts).sum(-1) + 2 * (score * (x_next - x_prev - delta * drift)).sum(-1)


class LearnedBridge:
    """A learned backward-bridge proposal for :class:`~pyro_sde.sde.distributions.DiscretelyObservedSDE`.

    :param int dim: state dimension. :param network: a score network (default :class:`ScoreNetwork`).
    :param float refit_rtol: relative parameter change (max over parameters) beyond which the bridge is
        stale. :param bool auto_refit: when stale, fine-tune at the new parameters (``refit_iterations``
        steps) inside ``log_weights``; otherwise warn once. A batch of parameter values (e.g. a
        vectorised Pyro particle plate) is never refitted: the bridge then warns once if any member is
        stale and keeps proposing (the weights stay exact; only their variance suffers).
    Use ``LearnedBridge(d).fit(sde, starts, T)`` then ``proposal=bridge``.
    """

    def __init__(
        self,
        dim: int,
        network: nn.Module | None = None,
        *,
        refit_rtol: float = 0.2,
        auto_refit: bool = True,
        refit_iterations: int = 100,
    ):
        self.dim = positive_int(dim, "dim")
        if network is not None and not isinstance(network, nn.Module):
            raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}")
        positive_float(refit_rtol, "refit_rtol")
        positive_int(refit_iterations, "refit_iterations")
        self.network = network if network is not None else ScoreNetwork(dim)
        self.refit_rtol, self.auto_refit, self.refit_iterations = refit_rtol, auto_refit, refit_iterations
        self.fit_params: dict | None = None
        self.losses: list[float] = []
        self._fit_args: dict | None = None
        self._warned = False

    # -- training ------------------------------------------------------------------------------
    def fit(
        self,
        sde: SDE,
        starts: torch.Tensor,
        horizon: float,
        *,
        num_iterations: int = 500,
        num_paths: int = 64,
        num_steps: int = 50,
        lr: float = 3e-3,
        progress_bar: bool = True,
    ) -> LearnedBridge:
        """Fit the score on forward Euler paths of ``sde`` (parameters detached) from ``starts``.

        :param starts: ``(n, d)`` start points (e.g. ``obs[:-1]``); each batch draws from them.
        :param float horizon: ``T``, at least the longest interval to bridge.
        :param int num_paths: paths per iteration (fresh each iteration). :param int num_steps: Euler steps.
        :returns: ``self``.
        """
        horizon = positive_float(horizon, "horizon")
        positive_float(lr, "lr")
        for name, value in [("num_iterations", num_iterations), ("num_paths", num_paths),
                            ("num_steps", num_steps)]:
            positive_int(value, name)
        starts = torch.as_tensor(starts)
        if starts.numel() == 0 or starts.numel() % self.dim or not torch.isfinite(starts).all():
            raise ValueError(
                f"starts must be finite points of shape (n, {self.dim}), got {tuple(starts.shape)}"
            )
        starts = starts.reshape(-1, self.dim).detach()
        dtype, device = starts.dtype, starts.device
        self.network.to(device=device)  # float32 weights: the proposal's weights stay exact anyway
        self.network.horizon.fill_(float(horizon))
        self._fit_args = dict(
            starts=starts, horizon=float(horizon), num_paths=num_paths, num_steps=num_steps, lr=lr
        )
        if sde.batch_shape != torch.Size():
            raise ValueError(
                f"fit needs one parameter value (batch_shape ()), got batch_shape {tuple(sde.batch_shape)}"
            )
        self.fit_params = {k: v.detach().clone() for k, v in sde.params().items()}
        opt = torch.optim.Adam(self.network.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, num_iterations, eta_min=lr / 20)
        K, delta = num_steps, float(horizon) / num_steps
        times = torch.arange(K + 1, dtype=dtype, device=device) * delta
        bar = trange(num_iterations, disable=not progress_bar, desc="LearnedBridge.fit")
        with torch.enable_grad():  # also when called (refit) inside torch.no_grad()
            for _ in bar:
                idx = torch.randint(len(starts), (num_paths,), device=device)
                u = starts[idx]
                with torch.no_grad():
                    xs, drifts, Ls = [u], [], []
                    x = u
                    for m in range(K):
                        b, L = sde.f(times[m], x), sde.diffusion_factor(times[m], x)
                        dw = L.matvec(torch.randn_like(x))
                        x = euler_maruyama_step(x, 1.0, delta, math.sqrt(delta), b, dw)
                        xs.append(x)
                        drifts.append(b)
                        Ls.append(L.tril)
                    X = torch.stack(xs)  # (K + 1, n, d)
                    b = torch.stack(drifts)
                    if not sde.state_independent_diffusion:
                        L = DiffusionFactor(torch.stack(Ls), L.diagonal)
                    L0 = sde.diffusion_factor(times[0], u)  # no gradient flows into the SDE parameters
                s = self._score(times[1:, None], X[1:], u, L0)
                loss = stable_score_loss(s, L, b, X[:-1], X[1:], delta).sum(0).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                self.losses.append(loss.item())
                if progress_bar:
                    bar.set_postfix(loss=f"{self.losses[-1]:.4g}")
        self._warned = False
        return self

    def _score(self, t, x, u, L0):
        """``s = L0^{-T} p(t, z, u) / sqrt(t)`` with ``z = L0^{-1}(x - u) / sqrt(t)`` (triangular solves
        against the factor ``L0`` of ``a(0, u)``: inputs and outputs are O(1) whatever the scale of ``a``).
        The network runs in its own dtype."""
        dtype = next(self.network.parameters()).dtype
        sqrt_t = torch.as_tensor(t, dtype=x.dtype, device=x.device).sqrt().unsqueeze(-1)
        z = L0.solve(x - u) / sqrt_t
        t = torch.as_tensor(t, dtype=dtype, device=x.device)
        p = self.network(t, z.to(dtype), u.to(dtype)).to(x.dtype)
        return L0.solve_transpose(p) / sqrt_t

    def is_stale(self, sde: SDE) -> bool:
        """Whether the parameters moved more than ``refit_rtol`` (relative) from the fitted ones."""
        if self.fit_params is None:
            return True
        for k, v in sde.params().items():
            ref = self.fit_params.get(k)
            if ref is None:
                continue
            v = v.detach()
            try:
                torch.broadcast_shapes(v.shape, ref.shape)
            except RuntimeError:
                return True
            rel = ((v - ref).abs() / ref.abs().clamp(min=1e-8)).max()
            if rel > self.refit_rtol:
                return True
        return False

    def _maybe_refit(self, sde):
        if self.fit_params is None:
            raise RuntimeError("LearnedBridge is not fitted: call .fit(sde, starts, horizon) first")
        if not self.is_stale(sde):
            return
        if self.auto_refit and sde.batch_shape == torch.Size():
            args = dict(self._fit_args)
            self.fit(
                sde,
                args.pop("starts"),
                args.pop("horizon"),
                num_iterations=self.refit_iterations,
                progress_bar=False,
                **args,
            )
        elif not self._warned:
            warnings.warn(
                "SDE parameters moved far from those the bridge was fitted at; refit it"
                + (" (a batch of parameters is not refitted)" if sde.batch_shape != torch.Size() else ""),
                stacklevel=3,
            )
            self._warned = True

    # -- proposal ------------------------------------------------------------------------------
    def log_weights(
        self,
        sde: SDE,
        t0: float | torch.Tensor,
        dt: float | torch.Tensor,
        u: torch.Tensor,
        v: torch.Tensor,
        *,
        num_particles: int,
        num_substeps: int,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Same contract as :func:`~pyro_sde.infer.bridge.proposals.bridge_log_weights`: ``(N, *B)``.

        ``t0`` only enters through time-dependent models (the score is of the time-``t0`` transition,
        fitted at ``t0 = 0``: exact for time-homogeneous models).
        """
        self._maybe_refit(sde)
        X, log_q = self._propose(sde, t0, dt, u, v, num_particles, num_substeps, noise, generator)
        return self._log_target(sde, t0, dt, u, X) - log_q

    def _propose(self, sde, t0, dt, u, v, num_particles, num_substeps, noise, generator):
        """Backward bridge paths ``X`` ``(M + 1, N, *B, d)`` (``x_0 = u``, ``x_M = v``) and ``log q``."""
        N, M = num_particles, num_substeps
        batch = u.shape[:-1]
        t0 = torch.as_tensor(t0, dtype=u.dtype, device=u.device).expand(batch)
        dt = torch.as_tensor(dt, dtype=u.dtype, device=u.device).expand(batch)
        delta = (dt / M).unsqueeze(-1)
        sqrt_delta = delta.sqrt()
        x = v.expand((N,) + v.shape)
        L0 = sde.diffusion_factor(t0, u)
        if M > 1:
            if noise is None:
                noise = torch.randn((M - 1,) + x.shape, dtype=u.dtype, device=u.device, generator=generator)
            else:
                check_noise(noise, (M - 1,) + x.shape)
        states = [x]
        log_q = u.new_zeros(x.shape[:-1])
        for k in range(M - 1):  # from x_{m+1} to x_m, m = M-1 .. 1
            m = M - 1 - k
            s_rel = (m + 1) * delta.squeeze(-1)  # time since u
            t = t0 + s_rel
            b = sde.f(t, x)
            L = sde.diffusion_factor(t, x)
            score = self._score(s_rel, x, u, L0)
            drift = -b + L.matvec(L.rmatvec(score))
            rho = m / (m + 1)
            x_new = euler_maruyama_step(x, 1.0, delta, sqrt_delta * math.sqrt(rho), drift, L.matvec(noise[k]))
            # log q(x_m | x_{m+1}) = log N(sqrt(rho) L xi; 0, rho a) with an explicit log-determinant
            log_q = (
                log_q
                - 0.5 * (noise[k] * noise[k]).sum(-1)
                - L.log_abs_det()
                - 0.5 * self.dim * (math.log(2 * math.pi) + (rho * delta.squeeze(-1)).log())
            )
            x = x_new
            states.append(x)
        states.append(u.expand_as(x))
        return torch.stack(states[::-1]), log_q  # (M + 1, N, *B, d): x_0 = u, ..., x_M = v

    @staticmethod
    def _log_target(sde, t0, dt, u, X):
        """``sum_m log N(x_{m+1}; x_m + delta b(t_m, x_m), delta a(t_m, x_m))`` over the path: ``(N, *B)``."""
        M = X.shape[0] - 1
        batch = u.shape[:-1]
        t0 = torch.as_tensor(t0, dtype=u.dtype, device=u.device).expand(batch)
        delta = torch.as_tensor(dt, dtype=u.dtype, device=u.device).expand(batch) / M
        steps = torch.arange(M, dtype=u.dtype, device=u.device).view((M,) + (1,) * (X.dim() - 2))
        t = t0 + steps * delta
        b = sde.f(t, X[:-1])
        L = sde.diffusion_factor(t, X[:-1])
        return L.log_normal(X[1:] - X[:-1] - delta.unsqueeze(-1) * b, delta).sum(0)
