"""What every posterior sampler of the package shares: binding the target and the weighted-sample surface.

:class:`PosteriorSampler` turns a Pyro model (with its arguments, at ``run``) or a log density into a
:class:`~pyro_sde.infer.potential.Potential` on unconstrained space, fits the preconditioning Gaussian
once and whitens it (``_target``), and gives every algorithm the same surface on top of its weighted
draws: ``get_weighted_samples``, ``get_samples``, ``ess``, ``get_summary``, ``summary``. A subclass
provides ``_weighted_draw(num_samples) -> (z, log_w)`` (unconstrained draws ``(N, dim)`` and their log
weights ``(N,)`` in float64, ``logmeanexp(log_w)`` estimating ``log p(y)``), ``log_evidence()`` and
``diagnostics()``.
"""

from __future__ import annotations

import math
from typing import Any

import pyro
import torch
from pyro.infer import Predictive

from .. import _distributed as dist
from .. import diagnostics
from .._arviz import FromPyroGuard
from .._checks import positive_int
from ._inputs import cast_output, same_call
from .potential import LogDensityPotential, ModelPotential, Potential
from .precondition import Preconditioner, as_preconditioner, fit_preconditioner, whiten

__all__ = ["PosteriorSampler"]


class PosteriorSampler(FromPyroGuard):
    """Target binding and the weighted-sample surface (see the module)."""

    def __new__(cls, *args: Any, num_chains: int | None = None, **kwargs: Any):
        if num_chains is not None:  # MCMC's keyword: say where independent runs live
            raise TypeError(
                f"{cls.__name__} runs one chain; for {num_chains} independent runs read as chains use "
                f"pyro_sde.infer.Chains({cls.__name__}, model, num_chains={num_chains}, ...)"
            )
        return super().__new__(cls)

    def _init_target(self, model, *, log_density, dim, score, precondition, precondition_options,
                     init_strategy, vectorize, dtype, device):
        """Store the target's options; a ``log_density`` is bound at once (a model at ``run``)."""
        self.model = model
        self.preconditioner: Preconditioner | None = as_preconditioner(precondition)
        self._precondition = precondition if isinstance(precondition, str) else None
        if precondition_options is not None and not isinstance(precondition_options, dict):
            raise TypeError("precondition_options must be a dict of fit_preconditioner options")
        self._precondition_options = dict(precondition_options or {})
        self.init_strategy, self.vectorize = init_strategy, vectorize
        self.potential: Potential | None = None  # the model's unconstrained log density
        self._target: Potential | None = None  # what the algorithm samples: the potential, whitened
        self._model_call = None
        self._weighted = None  # cache of the last evaluation draw
        self._drawn: dict = {}  # get_samples' draws, returned again until new results or new=True
        self._deterministic: tuple | None = None  # (model call, {site: shape}) of pyro.deterministic sites
        if log_density is not None:
            if dim is None:
                raise ValueError("`dim` is required with `log_density`")
            if dtype is not None:  # honour the requested dtype even if log_density computes in another
                log_density = cast_output(log_density, dtype)
                score = None if score is None else cast_output(score, dtype)
            potential = LogDensityPotential(log_density, dim, dtype=dtype, device=device, score=score)
            self._bind_potential(potential)

    def _bind_potential(self, potential: Potential):
        """Use ``potential`` from now on (subclasses also build what depends on it)."""
        self.potential = potential
        self._new_results()

    def _new_results(self):
        """Forget the draws of earlier results (after training, a new run or new data)."""
        self._weighted = None
        self._drawn = {}

    def _setup_potential(self, args, kwargs):
        """Bind the model to ``(args, kwargs)``; nothing to do when they are the very same objects."""
        if self.model is None:
            if args or kwargs:
                raise TypeError("a sampler built from `log_density` takes no model arguments")
            return
        call = (args, kwargs)
        if self._model_call is not None and same_call(self._model_call, call):
            return
        potential = ModelPotential(
            self.model, args, kwargs, init_strategy=self.init_strategy, vectorize=self.vectorize
        )
        if self.potential is not None and potential.dim != self.potential.dim:
            raise ValueError(
                f"the model's latent dimension changed from {self.potential.dim} to {potential.dim}"
            )
        self._model_call = call
        self._bind_potential(potential)

    def _whitening_source(self) -> Potential:
        """The potential that is whitened (SMC wraps it in an evaluation counter)."""
        return self.potential

    def _setup_target(self):
        """Fit the preconditioner once (kept when the model's data change) and whiten the potential.

        Under ``torch.distributed`` rank 0 fits it and every rank takes rank 0's fit and then its random
        stream (the ranks' states are then the single process's)."""
        source = self._whitening_source()
        preconditioner = self.preconditioner
        if preconditioner is None and self._precondition is not None and dist.is_distributed():
            fitted = None
            if dist.is_main_process():
                fitted = fit_preconditioner(source, self._precondition, **self._precondition_options)
                fitted = fitted.to(device="cpu")
            preconditioner = dist.broadcast_object(fitted).to(dtype=source.dtype, device=source.device)
            dist.sync_rng_state_()
        self.preconditioner, self._target = whiten(
            source, preconditioner, self._precondition, self._precondition_options
        )

    def _require_potential(self):
        if self.potential is None:
            raise RuntimeError("call .run(*model_args) first: the sampler has not seen the model's data")

    def _to_unconstrained(self, w):
        """The model's unconstrained coordinates ``z = m + L w`` of the algorithm's (whitened) states."""
        return w if self._target is self._whitening_source() else self.preconditioner.to_unconstrained(w)

    # ----------------------------------------------------------------------------------------
    # the weighted-sample surface
    def _weighted_draw(self, num_samples=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def _evidence_weights(self, num_samples=None) -> torch.Tensor:
        """The log weights (N,) behind the estimates (ESS, evidence, summaries)."""
        return self._weighted_draw(num_samples)[1]

    def _proposal_draw(self, num_samples: int):
        """``(z, log_w)`` that :meth:`get_samples` resamples ``num_samples`` draws from."""
        return self._weighted_draw(None)

    def _weights_pareto_k(self, log_w: torch.Tensor) -> float:
        """The Pareto k behind the warnings of the estimates."""
        return diagnostics._pareto_k(log_w)

    def _deterministic_shapes(self) -> dict:
        """``{name: shape}`` of the model's ``pyro.deterministic`` sites (one trace per model call)."""
        if self.model is None:
            return {}
        if self._deterministic is None or self._deterministic[0] is not self._model_call:
            args, kwargs = self._model_call
            trace = pyro.poutine.trace(self.model).get_trace(*args, **kwargs)
            shapes = {n: tuple(site["value"].shape) for n, site in trace.nodes.items()
                      if site["type"] == "sample" and site["infer"].get("_deterministic")}
            self._deterministic = (self._model_call, shapes)
        return self._deterministic[1]

    def _constrain(self, z: torch.Tensor) -> dict:
        """Latent sites ``{name: (N, *shape)}`` of unconstrained draws ``z`` (N, dim), and the model's
        ``pyro.deterministic`` sites computed from them (as NumPyro's ``MCMC.get_samples``)."""
        samples = self.potential.constrain(z)
        shapes = self._deterministic_shapes()
        if shapes:
            samples.update(self._deterministic_values(samples, shapes, z.shape[0]))
        return samples

    def _deterministic_values(self, samples: dict, shapes: dict, n: int) -> dict:
        """The deterministic sites at ``n`` draws: one vectorised ``Predictive`` call, checked against
        the model run draw by draw on the first two (a model that is not batch-safe gives wrong values
        when vectorised, not an error); the draw-by-draw run for all when the check fails."""
        args, kwargs = self._model_call

        def predict(draws, parallel):
            out = Predictive(self.model, posterior_samples=draws, return_sites=list(shapes),
                             parallel=parallel)(*args, **kwargs)
            m = next(iter(draws.values())).shape[0]
            return {k: out[k].reshape(m, *shape) for k, shape in shapes.items()}

        head = {k: v[:2] for k, v in samples.items()}
        exact = predict(head, parallel=False)
        try:
            values = predict(samples, parallel=True)
            if all(torch.allclose(values[k][:2], exact[k], rtol=1e-5, atol=1e-8) for k in shapes):
                return values
        except Exception:  # noqa: BLE001 - any failure of the vectorised call: the draw-by-draw run
            pass
        return predict(samples, parallel=False)

    def get_weighted_samples(
        self, num_samples: int | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``(samples, log_weights)``: a dict site -> constrained values ``(N, *shape)`` (latent and
        ``pyro.deterministic`` sites) and the log weights ``(N,)`` (float64, unnormalised:
        ``logmeanexp`` estimates ``log p(y)``)."""
        z, log_w = self._weighted_draw(num_samples)
        return self._constrain(z), log_w

    def get_samples(self, num_samples: int = 1000, *, resample: bool = True, group_by_chain: bool = False,
                    new: bool = False) -> dict[str, torch.Tensor]:
        """Posterior draws as a dict site -> ``(num_samples, *shape)`` (``(1, num_samples, *shape)``
        with ``group_by_chain``), latent and ``pyro.deterministic`` sites, like ``MCMC.get_samples()``:
        resampled (systematic) from the weighted draws, so that they target the posterior;
        ``resample=False`` returns the weighted draws themselves (the proposal's). Warns when the
        draws rest on fewer than 50 effective samples or the Pareto k exceeds 0.7.

        The draws are made once: later calls with the same arguments return the same draws (as
        ``MCMC.get_samples()`` does) until training or a new run changes the sampler, or ``new=True``
        asks for new ones."""
        positive_int(num_samples, "num_samples")
        key = (num_samples, bool(resample))
        if new or key not in self._drawn:
            self._drawn[key] = self._draw_samples(num_samples, resample)
        samples = dict(self._drawn[key])
        if group_by_chain:
            samples = {k: v.unsqueeze(0) for k, v in samples.items()}
        return samples

    def _draw_samples(self, num_samples: int, resample: bool) -> dict:
        z, log_w = self._proposal_draw(num_samples)
        if resample:
            diagnostics._warn_if_few_effective(
                log_w, "the resampled draws", "they contain many duplicates; train longer or draw more "
                "samples", stacklevel=4,
            )
            if int((log_w > -math.inf).sum()) >= 2:
                diagnostics._warn_if_unreliable(self._weights_pareto_k(log_w), "importance resampling")
            z = z[diagnostics.systematic_resample(log_w, num_samples)]
        return self._constrain(z)

    def ess(self, num_samples: int | None = None) -> float:
        """Normalised importance ESS ``(sum w)^2 / (N sum w^2)`` in (0, 1]; warns when the Pareto k
        exceeds 0.7 (the ESS then overstates the quality of the weights)."""
        log_w = self._evidence_weights(num_samples)
        diagnostics._warn_if_unreliable(self._weights_pareto_k(log_w), "the effective sample size")
        return float(diagnostics.effective_sample_size(log_w))

    def get_summary(self, prob: float = 0.9, num_samples: int | None = None) -> dict:
        """Weighted posterior summary: site -> {"mean", "std", "median", quantiles}."""
        samples, log_w = self.get_weighted_samples(num_samples)
        return diagnostics.weighted_summary(samples, log_w, prob=prob)

    def summary(self, prob: float = 0.9, num_samples: int | None = None) -> None:
        """Print :meth:`get_summary` and the evidence estimate."""
        summary = self.get_summary(prob, num_samples)
        diagnostics.print_weighted_summary(summary, self.log_evidence())


