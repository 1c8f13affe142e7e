"""SDE models and SDEPath: closed-form transitions, Euler densities, shapes, expand, validation."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from scipy import stats

from pyro_sde.sde.distributions import DiscretelyObservedSDE, EulerMaruyama, SDEPath
from pyro_sde.sde.models import (
    CIR,
    SDE,
    GeometricBrownianMotion,
    KunitaFlow,
    LandmarkBrownian,
    OrnsteinUhlenbeck,
    TorchsdeModel,
    factor_from_g,
    linear_sde_moments,
)

D64 = torch.float64


def t64(x):
    return torch.tensor(x, dtype=D64)


class TestModels:
    def test_ou_transition_matches_closed_form(self):
        sde = OrnsteinUhlenbeck(theta=t64(2.0), mean=t64([0.5]), sigma=t64(0.7))
        x0, x1, t = t64([1.0]), t64([0.2]), 0.8
        mean = 0.5 + 0.5 * math.exp(-2 * t)
        var = 0.49 * (1 - math.exp(-4 * t)) / 4
        expected = stats.norm(mean, math.sqrt(var)).logpdf(0.2)
        assert sde.transition_log_prob(0.0, x0, t, x1).item() == pytest.approx(expected, rel=1e-10)

    def test_matrix_ou_equals_isotropic_and_lyapunov(self):
        d = 3
        iso = OrnsteinUhlenbeck(theta=t64(1.5), mean=t64([0.1, 0.2, 0.3]), sigma=t64(0.8), dim=d)
        mat = OrnsteinUhlenbeck(
            drift_matrix=1.5 * torch.eye(d, dtype=D64),
            mean=t64([0.1, 0.2, 0.3]),
            diffusion_matrix=0.8 * torch.eye(d, dtype=D64),
            dim=d,
        )
        x0, x1 = torch.randn(5, d, dtype=D64), torch.randn(5, d, dtype=D64)
        a, b = iso.transition_log_prob(0.0, x0, 0.7, x1), mat.transition_log_prob(0.0, x0, 0.7, x1)
        assert torch.allclose(a, b, atol=1e-10)
        # non-symmetric B: V solves B V + V B^T = a - e^{-Bt} a e^{-B^T t}
        B = t64([[1.0, 0.4, 0.0], [-0.3, 2.0, 0.1], [0.0, 0.2, 0.5]])
        S = t64([[0.5, 0.0, 0.0], [0.3, 0.7, 0.0], [0.1, 0.2, 0.9]])
        Q = S @ S.T
        E, _, V = linear_sde_moments(-B, torch.zeros(d, dtype=D64), Q, t64(1.3), diagonal=False)
        assert torch.allclose(E, torch.linalg.matrix_exp(-1.3 * B), atol=1e-12)
        assert torch.allclose(B @ V + V @ B.T, Q - E @ Q @ E.T, atol=1e-10)

    def test_gbm_lognormal(self):
        sde = GeometricBrownianMotion(t64(0.1), t64(0.4))
        expected = stats.lognorm(s=0.4, scale=math.exp(math.log(1.0) + (0.1 - 0.08))).logpdf(1.1)
        assert sde.transition_log_prob(0.0, t64([1.0]), 1.0, t64([1.1])).item() == pytest.approx(expected)

    def test_factor_is_a_square_root_without_gram(self):
        g = torch.randn(4, 3, 5, dtype=D64)
        L = factor_from_g(g, diagonal=False)
        assert torch.allclose(L.matrix(), g @ g.transpose(-1, -2), atol=1e-10)
        r = torch.randn(4, 3, dtype=D64)
        assert torch.allclose(L.matvec(L.solve(r)), r, atol=1e-10)
        expected = torch.distributions.MultivariateNormal(torch.zeros(3, dtype=D64), g @ g.mT).log_prob(r)
        assert torch.allclose(L.log_normal(r), expected, atol=1e-10)

    def test_landmark_brownian_exact_gaussian(self):
        q = torch.randn(5, 2, dtype=D64)
        sde = LandmarkBrownian(q, t64(0.3), alpha=1.0, gamma=0.5)
        g = sde.g(0.0, torch.zeros(10, dtype=D64))
        cov = 0.7 * g @ g.T
        x0, x1 = torch.randn(10, dtype=D64), torch.randn(10, dtype=D64)
        expected = torch.distributions.MultivariateNormal(x0, cov).log_prob(x1)
        assert sde.transition_log_prob(0.0, x0, 0.7, x1).item() == pytest.approx(expected.item(), rel=1e-8)

    def test_kunita_diffusion_depends_on_state(self):
        sde = KunitaFlow(4, t64(0.5), gamma=0.3)
        x = torch.randn(3, 8, dtype=D64)
        g = sde.g(0.0, x)
        assert g.shape == (3, 8, 8)
        assert not torch.allclose(g[0], g[1])
        assert torch.allclose(g[0], g[0].T)

    def test_batch_shape_and_broadcasting(self):
        sde = OrnsteinUhlenbeck(
            theta=torch.rand(4, 1, dtype=D64) + 0.5, mean=0.0, sigma=torch.rand(3, dtype=D64) + 0.5, dim=2
        )
        assert sde.batch_shape == (4, 3)
        assert sde.f(0.0, torch.zeros(7, 4, 3, 2, dtype=D64)).shape == (7, 4, 3, 2)

    def test_autograd_linearisation_matches_override(self):
        sde = CIR(t64(1.3), t64(0.9), t64(0.5))
        v = t64([[1.2], [0.7]])
        aux = SDE.linear_auxiliary(sde, 0.0, v)
        own = sde.linear_auxiliary(0.0, v)
        assert torch.allclose(aux.drift_matrix[..., 0, 0], own.drift_matrix[..., 0])
        assert torch.allclose(aux.drift_offset, own.drift_offset)
        assert torch.allclose(aux.diffusion[..., 0, 0], own.diffusion[..., 0])

    def test_bad_parameters(self):
        with pytest.raises(ValueError, match="positive"):
            OrnsteinUhlenbeck(theta=t64(-1.0), sigma=1.0)
        with pytest.raises(ValueError, match="exactly one"):
            OrnsteinUhlenbeck(sigma=1.0)
        with pytest.raises(ValueError, match="NaN"):
            GeometricBrownianMotion(t64(math.nan), 1.0)
        with pytest.raises(ValueError, match="trailing"):
            OrnsteinUhlenbeck(theta=1.0, mean=torch.zeros(3), sigma=1.0, dim=2)
        with pytest.raises(ValueError, match="dim"):
            OrnsteinUhlenbeck(theta=1.0, sigma=1.0, dim=0)


class _UserOU(SDE):
    """A user-written SDE (the OU process) on the torchsde protocol."""

    noise_type = "diagonal"

    def __init__(self, theta, sigma):
        super().__init__(1)
        self.register_params(theta=(theta, 0), sigma=(sigma, 0))

    def f(self, t, y):
        return -self.theta[..., None] * y

    def g(self, t, y):
        return self.sigma[..., None].expand(y.shape)


class TestSDEPath:
    def test_log_prob_is_the_euler_density(self):
        sde = OrnsteinUhlenbeck(theta=t64(1.5), mean=t64([0.3]), sigma=t64(0.6))
        times = t64([0.0, 0.1, 0.3, 0.35])
        init = dist.Normal(t64([0.0]), 1.0).to_event(1)
        d = SDEPath(sde, times, init)
        x = torch.randn(2, 4, 1, dtype=D64)
        expected = init.log_prob(x[:, 0])
        for k in range(3):
            dt = times[k + 1] - times[k]
            loc = x[:, k, 0] - dt * 1.5 * (x[:, k, 0] - 0.3)
            expected = expected + dist.Normal(loc, 0.6 * dt.sqrt()).log_prob(x[:, k + 1, 0])
        assert torch.allclose(d.log_prob(x), expected, atol=1e-12)

    def test_euler_density_converges_to_the_ou_transition(self):
        # p(x1 | x0) = int prod Euler; check instead: log_prob of a 1-step path -> exact as dt -> 0
        sde = OrnsteinUhlenbeck(theta=t64(2.0), mean=0.0, sigma=t64(1.0))
        errors = []
        for dt in (0.1, 0.01, 0.001):
            x0, x1 = t64([[1.0]]), t64([[1.0 - 2.0 * dt + 0.3 * math.sqrt(dt)]])
            path = SDEPath(sde, t64([0.0, dt]), x0[0]).log_prob(torch.stack([x0, x1], -2))
            errors.append((path - sde.transition_log_prob(0.0, x0, dt, x1)).abs().item())
        assert errors[2] < errors[1] < errors[0] and errors[2] < 5e-3

    def test_fine_grid_samples_match_the_ou_marginal(self):
        sde = OrnsteinUhlenbeck(theta=t64(2.0), mean=t64([0.5]), sigma=t64(1.0))
        times = torch.linspace(0, 1, 201, dtype=D64)
        x = SDEPath(sde, times, t64([1.0])).sample((20000,))
        assert x.shape == (20000, 201, 1)
        mean, var = 0.5 + 0.5 * math.exp(-2), (1 - math.exp(-4)) / 4
        se = math.sqrt(var / 20000)
        assert abs(x[:, -1, 0].mean().item() - mean) < 4 * se
        assert x[:, -1, 0].var().item() == pytest.approx(var, rel=0.05)

    def test_torchsde_backend(self):
        sde = OrnsteinUhlenbeck(theta=t64(2.0), mean=0.0, sigma=t64(1.0), dim=2)
        times = torch.linspace(0, 1, 11, dtype=D64)
        x = SDEPath(sde, times, t64([1.0, -1.0]), backend="torchsde").sample((4000,))
        assert x.shape == (4000, 11, 2)
        assert x[:, 0].eq(t64([1.0, -1.0])).all()
        euler_mean = (1 - 0.2) ** 10  # the Euler chain mean on this grid
        assert x[:, -1, 0].mean().item() == pytest.approx(euler_mean, abs=0.03)
        with pytest.raises(ValueError, match="uniform"):
            SDEPath(sde, t64([0.0, 0.1, 0.5]), t64([1.0, 1.0]), backend="torchsde").sample()

    def test_batch_shapes_expand_and_numpyro_order(self):
        theta = torch.rand(3, dtype=D64) + 0.5
        sde = OrnsteinUhlenbeck(theta=theta, mean=0.0, sigma=t64(1.0), dim=2)
        times = torch.linspace(0, 1, 5, dtype=D64)
        d = EulerMaruyama(times, sde, dist.Normal(torch.zeros(2, dtype=D64), 1.0).to_event(1))
        assert d.batch_shape == (3,) and d.event_shape == (5, 2)
        x = d.sample((6,))
        assert x.shape == (6, 3, 5, 2)
        assert d.log_prob(x).shape == (6, 3)
        e = d.expand((4, 3))
        assert e.batch_shape == (4, 3)
        assert e.sample().shape == (4, 3, 5, 2)
        lp = e.log_prob(x[0])
        assert lp.shape == (4, 3) and torch.allclose(lp[2], d.log_prob(x[0]))
        # rsample is reparametrised in the parameters
        theta.requires_grad_(True)
        sde2 = OrnsteinUhlenbeck(theta=theta, mean=0.0, sigma=t64(1.0), dim=2)
        SDEPath(sde2, times, t64([1.0, 1.0])).rsample().sum().backward()
        assert theta.grad is not None and torch.isfinite(theta.grad).all()

    def test_user_sde_and_torchsde_wrapper(self):
        class Plain:
            noise_type, sde_type = "diagonal", "ito"

            def f(self, t, y):
                return -2.0 * y

            def g(self, t, y):
                return torch.ones_like(y)

        times = t64([0.0, 0.2, 0.5])
        x = torch.randn(7, 3, 1, dtype=D64)
        ou = OrnsteinUhlenbeck(theta=t64(2.0), mean=0.0, sigma=t64(1.0))
        ref = SDEPath(ou, times, t64([0.0])).log_prob(x)
        for sde in (_UserOU(t64(2.0), t64(1.0)), TorchsdeModel(Plain(), 1)):
            assert torch.allclose(SDEPath(sde, times, t64([0.0])).log_prob(x), ref)

    def test_inside_a_pyro_model(self):
        times = torch.linspace(0, 1, 6, dtype=D64)

        def model(x):
            theta = pyro.sample("theta", dist.LogNormal(t64(0.0), 1.0))
            sde = OrnsteinUhlenbeck(theta=theta, mean=0.0, sigma=t64(1.0))
            return pyro.sample("x", SDEPath(sde, times, t64([0.0])), obs=x)

        x = SDEPath(OrnsteinUhlenbeck(theta=1.0, sigma=1.0), times, t64([0.0])).sample()
        trace = pyro.poutine.trace(model).get_trace(x)
        trace.compute_log_prob()
        assert torch.isfinite(trace.nodes["x"]["log_prob_sum"])

    def test_validation(self):
        sde = OrnsteinUhlenbeck(theta=1.0, sigma=1.0, dim=2)
        with pytest.raises(ValueError, match="strictly increasing"):
            SDEPath(sde, t64([0.0, 0.5, 0.4]), t64([0.0, 0.0]))
        with pytest.raises(ValueError, match="at least 2"):
            SDEPath(sde, t64([0.0]), t64([0.0, 0.0]))
        with pytest.raises(ValueError, match="trailing dimension 2"):
            SDEPath(sde, t64([0.0, 1.0]), t64([0.0]))
        d = SDEPath(sde, t64([0.0, 1.0, 2.0]), t64([0.0, 0.0]))
        with pytest.raises(ValueError, match="times x state dim"):
            d.log_prob(torch.zeros(3, 3, dtype=D64))
        x = torch.zeros(3, 2, dtype=D64)
        x[1, 0] = math.nan
        with pytest.raises(ValueError, match="NaN"):
            d.log_prob(x)
        with pytest.raises(TypeError, match="SDE"):
            SDEPath(object(), t64([0.0, 1.0]), t64([0.0]))
        with pytest.raises(ValueError, match="unknown proposal"):
            DiscretelyObservedSDE(sde, t64([0.0, 1.0]), proposal="nope")
        with pytest.raises(ValueError, match="closed-form"):
            DiscretelyObservedSDE(KunitaFlow(2, t64(0.5), gamma=0.3), t64([0.0, 1.0]), proposal="exact")
