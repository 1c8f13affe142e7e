"""A Pyro model (or a plain log density) as a batched log density on unconstrained ``R^D``.

The learned samplers work on a flat vector ``z`` of all latent sites in unconstrained space. For a Pyro
model, ``log rho(z) = log p(x = T^{-1}(z), y) + log |det dT^{-1}/dz|`` with ``T`` the transforms of
:func:`pyro.infer.mcmc.util.initialize_model` (``biject_to(support).inv``), so ``int rho dz`` is the
model's marginal likelihood ``p(y)``.

Batched evaluation runs the model once under an outer particle plate (vectorised, like
``Predictive(parallel=True)``); at construction this is checked against Pyro's own per-sample
``potential_fn`` and a clear error is raised when the model cannot be vectorised.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide.initialization import InitMessenger, init_to_uniform
from pyro.infer.mcmc.util import initialize_model
from pyro.poutine.subsample_messenger import _Subsample

__all__ = ["Potential", "ModelPotential", "LogDensityPotential"]


class Potential:
    """Interface: a log density on ``R^dim`` with a map back to (constrained) sample sites.

    Attributes: ``dim``, ``dtype``, ``device``, ``site_shapes`` (dict name -> constrained shape),
    ``initial_params`` (a point ``(dim,)`` where the density is finite).
    """

    dim: int
    dtype: torch.dtype
    device: torch.device
    site_shapes: dict
    initial_params: torch.Tensor

    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        """``log rho(z)`` for ``z`` of shape ``(..., dim)``; returns ``(...)``."""
        raise NotImplementedError

    def constrain(self, z: torch.Tensor) -> dict:
        """Map ``z`` (N, dim) to a dict site -> constrained values ``(N, *site_shape)``."""
        raise NotImplementedError

    def log_density_and_score(self, z: torch.Tensor, *, create_graph: bool = False):
        """``(log rho(z), grad_z log rho(z))``; with ``create_graph`` the score stays differentiable."""
        with torch.enable_grad():
            if not z.requires_grad:
                z = z.detach().requires_grad_()
            log_rho = self.log_density(z)
            (score,) = torch.autograd.grad(log_rho.sum(), z, create_graph=create_graph)
        return log_rho, score

    def score(self, z: torch.Tensor, *, create_graph: bool = False) -> torch.Tensor:
        """``grad_z log rho(z)``, shape of ``z`` (subclasses with a closed form skip the log density)."""
        return self.log_density_and_score(z, create_graph=create_graph)[1]

    def _check_z(self, z):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"expected a tensor, got {type(z).__name__}")
        if z.dim() == 0 or z.shape[-1] != self.dim:
            raise ValueError(f"expected a tensor of shape (..., {self.dim}), got {tuple(z.shape)}")


class LogDensityPotential(Potential):
    """A plain batched log density ``log_density(z: (N, dim)) -> (N,)`` as a potential with one site.

    :param callable log_density: unnormalised log density, batched over leading dims.
    :param int dim: dimension of ``z``.
    :param str site_name: the name of the single site in samples (default ``"x"``).
    :param callable score: optional ``grad log_density`` ``(N, dim) -> (N, dim)`` (e.g. a closed form),
        used instead of autograd; checked against autograd at two points.
    """

    def __init__(
        self,
        log_density: Callable,
        dim: int,
        *,
        site_name: str = "x",
        dtype: torch.dtype | None = None,
        device=None,
        initial_params: torch.Tensor | None = None,
        score: Callable | None = None,
    ):
        if score is not None and not callable(score):
            raise TypeError(f"score must be callable, got {type(score).__name__}")
        if not callable(log_density):
            raise TypeError(f"log_density must be callable, got {type(log_density).__name__}")
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self._fn = log_density
        self.dim = dim
        self.dtype = dtype or torch.get_default_dtype()
        self.device = torch.device(device) if device is not None else torch.get_default_device()
        self.site_shapes = {site_name: (dim,)}
        self._site_name = site_name
        if initial_params is None:
            initial_params = torch.zeros(dim, dtype=self.dtype, device=self.device)
        self.initial_params = initial_params
        probe = torch.stack([initial_params, initial_params])
        out = self._fn(probe)
        if not isinstance(out, torch.Tensor) or out.shape != (2,):
            raise ValueError(
                "log_density must map a batch (N, dim) to (N,); on a batch of 2 it returned "
                f"{getattr(out, 'shape', type(out).__name__)}"
            )
        self._score = score
        if score is not None:
            probe = torch.stack([initial_params, initial_params + 0.5])
            given = score(probe)
            if not isinstance(given, torch.Tensor) or given.shape != probe.shape:
                raise ValueError(f"score must map (N, dim) to (N, dim), got {getattr(given, 'shape', given)}")
            self._score = None
            _, expected = self.log_density_and_score(probe)
            if not torch.allclose(given, expected, rtol=1e-3, atol=1e-4):
                raise ValueError(
                    "score does not match the gradient of log_density: "
                    f"{given.tolist()} vs {expected.tolist()}"
                )
            self._score = score

    def log_density_and_score(self, z: torch.Tensor, *, create_graph: bool = False):
        if self._score is None:
            return super().log_density_and_score(z, create_graph=create_graph)
        self._check_z(z)
        return self.log_density(z), self.score(z)

    def score(self, z: torch.Tensor, *, create_graph: bool = False) -> torch.Tensor:
        if self._score is None:
            return super().score(z, create_graph=create_graph)
        self._check_z(z)
        return self._score(z.reshape(-1, self.dim)).reshape(z.shape)

    def log_density(self, z):
        self._check_z(z)
        batch = z.shape[:-1]
        return self._fn(z.reshape(-1, self.dim)).reshape(batch)

    def constrain(self, z):
        self._check_z(z)
        return {self._site_name: z}


def _robust_init(init_strategy):
    """``init_strategy`` that also works for sites that cannot be sampled (``ImproperUniform``:
    uniform in ``(-2, 2)`` in unconstrained space) and samples discrete sites (to report them)."""

    def init_fn(site):
        fn = site["fn"]
        if fn.support.is_discrete:
            return fn.sample()
        try:
            return init_strategy(site)
        except NotImplementedError:
            to_constrained = biject_to(fn.support)
            shape = to_constrained.inverse_shape(fn.batch_shape + fn.event_shape)
            return to_constrained(torch.rand(shape) * 4 - 2).detach()

    return init_fn


def _latent_sites(trace):
    return [
        site
        for site in trace.nodes.values()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site["infer"].get("is_auxiliary", False)
        and not isinstance(site["fn"], _Subsample)
    ]


class ModelPotential(Potential):
    """The unconstrained log joint of a Pyro model with its observations, batched.

    :param callable model: a Pyro model with continuous latent sites.
    :param tuple model_args: positional arguments of the model.
    :param dict model_kwargs: keyword arguments of the model.
    :param callable init_strategy: Pyro init strategy for ``initial_params`` (default uniform in
        ``(-2, 2)`` in unconstrained space, as MCMC).
    :param bool vectorize: evaluate batches with one model call under a particle plate (default);
        otherwise loop over the batch with Pyro's ``potential_fn`` (slow; for models that cannot
        be vectorised).
    :param int max_plate_nesting: guessed from a trace when not given.
    """

    def __init__(
        self,
        model: Callable,
        model_args: tuple = (),
        model_kwargs: dict | None = None,
        *,
        init_strategy=init_to_uniform,
        vectorize: bool = True,
        max_plate_nesting: int | None = None,
    ):
        if not callable(model):
            raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
        if not isinstance(model_args, tuple):
            raise TypeError(f"model_args must be a tuple, got {type(model_args).__name__}")
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if not isinstance(model_kwargs, dict):
            raise TypeError(f"model_kwargs must be a dict, got {type(model_kwargs).__name__}")
        self.model, self.model_args, self.model_kwargs = model, model_args, model_kwargs

        init_fn = _robust_init(init_strategy)
        try:
            with poutine.block():
                trace = poutine.trace(InitMessenger(init_fn)(model)).get_trace(
                    *model_args, **model_kwargs
                )
        except ValueError as e:
            if "nan" in str(e).lower():
                raise ValueError(
                    f"the model's log density is not finite (NaN) at its initial point: {e}"
                ) from e
            raise ValueError(f"running the model with the given arguments failed: {e}") from e
        except (TypeError, AttributeError) as e:  # typically an argument of the wrong type
            raise TypeError(
                f"running the model with the given arguments failed (check the argument types): {e}"
            ) from e
        except Exception as e:
            raise type(e)(f"running the model with the given arguments failed: {e}") from e
        latents = _latent_sites(trace)
        if not latents:
            raise ValueError(
                "the model has no latent sample sites: there is nothing to sample "
                "(its evidence is just its likelihood)"
            )
        discrete = [s["name"] for s in latents if s["fn"].support.is_discrete]
        if discrete:
            raise ValueError(
                f"discrete latent sites are not supported: {discrete}. Marginalise them out "
                "(e.g. with a mixture distribution) or condition on them."
            )
        if max_plate_nesting is None:
            dims = [f.dim for s in trace.nodes.values() if s["type"] == "sample"
                    for f in s["cond_indep_stack"] if f.vectorized]
            batch_dims = [len(s["fn"].batch_shape) for s in trace.nodes.values()
                          if s["type"] == "sample" and not isinstance(s["fn"], _Subsample)]
            max_plate_nesting = max([-min(dims) if dims else 0] + batch_dims)
        self.max_plate_nesting = max_plate_nesting

        try:
            init, self._potential_fn, self.transforms, _ = initialize_model(
                model, model_args, model_kwargs,
                max_plate_nesting=max_plate_nesting, init_strategy=init_fn,
            )
        except ValueError as e:
            if "cannot find valid initial params" not in str(e):
                raise
            raise ValueError(
                "the model's log density (or its gradient) is not finite at any of 100 initial "
                "points: check for NaN-producing operations, invalid parameters or observations "
                "outside the support"
            ) from e

        self._names = [s["name"] for s in latents]
        self._unconstrained_shapes = {n: tuple(init[n].shape) for n in self._names}
        self.site_shapes = {s["name"]: tuple(s["value"].shape) for s in latents}
        self._batch_ndim = {s["name"]: len(s["fn"].batch_shape) for s in latents}
        self._sizes = [math.prod(self._unconstrained_shapes[n]) for n in self._names]
        self.dim = sum(self._sizes)
        first = init[self._names[0]]
        self.dtype, self.device = first.dtype, first.device
        self.initial_params = torch.cat([init[n].reshape(-1) for n in self._names]).detach()
        self.vectorize = vectorize
        if vectorize:
            self._validate_vectorized()

    # -- packing -------------------------------------------------------------------------------
    def _unpack(self, z):
        """Flat ``(N, dim)`` -> dict of unconstrained ``(N, *shape)``."""
        out, offset = {}, 0
        for name, size in zip(self._names, self._sizes):
            out[name] = z[:, offset : offset + size].reshape(
                (z.shape[0],) + self._unconstrained_shapes[name]
            )
            offset += size
        return out

    def constrain(self, z):
        self._check_z(z)
        batch = z.shape[:-1]
        unc = self._unpack(z.reshape(-1, self.dim))
        return {
            n: self.transforms[n].inv(u).reshape(batch + self.site_shapes[n]) for n, u in unc.items()
        }

    # -- log density ---------------------------------------------------------------------------
    def log_density(self, z):
        self._check_z(z)
        batch = z.shape[:-1]
        flat = z.reshape(-1, self.dim)
        if self.vectorize:
            out = self._log_density_vectorized(flat)
        else:
            out = torch.stack([self._log_density_single(zi) for zi in flat])
        return out.reshape(batch)

    def _log_density_vectorized(self, z):
        N, P = z.shape[0], self.max_plate_nesting
        values, log_jacobian = {}, z.new_zeros(N)
        for name, u in self._unpack(z).items():
            to_constrained = self.transforms[name].inv
            x = to_constrained(u)
            ldj = to_constrained.log_abs_det_jacobian(u, x)
            log_jacobian = log_jacobian + ldj.reshape(N, -1).sum(-1)
            pad = (1,) * (P - self._batch_ndim[name])
            values[name] = x.reshape((N,) + pad + self.site_shapes[name])

        def particle_model(*args, **kwargs):
            with pyro.plate("_pyro_sde_particles", N, dim=-(P + 1)):
                return self.model(*args, **kwargs)

        # As in Pyro's MCMC, no argument validation on the hot path: states far in the tails give
        # -inf/NaN log densities (dropped by the samplers) instead of exceptions.
        with poutine.block(), pyro.validation_enabled(False):
            trace = poutine.trace(poutine.condition(particle_model, values)).get_trace(
                *self.model_args, **self.model_kwargs
            )
            trace.compute_log_prob()
        log_joint = z.new_zeros(N)
        for site in trace.nodes.values():
            if site["type"] == "sample":
                lp = site["log_prob"]
                if lp.dim() > P + 1 or (lp.dim() == P + 1 and lp.shape[0] not in (1, N)):
                    raise ValueError(f"site {site['name']!r} broke the particle plate: {tuple(lp.shape)}")
                num_particles = lp.shape[0] if lp.dim() == P + 1 else 1
                log_joint = log_joint + lp.reshape(num_particles, -1).sum(-1)
        return log_joint + log_jacobian

    def _log_density_single(self, z):
        """Pyro's own ``-potential_fn`` at one point ``z`` (dim,)."""
        return -self._potential_fn({n: u[0] for n, u in self._unpack(z[None]).items()})

    def _validate_vectorized(self, num_points: int = 3):
        gen = torch.Generator(device="cpu").manual_seed(0)
        noise = torch.randn(num_points, self.dim, generator=gen).to(self.dtype).to(self.device)
        z = self.initial_params + 0.5 * noise
        z[0] = self.initial_params
        hint = (
            "The model could not be evaluated on a batch of particles. Make it vectorisable "
            "(declare batch dimensions with pyro.plate(..., dim=...), use .to_event() for vector "
            "sites, index with [..., i] and reduce with dim=-1), or pass vectorize=False (slow)."
        )
        try:
            batched = self._log_density_vectorized(z).detach()
        except Exception as e:  # noqa: BLE001 - re-raised with advice
            raise ValueError(f"{hint} Error: {e}") from e
        exact = torch.stack([self._log_density_single(zi).detach() for zi in z])
        if not torch.allclose(batched, exact, rtol=1e-4, atol=1e-4 * (1 + exact.abs().max().item())):
            raise ValueError(
                f"{hint} Batched log density {batched.tolist()} != per-sample {exact.tolist()}."
            )
