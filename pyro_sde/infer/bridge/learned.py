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

import contextlib
import math
import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import trange

from ..._checkpoint import load_checkpoint, package_version, save_checkpoint
from ..._checks import nonnegative_int, positive_float, positive_int
from ...nn.control import FourierTimeEmbedding
from ...sde.integrate import euler_maruyama_step
from ...sde.models import SDE, DiffusionFactor
from .proposals import check_noise

__all__ = ["ScoreNetwork", "LearnedBridge", "stable_score_loss"]


class ScoreNetwork(nn.Module):
    """``p(t, z; u, theta) = W z + G(t, u, theta) * z + MLP(emb(t / T), z, u, theta)`` with ``W``
    initialised to ``-I`` and zero gain ``G`` and last layer (at initialisation the score is the Brownian
    one from ``u``, the ``1/t`` singular part). The gain ``G`` (per coordinate) carries the time- and
    parameter-dependent contraction of the score (``theta t / (1 - e^{-2 theta t})`` on OU) that an MLP of
    ``(t, z)`` only approximates.

    :param int dim: state dimension. :param int parameter_dim: length of the conditioning vector
        ``theta`` (0: none, the per-parameter bridge). :param int hidden_dim: width (default
        ``max(64, 2 dim)``). :param int num_layers: hidden layers. :param int num_frequencies: Fourier
        features of time.
    Shapes: ``t`` broadcastable to ``z.shape[:-1]``, ``z``/``u`` ``(..., d)``, ``theta`` ``(..., p)``;
    returns ``(..., d)``. :meth:`context` (everything but ``z``) is computed once for all substeps of a
    proposal and :meth:`step` once per substep.
    """

    def __init__(
        self,
        dim: int,
        *,
        parameter_dim: int = 0,
        hidden_dim: int | None = None,
        num_layers: int = 2,
        num_frequencies: int = 16,
    ):
        super().__init__()
        positive_int(dim, "dim")
        nonnegative_int(parameter_dim, "parameter_dim")
        h = hidden_dim or max(64, 2 * dim)
        self.dim, self.parameter_dim = dim, parameter_dim
        self.config = dict(dim=dim, parameter_dim=parameter_dim, hidden_dim=h, num_layers=num_layers,
                           num_frequencies=num_frequencies)
        self.time_embedding = FourierTimeEmbedding(num_frequencies, max_frequency=20.0)
        self.time_net = nn.Linear(2 * num_frequencies, h)
        self.context_net = nn.Linear(dim + parameter_dim, h)
        self.state_net = nn.Linear(dim, h)
        self.hidden = nn.ModuleList([nn.Linear(h, h) for _ in range(num_layers - 1)])
        self.out = nn.Linear(h, dim)
        self.gain = nn.Linear(h, dim)
        self.skip = nn.Linear(dim, dim, bias=False)
        for layer in (self.out, self.gain):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        with torch.no_grad():
            self.skip.weight.copy_(-torch.eye(dim))
        self.register_buffer("horizon", torch.tensor(1.0))

    def context(
        self, t: torch.Tensor, u: torch.Tensor, theta: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``z``-free part: ``(hidden (..., h), gain (..., d))`` for times ``t`` ``(...)`` (broadcasting
        against ``u.shape[:-1]``), starts ``u`` ``(..., d)`` and parameters ``theta`` ``(..., p)``."""
        if self.parameter_dim:
            if theta is None or theta.shape[-1] != self.parameter_dim:
                got = None if theta is None else tuple(theta.shape)
                raise ValueError(f"theta must have trailing size {self.parameter_dim}, got {got}")
            shape = torch.broadcast_shapes(u.shape[:-1], theta.shape[:-1])
            u = torch.cat([u.expand(shape + u.shape[-1:]), theta.expand(shape + theta.shape[-1:])], -1)
        emb = self.time_embedding((t / self.horizon).unsqueeze(-1))
        hidden = self.time_net(emb) + self.context_net(u)
        return hidden, self.gain(F.silu(hidden))

    def step(self, z: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """``p`` at ``z`` ``(..., d)`` given :meth:`context` (broadcasting)."""
        hidden, gain = context  # F.linear, not the modules' __call__: this runs once per substep
        hidden = F.linear(z, self.state_net.weight, self.state_net.bias) + hidden
        for layer in self.hidden:
            hidden = F.linear(F.silu(hidden), layer.weight, layer.bias)
        out = F.linear(F.silu(hidden), self.out.weight, self.out.bias)
        return F.linear(z, self.skip.weight) + gain * z + out

    def forward(
        self, t: float | torch.Tensor, z: torch.Tensor, u: torch.Tensor, theta: torch.Tensor | None = None
    ) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device)
        return self.step(z, self.context(t, u, theta))


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
    """A learned backward-bridge proposal for :class:`~pyro_sde.sde.distributions.DiscretelyObservedSDE`,
    fitted at one parameter value (see :class:`~pyro_sde.infer.bridge.AmortisedBridge` for one fit over a
    range of parameters).

    :param int dim: state dimension. :param network: a score network (default :class:`ScoreNetwork`).
    :param float refit_rtol: relative parameter change (max over parameters) beyond which the bridge is
        stale. :param bool auto_refit: when stale, fine-tune at the new parameters (``refit_iterations``
        steps) inside ``log_weights``; otherwise warn once. A batch of parameter values (e.g. a
        vectorised Pyro particle plate) is never refitted: the bridge then warns once if any member is
        stale and keeps proposing (the weights stay exact; only their variance suffers).
    Use ``LearnedBridge(d).fit(sde, starts, T)`` then ``proposal=bridge``; :meth:`save` / :meth:`load`.
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
        _check_network(network)
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
        starts, horizon = self._check_fit_args(starts, horizon, num_iterations, num_paths, num_steps, lr)
        if sde.batch_shape != torch.Size():
            raise ValueError(
                f"fit needs one parameter value (batch_shape ()), got batch_shape {tuple(sde.batch_shape)}"
            )
        self._fit_args = dict(starts=starts, horizon=horizon, num_paths=num_paths, num_steps=num_steps, lr=lr)
        self.fit_params = {k: v.detach().clone() for k, v in sde.params().items()}
        self._train(lambda n: (sde, None), starts, horizon, num_iterations, num_paths, num_steps, lr,
                    progress_bar)
        return self

    def _check_fit_args(self, starts, horizon, num_iterations, num_paths, num_steps, lr):
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
        if not starts.is_floating_point():
            starts = starts.to(torch.get_default_dtype())
        return starts.reshape(-1, self.dim).detach(), horizon

    def _train(self, draw, starts, horizon, num_iterations, num_paths, num_steps, lr, progress_bar):
        """Minimise :func:`stable_score_loss` on fresh forward Euler paths; ``draw(n)`` gives the SDE the
        ``n`` paths follow (a batch of ``n`` parameter values, or one) and its conditioning vector."""
        dtype, device = starts.dtype, starts.device
        # the network follows the data's device; its weights keep their dtype (float32 by default: 3x
        # faster to train than float64 on CPU, and the proposal's weights stay exact in any precision)
        self.network.to(device=device)
        self.network.horizon.fill_(float(horizon))
        opt = torch.optim.Adam(self.network.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, num_iterations, eta_min=lr / 20)
        K, delta = num_steps, float(horizon) / num_steps
        times = torch.arange(K + 1, dtype=dtype, device=device) * delta
        bar = trange(num_iterations, disable=not progress_bar, desc=f"{type(self).__name__}.fit")
        with torch.enable_grad():  # also when called (refit) inside torch.no_grad()
            for _ in bar:
                u = starts[torch.randint(len(starts), (num_paths,), device=device)]
                with torch.no_grad():
                    sde, cond = draw(num_paths)
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
                s = self._score(times[1:, None], X[1:], u, L0, cond)
                loss = stable_score_loss(s, L, b, X[:-1], X[1:], delta).sum(0).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                self.losses.append(loss.item())
                if progress_bar:
                    bar.set_postfix(loss=f"{self.losses[-1]:.4g}")
        self._warned = False

    def _network_dtype(self):
        return next(self.network.parameters()).dtype

    def _score(self, t, x, u, L0, cond=None):
        """``s = L0^{-T} p(t, z, u) / sqrt(t)`` with ``z = L0^{-1}(x - u) / sqrt(t)`` (triangular solves
        against the factor ``L0`` of ``a(0, u)``: inputs and outputs are O(1) whatever the scale of ``a``)."""
        sqrt_t = torch.as_tensor(t, dtype=x.dtype, device=x.device).sqrt().unsqueeze(-1)
        z = L0.solve(x - u) / sqrt_t
        dtype = self._network_dtype()
        t = torch.as_tensor(t, dtype=dtype, device=x.device)
        args = (t, z.to(dtype), u.to(dtype)) + (() if cond is None else (cond.to(dtype),))
        return L0.solve_transpose(self.network(*args).to(x.dtype)) / sqrt_t

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

    def _prepare(self, sde):
        """Before proposing at ``sde``'s parameters: refit (or warn) when stale; the conditioning vector
        (``None``: the network does not see the parameters)."""
        if self.fit_params is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call .fit(sde, starts, horizon) first")
        if not self.is_stale(sde):
            return None
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
                stacklevel=4,
            )
            self._warned = True
        return None

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
        positive_int(num_particles, "num_particles")
        positive_int(num_substeps, "num_substeps")
        cond = self._prepare(sde)
        with _frozen(self.network):  # gradients reach the SDE parameters, not the network's weights
            X, log_q = self._propose(sde, t0, dt, u, v, num_particles, num_substeps, noise, generator, cond)
        return self._log_target(sde, t0, dt, u, X) - log_q

    def _propose(self, sde, t0, dt, u, v, num_particles, num_substeps, noise, generator, cond=None):
        """Backward bridge paths ``X`` ``(M + 1, N, *B, d)`` (``x_0 = u``, ``x_M = v``) and ``log q``.

        Everything that does not depend on the path (the network's time / start / parameter context,
        the step sizes, ``log q``: a function of the noise only) is computed for all substeps at once;
        the loop over substeps does the state-dependent work only."""
        N, M, d = num_particles, num_substeps, self.dim
        batch = u.shape[:-1]
        t0 = torch.as_tensor(t0, dtype=u.dtype, device=u.device).expand(batch)
        dt = torch.as_tensor(dt, dtype=u.dtype, device=u.device).expand(batch)
        delta = dt / M  # (*B)
        x = v.expand((N,) + v.shape)
        if M == 1:
            return torch.stack([u.expand_as(x), x]), u.new_zeros(x.shape[:-1])
        if noise is None:
            noise = torch.randn((M - 1,) + x.shape, dtype=u.dtype, device=u.device, generator=generator)
        else:
            check_noise(noise, (M - 1,) + x.shape)
        pad = (1,) * len(batch)
        m = torch.arange(M - 1, 0, -1, dtype=u.dtype, device=u.device)  # x_{m+1} -> x_m, m = M-1 .. 1
        rho = m / (m + 1)  # the variance shrinkage of the step into x_m
        s_rel = (m + 1).view((M - 1,) + pad) * delta  # (M - 1, *B): time since u
        sqrt_s = s_rel.sqrt().unsqueeze(-1)
        step_sd = (rho.view((M - 1,) + pad) * delta).sqrt().unsqueeze(-1)  # (M - 1, *B, 1)
        # log q(x_m | x_{m+1}) = log N(sqrt(rho) L xi; 0, rho delta a): the xi and rho parts, all steps
        log_q = -0.5 * (noise * noise).sum((0, -1)) - 0.5 * d * (
            (M - 1) * math.log(2 * math.pi) + (rho.log().sum() + (M - 1) * delta.log())
        )
        L0 = sde.diffusion_factor(t0, u)
        const = sde.state_independent_diffusion
        net, dtype = self.network, self._network_dtype()
        fast = isinstance(net, ScoreNetwork)
        if fast:
            cast = dtype != u.dtype
            ctx = net.context(s_rel.to(dtype), u.to(dtype), None if cond is None else cond.to(dtype))
        step = delta.unsqueeze(-1)
        if const:
            log_q = log_q - (M - 1) * L0.log_abs_det()
            kicks = step_sd.unsqueeze(1) * L0.matvec(noise)  # sqrt(rho delta) L xi, (M - 1, N, *B, d)
        if const and L0.diagonal:  # z = (x - u) / (L0 sqrt(s)), delta a s = delta L0 p / sqrt(s)
            to_z, from_p = 1 / (L0.tril * sqrt_s), step * L0.tril / sqrt_s
        states = [x]
        for k in range(M - 1):
            t = t0 + s_rel[k]
            b = sde.f(t, x)
            if fast:  # p from the precomputed context; s = L0^{-T} p / sqrt(s)
                z = (x - u) * to_z[k] if const and L0.diagonal else L0.solve(x - u) / sqrt_s[k]
                p = net.step(z.to(dtype) if cast else z, (ctx[0][k], ctx[1][k]))
                p = p.to(u.dtype) if cast else p
            else:
                p = L0.rmatvec(self._score(s_rel[k], x, u, L0, cond)) * sqrt_s[k]
            if const and L0.diagonal:
                x = x + (p * from_p[k] - step * b) + kicks[k]
            elif const:  # a s = L L^T L^{-T} p / sqrt(s) = L p / sqrt(s)
                x = x + step * (L0.matvec(p) / sqrt_s[k] - b) + kicks[k]
            else:
                L = sde.diffusion_factor(t, x)
                a_score = L.matvec(L.rmatvec(L0.solve_transpose(p) / sqrt_s[k]))
                x = x + step * (a_score - b) + step_sd[k] * L.matvec(noise[k])
                log_q = log_q - L.log_abs_det()
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

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the options, the network's weights (and its :class:`ScoreNetwork` options), the fitted
        state and the losses to ``path`` (atomically, with a checksum; tensors and plain values only,
        read back with ``torch.load(weights_only=True)``). A custom network is saved as its weights:
        :meth:`load` takes it again."""
        if self.fit_params is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: nothing to save")
        net = self.network
        payload = {
            "config": self._config(),
            "network_config": dict(net.config) if isinstance(net, ScoreNetwork) else None,
            "network": net.state_dict(),
            "fit": self._fit_state(),
            "losses": list(self.losses),
        }
        fingerprint = {"dim": self.dim, "network": type(net).__name__, "package version": package_version()}
        save_checkpoint(path, payload, kind=type(self).__name__, fingerprint=fingerprint)

    def _config(self) -> dict:
        return dict(refit_rtol=self.refit_rtol, auto_refit=self.auto_refit,
                    refit_iterations=self.refit_iterations)

    def _fit_state(self) -> dict:
        return {"fit_params": self.fit_params, "fit_args": self._fit_args}

    def _load_fit_state(self, state: dict) -> None:
        self.fit_params, self._fit_args = state["fit_params"], state["fit_args"]

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        /,
        *,
        network: nn.Module | None = None,
        map_location: str | torch.device | None = None,
        **options: Any,
    ) -> LearnedBridge:
        """Rebuild a bridge written by :meth:`save` (no pickled code runs; a damaged or foreign file raises
        ``ValueError``). :param network: the module, when the bridge was saved with a custom network (its
        weights are loaded into it). :param options: constructor options that are not saved
        (``parameters=`` of an :class:`AmortisedBridge`)."""
        ckpt = load_checkpoint(path, kind=cls.__name__, map_location=map_location)
        payload = ckpt.payload
        if network is None:
            if payload["network_config"] is None:
                raise ValueError(f"{os.fspath(path)!r} was saved with a custom {ckpt.fingerprint['network']} "
                                 "network: pass network=<a module of that architecture> to load")
            network = ScoreNetwork(**payload["network_config"])
        _check_network(network)
        state = payload["network"]
        ref = next(iter(state.values()))
        network.to(dtype=ref.dtype, device=ref.device)
        try:
            network.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"the weights in {os.fspath(path)!r} do not fit the network given "
                             f"(another architecture?): {e}") from e
        bridge = cls(ckpt.fingerprint["dim"], network, **payload["config"], **options)
        bridge._load_fit_state(payload["fit"])
        bridge.losses = list(payload["losses"])
        return bridge


@contextlib.contextmanager
def _frozen(network):
    """The network's weights without ``requires_grad`` inside the block (a proposal's backward pass then
    skips their gradients, half its cost)."""
    flags = [(p, p.requires_grad) for p in network.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _check_network(network):
    if network is not None and not isinstance(network, nn.Module):
        raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}")
