"""Pyro model -> unconstrained batched log density."""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints

from pyro_sde.infer import LogDensityPotential, ModelPotential


def eight_schools(sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", sigma.shape[-1]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])


def test_batched_equals_pyro_potential_eight_schools():
    pot = ModelPotential(eight_schools, (SIGMA, Y))
    assert pot.dim == 10 and pot.site_shapes == {"mu": (), "tau": (), "theta": (8,)}
    z = pot.initial_params + 0.3 * torch.randn(50, pot.dim)
    exact = torch.stack([pot._log_density_single(zi) for zi in z])
    assert torch.allclose(pot.log_density(z), exact, rtol=1e-5, atol=1e-4)
    # leading batch dims are kept
    assert pot.log_density(z.reshape(5, 10, 10)).shape == (5, 10)
    # constrained values are in the support
    x = pot.constrain(z)
    assert x["tau"].shape == (50,) and (x["tau"] > 0).all()
    assert x["theta"].shape == (50, 8)


@pytest.mark.parametrize(
    "prior",
    [dist.Exponential(2.0), dist.Beta(2.0, 3.0), dist.LogNormal(0.3, 0.5), dist.Uniform(-1.0, 2.0)],
    ids=lambda d: type(d).__name__,
)
def test_jacobian_makes_unconstrained_density_normalised(prior):
    # int exp(log_density(z)) dz over R = int p(x) dx = 1 for a prior with no observation
    def model():
        pyro.sample("x", prior)

    pot = ModelPotential(model)
    z = torch.linspace(-30, 30, 200_001, dtype=torch.float64)[:, None]
    with torch.no_grad():
        dens = pot.log_density(z.float()).double().exp()
    assert torch.trapezoid(dens, z[:, 0]).item() == pytest.approx(1.0, abs=2e-3)


def test_simplex_site_and_evidence_of_conjugate_model():
    # log density at z equals log N(y | x, 1) + log N(x | 0, 2^2) in closed form (no transform)
    y = torch.tensor([0.5, 1.5, 1.0])

    def model(y):
        x = pyro.sample("x", dist.Normal(0.0, 2.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(x, 1.0), obs=y)

    pot = ModelPotential(model, (y,))
    z = torch.randn(7, 1)
    expected = dist.Normal(0.0, 2.0).log_prob(z[:, 0]) + dist.Normal(z, 1.0).log_prob(y).sum(-1)
    assert torch.allclose(pot.log_density(z), expected, atol=1e-5)

    def dirichlet_model():
        pyro.sample("p", dist.Dirichlet(torch.tensor([2.0, 3.0, 4.0])))

    pot = ModelPotential(dirichlet_model)
    assert pot.dim == 2 and pot.site_shapes == {"p": (3,)}
    p = pot.constrain(torch.randn(5, 2))["p"]
    assert torch.allclose(p.sum(-1), torch.ones(5), atol=1e-6)


def test_score_by_autograd():
    pot = ModelPotential(eight_schools, (SIGMA, Y))
    z = pot.initial_params.expand(3, -1).clone()
    lp, score = pot.log_density_and_score(z)
    eps = 1e-3
    e0 = torch.zeros(pot.dim)
    e0[0] = eps
    fd = (pot.log_density(z + e0) - pot.log_density(z - e0)) / (2 * eps)
    assert torch.allclose(score[:, 0], fd, rtol=1e-2, atol=1e-2)


class TestBadModels:
    def test_discrete_latent(self):
        def model():
            pyro.sample("k", dist.Categorical(torch.ones(3) / 3))
            pyro.sample("x", dist.Normal(0.0, 1.0))

        with pytest.raises(ValueError, match="discrete latent sites are not supported: \\['k'\\]"):
            ModelPotential(model)

    def test_no_latent(self):
        def model(y):
            pyro.sample("y", dist.Normal(0.0, 1.0), obs=y)

        with pytest.raises(ValueError, match="no latent sample sites"):
            ModelPotential(model, (torch.tensor(0.3),))

    def test_nan_model(self):
        def model():
            x = pyro.sample("x", dist.Normal(0.0, 1.0))
            pyro.factor("bad", x * float("nan"))

        with pytest.raises(ValueError, match="not finite"):
            ModelPotential(model)

    def test_wrong_argument_types(self):
        with pytest.raises(TypeError, match="callable"):
            ModelPotential("not a model")
        with pytest.raises(TypeError, match="tuple"):
            ModelPotential(eight_schools, [SIGMA, Y])
        with pytest.raises(TypeError, match="running the model with the given arguments failed"):
            ModelPotential(eight_schools, ([15.0, 10.0], None))

    def test_non_vectorisable_model_is_caught(self):
        def model():
            x = pyro.sample("x", dist.Normal(torch.zeros(3), 1.0).to_event(1))
            pyro.factor("f", -x.sum() ** 2)  # sums over the particle dim when batched

        with pytest.raises(ValueError, match="vectorize='plate': .* != per-sample"):
            ModelPotential(model, vectorize="plate")
        z = torch.randn(4, 3)
        expected = dist.Normal(0.0, 1.0).log_prob(z).sum(-1) - z.sum(-1) ** 2
        for vectorize, mode in [("auto", "vmap"), (False, "sequential"), ("sequential", "sequential")]:
            pot = ModelPotential(model, vectorize=vectorize)
            assert pot.vectorize_mode == mode
            assert torch.allclose(pot.log_density(z), expected, atol=1e-5)
        with pytest.raises(ValueError, match="vectorize must be 'auto', 'plate', 'vmap'"):
            ModelPotential(model, vectorize="yes")


def test_log_density_potential():
    pot = LogDensityPotential(lambda z: -0.5 * (z**2).sum(-1), 3)
    assert pot.log_density(torch.zeros(2, 4, 3)).shape == (2, 4)
    with pytest.raises(ValueError, match="shape"):
        pot.log_density(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="must map a batch"):
        LogDensityPotential(lambda z: z.sum(), 3)
    with pytest.raises(ValueError, match="dim"):
        LogDensityPotential(lambda z: z.sum(-1), 0)
    assert math.isclose(pot.log_density_and_score(torch.ones(1, 3))[1].sum().item(), -3.0)


def test_improper_uniform_with_factor():
    def model():
        x = pyro.sample("x", dist.ImproperUniform(constraints.real_vector, (), (2,)))
        pyro.factor("t", -0.5 * (x**2).sum(-1))

    pot = ModelPotential(model)
    z = torch.randn(6, 2)
    assert torch.allclose(pot.log_density(z), -0.5 * (z**2).sum(-1), atol=1e-6)


def test_initial_point_search_is_quiet_about_nan_points():
    """Pyro's search for a valid initial point retries where the density is NaN; the user sees no
    "Encountered NaN" warning for those tries, and the point found is valid."""

    def model():
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.validation_enabled(False):  # a likelihood that overflows to NaN, as a simulator can
            pyro.factor("f", torch.where(z < -1.0, torch.zeros(()), torch.tensor(float("nan"))))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pot = ModelPotential(model)
    assert not [w for w in caught if "Encountered NaN" in str(w.message)]
    assert float(pot.initial_params[0]) < -1.0  # the only region where the density is finite
