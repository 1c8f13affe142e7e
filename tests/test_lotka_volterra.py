"""StochasticLotkaVolterra: the log-scale model is the Ito transform of the natural one, Euler moments, bridge
likelihoods converging to one continuous-time density, and the benchmark's data-augmentation potential."""

import math
import runpy
from pathlib import Path

import pyro
import pytest
import torch

from pyro_sde.sde import SDEPath, StochasticLotkaVolterra, bridge_log_prob, bridge_log_weights

D64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]
THETA = {"alpha": 1.0, "beta": 0.5, "gamma": 1.0, "delta": 0.5, "sigma": 0.3}


def t64(x):
    return torch.tensor(x, dtype=D64)


def lv(log_scale=True, **overrides):
    params = {k: t64(v) for k, v in {**THETA, **overrides}.items()}
    return StochasticLotkaVolterra(**params, log_scale=log_scale)


class TestModel:
    def test_shapes_follow_the_parameters_batch(self):
        alpha = t64([1.0, 1.5, 2.0])
        sde = StochasticLotkaVolterra(alpha, t64(0.5), t64(1.0), t64(0.5), t64([0.1, 0.2, 0.3]))
        assert sde.batch_shape == (3,) and sde.dim == 2
        y = torch.randn(4, 3, 2, dtype=D64)
        assert sde.f(0.0, y).shape == (4, 3, 2) and sde.g(0.0, y).shape == (4, 3, 2)
        assert sde.state_independent_diffusion
        factor = sde.diffusion_factor(None, None).tril
        assert torch.equal(factor, t64([0.1, 0.2, 0.3]).unsqueeze(-1).expand(3, 2))
        nat = StochasticLotkaVolterra(alpha, log_scale=False)
        assert not nat.state_independent_diffusion
        assert nat.diffusion_factor(0.0, y.exp()).tril.shape == (4, 3, 2)
        assert sde.f(0.0, y).dtype == D64

    def test_drift_is_lotka_volterra(self):
        sde = lv(log_scale=False)
        x = t64([[3.0, 1.0]])
        a, b, c, d = (THETA[k] for k in ("alpha", "beta", "gamma", "delta"))
        expected = t64([[3.0 * (a - b * 1.0), 1.0 * (d * 3.0 - c)]])
        assert torch.allclose(sde.f(0.0, x), expected, atol=1e-14)
        assert torch.allclose(sde.g(0.0, x), 0.3 * x, atol=1e-14)

    def test_log_scale_is_the_ito_transform(self):
        # Y = log X: drift f_X / x - g_X^2 / (2 x^2), diffusion g_X / x (Ito's formula, coordinatewise)
        log_sde, nat = lv(), lv(log_scale=False)
        x = torch.rand(50, 2, dtype=D64) * 5 + 0.1
        f_nat, g_nat = nat.f(0.0, x), nat.g(0.0, x)
        assert torch.allclose(log_sde.f(0.0, x.log()), f_nat / x - 0.5 * (g_nat / x) ** 2, atol=1e-12)
        assert torch.allclose(log_sde.g(0.0, x.log()), g_nat / x, atol=1e-12)

    @pytest.mark.parametrize("name", list(THETA))
    def test_non_positive_parameter_raises_naming_it(self, name):
        with pytest.raises(ValueError, match=name):
            lv(**{name: -1.0})

    def test_log_scale_must_be_bool(self):
        with pytest.raises(TypeError, match="log_scale"):
            StochasticLotkaVolterra(log_scale="yes")

    def test_short_time_moments_of_the_log_scale_euler_chain_are_the_natural_models(self):
        # E[X_h - x] / h -> f_X(x) and Cov / h -> diag(g_X^2): fails without the -sigma^2 / 2 of the log drift
        # (sigma = 0.8 makes it 0.32 x, 8 standard errors)
        sde, nat = lv(sigma=0.8), lv(log_scale=False, sigma=0.8)
        x0, h, n = t64([2.0, 1.5]), 0.004, 400_000
        pyro.set_rng_seed(0)
        y = SDEPath(sde, torch.linspace(0, h, 9, dtype=D64), x0.log()).rsample((n,))[:, -1]
        dx = y.exp() - x0
        drift, se = dx.mean(0) / h, dx.std(0) / (h * math.sqrt(n))
        assert torch.all((drift - nat.f(0.0, x0)).abs() < 4 * se + 0.02), (drift, nat.f(0.0, x0), se)
        var = dx.var(0) / h
        assert torch.allclose(var, nat.g(0.0, x0) ** 2, rtol=0.03)
        assert torch.all(torch.isfinite(y))


class TestBridgeLikelihood:
    """One interval of 0.5 (a twelfth of a cycle) from (3, 1) to (4, 1.8): no closed form, so the estimates
    are checked against each other: Euler bias O(1/M), Richardson and the continuous-time weight at the limit,
    a brute-force forward estimate, and the change of variables to the natural scale."""

    U, V, DT = t64([[3.0, 1.0]]), t64([[4.0, 1.8]]), 0.5

    def estimate(self, sde, u, v, proposal, M, N, richardson=False, repeats=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        vals = torch.stack([
            bridge_log_prob(sde, 0.0, self.DT, u, v, proposal=proposal, num_particles=N, num_substeps=M,
                            richardson=richardson, generator=g)[0].squeeze()
            for _ in range(repeats)
        ])
        return float(vals.mean()), float(vals.std() / math.sqrt(repeats))

    def test_euler_bias_shrinks_as_one_over_m_and_richardson_and_guided_reach_the_limit(self):
        sde, u, v = lv(), self.U.log(), self.V.log()
        limit, limit_se = self.estimate(sde, u, v, "guided_euler", 40, 1024, richardson=True)
        bias = {}
        for M in (10, 20, 40):
            value, se = self.estimate(sde, u, v, "guided_euler", M, 1024)
            bias[M] = value - limit
        # measured -0.044, -0.022, -0.010 (standard errors ~0.002)
        assert bias[10] < bias[20] < bias[40] < 0, bias
        assert 1.5 < bias[10] / bias[20] < 2.6 and 1.5 < bias[20] / bias[40] < 2.8, bias
        richardson_10, _ = self.estimate(sde, u, v, "guided_euler", 10, 1024, richardson=True, seed=1)
        assert abs(richardson_10 - limit) < 0.015
        guided_40, _ = self.estimate(sde, u, v, "guided", 40, 256, seed=2)
        assert abs(guided_40 - limit) < 0.012

    def test_proposals_agree_with_a_brute_force_forward_estimate(self):
        # forward (Pedersen) paths with 200 000 particles: the M-step Euler density by plain Monte Carlo
        sde, u, v = lv(), self.U.log(), self.V.log()
        brute, brute_se = self.estimate(sde, u, v, "forward", 10, 200_000, repeats=2)
        for proposal in ("guided_euler", "mdb"):
            value, se = self.estimate(sde, u, v, proposal, 10, 2048, seed=3)
            assert abs(value - brute) < 4 * math.hypot(se, brute_se) + 0.005, (proposal, value, brute)

    def test_natural_scale_density_is_the_log_scale_one_over_the_jacobian(self):
        # p_X(x1 | x0) = p_Y(log x1 | log x0) / (x1_1 x1_2) in the continuous-time limit
        log_value, _ = self.estimate(lv(), self.U.log(), self.V.log(), "guided_euler", 40, 1024,
                                     richardson=True)
        nat_value, nat_se = self.estimate(lv(log_scale=False), self.U, self.V, "guided_euler", 40, 2048,
                                          richardson=True, repeats=6, seed=4)
        assert abs(nat_value + self.V.log().sum().item() - log_value) < 4 * nat_se + 0.02


def test_benchmark_potential_is_the_mdb_weight_per_path():
    # the NUTS target of benchmarks/lotka_volterra.py at bridge noise z is exactly the prior times the
    # modified diffusion bridge's importance weight for the same noise: the ground truth samples the
    # posterior of the same M-step Euler likelihood that DiscretelyObservedSDE estimates
    bench = runpy.run_path(str(ROOT / "benchmarks" / "lotka_volterra.py"), run_name="benchmark")
    times, obs, M, N = t64([0.0, 1.0, 2.5]), t64([[1.0, 0.0], [0.5, 0.3], [0.2, -0.4]]), 6, 5
    potential = bench["augmented_potential"](times, obs, M)
    log_theta = t64([0.1, -0.6, 0.2, -0.5, -1.2])
    sde = StochasticLotkaVolterra(*log_theta.exp().unbind())
    noise = torch.randn(M - 1, N, 2, 2, dtype=D64)
    log_w = bridge_log_weights(sde, times[:-1], times[1:] - times[:-1], obs[:-1], obs[1:], proposal="mdb",
                               num_particles=N, num_substeps=M, noise=noise)
    z = noise.permute(1, 2, 0, 3)  # (N, T-1, M-1, 2)
    priors = bench["PRIORS"]
    log_prior = torch.distributions.Normal(
        t64([priors[k][0] for k in bench["PARAMS"]]), t64([priors[k][1] for k in bench["PARAMS"]])
    ).log_prob(log_theta).sum()
    log_joint = -potential({"theta": log_theta.expand(N, 5), "z": z})
    log_noise = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum((-3, -2, -1))
    assert torch.allclose(log_joint - log_noise, log_prior + log_w.sum(-1), atol=1e-10)
