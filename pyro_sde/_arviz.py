"""ArviZ export of weighted samples: ``posterior``, ``sample_stats``, ``log_likelihood``, ``observed_data``,
``constant_data`` and ``posterior_predictive`` (public as :func:`pyro_sde.diagnostics.to_inference_data`).

ArviZ treats every draw as an equally weighted posterior draw. Importance-weighted samples are therefore
resampled (systematic) to about their importance ESS ``N ess`` draws by default, so that ArviZ's own ESS,
MCSE and R-hat do not overstate the information the weights carry.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.subsample_messenger import _Subsample

from ._checks import positive_int

if TYPE_CHECKING:
    import arviz
    import xarray

# pyro_sde.diagnostics re-exports to_inference_data: it is imported inside the functions, so that either
# module can be imported first

__all__ = ["FromPyroGuard", "to_inference_data"]



def _import_arviz():
    with warnings.catch_warnings():  # arviz 0.2x warns about its 1.0 refactor on import
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz


def _arviz_major() -> int:
    return int(_import_arviz().__version__.split(".")[0])


def _from_dict(groups: dict, attrs: dict, **kwargs):
    """``arviz.from_dict`` for both ArviZ 0.x (``InferenceData``) and >= 1.0 (``xarray.DataTree``).

    ``groups``: group name -> {variable: array}, with leading ``(chain, draw)`` axes except in
    ``observed_data`` / ``constant_data``; ``attrs`` are set on the root and on the ``posterior`` group.
    ``kwargs`` (``coords``, ``dims``) are forwarded.
    """
    az = _import_arviz()
    groups = {name: group for name, group in groups.items() if group}
    if _arviz_major() >= 1:
        return az.from_dict(groups, attrs={"/": dict(attrs), "posterior": dict(attrs)}, **kwargs)
    return az.from_dict(**groups, attrs=dict(attrs), posterior_attrs=dict(attrs), **kwargs)


def _to_numpy(x: torch.Tensor):
    return x.detach().cpu().numpy()


class _NotAnMCMCAttribute:
    """A class attribute that ``arviz.from_pyro`` reads from a ``pyro.infer.MCMC`` (``num_chains``,
    ``num_samples``, ``kernel``): raises an ``AttributeError`` pointing at :func:`to_inference_data`.
    A non-data descriptor, so an instance attribute or a subclass definition of the same name wins."""

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        raise AttributeError(
            f"{type(obj).__name__} has no attribute {self.name!r}: it is not a pyro.infer.MCMC, so "
            "arviz.from_pyro(posterior=...) cannot convert its importance-weighted draws. Use "
            "pyro_sde.to_inference_data(sampler) (posterior, sample_stats, log_likelihood, observed_data, "
            "constant_data; posterior_predictive=True on request)"
        )


class FromPyroGuard:
    """Mixin for samplers: ``arviz.from_pyro(posterior=sampler)`` fails with a message that points at
    :func:`pyro_sde.to_inference_data` instead of a bare ``AttributeError``."""

    num_chains = _NotAnMCMCAttribute()
    num_samples = _NotAnMCMCAttribute()
    kernel = _NotAnMCMCAttribute()


# --------------------------------------------------------------------------------------------------
# the model's structure and its pointwise log likelihood
# --------------------------------------------------------------------------------------------------


def _is_deterministic(site) -> bool:
    return site["infer"].get("_deterministic", False)


class _ModelCall:
    """A Pyro model with its arguments, traced once at one posterior draw to learn its structure.

    ``latents``: name -> batch ndim of the latent sites; ``observed``: name -> (observed value,
    pointwise shape = the batch shape of the site's ``log_prob``); ``max_plate_nesting``.
    """

    def __init__(self, model: Callable, args: tuple, kwargs: dict, draws: dict):
        self.model, self.args, self.kwargs = model, args, kwargs
        first = {name: value[0] for name, value in draws.items()}  # deterministic sites keep their own
        with poutine.block():
            trace = poutine.trace(poutine.condition(model, first)).get_trace(*args, **kwargs)
        trace.compute_log_prob()
        sites = [
            s
            for s in trace.nodes.values()
            if s["type"] == "sample" and not isinstance(s["fn"], _Subsample) and not _is_deterministic(s)
        ]
        # conditioning made the latent sites observed: they are the sites with a draw
        self.latents = {s["name"]: len(s["fn"].batch_shape) for s in sites if s["name"] in draws}
        missing = sorted(s["name"] for s in sites if not s["is_observed"] and s["name"] not in draws)
        if missing:
            raise ValueError(f"the draws have no values for the model's latent sites {missing}")
        self.observed = {
            s["name"]: (s["value"], tuple(s["log_prob"].shape))  # (value, batch shape)
            for s in sites
            if s["is_observed"] and s["name"] not in draws
        }
        plate_dims = [f.dim for s in sites for f in s["cond_indep_stack"] if f.vectorized]
        batch_dims = [len(s["fn"].batch_shape) for s in sites if not isinstance(s["fn"], _Subsample)]
        self.max_plate_nesting = max([-min(plate_dims) if plate_dims else 0] + batch_dims)
        self._vectorised = None  # whether the particle-plate path matches the per-draw one

    def _trace_one(self, draw: dict, replicate: bool = False):
        """Trace of the model conditioned on one draw (observed sites resampled with ``replicate``)."""
        model = poutine.uncondition(self.model) if replicate else self.model
        with poutine.block():
            trace = poutine.trace(poutine.condition(model, draw)).get_trace(*self.args, **self.kwargs)
        if not replicate:
            trace.compute_log_prob()
        return trace

    def _trace_plate(self, draws: dict, num_draws: int, replicate: bool = False):
        """One trace of the model under a plate of the ``S`` draws at ``dim = -(max_plate_nesting + 1)``."""
        S, P = num_draws, self.max_plate_nesting
        values = {}
        for name, batch_ndim in self.latents.items():
            value = draws[name]
            values[name] = value.reshape((S,) + (1,) * (P - batch_ndim) + tuple(value.shape[1:]))
        model = poutine.uncondition(self.model) if replicate else self.model

        def particle_model(*args, **kwargs):
            with pyro.plate("_pyro_sde_draws", S, dim=-(P + 1)):
                return model(*args, **kwargs)

        with poutine.block():
            trace = poutine.trace(poutine.condition(particle_model, values)).get_trace(
                *self.args, **self.kwargs
            )
        if not replicate:
            trace.compute_log_prob()
        return trace

    def _unbatch(self, value: torch.Tensor, num_draws: int, batch_shape: tuple, shape: tuple):
        """``(S, *pad, *batch_shape, *event)`` of a plate trace (broadcast) -> ``(S, *shape)``."""
        padded = (num_draws,) + (1,) * (self.max_plate_nesting - len(batch_shape)) + shape
        return torch.broadcast_to(value, padded).reshape((num_draws,) + shape)

    def _collect(self, draws: dict, num_draws: int, replicate: bool, vectorised: bool) -> dict:
        """Observed site -> ``(S, *pointwise_shape)`` log likelihoods, or ``(S, *value_shape)`` replicas."""
        key = "value" if replicate else "log_prob"
        if vectorised:
            trace = self._trace_plate(draws, num_draws, replicate)
            out = {}
            for name, (value, batch_shape) in self.observed.items():
                shape = tuple(value.shape) if replicate else batch_shape
                out[name] = self._unbatch(trace.nodes[name][key], num_draws, batch_shape, shape)
            return out
        rows = [self._trace_one({n: draws[n][i] for n in self.latents}, replicate) for i in range(num_draws)]
        return {name: torch.stack([t.nodes[name][key] for t in rows]) for name in self.observed}

    def _check_vectorised(self, draws: dict, num_draws: int) -> None:
        """Use the plate path only if it gives the per-draw log likelihoods at (up to) two draws."""
        if self._vectorised is not None:
            return
        k = min(2, num_draws)
        probe = {n: draws[n][:k] for n in self.latents}
        try:
            batched = self._collect(probe, k, replicate=False, vectorised=True)
            exact = self._collect(probe, k, replicate=False, vectorised=False)
            self._vectorised = all(
                torch.allclose(batched[n], exact[n], rtol=1e-6, atol=1e-6, equal_nan=True) for n in exact
            )
        except Exception:  # noqa: BLE001 - a model that does not run under a batch plate
            self._vectorised = False

    def pointwise_log_likelihood(self, draws: dict, num_draws: int) -> dict:
        """Observed site -> ``log p(y_obs | theta_s)`` of shape ``(S, *batch_shape)`` for the ``S`` draws
        (one particle-plate trace when it matches the per-draw traces at two draws, else draw by draw)."""
        with torch.no_grad():
            self._check_vectorised(draws, num_draws)
            return self._collect(draws, num_draws, replicate=False, vectorised=self._vectorised)

    def posterior_predictive(self, draws: dict, num_draws: int) -> dict:
        """Observed site -> replicated data ``y_rep ~ p(y | theta_s)`` of shape ``(S, *observed_shape)``."""
        with torch.no_grad():
            self._check_vectorised(draws, num_draws)
            return self._collect(draws, num_draws, replicate=True, vectorised=self._vectorised)

    def constant_data(self) -> dict:
        """The model's tensor arguments by parameter name, except those that are observed values."""
        try:
            bound = inspect.signature(self.model).bind(*self.args, **self.kwargs)
        except (TypeError, ValueError):  # no signature (a C callable) or not bindable: skip
            return {}
        observed = [value for value, _ in self.observed.values()]
        out = {}
        for name, value in bound.arguments.items():
            if not isinstance(value, torch.Tensor):
                continue
            if any(value is y or (value.shape == y.shape and torch.equal(value, y)) for y in observed):
                continue
            out[name] = value
        return out


# --------------------------------------------------------------------------------------------------
# the conversion
# --------------------------------------------------------------------------------------------------


def _weighted_input(result, num_samples):
    """``(samples, log_weights, evidence, model, args, kwargs, num_dropped)`` of ``result`` (None: absent).

    A sampler with ``num_chains > 1`` whose ``get_weighted_samples`` takes ``group_by_chain`` gives its
    chains: samples ``(K, N, *shape)``, log weights ``(K, N)``."""
    if hasattr(result, "get_weighted_samples"):
        options = {} if num_samples is None else {"num_samples": num_samples}
        num_chains = getattr(result, "num_chains", 1)  # FromPyroGuard's AttributeError: 1
        if isinstance(num_chains, int) and num_chains > 1 and "group_by_chain" in inspect.signature(
            result.get_weighted_samples
        ).parameters:
            options["group_by_chain"] = True
        samples, log_weights = result.get_weighted_samples(**options)
        evidence = result.log_evidence() if callable(getattr(result, "log_evidence", None)) else None
        call = getattr(result, "_model_call", None)
        args, kwargs = call if call is not None else ((), {})
        model = getattr(result, "model", None)
        num_dropped = int(getattr(result, "num_dropped_paths", 0))
        return samples, log_weights, evidence, model, args, kwargs, num_dropped
    if num_samples is not None:
        raise ValueError(
            "num_samples only applies to a sampler (it is forwarded to get_weighted_samples); "
            "use num_draws for the number of draws ArviZ sees"
        )
    if isinstance(result, tuple) and len(result) == 2:
        return result[0], result[1], None, None, (), {}, 0
    if isinstance(result, Mapping):
        return result, None, None, None, (), {}, 0
    raise TypeError(
        "result must have get_weighted_samples(), be a (samples, log_weights) tuple or a dict, "
        f"got {type(result).__name__}"
    )


def _chains(samples, log_weights) -> list:
    """Checked ``[(samples_k, log_weights_k)]``: one chain for ``(N,)`` log weights, ``K`` for ``(K, N)``."""
    from . import diagnostics

    lw = torch.as_tensor(log_weights)
    if lw.dim() != 2:
        lw = diagnostics._check_log_weights(lw, min_samples=2)
        return [(diagnostics._check_samples(samples, lw.numel()), lw)]
    if not isinstance(samples, Mapping) or not samples:
        raise ValueError("samples must be a non-empty dict mapping site names to tensors")
    for name, value in samples.items():
        if torch.as_tensor(value).shape[:2] != lw.shape:
            raise ValueError(
                f"with log weights of shape (K, N) = {tuple(lw.shape)} (K chains), site '{name}' must have "
                f"shape (K, N, *site_shape), got {tuple(torch.as_tensor(value).shape)}"
            )
    chains = []
    for k in range(lw.shape[0]):
        lw_k = diagnostics._check_log_weights(lw[k], min_samples=2)
        chain = {n: v[k] for n, v in samples.items()}
        chains.append((diagnostics._check_samples(chain, lw_k.numel()), lw_k))
    return chains


def _num_draws(num_draws, effective_draws: float, num_weighted: int, num_chains: int) -> int:
    """Draws per chain: ``num_draws``, or the smallest chain's importance ESS (at least 1)."""
    if num_draws is not None:
        return positive_int(num_draws, "num_draws")
    from .diagnostics import MIN_EFFECTIVE_SAMPLES  # also too few for ArviZ's ESS, R-hat and PSIS-LOO

    draws = max(1, min(num_weighted, int(math.floor(effective_draws + 1e-9))))
    if draws < MIN_EFFECTIVE_SAMPLES:
        per_chain = " per chain" if num_chains > 1 else ""
        warnings.warn(
            f"the importance weights have an effective sample size of {effective_draws:.1f}{per_chain} (of "
            f"{num_weighted} samples): ArviZ gets {draws} resampled draws{per_chain}, too few for its ESS, "
            "R-hat and PSIS-LOO diagnostics; train longer or draw more samples",
            RuntimeWarning,
            stacklevel=3,
        )
    return draws


def to_inference_data(
    result: Any | tuple[Mapping[str, torch.Tensor], torch.Tensor] | Mapping[str, torch.Tensor],
    num_samples: int | None = None,
    *,
    num_draws: int | None = None,
    log_likelihood: bool = True,
    posterior_predictive: bool = False,
    model: Callable | None = None,
    model_args: tuple = (),
    model_kwargs: dict | None = None,
    coords: dict | None = None,
    dims: dict | None = None,
) -> arviz.InferenceData | xarray.DataTree:
    """Convert (weighted) samples to ArviZ ``InferenceData`` (ArviZ 0.x) or ``DataTree`` (ArviZ >= 1.0).

    ``result`` is one of

    * a sampler: an object with ``get_weighted_samples(num_samples=None) -> (samples, log_weights)``
      (:class:`~pyro_sde.infer.DiffusionSampler`, :class:`~pyro_sde.infer.SMCSampler`); ``num_samples``
      is forwarded to it (default: its cached draw) and its ``log_evidence()``, ``model`` and model
      arguments are used;
    * a tuple ``(samples, log_weights)``: samples ``site -> (N, *shape)``, log weights ``(N,)``; or ``K``
      chains (e.g. independent runs): samples ``(K, N, *shape)``, log weights ``(K, N)``;
    * a dict of unweighted (equal-weight) draws ``site -> (N, *shape)``, all of them kept.

    Weighted samples are systematically resampled (:func:`~pyro_sde.diagnostics.systematic_resample`)
    to ``num_draws`` equal-weight draws per chain, by default ``floor(N ess)`` (the importance ESS; the
    smallest chain's), so ArviZ's ESS does not overstate the weights; fewer than 100 warns
    (``RuntimeWarning``), and a Pareto k above 0.7 warns
    (:class:`~pyro_sde.diagnostics.UnreliableEstimateWarning`). With ``K`` chains ArviZ's R-hat compares
    them. A sampler with ``num_chains > 1`` gives its chains through
    ``get_weighted_samples(group_by_chain=True)`` when it has that option.

    Groups: ``posterior`` ``(chain, draw, *shape)``; ``sample_stats.log_weight`` (the raw log weight
    of each resampled draw); with a Pyro model, ``observed_data`` (observed sites, not
    ``pyro.deterministic`` ones), ``constant_data`` (the model's other tensor arguments, by parameter
    name), ``log_likelihood`` (``log p(y_obs | theta)`` per observed site, pointwise over the site's
    batch shape, ``(chain, draw, *batch_shape)``; from a vectorised trace of the model conditioned on
    the draws) unless ``log_likelihood=False``, and ``posterior_predictive`` (replicated observed sites,
    ``pyro.infer.Predictive``) with ``posterior_predictive=True``. The attributes ``log_evidence``,
    ``log_evidence_stderr``, ``log_evidence_lower_bound``, ``ess`` (normalised), ``pareto_k``,
    ``pareto_k_reliable``, ``num_weighted_samples`` (``N``) and ``num_dropped`` summarise the weights.

    :param int num_samples: weighted samples to draw from a sampler (only with a sampler).
    :param int num_draws: equal-weight draws ArviZ sees (default ``floor(N ess)``; weighted input only).
    :param bool log_likelihood: add ``log_likelihood`` (needs a model).
    :param bool posterior_predictive: add ``posterior_predictive`` (needs a model).
    :param callable model: the Pyro model, for a tuple or a dict (a sampler carries its own), with
        ``model_args`` / ``model_kwargs``.
    :param coords: forwarded to ``arviz.from_dict``.
    :param dims: forwarded to ``arviz.from_dict`` (``site -> [dim names]`` without chain/draw).
    """
    from . import diagnostics

    samples, log_weights, evidence, own_model, args, kwargs, num_dropped = _weighted_input(
        result, num_samples
    )
    if model is not None:
        if not callable(model):
            raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
        if not isinstance(model_args, tuple):
            raise TypeError(f"model_args must be a tuple, got {type(model_args).__name__}")
        if model_kwargs is not None and not isinstance(model_kwargs, dict):
            raise TypeError(f"model_kwargs must be a dict, got {type(model_kwargs).__name__}")
        own_model, args, kwargs = model, model_args, model_kwargs or {}
    groups, attrs = {}, {}
    if log_weights is None:
        if num_draws is not None:
            raise ValueError("num_draws only applies to weighted samples (a sampler or a tuple)")
        draws = {n: v[None] for n, v in diagnostics._check_samples(samples).items()}  # (1, N, ...)
    else:
        chains = _chains(samples, log_weights)
        all_lw = torch.cat([lw for _, lw in chains])
        if evidence is None:  # the algorithm's own estimator when it has one (SMC: not the final weights')
            evidence = diagnostics.log_evidence(all_lw)  # warns when the weights' Pareto k exceeds 0.7
        effective = [float(diagnostics._log_ess(lw).exp()) * lw.numel() for _, lw in chains]
        smallest = min(range(len(chains)), key=effective.__getitem__)
        size = _num_draws(num_draws, effective[smallest], chains[smallest][1].numel(), len(chains))
        indices = [diagnostics.systematic_resample(lw, size) for _, lw in chains]
        draws = {
            name: torch.stack([s[name][idx.to(s[name].device)] for (s, _), idx in zip(chains, indices)])
            for name in chains[0][0]
        }  # (K, M, *shape)
        log_weight = torch.stack([lw[idx] for (_, lw), idx in zip(chains, indices)])
        groups["sample_stats"] = {"log_weight": _to_numpy(log_weight)}
        attrs = {
            "log_evidence": float(evidence.log_z),
            "log_evidence_stderr": float(evidence.stderr),
            "log_evidence_lower_bound": float(evidence.lower_bound),
            "ess": float(evidence.ess),
            "pareto_k": float(evidence.pareto_k),
            "pareto_k_reliable": int(evidence.reliable),
            "num_weighted_samples": int(all_lw.numel()),
            "num_dropped": num_dropped,
        }
    groups["posterior"] = {name: _to_numpy(value) for name, value in draws.items()}
    if own_model is not None:
        num_chains, size = next(iter(draws.values())).shape[:2]
        flat = {name: value.reshape((num_chains * size,) + value.shape[2:]) for name, value in draws.items()}

        def by_chain(values: dict) -> dict:  # (K M, ...) -> (K, M, ...) arrays
            return {n: _to_numpy(v.reshape((num_chains, size) + v.shape[1:])) for n, v in values.items()}

        call = _ModelCall(own_model, tuple(args), dict(kwargs), flat)
        groups["observed_data"] = {name: _to_numpy(value) for name, (value, _) in call.observed.items()}
        groups["constant_data"] = {name: _to_numpy(value) for name, value in call.constant_data().items()}
        if log_likelihood and call.observed:
            pointwise = call.pointwise_log_likelihood(flat, num_chains * size)
            groups["log_likelihood"] = by_chain({n: v.double() for n, v in pointwise.items()})
        if posterior_predictive and call.observed:
            groups["posterior_predictive"] = by_chain(call.posterior_predictive(flat, num_chains * size))
    return _from_dict(groups, attrs, coords=coords, dims=dims)
