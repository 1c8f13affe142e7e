"""ArviZ export: ``log_likelihood``, ``observed_data``, ``constant_data``, ``posterior_predictive`` and the
draws ArviZ sees, checked on a conjugate Bayesian linear regression whose posterior, pointwise
predictive densities, WAIC and exact leave-one-out predictive densities are closed forms.

Also here: the models the samplers refuse (masked latent sites, plate subsampling), since the
refusals are about what the weights and evidence can mean.
"""

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_sde
from pyro_sde import diagnostics
from pyro_sde._arviz import FromPyroGuard, _ModelCall
from pyro_sde.diagnostics import UnreliableEstimateWarning
from pyro_sde.infer import DiffusionSampler, SMCSampler
from pyro_sde.infer.potential import ModelPotential

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

F64 = torch.float64
SIGMA, TAU = 0.5, 1.0  # noise and prior scales of the regression
# Monte Carlo sd of elpd_loo / elpd_waic over replicate sets of 1000 exact posterior draws of this
# regression (measured: 0.06, 0.05); tolerances are 5 sd
MC_TOL = 0.3


def regression(X, y=None):
    """``beta ~ N(0, TAU^2 I)``, ``y_i ~ N(x_i . beta, SIGMA^2)`` (vectorisable: no matmul on beta)."""
    beta = pyro.sample("beta", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), TAU).to_event(1))
    pyro.deterministic("fitted_mean", (X * beta).sum(-1), event_dim=1)
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("y", dist.Normal((X * beta).sum(-1), SIGMA), obs=y)


def regression_loop(X, y=None):
    """The same model with Python control flow on the draw (neither plate- nor vmap-vectorisable)."""
    beta = pyro.sample("beta", dist.Normal(torch.zeros(X.shape[1], dtype=X.dtype), TAU).to_event(1))
    mean = torch.stack([sum(float(b) * X[i, j] for j, b in enumerate(beta)) for i in range(X.shape[0])])
    with pyro.plate("data", X.shape[0]):
        return pyro.sample("y", dist.Normal(mean, SIGMA), obs=y)


def posterior(X, y):
    """Exact posterior ``N(m, S)`` of beta."""
    precision = X.T @ X / SIGMA**2 + torch.eye(X.shape[1], dtype=X.dtype) / TAU**2
    cov = torch.linalg.inv(precision)
    return cov @ X.T @ y / SIGMA**2, cov


def exact_waic(X, y):
    """``(elpd_waic, p_waic)``: ``lppd_i = log N(y_i | x_i m, SIGMA^2 + v_i)`` with ``v_i = x_i S x_i``;
    ``p_waic_i = Var(log p(y_i | beta)) = (2 v_i^2 + 4 a_i^2 v_i) / (4 SIGMA^4)``, ``a_i = y_i - x_i m``."""
    m, S = posterior(X, y)
    a, v = y - X @ m, (X @ S * X).sum(-1)
    lppd = dist.Normal(X @ m, (SIGMA**2 + v).sqrt()).log_prob(y).sum()
    p_waic = ((2 * v**2 + 4 * a**2 * v) / (4 * SIGMA**4)).sum()
    return float(lppd - p_waic), float(p_waic)


def exact_elpd_loo(X, y):
    """``sum_i log p(y_i | y_-i)``, each a Gaussian posterior predictive without observation i."""
    total = 0.0
    for i in range(X.shape[0]):
        keep = torch.arange(X.shape[0]) != i
        m, S = posterior(X[keep], y[keep])
        total += float(dist.Normal(X[i] @ m, (SIGMA**2 + X[i] @ S @ X[i]).sqrt()).log_prob(y[i]))
    return total


def exact_inference_data(X, y, num_draws=1000, seed=1):
    """ArviZ data of exact posterior draws (the stand-in for NUTS) with a hand-written log likelihood."""
    g = torch.Generator().manual_seed(seed)
    m, S = posterior(X, y)
    beta = m + torch.randn(num_draws, X.shape[1], generator=g, dtype=F64) @ torch.linalg.cholesky(S).T
    log_lik = dist.Normal(beta @ X.T, SIGMA).log_prob(y)
    return az.from_dict(
        posterior={"beta": beta.numpy()[None]},
        log_likelihood={"y": log_lik.numpy()[None]},
        observed_data={"y": y.numpy()},
    )


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(20, 2, generator=g, dtype=F64)
    y = X @ torch.tensor([1.0, -0.5], dtype=F64) + SIGMA * torch.randn(20, generator=g, dtype=F64)
    return X, y


@pytest.fixture(scope="module")
def sampler(data):
    pyro.set_rng_seed(0)
    return DiffusionSampler(regression).run(*data, progress_bar=False)


@pytest.fixture(scope="module")
def idata(sampler):
    pyro.set_rng_seed(1)
    return pyro_sde.to_inference_data(sampler, posterior_predictive=True)


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


class TestGroups:
    def test_groups_and_data(self, idata, data):
        X, y = data
        assert set(idata.groups()) >= {
            "posterior", "sample_stats", "log_likelihood", "observed_data", "constant_data",
            "posterior_predictive",
        }
        np.testing.assert_array_equal(idata.observed_data["y"].values, y.numpy())
        np.testing.assert_array_equal(idata.constant_data["X"].values, X.numpy())
        assert "y" not in idata.constant_data  # the observed argument is data, not a constant
        assert "fitted_mean" not in idata.observed_data and "fitted_mean" not in idata.log_likelihood
        assert idata.log_likelihood["y"].shape == (1, idata.posterior.sizes["draw"], 20)
        assert idata.log_likelihood["y"].dtype == np.float64

    def test_log_likelihood_is_the_pointwise_density_of_the_draws(self, idata, data):
        X, y = data
        beta = torch.as_tensor(idata.posterior["beta"].values[0])
        expected = dist.Normal(beta @ X.T, SIGMA).log_prob(y)
        np.testing.assert_allclose(idata.log_likelihood["y"].values[0], expected.numpy(), atol=1e-10)

    def test_draws_are_about_the_importance_ess(self, idata, sampler):
        n = idata.attrs["num_weighted_samples"]
        assert idata.posterior.sizes["draw"] == math.floor(idata.attrs["ess"] * n)
        assert idata.attrs["ess"] > 0.9  # the whitened Gaussian is nearly exact: most draws are kept

    def test_sequential_model_and_unweighted_dict(self, data):
        # the model cannot run under a plate: the draws are traced one by one, with the same result
        X, y = data
        m, S = posterior(X, y)
        beta = torch.distributions.MultivariateNormal(m, S).sample((30,))
        out = pyro_sde.to_inference_data(
            {"beta": beta}, model=regression_loop, model_args=(X, y), posterior_predictive=True
        )
        expected = dist.Normal(beta @ X.T, SIGMA).log_prob(y)
        np.testing.assert_allclose(out.log_likelihood["y"].values[0], expected.numpy(), atol=1e-10)
        assert out.posterior_predictive["y"].shape == (1, 30, 20)
        assert not hasattr(out, "sample_stats")

    def test_a_plate_path_that_runs_but_mixes_draws_is_not_used(self, data):
        # beta.sum() sums over all draws under the plate: it runs, gives wrong values, and is rejected
        X, y = data

        def collapsing(X, y=None):
            beta = pyro.sample("beta", dist.Normal(torch.zeros(2, dtype=X.dtype), TAU).to_event(1))
            with pyro.plate("data", X.shape[0]):
                return pyro.sample("y", dist.Normal(X[:, 0] * beta.sum(), SIGMA), obs=y)

        beta = torch.randn(40, 2, dtype=F64)
        expected = dist.Normal(X[:, 0] * beta.sum(-1, keepdim=True), SIGMA).log_prob(y)
        for fn, vectorised in [(collapsing, False), (regression, True)]:
            call = _ModelCall(fn, (X, y), {}, {"beta": beta})
            out = call.pointwise_log_likelihood({"beta": beta}, 40)["y"]
            assert call._vectorised is vectorised
        collapsed = _ModelCall(collapsing, (X, y), {}, {"beta": beta})
        torch.testing.assert_close(collapsed.pointwise_log_likelihood({"beta": beta}, 40)["y"], expected)
        assert out.shape == (40, 20)

    def test_no_model_no_likelihood(self, data):
        X, y = data
        out = pyro_sde.to_inference_data(({"beta": torch.randn(200, 2)}, torch.zeros(200)))
        assert not hasattr(out, "log_likelihood") and not hasattr(out, "observed_data")
        assert out.posterior.sizes["draw"] == 200  # equal weights: ESS = N

    def test_posterior_predictive_moments(self, idata, data):
        # y_rep_i ~ N(x_i m, SIGMA^2 + x_i S x_i) exactly; 4000 draws: sd of the mean about 0.01
        X, y = data
        m, S = posterior(X, y)
        y_rep = idata.posterior_predictive["y"].values[0]
        np.testing.assert_allclose(y_rep.mean(0), (X @ m).numpy(), atol=0.05)
        np.testing.assert_allclose(y_rep.var(0), (SIGMA**2 + (X @ S * X).sum(-1)).numpy(), rtol=0.15)


class TestArvizFunctions:
    def test_loo_and_waic_agree_with_closed_forms_and_exact_draws(self, idata, data):
        X, y = data
        ours_loo, ours_waic = _quiet(az.loo, idata), _quiet(az.waic, idata)
        exact = exact_inference_data(X, y)
        ref_loo, ref_waic = _quiet(az.loo, exact), _quiet(az.waic, exact)
        elpd_waic, p_waic = exact_waic(X, y)
        assert ours_loo.elpd_loo == pytest.approx(exact_elpd_loo(X, y), abs=MC_TOL)
        assert ours_loo.elpd_loo == pytest.approx(ref_loo.elpd_loo, abs=MC_TOL)
        assert ours_waic.elpd_waic == pytest.approx(elpd_waic, abs=MC_TOL)
        assert ours_waic.elpd_waic == pytest.approx(ref_waic.elpd_waic, abs=MC_TOL)
        assert ours_waic.p_waic == pytest.approx(p_waic, abs=0.2)
        assert (ours_loo.pareto_k.values < 0.7).all()

    def test_compare_ranks_as_the_closed_forms(self, idata, data):
        # against an intercept-only model (the same conjugate form with X = ones), fitted by SMC
        X, y = data
        ones = torch.ones(20, 1, dtype=F64)
        pyro.set_rng_seed(2)
        smc = SMCSampler(regression, num_particles=2000).run(ones, y)
        null = _quiet(pyro_sde.to_inference_data, smc)
        table = _quiet(az.compare, {"regression": idata, "intercept": null})
        assert list(table.index) == ["regression", "intercept"]
        expected_diff = exact_elpd_loo(X, y) - exact_elpd_loo(ones, y)
        assert table.loc["intercept", "elpd_diff"] == pytest.approx(expected_diff, abs=2 * MC_TOL)
        assert null.log_likelihood["y"].shape[1] == null.posterior.sizes["draw"]

    def test_plot_ppc(self, idata):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        axes = _quiet(az.plot_ppc, idata, num_pp_samples=50)
        assert np.size(axes) >= 1
        plt.close("all")


class TestDraws:
    def test_arviz_ess_does_not_overstate_degenerate_weights(self):
        # lognormal weights with sd 3: importance ESS about 20-60 of 4000, Pareto k > 0.7. Resampling all
        # 4000 draws, ArviZ's ESS was several times the importance ESS; with about ESS draws the ratio
        # averages 0.7 (measured over 40 seeds: 90% below 1.0, max 1.5, ArviZ's estimator noise at few draws)
        ratios = []
        for seed in range(8):
            g = torch.Generator().manual_seed(seed)
            x = torch.randn(4000, 2, generator=g, dtype=F64)
            lw = 3.0 * torch.randn(4000, generator=g, dtype=F64)
            importance_ess = float(diagnostics.effective_sample_size(lw)) * 4000
            with pytest.warns(UnreliableEstimateWarning), pytest.warns(RuntimeWarning, match="effective"):
                out = pyro_sde.to_inference_data(({"x": x}, lw))
            assert importance_ess < 100 and out.attrs["pareto_k"] > 0.7
            assert out.posterior.sizes["draw"] <= importance_ess
            ratios.append(_quiet(az.ess, out)["x"].values / importance_ess)
        ratios = np.concatenate(ratios)
        ratios = ratios[np.isfinite(ratios)]  # NaN: ArviZ cannot tell from so few draws
        assert ratios.size >= 8 and ratios.mean() <= 1.0 and ratios.max() <= 2.0

    def test_degenerate_sampler_run(self):
        # an untrained sampler far from its target: the ESS is a few draws of 4000
        target = dist.Normal(4.0, 0.3)
        s = DiffusionSampler(
            log_density=lambda x: target.log_prob(x).sum(-1), dim=2, precondition=None, num_steps=10
        )
        s.run(num_iterations=5, until=None, progress_bar=False)
        with pytest.warns(UnreliableEstimateWarning), pytest.warns(RuntimeWarning, match="effective sample"):
            out = pyro_sde.to_inference_data(s)
        importance_ess = out.attrs["ess"] * out.attrs["num_weighted_samples"]
        assert out.posterior.sizes["draw"] <= importance_ess
        assert not (_quiet(az.ess, out)["x"].values > importance_ess).any()  # NaN: too few draws to tell

    def test_chains(self, data):
        # K independent weighted runs -> K chains of the smallest chain's ESS draws; ArviZ's R-hat sees them
        X, y = data
        m, S = posterior(X, y)
        g = torch.Generator().manual_seed(3)
        beta = m + torch.randn(4, 1000, 2, generator=g, dtype=F64) @ torch.linalg.cholesky(S).T
        lw = 0.3 * torch.randn(4, 1000, generator=g, dtype=F64)  # mild weights: ESS about 0.9
        out = _quiet(pyro_sde.to_inference_data, ({"beta": beta}, lw), model=regression, model_args=(X, y))
        ess = [float(diagnostics.effective_sample_size(lw[k])) * 1000 for k in range(4)]
        assert dict(out.posterior.sizes)["chain"] == 4
        assert out.posterior.sizes["draw"] == math.floor(min(ess))
        assert out.log_likelihood["y"].shape == (4, out.posterior.sizes["draw"], 20)
        expected = dist.Normal(torch.as_tensor(out.posterior["beta"].values[2]) @ X.T, SIGMA).log_prob(y)
        np.testing.assert_allclose(out.log_likelihood["y"].values[2], expected.numpy(), atol=1e-10)
        assert (_quiet(az.rhat, out)["beta"].values < 1.01).all()
        shifted = beta.clone()
        shifted[3] += 3 * S.diagonal().sqrt()  # one chain off by 3 sd: R-hat must see it
        bad = _quiet(pyro_sde.to_inference_data, ({"beta": shifted}, lw))
        assert (_quiet(az.rhat, bad)["beta"].values > 1.1).all()
        with pytest.raises(ValueError, match=r"shape \(K, N, \*site_shape\)"):
            pyro_sde.to_inference_data(({"beta": beta[:, :10]}, lw))

    def test_sampler_chains(self):
        class TwoChains:  # the contract: num_chains and get_weighted_samples(group_by_chain=True)
            num_chains = 2

            def get_weighted_samples(self, num_samples=None, group_by_chain=False):
                x, lw = torch.randn(2, 500, dtype=F64), torch.zeros(2, 500, dtype=F64)
                return ({"x": x}, lw) if group_by_chain else ({"x": x.reshape(-1)}, lw.reshape(-1))

        out = pyro_sde.to_inference_data(TwoChains())
        assert dict(out.posterior["x"].sizes) == {"chain": 2, "draw": 500}

    def test_num_draws_and_num_samples(self, sampler):
        out = pyro_sde.to_inference_data(sampler, 500, num_draws=300, log_likelihood=False)
        assert out.posterior.sizes["draw"] == 300 and out.attrs["num_weighted_samples"] == 500
        assert not hasattr(out, "log_likelihood") and hasattr(out, "observed_data")

    def test_bad_arguments(self, sampler):
        weighted = ({"x": torch.zeros(300)}, torch.zeros(300))
        with pytest.raises(ValueError, match="num_samples only applies to a sampler"):
            pyro_sde.to_inference_data(weighted, 10)
        with pytest.raises(ValueError, match="num_draws"):
            pyro_sde.to_inference_data(weighted, num_draws=0)
        with pytest.raises(ValueError, match="num_draws only applies"):
            pyro_sde.to_inference_data({"x": torch.zeros(300)}, num_draws=10)
        with pytest.raises(TypeError, match="model must be"):
            pyro_sde.to_inference_data(weighted, model=3)
        with pytest.raises(TypeError, match="model_args"):
            pyro_sde.to_inference_data(weighted, model=regression, model_args=[1])
        with pytest.raises(ValueError, match="no values for the model's latent sites"):
            pyro_sde.to_inference_data(weighted, model=regression, model_args=(torch.zeros(3, 2),))


class TestFromPyro:
    def test_guard_message(self):
        class Weighted(FromPyroGuard):
            pass

        with pytest.raises(AttributeError, match="pyro_sde.to_inference_data"):
            _quiet(az.from_pyro, posterior=Weighted())

        class WithChains(FromPyroGuard):  # an instance or subclass attribute wins over the guard
            num_samples = 7

            def __init__(self):
                self.num_chains = 2

        assert (WithChains().num_chains, WithChains().num_samples) == (2, 7)

    def test_samplers_point_at_to_inference_data(self, sampler):
        assert issubclass(DiffusionSampler, FromPyroGuard) and issubclass(SMCSampler, FromPyroGuard)
        with pytest.raises(AttributeError, match="pyro_sde.to_inference_data"):
            _quiet(az.from_pyro, posterior=sampler)


# --------------------------------------------------------------------------------------------------
# models the samplers refuse
# --------------------------------------------------------------------------------------------------


def imputation_model(y, mask):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y, obs_mask=mask)


def masked_latent_model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("groups", 3), pyro.poutine.mask(mask=torch.tensor([True, False, True])):
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
    pyro.sample("y", dist.Normal(theta.sum(), 1.0), obs=y)


def subsampled_model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", y.shape[0], subsample_size=2) as idx:
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y[idx])


class TestRefusedModels:
    def test_obs_mask_imputation(self):
        y = torch.tensor([0.1, 0.0, -0.3])
        with pytest.raises(ValueError, match=r"y_unobserved.*improper") as info:
            ModelPotential(imputation_model, (y, torch.tensor([True, False, True])))
        assert "log evidence" in str(info.value) and "HMC" not in str(info.value)
        with pytest.raises(ValueError, match="y_unobserved"):
            DiffusionSampler(imputation_model).run(y, torch.tensor([True, False, True]), progress_bar=False)
        with pytest.raises(ValueError, match="y_unobserved"):  # Pyro makes the latent site even then
            ModelPotential(imputation_model, (y, torch.ones(3, dtype=torch.bool)))

    def test_masked_latent(self):
        with pytest.raises(ValueError, match=r"'theta'.*masked"):
            ModelPotential(masked_latent_model, (torch.tensor(0.5),))

    def test_subsampling(self):
        with pytest.raises(ValueError, match=r"subsampl.*'data'") as info:
            ModelPotential(subsampled_model, (torch.randn(5),))
        assert "HMC" not in str(info.value) and "full data" in str(info.value)
        with pytest.raises(ValueError, match="subsampl"):
            SMCSampler(subsampled_model, num_particles=64).run(torch.randn(5))
