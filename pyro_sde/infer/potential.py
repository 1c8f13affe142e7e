"""A Pyro model (or a plain log density) as a batched log density on unconstrained ``R^D``.

The learned samplers work on a flat vector ``z`` of all latent sites in unconstrained space. For a Pyro
model, ``log rho(z) = log p(x = T^{-1}(z), y) + log |det dT^{-1}/dz|`` with ``T`` the transforms of
:func:`pyro.infer.mcmc.util.initialize_model` (``biject_to(support).inv``), so ``int rho dz`` is the
model's marginal likelihood ``p(y)``.

Batched evaluation runs the model once under an outer particle plate (like
``Predictive(parallel=True)``), or through ``torch.func.vmap`` over the single-sample density, or
(for any model, slowly) in a loop; the first of these that matches Pyro's own per-sample
``potential_fn`` at construction is used (``ModelPotential.vectorize_mode``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.torch_distribution import MaskedDistribution
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

    def log_density_and_score(
        self, z: torch.Tensor, *, create_graph: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
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
        device: torch.device | str | None = None,
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

    def log_density_and_score(
        self, z: torch.Tensor, *, create_graph: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._score is None:
            return super().log_density_and_score(z, create_graph=create_graph)
        self._check_z(z)
        return self.log_density(z), self.score(z)

    def score(self, z: torch.Tensor, *, create_graph: bool = False) -> torch.Tensor:
        if self._score is None:
            return super().score(z, create_graph=create_graph)
        self._check_z(z)
        return self._score(z.reshape(-1, self.dim)).reshape(z.shape)

    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        self._check_z(z)
        batch = z.shape[:-1]
        return self._fn(z.reshape(-1, self.dim)).reshape(batch)

    def constrain(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
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


def _is_masked_out(mask) -> bool:
    """Whether a site mask (``None``, a bool or a bool tensor) masks out some element."""
    if mask is None or mask is True:
        return False
    return not bool(torch.as_tensor(mask).all())


def _masked_latents(latents) -> list[str]:
    """Latent sites with masked-out elements (``poutine.mask``, ``obs_mask``, ``.mask()``): their density
    there is missing, an improper flat direction unless the likelihood happens to pin it down."""
    masked = []
    for site in latents:
        fn, mask_out = site["fn"], _is_masked_out(site["mask"])
        while not mask_out and fn is not None:
            mask_out = isinstance(fn, MaskedDistribution) and _is_masked_out(fn._mask)
            fn = getattr(fn, "base_dist", None)
        if mask_out:
            masked.append(site["name"])
    return masked


def _refuse_unsupported(trace, latents) -> None:
    """``ValueError`` for models whose importance weights and evidence would be meaningless here:
    masked latent sites (``obs_mask`` imputation) and plate subsampling."""
    subsampled = [
        f"{s['name']!r} ({s['fn'].subsample_size} of {s['fn'].size})"
        for s in trace.nodes.values()
        if s["type"] == "sample"
        and isinstance(s["fn"], _Subsample)
        and s["fn"].subsample_size is not None
        and s["fn"].subsample_size < s["fn"].size
    ]
    if subsampled:
        raise ValueError(
            f"plate subsampling is not supported: plate {', '.join(subsampled)}. The samplers weight "
            "every particle by the full-data log density (and estimate the full-data evidence); a "
            "subsample gives a noisy, rescaled likelihood that biases both. Use the full data (drop "
            "subsample_size), or subsample outside the model."
        )
    masked = _masked_latents(latents)
    if masked:
        suffix = "_unobserved"  # obs_mask splits a site into name_observed / name_unobserved
        imputed = [n for n in masked if n.endswith(suffix) and n[: -len(suffix)] + "_observed" in trace.nodes]
        how = (
            f"pyro.sample(..., obs_mask=...) makes the missing values latent ({imputed}) with a density "
            "that is masked where the data are observed"
            if imputed
            else "poutine.mask / .mask() removes their density where the mask is False"
        )
        raise ValueError(
            f"latent sites {masked} are masked: {how}. The masked elements are improper flat directions "
            "for this sampler, so its importance weights, samples and log evidence are meaningless. "
            "Sample only the missing entries as their own latent site (e.g. pyro.sample('y_missing', "
            "dist.Normal(loc[~mask], scale).to_event(1))) and observe the rest, or drop the missing data."
        )


_MODES = ("plate", "vmap", "sequential")
# errors a model raises at an extreme point (invalid parameter, failed Cholesky, ...): that point gets -inf
_MODEL_ERRORS = (ValueError, RuntimeError, AssertionError, ArithmeticError)
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", ())
_NUM_PROBE_POINTS = 5
_QUOTED_BATCH = 256  # the batch size the sequential warning quotes its slowdown for
_VECTORIZE_HINT = (
    "make the model vectorisable: declare batch dimensions with pyro.plate(..., dim=...), use "
    ".to_event() for vector sites, index with [..., i] and reduce with dim=-1 (plate); or avoid Python "
    "control flow and conversions on sampled values (if x > 0, x.item(), float(x), torch.tensor([x])) "
    "so that torch.func.vmap can batch it"
)
_logger = logging.getLogger(__name__)


def _vectorize_request(vectorize) -> str:
    if vectorize is True:
        return "plate"
    if vectorize is False:
        return "sequential"
    if isinstance(vectorize, str) and vectorize in ("auto",) + _MODES:
        return vectorize
    raise ValueError(
        f"vectorize must be 'auto', 'plate', 'vmap', 'sequential', True or False, got {vectorize!r}"
    )


def _failed_log_density(z: torch.Tensor) -> torch.Tensor:
    """``-inf`` for each row of ``z`` (n, dim), still on ``z``'s autograd graph (so its score is 0)."""
    return z[:, :0].sum(-1) - math.inf


def _value_and_score(fn, z):
    """``fn(z)`` (n,) and its gradient ``(n, dim)`` with respect to ``z`` (n, dim), detached."""
    with torch.enable_grad():
        z = z.detach().requires_grad_()
        value = fn(z)
        if not value.requires_grad:  # a density that does not depend on z
            return value.detach(), torch.zeros_like(z)
        (score,) = torch.autograd.grad(value.sum(), z)
    return value.detach(), score.detach()


def _close(value, expected, rtol: float = 1e-4) -> bool:
    """``value ~ expected`` to ``rtol`` relative to the largest finite ``|expected|``; infinities must
    match."""
    if value.shape != expected.shape:
        return False
    finite = torch.isfinite(expected)
    scale = expected[finite].abs().max().item() if finite.any() else 0.0
    return torch.allclose(value, expected, rtol=rtol, atol=rtol * (1 + scale), equal_nan=True)


def _score_rtol(dtype: torch.dtype) -> float:
    """How closely a batched score must match the per-sample one: 1e-4, or 3e-2 below float64, where an
    ill-conditioned step amplifies rounding (a float32 GP classifier's Cholesky: 1 % apart, values equal
    to 1e-7) and a batching mistake still shows as an O(1) difference."""
    return 1e-4 if torch.finfo(dtype).eps < 1e-10 else 3e-2


def _short(error: Exception, limit: int = 300) -> str:
    """One line ``Type: message``, without the table of shapes Pyro appends."""
    text = " ".join(f"{type(error).__name__}: {error}".split("Trace Shapes:")[0].split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _quiet_nan():
    """Silence Pyro's "Encountered NaN" warnings while set-up probes points of the model's choosing:
    Pyro's initial-point search retries such points and the probes compare NaN with NaN."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Encountered NaN", category=UserWarning)
        yield


class ModelPotential(Potential):
    """The unconstrained log joint of a Pyro model with its observations, batched.

    A batch ``z`` (N, dim) is evaluated in one of three ways, ``vectorize_mode``:

    - ``"plate"``: one model call under an outer particle plate (as ``Predictive(parallel=True)``);
    - ``"vmap"``: ``torch.func.vmap`` over the single-sample log density (any model written with
      torch operations: matrix products, ``torch.stack``, Python loops over time...);
    - ``"sequential"``: a Python loop over Pyro's ``potential_fn`` (any model; slow).

    A vectorised path is used only if its log density and score match Pyro's per-sample
    ``potential_fn`` (and autograd) at 5 points near ``initial_params`` (to 1e-4 of the largest entry;
    the score to 3e-2 below float64, where ill-conditioned steps amplify rounding). If the model raises
    on a batch (``ValueError``, ``RuntimeError``, ``AssertionError``, ``ArithmeticError``: an invalid
    parameter at an extreme point), the batch is bisected and the particles that raise get
    ``log rho = -inf`` (score 0), counted in ``num_model_errors``; a batch where nothing raises costs one
    call.

    :param callable model: a Pyro model with continuous latent sites.
    :param tuple model_args: positional arguments of the model.
    :param dict model_kwargs: keyword arguments of the model.
    :param callable init_strategy: Pyro init strategy for ``initial_params`` (default uniform in
        ``(-2, 2)`` in unconstrained space, as MCMC).
    :param vectorize: ``"auto"`` (default: ``"plate"``, else ``"vmap"``, else ``"sequential"`` with a
        warning that states the measured slowdown), ``"plate"``, ``"vmap"`` (an error if the path does
        not match Pyro's potential), ``"sequential"``; ``True`` / ``False`` mean ``"plate"`` /
        ``"sequential"``.
    :param int max_plate_nesting: guessed from a trace when not given.
    """

    def __init__(
        self,
        model: Callable,
        model_args: tuple = (),
        model_kwargs: dict | None = None,
        *,
        init_strategy: Callable = init_to_uniform,
        vectorize: str | bool = "auto",
        max_plate_nesting: int | None = None,
    ):
        if not callable(model):
            raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
        if not isinstance(model_args, tuple):
            raise TypeError(f"model_args must be a tuple, got {type(model_args).__name__}")
        model_kwargs = {} if model_kwargs is None else model_kwargs
        if not isinstance(model_kwargs, dict):
            raise TypeError(f"model_kwargs must be a dict, got {type(model_kwargs).__name__}")
        request = _vectorize_request(vectorize)
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
        except Exception as e:  # any other type: chained, not rebuilt (its constructor may differ)
            raise RuntimeError(
                f"running the model with the given arguments failed: {type(e).__name__}: {e}"
            ) from e
        latents = _latent_sites(trace)
        if not latents:
            raise ValueError(
                "the model has no latent sample sites: there is nothing to sample "
                "(its evidence is just its likelihood)"
            )
        _refuse_unsupported(trace, latents)
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
            with _quiet_nan():
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
        self.site_supports = {s["name"]: s["fn"].support for s in latents}  # constrained supports
        self.num_model_errors = 0  # particles at which the model raised (log density -inf)
        with _quiet_nan():
            self.vectorize_mode = self._choose_mode(request)

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

    def constrain(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_z(z)
        batch = z.shape[:-1]
        unc = self._unpack(z.reshape(-1, self.dim))
        return {
            n: self.transforms[n].inv(u).reshape(batch + self.site_shapes[n]) for n, u in unc.items()
        }

    # -- log density ---------------------------------------------------------------------------
    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        self._check_z(z)
        batch = z.shape[:-1]
        flat = z.reshape(-1, self.dim)
        if flat.shape[0] == 0:
            out = flat.sum(-1)
        elif self.vectorize_mode == "sequential":
            out = self._log_density_sequential(flat)
        else:
            batched = self._log_density_plate if self.vectorize_mode == "plate" else self._log_density_vmap
            out = self._log_density_guarded(batched, flat)
        return out.reshape(batch)

    def _log_density_guarded(self, batched, z):
        """``batched(z)``; if the model raises, bisect ``z`` (n, dim) and give -inf where it raises."""
        try:
            return batched(z)
        except _MODEL_ERRORS as e:
            if isinstance(e, _OUT_OF_MEMORY):  # not the model's: never hidden as -inf
                raise
            if z.shape[0] == 1:
                self._record_model_error(e)
                return _failed_log_density(z)
        half = z.shape[0] // 2
        return torch.cat(
            [self._log_density_guarded(batched, z[:half]), self._log_density_guarded(batched, z[half:])]
        )

    def _record_model_error(self, error):
        if self.num_model_errors == 0:
            warnings.warn(
                "the model raised at a point of a batch; its log density there is taken as -inf "
                f"(the path is dropped; further cases are counted in num_model_errors): {_short(error)}",
                RuntimeWarning,
                stacklevel=4,
            )
        self.num_model_errors += 1

    def _log_density_plate(self, z):
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

    def _log_density_vmap(self, z):
        with pyro.validation_enabled(False):  # validation branches on values, which vmap cannot do
            return torch.func.vmap(self._log_density_one, randomness="different")(z)

    def _log_density_one(self, z):
        """``log rho(z)`` at one point ``z`` (dim,) from a trace of the conditioned model (vmap-able)."""
        values, log_jacobian = {}, 0.0
        for name, u in self._unpack(z[None]).items():
            to_constrained = self.transforms[name].inv
            x = to_constrained(u[0])
            log_jacobian = log_jacobian + to_constrained.log_abs_det_jacobian(u[0], x).sum()
            values[name] = x
        with poutine.block():
            trace = poutine.trace(poutine.condition(self.model, values)).get_trace(
                *self.model_args, **self.model_kwargs
            )
        return trace.log_prob_sum() + log_jacobian

    def _log_density_single(self, z):
        """Pyro's own ``-potential_fn`` at one point ``z`` (dim,)."""
        return -self._potential_fn({n: u[0] for n, u in self._unpack(z[None]).items()})

    def _log_density_sequential(self, z):
        """Pyro's ``-potential_fn`` particle by particle, -inf where the model raises."""
        out = []
        with pyro.validation_enabled(False):
            for zi in z:
                try:
                    out.append(self._log_density_single(zi).reshape(1))
                except _MODEL_ERRORS as e:
                    if isinstance(e, _OUT_OF_MEMORY):
                        raise
                    self._record_model_error(e)
                    out.append(_failed_log_density(zi[None]))
        return torch.cat(out)

    # -- choice of the evaluation path ---------------------------------------------------------
    def _choose_mode(self, request: str) -> str:
        if request == "sequential":
            _logger.info("ModelPotential: sequential evaluation (requested)")
            return "sequential"
        gen = torch.Generator(device="cpu").manual_seed(0)
        noise = torch.randn(_NUM_PROBE_POINTS, self.dim, generator=gen).to(self.dtype).to(self.device)
        probe = self.initial_params + 0.5 * noise
        probe[0] = self.initial_params
        start = time.perf_counter()
        try:
            exact = [
                _value_and_score(lambda z: self._log_density_single(z[0])[None], zi[None]) for zi in probe
            ]
        except _MODEL_ERRORS as e:
            raise RuntimeError(f"the model raised near its initial point: {_short(e)}") from e
        seconds_per_particle = (time.perf_counter() - start) / _NUM_PROBE_POINTS
        exact_value = torch.cat([v for v, _ in exact])
        exact_score = torch.cat([s for _, s in exact])

        failures, seconds_batched = {}, []
        for mode in ("plate", "vmap") if request == "auto" else (request,):
            batched = self._log_density_plate if mode == "plate" else self._log_density_vmap
            start = time.perf_counter()
            try:
                value, score = _value_and_score(batched, probe)
            except Exception as e:  # noqa: BLE001 - the reason this path is not used
                failures[mode] = _short(e)
            else:
                finite = torch.isfinite(exact_value)
                if not _close(value, exact_value):
                    failures[mode] = f"log density {value.tolist()} != per-sample {exact_value.tolist()}"
                elif not _close(score[finite], exact_score[finite], _score_rtol(exact_score.dtype)):
                    error = (score[finite] - exact_score[finite]).abs().max().item()
                    failures[mode] = f"score differs from the per-sample score by up to {error:.3g}"
            seconds_batched.append(time.perf_counter() - start)
            if mode not in failures:
                _logger.info(
                    "ModelPotential: %s evaluation (matches Pyro's potential_fn at %d points)",
                    mode, _NUM_PROBE_POINTS,
                )
                return mode
            _logger.debug("ModelPotential: %s evaluation rejected: %s", mode, failures[mode])
        reasons = "; ".join(f"{mode}: {why}" for mode, why in failures.items())
        if request != "auto":
            raise ValueError(
                f"vectorize={request!r}: the model could not be evaluated on a batch of particles "
                f"({reasons}). To use it, {_VECTORIZE_HINT}; or pass vectorize='auto' or 'sequential' (slow)."
            )
        # a vectorised batch costs about one model call, whatever its size
        seconds_vectorised = max(max(seconds_batched), seconds_per_particle)
        slowdown = _QUOTED_BATCH * seconds_per_particle / seconds_vectorised
        message = (
            f"sequential evaluation: {1e3 * seconds_per_particle:.2g} ms per particle (log density and "
            f"score), about {slowdown:.0f}x slower than a vectorised model for a batch of {_QUOTED_BATCH}; "
            f"{_VECTORIZE_HINT}. Why the batched paths failed: {reasons}"
        )
        warnings.warn(message, UserWarning, stacklevel=3)
        _logger.info("ModelPotential: sequential evaluation (%s)", reasons)
        return "sequential"


class CountingPotential(Potential):
    """A potential that counts the rows at which it is evaluated (``num_evaluations``)."""

    def __init__(self, base: Potential):
        self.base = base
        self.dim, self.dtype, self.device = base.dim, base.dtype, base.device
        self.site_shapes, self.initial_params = base.site_shapes, base.initial_params
        self.num_evaluations = 0

    def _count(self, z):
        self.num_evaluations += math.prod(z.shape[:-1])

    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        self._count(z)
        return self.base.log_density(z)

    def log_density_and_score(
        self, z: torch.Tensor, *, create_graph: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self._count(z)
        return self.base.log_density_and_score(z, create_graph=create_graph)

    def score(self, z: torch.Tensor, *, create_graph: bool = False) -> torch.Tensor:
        self._count(z)
        return self.base.score(z, create_graph=create_graph)

    def constrain(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.base.constrain(z)
