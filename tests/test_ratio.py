"""Tests of pyro_sde.ratio against closed forms: Gaussian paths with exact time scores and log ratios."""

import copy
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC, NUTS
from torch import nn
from torch.func import jvp

from pyro_sde.ratio import (
    ClassifierRatioEstimator,
    GaussianPath,
    QuadraticTimeScore,
    RatioLikelihood,
    RatioTilted,
    SecantRatioEstimator,
    TangentRatioEstimator,
    TelescopingRatioEstimator,
    get_path,
    mutual_information,
    sai_target,
)
from pyro_sde.ratio.paths import time_derivative

PATHS = ["dre_infinity", "linear", "vp", "cosine", "trigonometric"]
D64 = torch.float64


def gaussian_pair(dim=2, dtype=D64, path="dre_infinity"):
    mean = torch.linspace(0.8, -0.6, dim, dtype=dtype)
    a = torch.linspace(-1, 1, dim * dim, dtype=dtype).reshape(dim, dim)
    cov = 0.3 * torch.eye(dim, dtype=dtype) + 0.2 * a @ a.T
    return GaussianPath(path, mean, cov)


class AnalyticTangent(nn.Module):
    """The exact time score of a GaussianPath in the network protocol ``(x, times, side)``, plus
    ``theta * g(x, t)`` with ``g = t (1 - t) (|x|^2 / d - 1) + t x_0`` (a perturbation direction)."""

    def __init__(self, gp, theta=0.0):
        super().__init__()
        self.gp = gp
        self.theta = nn.Parameter(torch.tensor(theta, dtype=gp.mean.dtype))

    def forward(self, x, times, side):
        return self.time_jets(x, times, side, 0)[0]

    def time_jets(self, x, times, side, order=1):
        t = times[:, -1].contiguous()

        def d1(s):
            return jvp(lambda r: self.gp.log_prob(x, r), (s,), (torch.ones_like(s),))[1]

        s, ds = jvp(d1, (t,), (torch.ones_like(t),))
        q = (x * x).mean(-1) - 1
        g, dg = t * (1 - t) * q + t * x[:, 0], (1 - 2 * t) * q + x[:, 0]
        return (s + self.theta * g, ds + self.theta * dg)[: order + 1]


def exact_axis_network(gp, theta=0.0):
    """A QuadraticTimeScore with the exact per-axis coefficients of a GaussianPath (eigenbasis ``U``)
    plus ``theta`` times a fixed perturbation of the coefficients."""
    net = QuadraticTimeScore(gp.dim).to(gp.mean.dtype)
    with torch.no_grad():
        net.directions.copy_(gp.eigenvectors.T.repeat(2, 1))
    m0, lam = gp.eigenvectors.T @ gp.mean, gp.eigenvalues
    pert = torch.linspace(-1, 1, 3 * gp.dim, dtype=gp.mean.dtype)

    def coefficient_jets(times, side, order=0):
        t = times[..., -1:]
        path = gp.path
        (a2, b), (da2, db) = time_derivative(lambda r: (path.alpha_squared(r), path.coefficients(r)[1]), t)
        v, dv = a2 + b * b * lam, da2 + 2 * b * db * lam  # per-axis variance and its rate
        m, dm = b * m0, db * m0  # per-axis mean
        c = 0.5 * dv / v**2  # s_k = c (q - m)^2 + (dm / v) (q - m) - dv / (2 v)
        e = -2 * c * m + dm / v
        c0 = c * m * m - dm * m / v - 0.5 * dv / v
        return (torch.cat([c0, c, e], -1) + theta * t * pert,)

    net.coefficient_jets = coefficient_jets
    return net


class AnalyticSecant(AnalyticTangent):
    def forward(self, x, times, side):
        return self.gp.secant(x, times[:, 0], times[:, 1])


def fitted(est, two_sided=False):
    est.fitted.fill_(True)
    est.two_sided.fill_(two_sided)
    return est.to(D64)


# ------------------------------------------------------------------------------------------------
# paths
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", PATHS)
def test_path_end_points_and_derivatives(name):
    path = get_path(name)
    t = torch.tensor([0.0, 1.0], dtype=D64)
    a, b = path.coefficients(t)
    assert torch.allclose(a[0], torch.tensor(1.0, dtype=D64)) and b[0] == 0
    if name != "vp":
        assert abs(a[1]) < 1e-7 and torch.allclose(b[1], torch.tensor(1.0, dtype=D64))
    s = torch.linspace(0.1, 0.9, 7, dtype=D64)
    _, _, da, db = path.coefficients_and_derivatives(s)
    h = 1e-6
    (ap, bp), (am, bm) = path.coefficients(s + h), path.coefficients(s - h)
    assert torch.allclose(da, (ap - am) / (2 * h), atol=1e-6)
    assert torch.allclose(db, (bp - bm) / (2 * h), atol=1e-6)


def test_dre_infinity_weight_closed_form():
    t = torch.linspace(0, 0.99, 11, dtype=D64)
    assert torch.allclose(get_path("dre_infinity").weight(t), (1 - t**2) ** 2 / (1 + t**2))


def test_unknown_path():
    with pytest.raises(ValueError, match="unknown path"):
        get_path("nope")


@pytest.mark.parametrize("name", ["dre_infinity", "trigonometric"])
def test_gaussian_path_time_score_and_log_ratio(name):
    gp = gaussian_pair(3, path=name)
    x = gp.sample(50)
    t = torch.full((50,), 0.4, dtype=D64)
    h = 1e-6
    fd = (gp.log_prob(x, t + h) - gp.log_prob(x, t - h)) / (2 * h)
    assert torch.allclose(gp.time_score(x, t), fd, atol=1e-6)
    cov = gp.eigenvectors @ torch.diag(gp.eigenvalues) @ gp.eigenvectors.T
    exact = dist.MultivariateNormal(gp.mean, cov).log_prob(x)
    exact = exact - dist.Normal(torch.zeros(3, dtype=D64), 1.0).log_prob(x).sum(-1)
    assert torch.allclose(gp.log_ratio(x), exact, atol=1e-10)


def test_conditional_time_score_is_unbiased_for_marginal():
    """E[target * f(x_t)] = E[s(x_t, t) * f(x_t)] for test functions f (regression consistency)."""
    gp = gaussian_pair(2)
    n = 400_000
    x1, noise = gp.sample(n), torch.randn(n, 2, dtype=D64)
    for tv in (0.3, 0.8):
        t = torch.full((n,), tv, dtype=D64)
        xt = gp.path.interpolate(noise, x1, t)
        target, s = gp.path.conditional_time_score(noise, x1, t), gp.time_score(xt, t)
        for f in (torch.ones(n, dtype=D64), xt[:, 0], xt[:, 1] ** 2, xt[:, 0] * xt[:, 1]):
            se = (target * f).std() / math.sqrt(n)
            assert abs((target * f).mean() - (s * f).mean()) < 5 * se


def test_stein_form_of_the_per_axis_target():
    """E[f(q_k) y_k] = alpha alpha' E[f''(q_k)] + beta' E[x1_k f'(q_k)] for the per-axis conditional time
    score y_k (Gaussian integration by parts in eps): the identity behind objective="stein"."""
    gp = gaussian_pair(2)
    u = gp.eigenvectors.T
    n = 400_000
    x1, noise = gp.sample(n), torch.randn(n, 2, dtype=D64)
    for tv in (0.3, 0.9):
        t = torch.full((n,), tv, dtype=D64)
        a, _, da, db = gp.path.coefficients_and_derivatives(t)
        q, q1, e = gp.path.interpolate(noise, x1, t) @ u.T, x1 @ u.T, noise @ u.T
        for k in range(2):
            y = (e[:, k] ** 2 - 1) * da / a + e[:, k] * q1[:, k] * db / a
            qk = q[:, k]
            for f, df, d2f in ((qk**2, 2 * qk, 2.0), (qk**3, 3 * qk**2, 6 * qk)):
                lhs = f * y
                rhs = gp.path.alpha_alpha_dot(t) * d2f + db * q1[:, k] * df
                se = (lhs - rhs).std() / math.sqrt(n)
                assert abs(lhs.mean() - rhs.mean()) < 5 * se


@pytest.mark.parametrize("objective", ["tsm", "stein"])
def test_objective_minimised_at_exact_time_score(objective):
    """With common random numbers the sampled loss is a parabola in a perturbation theta of the exact
    time score; its minimiser is ~0 (consistency of the objective, signs and boundary terms), and the
    exact score beats the perturbed ones."""
    gp = gaussian_pair(3)

    def loss(theta):
        net = AnalyticTangent(gp, theta) if objective == "tsm" else exact_axis_network(gp, theta)
        est = fitted(TangentRatioEstimator(3, network=net, objective=objective, time_groups=256))
        torch.manual_seed(0)
        x = gp.sample(2**16)
        return est._loss(x, None, 0.5).item()

    h = 0.5
    lm, l0, lp = loss(-h), loss(0.0), loss(h)
    curvature = (lp - 2 * l0 + lm) / h**2
    assert curvature > 0 and l0 < min(lm, lp)
    assert abs((lp - lm) / (2 * h) / curvature) < 0.03  # the minimiser, in units of theta


# ------------------------------------------------------------------------------------------------
# secant alignment identity and quadrature with exact time scores
# ------------------------------------------------------------------------------------------------


def test_secant_alignment_identity_exact():
    """s(x,t) = u(x,l,t) + (t-l) d/dt u(x,l,t): the SAI target equals the exact secant, while the
    correction term is far from zero (a zeroed correction, as in the public code, fails this)."""
    gp = gaussian_pair(2)
    x = gp.sample(64)
    l = torch.rand(64, dtype=D64) * 0.5
    t = l + 0.1 + 0.4 * torch.rand(64, dtype=D64)
    tangent = gp.time_score(x, t)
    target, u = sai_target(gp.secant, x, l, t, tangent)
    assert torch.allclose(target, u, atol=1e-10)
    target_left, _ = sai_target(gp.secant, x, l, t, gp.time_score(x, l), anchor="left")
    assert torch.allclose(target_left, u, atol=1e-10)
    correction = (t - l) * time_derivative(lambda s: gp.secant(x, l, s), t)[1]
    assert correction.abs().mean() > 0.05
    assert (tangent - u).abs().mean() > 0.05  # without the correction the target would be off


def test_secant_equals_integral_of_tangent():
    gp = gaussian_pair(2)
    x = gp.sample(16)
    l, t = 0.2, 0.7
    nodes, w = __import__("pyro_sde.ratio", fromlist=["gauss_legendre"]).gauss_legendre(32, l, t, x)
    integral = sum(wk * gp.time_score(x, nk) for nk, wk in zip(nodes, w))
    assert torch.allclose(gp.secant(x, torch.tensor(l, dtype=D64), torch.tensor(t, dtype=D64)) * (t - l),
                          integral, atol=1e-8)


def test_tangent_quadrature_with_exact_time_score():
    gp = gaussian_pair(2)
    x = gp.sample(200)
    truth = gp.log_ratio(x)
    err = {}
    for q in ("gauss-legendre", "trapezoid"):
        est = fitted(TangentRatioEstimator(2, network=AnalyticTangent(gp), eps=1e-6, quadrature=q))
        err[q] = {k: (est.log_ratio(x, k) - truth).abs().max().item() for k in (4, 16, 64)}
    assert err["gauss-legendre"][64] < 1e-4
    assert err["gauss-legendre"][16] < err["trapezoid"][16]
    assert err["trapezoid"][64] < err["trapezoid"][16] < err["trapezoid"][4]


@pytest.mark.parametrize("time_grid", ["uniform", "sigmoid"])
def test_secant_any_step_with_exact_secant(time_grid):
    gp = gaussian_pair(2)
    x = gp.sample(200)
    truth = gp.log_ratio(x)
    est = fitted(SecantRatioEstimator(2, network=AnalyticSecant(gp), eps=1e-7, time_grid=time_grid))
    for k in (1, 2, 5):
        assert torch.allclose(est.log_ratio(x, k), truth, atol=1e-5)


def test_two_sided_difference_with_exact_scores():
    """Two-sided: log r = log(p_num / N) - log(p_den / N); with exact networks it is exact."""
    g1, g0 = gaussian_pair(2), GaussianPath("dre_infinity", torch.tensor([0.5, 0.0], dtype=D64),
                                            torch.diag(torch.tensor([2.0, 0.5], dtype=D64)))

    class Sided(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.zeros((), dtype=D64))

        def forward(self, x, times, side):
            return torch.where(side > 0.5, g1.secant(x, times[:, 0], times[:, 1]),
                               g0.secant(x, times[:, 0], times[:, 1]))

    est = fitted(SecantRatioEstimator(2, network=Sided(), eps=1e-7), two_sided=True)
    x = g1.sample(100)
    assert torch.allclose(est.log_ratio(x, 1), g1.log_ratio(x) - g0.log_ratio(x), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# learned estimators on Gaussian pairs
# ------------------------------------------------------------------------------------------------

FIT = dict(batch_size=256, progress_bar=False)


def rmse(a, b):
    return ((a - b) ** 2).mean().sqrt().item()


@pytest.fixture(scope="module")
def pair32():
    torch.manual_seed(1)
    gp = GaussianPath("dre_infinity", torch.tensor([1.0, -0.5]), torch.tensor([[0.5, 0.2], [0.2, 0.8]]))
    return gp, gp.sample(2000)


def test_tangent_rmse_decreases_with_training(pair32):
    gp, xq = pair32
    truth = gp.log_ratio(xq)
    est = TangentRatioEstimator(2, network="quadratic")
    est.fit(gp.sample, None, num_iterations=100, **FIT)
    early = rmse(est.log_ratio(xq, 16), truth)
    est.fit(gp.sample, None, num_iterations=1200, **FIT)
    late = rmse(est.log_ratio(xq, 16), truth)
    assert late < 0.3 and late < 0.6 * early
    assert len(est.losses) == 1300


@pytest.fixture(scope="module")
def trained_secant(pair32):
    gp, _ = pair32
    torch.manual_seed(2)
    return SecantRatioEstimator(2, network="quadratic").fit(gp.sample, None, num_iterations=1200, **FIT)


def test_learned_secant_matches_integral_of_tangent(pair32, trained_secant):
    """The learned secant over [l, t] is the interval average of the tangent, not the tangent at t."""
    gp, xq = pair32
    T = trained_secant.t_max
    for l, t in ((0.0, T), (0.0, 0.5 * T), (0.5 * T, T)):
        lt, tt = torch.tensor(l), torch.tensor(t)
        learned, exact = trained_secant.secant(xq, lt, tt), gp.secant(xq, lt, tt)
        tangent_at_t = gp.time_score(xq, tt.expand(xq.shape[0]))
        assert rmse(learned, exact) < 0.5 * rmse(tangent_at_t, exact)
        assert rmse(learned, exact) < 0.8


@pytest.mark.slow
def test_secant_few_steps_agrees_with_tangent_many_steps(pair32, trained_secant):
    gp, xq = pair32
    truth = gp.log_ratio(xq)
    torch.manual_seed(3)
    tangent = TangentRatioEstimator(2, network="quadratic").fit(gp.sample, None, num_iterations=1200, **FIT)
    t64 = tangent.log_ratio(xq, 64)
    assert rmse(t64, truth) < 0.45
    for k, tol in ((1, 0.6), (2, 0.45)):
        s_k = trained_secant.log_ratio(xq, k)
        assert rmse(s_k, truth) < tol
        assert rmse(s_k, t64) < tol
        assert abs(s_k.mean() - truth.mean()) < tol


def mi_task(d, mi, dtype=torch.float32):
    """DRE-infinity's MI task: N(0, I) vs d/2 pairs of correlation rho, MI = -d/4 log(1 - rho^2)."""
    rho = math.sqrt(1 - math.exp(-4 * mi / d))
    block = torch.tensor([[1.0, rho], [rho, 1.0]], dtype=dtype)
    return GaussianPath("dre_infinity", torch.zeros(d, dtype=dtype), torch.block_diag(*[block] * (d // 2)))


@pytest.fixture(scope="module")
def mi16():
    torch.manual_seed(4)
    gp = mi_task(16, 4.0)
    xq = gp.sample(4000)
    return gp, xq, gp.log_ratio(xq)


def test_quadratic_tangent_gaussian_mi(mi16):
    """d = 16, MI = 4 nats: the Gaussian family contains the truth, so a CI budget reaches 0.1 nats
    (the conditional-regression objective of the previous version missed by ~2 nats here)."""
    gp, xq, truth = mi16
    torch.manual_seed(5)
    est = TangentRatioEstimator(16, network="quadratic").fit(gp.sample, None, num_iterations=600, **FIT)
    lr = est.log_ratio(xq, 16)
    assert abs(lr.mean() - truth.mean()) < 0.1
    assert rmse(lr, truth) < 0.3


def test_quadratic_secant_few_steps_gaussian_mi(mi16):
    """The secant at NFE 1-2 is as accurate as the converged tangent; at NFE 2 it beats even the exact
    time score's 2-node Gauss-Legendre rule by more than 3x."""
    gp, xq, truth = mi16
    torch.manual_seed(6)
    est = SecantRatioEstimator(16, network="quadratic").fit(gp.sample, None, num_iterations=1200, **FIT)
    exact = fitted(TangentRatioEstimator(16, network=AnalyticTangent(mi_task(16, 4.0, D64))))
    quadrature_err = (exact.log_ratio(xq.double(), 2).mean() - truth.mean()).abs().item()
    for k in (1, 2):
        lr = est.log_ratio(xq, k)
        assert abs(lr.mean() - truth.mean()) < 0.1
        assert rmse(lr, truth) < 0.3
    assert abs(est.log_ratio(xq, 2).mean() - truth.mean()) < quadrature_err / 3


def test_classifier_and_tre_gaussian_mean_shift():
    torch.manual_seed(0)
    mu = torch.tensor([1.0, 0.0])
    x_num, x_den = torch.randn(4000, 2) + mu, torch.randn(4000, 2)
    xq = torch.randn(1000, 2) + mu
    truth = xq @ mu - 0.5 * mu @ mu
    for est in (ClassifierRatioEstimator(2, hidden_dim=64, num_layers=2),
                TelescopingRatioEstimator(2, num_bridges=3, hidden_dim=64, num_layers=2)):
        est.fit(x_num, x_den, num_iterations=600, **FIT)
        assert rmse(est.log_ratio(xq), truth) < 0.25


@pytest.mark.slow
def test_two_sided_tangent_learns_nonstandard_denominator():
    torch.manual_seed(0)
    mu = torch.tensor([1.0, -1.0])
    x_num, x_den = torch.randn(4000, 2) * 0.7 + mu, torch.randn(4000, 2) * 1.5 + 2
    xq = torch.randn(1000, 2) * 0.7 + mu
    truth = (dist.Normal(mu, 0.7).log_prob(xq) - dist.Normal(2.0, 1.5).log_prob(xq)).sum(-1)
    est = TangentRatioEstimator(2, network="quadratic").fit(x_num, x_den, num_iterations=800, **FIT)
    assert rmse(est.log_ratio(xq, 16), truth) < 0.6
    assert abs(est.log_ratio(xq, 16).mean() - truth.mean()) < 0.3


# ------------------------------------------------------------------------------------------------
# mutual information, persistence, bad input
# ------------------------------------------------------------------------------------------------


def test_mutual_information_bivariate_normal():
    torch.manual_seed(0)
    rho = 0.8
    x = torch.randn(5000, 1)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(5000, 1)
    truth = -0.5 * math.log(1 - rho**2)
    est = ClassifierRatioEstimator(2, hidden_dim=64, num_layers=2)
    res = mutual_information(x, y, est, num_iterations=800, **FIT)
    assert 0 < res.stderr < 0.1
    assert abs(res.estimate - truth) < 0.1 + 3 * res.stderr
    assert res.log_ratio.shape == (1000,)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(100, 3) + 1
    for est in (ClassifierRatioEstimator(3, hidden_dim=16), TelescopingRatioEstimator(3, hidden_dim=16),
                ClassifierRatioEstimator(3, hidden_dim=16, quadratic=True),
                TangentRatioEstimator(3, network_options=dict(hidden_dim=16)),
                SecantRatioEstimator(3, network="quadratic", path="linear")):
        est.fit(x, torch.randn(100, 3), num_iterations=5, **FIT)
        est.save(tmp_path / "r.pt")
        back = type(est).load(tmp_path / "r.pt")
        assert torch.equal(back.log_ratio(x, 2), est.log_ratio(x, 2))
        assert back.losses == est.losses


def test_bad_input():
    est = TangentRatioEstimator(3)
    good = torch.randn(50, 3)
    with pytest.raises(ValueError, match="dimension 2, expected 3"):
        est.fit(torch.randn(50, 2), good)
    with pytest.raises(ValueError, match="dimension 4, expected 3"):
        est.fit(good, torch.randn(50, 4))
    bad = good.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        est.fit(bad, good)
    with pytest.raises(ValueError, match="at least"):
        est.fit(good[:3], good)
    with pytest.raises(TypeError, match="floating"):
        est.fit(good.long(), good)
    with pytest.raises(ValueError, match=r"\(num_samples, dim\)"):
        est.fit(good[0], good)
    with pytest.raises(RuntimeError, match="not fitted"):
        est.log_ratio(good)
    with pytest.raises(ValueError, match="needs denominator"):
        ClassifierRatioEstimator(3).fit(good)
    with pytest.raises(ValueError, match="dim must be"):
        TangentRatioEstimator(0)
    with pytest.raises(ValueError, match="quadrature"):
        TangentRatioEstimator(3, quadrature="simpson")
    with pytest.raises(ValueError, match="aligned_fraction"):
        SecantRatioEstimator(3, aligned_fraction=2.0)
    est.fit(good, good, num_iterations=2, **FIT)
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 3\)"):
        est.log_ratio(torch.randn(5, 2))
    with pytest.raises(ValueError, match="num_steps"):
        est.log_ratio(good, 0)
    with pytest.raises(ValueError, match="same number of samples"):
        mutual_information(torch.randn(50, 1), torch.randn(40, 1))
    with pytest.raises(ValueError, match="same kind of denominator"):
        est.fit(good, None, num_iterations=1, **FIT)


# ------------------------------------------------------------------------------------------------
# classifier: closed-form quadratic term, early stopping
# ------------------------------------------------------------------------------------------------


def test_classifier_quadratic_term_is_gaussian_log_ratio():
    """Before the network has learned anything the logit is the closed-form Gaussian log ratio."""
    torch.manual_seed(0)
    p_num = dist.MultivariateNormal(torch.tensor([0.5, -1.0]), torch.tensor([[1.0, 0.8], [0.8, 1.5]]))
    p_den = dist.MultivariateNormal(torch.tensor([0.0, 0.0]), torch.tensor([[2.0, 0.0], [0.0, 0.5]]))
    est = ClassifierRatioEstimator(2, hidden_dim=16, quadratic=True)
    est.fit(p_num.sample((200000,)), p_den.sample((200000,)), num_iterations=1, lr=1e-12, **FIT)
    assert int(est.quad_rank) == 2
    xq = p_num.sample((2000,))
    assert rmse(est.log_ratio(xq), p_num.log_prob(xq) - p_den.log_prob(xq)) < 0.05


def test_classifier_quadratic_term_ignores_noise():
    """Same distribution in 20 dims: every sample eigenvalue is inside the noise bulk, no mean shift."""
    torch.manual_seed(0)
    est = ClassifierRatioEstimator(20, hidden_dim=16, quadratic=True)
    est.fit(torch.randn(2000, 20), torch.randn(2000, 20), num_iterations=1, lr=1e-12, **FIT)
    assert int(est.quad_rank) == 0
    assert est.quad_matrix.abs().max() == 0 and est.quad_linear.abs().max() == 0


def test_classifier_early_stopping_restores_best_validation_weights():
    torch.manual_seed(0)
    x_num, x_den = torch.randn(16, 2), torch.randn(16, 2)  # same law: any fit is over-fitting
    val = (torch.randn(500, 2), torch.randn(500, 2))
    est = ClassifierRatioEstimator(2, hidden_dim=64, num_layers=2)
    est.fit(x_num, x_den, validation=val, validation_interval=10, num_iterations=300, lr=1e-2, **FIT)
    steps, losses = zip(*est.validation_losses)
    assert steps == tuple(range(0, 301, 10))
    best = min(range(len(losses)), key=losses.__getitem__)
    assert losses[-1] > losses[best] + 0.01  # it did over-fit ...
    with torch.no_grad():
        restored = (nn.functional.softplus(-est.log_ratio(val[0])).mean()
                    + nn.functional.softplus(est.log_ratio(val[1])).mean()).item()
    assert restored == pytest.approx(losses[best], abs=1e-5)  # ... and the best weights came back


def test_mutual_information_quadratic_classifier_with_validation():
    torch.manual_seed(0)
    cov = torch.full((10, 10), 0.5) + 0.5 * torch.eye(10)  # BMI's dense 5 x 5 task
    z = dist.MultivariateNormal(torch.zeros(10), cov).sample((3000,))
    truth = 0.5 * (2 * torch.logdet(cov[:5, :5]) - torch.logdet(cov)).item()
    est = ClassifierRatioEstimator(10, hidden_dim=32, num_layers=2, quadratic=True)
    res = mutual_information(z[:, :5], z[:, 5:], est, validation=0.2, num_iterations=200, **FIT)
    assert len(est.validation_losses) == 200 // 25 + 1
    assert abs(res.estimate - truth) < 0.08


def test_fit_stop_after_runs_a_prefix_of_the_schedule():
    torch.manual_seed(0)
    x_num, x_den = torch.randn(200, 2) + 1, torch.randn(200, 2)
    full = ClassifierRatioEstimator(2, hidden_dim=16, num_layers=1)
    part = copy.deepcopy(full)
    torch.manual_seed(1)
    full.fit(x_num, x_den, num_iterations=40, **FIT)
    torch.manual_seed(1)
    part.fit(x_num, x_den, num_iterations=40, stop_after=15, ema_decay=None, **FIT)
    assert len(part.losses) == 15
    assert part.losses == pytest.approx(full.losses[:15])  # same data, same schedule: same trajectory
    with pytest.raises(ValueError, match="stop_after"):
        ClassifierRatioEstimator(2).fit(x_num, x_den, num_iterations=10, stop_after=11, **FIT)


def test_mutual_information_refit_on_all_training_pairs():
    torch.manual_seed(0)
    x = torch.randn(2000, 2)
    y = x.square() - 1 + 0.5 * torch.randn(2000, 2)  # uncorrelated: the Gaussian term is zero, the MLP learns
    est = ClassifierRatioEstimator(4, hidden_dim=32, num_layers=2, quadratic=True)
    res = mutual_information(x, y, est, validation=0.2, refit=True, num_iterations=200, lr=1e-2, **FIT)
    best = min(est.validation_losses, key=lambda s: s[1])[0]
    assert best > 0
    assert res.estimator is not est  # a fresh copy was trained ...
    assert len(res.estimator.losses) == best  # ... for the early-stopped number of steps
    assert res.estimator.validation_losses == est.validation_losses
    assert 0.3 < res.estimate < 2.0
    with pytest.raises(ValueError, match="refit=True needs validation"):
        mutual_information(x, y, ClassifierRatioEstimator(4), refit=True)
    with pytest.raises(TypeError, match="refit must be a bool"):
        mutual_information(x, y, ClassifierRatioEstimator(4), validation=0.2, refit=1)


def test_classifier_bad_options():
    good = torch.randn(50, 3)
    with pytest.raises(TypeError, match="quadratic must be a bool"):
        ClassifierRatioEstimator(3, quadratic="yes")
    with pytest.raises(ValueError, match="validation_interval"):
        ClassifierRatioEstimator(3).fit(good, good, validation=(good, good), validation_interval=0, **FIT)
    with pytest.raises(ValueError, match="does not support validation"):
        TelescopingRatioEstimator(3).fit(good, good, validation=(good, good), **FIT)
    with pytest.raises(TypeError, match="validation must be a pair"):
        ClassifierRatioEstimator(3).fit(good, good, validation=good, **FIT)
    with pytest.raises(ValueError, match="dimension 2, expected 3"):
        ClassifierRatioEstimator(3).fit(good, good, validation=(good, good[:, :2]), **FIT)
    with pytest.raises(ValueError, match="ema_decay"):
        ClassifierRatioEstimator(3).fit(good, good, validation=(good, good), ema_decay=1.5, **FIT)
    with pytest.raises(ValueError, match="validation must be in"):
        mutual_information(good[:, :1], good[:, 1:], ClassifierRatioEstimator(3), validation=1.0)
    with pytest.raises(ValueError, match="does not support validation"):
        mutual_information(good[:, :1], good[:, 1:], TangentRatioEstimator(3), validation=0.2)
    with pytest.raises(ValueError, match="validation and"):
        mutual_information(good[:20, :1], good[:20, 1:], ClassifierRatioEstimator(3), validation=0.1)


# ------------------------------------------------------------------------------------------------
# Pyro integration
# ------------------------------------------------------------------------------------------------


def exact_shift_estimator(mu):
    """Classifier estimator whose network is the exact log N(x; mu, I) / N(x; 0, I)."""
    lin = nn.Linear(mu.shape[0], 1)
    with torch.no_grad():
        lin.weight.copy_(mu[None])
        lin.bias.fill_(-0.5 * float(mu @ mu))
    est = ClassifierRatioEstimator(mu.shape[0], network=nn.Sequential(lin, nn.Flatten(0)))
    est.fitted.fill_(True)
    return est


def test_ratio_tilted_log_prob_and_pyro():
    mu = torch.tensor([1.0, -2.0])
    est = exact_shift_estimator(mu)
    base = dist.Normal(torch.zeros(2), 1.0).to_event(1)
    tilted = RatioTilted(base, est)
    x = torch.randn(7, 2)
    assert torch.equal(tilted.log_prob(x), base.log_prob(x) + est.log_ratio(x))
    assert torch.allclose(tilted.log_prob(x), dist.Normal(mu, 1.0).to_event(1).log_prob(x), atol=1e-5)

    def model():
        pyro.sample("x", tilted)

    def factor_model():
        z = pyro.sample("x", base)
        pyro.factor("tilt", est.log_ratio(z))

    tr = pyro.poutine.trace(pyro.poutine.condition(model, {"x": x[0]})).get_trace()
    tr2 = pyro.poutine.trace(pyro.poutine.condition(factor_model, {"x": x[0]})).get_trace()
    assert torch.allclose(tr.log_prob_sum(), tr2.log_prob_sum())
    draws = RatioTilted(base, est, num_proposals=1000).sample((4000,))
    assert draws.shape == (4000, 2) and torch.allclose(draws.mean(0), mu, atol=0.15)
    assert tilted.expand((3,)).log_prob(x[:3]).shape == (3,)
    mcmc = MCMC(NUTS(model), num_samples=300, warmup_steps=150, disable_progbar=True)
    mcmc.run()
    assert torch.allclose(mcmc.get_samples()["x"].mean(0), mu, atol=0.3)


def test_ratio_tilted_bad_input():
    est = exact_shift_estimator(torch.zeros(2))
    with pytest.raises(ValueError, match="event_shape"):
        RatioTilted(dist.Normal(torch.zeros(3), 1.0).to_event(1), est)
    with pytest.raises(ValueError, match="fitted"):
        RatioTilted(dist.Normal(torch.zeros(2), 1.0).to_event(1), ClassifierRatioEstimator(2))


@pytest.mark.slow
def test_ratio_likelihood_gaussian_simulator():
    """theta ~ N(0, 1), x | theta ~ N(theta, 0.5^2): posterior N(0.8 x, 0.2)."""
    torch.manual_seed(0)

    def prior():
        pyro.sample("theta", dist.Normal(0.0, 1.0))

    def simulator(params):
        return (params["theta"] + 0.5 * torch.randn_like(params["theta"]))[:, None]

    lik = RatioLikelihood(prior, simulator, ClassifierRatioEstimator(2, hidden_dim=64, num_layers=2))
    lik.fit(20_000, num_iterations=1500, **FIT)
    x_obs = torch.tensor([0.8])
    theta = torch.randn(100_000)
    logw = lik.log_likelihood({"theta": theta}, x_obs)
    w = torch.softmax(logw, 0)
    mean = (w * theta).sum()
    std = (w * (theta - mean) ** 2).sum().sqrt()
    assert abs(mean - 0.64) < 0.08 and abs(std - math.sqrt(0.2)) < 0.06
    mcmc = MCMC(NUTS(lik.posterior_model(x_obs)), num_samples=300, warmup_steps=150, disable_progbar=True)
    mcmc.run()
    assert abs(mcmc.get_samples()["theta"].mean() - 0.64) < 0.15
