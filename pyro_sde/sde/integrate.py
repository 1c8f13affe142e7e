"""The Euler-Maruyama loop of the package, with the running path log-ratio, and a torchsde backend.

Everything here works on a :class:`~pyro_sde.sde.reference.ReferenceProcess` chain::

    x_{k+1} = a_k x_k + c_k v_k + s_k xi_k

* :func:`euler_maruyama_step` is *the* step;
* :func:`log_ratio_increment` is *the* per-step path log-density ratio ``log Q_k - log P^v_k``;
* :func:`euler_maruyama` runs the batched loop (our own: ~20 us of overhead per step);
* :func:`torchsde_euler` simulates the same chain through ``torchsde.sdeint`` (for comparison and for
  users who want torchsde's Brownian objects);
* :func:`path_log_ratio` evaluates the sum of increments for stored paths in one batched call over
  time; :func:`log_ratio_surrogate` has its gradient in the controls on the simulated paths at a
  fraction of the cost (what the log-variance loss differentiates).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch

from .reference import ReferenceProcess

if TYPE_CHECKING:
    import torchsde

__all__ = [
    "PathSample",
    "euler_maruyama_step",
    "log_ratio_increment",
    "euler_maruyama",
    "torchsde_euler",
    "path_log_ratio",
    "log_ratio_surrogate",
    "path_log_prob",
]

#: ``control_fn(k, t, x) -> v``: step index, time (0-d tensor), state ``(N, d)`` -> control ``(N, d)``.
ControlFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


class PathSample(NamedTuple):
    """Simulated paths."""

    initial: torch.Tensor  #: (N, d), ``x_0``
    terminal: torch.Tensor  #: (N, d), ``x_K``
    log_ratio: torch.Tensor  #: (N,) float64, ``sum_k log Q_k - log P^v_k`` (without boundary terms)
    states: torch.Tensor | None = None  #: (K + 1, N, d), ``x_0 ... x_K`` (if stored)
    controls: torch.Tensor | None = None  #: (K, N, d), the control ``v_k`` of the drift (if stored)


def euler_maruyama_step(
    x: torch.Tensor,
    drift_scale: float | torch.Tensor,
    control_scale: float | torch.Tensor,
    noise_std: float | torch.Tensor,
    control: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """One step ``a x + c v + s xi`` (coefficients are scalars or broadcastable tensors)."""
    if isinstance(control_scale, float) and isinstance(noise_std, float):  # fused scaled adds: 3 passes
        scaled = x if isinstance(drift_scale, float) and drift_scale == 1.0 else drift_scale * x
        return torch.add(torch.add(scaled, control, alpha=control_scale), noise, alpha=noise_std)
    return drift_scale * x + control_scale * control + noise_std * noise


def log_ratio_increment(
    kind: str,
    a: float | torch.Tensor,
    c: float | torch.Tensor,
    s: float | torch.Tensor,
    b: float | torch.Tensor | None,
    x: torch.Tensor,
    x_next: torch.Tensor,
    v: torch.Tensor,
    residual: torch.Tensor | None = None,
    u: torch.Tensor | None = None,
) -> torch.Tensor:
    """``log Q_k(.) - log F^v_k(x_next | x)`` for one step (or many, broadcasting), shape ``x.shape[:-1]``.

    ``F^v_k = N(a x + c v, s^2 I)`` is the controlled kernel. ``Q_k`` is the reference's target kernel:
    ``N(x_next; a x, s^2)`` (``kind="forward"``) or the noising kernel ``N(x; b x_next, s^2)``
    (``kind="backward"``), or with a backward control ``u`` (two-control bridge)
    ``N(x; b x_next + c u, s^2)``. ``residual = (x_next - a x - c v) / s`` may be passed when known
    exactly (the noise, when ``x_next`` was drawn from ``F^v``).
    """
    if residual is None:
        residual = (x_next - a * x - c * v) / s
    dot = torch.linalg.vecdot  # one fused pass per product
    if kind == "forward":
        # log N(x_next; a x) - log N(x_next; a x + c v) with r_Q = r + delta: -r.delta - |delta|^2/2.
        if isinstance(c, float) and isinstance(s, float):  # per-step floats: scale the dot products
            ratio = c / s
            return -ratio * dot(residual, v) - (0.5 * ratio**2) * dot(v, v)
        delta = (c / s) * v
        return -dot(residual + 0.5 * delta, delta)
    if kind == "backward":
        # 0.5 (r - r_Q).(r + r_Q), no cancellation near the optimum (r ~ r_Q); s r_Q = x - b x_next (- c u)
        if u is None and isinstance(b, float) and isinstance(s, float):
            shifted = torch.add(x, x_next, alpha=-b)
            minus = torch.add(residual, shifted, alpha=-1 / s)
            return 0.5 * dot(minus, torch.add(residual, shifted, alpha=1 / s))
        target_residual = (x - (b * x_next if u is None else b * x_next + c * u)) / s
        return 0.5 * dot(residual - target_residual, residual + target_residual)
    raise ValueError(f"unknown reference kind {kind!r}")


#: reference -> (a_k, c_k, s_k, b_k) as Python floats, read once from the CPU float64 grid
_STEP_FLOATS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _step_floats(reference: ReferenceProcess) -> tuple[list, list, list, list]:
    """``(a, c, s, b)`` per step as Python floats (``b`` is ``[None] * K`` for a forward reference).

    Read from the float64 grid on the CPU once per reference: the step loop then neither builds tiny
    tensors nor copies from the simulation's device (no host synchronisation on a GPU).
    """
    floats = _STEP_FLOATS.get(reference)
    if floats is None:
        coef = reference.coefficients(torch.float64, "cpu")
        b = coef.backward_scale
        floats = (
            coef.drift_scale.tolist(),
            coef.control_scale.tolist(),
            coef.noise_std.tolist(),
            b.tolist() if b is not None else [None] * reference.num_steps,
        )
        _STEP_FLOATS[reference] = floats
    return floats


def _check_x0(reference: ReferenceProcess, x0: torch.Tensor):
    if not isinstance(x0, torch.Tensor) or x0.dim() != 2:
        raise ValueError(f"x0 must be a tensor of shape (num_samples, dim), got {getattr(x0, 'shape', x0)}")
    if not x0.dtype.is_floating_point:
        raise TypeError(f"x0 must be floating point, got {x0.dtype}")


def euler_maruyama(
    reference: ReferenceProcess,
    control_fn: ControlFn,
    x0: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    noise_scale: float = 1.0,
    differentiable: bool = False,
    store_path: bool = True,
) -> PathSample:
    """Simulate the controlled chain from ``x0`` (N, d) and accumulate the path log-ratio.

    :param noise: optional standard normal increments ``(K, N, d)`` (drawn here otherwise, in one call).
    :param noise_scale: exploration factor: the paths are drawn with noise ``noise_scale * s_k`` while
        the log-ratio is that of the unit-scale controlled kernel (an importance weight for ``P^v``
        under a wider proposal).
    :param differentiable: keep the autograd graph through the states (reparametrised / KL gradients);
        otherwise the loop runs under ``torch.no_grad`` except inside ``control_fn``.
    :param store_path: keep all states and controls (memory ``K N d``); else only the endpoints.
    """
    _check_x0(reference, x0)
    K = reference.num_steps
    coef = reference.coefficients(x0.dtype, x0.device)
    if noise is None:
        noise = torch.randn((K,) + x0.shape, dtype=x0.dtype, device=x0.device)
    elif noise.shape != (K,) + x0.shape:
        raise ValueError(f"noise must have shape {(K,) + tuple(x0.shape)}, got {tuple(noise.shape)}")
    # Python floats keep the loop free of tiny tensor ops and of device-to-host copies; the grid
    # stays a tensor (on x0's device) for the network.
    a, c, s, b = _step_floats(reference)
    exact_residual = noise_scale == 1.0
    x = x0
    states, controls = [x0], []
    log_ratio = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)  # float64 whatever x0's
    with torch.set_grad_enabled(differentiable or torch.is_grad_enabled()):
        for k in range(K):
            v = control_fn(k, coef.times[k], x)
            if not differentiable:
                v = v.detach()
            x_next = euler_maruyama_step(x, a[k], c[k], s[k] * noise_scale, v, noise[k])
            residual = noise[k] if exact_residual else None
            log_ratio = log_ratio + log_ratio_increment(
                reference.kind, a[k], c[k], s[k], b[k], x, x_next, v, residual
            ).to(torch.float64)
            if store_path:
                states.append(x_next)
                controls.append(v)
            x = x_next
    if not store_path:
        return PathSample(x0, x, log_ratio)
    return PathSample(x0, x, log_ratio, torch.stack(states), torch.stack(controls))


def _check_path(reference, states, controls):
    K = reference.num_steps
    if states.shape[0] != K + 1 or controls.shape[0] != K:
        raise ValueError(
            f"expected {K + 1} states and {K} controls, got {states.shape[0]} and {controls.shape[0]}"
        )
    coef = reference.coefficients(states.dtype, states.device)
    return coef, lambda t: None if t is None else t.view(K, 1, 1)


def path_log_ratio(
    reference: ReferenceProcess,
    states: torch.Tensor,
    controls: torch.Tensor,
    backward_controls: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over steps of :func:`log_ratio_increment` for stored ``states`` (K+1, N, d) and
    ``controls`` (K, N, d) (and, for a bridge, ``backward_controls`` ``u_k = u(t_{k+1}, x_{k+1})``
    (K, N, d)), evaluated in one batched call over time; returns ``(N,)``, summed in float64."""
    coef, col = _check_path(reference, states, controls)
    if backward_controls is not None and reference.kind != "backward":
        raise ValueError("backward controls need a reference of kind 'backward'")
    inc = log_ratio_increment(
        reference.kind,
        col(coef.drift_scale),
        col(coef.control_scale),
        col(coef.noise_std),
        col(coef.backward_scale),
        states[:-1],
        states[1:],
        controls,
        u=backward_controls,
    )
    return inc.to(torch.float64).sum(0)


def log_ratio_surrogate(
    reference: ReferenceProcess,
    noise: torch.Tensor,
    controls: torch.Tensor | list[torch.Tensor],
    noise_scale: float = 1.0,
) -> torch.Tensor:
    """``S = -noise_scale sum_k (c_k / s_k) xi_k . v_k`` (N,) for paths drawn with the detached controls
    ``v_k`` (K, N, d) (a tensor or K tensors) and increments ``xi_k`` (``noise``, K, N, d).

    On those paths the residual of step k is ``noise_scale xi_k``, and the derivative of every path
    log-ratio increment (both reference kinds) in ``v_k`` is ``-(c_k / s_k)`` times it: ``grad S`` equals
    ``grad`` of :func:`path_log_ratio` at these controls, so ``log w + (S - S.detach())`` has the value of
    ``log w`` and its gradient in the control, at the cost of one product per state. (Not for a bridge,
    whose backward control enters the target kernel.) Float64."""
    K = reference.num_steps
    if isinstance(controls, torch.Tensor):
        if controls.shape != noise.shape or noise.shape[0] != K:
            raise ValueError(
                f"controls {tuple(controls.shape)} and noise {tuple(noise.shape)} must be (K={K}, N, d)"
            )
        coef = reference.coefficients(controls.dtype, controls.device)
        scale = (coef.control_scale / coef.noise_std).view(K, 1, 1)
        return -noise_scale * (scale * noise * controls).sum(-1).to(torch.float64).sum(0)
    if len(controls) != K:
        raise ValueError(f"need K={K} controls, got {len(controls)}")
    _, c, s, _ = _step_floats(reference)
    total = 0.0
    for k, v in enumerate(controls):
        total = total + (-noise_scale * c[k] / s[k]) * (noise[k] * v).sum(-1).to(torch.float64)
    return total


def path_log_prob(reference: ReferenceProcess, states: torch.Tensor, controls: torch.Tensor) -> torch.Tensor:
    """``log P^v(x_{1:K} | x_0) = sum_k log N(x_{k+1}; a_k x_k + c_k v_k, s_k^2 I)`` for stored paths,
    shape ``(N,)``: the score-function term of the log-derivative (REINFORCE) gradient."""
    coef, col = _check_path(reference, states, controls)
    s = col(coef.noise_std)
    residual = (states[1:] - col(coef.drift_scale) * states[:-1] - col(coef.control_scale) * controls) / s
    d = states.shape[-1]
    log_norm = -(d * (s.log() + 0.5 * math.log(2 * math.pi))).sum()
    return -0.5 * (residual * residual).sum((0, -1)) + log_norm


class _TorchsdeChain(torch.nn.Module):
    """The controlled chain as a torchsde SDE whose Euler scheme on the grid reproduces it exactly:
    ``f = ((a_k - 1) x + c_k v) / h``, ``g = s_k / sqrt(h)`` (diagonal noise, Ito)."""

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, reference, control_fn, coef, noise_scale, differentiable):
        super().__init__()
        self.reference, self.control_fn, self.coef = reference, control_fn, coef
        self.h = reference.T / reference.num_steps
        self.noise_scale, self.differentiable = noise_scale, differentiable
        self.controls: dict[int, torch.Tensor] = {}

    def _index(self, t):
        return min(int(round(float(t) / self.h)), self.reference.num_steps - 1)

    def f(self, t, y):
        k = self._index(t)
        # torchsde may end with a sliver of a step (t = T - 1e-16 to T) whose index is K - 1 again: it
        # reuses step K - 1's control (the control function is called once per step, as by our loop)
        v = self.controls.get(k)
        if v is None:
            v = self.control_fn(k, self.coef.times[k], y)
            if not self.differentiable:
                v = v.detach()
            self.controls[k] = v
        return ((self.coef.drift_scale[k] - 1) * y + self.coef.control_scale[k] * v) / self.h

    def g(self, t, y):
        k = self._index(t)
        return (self.noise_scale * self.coef.noise_std[k] / self.h**0.5).expand_as(y)


_GRID_BROWNIAN: list = []


def _grid_brownian(noise: torch.Tensor, h: float) -> torchsde.BaseBrownian:
    """A torchsde Brownian motion on the grid ``t_k = k h`` whose increment over step ``k`` is
    ``sqrt(h) noise[k]`` (``noise`` (K, N, d)): torchsde's Euler steps then draw :func:`euler_maruyama`'s."""
    if not _GRID_BROWNIAN:
        import torchsde

        class GridBrownian(torchsde.BaseBrownian):
            __slots__ = ("_noise", "_h")

            def __init__(self, noise, h):
                self._noise, self._h = noise, h

            def __call__(self, ta, tb=None, return_U=False, return_A=False):
                if tb is None or return_U or return_A:
                    raise ValueError("a grid Brownian motion gives increments W(tb) - W(ta) only")
                dt = float(tb) - float(ta)  # h or, closing the grid, a sliver, up to the times' rounding
                if abs(dt) <= 1e-3 * self._h:
                    return torch.zeros_like(self._noise[0])
                if abs(dt - self._h) > 1e-3 * self._h:
                    raise ValueError("a grid Brownian motion gives increments over one grid step only")
                return self._noise[int(round(float(ta) / self._h))] * math.sqrt(self._h)

            def __repr__(self):
                return f"GridBrownian(steps={self._noise.shape[0]}, h={self._h})"

            dtype = property(lambda self: self._noise.dtype)
            device = property(lambda self: self._noise.device)
            shape = property(lambda self: tuple(self._noise.shape[1:]))
            levy_area_approximation = property(lambda self: "none")

        _GRID_BROWNIAN.append(GridBrownian)
    return _GRID_BROWNIAN[0](noise, h)


def torchsde_euler(
    reference: ReferenceProcess,
    control_fn: ControlFn,
    x0: torch.Tensor,
    *,
    noise: torch.Tensor | None = None,
    noise_scale: float = 1.0,
    differentiable: bool = False,
    bm: torchsde.BaseBrownian | None = None,
) -> PathSample:
    """Same as :func:`euler_maruyama`, simulated by ``torchsde.sdeint(method="euler")`` on the grid.

    The log-ratio is then evaluated from the stored states with :func:`path_log_ratio`, so both
    backends give weights that are exact for the discrete chain. Slower (torchsde's per-step cost).

    :param noise: optional standard normal increments ``(K, N, d)``: the paths are then those of
        :func:`euler_maruyama` with the same ``noise`` (to rounding); else torchsde's ``bm`` or a fresh
        ``BrownianInterval``.
    """
    import torchsde

    _check_x0(reference, x0)
    coef = reference.coefficients(x0.dtype, x0.device)
    sde = _TorchsdeChain(reference, control_fn, coef, noise_scale, differentiable)
    h = reference.T / reference.num_steps
    if noise is not None:
        if bm is not None:
            raise ValueError("give noise or bm, not both")
        if noise.shape != (reference.num_steps,) + x0.shape:
            raise ValueError(
                f"noise must have shape {(reference.num_steps,) + tuple(x0.shape)}, got {tuple(noise.shape)}"
            )
        bm = _grid_brownian(noise, h)
    if bm is None:
        bm = torchsde.BrownianInterval(
            t0=0.0, t1=reference.T, size=tuple(x0.shape), dtype=x0.dtype, device=x0.device, dt=h
        )
    with torch.set_grad_enabled(differentiable or torch.is_grad_enabled()):
        states = torchsde.sdeint(sde, x0, coef.times, method="euler", dt=h, bm=bm)
        controls = torch.stack([sde.controls[k] for k in range(reference.num_steps)])
        if not differentiable:
            states = states.detach()
        log_ratio = path_log_ratio(reference, states, controls)
    return PathSample(states[0], states[-1], log_ratio, states, controls)
