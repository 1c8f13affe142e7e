"""SDE paths and discretely observed SDEs as Pyro distributions (time at dim -2, state at dim -1).

* :class:`SDEPath` / :class:`EulerMaruyama`: a path on a time grid; ``log_prob`` is the Euler
  transition density (one step per grid interval), ``rsample`` the Euler chain (our loop or torchsde).
* :class:`DiscretelyObservedSDE`: observations at ``times``; ``log_prob`` is an importance-sampling
  estimate of ``sum_i log p(x_{i+1} | x_i)`` with diffusion-bridge proposals between observations
  (:mod:`pyro_sde.sde.bridges`, or a fitted :class:`~pyro_sde.infer.bridge.LearnedBridge`),
  differentiable in the SDE parameters; or the exact transition density (``proposal="exact"``) where
  the model has one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from pyro.distributions import Delta, TorchDistribution
from torch.distributions import constraints

from .._checks import positive_int
from ..diagnostics import _log_ess, psis
from .bridges import PROPOSALS, SUBSTEP_GRIDS, BridgeProposal, bridge_log_prob
from .integrate import euler_maruyama_step
from .models import SDE

__all__ = ["SDEPath", "EulerMaruyama", "DiscretelyObservedSDE"]


def _check_times(times) -> torch.Tensor:
    times = torch.as_tensor(times)
    if not times.dtype.is_floating_point:
        times = times.to(torch.get_default_dtype())
    if times.dim() != 1 or times.numel() < 2:
        raise ValueError(
            f"times must be a 1-D tensor with at least 2 entries, got shape {tuple(times.shape)}"
        )
    if not torch.isfinite(times).all():
        raise ValueError("times must be finite")
    if not (times[1:] > times[:-1]).all():
        raise ValueError("times must be strictly increasing")
    return times


def _check_sde(sde):
    if not isinstance(sde, SDE):
        raise TypeError(
            f"sde must be a pyro_sde SDE (wrap torchsde modules in TorchsdeModel), got {type(sde)}"
        )


def _initial_dist(initial, dim):
    if initial is None or isinstance(initial, torch.distributions.Distribution):
        if initial is not None and initial.event_shape != (dim,):
            raise ValueError(f"initial must have event_shape ({dim},), got {tuple(initial.event_shape)}")
        return initial
    x0 = torch.as_tensor(initial)
    if x0.shape[-1:] != (dim,):
        raise ValueError(f"initial state must have trailing dimension {dim}, got shape {tuple(x0.shape)}")
    return Delta(x0, event_dim=1)


def _intervals(times, value):
    """``u, v`` of shape ``(T-1, *batch, d)`` and ``t0, dt`` of shape ``(T-1, 1, ..., 1)``."""
    x = value.movedim(-2, 0)
    shape = (times.numel() - 1,) + (1,) * (value.dim() - 2)
    times = times.to(dtype=value.dtype, device=value.device)
    return x[:-1], x[1:], times[:-1].reshape(shape), (times[1:] - times[:-1]).reshape(shape)


class _PathBase(TorchDistribution):
    arg_constraints: dict = {}
    support = constraints.independent(constraints.real, 2)

    def _setup(self, sde, times, initial, validate_args):
        _check_sde(sde)
        self.sde = sde
        self.times = _check_times(times)
        self.initial = _initial_dist(initial, sde.dim)
        batch = sde.batch_shape
        if self.initial is not None:
            batch = torch.broadcast_shapes(batch, self.initial.batch_shape)
        super().__init__(batch, (self.times.numel(), sde.dim), validate_args=validate_args)

    def _float_dtype(self):
        """The floating dtype of the SDE's parameters (the default dtype if it has none)."""
        params = [p for p in self.sde.params().values() if p.is_floating_point()]
        return params[0].dtype if params else torch.get_default_dtype()

    def _check_value(self, value):
        """``value`` as a floating tensor (integer observations promoted to the parameters' dtype),
        expanded to ``batch_shape + (T, d)``."""
        value = torch.as_tensor(value)
        if not value.is_floating_point():
            value = value.to(self._float_dtype())
        if value.dim() < 2 or value.shape[-2:] != self.event_shape:
            raise ValueError(
                f"value must have shape (..., {self.event_shape[0]}, {self.event_shape[1]}) "
                f"(times x state dim), got {tuple(value.shape)}"
            )
        if self._validate_args and not torch.isfinite(value).all():
            bad = "NaN" if torch.isnan(value).any() else "inf"
            raise ValueError(f"value (observations) contain {bad}")
        batch = torch.broadcast_shapes(value.shape[:-2], self.batch_shape)
        return value.expand(batch + self.event_shape)

    def _initial_log_prob(self, value):
        if self.initial is None:
            return 0.0
        return self.initial.log_prob(value[..., 0, :])

    def _draw_initial(self, sample_shape):
        if self.initial is None:
            raise NotImplementedError("sampling needs an initial distribution (initial=...)")
        init = self.initial.expand(self.batch_shape)
        return init.rsample(sample_shape) if init.has_rsample else init.sample(sample_shape)

    def expand(
        self, batch_shape: torch.Size | tuple[int, ...], _instance: _PathBase | None = None
    ) -> _PathBase:
        new = self._get_checked_instance(type(self), _instance)
        batch_shape = torch.Size(batch_shape)
        new.__dict__.update({k: v for k, v in self.__dict__.items() if not k.startswith("_")})
        if self.initial is not None:
            new.initial = self.initial.expand(batch_shape)
        super(_PathBase, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new


class SDEPath(_PathBase):
    """Distribution over a path ``x(t_0), ..., x(t_{T-1})`` of an SDE on a time grid (Euler density).

    ``log p(x) = log p_0(x_0) + sum_k log N(x_{k+1}; x_k + dt_k f(t_k, x_k), dt_k a(t_k, x_k))``.

    :param SDE sde: the model (:mod:`pyro_sde.sde.models`).
    :param times: strictly increasing grid ``(T,)``.
    :param initial: distribution of ``x_0`` (event shape ``(d,)``) or a fixed state ``(..., d)``.
    :param str backend: ``rsample`` by ``"euler"`` (our batched loop) or ``"torchsde"``
        (``torchsde.sdeint(method="euler")``; needs a uniform grid).
    Shapes: ``batch_shape`` = broadcast of the SDE's and ``initial``'s; ``event_shape = (T, d)``.
    """

    has_rsample = True

    def __init__(
        self,
        sde: SDE,
        times: torch.Tensor | Sequence[float],
        initial: torch.distributions.Distribution | torch.Tensor,
        *,
        backend: str = "euler",
        validate_args: bool | None = None,
    ):
        if initial is None:
            raise ValueError("SDEPath needs an initial distribution or state")
        if backend not in ("euler", "torchsde"):
            raise ValueError(f"backend must be 'euler' or 'torchsde', got {backend!r}")
        self.backend = backend
        self._setup(sde, times, initial, validate_args)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        value = self._check_value(value)
        x, x_next, t, dt = _intervals(self.times, value)
        drift = self.sde.f(t, x)
        L = self.sde.diffusion_factor(t, x)
        steps = L.log_normal(x_next - x - dt.unsqueeze(-1) * drift, dt)
        return self._initial_log_prob(value) + steps.sum(0)

    def rsample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        x0 = self._draw_initial(torch.Size(sample_shape))
        times = self.times.to(dtype=x0.dtype, device=x0.device)
        if self.backend == "torchsde":
            return self._torchsde(x0, times)
        states = [x0]
        x = x0
        for k in range(times.numel() - 1):
            dt = times[k + 1] - times[k]
            g = self.sde.g(times[k], x)
            if self.sde.noise_type == "diagonal":
                dw = g * torch.randn_like(x)
            else:
                xi = torch.randn(x.shape[:-1] + g.shape[-1:], dtype=x.dtype, device=x.device)
                dw = (g @ xi.unsqueeze(-1)).squeeze(-1)
            x = euler_maruyama_step(x, 1.0, dt, dt.sqrt(), self.sde.f(times[k], x), dw)
            states.append(x)
        return torch.stack(states, -2)

    def _torchsde(self, x0, times):
        import torchsde

        steps = times[1:] - times[:-1]
        if not torch.allclose(steps, steps[0].expand_as(steps), rtol=1e-6):
            raise ValueError("backend='torchsde' needs a uniform time grid")
        shape = x0.shape
        flat = _FlatSDE(self.sde, shape)
        ys = torchsde.sdeint(flat, x0.reshape(-1, shape[-1]), times, method="euler", dt=float(steps[0]))
        return ys.reshape((times.numel(),) + shape).movedim(0, -2)


class _FlatSDE(torch.nn.Module):
    """View of a batched SDE as torchsde's ``(batch, d)`` states."""

    sde_type = "ito"

    def __init__(self, sde, shape):
        super().__init__()
        self.sde, self.shape = sde, shape
        self.noise_type = sde.noise_type

    def f(self, t, y):
        return self.sde.f(t, y.reshape(self.shape)).reshape(y.shape)

    def g(self, t, y):
        g = self.sde.g(t, y.reshape(self.shape))
        if self.noise_type == "diagonal":
            return g.reshape(y.shape)
        return g.reshape(y.shape + g.shape[-1:])


class EulerMaruyama(SDEPath):
    """:class:`SDEPath` with NumPyro's argument order ``EulerMaruyama(t, sde, init_dist)``."""

    def __init__(
        self,
        t: torch.Tensor | Sequence[float],
        sde: SDE,
        init_dist: torch.distributions.Distribution | torch.Tensor,
        *,
        backend: str = "euler",
        validate_args: bool | None = None,
    ):
        super().__init__(sde, t, init_dist, backend=backend, validate_args=validate_args)


class DiscretelyObservedSDE(_PathBase):
    """Observations of an SDE at ``times``, with an importance-sampling transition likelihood.

    ``log_prob(x) = log p_0(x_0) + sum_i log (1/N) sum_j w_ij`` where ``w_ij`` are the bridge importance
    weights of interval ``i`` (:func:`pyro_sde.sde.bridges.bridge_log_weights`), computed with
    ``logsumexp`` in float64. Differentiable in the SDE parameters (reparametrised proposals), so usable
    with SVI / MAP / our samplers.

    :param SDE sde: the model. :param times: strictly increasing observation times ``(T,)``.
    :param proposal: ``"guided"`` (guided proposal with the continuous-time weight: exact for linear
        models, converges to the SDE's density as ``M`` grows), ``"mdb"`` (modified diffusion bridge),
        ``"guided_euler"`` (guided drift, MDB variance), ``"forward"`` (Pedersen; these three: ``E[w]`` is
        the ``M``-step Euler density, bias O(1/M)), ``"euler"`` (no imputation), ``"exact"``
        (closed-form transition density of the model), or a fitted
        :class:`~pyro_sde.infer.bridge.LearnedBridge`.
    :param int num_particles: bridges per interval ``N``. :param int num_substeps: Euler substeps ``M``.
    :param str substep_grid: ``"uniform"`` or ``"time_change"`` (``t0 + dt tau(m / M)``,
        ``tau(s) = s (2 - s)``: finer steps near each observation).
    :param bool richardson: ``2 log p^_{2M} - log p^_M`` per interval (first-order discretisation bias
        removed; the two estimates share their Brownian increments). Costs ``3 M`` substeps per particle,
        3x the plain estimate; not with ``"euler"`` / ``"exact"``.
    :param initial: optional distribution (or fixed state) of ``x(t_0)``; without it ``x(t_0)`` is
        conditioned on (contributes 0) and :meth:`sample` is unavailable.
    :param seed: if given, the proposal noise is drawn from a generator with this seed at every call
        (common random numbers: a smooth, deterministic objective for MAP / L-BFGS). The noise is shared
        across the parameters' batch dims (member ``i`` of a batched ``log_prob`` equals the unbatched
        one at parameter ``i``, as Pyro's vectorised particles and our samplers need).
    After each ``log_prob``, :meth:`diagnostics` gives the ESS and Pareto k of every interval (of the
    ``2M`` estimate with ``richardson``).
    """

    has_rsample = False

    def __init__(
        self,
        sde: SDE,
        times: torch.Tensor | Sequence[float],
        *,
        proposal: str | BridgeProposal = "mdb",
        num_particles: int = 64,
        num_substeps: int = 20,
        substep_grid: str = "uniform",
        richardson: bool = False,
        initial: torch.distributions.Distribution | torch.Tensor | None = None,
        seed: int | None = None,
        validate_args: bool | None = None,
    ):
        if isinstance(proposal, str):
            if proposal not in PROPOSALS + ("exact",):
                raise ValueError(f"unknown proposal {proposal!r}; expected one of {PROPOSALS + ('exact',)}")
            if proposal == "exact" and not sde.has_transition_log_prob:
                raise ValueError(f"{type(sde).__name__} has no closed-form transition density")
            if richardson and proposal in ("euler", "exact"):
                raise ValueError(f"richardson=True needs imputed substeps; proposal={proposal!r} has none")
        elif not hasattr(proposal, "log_weights"):
            raise TypeError("proposal must be a string or a LearnedBridge")
        elif substep_grid != "uniform":
            raise ValueError("substep_grid must be 'uniform' with a learned bridge")
        positive_int(num_particles, "num_particles")
        positive_int(num_substeps, "num_substeps")
        if substep_grid not in SUBSTEP_GRIDS:
            raise ValueError(f"substep_grid must be one of {SUBSTEP_GRIDS}, got {substep_grid!r}")
        if not isinstance(richardson, bool):
            raise TypeError(f"richardson must be a bool, got {type(richardson).__name__}")
        self.proposal, self.num_particles, self.num_substeps = proposal, num_particles, num_substeps
        self.substep_grid, self.richardson = substep_grid, richardson
        self.seed = seed
        self.last_log_weights = None
        self._setup(sde, times, initial, validate_args)

    def _noise(self, value_batch, u, N, M):
        """Common random numbers ``(M-1, N, T-1, *value_batch padded with 1s, d)`` or ``None``.

        The noise depends on the observations' own batch shape only, never on the parameters': a
        batch of parameter values (e.g. Pyro's vectorised particle plate) shares the same proposal
        noise, so member ``i`` of a batched ``log_prob`` equals the unbatched ``log_prob`` at
        parameter ``i`` (a deterministic function of the parameters)."""
        if self.seed is None or M < 2:
            return None
        pad = (1,) * (u.dim() - 2 - len(value_batch))
        shape = (M - 1, N, u.shape[0]) + pad + tuple(value_batch) + (u.shape[-1],)
        gen = torch.Generator(device=u.device)
        gen.manual_seed(self.seed)
        return torch.randn(shape, generator=gen, dtype=u.dtype, device=u.device)

    def _estimate(self, value):
        """``(log p^ per interval (T-1, *batch), log weights (N, T-1, *batch))``."""
        value_batch = torch.as_tensor(value).shape[:-2]
        value = self._check_value(value)
        u, v, t0, dt = _intervals(self.times, value)
        N, M = self.num_particles, self.num_substeps
        if self.proposal == "euler":
            N, M = 1, 1
        noise = self._noise(value_batch, u, N, 2 * M if self.richardson else M)
        return bridge_log_prob(
            self.sde,
            t0,
            dt,
            u,
            v,
            proposal=self.proposal,
            num_particles=N,
            num_substeps=M,
            substep_grid=self.substep_grid,
            richardson=self.richardson,
            noise=noise,
        )

    def interval_log_weights(self, value: torch.Tensor) -> torch.Tensor:
        """Log weights ``(N, T-1, *batch)`` of every interval (no reduction; the ``2M`` estimate's
        with ``richardson``)."""
        return self._estimate(value)[1]

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self.proposal == "exact":
            value = self._check_value(value)
            u, v, t0, dt = _intervals(self.times, value)
            return self._initial_log_prob(value) + self.sde.transition_log_prob(t0, u, t0 + dt, v).sum(0)
        ll, log_w = self._estimate(value)
        self.last_log_weights = log_w.detach()
        total = ll.to(torch.float64).sum(0).to(ll.dtype)  # the evidence accumulates in float64
        return self._initial_log_prob(self._check_value(value)) + total

    def diagnostics(self) -> dict:
        """ESS (normalised, ``(sum w)^2 / (N sum w^2)`` in (0, 1]) and PSIS Pareto k of the bridge weights
        of every interval of the last ``log_prob`` call: ``{"ess": (T-1, *batch), "pareto_k": (T-1, *batch)}``
        (``k`` is NaN with one particle and ``-inf`` where all weights are equal, as the guided proposal's
        on a linear model; ESS < 0.5 or ``k > 0.7`` flags a failing proposal)."""
        if self.last_log_weights is None:
            raise RuntimeError("call log_prob first")
        lw = self.last_log_weights
        n = lw.shape[0]
        ess = _log_ess(lw).exp()  # all intervals at once
        flat = lw.reshape(n, -1)
        if n >= 2:  # PSIS fits one generalised Pareto tail per interval
            k = torch.stack([psis(flat[:, j])[1] for j in range(flat.shape[1])]).reshape(lw.shape[1:])
            spread = lw.amax(0) - lw.amin(0)
            constant = spread <= 1e-9 * (1 + lw.abs().amax(0))  # an exact proposal: no tail to fit
            k = torch.where(constant, torch.full_like(k, -math.inf), k)
        else:
            k = torch.full_like(ess, math.nan)
        return {"ess": ess, "pareto_k": k}

    @torch.no_grad()
    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        """Simulate with ``num_substeps`` Euler steps per interval (exactly the model ``log_prob``
        estimates), returning the states at ``times``: ``sample_shape + batch_shape + (T, d)``."""
        x = self._draw_initial(torch.Size(sample_shape))
        times = self.times.to(dtype=x.dtype, device=x.device)
        M = self.num_substeps
        out = [x]
        for k in range(times.numel() - 1):
            delta = (times[k + 1] - times[k]) / M
            for m in range(M):
                t = times[k] + m * delta
                L = self.sde.diffusion_factor(t, x)
                x = euler_maruyama_step(
                    x, 1.0, delta, delta.sqrt(), self.sde.f(t, x), L.matvec(torch.randn_like(x))
                )
            out.append(x)
        return torch.stack(out, -2)
