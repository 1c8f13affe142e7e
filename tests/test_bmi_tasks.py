"""The Beyond-Normal task samplers (benchmarks/bmi_tasks.py): ground truths, invariances, determinism."""

import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import integrate, stats
from scipy.special import ndtr, ndtri

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bmi_tasks as bmi  # noqa: E402

# the reference notes' table (section 4.1), in the benchmark's order
REFERENCE = [0.4133, 0.4133, 1.7094, 0.3333, 0.4133, 0.4133, 0.4133, 0.2242, 0.2242, 0.4133,
             0.2939, 0.4133, 0.5928, 1.2922, 1.6243, 1.0217, 1.0217, 1.0217, 1.0217,
             0.4319, 0.1931, 0.2909, 0.1787, 0.4482, 0.2985] + [1.0217] * 12 + [0.4319, 0.2909, 0.4482]


def plugin_gaussian_mi(x, y):
    """Gaussian MI from the sample covariance of the pairs."""
    return bmi.gaussian_mi(np.cov(np.concatenate([x, y], 1).T), x.shape[1])


class TestGroundTruth:
    def test_forty_tasks_match_the_reference_table(self):
        tasks = bmi.tasks()
        assert len(tasks) == 40 and len(bmi.TASKS) == 40
        np.testing.assert_allclose([t.mutual_information for t in tasks], REFERENCE, atol=6e-5)

    def test_gaussian_mi_of_a_bivariate_normal(self):
        rho = 0.6
        exact = -0.5 * np.log(1 - rho**2)
        assert bmi.gaussian_mi(np.array([[1, rho], [rho, 1.0]]), 1) == pytest.approx(exact)

    def test_additive_uniform_mi_by_quadrature(self):
        # I = h(Y) - h(N), Y = X + N: density of Y is the U(0,1) * U(-eps, eps) convolution (a trapezoid)
        for eps in (0.1, 0.3, 0.75):
            def dens(v, eps=eps):
                return (min(1.0, v + eps) - max(0.0, v - eps)) / (2 * eps)

            pts = sorted({-eps, eps, 1 - eps, 1 + eps})
            h_y = integrate.quad(lambda v: -dens(v) * np.log(dens(v)) if dens(v) > 0 else 0.0,
                                 -eps, 1 + eps, points=pts[1:-1], limit=200)[0]
            assert h_y - np.log(2 * eps) == pytest.approx(bmi.additive_uniform_mi(eps), abs=1e-6)
        assert bmi.additive_uniform_mi(0.5) == pytest.approx(0.5)  # the two branches meet

    @pytest.mark.parametrize("dim, dof", [(1, 1.0), (2, 2.0)])
    def test_student_t_mi_by_monte_carlo(self, dim, dof):
        # E log p(x, y) / (p(x) p(y)) with scipy's multivariate t densities, 40k draws
        task = bmi.TASKS[f"1v1-student-dof-{int(dof)}" if dim == 1 else f"student-identity-{dim}-{dim}-dof-2"]
        x, y = task.sample(40_000, seed=1)
        joint = stats.multivariate_t(np.zeros(2 * dim), np.eye(2 * dim), df=dof)
        marg = stats.multivariate_t(np.zeros(dim), np.eye(dim), df=dof)
        lr = joint.logpdf(np.concatenate([x, y], 1)) - marg.logpdf(x) - marg.logpdf(y)
        se = lr.std() / np.sqrt(lr.size)
        assert abs(lr.mean() - task.mutual_information) < 4 * se + 1e-3

    def test_invalid_inputs_raise(self):
        with pytest.raises(ValueError, match="positive definite"):
            bmi.gaussian_mi(np.array([[1.0, 2.0], [2.0, 1.0]]), 1)
        with pytest.raises(ValueError):
            bmi.additive_uniform_mi(0.0)
        with pytest.raises(ValueError):
            bmi.TASKS["1v1-normal-0.75"].sample(0)
        with pytest.raises(KeyError, match="unknown BMI task"):
            bmi.tasks(["no-such-task"])


class TestSamplers:
    def test_shapes_determinism_finiteness(self):
        for task in bmi.tasks():
            x, y = task.sample(64, seed=3)
            assert x.shape == (64, task.dim_x) and y.shape == (64, task.dim_y), task.name
            assert x.dtype == np.float64 and np.isfinite(x).all() and np.isfinite(y).all(), task.name
            x2, y2 = task.sample(64, seed=3)
            np.testing.assert_array_equal(x, x2)
            np.testing.assert_array_equal(y, y2)
            assert not np.array_equal(x, task.sample(64, seed=4)[0]), task.name

    @pytest.mark.parametrize("name", ["1v1-normal-0.75", "multinormal-dense-2-2", "multinormal-dense-5-5",
                                      "multinormal-dense-50-50", "multinormal-2pair-3-3",
                                      "multinormal-2pair-25-25"])
    def test_plugin_mi_of_gaussian_tasks(self, name):
        task = bmi.TASKS[name]
        n = 100_000
        x, y = task.sample(n, seed=0)
        bias = task.dim_x * task.dim_y / (2 * n)  # plug-in bias of the Gaussian MI estimate
        assert plugin_gaussian_mi(x, y) - bias == pytest.approx(task.mutual_information, abs=0.02)

    @pytest.mark.parametrize("name, inverse", [
        ("1v1-uniform-margins", (ndtri, ndtri)),
        ("half-cube-1v1-normal-0.75", (lambda v: np.sign(v) * np.abs(v) ** (2 / 3),) * 2),
        ("normal-cdf-multinormal-2pair-5-5", (ndtri, ndtri)),
        ("half-cube-multinormal-2pair-25-25", (lambda v: np.sign(v) * np.abs(v) ** (2 / 3),) * 2),
        ("spiral-multinormal-2pair-5-5", (lambda v: bmi.spiral(v, 0, 1, -1 / 5),
                                          lambda v: bmi.spiral(v, 1, 2, -1 / 5))),
        ("spiral-normal-cdf-multinormal-2pair-3-3", (lambda v: ndtri(bmi.spiral(v, 0, 1, -1 / 3)),
                                                     lambda v: ndtri(bmi.spiral(v, 1, 2, -1 / 3)))),
    ])
    def test_inverting_the_transform_recovers_the_gaussian(self, name, inverse):
        task = bmi.TASKS[name]
        n = 100_000
        x, y = task.sample(n, seed=2)
        x, y = inverse[0](x), inverse[1](y)
        bias = task.dim_x * task.dim_y / (2 * n)
        assert plugin_gaussian_mi(x, y) - bias == pytest.approx(task.mutual_information, abs=0.02)
        # the base is the 2-pair / bivariate Gaussian: unit variances
        np.testing.assert_allclose(x.std(0), 1.0, atol=0.02)

    def test_monotone_transforms_are_strictly_increasing(self):
        v = np.linspace(-8, 8, 20001)
        for f in (bmi.wiggly_x, bmi.wiggly_y, bmi.half_cube, np.arcsinh):
            assert (np.diff(f(v)) > 0).all()
        assert (np.diff(ndtr(v[np.abs(v) < 5])) > 0).all()  # (ndtr saturates in float64 beyond)
        icdf = bmi.bimodal_icdf([0.3, 0.7], [0.0, 5.0])
        u = np.linspace(1e-6, 1 - 1e-6, 1001)
        q = icdf(u)
        assert (np.diff(q) > 0).all()
        np.testing.assert_allclose(0.3 * ndtr(q) + 0.7 * ndtr(q - 5), u, atol=1e-5)
        u = np.linspace(0, 1, 1001)[:, None]
        radius = np.linalg.norm(bmi.swissroll(u), axis=1) * 21
        np.testing.assert_allclose(radius, 1.5 * np.pi * (1 + 2 * u[:, 0]))  # injective: radius grows

    def test_spiral_keeps_norms_and_inverts(self):
        x = np.random.default_rng(0).standard_normal((500, 4))
        z = bmi.spiral(x, 0, 1, 0.25)
        np.testing.assert_allclose(np.linalg.norm(z, axis=1), np.linalg.norm(x, axis=1))
        np.testing.assert_allclose(bmi.spiral(z, 0, 1, -0.25), x, atol=1e-12)
        assert np.abs(z - x).max() > 0.1

    def test_marginal_gaussianize_is_rank_invariant(self):
        task = bmi.TASKS["wiggly-1v1-normal-0.75"]
        x, y = task.sample(5000, seed=0)
        g = bmi.marginal_gaussianize(x)
        np.testing.assert_array_equal(g, bmi.marginal_gaussianize(bmi.half_cube(x)))  # ranks only
        assert abs(g.mean()) < 1e-9 and abs(g.std() - 1) < 0.01
        gx, gy = g, bmi.marginal_gaussianize(y)
        # wiggly is coordinate-wise: the normal scores are Gaussian again, plug-in MI ~ truth
        assert plugin_gaussian_mi(gx, gy) == pytest.approx(task.mutual_information, abs=0.04)
        with pytest.raises(ValueError):
            bmi.marginal_gaussianize(x[:, 0])


def test_benchmark_script_runs_one_task():
    """The CI-sized path of benchmarks/ratio_bmi.py (so the benchmark cannot rot): a few iterations."""
    import ratio_bmi

    task = bmi.TASKS["multinormal-2pair-2-2"]
    rec = ratio_bmi.run_one(task, "tangent-quadratic", 0, 400, 0.02)
    assert rec["truth"] == task.mutual_information and np.isfinite(rec["estimate"]) and rec["stderr"] > 0
    rows, summary = ratio_bmi.summarise([rec], [task], ["tangent-quadratic"])
    assert summary[0][1] == 1 and rows[0][3] == f"{abs(rec['error']):.3f}"
    z = ratio_bmi.whiten(task.sample(4000, 0)[0] @ np.array([[2.0, 1.0], [0.0, 1.0]]))
    np.testing.assert_allclose(np.cov(z.T), np.eye(2), atol=1e-10)
