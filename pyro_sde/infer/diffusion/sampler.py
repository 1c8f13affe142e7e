"""``DiffusionSampler``: sample the posterior of a Pyro model with a learned controlled diffusion.

The sampler trains a control ``v`` of the chain ``x_{k+1} = a_k x_k + c_k v(t_k, x_k) + s_k xi_k`` (see
:mod:`pyro_sde.sde.reference`) so that the law of ``x_K`` approaches the (unconstrained) posterior.
Every draw comes with an exact importance weight ``w = dQ/dP^v`` of its whole path, so that
``E[w] = p(y)`` (the evidence) for any control: estimates are consistent even when training is not
finished, and the weights tell how far it is (ESS, Pareto k).
"""

from __future__ import annotations

import copy
import math
import os
import re
import time
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from pyro.infer.autoguide.initialization import init_to_uniform
from torch.distributions import constraints
from tqdm.auto import tqdm

from ... import diagnostics
from ..._checkpoint import check_fingerprint, load_checkpoint, package_version, save_checkpoint
from ..._checks import positive_float, positive_int
from ...nn import ControlNetwork
from ...nn.ema import ema_update_
from ...sde import (
    BrownianReference,
    OUReference,
    VPReference,
    euler_maruyama,
    path_log_prob,
    path_log_ratio,
    torchsde_euler,
)
from .._inputs import cast_output as _cast_output
from .._inputs import check_dtype_device as _check_dtype_device
from .._inputs import check_target
from .._inputs import same_call as _same_call
from ..potential import LogDensityPotential, ModelPotential, Potential
from ..precondition import Preconditioner, as_preconditioner, whiten
from .losses import get_loss

__all__ = ["DiffusionSampler", "StepInfo"]

_METHODS = ("pis", "dis", "dds", "bridge")
#: coarsest acceptable spacing of representable log density values (``|log rho| * eps``)
_MAX_LOG_DENSITY_RESOLUTION = 1e-2
_BACKENDS = ("euler", "torchsde")


class StepInfo(NamedTuple):
    """What one training step saw on its batch."""

    loss: float  #: the loss value (scaled by 1 / dim)
    log_z_lower_bound: float  #: batch mean of ``log w`` (an ELBO-type bound on ``log Z``)
    ess: float  #: normalised ESS of the batch's weights (under the behaviour control)
    num_dropped: int  #: paths dropped from the loss for a non-finite log weight


def _clip(x: torch.Tensor, bound: float) -> torch.Tensor:
    """Replace NaN by 0 and clamp to ``[-bound, bound]``."""
    return torch.nan_to_num(x, nan=0.0, posinf=bound, neginf=-bound).clamp(-bound, bound)


def _resolution(log_rho: torch.Tensor) -> float:
    """Spacing of representable values at the largest finite ``|log rho|`` (``|x| eps``), 0 if none."""
    finite = log_rho[torch.isfinite(log_rho)]
    if finite.numel() == 0:
        return 0.0
    return float(finite.abs().max()) * torch.finfo(log_rho.dtype).eps


class DiffusionSampler:
    r"""Learned diffusion sampler (PIS / DIS / DDS / two-control bridge) for a Pyro model or an
    unnormalised log density.

    Example::

        sampler = DiffusionSampler(model, method="dis", loss="log_variance", num_steps=100)
        sampler.run(data, num_iterations=2000, batch_size=512)
        samples = sampler.get_samples(4000)            # dict site -> (4000, *shape), like MCMC
        log_z, stderr, lower_bound, ess = sampler.log_evidence(10_000)
        Predictive(model, posterior_samples=samples)(data)

    :param callable model: a Pyro model whose latent sites are continuous; its arguments are given
        to :meth:`run`. Exactly one of ``model`` and ``log_density`` must be given.
    :param callable log_density: instead of a model, a batched unnormalised log density
        ``(N, dim) -> (N,)`` on ``R^dim`` (samples are returned under the site name ``"x"``).
    :param int dim: dimension, with ``log_density``.
    :param callable score: optional closed-form ``grad log_density`` ``(N, dim) -> (N, dim)``, with
        ``log_density`` (saves the autograd pass of the guide; checked against autograd at set-up).
    :param str method: ``"pis"`` (Brownian reference from the origin, Path Integral Sampler),
        ``"dis"`` (VP/Ornstein-Uhlenbeck reference from ``N(0, I)``, time-reversal, Diffusion-based
        sampler), ``"dds"`` (stationary OU reference from ``N(0, sigma^2 I)`` with exponential-
        integrator steps, Denoising Diffusion Sampler) or ``"bridge"`` (DIS with a second, learned
        backward control: the general two-control bridge).
    :param str loss: ``"log_variance"`` (default for pis/dis/dds; no differentiation through the
        solver), ``"kl"`` (reverse KL, reparametrised through the solver, second derivatives of the
        target) or ``"rkl_ld"`` (reverse KL with the log-derivative gradient; default for the bridge,
        where it is the sound choice: see :mod:`pyro_sde.infer.diffusion.losses`).
    :param int num_steps: Euler-Maruyama steps ``K`` (50: enough once the target is whitened; the
        synthetic multimodal benchmarks use 50-100).
    :param float T: time horizon (PIS 5, DIS/DDS/bridge 1).
    :param float sigma: PIS diffusion coefficient (``sqrt(0.2)``, so ``Var X_T = 1``); DDS prior
        standard deviation (1).
    :param float beta_min, beta_max: DIS / DDS / bridge noise schedule (0.1, 10).
    :param torch.nn.Module control: a custom control ``control(tau, x, guide) -> v`` with ``tau = t / T``;
        default :class:`~pyro_sde.nn.ControlNetwork`.
    :param int hidden_dim, num_layers: size of the default network (64, 3).
    :param float lr: Adam learning rate (5e-3).
    :param float final_lr_fraction: the learning rate decays geometrically over each :meth:`run`
        from ``lr`` to ``lr * final_lr_fraction`` (0.1; 1 disables the schedule).
    :param float grad_clip: gradient-norm clip (1.0; ``None`` to disable).
    :param float score_clip: the target score fed to the control is clamped to ``[-score_clip,
        score_clip]`` (100): it bounds the drift of explicit Euler steps on stiff targets.
    :param float control_clip: the control is clamped likewise (100).
    :param float exploration_noise: the reference control of the log-variance loss: paths are drawn
        with the noise multiplied by this factor (1.0 = the current control, exploitation; > 1 explores
        more, which helps against mode collapse). Only the log-variance loss allows it.
    :param float ema_decay: decay of the exponential moving average of the network weights used for
        sampling (0.999, with the warm-up ``min(decay, (1 + n) / (10 + n))``; ``None`` disables).
    :param torch.nn.Module backward_control: a custom backward control for the bridge,
        ``backward_control(tau, x, None) -> u`` (default: a zero-initialised :class:`ControlNetwork`).
    :param str backend: ``"euler"`` (our batched loop) or ``"torchsde"`` (``torchsde.sdeint``).
    :param precondition: run every method in whitened coordinates ``w = L^{-1} (z - m)`` of a Gaussian
        ``N(m, L L^T)`` fitted to the unconstrained posterior before training (an exact affine change of
        variables: samples, weights and ``log Z`` are unchanged in law): ``"laplace"`` (default; MAP from
        several starts + Hessian, a moment-matched mixture when several modes are found, a Gaussian VI
        fit when the Hessian is not negative definite), ``"svi"``, ``"diagonal"``, ``None`` (no
        preconditioning), a ``(loc, scale_tril)`` pair or a :class:`~pyro_sde.infer.Preconditioner`.
        A fit that is a worse importance proposal than ``N(0, I)`` is not used. See
        :func:`~pyro_sde.infer.fit_preconditioner`; the result is ``sampler.preconditioner``.
    :param dict precondition_options: keyword arguments of :func:`~pyro_sde.infer.fit_preconditioner`.
    :param init_strategy: Pyro init strategy (the first start of the preconditioner's MAP search).
    :param vectorize: how a model is evaluated on a batch of particles (see
        :class:`~pyro_sde.infer.potential.ModelPotential`): ``"auto"`` (default: one call under a particle
        plate; where that fails, ``torch.func.vmap`` over one particle; where that fails too, a sequential
        loop with a warning that states the slowdown), or ``"plate"``, ``"vmap"``, ``"sequential"``.
    :param dtype, device: with ``log_density`` only (a model's tensors decide otherwise).
    """

    def __init__(
        self,
        model: Callable | None = None,
        *,
        log_density: Callable | None = None,
        dim: int | None = None,
        score: Callable | None = None,
        method: str = "dis",
        loss: str | None = None,
        num_steps: int = 50,
        T: float | None = None,
        sigma: float | None = None,
        beta_min: float = 0.1,
        beta_max: float = 10.0,
        control: torch.nn.Module | None = None,
        hidden_dim: int = 64,
        num_layers: int = 3,
        lr: float = 5e-3,
        grad_clip: float | None = 1.0,
        final_lr_fraction: float = 0.1,
        score_clip: float = 100.0,
        control_clip: float = 100.0,
        exploration_noise: float = 1.0,
        ema_decay: float | None = 0.999,
        backward_control: torch.nn.Module | None = None,
        backend: str = "euler",
        precondition="laplace",
        precondition_options: dict | None = None,
        init_strategy=init_to_uniform,
        vectorize: str | bool = "auto",
        dtype: torch.dtype | None = None,
        device=None,
    ):
        check_target(model, log_density, score)
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        for name, net in [("control", control), ("backward_control", backward_control)]:
            if net is not None and not isinstance(net, torch.nn.Module):
                raise TypeError(f"{name} must be a torch.nn.Module")
        if backward_control is not None and method != "bridge":
            raise ValueError("backward_control is only used by method='bridge'")
        device = _check_dtype_device(model, dtype, device)
        self._config = dict(
            method=method, loss=loss, num_steps=num_steps, T=T, sigma=sigma, beta_min=beta_min,
            beta_max=beta_max, hidden_dim=hidden_dim, num_layers=num_layers, lr=lr, grad_clip=grad_clip,
            final_lr_fraction=final_lr_fraction, score_clip=score_clip, control_clip=control_clip,
            exploration_noise=exploration_noise, ema_decay=ema_decay, backend=backend, vectorize=vectorize,
            dim=dim, dtype=dtype,
        )
        self.model = model
        self.method = method
        self.preconditioner: Preconditioner | None = as_preconditioner(precondition)
        self._precondition = precondition if isinstance(precondition, str) else None
        if precondition_options is not None and not isinstance(precondition_options, dict):
            raise TypeError("precondition_options must be a dict of fit_preconditioner options")
        self._precondition_options = dict(precondition_options or {})
        if loss is None:
            loss = "rkl_ld" if method == "bridge" else "log_variance"
        self.loss_spec = get_loss(loss)
        self.num_steps = positive_int(num_steps, "num_steps")
        T = (5.0 if method == "pis" else 1.0) if T is None else T
        if sigma is not None:
            positive_float(sigma, "sigma")
            if method not in ("pis", "dds"):
                raise ValueError(f"sigma is used by method='pis' and 'dds' only, not by {method!r}")
        if method == "pis":
            sigma = math.sqrt(0.2) if sigma is None else sigma
            self.reference = BrownianReference(num_steps, sigma=sigma, T=T)
        elif method == "dds":
            sigma = 1.0 if sigma is None else sigma
            self.reference = OUReference(num_steps, sigma=sigma, beta_min=beta_min, beta_max=beta_max, T=T)
        else:
            self.reference = VPReference(num_steps, beta_min=beta_min, beta_max=beta_max, T=T)
        self.lr = positive_float(lr, "lr")
        self.final_lr_fraction = positive_float(final_lr_fraction, "final_lr_fraction")
        if self.final_lr_fraction > 1:
            raise ValueError("final_lr_fraction must be in (0, 1]")
        self.grad_clip = None if grad_clip is None else positive_float(grad_clip, "grad_clip")
        self.score_clip = positive_float(score_clip, "score_clip")
        self.control_clip = positive_float(control_clip, "control_clip")
        self.exploration_noise = positive_float(exploration_noise, "exploration_noise")
        if self.exploration_noise != 1.0 and not self.loss_spec.off_policy:
            raise ValueError(
                f"loss={self.loss_spec.name!r} needs on-policy paths: exploration_noise must be 1 "
                "(an exploration control is a feature of the log-variance loss)"
            )
        if method == "bridge" and self.loss_spec.name == "log_variance":
            warnings.warn(
                "with two learned controls the log-variance gradient is not the gradient of a divergence "
                "that respects the data-processing inequality; loss='rkl_ld' (the default) or 'kl' is sound",
                UserWarning,
                stacklevel=2,
            )
        if ema_decay is not None and not (isinstance(ema_decay, float) and 0 <= ema_decay < 1):
            raise ValueError(f"ema_decay must be a float in [0, 1) or None, got {ema_decay!r}")
        self.ema_decay = ema_decay
        self.backend = backend
        self.init_strategy, self.vectorize = init_strategy, vectorize
        self._network_options = dict(
            hidden_dim=positive_int(hidden_dim, "hidden_dim"),
            num_layers=positive_int(num_layers, "num_layers"),
            guide_scale_init=0.01 if method == "pis" else 1.0,
        )
        self.control = control
        self.backward_control = backward_control
        self.optimizer = None
        self._ema_nets: list[torch.nn.Module] | None = None
        self._ema_updates = 0
        self._run_state: dict | None = None  # progress of the current run (for checkpoints / resume)
        self._pending_state: dict | None = None  # state loaded from a checkpoint, applied at set-up
        self._resume_rng = None
        self._checkpoint_path: str | None = None  # the file resume() checkpoints to by default
        self._saved_fingerprint: dict | None = None  # of the loaded checkpoint, checked at set-up
        self.potential: Potential | None = None  # the model's unconstrained log density
        self._target: Potential | None = None  # what the SDE samples: the potential in whitened coordinates
        self._model_call = None
        if log_density is not None:
            if dim is None:
                raise ValueError("`dim` is required with `log_density`")
            if dtype is not None:  # honour the requested dtype even if log_density computes in another
                log_density = _cast_output(log_density, dtype)
                score = None if score is None else _cast_output(score, dtype)
            self.potential = LogDensityPotential(log_density, dim, dtype=dtype, device=device, score=score)
            self._setup_training()
        self.losses: list[float] = []
        self.history: list[StepInfo] = []
        self._weighted = None  # cache: (z, log_weights) of the last evaluation draw
        self.eval_history: list[tuple[int, float, float]] = []  # (iteration, ESS, Pareto k) of run checks

    # ----------------------------------------------------------------------------------------
    # set-up
    def _setup_potential(self, args, kwargs):
        call = (args, kwargs)
        if self.model is None:
            if args or kwargs:
                raise TypeError("a sampler built from `log_density` takes no model arguments")
            return
        if self._model_call is not None and _same_call(self._model_call, call):
            return
        potential = ModelPotential(
            self.model, args, kwargs, init_strategy=self.init_strategy, vectorize=self.vectorize
        )
        if self.potential is not None and potential.dim != self.potential.dim:
            raise ValueError(
                f"the model's latent dimension changed from {self.potential.dim} to {potential.dim}"
            )
        self.potential, self._model_call = potential, call
        self._weighted = None
        self._setup_training()

    def _setup_target(self):
        """Fit the preconditioner once (kept when the model's data change) and whiten the potential."""
        self.preconditioner, self._target = whiten(
            self.potential, self.preconditioner, self._precondition, self._precondition_options
        )

    def _setup_training(self):
        if self._pending_state is not None and self._saved_fingerprint is not None:  # before its Gaussian
            check_fingerprint(self._saved_fingerprint, self._fingerprint(), source=self._checkpoint_path)
        self._setup_target()
        p = self._target
        if self.control is None:
            self.control = ControlNetwork(p.dim, **self._network_options)
        self.control.to(dtype=p.dtype, device=p.device)
        if self.method == "bridge":
            if self.backward_control is None:
                options = dict(self._network_options, guide_scale_init=0.0)
                self.backward_control = ControlNetwork(p.dim, **options)
            self.backward_control.to(dtype=p.dtype, device=p.device)
        if self.optimizer is None:
            self.optimizer = torch.optim.Adam(self._parameters(), lr=self.lr)
        if self.ema_decay is not None and self._ema_nets is None:
            self._ema_nets = [copy.deepcopy(net).requires_grad_(False) for net in self._nets()]
        if self._pending_state is not None:
            self._load_state(self._pending_state)
            self._pending_state = None

    def _nets(self) -> list[torch.nn.Module]:
        return [self.control] + ([self.backward_control] if self.method == "bridge" else [])

    def _parameters(self):
        return [q for net in self._nets() for q in net.parameters()]

    def _sampling_nets(self):
        """``(control, backward_control)`` used to draw samples: the EMA copies when enabled."""
        nets = self._ema_nets if self._ema_nets is not None else self._nets()
        return nets[0], (nets[1] if self.method == "bridge" else None)

    @torch.no_grad()
    def _update_ema(self):
        if self._ema_nets is None:
            return
        self._ema_updates += 1
        ema = [q for net in self._ema_nets for q in net.parameters()]
        live = [q for net in self._nets() for q in net.parameters()]
        ema_update_(ema, live, self.ema_decay, self._ema_updates)

    def _require_potential(self):
        if self.potential is None:
            raise RuntimeError("call .run(*model_args) first: the sampler has not seen the model's data")

    # ----------------------------------------------------------------------------------------
    # the control along a path
    def _guide(self, tau, z, create_graph):
        """The input the control multiplies: clipped target score (PIS) or lerp(prior, target) (DIS)."""
        score = self._target.score(z, create_graph=create_graph)
        score = _clip(score, self.score_clip)
        if self.method in ("dis", "bridge"):  # lerp of prior and target scores
            score = (1 - tau) * self.reference.initial_score(z) + tau * score
        elif self.method == "dds":  # grows from 0 to grad log (rho / p_ref), the terminal optimal control
            score = tau * (score - self.reference.initial_score(z))
        return score

    def _control_value(self, tau, z, guide):
        return _clip(self.control(tau, z, guide), self.control_clip)

    def _control_fn(self, net, differentiable, guides=None):
        """``control_fn(k, t, z)`` of ``net`` for the integrator; records step k's guide in ``guides``."""
        T, p = self.reference.T, self._target
        forward = None
        if hasattr(net, "time_features"):  # evaluate the time branch once for the whole grid
            tau = self.reference.coefficients(p.dtype, p.device).times[:-1] / T
            with torch.set_grad_enabled(differentiable):
                hidden, scale = net.time_features(tau)

            def forward(k, tau_k, z, guide):
                return net.forward_with_time_features((hidden[k], scale[k]), z, guide)

        def control_fn(k, t, z):
            tau = t / T
            guide = self._guide(tau, z, create_graph=differentiable)
            if guides is not None:
                guides[k] = guide.detach()
            v = forward(k, tau, z, guide) if forward is not None else net(tau, z, guide)
            return _clip(v, self.control_clip)

        return control_fn

    def _backward_controls(self, net, states):
        """``u(t_{k+1}, x_{k+1})`` for stored states (K+1, N, d) -> (K, N, d), one batched call."""
        coef = self.reference.coefficients(states.dtype, states.device)
        tau = (coef.times[1:] / self.reference.T).view(-1, 1, 1)
        return _clip(net(tau, states[1:], None), self.control_clip)

    def _path_log_ratio(self, path, backward_net):
        """The path part of ``log w``; for the bridge it needs the backward control on stored paths."""
        if self.method != "bridge":
            return path.log_ratio
        u = self._backward_controls(backward_net, path.states)
        return path_log_ratio(self.reference, path.states, path.controls, u)

    def _simulate(self, x0, **kw):
        sim = torchsde_euler if self.backend == "torchsde" else euler_maruyama
        if self.backend == "torchsde":
            kw.pop("store_path", None)
        return sim(self.reference, kw.pop("control_fn"), x0, **kw)

    def _initial(self, n):
        p = self._target
        return self.reference.sample_initial(n, p.dim, dtype=p.dtype, device=p.device)

    def _boundary(self, path, log_rho=None):
        """``log rho(x_K)`` + the reference's boundary term, accumulated in float64 (N,)."""
        log_rho = self._target.log_density(path.terminal) if log_rho is None else log_rho
        boundary = self.reference.boundary_log_weight(path.initial, path.terminal)
        return log_rho.to(torch.float64) + boundary.to(torch.float64)

    def _training_log_weights(self, batch_size):
        """``(log_w, behaviour_log_w, log_forward)`` on a fresh batch; ``log_w`` is differentiable."""
        x0 = self._initial(batch_size)
        bridge = self.method == "bridge"
        if self.loss_spec.reparametrized:
            path = self._simulate(
                x0, control_fn=self._control_fn(self.control, True), differentiable=True, store_path=bridge
            )
            return self._boundary(path) + self._path_log_ratio(path, self.backward_control), None, None
        guides = {}
        with torch.no_grad():
            path = self._simulate(
                x0,
                control_fn=self._control_fn(self.control, False, guides),
                noise_scale=self.exploration_noise,
                store_path=True,
            )
            boundary = self._boundary(path)
            behaviour = boundary + self._path_log_ratio(path, self.backward_control)
        K = self.num_steps
        coef = self.reference.coefficients(x0.dtype, x0.device)
        tau = (coef.times[:-1] / self.reference.T).view(K, 1, 1)
        guide = torch.stack([guides[k] for k in range(K)])
        controls = self._control_value(tau, path.states[:-1], guide)
        u = self._backward_controls(self.backward_control, path.states) if bridge else None
        log_w = boundary + path_log_ratio(self.reference, path.states, controls, u)
        log_forward = None
        if self.loss_spec.needs_forward_log_prob:
            log_forward = path_log_prob(self.reference, path.states, controls)
        return log_w, behaviour, log_forward

    # ----------------------------------------------------------------------------------------
    # training
    def setup(self, *args, **kwargs) -> DiffusionSampler:
        """Bind the model's arguments (build the potential, network and optimiser) without training."""
        self._setup_potential(args, kwargs)
        return self

    def compute_loss(self, batch_size: int = 512):
        """The differentiable training loss on a fresh batch: ``(loss, log_w_batch)``, where the loss is
        ``KL`` or ``log-variance`` of the batch's log weights divided by ``dim`` and ``log_w_batch``
        (detached) are the weights of the simulated paths under their own control."""
        self._require_potential()
        log_w, behaviour_log_w, log_forward = self._training_log_weights(batch_size)
        finite = torch.isfinite(log_w)
        if int(finite.sum()) < 2:
            raise FloatingPointError("fewer than 2 paths with a finite log weight in the batch")
        log_forward = None if log_forward is None else log_forward[finite]
        loss = self.loss_spec.fn(log_w[finite], log_forward) / self._target.dim
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()}")
        return loss, (log_w if behaviour_log_w is None else behaviour_log_w).detach()[finite]


    def step(self, batch_size: int = 512) -> StepInfo:
        """One optimisation step on a fresh batch of ``batch_size`` paths."""
        self._require_potential()
        for net in self._nets():
            net.train()
        loss, ref_log_w = self.compute_loss(batch_size)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        max_norm = math.inf if self.grad_clip is None else self.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self._parameters(), max_norm)
        if not torch.isfinite(grad_norm):  # skip the update: NaN gradients would poison the weights
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"non-finite gradient norm {float(grad_norm)}")
        self.optimizer.step()
        self._update_ema()
        info = StepInfo(
            float(loss.detach()),
            float(ref_log_w.mean()),
            float(diagnostics.effective_sample_size(ref_log_w)),
            batch_size - ref_log_w.numel(),
        )
        self.losses.append(info.loss)
        self.history.append(info)
        return info

    def run(
        self,
        *args,
        num_iterations: int | None = None,
        batch_size: int | None = None,
        max_time: float | None = None,
        until: str | float | None = "converged",
        eval_every: int = 25,
        eval_batch_size: int = 1024,
        progress_bar: bool = True,
        max_failed_steps: int = 20,
        checkpoint: str | None = None,
        checkpoint_every: int = 100,
        **kwargs,
    ) -> DiffusionSampler:
        """Train the control; ``args``/``kwargs`` go to the model. Returns ``self``.

        Training stops at the first of: ``num_iterations`` steps (default ``default_num_iterations``,
        3000), ``max_time`` seconds of training, or the ``until`` rule, checked after 5 and 10 steps and
        then every ``eval_every`` steps on a fresh batch of ``eval_batch_size`` paths drawn with the
        sampling (EMA) control:

        * ``"converged"`` (default): the importance ESS is at least ``converged_ess`` (0.9) with a
          Pareto k below 0.5, or it has not improved by 5 % over the last ``patience`` (4) checks;
        * a float in ``(0, 1]``: the ESS reaches it with a Pareto k below 0.7;
        * ``None``: no early stop.

        The checks are in ``sampler.eval_history`` (iteration, ESS, k) and on the progress bar.
        ``batch_size`` defaults to 256 for ``dim <= 20`` and 512 above. The learning rate decays
        geometrically from ``lr`` to ``lr * final_lr_fraction`` over ``num_iterations``. Calling ``run``
        again starts a new run (new schedule) from the current weights. Steps whose batch gives a
        non-finite loss are skipped; ``max_failed_steps`` consecutive ones raise ``FloatingPointError``.
        With ``checkpoint`` (a file path) the state is saved every ``checkpoint_every`` iterations and
        at the end: see :meth:`save`, :meth:`load`, :meth:`resume`.
        """
        num_iterations = self.default_num_iterations if num_iterations is None else num_iterations
        positive_int(num_iterations, "num_iterations")
        if batch_size is not None:
            positive_int(batch_size, "batch_size", minimum=2)
        positive_int(max_failed_steps, "max_failed_steps")
        positive_int(eval_every, "eval_every")
        positive_int(eval_batch_size, "eval_batch_size", minimum=2)
        if max_time is not None:
            max_time = positive_float(max_time, "max_time")  # finite
        _check_until(until)
        self._setup_potential(args, kwargs)
        if batch_size is None:
            batch_size = 256 if self._target.dim <= 20 else 512
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self._run_state = dict(
            total=num_iterations,
            done=0,
            batch_size=batch_size,
            gamma=self.final_lr_fraction ** (1.0 / max(num_iterations - 1, 1)),
            max_failed_steps=max_failed_steps,
            max_time=max_time,
            elapsed=0.0,
            until=until,
            eval_every=eval_every,
            eval_batch_size=eval_batch_size,
            stopped=None,
            eval_history=[],
            failed=0,
        )
        return self._train(progress_bar, checkpoint, checkpoint_every)

    default_num_iterations = 3000
    converged_ess = 0.9
    patience = 4

    @torch.no_grad()
    def _evaluate(self, num_paths: int):
        """``(ess, pareto_k)`` of a fresh batch drawn with the sampling control (non-finite paths dropped)."""
        _, log_w = self.sample_unconstrained(num_paths)
        log_w = log_w[torch.isfinite(log_w)].double()
        if log_w.numel() < 2:
            return 0.0, math.inf
        ess = float(diagnostics.effective_sample_size(log_w)) * log_w.numel() / num_paths
        return ess, float(diagnostics.psis(log_w)[1])

    def _should_stop(self, state) -> str | None:
        """The reason to stop after the latest check, or ``None``."""
        until, history = state["until"], self.eval_history
        if until is None or not history:
            return None
        _, ess, k = history[-1]
        if until == "converged":
            if ess >= self.converged_ess and k < 0.5:
                return f"converged (ESS {ess:.3f} >= {self.converged_ess}, k {k:.2f})"
            if len(history) > self.patience:
                recent = max(e for _, e, _ in history[-self.patience :])
                before = max(e for _, e, _ in history[: -self.patience])
                if recent <= 1.05 * before:
                    return f"converged (ESS {recent:.3f} stopped improving over {self.patience} checks)"
            return None
        if ess >= until and k < 0.7:
            return f"reached ESS {ess:.3f} >= {until}"
        return None

    def resume(
        self, *args, progress_bar: bool = True, checkpoint="same", checkpoint_every: int | None = None,
        **kwargs,
    ) -> DiffusionSampler:
        """Finish the run that a checkpoint was saved in (after :meth:`load`), with the model's
        arguments. The random state saved in the checkpoint is restored first, so that the result is
        the same as that of the uninterrupted run with the same seed.

        :param checkpoint: ``"same"`` (default): keep checkpointing to the file the sampler was loaded
            from (or, without :meth:`load`, the file the interrupted run wrote), so that a second
            interruption loses no work; a path: checkpoint there instead; ``None`` or ``False``: no
            checkpoints.
        :param int checkpoint_every: iterations between checkpoints (default: the run's own interval).
        """
        if self._run_state is None:
            raise RuntimeError("nothing to resume: no run was started or loaded (or saved before a run)")
        if isinstance(checkpoint, str) and checkpoint == "same":
            checkpoint = self._checkpoint_path
        elif checkpoint is False:
            checkpoint = None
        if checkpoint_every is None:
            checkpoint_every = self._run_state.get("checkpoint_every", 100)
        self._setup_potential(args, kwargs)
        if self._resume_rng is not None:
            _set_rng_state(self._resume_rng)
            self._resume_rng = None
        if self._run_state["done"] >= self._run_state["total"] or self._run_state.get("stopped"):
            warnings.warn("the saved run had finished; nothing to resume", UserWarning, stacklevel=2)
            return self
        return self._train(progress_bar, checkpoint, checkpoint_every)

    @property
    def num_failed_steps(self) -> int:
        """Training steps of the current (or last) run that failed (non-finite loss or gradient).

        Failed steps are skipped and shown in the progress bar; a run that had any ends with a
        ``RuntimeWarning``, and one in which more than half of the steps failed raises
        ``FloatingPointError`` as soon as that is certain."""
        return 0 if self._run_state is None else self._run_state.get("failed", 0)

    def _train(self, progress_bar, checkpoint, checkpoint_every):
        state = self._run_state
        self.eval_history = state["eval_history"]
        clock = time.perf_counter()
        if checkpoint is not None:
            positive_int(checkpoint_every, "checkpoint_every")
            checkpoint = os.fspath(checkpoint)
            state["checkpoint_every"] = checkpoint_every
        self._checkpoint_path = checkpoint  # where resume(checkpoint="same") continues
        self._weighted = None
        scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, state["gamma"])
        failed, last_error = 0, None
        bar = tqdm(
            range(state["done"], state["total"]),
            initial=state["done"],
            total=state["total"],
            disable=not progress_bar,
            desc=f"{self.method}-{self.loss_spec.name}",
        )
        for i in bar:
            try:
                info = self.step(state["batch_size"])
                failed = 0
            except FloatingPointError as e:
                failed += 1
                state["failed"] += 1
                last_error = e
                if failed >= state["max_failed_steps"]:
                    raise FloatingPointError(
                        f"{failed} consecutive training steps failed ({e}); lower lr, score_clip, or "
                        "check the model's log density"
                    ) from e
                if state["failed"] > state["total"] / 2:
                    raise FloatingPointError(
                        f"{state['failed']} of the run's {state['total']} training steps failed (last: {e}): "
                        "most of the run is lost; check the model's log density (NaN?) or lower lr"
                    ) from e
                info = None
            with warnings.catch_warnings():  # after a skipped step torch warns that step() came first
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                scheduler.step()
            state["done"] = i + 1
            if state["until"] is not None and _is_check(state["done"], state["eval_every"]):
                ess, k = self._evaluate(state["eval_batch_size"])
                self.eval_history.append((state["done"], ess, k))
                state["stopped"] = self._should_stop(state)
            now = time.perf_counter()
            state["elapsed"], clock = state["elapsed"] + now - clock, now
            out_of_time = state["max_time"] is not None and state["elapsed"] >= state["max_time"]
            if state["stopped"] is None and out_of_time:
                state["stopped"] = f"max_time ({state['max_time']:g} s)"
            last = state["stopped"] is not None or i + 1 == state["total"]
            if checkpoint is not None and (state["done"] % checkpoint_every == 0 or last):
                self.save(checkpoint)
            if info is not None and (i % 10 == 0 or last):
                postfix = dict(
                    loss=f"{info.loss:.3g}", elbo=f"{info.log_z_lower_bound:.3g}", failed=state["failed"]
                )
                if self.eval_history:
                    postfix.update(ess=f"{self.eval_history[-1][1]:.3f}", k=f"{self.eval_history[-1][2]:.2f}")
                else:
                    postfix.update(batch_ess=f"{info.ess:.2f}")
                bar.set_postfix(postfix)
            if state["stopped"] is not None:
                break
        bar.close()
        for net in self._nets():
            net.eval()
        if state["failed"]:
            warnings.warn(
                f"{state['failed']} of the run's {state['total']} training steps failed and were skipped "
                f"(last: {last_error}); see num_failed_steps",
                RuntimeWarning,
                stacklevel=3,
            )
        if self.eval_history and self.eval_history[-1][1] < self.min_reliable_ess:
            done, ess, k = self.eval_history[-1]
            warnings.warn(
                f"training ended ({state['stopped'] or 'iteration budget'}) with an importance ESS of "
                f"{ess:.3f} (Pareto k {k:.2f}) on a fresh batch: estimates rest on few effective draws and "
                "may miss mass the proposal does not reach, even where k < 0.7. Train longer "
                "(num_iterations, until=None), use more steps, or compare with another sampler",
                diagnostics.UnreliableEstimateWarning,
                stacklevel=3,
            )
        return self

    min_reliable_ess = 0.1  #: a run whose last check is below this ESS ends with a warning

    # ----------------------------------------------------------------------------------------
    # checkpoints
    def save(self, path) -> None:
        """Write the sampler's state (configuration, weights, EMA, optimiser, run progress, losses and
        the random state) to ``path``, atomically, with a checksum and the fingerprint of the model
        (latent sites with shapes and supports, dim, method, package version) that :meth:`load`
        checks. The model and its data are not saved. Only tensors and plain values are written."""
        if self.optimizer is None:
            raise RuntimeError("nothing to save before set-up: call .setup(*model_args) or .run first")
        state = dict(
            config=self._config,
            nets=[net.state_dict() for net in self._nets()],
            ema_nets=None if self._ema_nets is None else [net.state_dict() for net in self._ema_nets],
            ema_updates=self._ema_updates,
            optimizer=self.optimizer.state_dict(),
            run_state=None if self._run_state is None else dict(self._run_state),
            losses=list(self.losses),
            history=[tuple(h) for h in self.history],
            rng=_get_rng_state(),
            preconditioner=None if self.preconditioner is None else self.preconditioner.state_dict(),
        )
        save_checkpoint(path, state, kind="DiffusionSampler", fingerprint=self._fingerprint())

    def _fingerprint(self) -> dict:
        """What a checkpoint belongs to: ``{"latent sites": {name: (shape, support)}, "dim", "method",
        "package version"}``."""
        p = self.potential
        supports = getattr(p, "site_supports", {})  # a plain log density: real
        return {
            "latent sites": {
                n: (tuple(shape), _support_name(supports[n]) if n in supports else "real")
                for n, shape in p.site_shapes.items()
            },
            "dim": p.dim,
            "method": self.method,
            "package version": package_version(),
        }

    @classmethod
    def load(
        cls,
        path,
        model: Callable | None = None,
        *,
        log_density: Callable | None = None,
        control: torch.nn.Module | None = None,
        backward_control: torch.nn.Module | None = None,
        map_location=None,
        **overrides,
    ) -> DiffusionSampler:
        """Rebuild a sampler saved with :meth:`save`: give the same ``model`` (then call
        :meth:`resume` or :meth:`setup` with its arguments) or ``log_density``, and the custom
        networks if the saved sampler had them. ``overrides`` replace saved options that do not change
        the networks (e.g. ``backend``, ``init_strategy``).

        The file is read with ``torch.load(weights_only=True)`` (no pickled code runs) and refused
        with a ``ValueError`` when it is not a DiffusionSampler checkpoint, is damaged (checksum) or
        belongs to another model (checked when the model is bound: here for ``log_density``, at
        :meth:`setup` / :meth:`resume` for a model). :meth:`resume` keeps checkpointing to ``path``."""
        ckpt = load_checkpoint(path, kind="DiffusionSampler", map_location=map_location)
        state = ckpt.payload
        config = dict(state["config"])
        if log_density is None:
            config.pop("dim", None)
            config.pop("dtype", None)
        saved = state.get("preconditioner")
        preconditioner = None if saved is None else Preconditioner.from_state_dict(saved)
        # a model's potential is built at set-up, after the fingerprint check; a log density's now
        config["precondition"] = preconditioner if log_density is None else None
        config.update(overrides)
        sampler = cls(
            model, log_density=log_density, control=control, backward_control=backward_control, **config
        )
        sampler._checkpoint_path = os.fspath(path)
        sampler._saved_fingerprint = ckpt.fingerprint
        sampler._pending_state = state
        if sampler.optimizer is not None:  # a log density: the networks exist already
            sampler._load_state(state)
            sampler._pending_state = None
            sampler.preconditioner = preconditioner
            sampler._setup_target()
        sampler._run_state = state["run_state"]
        sampler.losses = list(state["losses"])
        sampler.history = [StepInfo(*h) for h in state["history"]]
        sampler._resume_rng = state["rng"]
        return sampler

    def _load_state(self, state):
        if self._saved_fingerprint is not None:
            check_fingerprint(self._saved_fingerprint, self._fingerprint(), source=self._checkpoint_path)
        nets = self._nets()
        if len(state["nets"]) != len(nets):
            raise ValueError("the checkpoint's networks do not match this sampler's method")
        try:
            for net, sd in zip(nets, state["nets"]):
                net.load_state_dict(sd)
            if state["ema_nets"] is not None and self._ema_nets is not None:
                for net, sd in zip(self._ema_nets, state["ema_nets"]):
                    net.load_state_dict(sd)
        except RuntimeError as e:  # e.g. a custom control of another architecture
            raise ValueError(
                f"the networks saved in {self._checkpoint_path!r} do not fit this sampler's networks "
                f"(pass control= / backward_control= like the saved ones to load): {e}"
            ) from e
        self._ema_updates = state["ema_updates"]
        self.optimizer.load_state_dict(state["optimizer"])

    # ----------------------------------------------------------------------------------------
    # sampling and estimates
    @torch.no_grad()
    def sample_unconstrained(self, num_samples: int, *, chunk_size: int = 8192):
        """Draw ``num_samples`` paths with the current control (not stored): returns the unconstrained
        terminal states ``z`` (N, dim) and their log importance weights (N,)."""
        self._require_potential()
        positive_int(num_samples, "num_samples")
        positive_int(chunk_size, "chunk_size")
        control, backward = self._sampling_nets()
        zs, log_ws, resolution = [], [], 0.0
        for start in range(0, num_samples, chunk_size):
            n = min(chunk_size, num_samples - start)
            path = self._simulate(
                self._initial(n), control_fn=self._control_fn(control, False), store_path=backward is not None
            )
            zs.append(path.terminal)
            log_rho = self._target.log_density(path.terminal)
            resolution = max(resolution, _resolution(log_rho))
            path_part = self._path_log_ratio(path, backward).to(torch.float64)
            log_ws.append(self._boundary(path, log_rho) + path_part)
        if resolution > _MAX_LOG_DENSITY_RESOLUTION:
            warnings.warn(
                f"the log density is computed in {log_rho.dtype}, whose resolution at its values is "
                f"{resolution:.2g}: the log weights are quantised and the estimates biased. Evaluate it "
                "in float64 (float64 data in the model, or dtype=torch.float64 with log_density)",
                RuntimeWarning,
                stacklevel=2,
            )
        return self._to_unconstrained(torch.cat(zs)), torch.cat(log_ws)

    def _to_unconstrained(self, w):
        """The model's unconstrained coordinates ``z = m + L w`` of the SDE's states."""
        return w if self._target is self.potential else self.preconditioner.to_unconstrained(w)

    default_num_samples = 4000  # draws of the cached evaluation (as 4 chains x 1000 of NUTS)
    num_dropped_paths = 0  #: paths of the last evaluation draw dropped for a NaN / +inf log weight

    def _weighted_draw(self, num_samples, minimum: int = 1):
        """The cached evaluation draw ``(z, log_w)``, non-finite paths dropped and counted."""
        num_samples = None if num_samples is None else positive_int(num_samples, "num_samples", minimum)
        if num_samples is not None or self._weighted is None:
            z, log_w = self.sample_unconstrained(num_samples or self.default_num_samples)
            log_w, z, self.num_dropped_paths = diagnostics._drop_nonfinite(log_w, z, stacklevel=4)
            self._weighted = (z, log_w)
        return self._weighted

    def get_weighted_samples(self, num_samples: int | None = None):
        """``(samples, log_weights)``: a dict site -> constrained values ``(N, *shape)`` and the log
        importance weights ``(N,)`` (unnormalised: ``logmeanexp`` estimates ``log p(y)``).

        With ``num_samples`` a fresh draw is made (and cached); without it the last draw is reused
        (``default_num_samples`` are drawn the first time), so estimates agree with each other.
        """
        z, log_w = self._weighted_draw(num_samples)
        return self.potential.constrain(z), log_w

    def get_samples(self, num_samples: int = 1000, *, resample: bool = True, group_by_chain: bool = False):
        """Posterior draws as a dict site -> ``(num_samples, *shape)`` (``(1, num_samples, *shape)``
        with ``group_by_chain``), like ``MCMC.get_samples()``.

        Fresh paths are drawn and, with ``resample`` (default), importance-resampled (systematic) so
        the draws target the posterior; ``resample=False`` returns the raw proposal draws. Paths with a
        NaN / +inf log weight are dropped (counted in :attr:`num_dropped_paths`, with a warning), so
        ``resample=False`` may return fewer draws. Resampling warns when the Pareto k exceeds 0.7.
        """
        z, log_w = self.sample_unconstrained(positive_int(num_samples, "num_samples"))
        log_w, z, self.num_dropped_paths = diagnostics._drop_nonfinite(log_w, z)
        if resample:
            ess = float(diagnostics.effective_sample_size(log_w))
            if ess * log_w.numel() < 50:
                warnings.warn(
                    f"importance resampling from an effective sample size of {ess * log_w.numel():.1f}: "
                    "the draws contain many duplicates; train longer or draw more samples",
                    RuntimeWarning,
                    stacklevel=2,
                )
            if log_w.numel() >= 2:
                diagnostics._warn_if_unreliable(diagnostics._pareto_k(log_w), "importance resampling")
            z = z[diagnostics.systematic_resample(log_w, num_samples)]
        samples = self.potential.constrain(z)
        if group_by_chain:
            samples = {k: v.unsqueeze(0) for k, v in samples.items()}
        return samples

    def log_evidence(self, num_samples: int | None = None) -> diagnostics.LogEvidence:
        """``(log_z, stderr, lower_bound, ess)``: the importance-sampling estimate of ``log p(y)`` with
        its delta-method standard error, the ELBO-type bound ``mean(log w)`` and the normalised ESS; the
        :class:`~pyro_sde.diagnostics.LogEvidence` also carries ``pareto_k``, ``reliable`` and
        ``num_dropped``. Warns when ``pareto_k > 0.7`` (the standard error is then unreliable)."""
        ev = diagnostics.log_evidence(self._weighted_draw(num_samples, minimum=2)[1])
        return diagnostics.LogEvidence(*ev, pareto_k=ev.pareto_k, num_dropped=self.num_dropped_paths)

    def ess(self, num_samples: int | None = None) -> float:
        """Normalised importance ESS ``(sum w)^2 / (N sum w^2)`` in (0, 1]; warns when the Pareto k
        exceeds 0.7 (the ESS then overstates the quality of the weights)."""
        log_w = self._weighted_draw(num_samples, minimum=2)[1]
        diagnostics._warn_if_unreliable(diagnostics._pareto_k(log_w), "the effective sample size")
        return float(diagnostics.effective_sample_size(log_w))

    def diagnostics(self, num_samples: int | None = None) -> dict:
        """Evidence, ESS and the Pareto k of the importance weights (k > 0.7: unreliable, warned), and
        the number of paths dropped for a non-finite log weight."""
        ev = self.log_evidence(num_samples)
        return {
            "log_evidence": float(ev.log_z),
            "log_evidence_stderr": float(ev.stderr),
            "log_evidence_lower_bound": float(ev.lower_bound),
            "ess": float(ev.ess),
            "pareto_k": ev.pareto_k,
            "reliable": ev.reliable,
            "num_samples": int(self._weighted[1].numel()),
            "num_dropped": ev.num_dropped,
        }

    def get_summary(self, prob: float = 0.9, num_samples: int | None = None) -> dict:
        """Importance-weighted posterior summary: site -> {"mean", "std", "median", quantiles}."""
        samples, log_w = self.get_weighted_samples(num_samples)
        return diagnostics.weighted_summary(samples, log_w, prob=prob)

    def summary(self, prob: float = 0.9, num_samples: int | None = None) -> None:
        """Print :meth:`get_summary` and the evidence estimate."""
        summary = self.get_summary(prob, num_samples)
        diagnostics.print_weighted_summary(summary, self.log_evidence())

    def __repr__(self):
        return (
            f"DiffusionSampler(method={self.method!r}, loss={self.loss_spec.name!r}, "
            f"reference={self.reference!r}, iterations={len(self.losses)})"
        )


def _is_check(iteration: int, eval_every: int) -> bool:
    """Stopping-rule checks after 5 and 10 steps (a good preconditioner is often enough), then every
    ``eval_every``."""
    return iteration in (5, 10) or iteration % eval_every == 0


def _check_until(until):
    if until is None or until == "converged":
        return
    if isinstance(until, bool) or not isinstance(until, (int, float)) or not 0 < until <= 1:
        raise ValueError(f"until must be 'converged', None or a target ESS in (0, 1], got {until!r}")


def _get_rng_state():
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["cpu"].cpu())  # a checkpoint loaded with map_location may hold it elsewhere
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])


def _support_name(constraint) -> str:
    """A short name of a support: ``"real"``, ``"greater_than(lower_bound=0.0)"``, ``"simplex"``, ..."""
    while isinstance(constraint, constraints.independent):
        constraint = constraint.base_constraint
    name = re.sub(r"(?<!^)(?=[A-Z])", "_", type(constraint).__name__.lstrip("_")).lower()
    params = [f"{k}={v!r}" for k, v in vars(constraint).items()
              if not k.startswith("_") and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return f"{name}({', '.join(params)})" if params else name
