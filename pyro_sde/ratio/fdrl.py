"""Flow-guided density-ratio learning (FDRL, Heng, Ansari & Soh, arXiv 2303.03714): a generative model.

A network ``r_theta(x) ~ q_tilde(x) / p(x)`` (``q_tilde``: flowed samples, ``p``: data) drives the
discretised Wasserstein gradient flow of ``D_f(q || p)``, simulated with the package's Euler-Maruyama
step (:func:`pyro_sde.sde.integrate.euler_maruyama_step`)::

    x_{k+1} = x_k - eta * grad_x f'(r_theta(x_k)) + nu * xi_k,    xi_k ~ N(0, I),    x_0 ~ prior.

Training (Alg. 1): each iteration pushes a prior batch through ``K`` flow steps with the *stale*
(current, detached) estimator and takes one optimiser step on a Bregman loss between the flowed batch
(numerator) and a data batch (denominator)::

    LSIF  g(y) = (y - 1)^2 / 2:            L = E_p[r^2] / 2 - E_q[r]                (network: r)
    LR    g(y) = y log y - (1+y) log(1+y): L = E_p[softplus(l)] + E_q[softplus(-l)]  (network: l = log r)
    KL    g(y) = y log y - y:              L = E_p[exp l] - E_q[l]                   (network: l = log r)

The estimator therefore learns from progressively improving samples, which bridges the "density chasm"
between a simple prior and the data. Sampling (Alg. 2) runs ``K + kappa`` flow steps from the prior.
The model is a :class:`~pyro_sde.ratio.RatioEstimator`: ``log_ratio(x) = log q_tilde(x) - log p(x)``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._checkpoint import load_checkpoint
from .._checks import nonnegative_float as _nonnegative_float
from .._checks import positive_int as _positive_int
from .._progress import progress_bar as _progress_bar
from ..nn.ratio_networks import MLP, gelu_derivatives
from ..sde.integrate import euler_maruyama_step
from .base import MIN_SAMPLES, RatioEstimator, check_samples, optimizer_step

__all__ = ["FlowGuidedGenerator", "FourierMLP", "energy_distance", "fit_gaussian", "LOSSES", "DIVERGENCES"]

#: Bregman losses; ``"bce"`` is the binary cross-entropy form of ``"lr"`` (the same objective).
LOSSES = ("lsif", "lr", "bce", "kl")
#: f-divergences of the flow, with ``f'(r)`` as a function of ``l = log r``.
DIVERGENCES = ("chi2", "kl", "js", "logd")
_DEFAULT_DIVERGENCE = {"lsif": "chi2", "lr": "kl", "bce": "kl", "kl": "kl"}
_LOG_EPS = 1e-6  # floor of r when an LSIF output (which may be <= 0) is turned into log r


def energy_distance(x: torch.Tensor, y: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Energy distance ``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` between the samples ``x`` and ``y``.

    ``x`` ``(N, d)``, ``y`` ``(M, d)`` -> 0-d tensor. The default is the V-statistic (all pairs, the zero
    diagonal included): the energy distance of the two empirical measures, zero iff they coincide, never
    negative, and in 1-D ``2 int (F_x - F_y)^2``, the square of :func:`scipy.stats.energy_distance`. As an
    estimate of the population value it is biased upwards by ``E|X - X'| / N + E|Y - Y'| / M`` (for two
    samples of one distribution its mean is that bias, not 0). ``unbiased=True`` gives the U-statistic
    (diagonals left out of the within-sample means): unbiased, but it can be negative.
    """
    x = check_samples(x, "x", min_samples=2 if unbiased else 1)
    y = check_samples(y, "y", x.shape[-1], min_samples=2 if unbiased else 1)
    if x.dtype != y.dtype or x.device != y.device:
        raise ValueError(f"x and y must share dtype and device, got {x.dtype}/{x.device} and "
                         f"{y.dtype}/{y.device}")

    def mean_dist(a, b, same=False):  # exact distances (the matrix-product shortcut loses digits near 0)
        total = torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist").sum()
        n = a.shape[0] * b.shape[0] - (a.shape[0] if same and unbiased else 0)
        return total / n

    return 2 * mean_dist(x, y) - mean_dist(x, x, True) - mean_dist(y, y, True)


def fit_gaussian(x: torch.Tensor, jitter: float = 1e-6) -> torch.distributions.MultivariateNormal:
    """The data-dependent prior: ``N(mean(x), cov(x) + jitter * mean(var) I)`` fitted to ``x`` ``(N, d)``."""
    x = check_samples(x, "x", min_samples=2)
    cov = torch.cov(x.T).reshape(x.shape[-1], x.shape[-1])
    cov = cov + jitter * cov.diagonal().mean().clamp_min(1e-12) * torch.eye(x.shape[-1], dtype=x.dtype,
                                                                            device=x.device)
    return torch.distributions.MultivariateNormal(x.mean(0), covariance_matrix=cov)


def _format_path(path, iteration: int):
    return path.format(iteration=iteration) if isinstance(path, str) and "{iteration}" in path else path


def _get_rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _f_prime(divergence: str, log_r: torch.Tensor) -> torch.Tensor:
    """``f'(r)`` at ``r = exp(log_r)`` (Table 1 of the paper)."""
    if divergence == "chi2":
        return 2 * (log_r.exp() - 1)
    if divergence == "kl":
        return log_r + 1
    if divergence == "js":  # log(2r / (r + 1))
        return math.log(2.0) - F.softplus(-log_r)
    if divergence == "logd":  # log(r + 1) + 1
        return F.softplus(log_r) + 1
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")


class FourierMLP(nn.Module):
    """``z -> mlp([z, sin(z B^T), cos(z B^T)])``, ``(N, d) -> (N,)``, with ``m`` fixed random frequencies
    ``B ~ N(0, scale^2)`` of shape ``(m, d)``.

    Random Fourier features (Tancik et al., 2020) lift the spectral bias of a small MLP: in 2-D the plain
    GELU MLP learns the angular pattern of 8 gaussians or the edges of a checkerboard only slowly, and the
    flow then leaves the samples on a ring. ``B`` is a buffer (saved with the weights).
    """

    def __init__(self, dim: int, num_features: int, scale: float = 1.0, *, hidden_dim: int = 128,
                 num_layers: int = 3):
        super().__init__()
        self.register_buffer("freqs", scale * torch.randn(num_features, dim))
        self.mlp = MLP(dim + 2 * num_features, 1, hidden_dim=hidden_dim, num_layers=num_layers)

    def forward(self, z):
        proj = z @ self.freqs.T
        return self.mlp(torch.cat([z, proj.sin(), proj.cos()], -1))


def _is_gelu_chain(mlp: MLP) -> bool:
    """Whether ``mlp`` is a plain chain of ``Linear`` layers and exact GELUs with a scalar output."""
    mods = list(mlp.net)
    linears, acts = mods[0::2], mods[1::2]
    return (len(mods) % 2 == 1 and all(isinstance(m, nn.Linear) for m in linears)
            and all(type(a) is nn.GELU and a.approximate == "none" for a in acts)
            and linears[-1].out_features == 1)


def _mlp_input_grad(mlp: MLP, z: torch.Tensor) -> torch.Tensor:
    """``grad_z sum(mlp(z))`` of a GELU chain (:func:`_is_gelu_chain`) by an explicit forward and backward
    pass, ``(N, d) -> (N, d)``: the same numbers as autograd (to rounding) at about half the cost for the
    small networks of the flow, where autograd's bookkeeping dominates."""
    linears = list(mlp.net)[0::2]
    h, slopes = z, []
    for lin in linears[:-1]:
        h, slope = gelu_derivatives(F.linear(h, lin.weight, lin.bias))
        slopes.append(slope)
    g = slopes[-1] * linears[-1].weight  # (N, H) * (1, H)
    for lin, slope in zip(reversed(linears[1:-1]), reversed(slopes[:-1])):
        g = (g @ lin.weight) * slope
    return g @ linears[0].weight


def _fourier_input_grad(network: FourierMLP, z: torch.Tensor) -> torch.Tensor:
    """``grad_z sum(network(z))`` of a :class:`FourierMLP` on a GELU chain, by the chain rule through the
    features ``[z, sin(z B^T), cos(z B^T)]``."""
    proj = z @ network.freqs.T
    g = _mlp_input_grad(network.mlp, torch.cat([z, proj.sin(), proj.cos()], -1))
    d, m = z.shape[-1], proj.shape[-1]
    return g[:, :d] + (g[:, d:d + m] * proj.cos() - g[:, d + m:] * proj.sin()) @ network.freqs


def _input_grad_fn(network: nn.Module) -> Callable | None:
    """``z -> grad_z sum(network(z))`` without autograd for :class:`MLP` and :class:`FourierMLP` GELU
    chains, else None (checked once per flow, not per step)."""
    if isinstance(network, MLP) and _is_gelu_chain(network):
        return lambda z: _mlp_input_grad(network, z)
    if isinstance(network, FourierMLP) and _is_gelu_chain(network.mlp):
        return lambda z: _fourier_input_grad(network, z)
    return None


class FlowGuidedGenerator(RatioEstimator):
    """FDRL generator: a stale density-ratio estimator ``r_theta = q_tilde / p`` trained on flowed samples.

    Example::

        gen = FlowGuidedGenerator(2, loss="lsif", num_flow_steps=50, step_size=1.0)
        gen.fit(data, num_iterations=2000)               # data (N, 2); tqdm bar, gen.losses
        x = gen.sample(5000)                             # (5000, 2): K + kappa flow steps from the prior
        gen.save("fdrl.pt"); gen = FlowGuidedGenerator.load("fdrl.pt")

    All work happens on standardised inputs ``z = (x - mean) / s`` with the data mean and one scalar
    ``s`` (root mean per-coordinate variance, so the flow geometry stays isotropic); ``step_size`` and
    ``noise_std`` are in these units.

    Choosing ``K`` and ``eta``: the stale flow is autonomous, so the samples are still moving at step ``K``,
    and the estimator only stops them through the residual ratio ``q_tilde / p``. A prior at distance ``D``
    (standardised units) is crossed at speed ``~ D / K`` and, for LSIF-chi2, the flowed samples settle
    short of the data by an offset ``delta`` with ``2 eta delta exp(delta^2 / 2) ~ D / K``. Keep
    ``eta K`` large against ``D`` (``eta K ~ 100`` for the 27-unit chasm of the benchmark; ``eta ~ 1``,
    as in the paper's toy configuration). ``num_refine_steps > 0`` runs the flow past the step the
    estimator was trained for: useful for images in the paper, but in low dimensions it drives the
    samples into the flow's stagnation set (a line across the direction of travel), so the default is 0.

    :param int dim: data dimension ``d``.
    :param str loss: Bregman loss: ``"lsif"`` (network outputs ``r``), ``"lr"`` / ``"bce"`` (logistic,
        network outputs ``log r``) or ``"kl"`` (KLIEP-style, outputs ``log r``).
    :param str divergence: the flow's f-divergence ``"chi2"``, ``"kl"``, ``"js"`` or ``"logd"``; default
        the paper's pairing (LSIF-chi2, LR-KL, KL-KL).
    :param prior: ``"data"`` (the data-dependent prior, a full-covariance Gaussian fitted to the data in
        :meth:`fit`), a ``torch.distributions.Distribution`` with ``event_shape == (d,)``, or a sampler
        ``n -> (n, d)`` (in data units).
    :param int num_flow_steps: ``K``, flow steps per training iteration.
    :param int num_refine_steps: ``kappa``, extra flow steps when sampling (Alg. 2; default 0, see above).
    :param float step_size: ``eta``, the drift step of the Euler-Maruyama flow.
    :param float noise_std: ``nu``, the per-step noise std (``nu = sqrt(2 gamma eta)`` for the SDE
        ``dz = -grad f'(r) dt + sqrt(2 gamma) dW``).
    :param int hidden_dim: MLP width. :param int num_layers: MLP hidden layers.
    :param int fourier_features: ``m > 0`` feeds the MLP ``[z, sin(z B^T), cos(z B^T)]`` with ``m`` fixed
        random frequencies ``B ~ N(0, fourier_scale^2)`` (:class:`FourierMLP`; standardised units): fine
        structure in low dimensions (modes, edges) that a plain MLP learns only slowly. 0: the plain MLP.
    :param float fourier_scale: std of the frequencies.
    :param nn.Module network: a custom network ``(N, d) -> (N,)`` (standardised inputs) instead of the MLP.
    """

    def __init__(self, dim: int, *, loss: str = "lsif", divergence: str | None = None,
                 prior: str | torch.distributions.Distribution | Callable[[int], torch.Tensor] = "data",
                 num_flow_steps: int = 50, num_refine_steps: int = 0, step_size: float = 1.0,
                 noise_std: float = 0.03, hidden_dim: int = 128, num_layers: int = 3,
                 fourier_features: int = 0, fourier_scale: float = 1.0, network: nn.Module | None = None):
        super().__init__(dim)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        divergence = _DEFAULT_DIVERGENCE[loss] if divergence is None else divergence
        if divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
        self.loss, self.divergence = loss, divergence
        self.num_flow_steps = _positive_int(num_flow_steps, "num_flow_steps")
        self.num_refine_steps = _positive_int(num_refine_steps, "num_refine_steps", 0)
        self.step_size = _nonnegative_float(step_size, "step_size", positive=True)
        self.noise_std = _nonnegative_float(noise_std, "noise_std")
        self._set_prior(prior)
        _positive_int(fourier_features, "fourier_features", 0)
        _nonnegative_float(fourier_scale, "fourier_scale", positive=True)
        if network is None:
            network = (FourierMLP(dim, fourier_features, fourier_scale, hidden_dim=hidden_dim,
                                  num_layers=num_layers) if fourier_features
                       else MLP(dim, 1, hidden_dim=hidden_dim, num_layers=num_layers))
        self.network = network
        self._config.update(loss=loss, divergence=divergence, num_flow_steps=num_flow_steps,
                            num_refine_steps=num_refine_steps, step_size=step_size, noise_std=noise_std)
        if isinstance(network, (MLP, FourierMLP)):
            self._config.update(hidden_dim=hidden_dim, num_layers=num_layers)
        if isinstance(network, FourierMLP):
            self._config.update(fourier_features=fourier_features, fourier_scale=fourier_scale)
        self.iteration = 0  # optimiser steps taken so far (over all fit calls)
        self._resume: dict | None = None  # optimiser / EMA / RNG state of an interrupted fit

    # prior -----------------------------------------------------------------------------------
    def _set_prior(self, prior):
        # the data-dependent prior lives in buffers (standardised units) so it travels with state_dict
        self.register_buffer("prior_loc", torch.zeros(self.dim))
        self.register_buffer("prior_scale_tril", torch.eye(self.dim))
        if isinstance(prior, str):
            if prior != "data":
                raise ValueError(f"prior must be 'data', a Distribution or a sampler, got {prior!r}")
            self.user_prior = None
        elif isinstance(prior, torch.distributions.Distribution):
            if tuple(prior.event_shape) != (self.dim,) or tuple(prior.batch_shape) != ():
                raise ValueError(f"prior must have event_shape ({self.dim},) and batch_shape (), got "
                                 f"{tuple(prior.event_shape)} and {tuple(prior.batch_shape)}")
            self.user_prior = prior
        elif callable(prior):
            self.user_prior = prior
        else:
            raise TypeError(f"prior must be 'data', a Distribution or a sampler n -> (n, d), got "
                            f"{type(prior).__name__}")

    def sample_prior(self, num_samples: int) -> torch.Tensor:
        """``num_samples`` prior draws in *standardised* units, shape ``(num_samples, d)``."""
        if self.user_prior is None:
            eps = torch.randn(num_samples, self.dim, dtype=self.prior_loc.dtype, device=self.prior_loc.device)
            return self.prior_loc + eps @ self.prior_scale_tril.T
        if isinstance(self.user_prior, torch.distributions.Distribution):
            x = self.user_prior.sample((num_samples,))
        else:
            x = self.user_prior(num_samples)
        x = check_samples(x, "prior sample", self.dim)
        if x.shape[0] != num_samples:
            raise ValueError(f"the prior sampler returned {x.shape[0]} samples, {num_samples} requested")
        return self.standardize(x.to(device=self.shift.device, dtype=self.shift.dtype))

    # the ratio network -----------------------------------------------------------------------
    def _log_r(self, z: torch.Tensor) -> torch.Tensor:
        out = self.network(z)
        return out.clamp_min(_LOG_EPS).log() if self.loss == "lsif" else out

    def _log_ratio(self, z, num_steps=None):
        return self._log_r(z)

    def _loss(self, x_num, x_den, progress):
        """Bregman loss: ``x_num`` flowed samples (``q_tilde``), ``x_den`` data (``p``), both standardised."""
        out_q, out_p = self.network(x_num), self.network(x_den)
        if self.loss == "lsif":
            return 0.5 * (out_p**2).mean() - out_q.mean()
        if self.loss in ("lr", "bce"):
            return F.softplus(out_p).mean() + F.softplus(-out_q).mean()
        return out_p.exp().mean() - out_q.mean()  # "kl"

    def potential(
        self,
        z: torch.Tensor,
        classifier: Callable[[torch.Tensor], torch.Tensor] | None = None,
        label: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """``f'(r_theta(z))`` on standardised ``z`` ``(N, d) -> (N,)``; with a classifier, the composed
        class-conditional ratio ``r(x | y) = r(x) / (C p(y | x))`` (the log term scaled by
        ``guidance_scale``)."""
        if self.divergence == "chi2" and self.loss == "lsif" and classifier is None:
            return 2 * (self.network(z) - 1)  # exact chi2 on the raw LSIF output (r may be <= 0)
        log_r = self._log_r(z)
        if classifier is not None:
            x = z * self.scale + self.shift
            logits = classifier(x)
            if logits.dim() != 2 or logits.shape[0] != z.shape[0]:
                raise ValueError(f"classifier must map (N, d) to (N, num_classes) logits, got "
                                 f"{tuple(logits.shape)}")
            if label is None or label.shape != (z.shape[0],):
                raise ValueError(f"label must have shape ({z.shape[0]},) with a classifier")
            if bool((label >= logits.shape[-1]).any()):
                raise ValueError(f"label must be < num_classes = {logits.shape[-1]}")
            log_p = logits.log_softmax(-1)
            log_py = log_p.gather(-1, label[:, None]).squeeze(-1)
            log_r = log_r - guidance_scale * (log_py + math.log(logits.shape[-1]))
        return _f_prime(self.divergence, log_r)

    # the flow ----------------------------------------------------------------------------------
    def _check_flow_options(self, num_steps, step_size, noise_std):
        num_steps = self.num_flow_steps + self.num_refine_steps if num_steps is None else num_steps
        _positive_int(num_steps, "num_steps", 0)
        step_size = self.step_size if step_size is None else _nonnegative_float(step_size, "step_size")
        noise_std = self.noise_std if noise_std is None else _nonnegative_float(noise_std, "noise_std")
        return num_steps, step_size, noise_std

    def flow(self, z0: torch.Tensor, num_steps: int | None = None, *, step_size: float | None = None,
             noise_std: float | None = None, classifier: Callable | None = None,
             label: torch.Tensor | None = None, guidance_scale: float = 1.0,
             return_path: bool = False) -> torch.Tensor:
        """Run the Euler-Maruyama flow ``z <- z - eta grad f'(r(z)) + nu xi`` from standardised ``z0``.

        ``z0`` ``(N, d)`` -> ``(N, d)`` (or ``(num_steps + 1, N, d)`` with ``return_path``); no autograd
        graph is kept (the estimator is stale). ``num_steps`` defaults to ``K + kappa``.
        """
        num_steps, eta, nu = self._check_flow_options(num_steps, step_size, noise_std)
        z = check_samples(z0, "z0", self.dim).detach()
        path = [z] if return_path else None
        # f'(r) linear in the network output (LSIF-chi2: 2 (r - 1); a log-ratio network with KL: l + 1):
        # grad f' is a multiple of the network's input gradient, computed without autograd for the MLP
        linear = {("lsif", "chi2"): 2.0, ("lr", "kl"): 1.0, ("bce", "kl"): 1.0, ("kl", "kl"): 1.0}.get(
            (self.loss, self.divergence))
        explicit = _input_grad_fn(self.network) if classifier is None and linear is not None else None
        for _ in range(num_steps):
            if explicit is not None:
                with torch.no_grad():
                    grad = linear * explicit(z)
            else:
                with torch.enable_grad():
                    zk = z.requires_grad_(True)
                    grad = torch.autograd.grad(self.potential(zk, classifier, label, guidance_scale).sum(),
                                               zk)[0]
            z = euler_maruyama_step(z.detach(), 1.0, -eta, nu, grad, torch.randn_like(grad))
            if return_path:
                path.append(z)
        return torch.stack(path) if return_path else z

    # training ------------------------------------------------------------------------------------
    def fit(self, data: torch.Tensor, *, num_iterations: int = 2000, batch_size: int = 256, lr: float = 1e-3,
            weight_decay: float = 0.0, ema_decay: float | None = 0.998, lr_min_fraction: float = 0.0,
            checkpoint_path: str | os.PathLike | None = None, checkpoint_every: int | None = None,
            resume: bool = False, progress_bar: bool | None = None) -> FlowGuidedGenerator:
        """Train (Alg. 1): per iteration, flow a prior batch ``K`` steps with the current (detached)
        estimator, then one Adam step on the Bregman loss (flowed batch vs a data batch).

        :param data: ``(N, d)`` training samples (floating, finite, ``N >= 8``).
        :param int num_iterations: optimiser steps of this call (cosine decay of ``lr`` to
            ``lr_min_fraction * lr``).
        :param int batch_size: flowed samples and data samples per step.
        :param float ema_decay: EMA of the weights (the paper's 0.998), used after training; None: off.
        :param checkpoint_path: file written every ``checkpoint_every`` iterations and at the end (model,
            optimiser, EMA and RNG state: :meth:`load` then ``fit(data, resume=True)`` continues exactly);
            a ``"{iteration}"`` field in the name keeps one file per checkpoint (``"run_{iteration}.pt"``).
        :param bool resume: continue the interrupted run stored in a loaded checkpoint (same options).
        :param progress_bar: the loss on a bar on a terminal and in a few plain lines in a log (``None``,
            default), always on a bar (``True``) or nowhere (``False``).
        :returns: ``self``.

        Under ``torch.distributed`` each rank flows its share of the ``batch_size`` prior draws (in a
        random stream of its own) against its slice of the data batch (indexed from the shared
        stream); the gradients are summed, so the ranks keep the same weights. Only rank 0 writes.
        """
        from .. import _distributed as dist

        distributed = dist.is_distributed()
        _positive_int(num_iterations, "num_iterations")
        _positive_int(batch_size, "batch_size", 2)
        _nonnegative_float(lr, "lr", positive=True)
        if checkpoint_every is not None:
            _positive_int(checkpoint_every, "checkpoint_every")
            if checkpoint_path is None:
                raise ValueError("checkpoint_every needs a checkpoint_path")
        data = check_samples(data, "data", self.dim, MIN_SAMPLES)
        dist.check_shardable(batch_size, "batch_size")
        dist.sync_rng_state_()  # distributed: one random stream (rank 0's) for every rank
        state = self._resume if resume else None
        if resume and state is None:
            raise ValueError("resume=True needs a model loaded from a checkpoint of an unfinished fit")
        if state is not None and state["num_iterations"] != num_iterations:
            raise ValueError(f"resume with the checkpoint's num_iterations={state['num_iterations']}")
        first = not self.is_fitted and state is None
        self.to(device=data.device, dtype=data.dtype)
        if first:
            self.shift.copy_(data.mean(0))
            self.scale.fill_(data.var(0).mean().sqrt().clamp_min(1e-12))
            if self.user_prior is None:
                ddp = fit_gaussian(self.standardize(data))
                self.prior_loc.copy_(ddp.loc)
                self.prior_scale_tril.copy_(ddp.scale_tril)
        z_data = self.standardize(data)
        dist.broadcast_parameters_([self])  # the same weights on every rank
        params = [p for p in self.network.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, num_iterations, eta_min=lr * lr_min_fraction)
        ema = None if ema_decay is None else [p.detach().clone() for p in params]
        start = 0
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            with torch.no_grad():  # live weights; the module holds the EMA copy after load
                torch._foreach_copy_(params, [t.to(params[0]) for t in state["params"]])
            if ema is not None:
                ema = [t.to(params[0]).clone() for t in state["ema"]]
            start = state["step"]
            _set_rng_state(state["rng"], data.device)
        rows = dist.shard(batch_size)
        share = (rows.stop - rows.start) / batch_size
        stream_seed = None
        if distributed:  # each rank's loss is its share: the gradients are summed before each step
            opt.register_step_pre_hook(lambda *_: dist.all_reduce_gradients_(params))
            stream_seed = state.get("stream_seed") if state is not None else None
            stream_seed = dist.shared_seed() if stream_seed is None else stream_seed
        done = [] if state is None else list(state["losses"])  # losses of the interrupted part
        losses = torch.empty(num_iterations - start, dtype=data.dtype, device=data.device)
        self.train()
        bar = _progress_bar(num_iterations, initial=start, enabled=progress_bar, desc=type(self).__name__)
        for i in range(start, num_iterations):
            if not distributed:
                z_q = self.flow(self.sample_prior(batch_size), self.num_flow_steps)
                z_p = z_data[torch.randint(z_data.shape[0], (batch_size,), device=z_data.device)]
                loss = self._loss(z_q, z_p, i / num_iterations)
            else:
                z_p = z_data[torch.randint(z_data.shape[0], (batch_size,), device=z_data.device)][rows]
                with dist.rank_stream(stream_seed + i):
                    z_q = self.flow(self.sample_prior(rows.stop - rows.start), self.num_flow_steps)
                    loss = self._loss(z_q, z_p, i / num_iterations) * share
            optimizer_step(loss, opt, sched, ema, params, ema_decay, i)
            losses[i - start] = loss.detach()
            self.iteration += 1
            if progress_bar is not False and (i % 50 == 0 or i == num_iterations - 1):
                bar.update(i + 1, {"loss": f"{loss.item():.4g}"})
            if checkpoint_every is not None and (i + 1) % checkpoint_every == 0 and i + 1 < num_iterations:
                self._resume = dict(optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                                    params=[p.detach().clone() for p in params],
                                    ema=None if ema is None else [t.clone() for t in ema], step=i + 1,
                                    num_iterations=num_iterations, rng=_get_rng_state(data.device),
                                    losses=done + dist.all_reduce_sum(losses[:i + 1 - start]).tolist(),
                                    **({} if stream_seed is None else {"stream_seed": stream_seed}))
                self.save(_format_path(checkpoint_path, i + 1))
                dist.barrier()  # distributed: no rank reads the file before rank 0 has written it
        bar.close()
        self._resume = None
        if ema is not None:
            with torch.no_grad():
                torch._foreach_copy_(params, ema)
        self.eval()
        self.fitted.fill_(True)
        lost = dist.all_reduce_sum(losses).tolist()  # distributed: the shares add up to the batch losses
        self.losses.extend(done + lost)
        if not all(math.isfinite(v) for v in lost[-10:]):
            raise FloatingPointError("FDRL training diverged (non-finite loss); lower lr or step_size")
        if checkpoint_path is not None:
            self.save(_format_path(checkpoint_path, num_iterations))
            dist.barrier()
        return self

    # sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, num_samples: int, *, num_steps: int | None = None, step_size: float | None = None,
               noise_std: float | None = None, classifier: Callable | None = None,
               label: int | torch.Tensor | None = None, guidance_scale: float = 1.0,
               batch_size: int = 4096, return_path: bool = False) -> torch.Tensor:
        """Draw ``(num_samples, d)`` samples (Alg. 2): prior draws pushed ``K + kappa`` flow steps.

        :param int num_steps: flow steps (default ``num_flow_steps + num_refine_steps``).
        :param float step_size: ``eta`` (default: the training value). :param float noise_std: ``nu``.
        :param classifier: ``x (N, d) -> (N, C)`` logits or log-probabilities (data units) for
            class-conditional sampling by composition, ``r(x | y) = r(x) / (C p(y | x))`` (Eq. 12).
        :param label: class index (int) or ``(num_samples,)`` long tensor; needed with ``classifier``.
        :param float guidance_scale: weight of ``log p(y | x)`` in the composition (1: exact).
        :param int batch_size: samples flowed at once (bounds memory).
        :param bool return_path: return ``(num_steps + 1, num_samples, d)`` states instead.
        """
        if not self.is_fitted:
            raise RuntimeError("FlowGuidedGenerator is not fitted; call fit first")
        _positive_int(num_samples, "num_samples")
        _positive_int(batch_size, "batch_size")
        self._check_flow_options(num_steps, step_size, noise_std)
        labels = self._check_label(classifier, label, num_samples)
        out = []
        for start in range(0, num_samples, batch_size):
            n = min(batch_size, num_samples - start)
            lab = None if labels is None else labels[start:start + n]
            z = self.flow(self.sample_prior(n), num_steps, step_size=step_size, noise_std=noise_std,
                          classifier=classifier, label=lab, guidance_scale=guidance_scale,
                          return_path=return_path)
            out.append(z * self.scale + self.shift)
        return torch.cat(out, dim=-2)

    def _check_label(self, classifier, label, num_samples):
        if classifier is None:
            if label is not None:
                raise ValueError("label needs a classifier")
            return None
        if not callable(classifier):
            raise TypeError("classifier must be callable: x (N, d) -> (N, num_classes) logits")
        if label is None:
            raise ValueError("class-conditional sampling needs a label")
        label = torch.as_tensor(label, device=self.shift.device)
        if label.dtype in (torch.bool,) or label.is_floating_point() or label.is_complex():
            raise TypeError(f"label must be an integer class index, got dtype {label.dtype}")
        label = label.long().expand(num_samples) if label.dim() == 0 else label.long()
        if label.shape != (num_samples,):
            raise ValueError(f"label must be an int or have shape ({num_samples},), got {tuple(label.shape)}")
        if bool((label < 0).any()):
            raise ValueError("label must be non-negative")
        return label

    # persistence -----------------------------------------------------------------------------
    def _checkpoint_payload(self) -> dict:
        """:meth:`save` writes the base payload and the fit's progress (optimiser / EMA / RNG state of
        a mid-training checkpoint)."""
        return dict(super()._checkpoint_payload(), iteration=self.iteration, resume=self._resume)

    def _components(self) -> dict:
        prior = self.user_prior
        kind = ("data" if prior is None else f"{type(prior).__name__} distribution"
                if isinstance(prior, torch.distributions.Distribution) else "sampler")
        return dict(super()._components(), prior=kind)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        /,
        map_location: str | torch.device | None = None,
        *,
        network: nn.Module | Callable[[], nn.Module] | None = None,
        prior: torch.distributions.Distribution | Callable[[int], torch.Tensor] | None = None,
    ) -> FlowGuidedGenerator:
        """Rebuild a generator written by :meth:`save` (or by a checkpoint of :meth:`fit`); read with
        ``torch.load(weights_only=True)``, so no pickled code runs. The file holds the options, weights
        (EMA weights for use), data statistics, the data-dependent prior, losses and, mid-training, the
        optimiser / EMA / RNG state to resume; a custom network is stored as its weights and a user
        prior not at all: pass them here.

        :param network: the custom network the generator was built with (an ``nn.Module`` of the same
            architecture, or a function returning one); its saved weights are loaded into it.
        :param prior: the user prior the generator was built with (a Distribution or a sampler); not
            needed for the default ``"data"`` prior, whose parameters are saved.
        """
        ckpt = load_checkpoint(path, kind=cls.__name__, map_location=map_location)
        given = {k: v for k, v in (("network", network), ("prior", prior)) if v is not None}
        gen = cls._from_checkpoint(ckpt.payload, path, given)
        gen.iteration, gen._resume = ckpt.payload["iteration"], ckpt.payload["resume"]
        if gen._resume is not None:  # a mid-training checkpoint: sample with the EMA weights
            if gen._resume["ema"] is not None:
                with torch.no_grad():
                    params = [p for p in gen.network.parameters() if p.requires_grad]
                    torch._foreach_copy_(params, [t.to(params[0]) for t in gen._resume["ema"]])
            gen.fitted.fill_(True)
        return gen

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, loss={self.loss!r}, divergence={self.divergence!r}, "
                f"K={self.num_flow_steps}, eta={self.step_size}, nu={self.noise_std}, "
                f"fitted={self.is_fitted}")
