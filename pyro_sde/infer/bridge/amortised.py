"""A learned backward bridge amortised over the SDE parameters: one fit serves a whole SVI / MAP / sampler
run, with no refits when the parameters move.

The score network of :class:`~pyro_sde.infer.bridge.LearnedBridge` gets the SDE's parameters as an input,
``s(t, x; u, theta) ~ grad_x log p_theta(t, x | 0, u)``, and is trained with the same inversion-free
objective on forward Euler paths whose parameters are drawn afresh for every path (from a box, a prior,
given samples, or around the current values). ``theta`` is the flattened vector of the SDE's registered
parameters (:meth:`~pyro_sde.sde.models.SDE.params`) or what a ``parameters=`` callable returns; its
coordinates are scaled to ``[-1, 1]`` over the trained range (on the log scale where all draws were
positive). The end point ``v`` and the interval length do not enter the network: the backward bridge
needs the score of the *unconditioned* transition from ``u``, which depends on neither.

The weights stay exact Euler-density ratios for any network (unbiased for the ``M``-step Euler density
at every ``theta``); ``theta`` outside the trained range only costs variance, and is flagged
(``out_of_range="warn"`` or ``"error"``). Gradients in the SDE parameters flow through the paths and
through the network's ``theta`` input (the pathwise gradient of ``log p^``).
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import torch
from torch import nn

from ..._checks import nonnegative_float
from ...sde.models import SDE
from .learned import LearnedBridge, ScoreNetwork

__all__ = ["AmortisedBridge"]

OUT_OF_RANGE = ("warn", "error", "ignore")
_PILOT_DRAWS = 4096  # parameter draws that fix the input scaling before training
_RANGE_SLACK = 0.01  # fraction of the trained width allowed beyond it before flagging


class AmortisedBridge(LearnedBridge):
    """A learned backward bridge conditioned on the SDE parameters (see the module docstring).

    :param int dim: state dimension. :param network: a :class:`ScoreNetwork` with ``parameter_dim`` set
        (default: built at the first :meth:`fit`, ``ScoreNetwork(dim, parameter_dim=p, hidden_dim=...)``).
    :param parameters: optional ``sde -> Tensor (*sde.batch_shape, p)``, the conditioning vector; default:
        the SDE's floating registered parameters, each flattened over its event dims, concatenated.
    :param str out_of_range: ``"warn"`` (once per fit), ``"error"`` (``ValueError``) or ``"ignore"`` when
        :meth:`log_weights` meets parameters outside the trained range.
    :param int hidden_dim: width of the default network (default ``max(64, 2 dim)``).
    Use ``AmortisedBridge(d).fit(sde, starts, T, parameter_box={"theta": (0.5, 3.0)})`` then
    ``proposal=bridge`` for every parameter value in the box; :meth:`save` / :meth:`load`.
    """

    def __init__(
        self,
        dim: int,
        network: nn.Module | None = None,
        *,
        parameters: Callable[[SDE], torch.Tensor] | None = None,
        out_of_range: str = "warn",
        hidden_dim: int | None = None,
    ):
        if out_of_range not in OUT_OF_RANGE:
            raise ValueError(f"out_of_range must be one of {OUT_OF_RANGE}, got {out_of_range!r}")
        if parameters is not None and not callable(parameters):
            raise TypeError(f"parameters must be a callable sde -> tensor, got {type(parameters).__name__}")
        if hidden_dim is not None and network is not None:
            raise ValueError("give hidden_dim or network, not both")
        placeholder = network if network is not None else nn.Linear(1, 1)  # the real one is built at fit
        super().__init__(dim, placeholder, auto_refit=False)
        self.network = network
        self.parameters, self.out_of_range, self.hidden_dim = parameters, out_of_range, hidden_dim
        self.parameter_names: list[str] | None = None
        self.low = self.high = self.center = self.scale = self.log_scale = None
        self._bounds = None  # (low, high) with the slack, cached for the checks on every call

    # -- the conditioning vector ---------------------------------------------------------------
    def parameter_vector(self, sde: SDE) -> tuple[torch.Tensor, list[str]]:
        """``theta`` of shape ``(*sde.batch_shape, p)`` and the names of its coordinates (``"theta"``,
        ``"mean[0]"``, ...); differentiable in the SDE's parameters."""
        if self.parameters is not None:
            theta = torch.as_tensor(self.parameters(sde))
            if theta.dim() < 1 or not theta.is_floating_point():
                raise ValueError(f"parameters(sde) must return a floating tensor (*batch, p), got "
                                 f"{tuple(theta.shape)} {theta.dtype}")
            return theta, [f"parameters[{i}]" for i in range(theta.shape[-1])]
        batch = sde.batch_shape
        parts, names = [], []
        for name, event_dim in sde._param_event_dims.items():  # registered (value, event dim) pairs
            value = getattr(sde, name)
            if not value.is_floating_point():
                continue
            flat = value.reshape(value.shape[: value.dim() - event_dim] + (-1,))
            parts.append(flat.expand(batch + flat.shape[-1:]))
            k = flat.shape[-1]
            names += [name] if event_dim == 0 else [f"{name}[{i}]" for i in range(k)]
        if not parts:
            raise ValueError(f"{type(sde).__name__} has no floating parameters to condition on; pass "
                             "parameters=")
        dtype = torch.promote_types(parts[0].dtype, torch.float32)
        return torch.cat([p.to(dtype) for p in parts], -1), names

    def _normalise(self, theta):
        """``theta`` scaled to ``[-1, 1]`` over the trained range (log scale where it was positive)."""
        logged = torch.where(self.log_scale, theta.clamp(min=torch.finfo(theta.dtype).tiny).log(), theta)
        return (logged - self.center.to(theta.dtype)) / self.scale.to(theta.dtype)

    # -- training ------------------------------------------------------------------------------
    def fit(
        self,
        sde: SDE,
        starts: torch.Tensor,
        horizon: float,
        *,
        parameter_box: dict | None = None,
        parameter_prior: dict | None = None,
        parameter_samples: dict | None = None,
        spread: float = 0.5,
        num_iterations: int = 1000,
        num_paths: int = 64,
        num_steps: int = 50,
        lr: float = 3e-3,
        progress_bar: bool = True,
    ) -> AmortisedBridge:
        """Fit the score over a distribution of parameter values, drawn afresh for every path.

        :param sde: the model at one parameter value (``batch_shape ()``): the values of the parameters
            not named below, and the centre of the default distribution.
        :param starts: ``(n, d)`` start points (e.g. ``obs[:-1]``). :param float horizon: ``T``, at least the
            longest interval to bridge.
        :param dict parameter_box: ``name -> (low, high)`` (floats or tensors of the parameter's shape):
            uniform draws, on the log scale where ``low > 0``.
        :param dict parameter_prior: ``name -> torch Distribution`` whose samples have the parameter's
            shape (e.g. the model's prior).
        :param dict parameter_samples: ``name -> (S, *shape)`` draws (e.g. a pilot posterior); every path
            takes one row, the same row for every name (joint draws keep their dependence).
        :param float spread: without any of the three, every parameter is drawn around its current
            value: ``value * exp(spread' U)`` (``spread' = log(1 + spread)``, ``U ~ U(-1, 1)``) where it
            is positive, ``value + spread max(|value|, 1) U`` elsewhere. With any of them, parameters not
            named stay at their current values.
        Other arguments as :meth:`LearnedBridge.fit`. :returns: ``self``.
        """
        starts, horizon = self._check_fit_args(starts, horizon, num_iterations, num_paths, num_steps, lr)
        if sde.batch_shape != torch.Size():
            raise ValueError(f"fit needs the model at one parameter value (batch_shape ()), got batch_shape "
                             f"{tuple(sde.batch_shape)}; give the values to train on as parameter_samples")
        nonnegative_float(spread, "spread")
        draw_values = _parameter_sampler(sde, parameter_box, parameter_prior, parameter_samples, spread)
        pilot, names = self.parameter_vector(_with_params(sde, draw_values(_PILOT_DRAWS)))
        pilot = pilot.detach().to(starts.dtype)
        self.log_scale = (pilot > 0).all(0)
        logged = torch.where(self.log_scale, pilot.clamp(min=torch.finfo(pilot.dtype).tiny).log(), pilot)
        lo, hi = logged.amin(0), logged.amax(0)
        half = (hi - lo) / 2
        self.center = (lo + hi) / 2
        self.scale = torch.where(half > 1e-9 * (1 + self.center.abs()), half, torch.ones_like(half))
        self.low, self.high = pilot.amin(0), pilot.amax(0)
        if self.network is None:
            self.network = ScoreNetwork(self.dim, parameter_dim=pilot.shape[-1], hidden_dim=self.hidden_dim)
        elif getattr(self.network, "parameter_dim", pilot.shape[-1]) != pilot.shape[-1]:
            raise ValueError(f"network.parameter_dim is {self.network.parameter_dim} but the SDE has "
                             f"{pilot.shape[-1]} parameter coordinates ({', '.join(names)})")
        self.parameter_names = names
        self.fit_params = {k: v.detach().clone() for k, v in sde.params().items()}
        self._fit_args = dict(horizon=horizon, num_paths=num_paths, num_steps=num_steps, lr=lr)

        def draw(n):
            batch = _with_params(sde, draw_values(n))
            theta = self.parameter_vector(batch)[0].detach().to(starts.dtype)
            self.low = torch.minimum(self.low, theta.amin(0))
            self.high = torch.maximum(self.high, theta.amax(0))
            return batch, self._normalise(theta)

        self._train(draw, starts, horizon, num_iterations, num_paths, num_steps, lr, progress_bar)
        self._bounds = None
        return self

    # -- proposal ------------------------------------------------------------------------------
    def is_stale(self, sde: SDE) -> bool:
        """Whether any parameter value (of any batch member) lies outside the trained range."""
        if self.low is None:
            return True
        return bool(self._outside(*self.parameter_vector(sde)).any())

    def _outside(self, theta, names):
        """``(S, p)`` mask of the flattened batch of ``theta`` outside the trained range (+ 1 % slack)."""
        theta = theta.detach().reshape(-1, theta.shape[-1])
        if theta.shape[-1] != self.low.numel():
            raise ValueError(f"the SDE has {theta.shape[-1]} parameter coordinates ({', '.join(names)}); the "
                             f"bridge was trained on {self.low.numel()} ({', '.join(self.parameter_names)})")
        if self._bounds is None or self._bounds[0].dtype != theta.dtype:
            slack = _RANGE_SLACK * (self.high - self.low) + 1e-9 * (1 + self.high.abs())
            self._bounds = ((self.low - slack).to(theta), (self.high + slack).to(theta))
        return (theta < self._bounds[0]) | (theta > self._bounds[1])

    def _prepare(self, sde):
        if self.low is None:
            raise RuntimeError("AmortisedBridge is not fitted: call .fit(sde, starts, horizon) first")
        theta, names = self.parameter_vector(sde)
        outside = self._outside(theta, names)
        if outside.any() and self.out_of_range != "ignore":
            flat = theta.detach().reshape(-1, theta.shape[-1])
            lines = "; ".join(
                f"{names[j]} in [{flat[:, j].min().item():.4g}, {flat[:, j].max().item():.4g}], trained on "
                f"[{self.low[j].item():.4g}, {self.high[j].item():.4g}]"
                for j in outside.any(0).nonzero().flatten().tolist()
            )
            msg = (f"AmortisedBridge: parameters outside the range it was trained on ({lines}); the "
                   "weights stay exact but their variance grows: refit with a wider parameter_box / prior")
            if self.out_of_range == "error":
                raise ValueError(msg)
            if not self._warned:
                warnings.warn(msg, UserWarning, stacklevel=4)
                self._warned = True
        return self._normalise(theta.to(self._network_dtype()))

    # -- persistence ---------------------------------------------------------------------------
    def _config(self) -> dict:
        return dict(out_of_range=self.out_of_range)

    def _fit_state(self) -> dict:
        return {"fit_params": self.fit_params, "fit_args": self._fit_args, "names": self.parameter_names,
                "low": self.low, "high": self.high, "center": self.center, "scale": self.scale,
                "log_scale": self.log_scale}

    def _load_fit_state(self, state: dict) -> None:
        self.fit_params, self._fit_args = state["fit_params"], state["fit_args"]
        self.parameter_names = list(state["names"])
        for key in ("low", "high", "center", "scale", "log_scale"):
            setattr(self, key, state[key])
        self._bounds = None


def _with_params(sde: SDE, values: dict) -> SDE:
    """A shallow copy of ``sde`` whose registered parameters ``values`` (name -> tensor) replace its own
    (the models compute everything from their parameter attributes at call time)."""
    clone = copy.copy(sde)
    for name, value in values.items():
        object.__setattr__(clone, name, value)  # an instance attribute, found before nn.Module's registry
    return clone


def _right_align(draws, shape, what):
    """``(n, *event)`` draws expanded to ``shape = (n, *param shape)`` (event dims aligned from the right)."""
    extra = len(shape) - draws.dim()
    if extra > 0:
        draws = draws.reshape(draws.shape[:1] + (1,) * extra + draws.shape[1:])
    try:
        return draws.expand(shape)
    except RuntimeError:
        raise ValueError(f"{what}: draws of shape {tuple(draws.shape[1:])} do not fit the parameter's "
                         f"shape {tuple(shape[1:])}") from None


def _parameter_sampler(sde, box, prior, samples, spread):
    """``draw(n) -> {name: (n, *shape)}`` for the SDE's floating registered parameters."""
    current = {k: v.detach() for k, v in sde.params().items() if v.is_floating_point()}
    given = {}
    for arg, what in ((box, "parameter_box"), (prior, "parameter_prior"), (samples, "parameter_samples")):
        if arg is None:
            continue
        if not isinstance(arg, dict):
            raise TypeError(f"{what} must be a dict name -> ..., got {type(arg).__name__}")
        for name in arg:
            if name not in current:
                raise ValueError(f"{what} names {name!r}, not a parameter of {type(sde).__name__} "
                                 f"(its parameters: {', '.join(current)})")
            if name in given:
                raise ValueError(f"parameter {name!r} is given in both {given[name]} and {what}")
            given[name] = what
    rows = None
    if samples:
        sizes = {name: torch.as_tensor(s).shape[0] if torch.as_tensor(s).dim() else 0
                 for name, s in samples.items()}
        if len(set(sizes.values())) != 1 or 0 in sizes.values():
            raise ValueError(f"parameter_samples must hold the same number S >= 1 of rows for every name, "
                             f"got {sizes}")
        rows = next(iter(sizes.values()))

    def draw(n):
        out = {}
        index = torch.randint(rows, (n,)) if rows else None
        for name, value in current.items():
            shape = (n,) + value.shape
            if name in (box or {}):
                low, high = (torch.as_tensor(b, dtype=value.dtype).expand(value.shape) for b in box[name])
                if not (low <= high).all():
                    raise ValueError(f"parameter_box[{name!r}] must have low <= high, got {box[name]}")
                unit = torch.rand(shape, dtype=value.dtype)
                if (low > 0).all():
                    out[name] = (low.log() + unit * (high.log() - low.log())).exp()
                else:
                    out[name] = low + unit * (high - low)
            elif name in (prior or {}):
                out[name] = _right_align(prior[name].sample((n,)).to(value.dtype), shape, f"prior of {name}")
            elif name in (samples or {}):
                rows_drawn = torch.as_tensor(samples[name], dtype=value.dtype)[index]
                out[name] = _right_align(rows_drawn, shape, f"parameter_samples[{name!r}]")
            elif not given and spread > 0:
                unit = 2 * torch.rand(shape, dtype=value.dtype) - 1
                if (value > 0).all():
                    out[name] = value * (math.log1p(spread) * unit).exp()
                else:
                    out[name] = value + spread * value.abs().clamp(min=1.0) * unit
            else:
                out[name] = value.expand(shape)
        return out

    return draw
