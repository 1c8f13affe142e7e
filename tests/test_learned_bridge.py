"""Learned bridges (LearnedBridge, AmortisedBridge) against exact identities: the OU Euler chain's closed-form
density and its gradient at parameter values the amortised bridge was not trained on, the network's
initial (Brownian) score, the precomputed-context proposal against the plain network call, the
out-of-range flag, checkpoints (weights_only, atomic)."""

import math

import pytest
import torch
from torch import nn

from pyro_sde.infer.bridge import AmortisedBridge, LearnedBridge, ScoreNetwork
from pyro_sde.sde.distributions import DiscretelyObservedSDE
from pyro_sde.sde.models import CIR, LandmarkBrownian, OrnsteinUhlenbeck

D64 = torch.float64
BOX = {"theta": (0.5, 3.0), "sigma": (0.5, 1.2)}


def t64(x):
    return torch.tensor(x, dtype=D64)


def ou_euler_log_prob(theta, sigma, u, v, dt, M):
    """Exact log density of the ``M``-step Euler chain of ``dX = -theta X dt + sigma dW`` (Gaussian,
    geometric mean and variance), per coordinate summed: differentiable in ``theta``, ``sigma``."""
    theta, sigma = torch.as_tensor(theta, dtype=D64), torch.as_tensor(sigma, dtype=D64)
    delta = dt / M
    r = 1 - theta * delta
    loc = r**M * u
    var = sigma**2 * delta * (1 - r ** (2 * M)) / (1 - r**2)
    return (-0.5 * (v - loc) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)).sum(-1)


@pytest.fixture(scope="module")
def amortised():
    """One fit over theta in [0.5, 3], sigma in [0.5, 1.2] (1-D OU, mean 0 fixed)."""
    torch.manual_seed(0)
    sde = OrnsteinUhlenbeck(theta=t64(1.5), mean=0.0, sigma=t64(0.8))
    starts = torch.linspace(-1.0, 1.0, 21, dtype=D64)[:, None]
    bridge = AmortisedBridge(1, hidden_dim=32)
    return bridge.fit(
        sde, starts, 1.0, parameter_box=BOX, num_iterations=200, num_steps=20, progress_bar=False
    )


class TestAmortisedBridgeOnOU:
    """The Euler-ratio weights are unbiased for the ``M``-step Euler density at every parameter value;
    the amortised network decides only their variance."""

    # ESS floors: measured 0.95 / 0.70 after the fit; the untrained network (the Brownian score) 0.70 / 0.28
    @pytest.mark.parametrize("theta, sigma, ess_floor", [(0.8, 0.6, 0.85), (2.3, 1.05, 0.55)])
    def test_unbiased_with_high_ess_off_the_training_points(self, amortised, theta, sigma, ess_floor):
        torch.manual_seed(1)
        sde = OrnsteinUhlenbeck(theta=t64(theta), mean=0.0, sigma=t64(sigma))
        R, N, M = 400, 32, 20
        u, v = torch.full((R, 1), 0.7, dtype=D64), torch.full((R, 1), -0.3, dtype=D64)
        with torch.no_grad():
            lw = amortised.log_weights(sde, 0.0, 1.0, u, v, num_particles=N, num_substeps=M)
        ratio = (lw.logsumexp(0) - math.log(N) - ou_euler_log_prob(theta, sigma, 0.7, -0.3, 1.0, M)).exp()
        stderr = (ratio.std() / math.sqrt(R)).item()
        assert abs(ratio.mean().item() - 1) < 3 * stderr and stderr < 0.01, (ratio.mean(), stderr)
        ess = ((2 * lw.logsumexp(0) - (2 * lw).logsumexp(0)).exp() / N).mean()
        assert ess > ess_floor, ess

    def test_log_prob_gradient_matches_the_exact_euler_gradient(self, amortised):
        # a DiscretelyObservedSDE with the amortised bridge: value and gradient in (theta, sigma) against
        # the closed-form Euler chain over 20 intervals, at a point inside the box, no refit
        theta, sigma = t64(1.1).requires_grad_(), t64(0.7).requires_grad_()
        sde = OrnsteinUhlenbeck(theta=theta, mean=0.0, sigma=sigma)
        times = torch.cumsum(torch.full((21,), 0.5, dtype=D64), 0)
        N, M = 256, 10
        model = DiscretelyObservedSDE(sde, times, proposal=amortised, num_particles=N, num_substeps=M,
                                      initial=torch.zeros(1, dtype=D64))
        torch.manual_seed(2)
        x = model.sample()  # the Euler chain itself
        est = model.log_prob(x)  # the initial state is a Delta: log-prob 0
        exact = ou_euler_log_prob(theta, sigma, x[:-1], x[1:], 0.5, M).sum()
        ess = model.diagnostics()["ess"]
        stderr = ((1 / ess - 1) / N).sum().sqrt().item()  # delta method: var(p^) / p^2 = (1 / ESS - 1) / N
        assert abs(est.item() - exact.item()) < 3 * stderr and stderr < 0.1, (est, exact, stderr)
        g_est = torch.autograd.grad(est, (theta, sigma))
        g_exact = torch.autograd.grad(exact, (theta, sigma))
        for a, b in zip(g_est, g_exact):  # measured: within 0.07 / 0.13 (|exact| ~ 1 / 7)
            assert a.item() == pytest.approx(b.item(), abs=0.1 * (1 + abs(b.item())))

    def test_a_batch_of_parameters_is_the_unbatched_one_at_each_member(self, amortised):
        # Pyro's vectorised particles / our samplers: one call over a batch of theta, no warning, no refit
        torch.manual_seed(3)
        times = t64([0.0, 0.5, 1.2, 2.0])
        x = t64([[0.3], [-0.2], [0.5], [0.1]])
        thetas = t64([0.7, 1.5, 2.8])

        def lp(theta):
            sde = OrnsteinUhlenbeck(theta=theta, mean=0.0, sigma=t64(0.9))
            return DiscretelyObservedSDE(sde, times, proposal=amortised, num_particles=8, num_substeps=6,
                                         seed=0).log_prob(x)

        batched = lp(thetas)
        single = torch.stack([lp(th) for th in thetas])
        # to float32 round-off: the network (float32 weights) sees each member's theta in another matmul
        assert batched.shape == (3,) and torch.allclose(batched, single, rtol=0, atol=1e-5)

    def test_outside_the_trained_range_warns_or_raises(self, amortised):
        sde = OrnsteinUhlenbeck(theta=t64(5.0), mean=0.0, sigma=t64(0.8))
        u = torch.zeros(2, 1, dtype=D64)
        assert amortised.is_stale(sde)
        assert not amortised.is_stale(OrnsteinUhlenbeck(theta=t64(2.9), mean=0.0, sigma=t64(0.51)))
        amortised._warned = False
        with pytest.warns(UserWarning, match=r"theta in \[5, 5\], trained on \[0\.5"):
            amortised.log_weights(sde, 0.0, 1.0, u, u, num_particles=4, num_substeps=4)
        strict = AmortisedBridge(1, amortised.network, out_of_range="error")
        strict._load_fit_state(amortised._fit_state())
        with pytest.raises(ValueError, match="theta in"):
            strict.log_weights(sde, 0.0, 1.0, u, u, num_particles=4, num_substeps=4)
        moved_mean = OrnsteinUhlenbeck(theta=t64(1.0), mean=0.4, sigma=t64(0.8))  # trained at mean 0 only
        with pytest.raises(ValueError, match=r"mean\[0\]"):
            strict.log_weights(moved_mean, 0.0, 1.0, u, u, num_particles=4, num_substeps=4)

    def test_save_and_load(self, amortised, tmp_path):
        path = tmp_path / "bridge.pt"
        amortised.save(path)
        assert not list(tmp_path.glob("*.tmp-*"))  # atomic write leaves no temporary file
        loaded = AmortisedBridge.load(path)
        assert loaded.parameter_names == amortised.parameter_names
        sde = OrnsteinUhlenbeck(theta=t64(1.3), mean=0.0, sigma=t64(0.9))
        u, v = t64([[0.2]]), t64([[-0.4]])
        noise = torch.randn(4, 8, 1, 1, dtype=D64)
        a, b = (br.log_weights(sde, 0.0, 1.0, u, v, num_particles=8, num_substeps=5, noise=noise)
                for br in (amortised, loaded))
        assert torch.equal(a, b)
        with pytest.raises(ValueError, match="not a LearnedBridge checkpoint"):
            LearnedBridge.load(path)


class TestArguments:
    def test_fit_arguments_are_checked_by_name(self):
        sde = OrnsteinUhlenbeck(theta=t64(1.0), mean=0.0, sigma=t64(1.0))
        starts = torch.zeros(3, 1, dtype=D64)
        bridge = AmortisedBridge(1, hidden_dim=8)
        with pytest.raises(ValueError, match="'kappa', not a parameter"):
            bridge.fit(sde, starts, 1.0, parameter_box={"kappa": (0.1, 1.0)}, num_iterations=1)
        with pytest.raises(ValueError, match="both parameter_box and parameter_prior"):
            bridge.fit(sde, starts, 1.0, parameter_box={"theta": (0.1, 1.0)},
                       parameter_prior={"theta": torch.distributions.LogNormal(t64(0.0), t64(1.0))})
        with pytest.raises(ValueError, match="low <= high"):
            bridge.fit(sde, starts, 1.0, parameter_box={"theta": (2.0, 1.0)}, num_iterations=1)
        with pytest.raises(ValueError, match="spread"):
            bridge.fit(sde, starts, 1.0, spread=-1.0)
        with pytest.raises(ValueError, match="parameter_samples"):
            bridge.fit(OrnsteinUhlenbeck(theta=t64([1.0, 2.0]), sigma=t64(1.0)), starts, 1.0)
        with pytest.raises(ValueError, match="out_of_range"):
            AmortisedBridge(1, out_of_range="raise")
        with pytest.raises(RuntimeError, match="not fitted"):
            AmortisedBridge(1).log_weights(sde, 0.0, 1.0, starts, starts, num_particles=2, num_substeps=2)

    def test_prior_samples_spread_and_a_parameters_callable(self):
        # each way of giving the training distribution sets the trained range it reports
        torch.manual_seed(4)
        sde = OrnsteinUhlenbeck(theta=t64(1.0), mean=0.0, sigma=t64(1.0))
        starts = torch.zeros(3, 1, dtype=D64)
        kw = dict(num_iterations=2, num_steps=4, progress_bar=False)
        spread = AmortisedBridge(1, hidden_dim=8).fit(sde, starts, 1.0, spread=0.5, **kw)
        assert spread.low[0] == pytest.approx(1 / 1.5, rel=0.01)
        assert spread.high[0] == pytest.approx(1.5, rel=0.01)
        assert spread.low[2] == pytest.approx(-0.5, abs=0.01)  # mean: +- spread around 0
        samples = {"theta": t64([0.5, 0.9]), "sigma": t64([2.0, 3.0])}
        given = AmortisedBridge(1, hidden_dim=8).fit(sde, starts, 1.0, parameter_samples=samples, **kw)
        assert given.low.tolist() == [0.5, 2.0, 0.0] and given.high.tolist() == [0.9, 3.0, 0.0]
        prior = {"sigma": torch.distributions.Uniform(t64(0.2), t64(0.4))}
        drawn = AmortisedBridge(1, hidden_dim=8).fit(sde, starts, 1.0, parameter_prior=prior, **kw)
        assert 0.2 <= drawn.low[1] < 0.21 and 0.39 < drawn.high[1] <= 0.4
        assert drawn.low[0] == drawn.high[0] == 1  # theta not named: fixed
        own = AmortisedBridge(1, hidden_dim=8, parameters=lambda s: s.theta[..., None] * s.sigma[..., None])
        own.fit(sde, starts, 1.0, parameter_box={"theta": (1.0, 2.0)}, **kw)
        assert own.parameter_names == ["parameters[0]"] and own.network.parameter_dim == 1
        assert not own.is_stale(OrnsteinUhlenbeck(theta=t64(1.5), sigma=t64(1.0)))


class TestScoreNetworkAndProposal:
    def test_the_initial_score_is_the_brownian_one(self):
        # W = -I and zero gain / last layer: s(t, x; u) = -a^{-1} (x - u) / t for any theta input
        net = ScoreNetwork(3, parameter_dim=2).double()
        bridge = LearnedBridge(3, net)
        sde = OrnsteinUhlenbeck(theta=t64(1.0), mean=0.0, sigma=t64(0.6), dim=3)
        x, u = torch.randn(5, 3, dtype=D64), torch.randn(5, 3, dtype=D64)
        s = bridge._score(t64(0.3), x, u, sde.diffusion_factor(None, None), torch.randn(5, 2, dtype=D64))
        assert torch.allclose(s, -(x - u) / (0.36 * 0.3), atol=1e-12)

    @pytest.mark.parametrize("model", ["ou", "cir", "landmarks"])
    def test_precomputed_context_equals_the_plain_network_call(self, model):
        # the proposal's fast path (context once, one step per substep; a constant diffusion factored
        # once) gives the weights of the plain per-substep network call, for a trained-looking network
        torch.manual_seed(5)
        net = ScoreNetwork(2, hidden_dim=16).double()
        for p in net.parameters():
            p.data.normal_(0, 0.2)

        class Plain(nn.Module):  # not a ScoreNetwork: the proposal calls it step by step
            def __init__(self):
                super().__init__()
                self.inner = net

            def forward(self, t, z, u):
                return self.inner(t, z, u)

        if model == "ou":
            sde = OrnsteinUhlenbeck(theta=t64(1.2), mean=0.0, sigma=t64(0.7), dim=2)
        elif model == "cir":
            sde = CIR(t64(1.0), t64(1.0), t64(0.5), dim=2)
        else:  # a constant full (triangular) diffusion factor
            sde = LandmarkBrownian(t64([[0.0], [0.6]]), t64(0.5), gamma=0.5)
        u, v = torch.rand(3, 2, dtype=D64) + 0.5, torch.rand(3, 2, dtype=D64) + 0.5
        noise = torch.randn(7, 5, 3, 2, dtype=D64)
        dt = t64([0.4, 0.8, 1.0])
        out = []
        for network in (net, Plain()):
            bridge = LearnedBridge(2, network, auto_refit=False)
            bridge.fit_params = {k: v.detach() for k, v in sde.params().items()}
            out.append(bridge.log_weights(sde, 0.0, dt, u, v, num_particles=5, num_substeps=8, noise=noise))
        assert torch.isfinite(out[0]).all() and torch.allclose(out[0], out[1], rtol=1e-12, atol=1e-9)

    def test_learned_bridge_save_and_load(self, tmp_path):
        sde = OrnsteinUhlenbeck(theta=t64(1.0), mean=0.0, sigma=t64(1.0))
        bridge = LearnedBridge(1, ScoreNetwork(1, hidden_dim=8)).fit(
            sde, torch.zeros(2, 1, dtype=D64), 1.0, num_iterations=3, num_steps=5, progress_bar=False
        )
        bridge.save(tmp_path / "b.pt")
        loaded = LearnedBridge.load(tmp_path / "b.pt")
        assert loaded.losses == bridge.losses and not loaded.is_stale(sde)
        noise = torch.randn(3, 4, 1, 1, dtype=D64)
        u = t64([[0.1]])
        a, b = (br.log_weights(sde, 0.0, 1.0, u, u, num_particles=4, num_substeps=4, noise=noise)
                for br in (bridge, loaded))
        assert torch.equal(a, b)
        custom = LearnedBridge(1, nn.Sequential(nn.Linear(1, 1)))
        custom.fit_params = {}
        custom.save(tmp_path / "c.pt")
        with pytest.raises(ValueError, match="pass network="):
            LearnedBridge.load(tmp_path / "c.pt")
