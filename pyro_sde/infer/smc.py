r"""``SMCSampler``: adaptive tempered sequential Monte Carlo for a Pyro model, with its evidence.

The particles move along the geometric path ``log pi_beta = (1 - beta) log q + beta log rho``
(:mod:`pyro_sde.infer.annealing`) from the preconditioning Gaussian ``q`` (``beta = 0``) to the
unconstrained posterior ``rho / Z`` (``beta = 1``). One step from ``beta`` to ``beta'``
(Del Moral, Doucet & Jasra 2006; adaptive as in Zhou, Johansen & Aston 2016):

1. ``beta'``: the largest step whose conditional ESS is ``target_conditional_ess``, shortened if the new
   weights' Pareto k exceeds ``max_pareto_k`` (:func:`~pyro_sde.infer.annealing.next_temperature`);
2. reweight: ``W_i <- W_i u_i / sum_j W_j u_j`` with ``u_i = (rho / q)(x_i)^(beta' - beta)``, and
   ``log Z += log sum_i W_i u_i`` (float64);
3. resample (multinomial, or systematic) when the ESS ``1 / (N sum W_i^2)`` falls below ``ess_threshold``;
4. move every particle by ``num_mcmc_steps`` MALA or HMC steps that leave ``pi_beta'`` invariant, with
   the proposal scaled by the population's weighted standard deviations (or Cholesky factor of its
   covariance) and the step size adapted from the batch's acceptance rate after each move.

Before the first run a small pilot run checks a fitted single-mode ``q`` against the posterior and
widens it where the posterior is wider (``pilot_particles``; :func:`~pyro_sde.infer.widen_to_draws`).

``Z_hat = prod_t sum_i W_{t-1}^i u_t^i`` is an unbiased estimate of ``Z = int rho`` (the model's
evidence ``p(y)``). Its standard error comes from independent runs (``num_runs > 1``: the delta method
on ``mean_r Z_r``) or from one run by the estimator of Lee & Whiteley (2018): with ``E_i`` the index of
particle ``i``'s ancestor at ``beta = 0`` and ``n`` resampling steps,
``Var(Z_hat) / Z_hat^2 ~= 1 - (N / (N - 1))^(n + 1) (1 - sum_e (sum_{i: E_i = e} W_i)^2)``, unbiased for
``Var(Z_hat)`` under multinomial resampling (the default). Systematic resampling (``resampling=
"systematic"``) breaks it: over 120 runs of 256 particles on a 3-D Gaussian and a 2-D mixture its mean
was 0.52 and -0.16 times the observed variance of ``Z_hat`` (multinomial: 1.08 and 1.10), and the
variance itself was no lower than multinomial's; so with systematic resampling the error bar needs
``num_runs > 1``.

The algorithm is the pair :func:`smc_init` / :func:`smc_step` on :class:`SMCState` and :class:`SMCInfo`
(BlackJAX style), run to ``beta = 1`` by :func:`smc_run`, which :class:`SMCSampler` drives;
reweighting, resampling and the evidence's error bars are those of :mod:`pyro_sde.infer.particles`, the
weighted-sample surface that of every sampler.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from pyro.infer.autoguide.initialization import init_to_uniform

from .. import _distributed as dist
from .. import diagnostics
from .._checks import nonnegative_int, positive_float, positive_int, unit_interval
from .._progress import progress_bar as _progress_bar
from ._inputs import check_dtype_device as _check_dtype_device
from ._inputs import check_target
from .annealing import GeometricPath, PathPoint, check_initial_point, next_temperature
from .kernels import KernelState, MoveKernel, adapt_step_size, get_kernel, population_scale
from .particles import (  # noqa: F401 (STUCK_ACCEPTANCE, MAX_STUCK_FRACTION: re-exported)
    MAX_STUCK_FRACTION,
    RESAMPLING_SCHEMES,
    STUCK_ACCEPTANCE,
    ParticleSampler,
    initial_log_weights,
    lee_whiteley_relative_variance,
    particle_precondition_options,
    resample,
    reweight,
    stuck_fraction,
    warn_if_stuck,
)
from .potential import Potential

if TYPE_CHECKING:
    from .precondition import Preconditioner

__all__ = [
    "SMCInfo", "SMCSampler", "SMCState", "smc_init", "smc_run", "smc_step", "lee_whiteley_relative_variance",
]

_PROPOSAL_SCALES = ("diagonal", "dense", "identity")


class SMCState(NamedTuple):
    """The particle system at one temperature (what :func:`smc_step` maps to the next)."""

    particles: torch.Tensor  #: ``x`` (N, dim), in the path's coordinates (whitened)
    log_weights: torch.Tensor  #: normalised ``log W`` (N,), float64 (``logsumexp = 0``)
    point: PathPoint  #: ``log rho``, ``log q`` and ``grad log rho`` at the particles
    beta: float  #: the temperature
    log_evidence: torch.Tensor  #: ``log Z_hat`` of ``pi_beta`` so far, 0-d float64
    ancestors: torch.Tensor  #: ``E_i``: index (in ``[0, N)``) of each particle's ancestor at ``beta = 0``
    num_resampling_steps: int  #: resampling steps so far (``n`` of the variance estimator)
    step_size: float  #: the move kernel's current step size
    num_target_evaluations: int  #: rows at which ``rho`` (and its score) was evaluated so far


class SMCInfo(NamedTuple):
    """What one step from the previous temperature to ``beta`` did."""

    beta: float  #: the new temperature
    ess: float  #: normalised ESS after reweighting, before resampling
    resampled: bool  #: whether the particles were resampled
    acceptance_rate: float  #: mean acceptance probability over the moves (nan without moves)
    step_size: float  #: the step size after the moves' adaptation
    log_evidence_increment: float  #: ``log sum_i W_i u_i``
    num_target_evaluations: int  #: target evaluations of this step (rows)
    #: fraction of particles whose moves' mean acceptance probability is below
    #: :data:`STUCK_ACCEPTANCE` (nan without moves): a region the adapted step size cannot explore
    stuck_fraction: float = math.nan


def smc_init(
    path: GeometricPath, num_particles: int, kernel: MoveKernel, *, step_size: float | None = None
) -> SMCState:
    """``N`` particles from ``q`` with equal weights at ``beta = 0`` (``num_particles`` target evaluations).

    :raises ValueError: if ``log rho`` is ``+inf`` at a particle or finite at none."""
    positive_int(num_particles, "num_particles", minimum=2)
    x = path.sample_reference(num_particles)
    num_nan = path.num_nan
    point = path.evaluate(x)
    check_initial_point(point, path.num_nan - num_nan)
    log_w = initial_log_weights(num_particles, x.device)
    return SMCState(
        particles=x,
        log_weights=log_w,
        point=point,
        beta=0.0,
        log_evidence=torch.zeros((), dtype=torch.float64, device=x.device),
        ancestors=torch.arange(num_particles, device=x.device),
        num_resampling_steps=0,
        step_size=kernel.initial_step_size(path.dim) if step_size is None else float(step_size),
        num_target_evaluations=num_particles,
    )


def smc_step(
    path: GeometricPath,
    state: SMCState,
    kernel: MoveKernel,
    *,
    target_conditional_ess: float = 0.9,
    max_pareto_k: float | None = None,
    ess_threshold: float = 0.5,
    num_mcmc_steps: int = 5,
    resampling: str = "multinomial",
    proposal_scale: str = "diagonal",
) -> tuple[SMCState, SMCInfo]:
    """One tempering step ``beta -> beta'``: choose ``beta'`` (``max_pareto_k``: see
    :func:`~pyro_sde.infer.annealing.next_temperature`), reweight, resample if needed, move (the
    proposal scaled by :func:`~pyro_sde.infer.kernels.population_scale` of kind ``proposal_scale``)."""
    log_ratio = state.point.log_likelihood_ratio  # (N,) float64
    beta = next_temperature(state.beta, state.log_weights, log_ratio, target_conditional_ess,
                            max_pareto_k=max_pareto_k)
    try:
        log_w, increment = reweight(state.log_weights, (beta - state.beta) * log_ratio)
    except FloatingPointError as e:
        raise FloatingPointError(f"at beta = {beta:.4g}: {e}") from e
    ess = float(diagnostics._log_ess(log_w).exp())
    x, point, ancestors = state.particles, state.point, state.ancestors
    num_resampling = state.num_resampling_steps
    resampled = ess < ess_threshold
    if resampled:
        idx = resample(log_w, resampling)
        x, ancestors = x[idx], ancestors[idx]
        point = PathPoint(*(t[idx] for t in point))
        log_w = torch.full_like(log_w, -math.log(log_w.numel()))
        num_resampling += 1
    fn = path.log_density_and_score_fn(beta)
    moved = KernelState(x, path.log_density(beta, point), path.score(beta, x, point), point)
    step_size, acceptance, particle_acceptance = state.step_size, [], 0.0
    scale = population_scale(x, log_w, proposal_scale) if num_mcmc_steps else None
    distributed = dist.is_distributed() and num_mcmc_steps > 0
    if distributed:  # each rank moves its slice of the (replicated) population with its own stream
        generator = dist.rank_generator(x.device)
        moved = _map_tensors(lambda t: t[dist.shard(x.shape[0])], moved)
    for _ in range(num_mcmc_steps):
        if distributed:
            moved, probs = kernel.step(fn, moved, step_size, scale=scale, generator=generator)
            acceptance.append(float(dist.global_mean_count(probs)[0]))  # the same step size on every rank
        else:
            moved, probs = kernel.step(fn, moved, step_size, scale=scale)
            acceptance.append(float(probs.mean()))
        particle_acceptance = particle_acceptance + probs / num_mcmc_steps
        step_size = adapt_step_size(step_size, acceptance[-1], kernel.target_acceptance)
    if distributed:
        moved = _map_tensors(dist.all_gather_cat, moved)
        particle_acceptance = dist.all_gather_cat(particle_acceptance)
    stuck = (stuck_fraction(particle_acceptance, moved.log_density, log_w) if num_mcmc_steps
             else math.nan)
    evaluations = num_mcmc_steps * kernel.evaluations_per_step * x.shape[0]
    new_state = SMCState(
        particles=moved.position,
        log_weights=log_w,
        point=moved.extras,
        beta=beta,
        log_evidence=state.log_evidence + increment,
        ancestors=ancestors,
        num_resampling_steps=num_resampling,
        step_size=step_size,
        num_target_evaluations=state.num_target_evaluations + evaluations,
    )
    info = SMCInfo(
        beta=beta,
        ess=ess,
        resampled=resampled,
        acceptance_rate=sum(acceptance) / len(acceptance) if acceptance else math.nan,
        step_size=step_size,
        log_evidence_increment=float(increment),
        num_target_evaluations=evaluations,
        stuck_fraction=stuck,
    )
    return new_state, info


def smc_run(
    path: GeometricPath,
    num_particles: int,
    kernel: MoveKernel,
    *,
    step_size: float | None = None,
    max_num_temperatures: int = 1000,
    on_step: Callable[[SMCInfo], None] | None = None,
    name: str = "tempered SMC",
    **step_options,
) -> tuple[SMCState, list[SMCInfo]]:
    """One tempered SMC run from ``beta = 0`` to 1: :func:`smc_init`, then :func:`smc_step` (with
    ``step_options``) until ``beta = 1``; the final state and every step's info (``on_step`` sees each).

    :raises RuntimeError: after ``max_num_temperatures`` steps short of ``beta = 1`` (naming the run by
        ``name``)."""
    state = smc_init(path, num_particles, kernel, step_size=step_size)
    infos: list[SMCInfo] = []
    while state.beta < 1:
        if len(infos) >= max_num_temperatures:
            raise RuntimeError(
                f"{name} needed more than max_num_temperatures={max_num_temperatures} steps "
                f"(reached beta = {state.beta:.3g}): lower target_conditional_ess, or raise "
                "max_num_temperatures"
            )
        state, info = smc_step(path, state, kernel, **step_options)
        infos.append(info)
        if on_step is not None:
            on_step(info)
    return state, infos


def _map_tensors(fn, state):
    """``fn`` applied to every tensor of a (Named)tuple of tensors, nested."""
    if isinstance(state, torch.Tensor):
        return fn(state)
    values = [_map_tensors(fn, v) for v in state]
    return type(state)(*values) if hasattr(state, "_fields") else type(state)(values)


class SMCSampler(ParticleSampler):
    r"""Adaptive tempered SMC for a Pyro model or an unnormalised log density, with the evidence.

    Example::

        smc = SMCSampler(model, num_particles=2048, num_runs=4)
        smc.run(data)
        samples = smc.get_samples(4000)                 # dict site -> (4000, *shape), like MCMC
        log_z, stderr, lower_bound, ess = smc.log_evidence()
        Predictive(model, posterior_samples=samples)(data)

    :param callable model: a Pyro model with continuous latent sites; its arguments go to :meth:`run`.
        Exactly one of ``model`` and ``log_density`` must be given.
    :param callable log_density: instead, a batched unnormalised log density ``(N, dim) -> (N,)``
        (samples come under the site name ``"x"``).
    :param int dim: its dimension, with ``log_density``.
    :param callable score: optional closed-form ``grad log_density`` ``(N, dim) -> (N, dim)``.
    :param int num_particles: ``N`` per run (2048); at least 2.
    :param float ess_threshold: resample when the normalised ESS falls below it, in ``(0, 1]`` (0.5; 1
        resamples at every step).
    :param float target_conditional_ess: the conditional ESS of each temperature step, in ``(0, 1)``
        (0.9; closer to 1 gives more, smaller steps).
    :param float max_pareto_k: a step whose new weights have a PSIS Pareto k above this is shortened
        (down to 1/16 of the CESS step) until they do not (0.7, the reliability bound of the final
        weights' warning; ``None``: the CESS alone). The CESS sees the bulk of the weights, not their
        tail: from the Laplace Gaussian, small conjugate models (Beta-binomial, Dirichlet-multinomial,
        Gamma-Poisson, a HalfCauchy scale) often went to ``beta = 1`` in one step and ended with k above
        0.7 and a warning (10-21 of 32 runs), none with the bound, at 1.4-1.9x the evaluations
        (``benchmarks/smc_tails.py`` in ``docs/benchmarks.md``).
    :param kernel: ``"mala"`` (default), ``"hmc"`` or a :class:`~pyro_sde.infer.kernels.MoveKernel`.
    :param int num_mcmc_steps: moves per temperature (5; 0 gives tempered importance sampling).
    :param int num_leapfrog_steps: leapfrog steps of ``kernel="hmc"`` (5).
    :param float target_acceptance: acceptance rate the step size is adapted to after each move
        (default the kernel's: 0.574 for MALA, 0.65 for HMC).
    :param float step_size: the initial step size ``eps`` (default: the kernel's for ``N(0, I_dim)``).
    :param str proposal_scale: the moves' proposal scale at each temperature, from the weighted
        particles: ``"diagonal"`` (default; their standard deviations), ``"dense"`` (the Cholesky factor
        of their covariance) or ``"identity"``.
    :param str resampling: ``"multinomial"`` (default: the single-run standard error is valid) or
        ``"systematic"`` (then only ``num_runs > 1`` gives a standard error).
    :param int num_runs: independent runs (1); their spread gives the evidence's standard error, and
        their particles are pooled with weights proportional to each run's ``Z_hat``.
    :param int max_num_temperatures: a run that needs more steps raises ``RuntimeError`` (1000).
    :param int pilot_particles: before the first run, a pilot of this many particles (256; ``None``: no
        pilot) checks a freshly fitted single-mode Gaussian (``"laplace"``, ``"svi"``, ``"diagonal"``)
        against the posterior: in the directions where the pilot's weighted particles spread wider than
        it beyond sampling noise, ``q`` takes their spread and mean
        (:func:`~pyro_sde.infer.widen_to_draws`; :attr:`preconditioner` is then
        ``"laplace+widened"``). A Laplace Gaussian narrower than a posterior with heavier tails leaves
        the tail unsampled and ``log Z`` low by more than its error bar: on the non-centred eight schools
        (32 seeds) the error was -0.018 +- 0.006 with a mean ``(error / stderr)^2`` of 2.1, and with the
        pilot -0.004 +- 0.003 and 0.93, at 0.8x the evaluations (``benchmarks/smc_tails.py``). Given
        preconditioners, the identity and mixtures of modes are used as they are.
    :param precondition: the reference Gaussian ``q`` (the SMC runs in its whitened coordinates, an
        exact change of variables): ``"laplace"`` (default), ``"svi"``, ``"diagonal"``, ``None``
        (``N(0, I)`` in unconstrained space), a ``(loc, scale_tril)`` pair or a
        :class:`~pyro_sde.infer.Preconditioner`; see :func:`~pyro_sde.infer.fit_preconditioner`.
    :param dict precondition_options: keyword arguments of :func:`~pyro_sde.infer.fit_preconditioner`.
        SMC's default is ``multimodal="mixture"``: when the fit finds several modes, ``q`` is their
        moment-matched mixture, wide enough to hold them all (from ``N(0, I)`` instead, the moves cannot
        move mass between modes the reference under-covers: on GMM-9 with 4096 particles, 4 seeds, log Z
        errors of -0.57, -0.69, -0.13 and +3.3 with standard errors 0.13-0.98, against +-0.03 with the
        mixture).
    :param init_strategy: Pyro init strategy (the first start of the preconditioner's MAP search).
    :param vectorize: how a model is evaluated on a batch (see
        :class:`~pyro_sde.infer.potential.ModelPotential`).
    :param dtype, device: with ``log_density`` only (a model's tensors decide otherwise).

    After :meth:`run`: ``history`` (one list of :class:`SMCInfo` per run), ``pilot_history`` (the
    pilot's), ``final_states``
    (:class:`SMCState` per run), ``run_log_evidence`` (``log Z_r`` per run), ``num_target_evaluations``
    (rows at which the target was evaluated, the preconditioner's fit included) and ``run_seconds``.
    A run ends with an :class:`~pyro_sde.diagnostics.UnreliableEstimateWarning` when more than
    :data:`MAX_STUCK_FRACTION` of the particles rejected almost every move at ``beta = 1``
    (``SMCInfo.stuck_fraction``): on Funnel-10 that region is the neck, and log Z is 0.5 nats low.
    """

    def __init__(
        self,
        model: Callable | None = None,
        *,
        log_density: Callable | None = None,
        dim: int | None = None,
        score: Callable | None = None,
        num_particles: int = 2048,
        ess_threshold: float = 0.5,
        target_conditional_ess: float = 0.9,
        max_pareto_k: float | None = 0.7,
        kernel: str | MoveKernel = "mala",
        num_mcmc_steps: int = 5,
        num_leapfrog_steps: int | None = None,
        target_acceptance: float | None = None,
        step_size: float | None = None,
        proposal_scale: str = "diagonal",
        resampling: str = "multinomial",
        num_runs: int = 1,
        max_num_temperatures: int = 1000,
        pilot_particles: int | None = 256,
        precondition: str | Preconditioner | tuple[torch.Tensor, torch.Tensor] | None = "laplace",
        precondition_options: dict | None = None,
        init_strategy: Callable = init_to_uniform,
        vectorize: str | bool = "auto",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        check_target(model, log_density, score)
        positive_int(num_particles, "num_particles", minimum=2)
        self.num_particles = num_particles
        self.ess_threshold = unit_interval(ess_threshold, "ess_threshold", closed_right=True)
        self.target_conditional_ess = unit_interval(
            target_conditional_ess, "target_conditional_ess", closed_right=False
        )
        if max_pareto_k is not None:
            max_pareto_k = positive_float(max_pareto_k, "max_pareto_k")
        self.max_pareto_k = max_pareto_k
        self.kernel = get_kernel(
            kernel, num_leapfrog_steps=num_leapfrog_steps, target_acceptance=target_acceptance
        )
        self.num_mcmc_steps = nonnegative_int(num_mcmc_steps, "num_mcmc_steps")
        if step_size is not None and not (
            not isinstance(step_size, bool) and isinstance(step_size, (int, float))
            and 0 < step_size < math.inf
        ):
            raise ValueError(f"step_size must be a positive finite number, got {step_size!r}")
        self.step_size = step_size
        if resampling not in RESAMPLING_SCHEMES:
            raise ValueError(f"resampling must be one of {RESAMPLING_SCHEMES}, got {resampling!r}")
        self.resampling = resampling
        if proposal_scale not in _PROPOSAL_SCALES:
            raise ValueError(f"proposal_scale must be one of {_PROPOSAL_SCALES}, got {proposal_scale!r}")
        self.proposal_scale = proposal_scale
        self.num_runs = positive_int(num_runs, "num_runs")
        self.max_num_temperatures = positive_int(max_num_temperatures, "max_num_temperatures")
        self._init_pilot(pilot_particles)
        device = _check_dtype_device(model, dtype, device)
        self._init_target(
            model, log_density=log_density, dim=dim, score=score, precondition=precondition,
            precondition_options=particle_precondition_options(precondition_options),
            init_strategy=init_strategy, vectorize=vectorize,
            dtype=dtype, device=device,
        )
        self._clear_results()

    def _clear_results(self):
        self._new_results()
        self.history: list[list[SMCInfo]] = []
        self.final_states: list[SMCState] = []
        self.run_log_evidence: torch.Tensor | None = None
        self.run_seconds = 0.0

    # ----------------------------------------------------------------------------------------
    # set-up
    def _bind_potential(self, potential: Potential):
        super()._bind_potential(potential)
        self._target = None  # whitened at run

    # ----------------------------------------------------------------------------------------
    # running
    def _run_once(self, path: GeometricPath, num_particles: int, bar=None) -> tuple[SMCState, list[SMCInfo]]:
        """One tempered SMC run of ``num_particles`` from ``beta = 0`` to 1: its final state and steps."""
        def progress(info):
            bar.update(len(self.final_states) + info.beta)

        return smc_run(
            path, num_particles, self.kernel, step_size=self.step_size,
            max_num_temperatures=self.max_num_temperatures, on_step=None if bar is None else progress,
            target_conditional_ess=self.target_conditional_ess, max_pareto_k=self.max_pareto_k,
            ess_threshold=self.ess_threshold, num_mcmc_steps=self.num_mcmc_steps,
            resampling=self.resampling, proposal_scale=self.proposal_scale,
        )

    def _run_pilot(self, path: GeometricPath, num_particles: int):
        return self._run_once(path, num_particles)

    def run(self, *args, progress_bar: bool | None = False, **kwargs) -> SMCSampler:
        """Run ``num_runs`` independent tempered SMC runs; ``args``/``kwargs`` go to the model. Returns
        ``self``. The preconditioner is fitted at the first run (and kept when the data change).
        ``progress_bar`` shows the temperature summed over runs (from 0 to ``num_runs``): ``True`` a
        bar, ``None`` a bar on a terminal and plain lines in a log, ``False`` (default) nothing.
        Under ``torch.distributed`` every rank holds the whole population (temperatures, weights and
        resampling computed alike from one shared random stream) and moves its slice of it."""
        self._setup_potential(args, kwargs)
        dist.sync_rng_state_()  # distributed: one random stream (rank 0's), the particles replicated
        dist.check_shardable(self.num_particles, "num_particles")
        self._setup_target()
        self._clear_results()
        start = time.perf_counter()
        if self._pilot_due():
            self._widen_from_pilot()
        path = GeometricPath(self._target)
        bar = _progress_bar(float(self.num_runs), enabled=progress_bar, desc="tempered SMC", unit="beta")
        for _ in range(self.num_runs):
            state, infos = self._run_once(path, self.num_particles, bar)
            self.final_states.append(state)
            self.history.append(infos)
        bar.close()
        if path.num_nan:
            warnings.warn(
                f"the log density was NaN at {path.num_nan} points (taken as -inf: zero weight, rejected "
                "moves)", RuntimeWarning, stacklevel=2,
            )
        warn_if_stuck(max((h[-1].stuck_fraction for h in self.history if h), default=math.nan),
                      "tempered SMC")
        self.run_log_evidence = torch.stack([s.log_evidence for s in self.final_states])
        self._warn_if_few_effective("tempered SMC", "use more particles or num_runs")
        self.run_seconds = time.perf_counter() - start
        return self

    @property
    def num_temperatures(self) -> list[int]:
        """Tempering steps of each run."""
        return [len(h) for h in self.history]

    # ----------------------------------------------------------------------------------------
    # estimates (the weighted-sample surface is ParticleSampler's)
    def diagnostics(self) -> dict:
        """Evidence with both standard errors, ESS, Pareto k, temperatures, acceptance, the reference
        (``preconditioner``: its method, e.g. ``"laplace+widened"``; ``pilot_temperatures``: 0 without a
        pilot) and cost."""
        acceptance = [i.acceptance_rate for h in self.history for i in h if math.isfinite(i.acceptance_rate)]
        return {
            **self._evidence_diagnostics(),
            "num_particles": self.num_particles,
            "num_temperatures": self.num_temperatures,
            **self._reference_diagnostics(),
            "mean_acceptance_rate": sum(acceptance) / len(acceptance) if acceptance else math.nan,
            "num_target_evaluations": self.num_target_evaluations,
            "run_seconds": self.run_seconds,
        }

    def __repr__(self):
        return (
            f"SMCSampler(kernel={self.kernel!r}, num_particles={self.num_particles}, "
            f"num_runs={self.num_runs}, temperatures={self.num_temperatures})"
        )
