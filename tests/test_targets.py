import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from scipy import integrate, stats

from pyro_sde.targets import (
    GMM9,
    Funnel,
    Gaussian,
    GaussianMixture,
    ManyWell,
    Target,
    get_target,
    target_names,
)

D64 = torch.float64
COV2 = [[2.0, 0.6], [0.6, 0.5]]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _grid_integrals(target, lo, hi, n):
    """log Z and marginal stds of exp(log_prob) by the 2-D trapezoid rule on [lo, hi]^2."""
    t = torch.linspace(lo, hi, n, dtype=D64)
    xx = torch.stack(torch.meshgrid(t, t, indexing="ij"), -1)
    p = target.log_prob(xx).exp()
    h = (hi - lo) / (n - 1)

    def integral(f):
        return torch.trapezoid(torch.trapezoid(f, dx=h, dim=-1), dx=h)

    Z = integral(p)
    mean = torch.stack([integral(p * xx[..., j]) for j in range(2)]) / Z
    var = torch.stack([integral(p * (xx[..., j] - mean[j]) ** 2) for j in range(2)]) / Z
    return Z.log().item(), var.sqrt()


def _grid_log_Z(target, lo, hi, n):
    return _grid_integrals(target, lo, hi, n)[0]


def _assert_moments(x, mean, std, k=4.0):
    """Sample mean and variance within k standard errors (var's s.e. from the 4th moment)."""
    n = x.shape[0]
    xm = x.mean(0)
    xs = x.std(0)
    assert ((xm - mean).abs() <= k * std / math.sqrt(n)).all(), (xm, mean)
    m4 = ((x - xm) ** 4).mean(0)
    se_var = ((m4 - xs**4) / n).sqrt()
    assert ((xs**2 - std**2).abs() <= k * se_var).all(), (xs, std)


# ------------------------------------------------------------------------------------------------
# log Z
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "delta, log_Z1, well_std", [(4.0, -0.108211, 1.983458), (2.0, 0.293002, 1.354748)]
)
def test_manywell_log_Z1_reference_constants(delta, log_Z1, well_std):
    mw = ManyWell(dim=1, num_wells=1, delta=delta)
    assert abs(mw.log_Z1 - log_Z1) < 1e-5
    assert abs(mw.log_Z - log_Z1) < 1e-5
    assert abs(mw.marginal_std.item() - well_std) < 1e-5


def test_manywell_log_Z_reference_constants():
    mw = ManyWell(dim=5, num_wells=5, delta=4.0)
    assert abs(mw.log_Z + 0.541056) < 1e-5
    assert abs(mw.marginal_std.mean().item() - 1.9835) < 1e-4
    assert mw.num_modes == 32
    mw = ManyWell(dim=50, num_wells=5, delta=2.0)
    assert abs(mw.log_Z - 42.817243) < 1e-5
    assert abs(mw.marginal_std.mean().item() - 1.0355) < 1e-4
    assert get_target("manywell").log_Z == ManyWell().log_Z


@pytest.mark.parametrize("delta", [4.0, 2.0, 0.5, -1.0])
def test_manywell_1d_log_Z_and_std_vs_scipy_quad(delta):
    mw = ManyWell(dim=1, num_wells=1, delta=delta)

    def rho(x):
        return math.exp(mw.log_prob(torch.tensor([x], dtype=D64)).item())

    Z = integrate.quad(rho, -math.inf, math.inf, epsabs=1e-13, epsrel=1e-12)[0]
    m2 = integrate.quad(lambda x: x * x * rho(x), -math.inf, math.inf, epsrel=1e-12)[0]
    assert abs(mw.log_Z - math.log(Z)) < 1e-9
    assert abs(mw.marginal_std.item() - math.sqrt(m2 / Z)) < 1e-8


def test_manywell_2d_log_Z_vs_grid_quadrature():
    mw = ManyWell(dim=2, num_wells=1, delta=2.0)
    assert abs(_grid_log_Z(mw, -9.0, 9.0, 901) - mw.log_Z) < 1e-8


def test_gmm9_log_Z_and_moments_vs_grid_quadrature():
    g = GMM9()
    assert g.log_Z == 0.0 and g.dim == 2 and g.num_modes == 9
    log_Z, std = _grid_integrals(g, -10.0, 10.0, 501)
    assert abs(log_Z) < 1e-8
    torch.testing.assert_close(std, g.marginal_std, rtol=1e-8, atol=0)
    torch.testing.assert_close(g.marginal_std, torch.full((2,), math.sqrt(0.3 + 50 / 3), dtype=D64))
    assert abs(g.marginal_std[0].item() - 4.119) < 5e-4
    torch.testing.assert_close(g.mean, torch.zeros(2, dtype=D64))


def test_gaussian_2d_log_Z_vs_grid_quadrature():
    g = Gaussian([0.5, -1.0], covariance=COV2, log_Z=1.3)
    log_Z, std = _grid_integrals(g, -9.0, 9.0, 901)
    assert abs(log_Z - 1.3) < 1e-8
    torch.testing.assert_close(std, g.marginal_std, rtol=1e-6, atol=0)
    g = Gaussian([0.5, -1.0], scale=[1.5, 0.4], log_Z=-2.0)
    assert abs(_grid_log_Z(g, -9.0, 9.0, 901) + 2.0) < 1e-8


@pytest.mark.parametrize("sigma", [1.0, 3.0])
def test_funnel_2d_log_Z_vs_grid_quadrature(sigma):
    # x_2 = e^{x_1/2} u: a change of variables (Jacobian e^{x_1/2}) lets one grid resolve the neck
    f = Funnel(dim=2, sigma=sigma)
    x1 = torch.linspace(-9 * sigma, 9 * sigma, 2001, dtype=D64)
    u = torch.linspace(-12.0, 12.0, 801, dtype=D64)
    x2 = torch.exp(x1 / 2)[:, None] * u
    x = torch.stack([x1[:, None].expand_as(x2), x2], -1)
    p = f.log_prob(x).exp() * torch.exp(x1 / 2)[:, None]
    Z = torch.trapezoid(torch.trapezoid(p, u, dim=-1), x1)
    assert abs(Z.log().item() - f.log_Z) < 1e-8


# ------------------------------------------------------------------------------------------------
# log_prob consistency with torch / Pyro distributions
# ------------------------------------------------------------------------------------------------


def test_gaussian_log_prob_matches_multivariate_normal():
    x = torch.randn(3, 4, 2, dtype=D64, generator=_gen()) * 2
    loc = torch.tensor([0.5, -1.0], dtype=D64)
    g = Gaussian(loc, covariance=COV2, log_Z=0.7)
    ref = torch.distributions.MultivariateNormal(loc, torch.tensor(COV2, dtype=D64))
    torch.testing.assert_close(g.log_prob(x) - 0.7, ref.log_prob(x))
    g = Gaussian(loc, scale=[1.5, 0.4])
    ref = torch.distributions.Normal(loc, torch.tensor([1.5, 0.4], dtype=D64))
    torch.testing.assert_close(g.log_prob(x), ref.log_prob(x).sum(-1))
    torch.testing.assert_close(g.marginal_std, torch.tensor([1.5, 0.4], dtype=D64))
    g = Gaussian(torch.zeros(2))  # unit scale
    torch.testing.assert_close(
        g.log_prob(x), torch.distributions.Normal(0.0, 1.0).log_prob(x).sum(-1)
    )


def test_gmm9_log_prob_matches_mixture_same_family():
    x = torch.randn(5, 7, 2, dtype=D64, generator=_gen()) * 5
    locs = torch.tensor([[a, b] for a in (-5.0, 0.0, 5.0) for b in (-5.0, 0.0, 5.0)], dtype=D64)
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(torch.full((9,), 1 / 9, dtype=D64)),
        torch.distributions.Independent(torch.distributions.Normal(locs, math.sqrt(0.3)), 1),
    )
    torch.testing.assert_close(GMM9().log_prob(x), ref.log_prob(x))


def test_weighted_mixture_log_prob_moments_and_modes():
    locs = torch.tensor([[-3.0, 0.0, 1.0], [4.0, 1.0, -2.0]], dtype=D64)
    scale, w = torch.tensor([0.5, 1.5], dtype=D64), torch.tensor([1.0, 3.0], dtype=D64)
    gm = GaussianMixture(locs, scale=scale, weights=w, log_Z=-0.4)
    ref = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(w / 4),
        torch.distributions.Independent(torch.distributions.Normal(locs, scale[:, None]), 1),
    )
    x = torch.randn(100, 3, dtype=D64, generator=_gen()) * 3
    torch.testing.assert_close(gm.log_prob(x) + 0.4, ref.log_prob(x))
    torch.testing.assert_close(gm.mean, ref.mean)
    torch.testing.assert_close(gm.marginal_std, ref.variance.sqrt())
    torch.testing.assert_close(gm.mode_weights, torch.tensor([0.25, 0.75], dtype=D64))
    assert gm.mode_index(locs).tolist() == [0, 1]


def test_funnel_log_prob_matches_hierarchical_normals():
    f = Funnel(dim=4, sigma=3.0)
    x = torch.randn(6, 4, dtype=D64, generator=_gen())
    ref = torch.distributions.Normal(0.0, 3.0).log_prob(x[:, 0]) + torch.distributions.Normal(
        0.0, torch.exp(x[:, :1] / 2)
    ).log_prob(x[:, 1:]).sum(-1)
    torch.testing.assert_close(f.log_prob(x), ref)
    torch.testing.assert_close(
        f.marginal_std, torch.tensor([3.0] + [math.exp(9 / 4)] * 3, dtype=D64)
    )


def test_manywell_log_prob_formula():
    mw = ManyWell(dim=4, num_wells=2, delta=3.0)
    x = torch.randn(6, 4, dtype=D64, generator=_gen())
    ref = -((x[:, :2] ** 2 - 3.0) ** 2).sum(-1) - 0.5 * (x[:, 2:] ** 2).sum(-1)
    torch.testing.assert_close(mw.log_prob(x), ref)


# ------------------------------------------------------------------------------------------------
# exact samplers
# ------------------------------------------------------------------------------------------------

N = 200_000


@pytest.mark.parametrize(
    "target",
    [
        Gaussian([0.5, -1.0], covariance=COV2, log_Z=3.0),
        Gaussian([2.0, 0.0, -1.0], scale=[0.1, 1.0, 3.0]),
        GMM9(),
        GaussianMixture([[-3.0, 0.0], [4.0, 1.0]], scale=[0.5, 1.5], weights=[1.0, 3.0]),
        Funnel(dim=3, sigma=1.0),  # sigma = 3 is too heavy-tailed for a moment test
        ManyWell(dim=5, num_wells=5, delta=4.0),
        ManyWell(dim=8, num_wells=3, delta=2.0),
    ],
    ids=repr,
)
def test_sampler_moments(target):
    x = target.sample(N, generator=_gen(1))
    assert x.shape == (N, target.dim) and x.dtype == D64
    _assert_moments(x, target.mean, target.marginal_std)


def test_gaussian_sampler_covariance():
    g = Gaussian([0.5, -1.0], covariance=COV2)
    x = g.sample(N, generator=_gen(2))
    torch.testing.assert_close(torch.cov(x.T), g.covariance, atol=0.02, rtol=0)


@pytest.mark.parametrize("target", [GMM9(), ManyWell(dim=5, num_wells=5, delta=4.0)], ids=repr)
def test_sampler_mode_weights(target):
    x = target.sample(N, generator=_gen(3))
    counts = torch.bincount(target.mode_index(x), minlength=target.num_modes).to(D64)
    expected = N * target.mode_weights
    assert torch.allclose(target.mode_weights.sum(), torch.tensor(1.0, dtype=D64))
    assert counts.shape == expected.shape
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert stats.chi2.sf(chi2, target.num_modes - 1) > 1e-3
    if isinstance(target, ManyWell):
        assert ((counts / N - 1 / 32).abs() < 0.002).all()


def _manywell_cdf(delta):
    """CDF of exp(-(x^2 - delta)^2) / Z_1 by an independent grid (cumulative Simpson on [-7, 7])."""
    x = np.linspace(-7.0, 7.0, 140_001)
    c = integrate.cumulative_simpson(np.exp(-((x * x - delta) ** 2)), x=x, initial=0.0)
    return lambda q: np.interp(q, x, c / c[-1])


@pytest.mark.parametrize("delta", [4.0, 2.0])
def test_manywell_1d_sampler_ks(delta):
    x = ManyWell(dim=1, num_wells=1, delta=delta).sample(50_000, generator=_gen(4))[:, 0].numpy()
    assert stats.kstest(x, _manywell_cdf(delta)).pvalue > 1e-3
    # the test has power: a slightly different well is rejected
    assert stats.kstest(x, _manywell_cdf(delta * 1.05)).pvalue < 1e-6


def test_gmm9_and_funnel_samplers_ks():
    x = GMM9().sample(50_000, generator=_gen(5)).numpy()
    s = math.sqrt(0.3)

    def cdf(q, s=s):
        return sum(stats.norm.cdf(q, m, s) for m in (-5.0, 0.0, 5.0)) / 3

    for j in range(2):
        assert stats.kstest(x[:, j], cdf).pvalue > 1e-3
    assert stats.kstest(x[:, 0], lambda q: cdf(q, s=0.75)).pvalue < 1e-6  # has power
    f = Funnel(dim=10, sigma=3.0)
    x = f.sample(50_000, generator=_gen(6))
    assert stats.kstest(x[:, 0].numpy(), stats.norm(0, 3).cdf).pvalue > 1e-3
    z = (x[:, 1:] * torch.exp(-x[:, :1] / 2)).flatten().numpy()  # standardised x_{2:d} | x_1
    assert stats.kstest(z, stats.norm.cdf).pvalue > 1e-3
    z_wrong = (x[:, 1:] * torch.exp(x[:, :1] / 2)).flatten().numpy()  # the mirrored (DDS) funnel
    assert stats.kstest(z_wrong, stats.norm.cdf).pvalue < 1e-6


def test_sample_generator_dtype_device():
    for target in [Gaussian([0.0, 1.0], covariance=COV2), GMM9(), Funnel(4), ManyWell(3, 2)]:
        a = target.sample(10, generator=_gen(7))
        b = target.sample(10, generator=_gen(7))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        x32 = target.sample(10, generator=_gen(7), dtype=torch.float32)
        assert x32.dtype == torch.float32 and x32.shape == (10, target.dim)
        assert target.sample(0).shape == (0, target.dim)
        if torch.cuda.is_available():
            gen = torch.Generator(device="cuda").manual_seed(0)
            xc = target.sample(10, generator=gen)
            assert xc.is_cuda and target.log_prob(xc).is_cuda and target.mode_index(xc).is_cuda


# ------------------------------------------------------------------------------------------------
# the Pyro model
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target", [GMM9(), Funnel(4), ManyWell(5, 3), Gaussian([1.0, 2.0])], ids=repr
)
def test_model_vectorises_under_plate(target):
    x = target.sample(7, generator=_gen(8))

    def vectorised():
        with pyro.plate("p", 7, dim=-1):
            return target.model()

    tr = poutine.trace(poutine.condition(vectorised, data={"x": x})).get_trace()
    tr.compute_log_prob()
    per_particle = sum(site["log_prob"] for site in tr.nodes.values() if site["type"] == "sample")
    assert per_particle.shape == (7,)
    torch.testing.assert_close(per_particle, target.log_prob(x))
    assert tr.nodes["x"]["fn"].support is dist.constraints.real_vector


def test_model_marginal_likelihood_is_exp_log_Z():
    target = Gaussian([1.0, -0.5], covariance=COV2, log_Z=0.8)
    n = 20_000
    q = dist.MultivariateNormal(
        torch.tensor([1.0, -0.5], dtype=D64), 2.0 * torch.tensor(COV2, dtype=D64)
    )

    def guide():
        with pyro.plate("p", n, dim=-1):
            pyro.sample("x", q)

    def model():
        with pyro.plate("p", n, dim=-1):
            target.model()

    guide_tr = poutine.trace(guide).get_trace()
    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace()
    model_tr.compute_log_prob()
    guide_tr.compute_log_prob()
    log_w = sum(s["log_prob"] for s in model_tr.nodes.values() if s["type"] == "sample")
    log_w = log_w - guide_tr.nodes["x"]["log_prob"]
    est = (torch.logsumexp(log_w, 0) - math.log(n)).item()
    assert abs(est - 0.8) < 0.02


# ------------------------------------------------------------------------------------------------
# dtype / validation / registry
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        Gaussian([0.0, 1.0], covariance=COV2),
        Gaussian([0.0, 1.0], 2.0),
        GMM9(),
        Funnel(3),
        ManyWell(3, 2),
    ],
    ids=repr,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_log_prob_dtype_shape_and_validation(target, dtype):
    x = torch.randn(4, 5, target.dim, generator=_gen(9)).to(dtype)
    lp = target.log_prob(x)
    assert lp.dtype == dtype and lp.shape == (4, 5) and torch.isfinite(lp).all()
    torch.testing.assert_close(target(x), lp)
    torch.testing.assert_close(lp.double(), target.log_prob(x.double()), rtol=1e-5, atol=1e-4)
    assert target.log_prob(x[0, 0]).shape == ()
    mi = target.mode_index(x)
    assert mi.dtype == torch.long and mi.shape == (4, 5)
    assert ((mi >= 0) & (mi < target.num_modes)).all()
    assert target.mean.dtype == D64 and target.marginal_std.shape == (target.dim,)
    assert isinstance(target, Target) and isinstance(target.log_Z, float)
    with pytest.raises(ValueError, match="shape"):
        target.log_prob(torch.zeros(4, target.dim + 1, dtype=dtype))
    with pytest.raises(ValueError):
        target.log_prob(torch.tensor(0.0))


def test_mode_index_structure():
    g = GMM9()
    assert g.mode_index(g.locs + 0.3).tolist() == list(range(9))
    torch.testing.assert_close(g.mode_weights, torch.full((9,), 1 / 9, dtype=D64))
    mw = ManyWell(dim=4, num_wells=3)
    signs = torch.tensor([[1.0, -1.0, -1.0, 5.0], [-1.0, 1.0, 1.0, -5.0], [2.0, 2.0, 2.0, 0.0]])
    assert mw.mode_index(signs).tolist() == [1, 6, 7]
    assert Funnel().num_modes == 1 and Gaussian([0.0]).mode_weights.tolist() == [1.0]


def test_bad_arguments():
    with pytest.raises(ValueError):
        Gaussian([0.0, 0.0], scale=1.0, covariance=COV2)
    with pytest.raises(ValueError):
        Gaussian([0.0, 0.0], covariance=[[1.0, 2.0], [2.0, 1.0]])  # not positive definite
    with pytest.raises(ValueError):
        Gaussian([0.0, 0.0], scale=[1.0, -1.0])
    with pytest.raises(ValueError):
        GaussianMixture([[0.0, 0.0]], weights=[0.0])
    with pytest.raises(ValueError):
        ManyWell(dim=2, num_wells=3)
    with pytest.raises(ValueError):
        Funnel(dim=1)
    with pytest.raises(ValueError):
        GMM9().sample(-1)


def test_registry():
    assert {"gaussian", "gmm9", "funnel", "manywell"} <= set(target_names())
    assert isinstance(get_target("gmm9"), GMM9)
    f = get_target("funnel", dim=5, sigma=1.0)
    assert isinstance(f, Funnel) and f.dim == 5 and f.sigma == 1.0
    mw = get_target("ManyWell", dim=50, num_wells=5, delta=2.0)
    assert abs(mw.log_Z - 42.817243) < 1e-5
    assert get_target("gaussian", loc=[0.0, 0.0], log_Z=2.0).log_Z == 2.0
    with pytest.raises(ValueError, match="unknown target"):
        get_target("banana")
