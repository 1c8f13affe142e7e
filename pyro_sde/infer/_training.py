"""The training run shared by the learned samplers (:class:`DiffusionSampler`, :class:`SCLDSampler`).

:class:`TrainedSampler` holds what does not depend on the sampler's mathematics: the optimiser and the
EMA copies of the networks, the run budget (iterations, time, the ``until`` stopping rule), failed
steps, the progress bar, and checkpoints (save / load / resume). A subclass provides

* ``step(batch_size) -> StepInfo``: one optimisation step (``FloatingPointError`` when it fails);
* ``_evaluate(num_paths) -> (ess, pareto_k)``: the importance weights of a fresh draw;
* ``_nets()``: the trained networks; ``_setup_potential(args, kwargs)``; ``_target`` (with ``dim``);
* ``_config``: the constructor's options (what :meth:`load` rebuilds the sampler from);
* ``_checkpoint_extra() -> dict`` and ``_load_checkpoint_extra(extra)`` for what else its checkpoints
  hold (plain values and tensors, e.g. adapted MCMC step sizes).
"""

from __future__ import annotations

import copy
import math
import os
import re
import time
import warnings
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from torch.distributions import constraints

from .. import _distributed as dist
from .. import diagnostics
from .._checkpoint import check_fingerprint, load_checkpoint, package_version, save_checkpoint
from .._checks import positive_float, positive_int
from .._progress import progress_bar as _progress_bar
from ..nn.ema import ema_update_

__all__ = ["StepInfo", "TrainedSampler"]


class StepInfo(NamedTuple):
    """What one training step saw on its batch."""

    loss: float  #: the loss value (scaled by 1 / dim)
    log_z_lower_bound: float  #: batch mean of ``log w`` (an ELBO-type bound on ``log Z``)
    ess: float  #: normalised ESS of the batch's weights (under the behaviour control)
    num_dropped: int  #: paths dropped from the loss for a non-finite log weight


class TrainedSampler:
    """Optimiser, EMA, run budget, stopping rule and checkpoints of a learned sampler (see the module)."""

    default_num_iterations = 3000
    converged_ess = 0.9
    patience = 4
    min_reliable_ess = 0.1  #: a run whose last check is below this ESS ends with a warning
    #: whether ``step`` splits its batch over ``torch.distributed`` ranks (each loss a share)
    supports_distributed = False

    def _init_training(self, *, lr: float, grad_clip, final_lr_fraction: float, ema_decay):
        """Check and store the optimisation options (called by the subclass's constructor)."""
        self.lr = positive_float(lr, "lr")
        self.final_lr_fraction = positive_float(final_lr_fraction, "final_lr_fraction")
        if self.final_lr_fraction > 1:
            raise ValueError("final_lr_fraction must be in (0, 1]")
        self.grad_clip = None if grad_clip is None else positive_float(grad_clip, "grad_clip")
        if ema_decay is not None and not (isinstance(ema_decay, float) and 0 <= ema_decay < 1):
            raise ValueError(f"ema_decay must be a float in [0, 1) or None, got {ema_decay!r}")
        self.ema_decay = ema_decay
        self.optimizer = None
        self._ema_nets: list[torch.nn.Module] | None = None
        self._ema_updates = 0
        self._run_state: dict | None = None  # progress of the current run (for checkpoints / resume)
        self._pending_state: dict | None = None  # state loaded from a checkpoint, applied at set-up
        self._resume_rng = None
        self._checkpoint_path: str | None = None  # the file resume() checkpoints to by default
        self._saved_fingerprint: dict | None = None  # of the loaded checkpoint, checked at set-up
        self.losses: list[float] = []
        self.history: list[StepInfo] = []
        self.eval_history: list[tuple[int, float, float]] = []  # (iteration, ESS, Pareto k) of run checks

    # ----------------------------------------------------------------------------------------
    # networks, optimiser, EMA
    def _check_saved_fingerprint(self):
        """Before the Gaussian fit: refuse a checkpoint of another model early."""
        if self._pending_state is not None and self._saved_fingerprint is not None:
            check_fingerprint(self._saved_fingerprint, self._fingerprint(), source=self._checkpoint_path)

    def _setup_optimizer(self):
        """Adam and the EMA copies for the networks (once); then a pending checkpoint's state."""
        if self.optimizer is None:
            self.optimizer = torch.optim.Adam(self._parameters(), lr=self.lr)
        if self.ema_decay is not None and self._ema_nets is None:
            self._ema_nets = [copy.deepcopy(net).requires_grad_(False) for net in self._nets()]
        if self._pending_state is not None:
            self._load_state(self._pending_state)
            self._pending_state = None

    def _parameters(self):
        return [q for net in self._nets() for q in net.parameters()]

    def _sampling_networks(self) -> list[torch.nn.Module]:
        """The networks that draw samples: the EMA copies when enabled."""
        return self._ema_nets if self._ema_nets is not None else self._nets()

    @torch.no_grad()
    def _update_ema(self):
        if self._ema_nets is None:
            return
        self._ema_updates += 1
        ema = [q for net in self._ema_nets for q in net.parameters()]
        live = [q for net in self._nets() for q in net.parameters()]
        ema_update_(ema, live, self.ema_decay, self._ema_updates)

    def _optimizer_step(self, loss: torch.Tensor):
        """Backward, clip, step and EMA; a non-finite gradient norm skips the update and raises."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        dist.all_reduce_gradients_(self._parameters())  # distributed: each rank's loss is its share
        max_norm = math.inf if self.grad_clip is None else self.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(self._parameters(), max_norm)
        if not torch.isfinite(grad_norm):  # skip the update: NaN gradients would poison the weights
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"non-finite gradient norm {float(grad_norm)}")
        self.optimizer.step()
        self._update_ema()

    # ----------------------------------------------------------------------------------------
    # the run
    def run(
        self,
        *args,
        num_iterations: int | None = None,
        batch_size: int | None = None,
        max_time: float | None = None,
        until: str | float | None = "converged",
        eval_every: int = 25,
        eval_batch_size: int = 1024,
        progress_bar: bool | None = None,
        max_failed_steps: int = 20,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 100,
        **kwargs,
    ) -> TrainedSampler:
        """Train; ``args``/``kwargs`` go to the model. Returns ``self``.

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
        ``progress_bar``: ``None`` (default) shows a bar on a terminal and a few plain lines in a log,
        ``True`` always a bar, ``False`` nothing.
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
        self,
        *args,
        progress_bar: bool | None = None,
        checkpoint: str | os.PathLike | Literal[False] | None = "same",
        checkpoint_every: int | None = None,
        **kwargs,
    ) -> TrainedSampler:
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
        if dist.is_distributed() and not self.supports_distributed:
            raise NotImplementedError(f"{type(self).__name__} does not run under torch.distributed yet")
        state = self._run_state
        self.eval_history = state["eval_history"]
        clock = time.perf_counter()
        if checkpoint is not None:
            positive_int(checkpoint_every, "checkpoint_every")
            checkpoint = os.fspath(checkpoint)
            state["checkpoint_every"] = checkpoint_every
        self._checkpoint_path = checkpoint  # where resume(checkpoint="same") continues
        self._new_results()
        scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, state["gamma"])
        failed, last_error = 0, None
        bar = _progress_bar(
            state["total"], initial=state["done"], enabled=progress_bar, desc=self._progress_desc
        )
        for i in range(state["done"], state["total"]):
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
            if state["max_time"] is not None:
                out_of_time = dist.agree(out_of_time)  # rank 0's clock decides for every rank
            if state["stopped"] is None and out_of_time:
                state["stopped"] = f"max_time ({state['max_time']:g} s)"
            last = state["stopped"] is not None or i + 1 == state["total"]
            if checkpoint is not None and (state["done"] % checkpoint_every == 0 or last):
                self.save(checkpoint)
                dist.barrier()  # distributed: no rank reads the file before rank 0 has written it
            postfix = None
            if info is not None and (i % 10 == 0 or last):
                postfix = dict(
                    loss=f"{info.loss:.3g}", elbo=f"{info.log_z_lower_bound:.3g}", failed=state["failed"]
                )
                if self.eval_history:
                    postfix.update(ess=f"{self.eval_history[-1][1]:.3f}", k=f"{self.eval_history[-1][2]:.2f}")
                else:
                    postfix.update(batch_ess=f"{info.ess:.2f}")
            bar.update(state["done"], postfix)
            if state["stopped"] is not None:
                break
        bar.close(state["stopped"])
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

    # ----------------------------------------------------------------------------------------
    # checkpoints
    def save(self, path: str | os.PathLike) -> None:
        """Write the sampler's state (configuration, weights, EMA, optimiser, run progress, losses and
        the random state) to ``path``, atomically, with a checksum and the fingerprint of the model
        (latent sites with shapes and supports, dim, method, package version) that :meth:`load`
        checks. The model and its data are not saved. Only tensors and plain values are written.
        Under ``torch.distributed`` only rank 0 writes (every rank may call it)."""
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
            extra=self._checkpoint_extra(),
        )
        save_checkpoint(path, state, kind=type(self).__name__, fingerprint=self._fingerprint())

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
        path: str | os.PathLike,
        model: Callable | None = None,
        *,
        log_density: Callable | None = None,
        map_location: str | torch.device | None = None,
        **overrides: Any,
    ) -> TrainedSampler:
        """Rebuild a sampler saved with :meth:`save`: give the same ``model`` (then call
        :meth:`resume` or :meth:`setup` with its arguments) or ``log_density``, and the custom
        networks if the saved sampler had them (``control=``, ``backward_control=``). ``overrides``
        replace saved options that do not change the networks (e.g. ``backend``, ``init_strategy``).

        The file is read with ``torch.load(weights_only=True)`` (no pickled code runs) and refused
        with a ``ValueError`` when it is not a checkpoint of this class, is damaged (checksum) or
        belongs to another model (checked when the model is bound: here for ``log_density``, at
        :meth:`setup` / :meth:`resume` for a model). :meth:`resume` keeps checkpointing to ``path``."""
        from .precondition import Preconditioner

        ckpt = load_checkpoint(path, kind=cls.__name__, map_location=map_location)
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
        sampler = cls(model, log_density=log_density, **config)
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
        self._load_checkpoint_extra(state.get("extra") or {})

    def _checkpoint_extra(self) -> dict:
        """What else a checkpoint holds (plain values and tensors); restored by
        :meth:`_load_checkpoint_extra`."""
        return {}

    def _load_checkpoint_extra(self, extra: dict) -> None:
        """Restore what :meth:`_checkpoint_extra` saved."""


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
        if dist.is_distributed():  # the ranks share one stream, each on its own device
            state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state["cpu"].cpu())  # a checkpoint loaded with map_location may hold it elsewhere
    if "cuda_device" in state and torch.cuda.is_available() and dist.is_distributed():
        torch.cuda.set_rng_state(state["cuda_device"].cpu())  # rank 0's stream, on this rank's device
    elif "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.cpu() for t in state["cuda"]])


def _support_name(constraint) -> str:
    """A short name of a support: ``"real"``, ``"greater_than(lower_bound=0.0)"``, ``"simplex"``, ..."""
    while isinstance(constraint, constraints.independent):
        constraint = constraint.base_constraint
    name = re.sub(r"(?<!^)(?=[A-Z])", "_", type(constraint).__name__.lstrip("_")).lower()
    params = [f"{k}={v!r}" for k, v in vars(constraint).items()
              if not k.startswith("_") and isinstance(v, (int, float)) and not isinstance(v, bool)]
    return f"{name}({', '.join(params)})" if params else name
