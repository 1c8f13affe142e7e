"""The 40 closed-form tasks of the "Beyond Normal" MI benchmark (Czyz et al., NeurIPS 2023), reimplemented.

Every task is a base distribution with a closed-form ``I(X; Y)`` (split multivariate normal, split
multivariate Student-t, uniform plus additive uniform noise) pushed through an injective map of ``X`` and
one of ``Y`` separately (normal CDF, half-cube ``x sqrt|x|``, ``asinh``, "wiggly", spiral, swiss roll,
bimodal inverse CDFs), so ``I(f(X); g(Y)) = I(X; Y)``. Samplers are numpy, seeded, float64::

    task = TASKS["multinormal-dense-5-5"]          # or tasks() in the benchmark's order
    x, y = task.sample(5000, seed=0)               # (5000, 5), (5000, 5)
    task.mutual_information                        # nats, closed form

Ground truths: Gaussian ``1/2 log(det S_xx det S_yy / det S)``; Student-t the Gaussian part plus
``h(d_x) + h(d_y) - h(d_x + d_y)`` with ``h(k, nu)`` the dof-dependent part of the multivariate-t entropy;
uniform ``X`` plus ``U(-eps, eps)`` noise ``eps - log(2 eps)`` (``eps <= 1/2``) or ``1 / (4 eps)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.special import digamma, gammaln, ndtr, ndtri

__all__ = [
    "Task",
    "TASKS",
    "tasks",
    "gaussian_mi",
    "student_t_mi",
    "additive_uniform_mi",
    "wiggly_x",
    "wiggly_y",
    "half_cube",
    "spiral",
    "swissroll",
    "bimodal_icdf",
]

Sampler = Callable[[int, np.random.Generator], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class Task:
    """One benchmark task: ``sample(n, seed) -> (x (n, dim_x), y (n, dim_y))`` and the exact MI (nats)."""

    name: str
    dim_x: int
    dim_y: int
    mutual_information: float
    sampler: Sampler
    family: str  #: base distribution: "normal", "student", "uniform"

    def sample(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``n`` paired draws, deterministic in ``seed``: ``(n, dim_x), (n, dim_y)`` float64 arrays."""
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        x, y = self.sampler(int(n), np.random.default_rng(seed))
        return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# closed-form mutual information
# --------------------------------------------------------------------------------------------------


def gaussian_mi(cov: np.ndarray, dim_x: int) -> float:
    """``I = 1/2 (log det S_xx + log det S_yy - log det S)`` for ``(X, Y) ~ N(., S)``, ``S`` ``(d, d)``."""
    cov = np.asarray(cov, dtype=np.float64)
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1] or not 0 < dim_x < cov.shape[0]:
        raise ValueError(f"need a square covariance with 0 < dim_x < d, got {cov.shape} and {dim_x}")
    logdet = [np.linalg.slogdet(m) for m in (cov[:dim_x, :dim_x], cov[dim_x:, dim_x:], cov)]
    if any(sign <= 0 for sign, _ in logdet):
        raise ValueError("covariance is not positive definite")
    return 0.5 * (logdet[0][1] + logdet[1][1] - logdet[2][1])


def _t_entropy_term(k: int, dof: float) -> float:
    """dof-dependent part of the entropy of a ``k``-dim Student-t with identity dispersion."""
    a, b = 0.5 * (dof + k), 0.5 * dof
    return -gammaln(a) + gammaln(b) + 0.5 * k * np.log(dof * np.pi) + a * (digamma(a) - digamma(b))


def student_t_mi(dispersion: np.ndarray, dim_x: int, dof: float) -> float:
    """``I`` of a split multivariate Student-t: ``gaussian_mi(dispersion) + h(d_x) + h(d_y) - h(d)``."""
    if not dof > 0:
        raise ValueError(f"dof must be positive, got {dof!r}")
    d = np.asarray(dispersion).shape[0]
    corr = _t_entropy_term(dim_x, dof) + _t_entropy_term(d - dim_x, dof) - _t_entropy_term(d, dof)
    return gaussian_mi(dispersion, dim_x) + corr


def additive_uniform_mi(eps: float) -> float:
    """``I(X; X + N)``, ``X ~ U(0, 1)``, ``N ~ U(-eps, eps)``: ``eps - log 2 eps`` (eps <= 1/2), else
    ``1 / (4 eps)``."""
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps!r}")
    return eps - np.log(2 * eps) if eps <= 0.5 else 1.0 / (4 * eps)


# --------------------------------------------------------------------------------------------------
# injective transforms (applied to X or Y alone, so MI is unchanged)
# --------------------------------------------------------------------------------------------------


def half_cube(x: np.ndarray) -> np.ndarray:
    """Signed ``x^(3/2)``: ``x sqrt|x|`` (elementwise)."""
    return x * np.sqrt(np.abs(x))


def wiggly_x(x: np.ndarray) -> np.ndarray:
    """``x + 0.4 sin x + 0.2 sin(1.7 x + 1) + 0.03 sin(3.3 x - 2.5)`` (strictly increasing)."""
    return x + 0.4 * np.sin(x) + 0.2 * np.sin(1.7 * x + 1) + 0.03 * np.sin(3.3 * x - 2.5)


def wiggly_y(y: np.ndarray) -> np.ndarray:
    """``y - 0.4 sin(0.4 y) + 0.17 sin(1.3 y + 3.5) + 0.02 sin(4.3 y - 2.5)`` (strictly increasing)."""
    return y - 0.4 * np.sin(0.4 * y) + 0.17 * np.sin(1.3 * y + 3.5) + 0.02 * np.sin(4.3 * y - 2.5)


def spiral(x: np.ndarray, i: int, j: int, speed: float) -> np.ndarray:
    """``x -> exp(speed |x|^2 A_ij) x``: rotate coordinates ``(i, j)`` by the angle ``speed |x|^2``.

    ``A_ij`` is the canonical so(n) generator (``A[i, j] = -1``, ``A[j, i] = 1``); the map keeps
    ``|x|`` so it is a diffeomorphism (inverse: rotate by ``-speed |x|^2``). ``(n, d) -> (n, d)``."""
    x = np.array(x, dtype=np.float64, copy=True)
    angle = speed * (x * x).sum(-1)
    c, s = np.cos(angle), np.sin(angle)
    xi, xj = x[:, i].copy(), x[:, j].copy()
    x[:, i], x[:, j] = c * xi - s * xj, s * xi + c * xj
    return x


def swissroll(u: np.ndarray) -> np.ndarray:
    """Swiss-roll embedding of ``u`` in ``[0, 1]``: ``t = 1.5 pi (1 + 2u)``, ``(t cos t, t sin t) / 21``;
    ``(n, 1) -> (n, 2)`` (injective: the radius ``t`` grows with ``u``)."""
    t = 1.5 * np.pi * (1 + 2 * u[:, 0])
    return np.stack([t * np.cos(t), t * np.sin(t)], -1) / 21.0


def bimodal_icdf(weights, locations) -> Callable[[np.ndarray], np.ndarray]:
    """Inverse CDF of the unit-variance Gaussian mixture ``sum_k w_k N(m_k, 1)`` (monotone interpolation
    on a fine grid; strictly increasing, so MI-preserving). ``u`` in ``(0, 1)`` elementwise."""
    w, m = np.asarray(weights, dtype=np.float64), np.asarray(locations, dtype=np.float64)
    grid = np.linspace(m.min() - 9, m.max() + 9, 40001)
    cdf = (w * ndtr(grid[:, None] - m)).sum(-1)
    keep = np.concatenate([[True], np.diff(cdf) > 0])  # strictly increasing knots
    grid, cdf = grid[keep], cdf[keep]
    return lambda u: np.interp(u, cdf, grid)


# --------------------------------------------------------------------------------------------------
# base samplers
# --------------------------------------------------------------------------------------------------


def _normal(cov: np.ndarray, dim_x: int) -> Sampler:
    chol = np.linalg.cholesky(cov)

    def sample(n, rng):
        z = rng.standard_normal((n, cov.shape[0])) @ chol.T
        return z[:, :dim_x], z[:, dim_x:]

    return sample


def _student(dispersion: np.ndarray, dim_x: int, dof: float) -> Sampler:
    chol = np.linalg.cholesky(dispersion)

    def sample(n, rng):
        z = rng.standard_normal((n, dispersion.shape[0])) @ chol.T
        z = z / np.sqrt(rng.chisquare(dof, (n, 1)) / dof)
        return z[:, :dim_x], z[:, dim_x:]

    return sample


def _additive_uniform(eps: float) -> Sampler:
    def sample(n, rng):
        x = rng.uniform(0, 1, (n, 1))
        return x, x + rng.uniform(-eps, eps, (n, 1))

    return sample


def _transformed(base: Sampler, fx=None, fy=None) -> Sampler:
    def sample(n, rng):
        x, y = base(n, rng)
        return (x if fx is None else fx(x)), (y if fy is None else fy(y))

    return sample


def _two_pair(dim_x: int, dim_y: int, rho: float = 0.8) -> np.ndarray:
    """Unit variances, ``corr(x_k, y_k) = rho`` for ``k = 0, 1`` (BMI's 2-pair LVM, strength 2)."""
    cov = np.eye(dim_x + dim_y)
    for k in range(2):
        cov[k, dim_x + k] = cov[dim_x + k, k] = rho
    return cov


def _dense(dim_x: int, dim_y: int, off: float = 0.5) -> np.ndarray:
    return np.full((dim_x + dim_y,) * 2, off) + (1 - off) * np.eye(dim_x + dim_y)


def _binormal(rho: float = 0.75) -> np.ndarray:
    return np.array([[1.0, rho], [rho, 1.0]])


def _spiral_xy(dim_x: int, dim_y: int):
    """BMI's spiral: generator (0, 1) on X, (1, 2) on Y, speed 1 / dim."""
    return (lambda x: spiral(x, 0, 1, 1.0 / dim_x)), (lambda y: spiral(y, 1, 2, 1.0 / dim_y))


def _build() -> list[Task]:
    out: list[Task] = []

    def add(name, dx, dy, mi, sampler, family):
        out.append(Task(name, dx, dy, float(mi), sampler, family))

    bi = _binormal()
    mi_bi = gaussian_mi(bi, 1)
    add("1v1-normal-0.75", 1, 1, mi_bi, _normal(bi, 1), "normal")
    add("1v1-uniform-margins", 1, 1, mi_bi, _transformed(_normal(bi, 1), ndtr, ndtr), "normal")
    for eps in (0.1, 0.75):
        add(f"1v1-additive-{eps}", 1, 1, additive_uniform_mi(eps), _additive_uniform(eps), "uniform")
    icdf_x, icdf_y = bimodal_icdf([0.3, 0.7], [0.0, 5.0]), bimodal_icdf([0.5, 0.5], [-1.0, 3.0])
    add("1v1-bimodal-0.75", 1, 1, mi_bi,
        _transformed(_normal(bi, 1), lambda x: icdf_x(ndtr(x)), lambda y: icdf_y(ndtr(y))), "normal")
    add("wiggly-1v1-normal-0.75", 1, 1, mi_bi, _transformed(_normal(bi, 1), wiggly_x, wiggly_y), "normal")
    add("half-cube-1v1-normal-0.75", 1, 1, mi_bi, _transformed(_normal(bi, 1), half_cube, half_cube),
        "normal")
    eye2 = np.eye(2)
    add("1v1-student-dof-1", 1, 1, student_t_mi(eye2, 1, 1), _student(eye2, 1, 1), "student")
    add("asinh-1v1-student-dof-1", 1, 1, student_t_mi(eye2, 1, 1),
        _transformed(_student(eye2, 1, 1), np.arcsinh, np.arcsinh), "student")
    add("swissroll-x-normal-cdf-0.75", 2, 1, mi_bi,
        _transformed(_normal(bi, 1), lambda x: swissroll(ndtr(x)), ndtr), "normal")
    for d in (2, 3, 5, 25, 50):
        cov = _dense(d, d)
        add(f"multinormal-dense-{d}-{d}", d, d, gaussian_mi(cov, d), _normal(cov, d), "normal")
    for d in (2, 3, 5, 25):
        cov = _two_pair(d, d)
        add(f"multinormal-2pair-{d}-{d}", d, d, gaussian_mi(cov, d), _normal(cov, d), "normal")
    for d, dof in ((2, 1), (2, 2), (3, 2), (3, 3), (5, 2), (5, 3)):
        eye = np.eye(2 * d)
        add(f"student-identity-{d}-{d}-dof-{dof}", d, d, student_t_mi(eye, d, dof), _student(eye, d, dof),
            "student")
    for prefix, f in (("normal-cdf", ndtr), ("half-cube", half_cube)):
        for d in (3, 5, 25):
            cov = _two_pair(d, d)
            add(f"{prefix}-multinormal-2pair-{d}-{d}", d, d, gaussian_mi(cov, d),
                _transformed(_normal(cov, d), f, f), "normal")
    for d in (3, 5, 25):
        cov = _two_pair(d, d)
        sx, sy = _spiral_xy(d, d)
        add(f"spiral-multinormal-2pair-{d}-{d}", d, d, gaussian_mi(cov, d),
            _transformed(_normal(cov, d), sx, sy), "normal")
    for d in (3, 5, 25):
        cov = _two_pair(d, d)
        sx, sy = _spiral_xy(d, d)
        add(f"spiral-normal-cdf-multinormal-2pair-{d}-{d}", d, d, gaussian_mi(cov, d),
            _transformed(_normal(cov, d), lambda x, sx=sx: sx(ndtr(x)), lambda y, sy=sy: sy(ndtr(y))),
            "normal")
    for d, dof in ((2, 1), (3, 2), (5, 2)):
        eye = np.eye(2 * d)
        add(f"asinh-student-identity-{d}-{d}-dof-{dof}", d, d, student_t_mi(eye, d, dof),
            _transformed(_student(eye, d, dof), np.arcsinh, np.arcsinh), "student")
    return out


_TASK_LIST = _build()
#: name -> :class:`Task`, in the benchmark's order (the 40 tasks of the reference notes' table)
TASKS: dict[str, Task] = {t.name: t for t in _TASK_LIST}


def tasks(names=None) -> list[Task]:
    """The tasks in benchmark order, or those named (unknown names raise ``KeyError``)."""
    if names is None:
        return list(_TASK_LIST)
    missing = [n for n in names if n not in TASKS]
    if missing:
        raise KeyError(f"unknown BMI task(s) {missing}; known: {list(TASKS)}")
    return [TASKS[n] for n in names]


def marginal_gaussianize(x: np.ndarray) -> np.ndarray:
    """Per-coordinate normal scores ``Phi^-1((rank + 1/2) / n)`` of ``x`` ``(n, d)``: the empirical version
    of an injective coordinate-wise map, so MI is (asymptotically) unchanged."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"x must have shape (n, d), got {x.shape}")
    ranks = np.argsort(np.argsort(x, axis=0, kind="stable"), axis=0, kind="stable")
    return ndtri((ranks + 0.5) / x.shape[0])
