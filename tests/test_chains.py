"""Independent runs as chains (infer/chains.py): grouped draws, R-hat, the combined evidence, ArviZ."""

import math

import arviz as az
import pyro
import pyro.distributions as dist
import pytest
import torch

import pyro_sde
from pyro_sde.infer import Chains, DiffusionSampler, SMCSampler
from pyro_sde.targets import Gaussian

F64 = torch.float64


def regression(x, y):
    a = pyro.sample("a", dist.Normal(torch.zeros((), dtype=F64), 5.0))
    b = pyro.sample("b", dist.Normal(torch.zeros((), dtype=F64), 5.0))
    with pyro.plate("n", len(y)):
        pyro.sample("y", dist.Normal(a + b * x, 0.5), obs=y)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-1, 1, 30, dtype=F64)
    return x, 0.7 - 1.2 * x + 0.5 * torch.randn(30, generator=g, dtype=F64)


@pytest.fixture(scope="module")
def smc_chains(data):
    torch.manual_seed(0)
    return Chains(SMCSampler, regression, num_chains=4, num_particles=1024).run(*data)


def test_four_runs_of_a_well_trained_sampler_agree(data):
    torch.manual_seed(1)
    chains = Chains(DiffusionSampler, regression, num_chains=4, num_steps=10).run(*data, progress_bar=False)
    r_hat = chains.r_hat(1000)
    assert all(float(v.max()) < 1.01 for v in r_hat.values())
    grouped = chains.get_samples(500, group_by_chain=True)
    assert grouped["a"].shape == (4, 500)
    assert len(set(chains.seeds)) == 4


def test_r_hat_sees_chains_that_disagree():
    made = []

    def sampler(model, **options):  # the first chain samples a shifted target
        shift = 3.0 if not made else 0.0
        made.append(shift)
        target = Gaussian(torch.full((2,), shift, dtype=F64), torch.ones(2, dtype=F64))
        return SMCSampler(log_density=target.log_prob, dim=2, dtype=F64, **options)

    torch.manual_seed(2)
    chains = Chains(sampler, num_chains=4, num_particles=512).run()
    assert float(chains.r_hat(500)["x"].max()) > 1.1


def test_the_combined_evidence_is_the_mean_of_the_runs(smc_chains, data):
    ev = smc_chains.log_evidence()
    log_zs = smc_chains.run_log_evidence()
    assert float(ev.log_z) == pytest.approx(float(log_zs.logsumexp(0) - math.log(4)), abs=1e-12)
    z = (log_zs - log_zs.max()).exp()
    assert float(ev.stderr) == pytest.approx(float(z.std() / (z.mean() * 2)), rel=1e-9)
    # against the exact evidence of the conjugate model
    x, y = data
    X = torch.stack([torch.ones_like(x), x], -1)
    cov = 25.0 * X @ X.T + 0.25 * torch.eye(len(y), dtype=F64)
    exact = dist.MultivariateNormal(torch.zeros(len(y), dtype=F64), cov).log_prob(y)
    assert abs(float(ev.log_z - exact)) < max(4 * float(ev.stderr), 0.02)


def test_arviz_gets_the_chains(smc_chains):
    idata = pyro_sde.to_inference_data(smc_chains)
    assert idata.posterior.sizes["chain"] == 4
    assert float(az.rhat(idata)["a"]) < 1.05
    assert "y" in idata.log_likelihood
    summary = smc_chains.get_summary()
    assert "r_hat" in summary["a"] and float(summary["a"]["r_hat"]) < 1.05
    importance = sum(c.ess() * c.get_weighted_samples()[1].numel() for c in smc_chains.chains)
    assert 100 < float(summary["a"]["n_eff"]) <= importance + 1e-9
    assert smc_chains.diagnostics()["num_chains"] == 4


def test_a_single_chain_is_refused():
    with pytest.raises(ValueError, match="num_chains"):
        Chains(SMCSampler, regression, num_chains=1)


@pytest.mark.parametrize("sampler", [DiffusionSampler, SMCSampler])
def test_num_chains_on_a_sampler_points_at_chains(sampler):
    with pytest.raises(TypeError, match=r"pyro_sde.infer.Chains\("):
        sampler(regression, num_chains=4)
