"""``lbfgs_map``: the MAP point of a Pyro model by L-BFGS, for smooth deterministic objectives.

A :class:`~pyro_sde.sde.DiscretelyObservedSDE` with a fixed ``seed`` (common random numbers) has a
likelihood estimate that is a smooth deterministic function of the SDE parameters; quasi-Newton
optimisation then converges in a few dozen evaluations, where SVI with Adam needs hundreds of noisy steps.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pyro
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDelta
from pyro.infer.autoguide.initialization import init_to_median, init_to_uniform

__all__ = ["lbfgs_map"]


#: starts tried before giving up: the prior median, then random points like Pyro's ``init_to_uniform``
_MAX_INIT_ATTEMPTS = 20


def _random_start(init_values: dict, init_loc_fn: Callable) -> Callable:
    """Given sites at their ``init_values``, the others uniform in ``(-2, 2)`` unconstrained."""

    def loc_fn(site):
        return init_loc_fn(site) if site["name"] in init_values else init_to_uniform(site)

    return loc_fn


def lbfgs_map(
    model: Callable,
    *args,
    init_values: dict | None = None,
    max_iter: int = 50,
    tolerance_grad: float = 1e-6,
    ignore_warnings: tuple[str, ...] = ("SDE parameters moved far",),
    **kwargs,
) -> dict[str, torch.Tensor]:
    """Maximise ``log p(theta, y)`` over the latent sites of ``model(*args, **kwargs)`` by L-BFGS.

    The objective is Pyro's ``Trace_ELBO().differentiable_loss`` under an ``AutoDelta`` guide (the
    negative log joint at the guide's point, in unconstrained coordinates), minimised with a strong-Wolfe
    line search. Clears the param store. Trial points of the search are evaluated with Pyro validation
    off, and a non-finite objective (or gradient) there counts as a huge loss, so the search backtracks
    out of NaN regions; an optimum that ends non-finite raises ``FloatingPointError``.

    :param init_values: starting values ``{site: constrained value}`` (tensors fix dtype and device;
        Python numbers take torch's default dtype); sites not given start at the prior median, or, where
        the log joint is not finite there (or fails validation), at random points uniform in ``(-2, 2)``
        unconstrained (up to 20 starts; then a ``ValueError``).
    :param int max_iter: L-BFGS iterations (each evaluates the model about 1.25 times on average).
    :param float tolerance_grad: stop when the largest gradient entry is below this.
    :param ignore_warnings: message prefixes silenced during the search (line-search trial points can
        fall far from where a learned bridge was fitted).
    :returns: ``{site: MAP value}`` (constrained, detached).
    """
    if not callable(model):
        raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if isinstance(tolerance_grad, bool) or not isinstance(tolerance_grad, (int, float)) or not (
        0 <= tolerance_grad < math.inf
    ):
        raise ValueError(f"tolerance_grad must be a non-negative finite number, got {tolerance_grad!r}")
    if init_values is not None and not isinstance(init_values, dict):
        raise TypeError(f"init_values must be a dict {{site: value}}, got {type(init_values).__name__}")
    init_values = dict(init_values or {})

    def init_loc_fn(site):
        if site["name"] not in init_values:
            return init_to_median(site)
        value = torch.as_tensor(init_values[site["name"]], dtype=None)
        return value.expand(site["fn"].shape())  # a scalar for a batched site; raises if incompatible

    loss_fn = Trace_ELBO().differentiable_loss
    first_error, messages = None, set()
    for attempt in range(_MAX_INIT_ATTEMPTS):  # then random starts, as Pyro's MCMC initialisation does
        start = init_loc_fn if attempt == 0 else _random_start(init_values, init_loc_fn)
        pyro.clear_param_store()
        guide = AutoDelta(model, init_loc_fn=start)
        try:
            with pyro.poutine.trace(param_only=True) as tr:
                initial_loss = loss_fn(model, guide, *args, **kwargs)
        except ValueError as error:  # a validation error at a bad start (NaN factor, out of support)
            first_error = first_error or error
            messages.add(str(error))
            continue
        if torch.isfinite(initial_loss):
            break
        first_error = first_error or ValueError(
            f"the negative log joint is {initial_loss.item()} at the initial point"
        )
    else:
        if messages == {str(first_error)}:  # the same error from every start: not the start's fault
            raise first_error
        raise ValueError(
            f"lbfgs_map: no finite starting point in {_MAX_INIT_ATTEMPTS} tries (the prior median, then "
            f"uniform in (-2, 2) unconstrained); the first: {first_error}; give init_values"
        ) from first_error
    unknown = set(init_values) - {name for name in guide.prototype_trace.nodes}
    if unknown:
        raise ValueError(f"init_values names sites the model does not have: {sorted(unknown)}")
    params = [site["value"].unconstrained() for site in tr.trace.nodes.values()]
    optimizer = torch.optim.LBFGS(
        params, max_iter=max_iter, tolerance_grad=tolerance_grad, line_search_fn="strong_wolfe"
    )

    # a finite stand-in for a non-finite objective: far above any loss seen, small enough that the
    # line search's cubic interpolation does not overflow
    penalty = abs(initial_loss.item()) + 1e10

    def closure():
        optimizer.zero_grad()
        with pyro.validation_enabled(False):  # a NaN trial point is a bad point, not an error
            loss = loss_fn(model, guide, *args, **kwargs)
        if torch.isfinite(loss):
            loss.backward()
            if all(p.grad is None or torch.isfinite(p.grad).all() for p in params):
                return loss
        for p in params:  # backtrack: a huge loss with no slope
            p.grad = torch.zeros_like(p)
        return loss.detach().new_tensor(penalty)

    with warnings.catch_warnings():
        for message in ignore_warnings:
            warnings.filterwarnings("ignore", message, UserWarning)
        warnings.filterwarnings("ignore", "Encountered NaN", UserWarning)  # handled by the closure
        optimizer.step(closure)
        with torch.no_grad(), pyro.validation_enabled(False):
            final_loss = loss_fn(model, guide, *args, **kwargs)
    if not (torch.isfinite(final_loss) and all(torch.isfinite(p).all() for p in params)):
        raise FloatingPointError(
            f"lbfgs_map ended at a point where the negative log joint is {final_loss.item()}: the model's "
            "log density is not finite there (a NaN region); try other init_values or fewer max_iter"
        )
    return {name: value.detach() for name, value in guide.median(*args, **kwargs).items()}
