"""``DiffusionSampler``: sample the posterior of a Pyro model with a learned controlled diffusion.

The sampler trains a control ``v`` of the chain ``x_{k+1} = a_k x_k + c_k v(t_k, x_k) + s_k xi_k`` (see
:mod:`pyro_sde.sde.reference`) so that the law of ``x_K`` approaches the (unconstrained) posterior.
Every draw comes with an exact importance weight ``w = dQ/dP^v`` of its whole path, so that
``E[w] = p(y)`` (the evidence) for any control: estimates are consistent even when training is not
finished, and the weights tell how far it is (ESS, Pareto k).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from pyro.infer.autoguide.initialization import init_to_uniform

from ... import _distributed as dist
from ... import diagnostics
from ..._checks import clamp_finite as _clip
from ..._checks import positive_float, positive_int
from ...nn import ControlNetwork
from ...sde import (
    BrownianReference,
    OUReference,
    VPReference,
    euler_maruyama,
    log_ratio_surrogate,
    path_log_prob,
    path_log_ratio,
    torchsde_euler,
)
from .._base import PosteriorSampler
from .._inputs import check_dtype_device as _check_dtype_device
from .._inputs import check_target
from .._training import StepInfo, TrainedSampler
from .losses import get_loss

if TYPE_CHECKING:
    from ..precondition import Preconditioner

__all__ = ["DiffusionSampler", "StepInfo"]

_METHODS = ("pis", "dis", "dds", "bridge")
#: coarsest acceptable spacing of representable log density values (``|log rho| * eps``)
_MAX_LOG_DENSITY_RESOLUTION = 1e-2
_BACKENDS = ("euler", "torchsde")
_CONTROL_GRAPHS = ("auto", "record", "recompute")
_MIXED_PRECISION = {"bfloat16": torch.bfloat16, "float16": torch.float16}
#: ``control_graph="auto"`` records the controls' graph during the simulation for batches of at least
#: ``RECORD_MIN_ROWS`` paths (per process; below, autograd's per-step overhead costs more than the
#: second forward pass saves: 1.2-1.7x slower at 64-256 paths, 0.9-1.1x at 512, 0.74-0.8x at 1024-2048
#: on CPU) whose
#: activations (estimated ``K N (4 hidden (layers + 1) + 4 dim)`` numbers) fit in ``RECORD_MEMORY_BYTES``
RECORD_MIN_ROWS = 1024
RECORD_MEMORY_BYTES = 2 * 1024**3


def _check_mixed_precision(value) -> torch.dtype | None:
    if value is None:
        return None
    if isinstance(value, str) and value in _MIXED_PRECISION:
        return _MIXED_PRECISION[value]
    if value in tuple(_MIXED_PRECISION.values()):
        return value
    raise ValueError(f"mixed_precision must be None, 'bfloat16' or 'float16', got {value!r}")


def _resolution(log_rho: torch.Tensor) -> float:
    """Spacing of representable values at the largest finite ``|log rho|`` (``|x| eps``), 0 if none."""
    finite = log_rho[torch.isfinite(log_rho)]
    if finite.numel() == 0:
        return 0.0
    return float(finite.abs().max()) * torch.finfo(log_rho.dtype).eps


class DiffusionSampler(PosteriorSampler, TrainedSampler):
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
    :param bool compile: evaluate the default :class:`~pyro_sde.nn.ControlNetwork` (simulation and loss
        passes) through ``torch.compile`` (False; the first iterations pay the compilation, tens of
        seconds; see the ``diffusion_step`` benchmark for what it buys). A custom ``control`` is used
        as given.
    :param str control_graph: how the detached-path losses (log-variance, ``rkl_ld``) get the
        differentiable controls: ``"record"`` (the simulation runs the network with autograd on the
        detached states and keeps its graph: one forward pass per iteration, activations of all
        ``K N`` rows in memory), ``"recompute"`` (a no-grad simulation, then one batched
        forward/backward on the stored path in slices of ``chunk_rows``: memory of one slice) or
        ``"auto"`` (default: record for batches of at least ``RECORD_MIN_ROWS`` = 1024 paths whose
        activations fit in ``RECORD_MEMORY_BYTES`` = 2 GiB, with ``backend="euler"``; recompute
        otherwise). Same numbers up to rounding. On CPU record was 1.25-1.35x faster at 1024-2048
        paths and 1.2-1.7x slower at 64-256 (autograd's per-step overhead), see
        ``benchmarks/diffusion_step.py``.
    :param mixed_precision: ``None`` (default) or ``"bfloat16"`` / ``"float16"`` (or the torch dtype):
        the control network runs under :func:`torch.autocast` in that dtype; states, scores and the
        path log weights stay in the target's dtype and float64, so the weights remain exact for the
        chain actually simulated (only the control is rounded). On a CPU with AVX-512 BF16 an
        iteration at batch 2048 x 200 ran 1.2x faster; after 400 iterations on a 2-d mixture the
        log Z error and ESS were those of float32.
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
        precondition: str | Preconditioner | tuple[torch.Tensor, torch.Tensor] | None = "laplace",
        precondition_options: dict | None = None,
        init_strategy: Callable = init_to_uniform,
        vectorize: str | bool = "auto",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        compile: bool = False,
        control_graph: str = "auto",
        mixed_precision: str | torch.dtype | None = None,
    ):
        check_target(model, log_density, score)
        if not isinstance(compile, bool):
            raise TypeError(f"compile must be a bool, got {type(compile).__name__}")
        self.compile = compile
        if control_graph not in _CONTROL_GRAPHS:
            raise ValueError(f"control_graph must be one of {_CONTROL_GRAPHS}, got {control_graph!r}")
        if control_graph == "record" and backend != "euler":
            raise ValueError("control_graph='record' needs backend='euler' (the torchsde backend recomputes)")
        self.control_graph = control_graph
        self.mixed_precision = _check_mixed_precision(mixed_precision)
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
            dim=dim, dtype=dtype, control_graph=control_graph,
            mixed_precision=None if self.mixed_precision is None else str(self.mixed_precision)[6:],
        )
        self.method = method
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
        self._init_training(
            lr=lr, grad_clip=grad_clip, final_lr_fraction=final_lr_fraction, ema_decay=ema_decay
        )
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
        self.backend = backend
        self._network_options = dict(
            hidden_dim=positive_int(hidden_dim, "hidden_dim"),
            num_layers=positive_int(num_layers, "num_layers"),
            guide_scale_init=0.01 if method == "pis" else 1.0,
        )
        self.control = control
        self.backward_control = backward_control
        self._init_target(
            model, log_density=log_density, dim=dim, score=score, precondition=precondition,
            precondition_options=precondition_options, init_strategy=init_strategy, vectorize=vectorize,
            dtype=dtype, device=device,
        )

    # ----------------------------------------------------------------------------------------
    # set-up
    def _bind_potential(self, potential):
        super()._bind_potential(potential)
        self._setup_training()

    def _setup_training(self):
        self._check_saved_fingerprint()
        dist.sync_rng_state_()  # under torchrun: one random stream (rank 0's) for every rank
        self._setup_target()
        p = self._target
        if self.control is None:
            self.control = ControlNetwork(p.dim, **self._network_options)
        self.control.to(dtype=p.dtype, device=p.device)
        if self.mixed_precision is not None and p.dtype == torch.float64:
            warnings.warn(
                "mixed_precision has no effect on a float64 target: torch.autocast leaves float64 "
                "networks in float64 (use a float32 model or dtype=torch.float32)",
                UserWarning,
                stacklevel=3,
            )
        if self.method == "bridge":
            if self.backward_control is None:
                options = dict(self._network_options, guide_scale_init=0.0)
                self.backward_control = ControlNetwork(p.dim, **options)
            self.backward_control.to(dtype=p.dtype, device=p.device)
        dist.broadcast_parameters_(self._nets())  # the same initial weights on every rank
        self._setup_optimizer()

    def _nets(self) -> list[torch.nn.Module]:
        return [self.control] + ([self.backward_control] if self.method == "bridge" else [])

    def _sampling_nets(self):
        """``(control, backward_control)`` used to draw samples: the EMA copies when enabled."""
        nets = self._sampling_networks()
        return nets[0], (nets[1] if self.method == "bridge" else None)

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

    def _network_precision(self, device):
        """The autocast context of the networks (``mixed_precision``), else a no-op."""
        if self.mixed_precision is None:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device).type, dtype=self.mixed_precision)

    def _control_value(self, tau, z, guide):
        with self._network_precision(z.device):
            v = self.control(tau, z, guide)
        return _clip(v.to(z.dtype), self.control_clip)

    def _control_fn(self, net, differentiable, guides=None, recorded=None):
        """``control_fn(k, t, z)`` of ``net`` for the integrator; records step k's guide in ``guides``.

        With a dict ``recorded`` (detached paths only) the network runs with autograd on the detached
        state and ``recorded[k]`` keeps its differentiable output: the loss then needs no second
        forward pass; the integrator gets the detached value."""
        T, p = self.reference.T, self._target
        if self.compile and isinstance(net, ControlNetwork):
            net.compiled = "inductor"  # a plain flag: EMA copies and checkpoints carry no compiled code
        network_grad = differentiable or recorded is not None
        forward = None
        if hasattr(net, "time_features"):  # evaluate the time branch once for the whole grid
            tau = self.reference.coefficients(p.dtype, p.device).times[:-1] / T
            with torch.set_grad_enabled(network_grad), self._network_precision(p.device):
                hidden, scale = net.time_features(tau)

            def forward(k, tau_k, z, guide):
                return net.forward_with_time_features((hidden[k], scale[k]), z, guide)

        def control_fn(k, t, z):
            tau = t / T
            guide = self._guide(tau, z, create_graph=differentiable)
            if guides is not None:
                guides[k] = guide.detach()
            with torch.set_grad_enabled(network_grad):
                with self._network_precision(z.device):
                    v = forward(k, tau, z, guide) if forward is not None else net(tau, z, guide)
                v = _clip(v.to(z.dtype), self.control_clip)
            if recorded is None:
                return v
            recorded[k] = v
            return v.detach()

        return control_fn

    def _backward_controls(self, net, states):
        """``u(t_{k+1}, x_{k+1})`` for stored states (K+1, N, d) -> (K, N, d), one batched call."""
        coef = self.reference.coefficients(states.dtype, states.device)
        tau = (coef.times[1:] / self.reference.T).view(-1, 1, 1)
        with self._network_precision(states.device):
            u = net(tau, states[1:], None)
        return _clip(u.to(states.dtype), self.control_clip)

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

    def _initial_and_noise(self, n, draw_noise: bool = False) -> tuple[torch.Tensor, dict]:
        """``x_0`` of a batch of ``n`` paths and the ``_simulate`` keywords for its noise: the increments
        (K, n, d), drawn here when ``draw_noise`` (the draw the integrator would make, in its order), else
        left to the integrator.

        Under ``torch.distributed`` every rank draws ``x_0`` (n, d) and the increments of the whole batch
        from the shared random stream, in the order the single process draws them, and keeps its
        :func:`~pyro_sde._distributed.shard`: the ranks' paths are the single process's (with
        ``backend="torchsde"`` too: its Brownian motion then takes these increments)."""
        x0 = self._initial(n)
        distributed = dist.is_distributed()
        if not (distributed or draw_noise):
            return x0, {}
        noise = torch.randn((self.num_steps,) + tuple(x0.shape), dtype=x0.dtype, device=x0.device)
        if not distributed:
            return x0, dict(noise=noise)
        rows = dist.shard(n)
        return x0[rows], dict(noise=noise[:, rows])

    def _boundary(self, path, log_rho=None):
        """``log rho(x_K)`` + the reference's boundary term, accumulated in float64 (N,)."""
        log_rho = self._target.log_density(path.terminal) if log_rho is None else log_rho
        boundary = self.reference.boundary_log_weight(path.initial, path.terminal)
        return log_rho.to(torch.float64) + boundary.to(torch.float64)

    def _records_controls(self, batch_size: int) -> bool:
        """Whether this batch records the controls' graph during the simulation (``control_graph``)."""
        if self.control_graph != "auto":
            return self.control_graph == "record"
        if self.backend != "euler":
            return False
        net, p = self.control, self._target
        hidden = getattr(getattr(net, "state_net", None), "out_features", 64)
        layers = len(getattr(net, "_linears", ())) or 3
        width = 4 * hidden * (layers + 1) + 4 * p.dim
        itemsize = torch.empty((), dtype=self.mixed_precision or p.dtype).element_size()
        rank_rows = dist.shard_sizes(batch_size)[dist.rank()]
        fits = self.num_steps * rank_rows * width * itemsize <= RECORD_MEMORY_BYTES
        return rank_rows >= RECORD_MIN_ROWS and fits

    def _training_log_weights(self, batch_size, surrogate: bool = True):
        """``(log_w, behaviour_log_w, log_forward)`` on a fresh batch; ``log_w`` is differentiable.

        ``surrogate=False`` differentiates :func:`~pyro_sde.sde.path_log_ratio` itself instead of
        :func:`~pyro_sde.sde.log_ratio_surrogate` (same value and gradient; for tests)."""
        bridge = self.method == "bridge"
        # the log-variance loss of a one-control sampler needs log w's value (the simulation's) and its
        # gradient in the controls, which log_ratio_surrogate gives from the increments
        surrogate = (surrogate and not bridge and not self.loss_spec.reparametrized
                     and not self.loss_spec.needs_forward_log_prob)
        x0, noise = self._initial_and_noise(batch_size, draw_noise=surrogate)
        if self.loss_spec.reparametrized:
            path = self._simulate(
                x0, control_fn=self._control_fn(self.control, True), differentiable=True, store_path=bridge,
                **noise,
            )
            return self._boundary(path) + self._path_log_ratio(path, self.backward_control), None, None
        K = self.num_steps
        record = self._records_controls(batch_size)
        guides, recorded = ({}, None) if not record else (None, {})
        with torch.no_grad():
            path = self._simulate(
                x0,
                control_fn=self._control_fn(self.control, False, guides, recorded),
                noise_scale=self.exploration_noise,
                store_path=not (record and surrogate),
                **noise,
            )
            boundary = self._boundary(path)
            behaviour = boundary + self._path_log_ratio(path, self.backward_control)
        if record:
            controls = [recorded[k] for k in range(K)]
        else:
            coef = self.reference.coefficients(x0.dtype, x0.device)
            tau = (coef.times[:-1] / self.reference.T).view(K, 1, 1)
            guide = torch.stack([guides[k] for k in range(K)])
            controls = self._control_value(tau, path.states[:-1], guide)
        if surrogate:
            s = log_ratio_surrogate(self.reference, noise["noise"], controls, self.exploration_noise)
            return behaviour + (s - s.detach()), behaviour, None
        if record:
            controls = torch.stack(controls)
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

    def compute_loss(self, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """The differentiable training loss on a fresh batch: ``(loss, log_w_batch)``, where the loss is
        ``KL`` or ``log-variance`` of the batch's log weights divided by ``dim`` and ``log_w_batch``
        (detached) are the weights of the simulated paths under their own control.

        Under ``torch.distributed`` this rank simulates its slice of the batch: the loss is then its
        additive share (summed over the ranks: the loss of the whole batch) and ``log_w_batch`` holds
        the weights of all ranks."""
        loss, _, log_w = self._compute_loss(batch_size)
        return loss, log_w

    def _compute_loss(self, batch_size):
        """``(loss, loss_value, ref_log_w)``: the (rank's share of the) differentiable loss, the loss of
        the whole batch (detached) and the whole batch's finite reference log weights."""
        self._require_potential()
        dist.check_shardable(batch_size, "batch_size")
        log_w, behaviour_log_w, log_forward = self._training_log_weights(batch_size)
        finite = torch.isfinite(log_w)
        log_forward = None if log_forward is None else log_forward[finite]
        ref_log_w = (log_w if behaviour_log_w is None else behaviour_log_w).detach()[finite]
        if dist.is_distributed():  # global mean and count: the loss of the whole batch, split by rank
            mean, count = dist.global_mean_count(log_w[finite])
            if count < 2:
                raise FloatingPointError("fewer than 2 paths with a finite log weight in the batch")
            loss = self.loss_spec.fn(log_w[finite], log_forward, mean=mean, count=count) / self._target.dim
            value = dist.all_reduce_sum(loss.detach())
            if not torch.isfinite(value):
                raise FloatingPointError(f"non-finite loss {value.item()}")
            return loss, value, dist.all_gather_cat(ref_log_w)
        if int(finite.sum()) < 2:
            raise FloatingPointError("fewer than 2 paths with a finite log weight in the batch")
        loss = self.loss_spec.fn(log_w[finite], log_forward) / self._target.dim
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()}")
        return loss, loss.detach(), ref_log_w


    def step(self, batch_size: int = 512) -> StepInfo:
        """One optimisation step on a fresh batch of ``batch_size`` paths."""
        self._require_potential()
        for net in self._nets():
            net.train()
        loss, value, ref_log_w = self._compute_loss(batch_size)
        self._optimizer_step(loss)
        info = StepInfo(
            float(value),
            float(ref_log_w.mean()),
            float(diagnostics.effective_sample_size(ref_log_w)),
            batch_size - ref_log_w.numel(),
        )
        self.losses.append(info.loss)
        self.history.append(info)
        return info

    @torch.no_grad()
    def _evaluate(self, num_paths: int):
        """``(ess, pareto_k)`` of a fresh batch drawn with the sampling control (non-finite paths dropped)."""
        _, log_w = self.sample_unconstrained(num_paths)
        log_w = log_w[torch.isfinite(log_w)].double()
        if log_w.numel() < 2:
            return 0.0, math.inf
        ess = float(diagnostics.effective_sample_size(log_w)) * log_w.numel() / num_paths
        return ess, float(diagnostics.psis(log_w)[1])

    # ----------------------------------------------------------------------------------------
    # sampling and estimates
    @torch.no_grad()
    def sample_unconstrained(
        self, num_samples: int, *, chunk_size: int = 8192
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``num_samples`` paths with the current control (not stored): returns the unconstrained
        terminal states ``z`` (N, dim) and their log importance weights (N,)."""
        self._require_potential()
        positive_int(num_samples, "num_samples")
        positive_int(chunk_size, "chunk_size")
        control, backward = self._sampling_nets()
        zs, log_ws, resolution = [], [], 0.0
        for start in range(0, num_samples, chunk_size):
            n = min(chunk_size, num_samples - start)
            x0, noise = self._initial_and_noise(n)  # distributed: this rank's slice of the chunk
            if x0.shape[0] == 0:  # more ranks than paths in the chunk
                z = x0
                log_w = torch.empty(0, dtype=torch.float64, device=x0.device)
            else:
                path = self._simulate(
                    x0, control_fn=self._control_fn(control, False), store_path=backward is not None, **noise
                )
                z = path.terminal
                log_rho = self._target.log_density(z)
                resolution = max(resolution, _resolution(log_rho))
                path_part = self._path_log_ratio(path, backward).to(torch.float64)
                log_w = self._boundary(path, log_rho) + path_part
            zs.append(dist.all_gather_cat(z))  # every rank gets the whole chunk, in order
            log_ws.append(dist.all_gather_cat(log_w))
        if resolution > _MAX_LOG_DENSITY_RESOLUTION:
            warnings.warn(
                f"the log density is computed in {log_rho.dtype}, whose resolution at its values is "
                f"{resolution:.2g}: the log weights are quantised and the estimates biased. Evaluate it "
                "in float64 (float64 data in the model, or dtype=torch.float64 with log_density)",
                RuntimeWarning,
                stacklevel=2,
            )
        return self._to_unconstrained(torch.cat(zs)), torch.cat(log_ws)

    supports_distributed = True  # see docs/distributed.md
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

    def _evidence_weights(self, num_samples=None):
        return self._weighted_draw(num_samples, minimum=2)[1]

    def _proposal_draw(self, num_samples):
        """Fresh paths for :meth:`get_samples` (NaN / +inf weights dropped, counted, warned)."""
        z, log_w = self.sample_unconstrained(num_samples)
        log_w, z, self.num_dropped_paths = diagnostics._drop_nonfinite(log_w, z, stacklevel=5)
        return z, log_w

    def log_evidence(self, num_samples: int | None = None) -> diagnostics.LogEvidence:
        """``(log_z, stderr, lower_bound, ess)``: the importance-sampling estimate of ``log p(y)`` with
        its delta-method standard error, the ELBO-type bound ``mean(log w)`` and the normalised ESS; the
        :class:`~pyro_sde.diagnostics.LogEvidence` also carries ``pareto_k``, ``reliable`` and
        ``num_dropped``. Warns when ``pareto_k > 0.7`` (the standard error is then unreliable)."""
        ev = diagnostics.log_evidence(self._weighted_draw(num_samples, minimum=2)[1])
        return diagnostics.LogEvidence(*ev, pareto_k=ev.pareto_k, num_dropped=self.num_dropped_paths)

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

    @property
    def _progress_desc(self):
        return f"{self.method}-{self.loss_spec.name}"

    def __repr__(self):
        return (
            f"DiffusionSampler(method={self.method!r}, loss={self.loss_spec.name!r}, "
            f"reference={self.reference!r}, iterations={len(self.losses)})"
        )


