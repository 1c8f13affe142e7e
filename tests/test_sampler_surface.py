"""The surface every sampler shares (infer/_base.py): stable draws and pyro.deterministic sites."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_sde.infer import DiffusionSampler, SMCSampler


def regression(x, y):
    a = pyro.sample("a", dist.Normal(0.0, 10.0))
    b = pyro.sample("b", dist.Normal(0.0, 10.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
    pyro.deterministic("slope_and_scale", torch.stack([b, 2 * sigma]))
    with pyro.plate("n", len(y)):
        pyro.sample("y", dist.Normal(a + b * x, sigma), obs=y)


def unvectorisable(x, y):  # a Python branch on a sample value: the vectorised Predictive fails
    a = pyro.sample("a", dist.Normal(0.0, 10.0))
    pyro.deterministic("sign", torch.tensor(1.0 if float(a) > 0 else -1.0, dtype=x.dtype))
    with pyro.plate("n", len(y)):
        pyro.sample("y", dist.Normal(a + x, 1.0), obs=y)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-1, 1, 20, dtype=torch.float64)
    return x, 1.0 + 0.5 * x + 0.3 * torch.randn(20, generator=g, dtype=torch.float64)


@pytest.fixture(scope="module")
def trained(data):
    pyro.set_rng_seed(0)
    sampler = DiffusionSampler(regression, num_steps=10)
    return sampler.run(*data, num_iterations=5, until=None, progress_bar=False)


def test_get_samples_returns_the_same_draws_until_asked_for_new_ones(trained, data):
    first = trained.get_samples(300)
    again = trained.get_samples(300)
    assert all(torch.equal(first[k], again[k]) for k in first)
    fresh = trained.get_samples(300, new=True)
    assert not torch.equal(first["a"], fresh["a"])
    assert torch.equal(trained.get_samples(300)["a"], fresh["a"])  # the new draws are kept
    grouped = trained.get_samples(300, group_by_chain=True)
    assert torch.equal(grouped["a"][0], fresh["a"])


def test_training_forgets_the_old_draws(data):
    pyro.set_rng_seed(1)
    sampler = DiffusionSampler(regression, num_steps=10).run(*data, num_iterations=2, until=None,
                                                              progress_bar=False)
    before = sampler.get_samples(200)["a"]
    sampler.run(*data, num_iterations=1, until=None, progress_bar=False)
    assert not torch.equal(before, sampler.get_samples(200)["a"])


def test_deterministic_sites_are_in_the_samples(trained):
    samples = trained.get_samples(250)
    assert samples["slope_and_scale"].shape == (250, 2)
    expected = torch.stack([samples["b"], 2 * samples["sigma"]], -1)
    assert torch.allclose(samples["slope_and_scale"], expected)
    weighted, log_w = trained.get_weighted_samples()
    assert weighted["slope_and_scale"].shape == (log_w.numel(), 2)


def test_deterministic_sites_of_a_model_that_cannot_be_vectorised(data):
    x, y = data
    pyro.set_rng_seed(2)
    smc = SMCSampler(unvectorisable, num_particles=64, vectorize="sequential").run(x, y)
    samples = smc.get_samples(40)
    assert torch.equal(samples["sign"], torch.where(samples["a"] > 0, 1.0, -1.0).to(samples["sign"]))


def test_smc_draws_are_stable_and_forgotten_by_a_new_run(data):
    pyro.set_rng_seed(3)
    smc = SMCSampler(regression, num_particles=128).run(*data)
    first = smc.get_samples(100)
    assert torch.equal(first["b"], smc.get_samples(100)["b"])
    smc.run(*data)
    assert not torch.equal(first["b"], smc.get_samples(100)["b"])
