"""Bridge importance sampling: exact identities (OU Euler chain), exact transition densities (OU, GBM,
CIR via scipy.stats.ncx2), DiscretelyObservedSDE shapes / diagnostics / validation, MAP recovery
(SVI AutoDelta; L-BFGS with the learned bridge), AutoNormal SVI and the DiffusionSampler against the
exact-likelihood posterior."""

import contextlib
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal
from pyro.optim import ClippedAdam
from scipy import stats
from torch.distributions import constraints

from pyro_sde.infer import DiffusionSampler, lbfgs_map
from pyro_sde.infer.bridge.learned import LearnedBridge, ScoreNetwork
from pyro_sde.infer.bridge.proposals import bridge_log_weights
from pyro_sde.infer.potential import ModelPotential
from pyro_sde.sde.distributions import DiscretelyObservedSDE
from pyro_sde.sde.models import CIR, GeometricBrownianMotion, LandmarkBrownian, OrnsteinUhlenbeck

D64 = torch.float64


def t64(x):
    return torch.tensor(x, dtype=D64)


def estimates(sde, u, v, T, *, proposal, N, M, R):
    """``R`` independent estimates of ``log p(v | u)``, in one batched call: shape ``(R,)``."""
    uu, vv = u.expand((R,) + u.shape), v.expand((R,) + v.shape)
    lw = bridge_log_weights(sde, 0.0, T, uu, vv, proposal=proposal, num_particles=N, num_substeps=M)
    return lw.logsumexp(0) - math.log(lw.shape[0])


def ou_euler_chain_log_prob(theta, mean, sigma, u, v, T, M):
    """Exact ``M``-step Euler density of the 1-D OU chain: Gaussian with geometric mean / variance."""
    delta = T / M
    r = 1 - theta * delta
    loc = mean + r**M * (u - mean)
    var = sigma**2 * delta * sum(r ** (2 * k) for k in range(M))
    return stats.norm(loc, math.sqrt(var)).logpdf(v)


def cir_log_prob(kappa, theta, sigma, u, v, T):
    c = 2 * kappa / (sigma**2 * (1 - math.exp(-kappa * T)))
    return stats.ncx2.logpdf(
        2 * c * v, 4 * kappa * theta / sigma**2, 2 * c * u * math.exp(-kappa * T)
    ) + math.log(2 * c)


OU1 = dict(theta=2.0, mean=0.0, sigma=1.0)


class TestUnbiasedForTheEulerDensity:
    """``E[p^] = p_Euler`` exactly for every Euler-ratio proposal (the weights are Euler density ratios;
    the continuous-time ``"guided"`` weight targets the SDE's own density, tests/test_guided_bridges.py)."""

    @pytest.mark.parametrize("proposal", ["forward", "mdb", "guided_euler"])
    @pytest.mark.parametrize("v", [1.0, -0.5])
    def test_ou_ratio_mean_is_one(self, proposal, v):
        sde = OrnsteinUhlenbeck(theta=t64(2.0), mean=0.0, sigma=t64(1.0))
        M, R = 8, 4000
        est = estimates(sde, t64([1.0]), t64([v]), 1.0, proposal=proposal, N=16, M=M, R=R)
        ratio = (est - ou_euler_chain_log_prob(2.0, 0.0, 1.0, 1.0, v, 1.0, M)).exp()
        stderr = ratio.std() / math.sqrt(R)
        assert abs(ratio.mean().item() - 1) < 3 * stderr.item()

    def test_euler_proposal_is_the_one_step_euler_density(self):
        sde = OrnsteinUhlenbeck(theta=t64(2.0), mean=0.0, sigma=t64(1.0))
        est = estimates(sde, t64([1.0]), t64([0.3]), 1.0, proposal="euler", N=64, M=20, R=1)
        assert est.item() == pytest.approx(
            ou_euler_chain_log_prob(2.0, 0.0, 1.0, 1.0, 0.3, 1.0, 1), rel=1e-12
        )


class TestExactTransitionDensities:
    """Against the continuous-time density. The Euler bias is O(1/M) (weak order 1), so the Richardson
    combination ``2 log p^_{2M} - log p^_M`` must match the exact value within 3 standard errors."""

    R, N, M = 200, 256, 20

    def check(self, sde, u, v, exact, proposal):
        e1 = estimates(sde, u, v, 1.0, proposal=proposal, N=self.N, M=self.M, R=self.R)
        e2 = estimates(sde, u, v, 1.0, proposal=proposal, N=self.N, M=2 * self.M, R=self.R)
        rich = 2 * e2 - e1
        bias, stderr = (rich.mean() - exact).item(), (rich.std() / math.sqrt(self.R)).item()
        assert abs(bias) < 3 * stderr, (bias, stderr)
        assert stderr < 0.05  # the test has power
        return e2

    @pytest.mark.parametrize("proposal", ["mdb", "guided_euler"])
    @pytest.mark.parametrize("d", [1, 4])
    def test_ou(self, proposal, d):
        sde = OrnsteinUhlenbeck(theta=t64(2.0), mean=0.0, sigma=t64(1.0), dim=d)
        u = v = torch.ones(d, dtype=D64)
        exact = sde.transition_log_prob(0.0, u, 1.0, v).item()
        assert exact == pytest.approx({1: -1.7397, 4: -6.9589}[d], abs=1e-4)  # reference notes, Table A
        self.check(sde, u, v, exact, proposal)

    @pytest.mark.parametrize("proposal", ["mdb", "guided_euler"])
    def test_gbm(self, proposal):
        sde = GeometricBrownianMotion(t64(0.1), t64(0.4))
        exact = sde.transition_log_prob(0.0, t64([1.0]), 1.0, t64([1.1])).item()
        assert exact == pytest.approx(-0.1157, abs=1e-4)
        self.check(sde, t64([1.0]), t64([1.1]), exact, proposal)

    @pytest.mark.parametrize("proposal", ["mdb", "guided_euler"])
    @pytest.mark.parametrize("v", [1.2, 2.0])
    def test_cir(self, proposal, v):
        sde = CIR(t64(1.0), t64(1.0), t64(0.5))
        exact = cir_log_prob(1.0, 1.0, 0.5, 1.0, v, 1.0)
        assert exact == pytest.approx({1.2: -0.1506, 2.0: -3.3888}[v], abs=1e-4)
        self.check(sde, t64([1.0]), t64([v]), exact, proposal)

    def test_euler_pseudo_likelihood_is_biased(self):
        sde = OrnsteinUhlenbeck(theta=t64(2.0), mean=0.0, sigma=t64(1.0))
        est = estimates(sde, t64([1.0]), t64([1.0]), 1.0, proposal="euler", N=1, M=1, R=1)
        assert abs(est.item() - sde.transition_log_prob(0.0, t64([1.0]), 1.0, t64([1.0])).item()) > 0.5

    def test_goal_numbers_1d_ou_guided(self):
        # issue goals: 1-D OU ESS >= 90 %, RMSE <= 0.007 (N=1024, M=50)
        sde = OrnsteinUhlenbeck(theta=t64(2.0), mean=0.0, sigma=t64(1.0))
        u = torch.ones(20, 1, dtype=D64)
        lw = bridge_log_weights(sde, 0.0, 1.0, u, u, proposal="guided", num_particles=1024, num_substeps=50)
        est = lw.logsumexp(0) - math.log(1024)
        ess = (2 * lw.logsumexp(0) - (2 * lw).logsumexp(0)).exp() / 1024
        rmse = (est - sde.transition_log_prob(0.0, u[0], 1.0, u[0])).pow(2).mean().sqrt()
        assert ess.mean() > 0.9 and rmse < 0.007


class TestDiscretelyObservedSDE:
    def data(self, n=30, d=1):
        times = torch.cumsum(torch.rand(n, dtype=D64) * 0.5 + 0.25, 0)
        sde = OrnsteinUhlenbeck(theta=t64(1.0), mean=0.0, sigma=t64(0.8), dim=d)
        x = DiscretelyObservedSDE(sde, times, initial=torch.zeros(d, dtype=D64), num_substeps=10).sample()
        return times, x

    def test_estimate_close_to_exact_and_differentiable(self):
        times, x = self.data()
        theta, sigma = t64(1.0).requires_grad_(), t64(0.8).requires_grad_()
        sde = OrnsteinUhlenbeck(theta=theta, mean=0.0, sigma=sigma)
        exact = DiscretelyObservedSDE(sde, times, proposal="exact").log_prob(x)
        est = DiscretelyObservedSDE(
            sde, times, proposal="guided", num_particles=256, num_substeps=40
        ).log_prob(x)
        assert est.item() == pytest.approx(exact.item(), abs=0.05)
        g_exact = torch.autograd.grad(exact, (theta, sigma))
        g_est = torch.autograd.grad(est, (theta, sigma))
        for a, b in zip(g_exact, g_est):
            assert b.item() == pytest.approx(a.item(), abs=0.1 * (1 + abs(a.item())))

    def test_batch_shapes_expand_and_diagnostics(self):
        times, x = self.data(n=6, d=2)
        theta = torch.rand(3, dtype=D64) + 0.5
        sde = OrnsteinUhlenbeck(theta=theta, mean=0.0, sigma=t64(0.8), dim=2)
        d = DiscretelyObservedSDE(sde, times, proposal="guided", num_particles=32, num_substeps=20)
        assert d.batch_shape == (3,) and d.event_shape == (6, 2)
        lp = d.log_prob(x)
        assert lp.shape == (3,)
        diag = d.diagnostics()
        assert diag["ess"].shape == (5, 3) and diag["pareto_k"].shape == (5, 3)
        assert ((diag["ess"] > 0) & (diag["ess"] <= 1)).all()
        assert d.log_prob(x.expand(4, 3, 6, 2)).shape == (4, 3)
        e = d.expand((2, 3))
        assert e.batch_shape == (2, 3) and e.log_prob(x).shape == (2, 3)
        # each batch member agrees with its own unbatched exact density within the IS error
        for i in range(3):
            one = OrnsteinUhlenbeck(theta=theta[i], mean=0.0, sigma=t64(0.8), dim=2)
            exact = DiscretelyObservedSDE(one, times, proposal="exact").log_prob(x)
            assert lp[i].item() == pytest.approx(exact.item(), abs=0.3)

    def test_common_random_numbers(self):
        times, x = self.data(n=5)
        sde = OrnsteinUhlenbeck(theta=t64(1.0), mean=0.0, sigma=t64(0.8))
        a = DiscretelyObservedSDE(sde, times, seed=3).log_prob(x)
        b = DiscretelyObservedSDE(sde, times, seed=3).log_prob(x)
        c = DiscretelyObservedSDE(sde, times, seed=4).log_prob(x)
        assert a.item() == b.item() != c.item()

    def test_guided_diagnostics_flag_good_and_bad_proposals(self):
        times, x = self.data(n=10)
        sde = OrnsteinUhlenbeck(theta=t64(1.0), mean=0.0, sigma=t64(0.8))
        good = DiscretelyObservedSDE(sde, times, proposal="guided", num_particles=256, num_substeps=20)
        good.log_prob(x)
        bad = DiscretelyObservedSDE(sde, times, proposal="forward", num_particles=256, num_substeps=20)
        bad.log_prob(x)
        assert good.diagnostics()["ess"].min() > 0.8
        assert good.diagnostics()["ess"].mean() > 2 * bad.diagnostics()["ess"].mean()
        assert (good.diagnostics()["pareto_k"] < 0.7).all()

    def test_kunita_and_landmarks_run(self):
        q = torch.randn(4, 2, dtype=D64)
        sde = LandmarkBrownian(q, t64(0.5), gamma=1.0)
        times = t64([0.0, 0.5, 1.0])
        x = DiscretelyObservedSDE(sde, times, initial=q.reshape(-1), num_substeps=4).sample((2,))
        assert x.shape == (2, 3, 8)
        for prop in ("mdb", "guided"):
            lp = DiscretelyObservedSDE(sde, times, proposal=prop, num_particles=64, num_substeps=10).log_prob(
                x
            )
            exact = DiscretelyObservedSDE(sde, times, proposal="exact").log_prob(x)
            assert torch.allclose(lp, exact, atol=1e-8)  # Brownian motion: mdb/guided are exact bridges

    def test_validation(self):
        sde = OrnsteinUhlenbeck(theta=1.0, sigma=1.0, dim=2)
        with pytest.raises(ValueError, match="strictly increasing"):
            DiscretelyObservedSDE(sde, t64([0.0, 1.0, 0.5]))
        d = DiscretelyObservedSDE(sde, t64([0.0, 1.0, 2.0]))
        with pytest.raises(ValueError, match="times x state dim"):
            d.log_prob(torch.zeros(3, 1))
        with pytest.raises(ValueError, match="times x state dim"):
            d.log_prob(torch.zeros(4, 2))
        x = torch.zeros(3, 2)
        x[2, 1] = math.nan
        with pytest.raises(ValueError, match="NaN"):
            d.log_prob(x)
        with pytest.raises(ValueError, match="num_particles"):
            DiscretelyObservedSDE(sde, t64([0.0, 1.0]), num_particles=0)
        with pytest.raises(RuntimeError, match="log_prob first"):
            d.diagnostics()
        with pytest.raises(NotImplementedError, match="initial"):
            d.sample()

    @pytest.mark.parametrize("proposal", ["mdb", "guided_euler", "learned"])
    def test_parameter_batch_shares_the_common_random_numbers(self, proposal):
        # member i of a batched log_prob (Pyro's vectorised particle plate) equals the unbatched
        # log_prob at parameter i: with seed=..., log_prob is a deterministic function of the parameters
        times, x = self.data(n=6)
        thetas = t64([0.5, 1.0, 2.0])
        if proposal == "learned":
            sde0 = OrnsteinUhlenbeck(theta=t64(1.0), mean=0.0, sigma=t64(0.8))
            proposal = LearnedBridge(1, auto_refit=False).fit(
                sde0, x[:-1], 1.0, num_iterations=5, progress_bar=False
            )

        def lp(theta):
            sde = OrnsteinUhlenbeck(theta=theta, mean=0.0, sigma=t64(0.8))
            return DiscretelyObservedSDE(
                sde, times, proposal=proposal, num_particles=8, num_substeps=5, seed=0
            )

        with (
            pytest.warns(UserWarning, match="batch of parameters")
            if not isinstance(proposal, str)
            else contextlib.nullcontext()
        ):
            batched = lp(thetas).log_prob(x)
        single = torch.stack([lp(th).log_prob(x) for th in thetas])
        assert batched.shape == (3,)
        assert torch.allclose(batched, single, rtol=0, atol=1e-10)
        # observations with their own batch dims get their own noise
        two = lp(t64(1.0)).log_prob(x.expand(2, -1, -1))
        assert two[0] != two[1]

    def test_vectorised_model_potential_matches_pyro(self):
        # ModelPotential checks its batched evaluation against Pyro's per-sample potential_fn
        times, x = self.data(n=8)

        def model():
            theta = pyro.sample("theta", dist.LogNormal(t64(0.0), t64(1.0)))
            sde = OrnsteinUhlenbeck(theta=theta, mean=0.0, sigma=t64(0.8))
            obs = DiscretelyObservedSDE(
                sde, times, proposal="guided", num_particles=8, num_substeps=5, seed=0
            )
            pyro.sample("obs", obs, obs=x)

        pot = ModelPotential(model)
        z = torch.linspace(-1, 1, 5, dtype=D64)[:, None]
        batched = pot.log_density(z)
        assert torch.allclose(batched, torch.stack([pot._log_density_single(zi) for zi in z]), atol=1e-10)


def _simulate_ou(n, theta, sigma, seed):
    gen = torch.Generator().manual_seed(seed)
    a, s = math.exp(-theta), sigma * math.sqrt((1 - math.exp(-2 * theta)) / (2 * theta))
    x = torch.zeros(n + 1, 1, dtype=D64)
    for i in range(n):
        x[i + 1] = a * x[i] + s * torch.randn(1, generator=gen, dtype=D64)
    return torch.arange(n + 1, dtype=D64), x


def _exact_mle(times, x):
    log_p = torch.zeros(2, dtype=D64, requires_grad=True)
    opt = torch.optim.LBFGS([log_p], max_iter=100, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def nll(p):
        sde = OrnsteinUhlenbeck(theta=p[0], mean=0.0, sigma=p[1])
        return -DiscretelyObservedSDE(sde, times, proposal="exact").log_prob(x)

    def closure():
        opt.zero_grad()
        loss = nll(log_p.exp())
        loss.backward()
        return loss

    opt.step(closure)
    mle = log_p.detach().exp()
    info = torch.autograd.functional.hessian(nll, mle)  # observed information
    return mle, torch.linalg.cholesky(info).cholesky_inverse().diagonal().sqrt()


def _ou_map_model(times, x, proposal, num_particles, num_substeps):
    """OU (theta, sigma) under flat priors, the likelihood a ``DiscretelyObservedSDE`` with fixed noise."""
    flat = dist.ImproperUniform(constraints.positive, (), ())

    def model():
        theta = pyro.sample("theta", flat)
        sigma = pyro.sample("sigma", flat)
        sde = OrnsteinUhlenbeck(theta=theta, mean=0.0, sigma=sigma)
        obs = DiscretelyObservedSDE(
            sde, times, proposal=proposal, num_particles=num_particles, num_substeps=num_substeps, seed=0
        )
        pyro.sample("obs", obs, obs=x)

    return model


def _svi_map(times, x, proposal, num_particles, num_substeps, steps=300):
    model = _ou_map_model(times, x, proposal, num_particles, num_substeps)
    pyro.clear_param_store()
    guide = AutoDelta(model, init_loc_fn=lambda site: t64(1.0))
    svi = SVI(model, guide, ClippedAdam({"lr": 0.05, "lrd": 0.99}), Trace_ELBO())
    for _ in range(steps):
        svi.step()
    med = guide.median()
    return torch.stack([med["theta"], med["sigma"]]).detach()


def _lbfgs_map(times, x, proposal, num_particles, num_substeps, init):
    """MAP by L-BFGS: deterministic with common random numbers (``seed=0``)."""
    model = _ou_map_model(times, x, proposal, num_particles, num_substeps)
    point = lbfgs_map(model, init_values=init)
    return torch.stack([point["theta"], point["sigma"]]), point


class TestParameterRecovery:
    """OU, theta = 0.5, sigma = 1, Delta = 1, 200 intervals: the SVI MAP (flat priors) under the IS
    likelihood is within 0.2 standard errors of the exact-likelihood MLE; the Euler one is not."""

    @pytest.fixture(scope="class")
    @classmethod
    def problem(cls):
        times, x = _simulate_ou(200, 0.5, 1.0, seed=1)
        mle, se = _exact_mle(times, x)
        return times, x, mle, se

    def test_guided_map_matches_exact_mle(self, problem):
        times, x, mle, se = problem
        est = _svi_map(times, x, "guided", num_particles=16, num_substeps=10)  # exact on OU at any M
        assert ((est - mle).abs() / se < 0.2).all(), (est - mle) / se

    def test_euler_map_is_biased(self, problem):
        times, x, mle, se = problem
        est = _svi_map(times, x, "euler", num_particles=1, num_substeps=1)
        assert ((est - mle).abs() / se > 1).any()

    @pytest.mark.slow
    def test_mdb_map_matches_exact_mle(self, problem):
        times, x, mle, se = problem
        est = _svi_map(times, x, "mdb", num_particles=64, num_substeps=50)
        assert ((est - mle).abs() / se < 0.2).all(), (est - mle) / se

    def test_lbfgs_map_matches_exact_mle(self, problem):
        # with common random numbers the objective is deterministic and smooth: L-BFGS needs ~10 calls
        times, x, mle, se = problem
        est, _ = _lbfgs_map(times, x, "guided", 16, 10, {"theta": t64(1.0), "sigma": t64(1.0)})
        assert ((est - mle).abs() / se < 0.2).all(), (est - mle) / se

    @pytest.mark.slow
    def test_learned_bridge_map_matches_exact_mle(self, problem):
        # fit the bridge at the current estimate, maximise, refit at the new estimate, until it stops
        # moving (<= 3 rounds): the MAP under the learned-bridge likelihood is within 0.2 SE of the MLE
        times, x, mle, se = problem
        pyro.set_rng_seed(0)
        bridge = LearnedBridge(1, ScoreNetwork(1, hidden_dim=32), auto_refit=False)
        point = {"theta": t64(1.0), "sigma": t64(1.0)}
        est = torch.stack([point["theta"], point["sigma"]])
        for num_particles in (16, 64, 64):
            sde = OrnsteinUhlenbeck(theta=point["theta"], mean=0.0, sigma=point["sigma"])
            bridge.fit(sde, x[:-1], 1.0, num_iterations=500, progress_bar=False)
            new, point = _lbfgs_map(times, x, bridge, num_particles, 50, point)
            moved = ((new - est).abs() / est).max()
            est = new
            if num_particles == 64 and moved < 0.02:
                break
        assert ((est - mle).abs() / se < 0.2).all(), (est - mle) / se


@pytest.mark.slow
class TestLearnedBridge:
    def test_learned_bridge_on_1d_ou(self):
        sde = OrnsteinUhlenbeck(theta=t64(2.0), mean=0.0, sigma=t64(1.0))
        u = torch.ones(1, dtype=D64)
        bridge = LearnedBridge(1).fit(sde, u[None], 1.0, num_iterations=500, progress_bar=False)
        uu = u.expand(20, 1)
        lw = bridge.log_weights(sde, 0.0, 1.0, uu, uu, num_particles=1024, num_substeps=50)
        est = lw.logsumexp(0) - math.log(1024)
        ess = ((2 * lw.logsumexp(0) - (2 * lw).logsumexp(0)).exp() / 1024).mean()
        rmse = (est - sde.transition_log_prob(0.0, u, 1.0, u)).pow(2).mean().sqrt()
        assert ess > 0.8 and rmse < 0.02, (ess, rmse)

    def test_learned_bridge_on_40d_landmarks_matches_exact_gaussian(self):
        k = 20
        ang = torch.linspace(0, 2 * math.pi, k + 1, dtype=D64)[:-1]
        q = torch.stack([ang.cos(), 0.6 * ang.sin()], -1)
        sde = LandmarkBrownian(q, t64(0.2), alpha=1.0, gamma=0.02)
        u = q.reshape(-1)
        v = u + sde.diffusion_factor(None, None).matvec(torch.randn(2 * k, dtype=D64))
        bridge = LearnedBridge(2 * k).fit(sde, u[None], 1.0, num_iterations=200, progress_bar=False)
        R, N = 10, 256
        lw = bridge.log_weights(
            sde, 0.0, 1.0, u.expand(R, 2 * k), v.expand(R, 2 * k), num_particles=N, num_substeps=50
        )
        est = (lw.logsumexp(0) - math.log(N)).detach()
        ess = ((2 * lw.logsumexp(0) - (2 * lw).logsumexp(0)).exp() / N).detach()
        exact = sde.transition_log_prob(0.0, u, 1.0, v).item()
        assert torch.isfinite(est).all()
        assert abs(est.mean().item() - exact) < 3 * est.std().item() / math.sqrt(R) + 0.02
        assert ess.mean() > 0.3

    def test_refit_when_parameters_drift(self):
        sde = OrnsteinUhlenbeck(theta=t64(2.0), mean=0.0, sigma=t64(1.0))
        bridge = LearnedBridge(1, refit_iterations=5).fit(
            sde, torch.ones(1, 1, dtype=D64), 1.0, num_iterations=5, progress_bar=False
        )
        assert not bridge.is_stale(sde)
        moved = OrnsteinUhlenbeck(theta=t64(3.0), mean=0.0, sigma=t64(1.0))
        assert bridge.is_stale(moved)
        n = len(bridge.losses)
        bridge.log_weights(
            moved,
            0.0,
            1.0,
            torch.ones(1, 1, dtype=D64),
            torch.ones(1, 1, dtype=D64),
            num_particles=4,
            num_substeps=5,
        )
        assert len(bridge.losses) == n + 5 and not bridge.is_stale(moved)


def _grid_posterior(times, x, log_prior, grid, likelihood):
    """Posterior mean and std of a scalar ``theta`` (sigma = 1 known) on a fine grid."""
    sde = OrnsteinUhlenbeck(theta=grid, mean=0.0, sigma=t64(1.0))
    lp = likelihood(sde).log_prob(x) + log_prior(grid)
    w = (lp - lp.logsumexp(0)).exp()
    mean = (w * grid).sum()
    return mean, (w * (grid - mean) ** 2).sum().sqrt()


class TestInsidePyroInference:
    """The IS likelihood inside Pyro's SVI (AutoNormal, vectorised ELBO particles) and inside our
    DiffusionSampler (vectorised over a batch of parameters), against exact-likelihood posteriors."""

    def test_autonormal_svi_matches_the_exact_posterior(self):
        # OU, 100 unit intervals, LogNormal(0, 1) priors on theta and sigma. Exact posterior of
        # (log theta, log sigma) on a 300 x 300 grid (closed-form OU likelihood). For a near-Gaussian
        # posterior the mean-field optimum has loc = posterior mean and scale_i = 1 / sqrt(Prec_ii).
        times, x = _simulate_ou(100, 0.5, 1.0, seed=2)
        prior = dist.LogNormal(t64(0.0), t64(1.0))
        a, b = torch.meshgrid(
            torch.linspace(-2.5, 1.0, 300, dtype=D64),
            torch.linspace(-1.0, 1.0, 300, dtype=D64),
            indexing="ij",
        )
        z = torch.stack([a.reshape(-1), b.reshape(-1)], -1)
        sde = OrnsteinUhlenbeck(theta=z[:, 0].exp(), mean=0.0, sigma=z[:, 1].exp())
        lp = DiscretelyObservedSDE(sde, times, proposal="exact").log_prob(x)
        lp = lp + (prior.log_prob(z.exp()) + z).sum(-1)  # priors in log coordinates
        w = (lp - lp.logsumexp(0)).exp()[:, None]
        mean = (w * z).sum(0)
        cov = (w * (z - mean)).T @ (z - mean)
        sd, mean_field_sd = cov.diagonal().sqrt(), torch.linalg.inv(cov).diagonal().rsqrt()

        def model():
            theta = pyro.sample("theta", prior)
            sigma = pyro.sample("sigma", prior)
            sde = OrnsteinUhlenbeck(theta=theta, mean=0.0, sigma=sigma)
            obs = DiscretelyObservedSDE(
                sde, times, proposal="guided", num_particles=4, num_substeps=10, seed=0
            )
            pyro.sample("obs", obs, obs=x)

        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoNormal(model, init_scale=0.1)
        elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=0)
        svi = SVI(model, guide, ClippedAdam({"lr": 0.05, "lrd": 0.99}), elbo)
        locs, scales = [], []
        for _ in range(300):
            svi.step()
            locs.append(
                torch.stack([pyro.param(f"AutoNormal.locs.{n}") for n in ("theta", "sigma")]).detach()
            )
            scales.append(
                torch.stack([pyro.param(f"AutoNormal.scales.{n}") for n in ("theta", "sigma")]).detach()
            )
        loc, scale = torch.stack(locs[-100:]).mean(0), torch.stack(scales[-100:]).mean(0)  # Polyak averages
        # 0.2 posterior sd: the tolerance for estimator-based inference (IS + O(1/M) Euler error)
        assert ((loc - mean).abs() / sd < 0.2).all(), (loc - mean) / sd
        assert ((scale / mean_field_sd - 1).abs() < 0.2).all(), scale / mean_field_sd

    @pytest.mark.slow
    def test_diffusion_sampler_on_the_bridge_likelihood(self):
        # theta of an OU process (sigma = 1 known), 20 unit intervals, LogNormal(0, 1) prior; the sampler
        # evaluates the model vectorised over its batch of theta values (common random numbers).
        times, x = _simulate_ou(20, 0.5, 1.0, seed=1)
        prior = dist.LogNormal(t64(0.0), t64(1.0))
        N, M = 4, 8

        def bridge(sde):
            return DiscretelyObservedSDE(
                sde, times, proposal="guided", num_particles=N, num_substeps=M, seed=0
            )

        def model():
            theta = pyro.sample("theta", prior)
            pyro.sample("obs", bridge(OrnsteinUhlenbeck(theta=theta, mean=0.0, sigma=t64(1.0))), obs=x)

        grid = torch.linspace(0.005, 3.0, 3000, dtype=D64)
        is_mean, is_sd = _grid_posterior(times, x, prior.log_prob, grid, bridge)
        ex_mean, ex_sd = _grid_posterior(
            times, x, prior.log_prob, grid, lambda sde: DiscretelyObservedSDE(sde, times, proposal="exact")
        )
        # the IS posterior (what the sampler targets) is within 0.2 sd of the exact-likelihood one
        assert abs(is_mean - ex_mean) < 0.2 * ex_sd and abs(is_sd / ex_sd - 1) < 0.2

        pyro.set_rng_seed(0)
        sampler = DiffusionSampler(model, method="dis", loss="log_variance", num_steps=30)
        sampler.run(num_iterations=150, batch_size=64, progress_bar=False)
        samples, log_w = sampler.get_weighted_samples(2000)
        w = (log_w - log_w.logsumexp(0)).exp()
        theta = samples["theta"]
        mean = (w * theta).sum()
        sd = (w * (theta - mean) ** 2).sum().sqrt()
        n_eff = 1 / (w * w).sum()
        assert n_eff > 100  # the test has power
        # self-normalised IS: se(mean) = sd / sqrt(n_eff), se(sd) ~ sd / sqrt(2 n_eff)
        assert abs(mean - is_mean) < 4 * is_sd / n_eff.sqrt(), (mean, is_mean, n_eff)
        assert abs(sd - is_sd) < 4 * is_sd / (2 * n_eff).sqrt(), (sd, is_sd, n_eff)
        assert abs(mean - ex_mean) < 0.2 * ex_sd + 4 * is_sd / n_eff.sqrt()
