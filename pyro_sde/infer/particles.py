r"""Weighted particle systems: reweighting, resampling, the evidence accumulator and its error bars.

Shared by tempered SMC (:mod:`pyro_sde.infer.smc`) and the sequential controlled Langevin diffusion
(:mod:`pyro_sde.infer.scld`). A system of ``N`` particles carries normalised log weights ``log W``
(float64, ``logsumexp = 0``), the running ``log Z_hat`` and, for each particle, the index of its ancestor
at the start (for the variance estimator of Lee & Whiteley 2018). One stage with incremental weights
``G_i``:

* reweight: ``W_i <- W_i G_i / sum_j W_j G_j`` and ``log Z_hat += log sum_i W_i G_i``;
* resample when the ESS ``1 / (N sum W_i^2)`` falls below a threshold (multinomial or systematic).

``Z_hat`` is unbiased for ``Z``; ``Var(Z_hat) / Z_hat^2 ~= 1 - (N / (N - 1))^(n + 1) (1 - sum_e
(sum_{i: E_i = e} W_i)^2)`` with ``n`` resampling steps, unbiased under multinomial resampling.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import torch
from pyro.ops.stats import weighed_quantile

from .. import _distributed as dist
from .. import diagnostics
from .._checks import positive_int
from ._base import PosteriorSampler
from .annealing import GeometricPath
from .potential import CountingPotential, Potential
from .precondition import PRECONDITION_METHODS, whiten, widen_to_draws

__all__ = [
    "ParticleSystem",
    "lee_whiteley_relative_variance",
    "resample",
    "reweight",
    "maybe_resample",
]

RESAMPLING_SCHEMES = ("multinomial", "systematic")
#: a particle whose moves at a temperature have a mean acceptance probability below this is "stuck"
STUCK_ACCEPTANCE = 0.05
#: the particle samplers warn when more than this fraction of the particles is stuck, at or above the
#: median log density, at ``beta = 1`` (Funnel-10, 1024-4096 particles: 4-13 %, log Z 0.5-0.6 low with
#: |error| / se 4-12; Gaussians, GMM-9, ManyWell-5: at most 0.1 %)
MAX_STUCK_FRACTION = 0.03


def stuck_fraction(particle_acceptance: torch.Tensor, log_density: torch.Tensor | None = None,
                   log_weights: torch.Tensor | None = None) -> float:
    """The fraction of particles whose moves' mean acceptance probability (N,) is below
    :data:`STUCK_ACCEPTANCE` and, given ``log_density`` (N,), whose log density is at or above the
    median (weighted by ``exp(log_weights)`` when given).

    Stuck particles at high density sit in a narrow region the step size cannot enter (a funnel's neck, a
    narrow mode: its mass is under-explored and log Z comes out low); stuck ones in a steep low-density
    tail (the left tail of a scale under a half-Cauchy prior, in log space) are left out: there the
    estimates were right (``benchmarks/smc_tails.py``). Funnel-10 and the centred eight schools put a
    median of 0.77-0.95 of the population below their stuck particles, the half-Cauchy scale 0.01-0.03."""
    stuck = particle_acceptance < STUCK_ACCEPTANCE
    if log_density is not None:
        density = log_density.double()
        log_w = torch.zeros_like(density) if log_weights is None else log_weights.double()
        stuck = stuck & (density >= weighed_quantile(density, [0.5], log_w))
    return float(stuck.double().mean())


def warn_if_stuck(stuck_fraction: float, method: str, *, stacklevel: int = 3) -> None:
    """Warn (``UnreliableEstimateWarning``) when more than :data:`MAX_STUCK_FRACTION` of the particles
    rejected almost every move at ``beta = 1`` at a high log density (:func:`stuck_fraction`): a region
    the adapted step size cannot explore."""
    if stuck_fraction > MAX_STUCK_FRACTION:
        warnings.warn(
            f"{method}: at beta = 1, {stuck_fraction:.0%} of the particles, at or above the median log "
            "density, had almost every move rejected "
            f"(mean acceptance < {STUCK_ACCEPTANCE}): the step size, adapted to the whole population, is "
            "too large for a region of the posterior (a funnel's neck?), which is then under-explored: "
            "log Z is typically too low and its standard error too small. In a hierarchical model, a "
            "centred group effect (theta ~ Normal(mu, tau)) makes such a funnel: reparametrise it "
            "non-centred (poutine.reparam(model, config={'theta': LocScaleReparam(centered=0.0)})). Check "
            "with kernel='hmc', more particles or another sampler",
            diagnostics.UnreliableEstimateWarning, stacklevel=stacklevel,
        )


class ParticleSystem(NamedTuple):
    """Weighted particles with their evidence so far and genealogy."""

    particles: torch.Tensor  #: ``x`` (N, dim)
    log_weights: torch.Tensor  #: normalised ``log W`` (N,), float64
    log_evidence: torch.Tensor  #: ``log Z_hat`` so far, 0-d float64
    ancestors: torch.Tensor  #: ``E_i`` in ``[0, N)``: each particle's ancestor at the start
    num_resampling_steps: int  #: ``n`` of the variance estimator


def initial_log_weights(num_particles: int, device=None) -> torch.Tensor:
    """Equal normalised log weights ``-log N`` (N,), float64."""
    return torch.full((num_particles,), -math.log(num_particles), dtype=torch.float64, device=device)


def reweight(log_weights: torch.Tensor, log_increments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log W', log sum_i W_i G_i)``: normalised new log weights (N,) and the evidence increment (0-d),
    float64; particles of zero weight stay at zero (no ``0 * inf``).

    :raises FloatingPointError: when the increment is not finite."""
    log_g = torch.where(log_weights > -math.inf, log_increments.double(), torch.zeros_like(log_weights))
    log_g = torch.nan_to_num(log_g, nan=-math.inf)
    unnormalised = log_weights + log_g
    increment = unnormalised.logsumexp(0)
    if not torch.isfinite(increment):
        raise FloatingPointError(f"the evidence increment is {float(increment)}")
    return unnormalised - increment, increment


def resample(log_weights: torch.Tensor, scheme: str = "multinomial") -> torch.Tensor:
    """Indices (N,) drawn ``N W_i`` times in expectation: ``"multinomial"`` or ``"systematic"``."""
    if scheme == "systematic":
        return diagnostics.systematic_resample(log_weights)
    if scheme != "multinomial":
        raise ValueError(f"resampling must be one of {RESAMPLING_SCHEMES}, got {scheme!r}")
    return torch.multinomial(log_weights.exp(), log_weights.numel(), replacement=True)


def maybe_resample(
    system: ParticleSystem, threshold: float, scheme: str = "multinomial"
) -> tuple[ParticleSystem, torch.Tensor | None, float]:
    """``(system', indices or None, ess)``: resampled (equal weights) when its normalised ESS is below
    ``threshold``; ``indices`` select the rows of any per-particle tensor that goes with it."""
    ess = float(diagnostics._log_ess(system.log_weights).exp())
    if ess >= threshold:
        return system, None, ess
    idx = resample(system.log_weights, scheme)
    resampled = ParticleSystem(
        particles=system.particles[idx],
        log_weights=initial_log_weights(idx.numel(), system.log_weights.device),
        log_evidence=system.log_evidence,
        ancestors=system.ancestors[idx],
        num_resampling_steps=system.num_resampling_steps + 1,
    )
    return resampled, idx, ess


def lee_whiteley_relative_variance(state: Any) -> float:
    """``Var(Z_hat) / Z_hat^2`` estimated from one run (Lee & Whiteley 2018):
    ``1 - (N / (N - 1))^(n + 1) (1 - sum_e (sum_{i: E_i = e} W_i)^2)``; may be slightly negative.
    ``state`` has ``log_weights``, ``ancestors`` and ``num_resampling_steps``."""
    n_particles = state.log_weights.numel()
    weights = state.log_weights.exp()
    per_ancestor = torch.zeros_like(weights).index_add_(0, state.ancestors, weights)
    same = float((per_ancestor**2).sum())
    log_factor = (state.num_resampling_steps + 1) * math.log(n_particles / (n_particles - 1))
    return 1.0 - math.exp(log_factor) * (1.0 - same)


def particle_precondition_options(options):
    """The preconditioner options of the particle samplers: several modes give their moment-matched
    mixture by default (a reference wide enough to hold them all: Langevin and MCMC moves cannot move
    mass between modes that the reference under-covers)."""
    if options is None:
        return {"multimodal": "mixture"}
    return {"multimodal": "mixture", **options} if isinstance(options, dict) else options  # else refused


class ParticleSampler(PosteriorSampler):
    """The weighted-sample surface of runs of particle systems (``final_states``: one per run, each
    with ``particles`` in the whitened coordinates, ``log_weights``, ``log_evidence``, ``ancestors``,
    ``num_resampling_steps``; ``run_log_evidence``; ``num_runs``; ``resampling``). The target is whitened
    through a :class:`~pyro_sde.infer.potential.CountingPotential`, so that every row evaluated is counted."""

    _counter: CountingPotential | None = None

    def _bind_potential(self, potential: Potential) -> None:
        super()._bind_potential(potential)
        self._counter = CountingPotential(potential)

    def _whitening_source(self) -> CountingPotential:
        return self._counter

    # the widening pilot (SMCSampler by default, SCLDSampler on request)
    def _init_pilot(self, pilot_particles: int | None) -> None:
        self.pilot_particles = (None if pilot_particles is None
                                else positive_int(pilot_particles, "pilot_particles", minimum=2))
        self.pilot_history: list = []  #: the pilot's SMC steps (empty: no pilot ran)

    def _reference_diagnostics(self) -> dict:
        """``preconditioner`` (its method, e.g. ``"svi+widened"``), ``pilot_temperatures`` (0: none)."""
        return {"preconditioner": None if self.preconditioner is None else self.preconditioner.method,
                "pilot_temperatures": len(self.pilot_history)}

    def _pilot_due(self) -> bool:
        """A pilot widens a freshly fitted single-mode Gaussian (``"laplace"``, ``"svi"``, ``"diagonal"``),
        once: not a given preconditioner (nor one restored from a checkpoint), the identity, nor a mixture
        of modes (whose spread a small pilot misjudges: on ManyWell-50 widening raised SMC's log Z MSE x
        evaluations 3.3-4.4x)."""
        return (self.pilot_particles is not None and self._precondition is not None
                and not self.pilot_history and self.preconditioner is not None
                and self.preconditioner.method in PRECONDITION_METHODS)

    def _run_pilot(self, path: GeometricPath, num_particles: int):
        """``(final state, steps)`` of a tempered SMC run of ``num_particles`` on ``path``."""
        raise NotImplementedError

    def _widen_from_pilot(self) -> None:
        """Run a pilot of ``pilot_particles`` from the fitted Gaussian; where its weighted particles spread
        wider than the Gaussian, widen it (:func:`~pyro_sde.infer.widen_to_draws`) and re-whiten the
        target."""
        dist.check_shardable(self.pilot_particles, "pilot_particles")
        state, self.pilot_history = self._run_pilot(GeometricPath(self._target), self.pilot_particles)
        widened = widen_to_draws(self.preconditioner, state.particles, state.log_weights)
        if widened is not None:
            self.preconditioner, self._target = whiten(self._whitening_source(), widened, None, {})

    @property
    def num_target_evaluations(self) -> int:
        """Rows at which the target's log density (or score) was evaluated, preconditioning included."""
        return 0 if self._counter is None else self._counter.num_evaluations

    def _require_run(self):
        if not getattr(self, "final_states", None):
            raise RuntimeError("call .run(*model_args) first")

    def _pooled(self):
        """``(z (R N, dim), log_w (R N,))``: every run's particles (unconstrained) and log weights
        ``log Z_r + log (N W_i)``, so that ``logmeanexp(log_w) = log mean_r Z_r``."""
        self._require_run()
        xs = torch.cat([s.particles for s in self.final_states])
        log_w = torch.cat([s.log_weights + s.log_evidence + math.log(s.log_weights.numel())
                           for s in self.final_states])
        return self._to_unconstrained(xs), log_w

    def _warn_if_few_effective(self, method: str, advice: str) -> None:
        """Warn when the pooled final particles rest on fewer than
        :data:`~pyro_sde.diagnostics.MIN_EFFECTIVE_SAMPLES` effective samples (eight_schools with SCLD's
        defaults, one seed of three: one particle of 4096 held 10 % of the weight, ESS 90, Pareto k 0.59,
        and theta[1]'s posterior sd came out 67 % too large)."""
        diagnostics._warn_if_few_effective(self._pooled()[1], f"{method}: the final weighted particles",
                                           advice, stacklevel=4)

    def _weighted_draw(self, num_samples=None):
        """The pooled particles of all runs (unconstrained) and their log weights ``log Z_r + log (N W_i)``
        (``logmeanexp`` is :meth:`log_evidence`'s estimate); with ``num_samples``, that many resampled from
        them (systematic), each with the log weight ``log Z_hat``."""
        z, log_w = self._pooled()
        if num_samples is not None:
            idx = diagnostics.systematic_resample(log_w, positive_int(num_samples, "num_samples"))
            log_z = log_w.logsumexp(0) - math.log(log_w.numel())
            z, log_w = z[idx], log_z.expand(num_samples).clone()
        return z, log_w

    def _weights_pareto_k(self, log_w):
        """Pareto k of the non-zero weights (zero weights have no tail); ``inf`` for 20 or fewer."""
        nonzero = log_w[log_w > -math.inf]
        return diagnostics._pareto_k(nonzero) if nonzero.numel() > 20 else math.inf

    def _evidence_weights(self, num_samples=None):
        if num_samples is not None:
            raise TypeError("the estimates use the runs' particles: num_samples is not used here")
        return self._pooled()[1]

    def _run_stderr(self) -> float:
        """Delta-method standard error of ``log mean_r Z_r`` from the runs' spread (R >= 2)."""
        z = (self.run_log_evidence - self.run_log_evidence.max()).exp()
        return float(z.std() / (z.mean() * math.sqrt(z.numel())))

    def _lee_whiteley_valid(self) -> bool:
        """Multinomial resampling, or none at all (then it is the delta method of importance sampling)."""
        return self.resampling == "multinomial" or all(s.num_resampling_steps == 0 for s in self.final_states)

    def _lee_whiteley_stderr(self) -> float:
        """Standard error of ``log mean_r Z_r`` from the runs' Lee-Whiteley variance estimates."""
        z = (self.run_log_evidence - self.run_log_evidence.max()).exp()
        rel = torch.tensor([max(lee_whiteley_relative_variance(s), 0.0) for s in self.final_states]).to(z)
        return float(((z**2 * rel).sum()).sqrt() / z.sum())

    def log_evidence(self) -> diagnostics.LogEvidence:
        """``(log_z, stderr, lower_bound, ess)``: ``log Z_hat = log mean_r Z_r`` (unbiased ``Z_hat``);
        ``stderr`` from the runs' spread when ``num_runs > 1``, else the Lee-Whiteley estimate (NaN, with
        a warning, under systematic resampling); ``lower_bound = mean_r log Z_r`` (``<= log Z`` in
        expectation); the normalised ESS of the pooled final weights. ``pareto_k`` is that of the
        pooled non-zero weights (warned above 0.7)."""
        _, log_w = self._pooled()
        log_z = log_w.logsumexp(0) - math.log(log_w.numel())
        if self.num_runs > 1:
            stderr = self._run_stderr()
        elif self._lee_whiteley_valid():
            stderr = self._lee_whiteley_stderr()
        else:
            stderr = math.nan
            warnings.warn(
                "no standard error for log Z: the single-run (Lee-Whiteley) estimate is not valid under "
                "systematic resampling; use num_runs > 1 or resampling='multinomial'",
                RuntimeWarning,
                stacklevel=2,
            )
        k = self._weights_pareto_k(log_w)
        diagnostics._warn_if_unreliable(k, f"the evidence log Z = {float(log_z):.4g}")
        return diagnostics.LogEvidence(
            log_z,
            torch.tensor(stderr, dtype=torch.float64, device=log_z.device),
            self.run_log_evidence.mean(),
            diagnostics._log_ess(log_w).exp(),
            pareto_k=k,
        )

    def _evidence_diagnostics(self) -> dict:
        """The evidence entries of ``diagnostics()``: estimate, both standard errors, ESS, k, runs."""
        ev = self.log_evidence()
        return {
            "log_evidence": float(ev.log_z),
            "log_evidence_stderr": float(ev.stderr),
            "log_evidence_stderr_lee_whiteley": self._lee_whiteley_stderr() if self._lee_whiteley_valid()
            else math.nan,
            "log_evidence_stderr_runs": self._run_stderr() if self.num_runs > 1 else math.nan,
            "log_evidence_lower_bound": float(ev.lower_bound),
            "run_log_evidence": self.run_log_evidence.tolist(),
            "ess": float(ev.ess),
            "pareto_k": ev.pareto_k,
            "reliable": ev.reliable,
            "num_runs": self.num_runs,
            "num_resampling_steps": [s.num_resampling_steps for s in self.final_states],
        }
