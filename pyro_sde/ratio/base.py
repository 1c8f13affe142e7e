"""The common density-ratio estimator interface (its networks: :mod:`pyro_sde.nn.ratio_networks`).

Every estimator estimates ``log r(x) = log p_num(x) - log p_den(x)``::

    est = SomeRatioEstimator(dim).fit(x_num, x_den)   # tensors (N, d) or samplers n -> (n, d)
    est.log_ratio(x, num_steps=4)                      # (N,); num_steps = network evaluations (NFE)
    est.losses                                         # training loss per iteration
    est.save("r.pt"); SomeRatioEstimator.load("r.pt")

An estimator is an ``nn.Module`` (``.to(device)``, ``state_dict``); ``fit`` moves it to the device and
dtype of the data. Subclasses implement ``_loss(x_num, x_den, progress)`` (a scalar) and
``_log_ratio(z, num_steps, **kw)`` on standardised inputs ``z``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from .._checkpoint import load_checkpoint, package_version, save_checkpoint
from .._checks import nonnegative_float as _nonnegative_float
from .._checks import positive_int as _positive_int
from .._progress import progress_bar as _progress_bar
from ..nn.ema import ema_update_
from ..nn.ratio_networks import (  # noqa: F401  (re-exported: their old home)
    MLP,
    QuadraticTimeScore,
    TimeScoreNetwork,
    gelu_derivatives,
    make_time_score_network,
    sequential_jets,
    time_jets,
)

if TYPE_CHECKING:
    from .paths import InterpolationPath

__all__ = [
    "RatioEstimator",
    "MLP",
    "TimeScoreNetwork",
    "QuadraticTimeScore",
    "check_samples",
    "sequential_jets",
    "time_jets",
    "MIN_SAMPLES",
]

MIN_SAMPLES = 8  #: fewest samples ``fit`` accepts per side


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------


def check_samples(x: torch.Tensor, name: str, dim: int | None = None, min_samples: int = 1) -> torch.Tensor:
    """Validate a sample matrix: floating, shape ``(N, dim)``, finite, ``N >= min_samples``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or a sampler n -> (n, d), got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (num_samples, dim), got {tuple(x.shape)}")
    if dim is not None and x.shape[-1] != dim:
        raise ValueError(f"{name} has dimension {x.shape[-1]}, expected {dim}")
    if x.shape[0] < min_samples:
        raise ValueError(f"{name} has {x.shape[0]} samples; at least {min_samples} are needed")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def check_fitted(estimator: RatioEstimator) -> None:
    """Raise unless ``estimator`` is a fitted :class:`RatioEstimator`."""
    if not isinstance(estimator, RatioEstimator):
        raise TypeError(f"estimator must be a RatioEstimator, got {type(estimator).__name__}")
    if not estimator.is_fitted:
        raise ValueError("the estimator must be fitted first")


def _check_not_constant(x: torch.Tensor, name: str) -> None:
    """Refuse samples ``(N, d)`` with a constant column: no density there, and standardising by its
    std 0 would blow log ratios up (to ~1e11)."""
    constant = (x.std(0) == 0).nonzero().flatten().tolist()
    if constant:
        raise ValueError(
            f"{name} has constant column(s) {constant} (std 0): a density ratio needs samples with a "
            "density; drop those coordinates or add noise"
        )


def _as_sampler(x, name: str, dim: int, min_samples: int) -> tuple[Callable, torch.Tensor]:
    """A batch function ``n -> (n, dim)`` and one validated probe batch (for device/dtype/statistics)."""
    if callable(x) and not isinstance(x, torch.Tensor):
        probe = check_samples(x(max(min_samples, 1024)), f"{name}(n)", dim, min_samples)

        def sample(n):
            return x(n)

        return sample, probe
    x = check_samples(x, name, dim, min_samples)

    def sample(n):
        return x[torch.randint(x.shape[0], (n,), device=x.device)]

    return sample, x


def _drawer(data, sample, transform):
    """``n ->`` standardised draws for data-dependent initialisation: a sampler's ``n`` fresh draws,
    or (data tensor) all rows when ``n >= N``, else ``n`` distinct rows."""
    if isinstance(data, torch.Tensor):
        def draw(n):
            idx = torch.randperm(data.shape[0], device=data.device)[:n]
            return transform(data[idx])
        return draw
    return lambda n: transform(sample(n))


# --------------------------------------------------------------------------------------------------
# the estimator interface
# --------------------------------------------------------------------------------------------------


def optimizer_step(loss, optimizer, scheduler, ema, params, ema_decay, step) -> None:
    """One training step shared by the ratio and FDRL trainers: backward, Adam step, schedule step and
    (``ema`` not None) the weight average ``ema <- EMA(params)`` (:func:`~pyro_sde.nn.ema.ema_update_`)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()
    if ema is not None:
        ema_update_(ema, params, ema_decay, step)


class RatioEstimator(nn.Module):
    """Base class of the density-ratio estimators ``log r(x) = log p_num(x) / p_den(x)``.

    Inputs are standardised by the denominator's per-coordinate mean and std (``log r`` is invariant
    under a common bijection) unless the estimator uses a fixed ``N(0, I)`` reference (no denominator).

    :param int dim: data dimension ``d``.
    """

    #: whether ``fit`` may be called without a denominator (a standard normal one)
    allows_standard_normal_denominator = False
    #: whether ``fit`` accepts ``validation=`` (early stopping; needs :meth:`_validation_loss`)
    supports_validation = False
    default_num_steps: int | None = None

    _registered: dict[str, type[RatioEstimator]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):
            RatioEstimator._registered[cls.__name__] = cls

    def __init__(self, dim: int):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim = dim
        self.losses: list[float] = []
        self.register_buffer("shift", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("two_sided", torch.ones((), dtype=torch.bool))
        self.validation_losses: list[tuple[int, float]] = []  #: ``(step, loss)`` of the last fit
        self._config = {"dim": dim}

    # subclass hooks --------------------------------------------------------------------------
    def _loss(self, x_num: torch.Tensor, x_den: torch.Tensor | None, progress: float) -> torch.Tensor:
        raise NotImplementedError

    def _log_ratio(self, z: torch.Tensor, num_steps: int | None, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def _validation_loss(self, z_num: torch.Tensor, z_den: torch.Tensor) -> torch.Tensor:
        """A deterministic loss on standardised held-out samples (estimators with ``supports_validation``)."""
        raise NotImplementedError

    def _initialize(self, sample_num: Callable, sample_den: Callable | None) -> None:
        """Data-dependent set-up before the first training step; ``sample_*: n -> (n, d)`` give
        standardised draws (``sample_den`` None without a denominator). Default: nothing."""

    # public ------------------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return bool(self.fitted)

    def standardize(self, x: torch.Tensor) -> torch.Tensor:
        """``z = (x - shift) / scale`` (identity with a standard normal denominator)."""
        return (x - self.shift) / self.scale

    def fit(
        self,
        numerator: torch.Tensor | Callable[[int], torch.Tensor],
        denominator: torch.Tensor | Callable[[int], torch.Tensor] | None = None,
        *,
        num_iterations: int = 2000,
        batch_size: int = 512,
        lr: float = 1e-3,
        lr_schedule: str = "cosine",
        weight_decay: float = 0.0,
        ema_decay: float | None = 0.999,
        standardize: bool = True,
        validation: tuple[torch.Tensor, torch.Tensor] | None = None,
        validation_interval: int = 25,
        stop_after: int | None = None,
        patience: int | None = None,
        progress_bar: bool | None = None,
    ) -> RatioEstimator:
        """Train on samples of ``p_num`` and ``p_den``; calling again continues training.

        :param numerator: ``(N, d)`` tensor of ``p_num`` samples, or a sampler ``n -> (n, d)``.
        :param denominator: the same for ``p_den``; ``None`` means ``N(0, I)`` (time-score estimators only).
        :param int num_iterations: optimiser steps (Adam).
        :param str lr_schedule: ``"cosine"`` (decay to 0 over ``num_iterations``) or ``"constant"`` (suits
            early stopping, where ``num_iterations`` is only a cap).
        :param int batch_size: samples per side and step.
        :param float ema_decay: exponential moving average of the weights used after training (None: off).
        :param bool standardize: standardise by the denominator's mean/std (ignored without denominator).
        :param validation: early stopping (estimators with ``supports_validation``): a pair ``(x_num, x_den)``
            of held-out ``(N, d)`` samples, not trained on. The validation loss of the (averaged) weights is
            evaluated before the first step, every ``validation_interval`` steps and at the end; the weights
            with the lowest one are kept (history in :attr:`validation_losses`).
        :param int stop_after: run only the first ``stop_after`` steps of the ``num_iterations`` schedule
            (None: all); e.g. to repeat an early-stopped run's trajectory on more data.
        :param int patience: with ``validation``, stop once that many validation checks in a row have not
            lowered the best validation loss (None: run the whole schedule); :attr:`losses` then has
            fewer than ``num_iterations`` entries.
        :param progress_bar: ``None`` (default): a bar on a terminal, a few plain lines in a log;
            ``True``: a bar; ``False``: nothing.
        :returns: ``self``.

        Under ``torch.distributed`` each rank trains on its slice of every batch (``batch_size`` is the
        total; data tensors are indexed from the shared random stream, sampler functions are called
        for the rank's share in a stream of its own), the gradients are summed, and the validation
        loss (the samples split over the ranks when their numbers divide evenly) is reduced, so every
        rank takes the same early-stopping decision. With data tensors and a loss that is a mean over
        the samples without random draws of its own (the classifier), a step equals the
        single-process step with the same total batch.
        """
        from .. import _distributed as dist

        distributed = dist.is_distributed()
        self.__dict__.pop("_validation_loss", None)  # a distributed fit's override, if one was interrupted
        _positive_int(num_iterations, "num_iterations")
        _positive_int(batch_size, "batch_size", minimum=2)
        _positive_int(validation_interval, "validation_interval")
        dist.check_shardable(batch_size, "batch_size")
        if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int)
                                       or not 1 <= stop_after <= num_iterations):
            raise ValueError(f"stop_after must be an int in [1, num_iterations] or None, got {stop_after!r}")
        num_run = num_iterations if stop_after is None else stop_after
        if patience is not None:
            _positive_int(patience, "patience")
        if patience is not None and validation is None:
            raise ValueError("patience (early stopping) needs validation=(x_num, x_den)")
        _nonnegative_float(lr, "lr", positive=True)
        _nonnegative_float(weight_decay, "weight_decay")
        if lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {lr_schedule!r}")
        if ema_decay is not None and (isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float))
                                      or not 0 <= ema_decay < 1):
            raise ValueError(f"ema_decay must be in [0, 1) or None, got {ema_decay!r}")
        if validation is not None:
            if not self.supports_validation:
                raise ValueError(f"{type(self).__name__} does not support validation (early stopping)")
            if not isinstance(validation, (tuple, list)) or len(validation) != 2:
                raise TypeError("validation must be a pair (x_num, x_den) of tensors")
            validation = [check_samples(v, f"validation[{i}]", self.dim, 2) for i, v in enumerate(validation)]
        dist.sync_rng_state_()  # distributed: one random stream (rank 0's) for every rank
        sample_num, probe = _as_sampler(numerator, "numerator", self.dim, MIN_SAMPLES)
        if denominator is None:
            if not self.allows_standard_normal_denominator:
                raise ValueError(f"{type(self).__name__} needs denominator samples")
            sample_den, probe_den = None, None
        else:
            sample_den, probe_den = _as_sampler(denominator, "denominator", self.dim, MIN_SAMPLES)
            if probe_den.dtype != probe.dtype or probe_den.device != probe.device:
                raise ValueError("numerator and denominator must share dtype and device")
            _check_not_constant(probe_den, "denominator")
        first = not self.is_fitted
        self.to(device=probe.device, dtype=probe.dtype)
        if first:
            self.two_sided.fill_(denominator is not None)
            if denominator is not None and standardize:
                self.shift.copy_(probe_den.mean(0))
                self.scale.copy_(probe_den.std(0).clamp_min(1e-12))
            den = None if denominator is None else _drawer(denominator, sample_den, self.standardize)
            self._initialize(_drawer(numerator, sample_num, self.standardize), den)
        elif bool(self.two_sided) != (denominator is not None):
            raise ValueError("continue training with the same kind of denominator as the first fit")

        dist.broadcast_parameters_([self])  # the same weights on every rank
        opt = torch.optim.Adam(self.parameters(), lr=lr, weight_decay=weight_decay)
        sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, num_iterations) if lr_schedule == "cosine"
                 else torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0))
        params = [p for p in self.parameters() if p.requires_grad]
        ema = None if ema_decay is None else [p.detach().clone() for p in params]
        monitor = None
        if distributed:  # each rank's loss is its share: the gradients are summed before each step
            opt.register_step_pre_hook(lambda *_: dist.all_reduce_gradients_(params))
            rows, stream_seed = dist.shard(batch_size), dist.shared_seed()
            share = (rows.stop - rows.start) / batch_size
            if validation is not None:
                world = dist.world_size()
                if all(v.shape[0] % world == 0 for v in validation):  # else every rank evaluates them all
                    validation = [v[dist.shard(v.shape[0])] for v in validation]
                rank_validation_loss = self._validation_loss

                def _validation_loss(z_num, z_den):  # the mean over the ranks, the same on every rank
                    return dist.all_reduce_sum(rank_validation_loss(z_num, z_den).detach() / world)

                self._validation_loss = _validation_loss  # this fit only (removed below)
        if validation is not None:
            monitor = _EarlyStopping(self, params, ema, [self.standardize(v.to(probe)) for v in validation])
        losses = torch.empty(num_run, dtype=probe.dtype, device=probe.device)
        self.train()
        bar = _progress_bar(num_run, enabled=progress_bar, desc=type(self).__name__)
        for i in range(num_run):
            if monitor is not None and i % validation_interval == 0:
                monitor.check(i)
                if patience is not None and len(monitor.history) - 1 - monitor.best_index >= patience:
                    losses = losses[:i]  # the weights checked at step i are the last ones
                    break
            if not distributed:
                x_num = self.standardize(sample_num(batch_size))
                x_den = None if sample_den is None else self.standardize(sample_den(batch_size))
                loss = self._loss(x_num, x_den, i / num_iterations)
            else:  # tensors: the whole batch's rows from the shared stream; functions: this rank's share
                drawn = [None if s is None or not isinstance(d, torch.Tensor) else s(batch_size)[rows]
                         for s, d in ((sample_num, numerator), (sample_den, denominator))]
                with dist.rank_stream(stream_seed + i):
                    x_num, x_den = [x if x is not None or s is None else s(rows.stop - rows.start)
                                    for x, s in zip(drawn, (sample_num, sample_den))]
                    x_num = self.standardize(x_num)
                    x_den = None if x_den is None else self.standardize(x_den)
                    loss = self._loss(x_num, x_den, i / num_iterations) * share
            optimizer_step(loss, opt, sched, ema, params, ema_decay, i)
            losses[i] = loss.detach()
            if progress_bar is not False and (i % 100 == 0 or i == num_run - 1):
                bar.update(i + 1, {"loss": f"{loss.item():.4g}"})
        bar.close(None if losses.shape[0] == num_run else f"early stopping after {losses.shape[0]} steps")
        losses = dist.all_reduce_sum(losses)  # distributed: the shares add up to the batch losses
        if monitor is not None:
            if monitor.history[-1][0] != losses.shape[0]:
                monitor.check(losses.shape[0])
            self.validation_losses = monitor.history
            self.__dict__.pop("_validation_loss", None)
            ema = monitor.best
        if ema is not None:
            with torch.no_grad():
                torch._foreach_copy_(params, ema)
        self.eval()
        self.fitted.fill_(True)
        lost = losses.tolist()
        if not all(math.isfinite(v) for v in lost[-10:]):
            raise FloatingPointError("training diverged (non-finite loss); lower lr")
        self.losses.extend(lost)
        return self

    def log_ratio(self, x: torch.Tensor, num_steps: int | None = None, *, chunk_size: int = 65536,
                  **kwargs) -> torch.Tensor:
        """``log r(x) = log p_num(x) - log p_den(x)``; ``x`` ``(..., d) -> (...)``.

        :param int num_steps: network evaluations (NFE) for the time-score estimators; ignored by the
            classifier and TRE (one evaluation).
        :param int chunk_size: points per network batch (bounds memory).
        """
        if not self.is_fitted:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit first")
        x = torch.as_tensor(x)
        if not torch.is_floating_point(x):
            raise TypeError(f"x must have a floating dtype, got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (..., {self.dim}), got {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or infinite values")
        if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int)
                                      or num_steps < 1):
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        batch_shape = x.shape[:-1]
        z = self.standardize(x.reshape(-1, self.dim).to(self.shift.dtype))
        out = [self._log_ratio(c, num_steps, **kwargs) for c in z.split(max(1, chunk_size // max(
            1, num_steps or 1)))] if z.shape[0] else [z.new_zeros(0)]
        return torch.cat(out).reshape(batch_shape).to(x.dtype)

    # persistence -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Save the constructor options, weights, standardisation and losses to ``path`` (atomically,
        with a checksum; tensors and plain values only). Custom networks and paths are saved as their
        weights: :meth:`load` takes the objects again."""
        save_checkpoint(path, self._checkpoint_payload(), kind=type(self).__name__,
                        fingerprint={"dim": self.dim, "package version": package_version()})

    def _checkpoint_payload(self) -> dict:
        return {"config": self._config, "state": self.state_dict(), "losses": list(self.losses),
                "components": self._components()}

    def _components(self) -> dict:
        """Class names of the parts built from constructor objects (``network``, ``path``): a rebuilt
        estimator must have the same ones."""
        out = {}
        if isinstance(getattr(self, "network", None), nn.Module):
            out["network"] = type(self.network).__name__
        if getattr(self, "path", None) is not None:
            out["path"] = type(self.path).__name__
        return out

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        /,
        map_location: str | torch.device | None = None,
        **components: nn.Module | InterpolationPath | Callable[[], nn.Module | InterpolationPath],
    ) -> RatioEstimator:
        """Rebuild an estimator written by :meth:`save` (read with ``torch.load(weights_only=True)``:
        no pickled code runs; a damaged or foreign file raises ``ValueError``).

        :param components: the custom objects the estimator was built with, which are not stored
            (only their weights): ``network=`` (an ``nn.Module`` of the saved architecture, or a
            function returning one) and ``path=`` (an interpolation path). A checkpoint that needs
            one raises a ``ValueError`` naming it.
        """
        kinds = (cls.__name__,) if cls is not RatioEstimator else tuple(_registry())
        ckpt = load_checkpoint(path, kind=kinds, map_location=map_location)
        klass = cls if cls is not RatioEstimator else _registry()[ckpt.kind]
        return klass._from_checkpoint(ckpt.payload, path, components)

    @classmethod
    def _from_checkpoint(cls, payload, path, components):
        """Build ``cls(**config, **components)`` and load the saved weights into it (strictly)."""
        # a network or path may be given as a zero-argument constructor (a class or a function)
        built = {k: v() if k in ("network", "path") and callable(v) and not isinstance(v, nn.Module) else v
                 for k, v in components.items()}
        est = cls(**{**payload["config"], **built})
        saved, rebuilt = payload["components"], est._components()
        wrong = [k for k in sorted(set(saved) | set(rebuilt)) if saved.get(k) != rebuilt.get(k)]
        if wrong:
            raise ValueError(f"{os.fspath(path)!r} was saved with " + "; ".join(
                f"{k}={saved.get(k)} (built from the saved options: {rebuilt.get(k)})" for k in wrong)
                + ": pass " + ", ".join(f"{k}=<a {saved.get(k)} like the saved one>" for k in wrong)
                + " to load")
        state = payload["state"]
        est.to(dtype=state["shift"].dtype, device=state["shift"].device)
        try:
            est.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"the weights in {os.fspath(path)!r} do not fit the estimator built from its "
                             f"options and the objects given to load (another architecture?): {e}") from e
        est.losses = list(payload["losses"])
        est.eval()
        return est

    def extra_repr(self) -> str:
        return f"dim={self.dim}, fitted={self.is_fitted}"


def _registry() -> dict[str, type[RatioEstimator]]:
    """Estimator classes by name (each subclass registers itself when defined)."""
    return RatioEstimator._registered


class _EarlyStopping:
    """Validation loss of the weights ``fit`` would keep (the average, else the live ones); the best copy."""

    def __init__(self, estimator, params, ema, validation):
        self.estimator, self.params, self.ema, self.validation = estimator, params, ema, validation
        self.history: list[tuple[int, float]] = []
        self.best_loss, self.best, self.best_index = math.inf, None, 0

    @torch.no_grad()
    def check(self, step: int) -> None:
        weights = self.params if self.ema is None else self.ema
        live = [p.detach().clone() for p in self.params]
        torch._foreach_copy_(self.params, weights)
        was_training = self.estimator.training
        self.estimator.eval()
        loss = self.estimator._validation_loss(*self.validation).item()
        self.estimator.train(was_training)
        torch._foreach_copy_(self.params, live)
        self.history.append((step, loss))
        if loss < self.best_loss:
            self.best_loss, self.best = loss, [w.detach().clone() for w in weights]
            self.best_index = len(self.history) - 1

