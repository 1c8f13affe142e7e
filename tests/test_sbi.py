"""Simulation-based inference: NRE losses, likelihoods from simulations, the posterior object, calibration."""

import inspect
import math

import matplotlib
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_sde import to_inference_data
from pyro_sde.ratio import (
    ClassifierRatioEstimator,
    ContrastiveRatioEstimator,
    RatioEstimator,
    RatioLikelihood,
    RatioPosterior,
    SBIRatioNetwork,
    contrastive_ratio_loss,
    expected_coverage,
    plot_sbc_ranks,
    posterior_predictive_pvalues,
    simulation_based_calibration,
    tarp_coverage,
)
from pyro_sde.ratio import base as ratio_base
from pyro_sde.ratio.classifier import _bce

matplotlib.use("Agg")

# Gaussian linear simulator: theta ~ N(0, I_2), x = A theta + sigma eps; posterior N(m(x), C)
A = torch.tensor([[1.0, 0.5], [-0.3, 1.0]])
SIGMA = 0.5
PRIOR = dist.Normal(torch.zeros(2), 1.0).to_event(1)
POST_PRECISION = torch.eye(2) + A.T @ A / SIGMA**2
POST_COV = torch.linalg.inv(POST_PRECISION)


def post_mean(x):
    """``(..., 2) -> (..., 2)``: the analytic posterior mean."""
    return x @ (POST_COV @ A.T / SIGMA**2).T


def simulate(n):
    theta = PRIOR.sample((n,))
    return theta, theta @ A.T + SIGMA * torch.randn(n, 2)


def exact_log_ratio(theta, x):
    """``log p(x | theta) - log p(x)`` of the Gaussian linear simulator, broadcasting."""
    lik = dist.MultivariateNormal(theta @ A.T, SIGMA**2 * torch.eye(2)).log_prob(x)
    marg = dist.MultivariateNormal(torch.zeros(2), A @ A.T + SIGMA**2 * torch.eye(2)).log_prob(x)
    return lik - marg


class ExactLogRatio(nn.Module):
    """A logit network on rows ``[theta, x]`` that returns a given ``log r(theta, x)``."""

    def __init__(self, fn, theta_dim):
        super().__init__()
        self.fn, self.theta_dim = fn, theta_dim
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, z):
        return self.fn(z[..., : self.theta_dim], z[..., self.theta_dim :]) + 0 * self.dummy


def exact_likelihood(fn, prior, theta_dim, x_dim):
    """A fitted likelihood around an exact log ratio (standardisation the identity)."""
    est = ClassifierRatioEstimator(theta_dim + x_dim, network=ExactLogRatio(fn, theta_dim))
    est.fitted.fill_(True)
    return RatioLikelihood.from_fitted(est, prior=prior)


# --------------------------------------------------------------------------------------------------
# losses: exact identities
# --------------------------------------------------------------------------------------------------


class TestLosses:
    def test_contrastive_with_one_contrast_is_half_the_binary_loss(self):
        logits = torch.randn(64, 2, dtype=torch.float64) * 3
        assert torch.allclose(contrastive_ratio_loss(logits, 1.0), 0.5 * _bce(logits[:, 0], logits[:, 1]),
                              rtol=1e-12)
        assert not torch.allclose(contrastive_ratio_loss(logits, 2.0), 0.5 * _bce(logits[:, 0], logits[:, 1]))

    def test_contrastive_estimator_with_one_contrast_is_half_the_classifier_loss(self):
        """Same network and pairs: NRE-C (K = 1), row i against theta_{i+1}, is 1/2 BCE(joint, re-paired)."""
        net = SBIRatioNetwork(2, 3, hidden_dim=16)
        nrec = ContrastiveRatioEstimator(5, theta_dim=2, num_contrasts=1, network=net).double()
        nrea = ClassifierRatioEstimator(5, network=net).double()
        z = torch.randn(50, 5, dtype=torch.float64)
        shifted = torch.cat([z[torch.roll(torch.arange(50), -1), :2], z[:, 2:]], -1)  # theta_{i+1}, x_i
        assert torch.allclose(nrec._validation_loss(z), 0.5 * nrea._loss(z, shifted), rtol=1e-12)

    @pytest.mark.parametrize("num_contrasts", [1, 5])
    def test_contrastive_optimum_is_the_log_ratio_without_constant(self, num_contrasts):
        torch.manual_seed(0)
        theta, x = simulate(20_000)
        theta, x = theta.double(), x.double()
        idx = (torch.arange(20_000)[:, None] + torch.randint(1, 20_000, (20_000, num_contrasts))) % 20_000
        candidates = torch.cat([theta[:, None], theta[idx]], 1)  # (B, K + 1, 2)
        log_r = exact_log_ratio(candidates.float(), x[:, None].float()).double()
        losses = [contrastive_ratio_loss(log_r + c).item() for c in (-0.3, 0.0, 0.3)]
        losses += [contrastive_ratio_loss(s * log_r).item() for s in (0.8, 1.25)]
        assert losses[1] == min(losses)

    def test_balance_gap_vanishes_at_the_exact_ratio(self):
        """BNRE penalty: E_joint sigmoid(log r) + E_marginal sigmoid(log r) = 1 exactly for the true ratio."""
        torch.manual_seed(0)
        theta, x = simulate(200_000)
        joint = torch.sigmoid(exact_log_ratio(theta, x)).mean()
        marg = torch.sigmoid(exact_log_ratio(theta[torch.randperm(200_000)], x)).mean()
        assert abs(joint + marg - 1) < 0.005
        joint2 = torch.sigmoid(3 * exact_log_ratio(theta, x)).mean()
        marg2 = torch.sigmoid(3 * exact_log_ratio(theta[torch.randperm(200_000)], x)).mean()
        assert abs(joint2 + marg2 - 1) > 0.03

    def test_balanced_loss_adds_the_penalty(self):
        net = SBIRatioNetwork(2, 2, hidden_dim=8)
        plain = ClassifierRatioEstimator(4, network=net)
        balanced = ClassifierRatioEstimator(4, network=net, balance=100.0)
        a, b = torch.randn(32, 4), torch.randn(32, 4) + 1
        fa, fb = net(a), net(b)
        gap = torch.sigmoid(fa).mean() + torch.sigmoid(fb).mean() - 1
        assert torch.allclose(balanced._loss(a, b), plain._loss(a, b) + 100 * gap**2)


# --------------------------------------------------------------------------------------------------
# likelihood from simulations
# --------------------------------------------------------------------------------------------------


class TestLikelihood:
    def test_from_given_pairs_equals_fit_from_the_simulator(self):
        def prior():
            pyro.sample("theta", PRIOR)

        def simulator(params):
            return params["theta"] @ A.T + SIGMA * torch.randn_like(params["theta"])

        def est():
            return ClassifierRatioEstimator(4, hidden_dim=16, num_layers=1)

        torch.manual_seed(3)
        fitted = RatioLikelihood(prior, simulator, est()).fit(600, max_num_iterations=60)
        torch.manual_seed(3)
        lik = RatioLikelihood(prior, simulator, est())
        theta, x = lik.simulate(600)
        given = RatioLikelihood.from_simulations(theta, x, prior=PRIOR, estimator=lik.estimator,
                                                 max_num_iterations=60)
        assert fitted.estimator.losses == given.estimator.losses
        for (k, v), w in zip(fitted.estimator.state_dict().items(), given.estimator.state_dict().values()):
            assert torch.equal(v, w), k
        assert fitted.posterior(X_OBS).sample((5,)).shape == (5, 2)  # a Pyro-model prior with one site

    def test_early_stopping_scales_with_the_data(self):
        torch.manual_seed(0)
        theta, x = simulate(1000)
        lik = RatioLikelihood.from_simulations(theta, x, prior=PRIOR, estimator="classifier", patience=3)
        est = lik.estimator
        steps = len(est.losses)
        checks = est.validation_losses
        assert steps < 20_000 and steps % math.ceil(900 / 112) == 0  # batch 900 // 8 = 112: 9 steps an epoch
        best = min(range(len(checks)), key=lambda i: checks[i][1])
        assert len(checks) - 1 - best == 3  # stopped 3 epochs after the best

    @pytest.mark.parametrize("n, batch", [(100, 32), (1000, 112), (4000, 256)])
    def test_default_batch_gives_at_least_8_steps_an_epoch(self, n, batch):
        """``clip(N_train // 8, 32, 256)`` rows a step: validation checks every ``ceil(N_train / batch)``."""
        torch.manual_seed(0)
        theta, x = simulate(n)
        lik = RatioLikelihood.from_simulations(theta, x, prior=PRIOR, estimator="classifier",
                                               max_num_iterations=40)
        n_train = n - math.ceil(0.1 * n)
        assert [s for s, _ in lik.estimator.validation_losses][:2] == [0, math.ceil(n_train / batch)]

    def test_embedding_network_is_trained(self):
        torch.manual_seed(0)
        theta, x = simulate(500)
        x = torch.cat([x, torch.randn(500, 6)], -1)  # 8 columns, 6 of them noise
        embedding = nn.Linear(8, 3)
        before = embedding.weight.detach().clone()
        lik = RatioLikelihood.from_simulations(theta, x, prior=PRIOR, estimator="contrastive",
                                               estimator_options=dict(embedding=embedding),
                                               max_num_iterations=50)
        assert lik.estimator.network.embedding is embedding
        assert not torch.equal(before, embedding.weight)
        assert lik.log_ratio(theta[:7], x[:7]).shape == (7,)
        assert lik.log_ratio(theta[:7, None], x[None, :3]).shape == (7, 3)

    @pytest.mark.parametrize("estimator", ["balanced", "telescoping", "tangent", "secant"])
    def test_other_estimators_as_likelihoods(self, estimator):
        torch.manual_seed(0)
        theta, x = simulate(400)
        lik = RatioLikelihood.from_simulations(theta, x, prior=PRIOR, estimator=estimator, num_iterations=30,
                                               estimator_options=dict(hidden_dim=16, num_layers=1))
        assert len(lik.estimator.losses) <= 30
        assert lik.log_ratio(theta[:5], x[:5]).shape == (5,)
        assert lik.posterior(X_OBS).sample((10,)).shape == (10, 2)

    def test_estimators_register_themselves(self, tmp_path):
        assert "from ." not in inspect.getsource(ratio_base._registry)
        assert "ContrastiveRatioEstimator" in ratio_base._registry()
        est = ContrastiveRatioEstimator(4, theta_dim=2, hidden_dim=8, num_layers=1)
        theta, x = simulate(64)
        z = torch.cat([theta, x], -1)
        est.fit(z, z[torch.randperm(64)], num_iterations=3, batch_size=16, progress_bar=False)
        est.save(tmp_path / "c.pt")
        back = RatioEstimator.load(tmp_path / "c.pt")
        assert type(back) is ContrastiveRatioEstimator and back.num_contrasts == 5
        assert torch.equal(back.log_ratio(z), est.log_ratio(z))

    def test_bad_input(self):
        theta, x = simulate(100)
        with pytest.raises(ValueError, match="estimator must be one of"):
            RatioLikelihood.from_simulations(theta, x, prior=PRIOR, estimator="nre_z")
        with pytest.raises(ValueError, match="x must have shape"):
            RatioLikelihood.from_simulations(theta, x[:50], prior=PRIOR)
        with pytest.raises(ValueError, match="batch_shape"):
            RatioLikelihood.from_simulations(theta, x, prior=dist.Normal(torch.zeros(2), 1.0))
        with pytest.raises(ValueError, match="theta contains NaN"):
            RatioLikelihood.from_simulations(theta * math.nan, x, prior=PRIOR)
        with pytest.raises(ValueError, match="validation_fraction"):
            RatioLikelihood.from_simulations(theta, x, prior=PRIOR, validation_fraction=1.0)
        with pytest.raises(ValueError, match="embedding"):
            RatioLikelihood.from_simulations(theta, x, prior=PRIOR, estimator="tangent",
                                             estimator_options=dict(embedding=nn.Linear(2, 2)))
        with pytest.raises(ValueError, match="patience"):
            ClassifierRatioEstimator(2).fit(theta, x, patience=3, progress_bar=False)
        with pytest.raises(ValueError, match="balance"):
            ClassifierRatioEstimator(2, balance=-1.0)
        with pytest.raises(ValueError, match="theta_dim"):
            ContrastiveRatioEstimator(4, theta_dim=4)
        lik = RatioLikelihood(PRIOR, None)
        assert lik.estimator == "contrastive"  # the default
        with pytest.raises(ValueError, match="fitted"):
            lik.posterior(torch.zeros(2))
        lik = exact_likelihood(exact_log_ratio, PRIOR, 2, 2)
        with pytest.raises(ValueError, match="x_obs must have 2 values"):
            lik.posterior(torch.zeros(3))
        with pytest.raises(ValueError, match="no x columns"):
            RatioLikelihood.from_fitted(lik.estimator, prior=dist.Normal(torch.zeros(4), 1.0).to_event(1))
        with pytest.raises(ValueError, match="fitted"):
            RatioLikelihood.from_fitted(ClassifierRatioEstimator(4), prior=PRIOR)


# --------------------------------------------------------------------------------------------------
# the posterior object
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gaussian_simulations():
    torch.manual_seed(0)
    return simulate(10_000)


@pytest.fixture(scope="module")
def fitted_classifier(gaussian_simulations):
    torch.manual_seed(1)
    return RatioLikelihood.from_simulations(*gaussian_simulations, prior=PRIOR, estimator="classifier")


X_OBS = torch.tensor([0.7, -0.4])


class TestPosterior:
    @pytest.mark.parametrize("estimator", ["classifier", pytest.param("contrastive", marks=pytest.mark.slow)])
    def test_fitted_posterior_matches_the_analytic_one(self, gaussian_simulations, fitted_classifier,
                                                        estimator):
        """10,000 simulations: the fitted ratio's posterior mean and covariance match N(m(x), C)."""
        torch.manual_seed(1)
        lik = fitted_classifier if estimator == "classifier" else RatioLikelihood.from_simulations(
            *gaussian_simulations, prior=PRIOR, estimator=estimator)
        draws = lik.posterior(X_OBS).sample((4000,))
        assert draws.shape == (4000, 2)
        assert (draws.mean(0) - post_mean(X_OBS)).abs().max() < 0.06
        assert (torch.cov(draws.T) - POST_COV).abs().max() < 0.02
        batch = lik.sample_posteriors(torch.stack([X_OBS, -X_OBS]), 2000)  # amortised, importance
        assert batch.shape == (2000, 2, 2)
        assert (batch.mean(0) - post_mean(torch.stack([X_OBS, -X_OBS]))).abs().max() < 0.08

    def test_exact_ratio_posterior_log_prob_map_and_arviz(self):
        torch.manual_seed(0)
        post = exact_likelihood(exact_log_ratio, PRIOR, 2, 2).posterior(X_OBS)
        assert isinstance(post, RatioPosterior)
        truth = dist.MultivariateNormal(post_mean(X_OBS), POST_COV)
        theta = truth.sample((5,))
        assert torch.allclose(post.log_prob(theta), truth.log_prob(theta), atol=0.03)  # log Z = 0 exactly
        assert abs(post.log_evidence().log_z.item()) < 0.03
        assert torch.allclose(post.map(), post_mean(X_OBS), atol=1e-3)
        draws = post.sample((3, 1000))
        assert draws.shape == (3, 1000, 2)
        assert (draws.reshape(-1, 2).mean(0) - post_mean(X_OBS)).abs().max() < 0.04
        idata = to_inference_data(post, 500)
        assert idata.posterior["theta"].shape == (1, 500, 2)

    def test_separated_modes_get_their_mass(self):
        """theta ~ N(0, 3^2), x | theta ~ N(theta^2, 0.5^2), x_obs = 4: modes at +-2 of equal mass (one NUTS
        chain stays in one); with an extra x-column 2 theta the + mode carries weight 1 / (1 + e^-2)."""
        prior = dist.Normal(torch.zeros(1), 3.0).to_event(1)

        def symmetric(theta, x):
            return -0.5 * ((x[..., 0] - theta[..., 0] ** 2) / 0.5) ** 2

        torch.manual_seed(0)
        draws = exact_likelihood(symmetric, prior, 1, 1).posterior(torch.tensor([4.0])).sample((4000,))
        assert abs((draws > 0).double().mean().item() - 0.5) < 0.06
        assert ((draws.abs() - 2).abs() < 0.4).double().mean() > 0.95

        def tilted(theta, x):
            return symmetric(theta, x) + (theta[..., 0] > 0).to(theta.dtype)  # + mode: e^1 more mass
        torch.manual_seed(0)
        draws = exact_likelihood(tilted, prior, 1, 1).posterior(torch.tensor([4.0])).sample((4000,))
        assert abs((draws > 0).double().mean().item() - math.e / (1 + math.e)) < 0.06

    def test_bounded_prior_is_sampled_in_its_support(self):
        prior = dist.Uniform(-torch.ones(2), torch.ones(2)).to_event(1)

        def peaked_near_the_edge(theta, x):
            return -0.5 * ((theta - x) / 0.3).square().sum(-1)

        torch.manual_seed(0)
        post = exact_likelihood(peaked_near_the_edge, prior, 2, 2).posterior(torch.tensor([0.9, -0.9]))
        draws = post.sample((2000,))
        assert draws.abs().max() < 1
        assert torch.isinf(post.log_prob(torch.tensor([1.5, 0.0])))
        # truncated normal mean: 0.9 - 0.3 phi(a) / (Phi(b) - Phi(a)) per coordinate (b = 1/3, a = -19/3)
        normal = torch.distributions.Normal(0.0, 1.0)
        b, a = torch.tensor(0.1 / 0.3), torch.tensor(-1.9 / 0.3)
        pdf = normal.log_prob(b).exp() - normal.log_prob(a).exp()
        mean = 0.9 - 0.3 * pdf / (normal.cdf(b) - normal.cdf(a))
        assert abs(draws[:, 0].mean() - mean) < 0.03 and abs(draws[:, 1].mean() + mean) < 0.03


# a prior over two sites: a ~ N(0, 1), b ~ N(0, 2^2) in a plate of 2; x = B [b, a] + sigma eps (3 values)
B2 = torch.tensor([[1.0, 0.0, 0.5], [0.3, -1.0, 0.0], [0.0, 0.4, 1.0]])  # columns: b_1, b_2, a
PRIOR2_COV = torch.diag(torch.tensor([4.0, 4.0, 1.0]))  # of rows [b, a] (sites=["b", "a"])
POST2_COV = torch.linalg.inv(torch.linalg.inv(PRIOR2_COV) + B2.T @ B2 / SIGMA**2)
X2_OBS = torch.tensor([0.8, -0.5, 1.2])


def two_site_prior():
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    with pyro.plate("p", 2):
        b = pyro.sample("b", dist.Normal(0.0, 2.0))
    return a, b


def two_site_simulator(params):  # {"a": (N,), "b": (N, 2)} -> (N, 3)
    theta = torch.cat([params["b"], params["a"][:, None]], -1)
    return theta @ B2.T + SIGMA * torch.randn(theta.shape[0], 3)


def two_site_log_ratio(theta, x):  # theta rows [b_1, b_2, a]
    lik = dist.MultivariateNormal(theta @ B2.T, SIGMA**2 * torch.eye(3)).log_prob(x)
    marg = dist.MultivariateNormal(torch.zeros(3), B2 @ PRIOR2_COV @ B2.T + SIGMA**2 * torch.eye(3))
    return lik - marg.log_prob(x)


class TestSeveralSites:
    def test_exact_ratio_posterior_in_sites_order(self):
        """Sites ``["b", "a"]``: rows ``[b_1, b_2, a]``; posterior N(C B^T x / sigma^2, C), log Z = 0."""
        est = ClassifierRatioEstimator(6, network=ExactLogRatio(two_site_log_ratio, 3))
        est.fitted.fill_(True)
        lik = RatioLikelihood.from_fitted(est, prior=two_site_prior, sites=["b", "a"])
        assert dict(lik.sites) == {"b": (2,), "a": ()}
        torch.manual_seed(0)
        post = lik.posterior(X2_OBS)
        truth = dist.MultivariateNormal(POST2_COV @ B2.T @ X2_OBS / SIGMA**2, POST2_COV)
        draws = post.sample((4000,))
        assert draws.shape == (4000, 3)
        assert (draws.mean(0) - truth.mean).abs().max() < 0.04
        assert (torch.cov(draws.T) - POST2_COV).abs().max() < 0.02
        theta = truth.sample((5,))
        assert torch.allclose(post.log_prob(theta), truth.log_prob(theta), atol=0.03)
        prior_lp = (dist.Normal(0.0, 2.0).log_prob(theta[:, :2]).sum(-1)
                    + dist.Normal(0.0, 1.0).log_prob(theta[:, 2]))
        assert torch.allclose(lik._prior().log_prob(theta), prior_lp, atol=1e-5)
        samples, log_w = post.get_weighted_samples()
        assert samples["b"].shape[1:] == (2,) and samples["a"].dim() == 1
        assert torch.equal(torch.cat([samples["b"], samples["a"][:, None]], -1),
                           post.prior.constrain(post.smc.get_weighted_samples()[0]["x"].to(post.dtype))[0])

    def test_fitted_from_the_simulator_matches_the_analytic_posterior(self):
        """10,000 simulations from a two-site prior model (default sites order ``a, b``: rows ``[a, b]``)."""
        torch.manual_seed(0)
        lik = RatioLikelihood(two_site_prior, two_site_simulator, "classifier")
        lik.fit(10_000, max_num_iterations=600)
        assert list(lik.sites) == ["a", "b"] and lik.theta_dim == 3
        torch.manual_seed(1)
        draws = lik.posterior(X2_OBS).sample((4000,))[:, [1, 2, 0]]  # -> [b_1, b_2, a]
        mean = POST2_COV @ B2.T @ X2_OBS / SIGMA**2
        assert (draws.mean(0) - mean).abs().max() < 0.08
        assert (torch.cov(draws.T) - POST2_COV).abs().max() < 0.03

    def test_dependent_sites_and_constrained_supports(self):
        """``s ~ HalfNormal(1)``, ``z ~ N(s, 1)`` (2 of them): the prior's log density conditions z on s;
        draws stay in the support; -inf outside it."""
        def prior():
            s = pyro.sample("s", dist.HalfNormal(1.0))
            with pyro.plate("p", 2):
                pyro.sample("z", dist.Normal(s, 1.0))

        def log_ratio(theta, x):
            return -(theta[..., 1:] - x).square().sum(-1)

        est = ClassifierRatioEstimator(5, network=ExactLogRatio(log_ratio, 3))
        est.fitted.fill_(True)
        lik = RatioLikelihood.from_fitted(est, prior=prior)
        flat = lik._prior()
        theta = torch.tensor([[0.5, 0.1, -0.3], [2.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
        want = (dist.HalfNormal(1.0).log_prob(theta[:2, 0])
                + dist.Normal(theta[:2, :1], 1.0).log_prob(theta[:2, 1:]).sum(-1))
        lp = flat.log_prob(theta)
        assert torch.allclose(lp[:2], want) and lp[2] == -math.inf
        u = torch.randn(7, 3)
        back, log_det = flat.constrain(u)
        assert torch.allclose(flat.unconstrain(back), u, atol=1e-5)
        assert torch.allclose(log_det, u[:, 0])  # exp: log |d theta / du| = u
        torch.manual_seed(0)
        draws = lik.posterior(torch.tensor([0.5, -0.5])).sample((500,))
        assert (draws[:, 0] > 0).all()

    def test_bad_sites(self):
        theta = torch.randn(100, 2)
        x = torch.randn(100, 3)
        with pytest.raises(ValueError, match=r"theta must have shape \(N, 3\).*b: \(2,\), a: \(\)"):
            RatioLikelihood.from_simulations(theta, x, prior=two_site_prior, sites=["b", "a"])
        with pytest.raises(ValueError, match="sites must name the prior's latent sites"):
            RatioLikelihood.from_simulations(torch.randn(100, 3), x, prior=two_site_prior, sites=["b", "c"])
        with pytest.raises(ValueError, match="distinct site names"):
            RatioLikelihood(two_site_prior, sites=["a", "a"])

        def moving_support():
            s = pyro.sample("s", dist.HalfNormal(1.0))
            pyro.sample("z", dist.Uniform(0.0, s))

        est = ClassifierRatioEstimator(3, network=ExactLogRatio(lambda t, x: t.sum(-1) * 0, 2))
        est.fitted.fill_(True)
        with pytest.raises(NotImplementedError, match="site 'z'"):
            RatioLikelihood.from_fitted(est, prior=moving_support).posterior(torch.zeros(1))


# --------------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------------


def analytic_draws(x, num_samples, scale=1.0):
    """``(L, N, 2)`` draws from the analytic posterior, its covariance scaled by ``scale^2``."""
    chol = torch.linalg.cholesky(POST_COV) * scale
    return post_mean(x)[None] + torch.randn(num_samples, x.shape[0], 2) @ chol.T


class TestCalibration:
    def test_sbc_ranks_uniform_for_the_exact_posterior_only(self):
        torch.manual_seed(0)
        theta, x = simulate(1000)
        exact = simulation_based_calibration(theta, analytic_draws(x, 99))
        assert exact.ranks.shape == (1000, 2) and exact.num_bins == 20
        assert exact.p_values.min() > 0.01
        over = simulation_based_calibration(theta, analytic_draws(x, 99, scale=0.7))  # over-confident
        assert over.p_values.max() < 1e-6
        biased = simulation_based_calibration(theta, analytic_draws(x, 99) + 0.3)
        assert biased.p_values.max() < 1e-6
        axes = plot_sbc_ranks(exact)
        assert len(axes) == 2

    def test_chi_square_matches_scipy(self):
        stats = pytest.importorskip("scipy.stats")
        torch.manual_seed(0)
        theta, x = simulate(300)
        result = simulation_based_calibration(theta, analytic_draws(x, 39, scale=0.8), num_bins=8)
        for k in range(2):
            counts = torch.bincount(result.ranks[:, k] * 8 // 40, minlength=8).numpy()
            ref = stats.chisquare(counts)  # 40 rank values in 8 bins of 5: equal expected counts
            assert abs(result.chi2[k].item() - ref.statistic) < 1e-9
            assert abs(result.p_values[k].item() - ref.pvalue) < 1e-9

    def test_fitted_likelihood_sbc(self, fitted_classifier):
        """The amortised fitted posterior passes SBC on fresh simulations."""
        torch.manual_seed(2)
        theta, x = simulate(300)
        draws = fitted_classifier.sample_posteriors(x, 99, num_proposals=2048)
        result = simulation_based_calibration(theta, draws, num_bins=10)
        assert result.p_values.min() > 0.001

    def test_coverage_and_tarp(self):
        torch.manual_seed(0)
        theta, x = simulate(2000)
        levels = torch.tensor([0.1, 0.5, 0.9])
        for scale, calibrated in ((1.0, True), (0.6, False)):
            draws = analytic_draws(x, 200, scale)
            q = dist.MultivariateNormal(post_mean(x), POST_COV * scale**2)
            hpd = expected_coverage(q.log_prob(theta), q.log_prob(draws), levels)
            tarp = tarp_coverage(theta, draws, levels=levels)
            for res in (hpd, tarp):
                error = (res.coverage - levels).abs().max()
                assert (error < 0.05) if calibrated else (error > 0.15), (scale, res.coverage)
        assert (hpd.coverage < levels).all()  # over-confident: regions too small

    def test_posterior_predictive_pvalues(self):
        """Against the closed form: x_rep | x ~ N(A m(x), A C A^T + sigma^2 I), so the two-sided p-value of
        coordinate k is 2 Phi(-|x_k - (A m(x))_k| / sd_k)."""
        torch.manual_seed(0)
        _, x = simulate(300)
        draws = analytic_draws(x, 2000)  # (L, N, 2)
        x_rep = draws @ A.T + SIGMA * torch.randn_like(draws)
        sampled = torch.stack([posterior_predictive_pvalues(x[i], x_rep[:, i]) for i in range(300)])
        sd = torch.diagonal(A @ POST_COV @ A.T + SIGMA**2 * torch.eye(2)).sqrt()
        z = (x - post_mean(x) @ A.T).abs() / sd
        exact = 2 * torch.distributions.Normal(0.0, 1.0).cdf(-z)
        error = (sampled - exact).abs()  # Monte Carlo sd about 0.02 per value
        assert sampled.shape == (300, 2) and error.mean() < 0.025 and error.max() < 0.1
        assert exact.mean() > 0.6  # not uniform: the data are used twice (conservative)
        with pytest.raises(ValueError, match="x_predictive"):
            posterior_predictive_pvalues(x[0], x_rep[:, 0, :1])
