r"""``SCLDSampler``: sequential controlled Langevin diffusion (Chen et al., ICLR 2025) for a Pyro model.

A learned control ``u`` corrects unadjusted Langevin moves along the geometric path
``log pi_beta = (1 - beta) log N(0, I) + beta log rho`` (:mod:`pyro_sde.infer.annealing`, whitened
coordinates of the preconditioner), on a grid ``0 = beta_0 < ... < beta_K = 1``. With Langevin steps
``h_k``, a diagonal metric ``M_j`` per sub-trajectory (``I`` unless there is no preconditioner),
``s_b = grad log pi_b`` and ``u_k(x) = u(k / K, x, guide=s_{beta_k}(x))`` (clipped), the forward and
backward kernels are those of controlled Monte Carlo diffusions (CMCD):

* ``F_k(x_{k+1} | x_k) = N(x_k + h_k M (s_{beta_{k+1}}(x_k) + u_k(x_k)), 2 h_k M)``,
* ``B_k(x_k | x_{k+1}) = N(x_{k+1} + h_k M (s_{beta_{k+1}}(x_{k+1}) - u_{k+1}(x_{k+1})), 2 h_k M)``,
* ``log G_k = log pi_{beta_{k+1}}(x_{k+1}) - log pi_{beta_k}(x_k) + log B_k - log F_k`` (float64),

one target evaluation and one network call per state (``u_{k+1}(x_{k+1})`` serves ``B_k`` and
``F_{k+1}``). ``prod_k G_k`` is an exact importance weight of the path (``E = Z``) for any control; with
``u = 0`` this is annealed importance sampling with unadjusted Langevin moves and the time-reversed
Langevin backward kernel. The ``K`` steps are cut into ``J`` sub-trajectories; at each of the ``J - 1``
inner boundaries the particles are reweighted by the piece's ``prod G`` (the evidence increment),
resampled when the ESS falls below a threshold, and moved by MALA / HMC steps that leave
``pi_beta`` invariant (step sizes adapted per boundary from acceptance), i.e. sequential Monte Carlo
with learned Langevin transitions; the last piece ends with a reweighting only. ``Z_hat`` is the
product of the increments (:mod:`pyro_sde.infer.particles`: unbiased, with the Lee-Whiteley error bar
under multinomial resampling).

Training is the bufferless log-variance algorithm of the paper: each step runs a batch through all
pieces with the current control (no gradients, resampling and moves included), stores the states,
then recomputes every piece's ``log G`` from the detached states with one batched network call and
minimises ``mean_j Var_i(log G_j^i) / dim`` (zero exactly when the control is optimal).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from pyro.infer.autoguide.initialization import init_to_uniform

from .. import diagnostics
from .._checks import clamp_finite as _clip
from .._checks import nonnegative_int, positive_float, positive_int, unit_interval
from ..nn import ControlNetwork
from ._inputs import check_dtype_device as _check_dtype_device
from ._inputs import check_target
from ._training import StepInfo, TrainedSampler
from .annealing import GeometricPath, PathPoint, check_initial_point
from .kernels import KernelState, MoveKernel, adapt_step_size, get_kernel, population_scale
from .particles import (
    RESAMPLING_SCHEMES,
    ParticleSampler,
    ParticleSystem,
    initial_log_weights,
    maybe_resample,
    particle_precondition_options,
    reweight,
    stuck_fraction,
    warn_if_stuck,
)
from .potential import Potential

if TYPE_CHECKING:
    from .precondition import Preconditioner

__all__ = ["SCLDInfo", "SCLDSampler", "adaptive_annealing_schedule", "annealing_schedule"]

_ANNEALING = ("adaptive", "linear", "cosine")
_METRICS = ("auto", "diagonal", "identity")


def annealing_schedule(num_steps: int, kind: str = "linear") -> list[float]:
    """``[beta_0 = 0, ..., beta_K = 1]`` (K + 1 floats): ``k / K`` (``"linear"``) or
    ``(1 - cos(pi k / K)) / 2`` (``"cosine"``: small steps at both ends). (``"adaptive"`` needs the
    target: :func:`adaptive_annealing_schedule`.)"""
    positive_int(num_steps, "num_steps")
    if kind not in _ANNEALING[1:]:
        raise ValueError(f"annealing must be one of {_ANNEALING[1:]} here, got {kind!r}")
    if kind == "linear":
        betas = [k / num_steps for k in range(num_steps + 1)]
    else:
        betas = [0.5 * (1 - math.cos(math.pi * k / num_steps)) for k in range(num_steps + 1)]
    betas[0], betas[-1] = 0.0, 1.0
    return betas


@torch.no_grad()
def adaptive_annealing_schedule(
    path: GeometricPath,
    num_steps: int,
    kernel: MoveKernel,
    *,
    num_particles: int = 256,
    target_conditional_ess: float = 0.9,
    num_mcmc_steps: int = 2,
    max_num_temperatures: int = 1000,
) -> list[float]:
    """``[beta_0 = 0, ..., beta_K = 1]`` spaced like adaptive tempered SMC on ``path``: a pilot run of
    :func:`~pyro_sde.infer.smc.smc_run` with ``num_particles`` particles gives the temperatures
    ``b_0 < ... < b_T`` of equal conditional ESS, and ``beta_k`` interpolates ``t -> b_t`` linearly at
    ``t = k T / K`` (so the grid is fine where the target changes fast along the path, at the start
    mostly)."""
    from .smc import smc_run  # the SMC algorithm, not its sampler class

    positive_int(num_steps, "num_steps")
    _, infos = smc_run(path, num_particles, kernel, max_num_temperatures=max_num_temperatures,
                       name="annealing='adaptive': the pilot",
                       target_conditional_ess=target_conditional_ess, num_mcmc_steps=num_mcmc_steps)
    temperatures = [0.0] + [info.beta for info in infos]
    num_temperatures = len(temperatures) - 1
    betas = [0.0]
    for k in range(1, num_steps):
        t = k * num_temperatures / num_steps
        i = min(int(t), num_temperatures - 1)
        betas.append(temperatures[i] + (t - i) * (temperatures[i + 1] - temperatures[i]))
    return betas + [1.0]


class SCLDInfo(NamedTuple):
    """What one sub-trajectory boundary did (at ``beta``)."""

    beta: float  #: the boundary's temperature
    ess: float  #: normalised ESS after reweighting, before resampling
    resampled: bool  #: whether the particles were resampled
    acceptance_rate: float  #: mean acceptance probability of the moves (nan without moves)
    step_size: float  #: the move kernel's step size after adaptation (nan without moves)
    log_evidence_increment: float  #: ``log sum_i W_i prod_k G_k^i`` over the piece


class _Trajectories(NamedTuple):
    """The detached ingredients of ``J`` pieces of ``n`` steps each (what the loss recomputes from)."""

    states: torch.Tensor  #: ``x_k`` (J, n + 1, N, dim): each piece's start (after the moves) to its end
    guides: torch.Tensor  #: ``s_{beta_k}(x_k)`` (J, n + 1, N, dim): the control's input
    forward_means: torch.Tensor  #: ``x_k + h s_{beta_{k+1}}(x_k)`` (J, n, N, dim)
    log_density_increments: torch.Tensor  #: ``log pi_{k+1}(x_{k+1}) - log pi_k(x_k)`` (J, n, N), float64


def _langevin_log_increment(
    log_density_increment, x, x_next, forward_mean, backward_mean, u, u_next, h, metric
):
    """``log G_k = log pi_{k+1}(x') - log pi_k(x) + log B_k(x | x') - log F_k(x' | x)``, float64 of shape
    ``x.shape[:-1]``, with ``F_k = N(forward_mean + h M u, 2h M)``, ``B_k = N(backward_mean - h M u', 2h M)``
    and ``M = diag(metric)`` (``h`` a float or a tensor broadcasting against ``x``: one step per row of
    states; ``metric`` broadcasting against ``x``; the log-determinants of ``F`` and ``B`` cancel)."""
    hm = h * metric
    forward_residual = ((x_next - forward_mean - hm * u) / metric.sqrt()).double()
    backward_residual = ((x - backward_mean + hm * u_next) / metric.sqrt()).double()
    log_b_minus_log_f = (forward_residual.square().sum(-1) - backward_residual.square().sum(-1))
    if isinstance(h, torch.Tensor):
        return log_density_increment + log_b_minus_log_f / (4 * h.double().squeeze(-1))
    return log_density_increment + log_b_minus_log_f / (4 * h)


def _check_step_sizes(step_size, num_steps: int) -> list[float] | None:
    """``step_size`` as ``K`` floats (``None`` for ``"auto"``); a clear error otherwise."""
    if isinstance(step_size, str):
        if step_size != "auto":
            raise ValueError(
                f"step_size must be 'auto', a positive float or {num_steps} of them, got {step_size!r}"
            )
        return None
    if isinstance(step_size, (list, tuple)):
        if len(step_size) != num_steps:
            raise ValueError(f"step_size must have num_steps = {num_steps} entries, got {len(step_size)}")
        return [positive_float(h, "step_size") for h in step_size]
    return [positive_float(step_size, "step_size")] * num_steps


class SCLDSampler(ParticleSampler, TrainedSampler):
    r"""Sequential controlled Langevin diffusion for a Pyro model or an unnormalised log density, with
    the evidence (see the module for the mathematics).

    Example::

        scld = SCLDSampler(model, num_steps=32, num_subtrajectories=4)
        scld.run(data, num_iterations=300)             # trains the control (TrainedSampler.run)
        samples = scld.get_samples(4000)               # from 4096 particles drawn with the trained control
        log_z, stderr, lower_bound, ess = scld.log_evidence()
        Predictive(model, posterior_samples=samples)(data)

    :param callable model: a Pyro model with continuous latent sites; its arguments go to :meth:`run`.
        Exactly one of ``model`` and ``log_density`` must be given.
    :param callable log_density: instead, a batched unnormalised log density ``(N, dim) -> (N,)``
        (samples come under the site name ``"x"``).
    :param int dim: its dimension, with ``log_density``.
    :param callable score: optional closed-form ``grad log_density`` ``(N, dim) -> (N, dim)``.
    :param int num_steps: Langevin steps ``K`` from ``beta = 0`` to 1 (32).
    :param int num_subtrajectories: pieces ``J`` between resampling / move points (4); must divide
        ``num_steps``; 1 gives a learned AIS without resampling.
    :param str annealing: the temperature grid: ``"adaptive"`` (default: spaced like adaptive tempered
        SMC, from a pilot of 256 particles when the target is bound, see
        :func:`adaptive_annealing_schedule`), ``"linear"`` or ``"cosine"`` (:func:`annealing_schedule`).
        Untrained, over 16 seeds of 4096 particles, "adaptive" against "linear" gave a log Z RMSE of 0.039
        against 0.20 on GMM-9, 0.15 against 0.26 on ManyWell-5 and (8 seeds) 0.057 against 0.17 on
        ManyWell-50: the linear grid's first piece leaves an ESS of 1-4 % on ManyWell-5.
    :param step_size: the Langevin steps ``h_k`` in whitened coordinates, in units of the metric
        (:attr:`step_sizes`):
        ``"auto"`` (default; step by step along the path, the largest of :attr:`step_size_grid` whose
        unadjusted step, untrained, keeps a mean Metropolis acceptance of at least 0.9 on 256 pilot
        particles: see :meth:`_tune_step_sizes`), a number (the same ``h`` at every step) or ``K``
        numbers. Explicit steps need ``h`` well below ``2 / curvature``; the weights stay exact for any
        ``h``, but a too large one makes them useless (with a fixed ``h = 0.1`` the untrained log Z of
        ManyWell-5 was 60-80 nats low; "auto" picks 0.001-0.05 along its path, 0.1-0.25 on a whitened
        Gaussian). "auto" can be too large: on the non-centred eight schools (0.1-0.25 there) the default
        run's log Z RMSE was 0.25 over 12 seeds, with ``step_size=0.02`` 0.028 (see ``pilot_particles``).
    :param str metric: the diagonal Langevin metric ``M_j`` of each sub-trajectory
        (:attr:`langevin_metric`, (J, dim)): ``"diagonal"`` (``M_0 = I``, then ``M_{j+1}`` the squared
        spread of the step-size pilot's particles after their moves at boundary ``j``), ``"identity"``, or
        ``"auto"`` (default: ``"diagonal"`` with ``precondition=None``, whose coordinates keep the
        target's scales, else ``"identity"``, since the whitened coordinates have unit scale). On N(0,
        diag(0.5..3)^2) without a preconditioner (8 seeds, 2048 particles) the identity metric's log Z
        errors were (err / se)^2 = 4.6 on average (2 of 8 beyond 3 se), the diagonal one's 1.6; with the
        Laplace preconditioner on ManyWell-50 (32 seeds) the diagonal metric's pilot noise raised the log Z
        variance 1.5x.
    :param int num_particles: ``N`` per run of the particle systems behind the estimates (4096).
    :param int num_runs: independent particle systems (1); their spread gives the standard error.
    :param float ess_threshold: resample at a boundary when the normalised ESS is below it, in
        ``(0, 1]`` (0.3).
    :param str resampling: ``"multinomial"`` (default: the single-run standard error is valid) or
        ``"systematic"``.
    :param kernel: the moves at the boundaries: ``"mala"`` (default), ``"hmc"`` or a
        :class:`~pyro_sde.infer.kernels.MoveKernel`.
    :param int num_mcmc_steps: moves per inner boundary (1; 0: none). More moves explore heavy tails
        that the Langevin steps barely reach. On the non-centred eight schools (untrained, 32 seeds) the
        log Z RMSE was 0.14 with 1 move, with a mean ``(error / stderr)^2`` of 4.6, and 0.090 (2.3) with
        5, at 1.26x the evaluations; trained by the default :meth:`run` (12 seeds) it was 0.25 with 1
        move (mean error -0.12; three runs 0.41-0.55 low, all warned, and one 0.050 low at 4.1 standard
        errors, unwarned) and 0.14 with 5 (mean ``(error / stderr)^2`` 2.7 against 9.6; two runs 0.30-0.35
        low, warned; the unwarned within 1.5 standard errors), at 1.46x the evaluations (3.1e6). On
        ManyWell-5 / -50 (untrained, 64 seeds) 5 moves cut the MSE x evaluations 0.65x / 0.74x; on GMM-9 and
        Funnel-10 it stayed within noise. For the evidence of a hierarchical model, ``SMCSampler`` is far
        cheaper (eight schools: RMSE 0.019 at 7.9e4 evaluations).
    :param int num_leapfrog_steps: leapfrog steps of ``kernel="hmc"`` (5).
    :param float target_acceptance: acceptance rate the moves' step sizes are adapted to (default the
        kernel's: 0.574 MALA, 0.65 HMC).
    :param torch.nn.Module control: a custom control ``control(tau, x, guide) -> u`` (``tau = k / K``,
        ``guide = s_{beta_k}(x)``; ``tau`` 0-d with ``x`` (N, dim), or (M, 1, 1) with ``x`` (M, N, dim));
        default a :class:`~pyro_sde.nn.ControlNetwork` that is exactly zero
        at initialisation (so that the untrained sampler is AIS with Langevin moves and resampling).
    :param int hidden_dim, num_layers: size of the default network (64, 3).
    :param float lr: Adam learning rate (1e-3: at 5e-3, 40 iterations made Funnel-10's log Z 2.4 too high
        in one of two seeds, and ManyWell-5's 1-2.5 nats low).
    :param float final_lr_fraction: geometric decay of the learning rate over a run (0.1).
    :param float grad_clip: gradient-norm clip (1.0; ``None`` to disable).
    :param float score_clip: the Langevin drift and the control's guide use ``s_beta`` clamped to
        ``[-score_clip, score_clip]`` (100): it bounds explicit steps on stiff targets (a diverging path
        gets a negligible weight instead of overflowing); the weights stay exact (the same clipped drift
        is in ``F`` and ``B``).
    :param float control_clip: the control is clamped to ``[-control_clip, control_clip]`` (100).
    :param float ema_decay: EMA of the network weights used for sampling (0.999; ``None`` disables).
    :param precondition: the reference Gaussian ``q`` (``beta = 0``, the run is in its whitened
        coordinates): ``"laplace"`` (default), ``"svi"``, ``"diagonal"``, ``None``, a
        ``(loc, scale_tril)`` pair or a :class:`~pyro_sde.infer.Preconditioner`.
    :param dict precondition_options: keyword arguments of :func:`~pyro_sde.infer.fit_preconditioner`.
        The default is ``multimodal="mixture"``, as for :class:`~pyro_sde.infer.SMCSampler`.
    :param int pilot_particles: ``None`` (default): no pilot. A number: before anything else, the
        widening pilot of :class:`~pyro_sde.infer.SMCSampler` (a tempered SMC run of this many particles
        from a freshly fitted single-mode Gaussian, which takes the pilot's spread and mean in the
        directions where it is wider: :func:`~pyro_sde.infer.widen_to_draws`); its evaluations are
        counted. Not the default: with the automatic Langevin steps a widened reference made the
        non-centred eight schools worse (trained, 12 seeds: 0.22-6.4 low, all warned). With
        ``pilot_particles=256, step_size=0.02`` the default run's log Z RMSE there was 0.017 over 12 seeds
        (mean ``(error / stderr)^2`` 1.9, 2.5e6 evaluations), against 0.028 with ``step_size=0.02`` alone
        and 0.25 with the defaults; untrained, 0.012 over the 13 of 16 seeds whose fit was widened. A
        step chosen on one model is not a rule (on ManyWell-5 ``step_size=0.02`` left log Z 29 nats
        low, warned): measure before you rely on it (docs/samplers.md).
    :param init_strategy: Pyro init strategy (the first start of the preconditioner's MAP search).
    :param vectorize: how a model is evaluated on a batch (see
        :class:`~pyro_sde.infer.potential.ModelPotential`).
    :param dtype, device: with ``log_density`` only (a model's tensors decide otherwise).

    Before any training the control is exactly zero: the estimates are then those of annealed
    importance sampling with unadjusted Langevin moves, resampling and MCMC (SMC with Langevin
    proposals), still unbiased for ``Z``.

    Attributes: ``losses`` / ``history`` (:class:`~pyro_sde.infer.StepInfo` per training step),
    ``eval_history``, ``final_states`` (one :class:`~pyro_sde.infer.particles.ParticleSystem` per run,
    drawn with the sampling control on first use or by :meth:`sample_particles`), ``particle_history``
    (:class:`SCLDInfo` per boundary and run), ``pilot_history`` (the widening pilot's SMC steps),
    ``mcmc_step_sizes`` (per inner boundary),
    ``langevin_metric`` and
    ``num_target_evaluations`` (training, checks and particle systems included).
    """

    method = "scld"
    _progress_desc = "scld"

    def __init__(
        self,
        model: Callable | None = None,
        *,
        log_density: Callable | None = None,
        dim: int | None = None,
        score: Callable | None = None,
        num_steps: int = 32,
        num_subtrajectories: int = 4,
        annealing: str = "adaptive",
        step_size: float | str = "auto",
        metric: str = "auto",
        num_particles: int = 4096,
        num_runs: int = 1,
        ess_threshold: float = 0.3,
        resampling: str = "multinomial",
        kernel: str | MoveKernel = "mala",
        num_mcmc_steps: int = 1,
        num_leapfrog_steps: int | None = None,
        target_acceptance: float | None = None,
        control: torch.nn.Module | None = None,
        hidden_dim: int = 64,
        num_layers: int = 3,
        lr: float = 1e-3,
        final_lr_fraction: float = 0.1,
        grad_clip: float | None = 1.0,
        score_clip: float = 100.0,
        control_clip: float = 100.0,
        ema_decay: float | None = 0.999,
        precondition: str | Preconditioner | tuple[torch.Tensor, torch.Tensor] | None = "laplace",
        precondition_options: dict | None = None,
        pilot_particles: int | None = None,
        init_strategy: Callable = init_to_uniform,
        vectorize: str | bool = "auto",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ):
        check_target(model, log_density, score)
        self.num_steps = positive_int(num_steps, "num_steps")
        self.num_subtrajectories = positive_int(num_subtrajectories, "num_subtrajectories")
        if num_steps % num_subtrajectories:
            raise ValueError(
                f"num_steps ({num_steps}) must be a multiple of num_subtrajectories ({num_subtrajectories})"
            )
        if annealing not in _ANNEALING:
            raise ValueError(f"annealing must be one of {_ANNEALING}, got {annealing!r}")
        #: the temperature grid (K + 1 floats; "adaptive": set when the target is bound)
        self.betas: list[float] | None = (
            None if annealing == "adaptive" else annealing_schedule(num_steps, annealing)
        )
        self.annealing = annealing
        if metric not in _METRICS:
            raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
        self.metric = metric
        #: the Langevin step ``h_k`` of each step k (K floats; "auto": tuned when the target is bound)
        self.step_sizes: list[float] | None = _check_step_sizes(step_size, num_steps)
        self.step_size_acceptance: float | None = None  #: the "auto" tuning's lowest mean acceptance
        self.num_particles = positive_int(num_particles, "num_particles", minimum=2)
        self.num_runs = positive_int(num_runs, "num_runs")
        self.ess_threshold = unit_interval(ess_threshold, "ess_threshold", closed_right=True)
        if resampling not in RESAMPLING_SCHEMES:
            raise ValueError(f"resampling must be one of {RESAMPLING_SCHEMES}, got {resampling!r}")
        self.resampling = resampling
        self.kernel = get_kernel(
            kernel, num_leapfrog_steps=num_leapfrog_steps, target_acceptance=target_acceptance
        )
        self.num_mcmc_steps = nonnegative_int(num_mcmc_steps, "num_mcmc_steps")
        if control is not None and not isinstance(control, torch.nn.Module):
            raise TypeError("control must be a torch.nn.Module")
        self.control = control
        self._network_options = dict(
            hidden_dim=positive_int(hidden_dim, "hidden_dim"),
            num_layers=positive_int(num_layers, "num_layers"),
            guide_scale_init=0.0,
        )
        self.score_clip = positive_float(score_clip, "score_clip")
        self.control_clip = positive_float(control_clip, "control_clip")
        device = _check_dtype_device(model, dtype, device)
        self._config = dict(
            num_steps=num_steps, num_subtrajectories=num_subtrajectories, annealing=annealing,
            step_size=step_size, metric=metric, num_particles=num_particles, num_runs=num_runs,
            ess_threshold=ess_threshold,
            resampling=resampling, kernel=self.kernel.name, num_mcmc_steps=num_mcmc_steps,
            num_leapfrog_steps=getattr(self.kernel, "num_leapfrog_steps", None),
            target_acceptance=self.kernel.target_acceptance, hidden_dim=hidden_dim, num_layers=num_layers,
            lr=lr, final_lr_fraction=final_lr_fraction, grad_clip=grad_clip, score_clip=score_clip,
            control_clip=control_clip,
            ema_decay=ema_decay, vectorize=vectorize, dim=dim, dtype=dtype,
        )
        self._init_training(
            lr=lr, grad_clip=grad_clip, final_lr_fraction=final_lr_fraction, ema_decay=ema_decay
        )
        self._path: GeometricPath | None = None
        self.mcmc_step_sizes: list[float] | None = None
        #: the Langevin metric's diagonal of each piece (J, dim) (set when the target is bound)
        self.langevin_metric: torch.Tensor | None = None
        self.stuck_check_step_size: float | None = None  #: the diagnostic moves' step at beta = 1
        self.stuck_fractions: list[float] = []  #: per run: see :meth:`_stuck_fraction`
        self._final_states: list[ParticleSystem] | None = None
        self.particle_history: list[list[SCLDInfo]] = []
        self._init_pilot(pilot_particles)
        self._init_target(
            model, log_density=log_density, dim=dim, score=score, precondition=precondition,
            precondition_options=particle_precondition_options(precondition_options),
            init_strategy=init_strategy, vectorize=vectorize,
            dtype=dtype, device=device,
        )

    # ----------------------------------------------------------------------------------------
    # set-up
    def _bind_potential(self, potential: Potential):
        super()._bind_potential(potential)
        self._final_states = None
        self._check_saved_fingerprint()
        self._setup_target()
        target = self._target
        if self.control is None:
            self.control = ControlNetwork(target.dim, **self._network_options)
        self.control.to(dtype=target.dtype, device=target.device)
        self._taus = torch.arange(self.num_steps + 1, dtype=torch.float64) / self.num_steps
        self._taus = self._taus.to(dtype=target.dtype, device=target.device)
        self._setup_optimizer()  # a checkpoint's state (grid and step sizes included) is applied here
        tune_moves = self.mcmc_step_sizes is None  # fresh: neither a checkpoint nor an earlier binding
        if tune_moves:
            initial = self.kernel.initial_step_size(target.dim)
            self.mcmc_step_sizes = [initial] * (self.num_subtrajectories - 1)
            tune_moves = self.num_mcmc_steps > 0 and self.num_subtrajectories > 1
        if self.betas is None:  # annealing="adaptive", not from a checkpoint
            self.betas = adaptive_annealing_schedule(self._path, self.num_steps, self.kernel)
        tune_steps = self.step_sizes is None
        diagonal = self.metric == "diagonal" or (self.metric == "auto" and self.preconditioner is None)
        tune_metric = self.langevin_metric is None and diagonal and self.num_subtrajectories > 1
        if self.langevin_metric is None and not tune_metric:  # "identity", or a single piece
            self.langevin_metric = torch.ones(self.num_subtrajectories, target.dim, dtype=target.dtype,
                                              device=target.device)
        if tune_steps or tune_moves or tune_metric:
            tuned, acceptance, metric = self._tune_step_sizes(
                tune_steps=tune_steps, tune_moves=tune_moves, tune_metric=tune_metric
            )
            if tune_steps:
                self.step_sizes, self.step_size_acceptance = tuned, acceptance
            if tune_metric:
                self.langevin_metric = metric

    def _setup_target(self):
        """Whiten the (counted) potential, widened by the pilot when asked (``pilot_particles``); the
        annealing path runs in the whitened coordinates."""
        super()._setup_target()
        if self._pilot_due():
            self._widen_from_pilot()
        self._path = GeometricPath(self._target)

    def _run_pilot(self, path: GeometricPath, num_particles: int):
        from .smc import smc_run  # the SMC algorithm, not its sampler class

        # SMCSampler's own pilot: its defaults (Pareto k limit 0.7 on each step's weights)
        return smc_run(path, num_particles, self.kernel, name="pilot_particles: the widening pilot",
                       max_pareto_k=0.7)

    def setup(self, *args, **kwargs) -> SCLDSampler:
        """Bind the model's arguments (potential, preconditioner, network, optimiser) without training."""
        self._setup_potential(args, kwargs)
        return self

    def _nets(self) -> list[torch.nn.Module]:
        return [self.control]

    def _checkpoint_extra(self) -> dict:
        return {"mcmc_step_sizes": list(self.mcmc_step_sizes), "step_sizes": self.step_sizes,
                "betas": self.betas, "stuck_check_step_size": self.stuck_check_step_size,
                "langevin_metric": self.langevin_metric.detach().cpu()}

    def _load_checkpoint_extra(self, extra: dict) -> None:
        if extra.get("betas") is not None:
            self.betas = [float(b) for b in extra["betas"]]
        if extra.get("stuck_check_step_size") is not None:
            self.stuck_check_step_size = float(extra["stuck_check_step_size"])
        if "mcmc_step_sizes" in extra:
            self.mcmc_step_sizes = list(extra["mcmc_step_sizes"])
            # a checkpoint from before the metric was trained with the identity
            metric = extra.get("langevin_metric")
            metric = torch.ones(self.num_subtrajectories, self._target.dim) if metric is None else metric
            self.langevin_metric = metric.to(dtype=self._target.dtype, device=self._target.device)
        if extra.get("step_sizes") is not None:
            self.step_sizes = [float(h) for h in extra["step_sizes"]]
        elif extra.get("step_size") is not None:  # a checkpoint from before the per-step sizes
            self.step_sizes = [float(extra["step_size"])] * self.num_steps

    #: candidate Langevin steps of ``step_size="auto"``, largest first
    step_size_grid = (0.25, 0.1, 0.05, 0.025, 0.01, 0.005, 0.0025, 0.001, 0.0005)
    #: the lowest mean acceptance (over particles) that ``"auto"`` accepts at a step
    min_step_acceptance = 0.9

    #: moves per inner boundary with which the pilot adapts the move kernel's step size
    pilot_moves = 8
    #: particles of the pilot that tunes the Langevin steps, metric and moves
    tuning_particles = 256

    @torch.no_grad()
    def _tune_step_sizes(self, *, tune_steps: bool = True, tune_moves: bool = True, tune_metric: bool = True):
        """``(h_0..h_{K-1}, acceptance, metric)``: step by step along the path, with the untrained control
        (zero) and :attr:`tuning_particles` pilot particles.

        ``tune_steps``: ``h_k`` is the largest of :attr:`step_size_grid` (at most one grid level above
        ``h_{k-1}``) whose unadjusted Langevin step has a mean Metropolis acceptance of at least
        :attr:`min_step_acceptance`: the backward kernel then nearly reverses the forward one and the
        weights stay informative; the lowest acceptance is returned. The acceptance of ``x -> y`` for
        ``pi_{k+1}`` is ``min(1, pi_{k+1}(y) B_k(x | y) / (pi_{k+1}(x) F_k(y | x)))``. Otherwise the
        pilot walks with :attr:`step_sizes`.

        ``tune_moves``: at each inner boundary the pilot particles take :attr:`pilot_moves` moves, each
        adapting that boundary's step size (:attr:`mcmc_step_sizes`, starting from the previous
        boundary's), so that the first particle system's moves are not wasted at an untuned step.

        ``tune_metric``: the pilot also moves at the boundaries, and piece ``j + 1``'s Langevin metric is
        the squared (diagonal) spread of the moved pilot at boundary ``j`` (piece 0's is the reference's,
        ones); otherwise the pilot walks with :attr:`langevin_metric`."""
        path, betas, grid = self._path, self.betas, self.step_size_grid
        n = self.num_steps // self.num_subtrajectories
        x = path.sample_reference(self.tuning_particles)
        point = path.evaluate(x)
        uniform = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)  # the pilot's log weights
        metrics = [torch.ones_like(x[0])] if tune_metric else list(self.langevin_metric)
        level, step_sizes, lowest = 0, [], 1.0
        move_step = self.mcmc_step_sizes[0] if self.mcmc_step_sizes else None  # carried across boundaries
        for k in range(self.num_steps):
            beta, metric = betas[k + 1], metrics[k // n]
            drift_x, log_pi_x = self._drift(beta, x, point), path.log_density(beta, point).double()
            level = max(level - 1, 0)
            while True:
                h = grid[level] if tune_steps else self.step_sizes[k]
                forward_mean = x + h * metric * drift_x
                y = forward_mean + (2 * h * metric).sqrt() * torch.randn_like(x)
                point_y = path.evaluate(y)
                backward_mean = y + h * metric * self._drift(beta, y, point_y)
                log_ratio = path.log_density(beta, point_y).double() - log_pi_x
                log_ratio = log_ratio + (((y - forward_mean).square() - (x - backward_mean).square())
                                         / metric).sum(-1).double() / (4 * h)
                rate = float(torch.nan_to_num(log_ratio, nan=-math.inf).clamp(max=0).exp().mean())
                if not tune_steps or rate >= self.min_step_acceptance or level == len(grid) - 1:
                    break
                level += 1
            step_sizes.append(h)
            lowest = min(lowest, rate)
            x, point = y, point_y
            if (tune_moves or tune_metric) and (k + 1) % n == 0 and k + 1 < self.num_steps:
                j = (k + 1) // n - 1
                for _ in range(self.pilot_moves):  # the proposal scale follows the moving pilot
                    scale = population_scale(x, uniform, "diagonal")
                    x, point, move_step, _, _ = self._move(beta, x, point, scale, move_step, 1)
                if tune_moves:
                    self.mcmc_step_sizes[j] = move_step
                if tune_metric:
                    metrics.append(population_scale(x, uniform, "diagonal").square())
        if tune_steps and lowest < self.min_step_acceptance:
            warnings.warn(
                f"step_size='auto': even h = {grid[-1]:g} has a Langevin acceptance of {lowest:.2f} at some "
                f"step (< {self.min_step_acceptance}); the weights may degenerate: check the target's scale, "
                "or give a smaller step_size", RuntimeWarning, stacklevel=4,
            )
        return step_sizes, lowest, torch.stack(metrics)

    # ----------------------------------------------------------------------------------------
    # the particle systems
    def _control_fn(self, net):
        """``fn(k, x, guide) -> u_k(x)`` (N, dim), clipped, for the states of one simulation (the time
        branch of a :class:`~pyro_sde.nn.ControlNetwork` evaluated once for the whole grid)."""
        if not hasattr(net, "time_features"):
            return lambda k, x, guide: _clip(net(self._taus[k], x, guide), self.control_clip)
        hidden, scale = net.time_features(self._taus)

        def fn(k, x, guide):
            return _clip(net.forward_with_time_features((hidden[k], scale[k]), x, guide), self.control_clip)

        return fn

    def _drift(self, beta, x, point):
        """``s_beta(x)`` clipped to ``[-score_clip, score_clip]`` (N, dim): the Langevin drift and guide."""
        return _clip(self._path.score(beta, x, point), self.score_clip)

    def _move(self, beta, x, point, scale, step_size: float, num_moves: int):
        """``num_moves`` moves of the particles leaving ``pi_beta`` invariant (proposals scaled by
        ``scale``), each adapting ``step_size`` to the batch's acceptance. Returns ``(x, point, step_size,
        mean acceptance rate, each particle's mean acceptance probability (N,))``."""
        path = self._path
        fn = path.log_density_and_score_fn(beta)
        state = KernelState(x, path.log_density(beta, point), path.score(beta, x, point), point)
        acceptance, particle_acceptance = [], 0.0
        for _ in range(num_moves):
            state, probs = self.kernel.step(fn, state, step_size, scale=scale)
            acceptance.append(float(probs.mean()))
            particle_acceptance = particle_acceptance + probs / num_moves
            step_size = adapt_step_size(step_size, acceptance[-1], self.kernel.target_acceptance)
        return state.position, state.extras, step_size, sum(acceptance) / len(acceptance), particle_acceptance

    @torch.no_grad()
    def _simulate(self, num_particles: int, net, *, interacting: bool = True, store: bool = False):
        """Run ``num_particles`` through the ``J`` pieces with the control ``net``.

        ``interacting``: reweight, resample and move at the boundaries (the particle system); else
        plain paths (importance sampling of whole paths). Returns ``(system, infos, trajectories,
        path_log_weights)``: the final :class:`ParticleSystem` (``interacting``), the boundaries'
        :class:`SCLDInfo`, the stored :class:`_Trajectories` (``store``) and ``sum_k log G_k`` (N,)
        of each path (float64; not interacting)."""
        path, step_sizes, betas = self._path, self.step_sizes, self.betas
        n = self.num_steps // self.num_subtrajectories
        x = path.sample_reference(num_particles)
        point = path.evaluate(x)
        check_initial_point(point, 0)
        system = ParticleSystem(
            particles=x,
            log_weights=initial_log_weights(num_particles, x.device),
            log_evidence=torch.zeros((), dtype=torch.float64, device=x.device),
            ancestors=torch.arange(num_particles, device=x.device),
            num_resampling_steps=0,
        )
        path_log_w = torch.zeros(num_particles, dtype=torch.float64, device=x.device)
        infos, stored = [], []
        control = self._control_fn(net)
        for j in range(self.num_subtrajectories):
            k0, metric = j * n, self.langevin_metric[j]
            guide = self._drift(betas[k0], x, point)
            u = control(k0, x, guide)
            states, guides, forward_means, increments = [x], [guide], [], []
            piece_log_g = torch.zeros_like(path_log_w)
            for k in range(k0, k0 + n):
                beta_next, h = betas[k + 1], step_sizes[k]
                forward_mean = x + h * metric * self._drift(beta_next, x, point)
                noise = torch.randn(x.shape, dtype=x.dtype, device=x.device)
                y = forward_mean + h * metric * u + (2 * h * metric).sqrt() * noise
                point_y = path.evaluate(y)
                guide_y = self._drift(beta_next, y, point_y)  # also the backward kernel's drift
                u_y = control(k + 1, y, guide_y)
                log_pi = path.log_density(beta_next, point_y).double()
                log_pi = log_pi - path.log_density(betas[k], point).double()
                piece_log_g += _langevin_log_increment(
                    log_pi, x, y, forward_mean, y + h * metric * guide_y, u, u_y, h, metric
                )
                if store:
                    states.append(y)
                    guides.append(guide_y)
                    forward_means.append(forward_mean)
                    increments.append(log_pi)
                x, point, u = y, point_y, u_y
            if store:
                stored.append((torch.stack(states), torch.stack(guides), torch.stack(forward_means),
                               torch.stack(increments)))
            if not interacting:
                path_log_w += piece_log_g
                continue
            beta = betas[k0 + n]
            try:
                log_w, increment = reweight(system.log_weights, piece_log_g)
            except FloatingPointError as e:
                raise FloatingPointError(f"at beta = {beta:.4g}: {e}") from e
            system = system._replace(
                particles=x, log_weights=log_w, log_evidence=system.log_evidence + increment
            )
            ess = float(diagnostics._log_ess(log_w).exp())
            resampled, acceptance, step_size = False, math.nan, math.nan
            if j < self.num_subtrajectories - 1:
                system, idx, ess = maybe_resample(system, self.ess_threshold, self.resampling)
                resampled = idx is not None
                x = system.particles
                if resampled:
                    point = PathPoint(*(t[idx] for t in point))
                if self.num_mcmc_steps:
                    scale = population_scale(x, system.log_weights, "diagonal")
                    x, point, self.mcmc_step_sizes[j], acceptance, _ = self._move(
                        beta, x, point, scale, self.mcmc_step_sizes[j], self.num_mcmc_steps
                    )
                    system = system._replace(particles=x)
                    step_size = self.mcmc_step_sizes[j]
            infos.append(SCLDInfo(beta, ess, resampled, acceptance, step_size, float(increment)))
        trajectories = _Trajectories(*(torch.stack(t) for t in zip(*stored))) if store else None
        return (system if interacting else None), infos, trajectories, (None if interacting else path_log_w)

    def _piece_log_weights(self, net, trajectories: _Trajectories) -> torch.Tensor:
        """``sum_k log G_k`` of each piece (J, N), float64, recomputed from the stored states with one
        batched call of ``net`` (differentiable in its parameters); NaN for a particle whose piece left
        the floats (a diverged Langevin path: zeroed before the call, so no NaN reaches the gradient)."""
        J, n1, N, d = trajectories.states.shape
        n = n1 - 1
        inputs = (trajectories.states, trajectories.guides, trajectories.forward_means)
        alive = torch.stack([torch.isfinite(t).all(-1).all(1) for t in inputs]).all(0)  # (J, N)
        mask = alive[:, None, :, None]
        x, guides, forward_means = (torch.where(mask, t, torch.zeros_like(t)) for t in inputs)
        steps = (torch.arange(J)[:, None] * n + torch.arange(n1)[None, :]).reshape(-1)
        tau = self._taus[steps].view(-1, 1, 1)
        u = _clip(net(tau, x.reshape(J * n1, N, d), guides.reshape(J * n1, N, d)), self.control_clip)
        u = u.view(J, n1, N, d)
        h = torch.tensor(self.step_sizes, dtype=x.dtype, device=x.device).view(J, n, 1, 1)
        metric = self.langevin_metric.view(J, 1, 1, d)
        backward_means = x[:, 1:] + h * metric * guides[:, 1:]
        log_g = _langevin_log_increment(
            trajectories.log_density_increments, x[:, :-1], x[:, 1:], forward_means, backward_means,
            u[:, :-1], u[:, 1:], h, metric,
        ).sum(1)
        return torch.where(alive, log_g, torch.full_like(log_g, math.nan))

    @torch.no_grad()
    def sample_particles(
        self, num_particles: int | None = None, *, num_runs: int | None = None
    ) -> SCLDSampler:
        """Draw ``num_runs`` independent particle systems of ``num_particles`` (default the constructor's;
        given values become the new defaults) with the sampling (EMA) control, resampling and moves;
        they replace ``final_states`` and are what the estimates use. Returns ``self``."""
        self._require_potential()
        if num_particles is not None:
            self.num_particles = positive_int(num_particles, "num_particles", minimum=2)
        if num_runs is not None:
            self.num_runs = positive_int(num_runs, "num_runs")
        net = self._sampling_networks()[0]
        num_nan = self._path.num_nan
        states, history, stuck = [], [], []
        for _ in range(self.num_runs):
            system, infos, _, _ = self._simulate(self.num_particles, net)
            states.append(system)
            history.append(infos)
            stuck.append(self._stuck_fraction(system))
        if self._path.num_nan > num_nan:
            warnings.warn(
                f"the log density was NaN at {self._path.num_nan - num_nan} points (taken as -inf: zero "
                "weight, rejected moves)", RuntimeWarning, stacklevel=2,
            )
        self._final_states, self.particle_history, self.stuck_fractions = states, history, stuck
        warn_if_stuck(max(stuck), "SCLD")
        self._warn_if_few_effective("SCLD", "train longer, or use more particles or num_runs")
        return self

    #: final particles, drawn by weight, that take :attr:`stuck_check_moves` diagnostic moves at beta = 1
    stuck_check_particles = 512
    #: diagnostic moves at ``beta = 1`` per particle system (0: no check)
    stuck_check_moves = 5

    @torch.no_grad()
    def _stuck_fraction(self, system: ParticleSystem) -> float:
        """The fraction (by weight) of the final particles that reject almost every move at ``beta = 1``
        (mean acceptance of :attr:`stuck_check_moves` moves below ``STUCK_ACCEPTANCE``), estimated on
        :attr:`stuck_check_particles` drawn by weight; the moves only measure (the system is unchanged).
        It is tempered SMC's diagnostic of a region its step size cannot explore: on Funnel-10 0.11-0.13
        (log Z 0.55-0.7 low), on GMM-9 and ManyWell-5 / -50 at most 0.003."""
        if self.stuck_check_moves == 0:
            return math.nan
        if self.stuck_check_step_size is None:  # start from the last boundary's adapted step
            self.stuck_check_step_size = (self.mcmc_step_sizes[-1] if self.mcmc_step_sizes
                                          else self.kernel.initial_step_size(self._target.dim))
        idx = torch.multinomial(system.log_weights.exp(), self.stuck_check_particles, replacement=True)
        x = system.particles[idx]
        scale = population_scale(system.particles, system.log_weights, "diagonal")
        point = self._path.evaluate(x)
        _, _, self.stuck_check_step_size, _, particle_acceptance = self._move(
            1.0, x, point, scale, self.stuck_check_step_size, self.stuck_check_moves
        )
        return stuck_fraction(particle_acceptance, point.log_target)

    @property
    def final_states(self) -> list[ParticleSystem]:
        """The particle systems behind the estimates (one per run); drawn by :meth:`sample_particles`
        on first use after training."""
        if self._final_states is None:
            self.sample_particles()
        return self._final_states

    @property
    def run_log_evidence(self) -> torch.Tensor:
        """``log Z_r`` of each run (R,), float64."""
        return torch.stack([s.log_evidence for s in self.final_states])

    # ----------------------------------------------------------------------------------------
    # training
    def compute_loss(self, batch_size: int = 256) -> tuple[torch.Tensor, float, float, int]:
        """``(loss, log_z_hat, mean_ess, num_dropped)`` on a fresh batch: the particle system of
        ``batch_size`` is run with the live control (no gradients); the loss ``mean_j Var_i(log G_j^i)
        / dim`` over the pieces' finite rows is recomputed differentiably from the stored states."""
        self._require_potential()
        positive_int(batch_size, "batch_size", minimum=2)
        system, infos, trajectories, _ = self._simulate(batch_size, self.control, store=True)
        log_g = self._piece_log_weights(self.control, trajectories)
        finite = torch.isfinite(log_g)
        if int(finite.sum(1).min()) < 2:
            raise FloatingPointError("fewer than 2 particles with a finite log weight in a sub-trajectory")
        variances = torch.stack([g[ok].var() for g, ok in zip(log_g, finite)])
        loss = variances.mean() / self._target.dim
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()}")
        mean_ess = sum(i.ess for i in infos) / len(infos)
        return loss, float(system.log_evidence), mean_ess, int((~finite).sum())

    def step(self, batch_size: int = 256) -> StepInfo:
        """One optimisation step on a fresh batch of ``batch_size`` particles. ``StepInfo.log_z_lower_bound``
        is the batch's ``log Z_hat`` (a lower bound in expectation), ``ess`` the mean over boundaries."""
        self._require_potential()
        self._final_states = None  # the control changes: the particle systems are redrawn
        self.control.train()
        loss, log_z, ess, dropped = self.compute_loss(batch_size)
        self._optimizer_step(loss)
        info = StepInfo(float(loss.detach()), log_z, ess, dropped)
        self.losses.append(info.loss)
        self.history.append(info)
        return info

    def path_log_weights(self, num_paths: int) -> torch.Tensor:
        """``sum_k log G_k`` (num_paths,) float64 of independent paths drawn with the sampling control
        without resampling or moves (exact importance weights, ``E[exp] = Z``)."""
        self._require_potential()
        positive_int(num_paths, "num_paths")
        return self._simulate(num_paths, self._sampling_networks()[0], interacting=False)[3]

    def _evaluate(self, num_paths: int):
        """``(ess, pareto_k)`` of whole-path importance weights (no resampling or moves)."""
        log_w = self.path_log_weights(num_paths)
        log_w = log_w[torch.isfinite(log_w)]
        if log_w.numel() < 2:
            return 0.0, math.inf
        ess = float(diagnostics.effective_sample_size(log_w)) * log_w.numel() / num_paths
        return ess, float(diagnostics.psis(log_w)[1])

    # ----------------------------------------------------------------------------------------
    # estimates (the weighted-sample surface is ParticleSampler's)
    def diagnostics(self) -> dict:
        """Evidence with both standard errors, ESS, Pareto k, resampling, acceptance, the largest stuck
        fraction at ``beta = 1`` over the runs (:meth:`_stuck_fraction`), the reference
        (``preconditioner``: its method, e.g. ``"svi+widened"``; ``pilot_temperatures``: 0 without a
        widening pilot) and cost."""
        evidence = self._evidence_diagnostics()
        acceptance = [
            i.acceptance_rate for h in self.particle_history for i in h if math.isfinite(i.acceptance_rate)
        ]
        return {
            **evidence,
            "num_particles": self.num_particles,
            "num_steps": self.num_steps,
            "num_subtrajectories": self.num_subtrajectories,
            **self._reference_diagnostics(),
            "mean_acceptance_rate": sum(acceptance) / len(acceptance) if acceptance else math.nan,
            "mcmc_step_sizes": list(self.mcmc_step_sizes),
            "stuck_fraction": max(self.stuck_fractions, default=math.nan),
            "num_iterations": len(self.losses),
            "num_target_evaluations": self.num_target_evaluations,
        }

    def __repr__(self):
        steps = self.step_sizes or [math.nan]
        return (
            f"SCLDSampler(num_steps={self.num_steps}, num_subtrajectories={self.num_subtrajectories}, "
            f"step_sizes in [{min(steps):.3g}, {max(steps):.3g}], metric={self.metric!r}, "
            f"kernel={self.kernel!r}, iterations={len(self.losses)})"
        )
