"""``lbfgs_map`` against closed-form posterior modes."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import constraints

from pyro_sde.infer import lbfgs_map


def _normal_mean_model(y):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 2.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def _scale_model(y):
    sigma = pyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(0.0, sigma), obs=y)


def test_conjugate_normal_mean():
    # posterior mode of N(0, 2^2) prior x N(mu, 1) likelihood: sum(y) / (n + 1/4)
    y = torch.randn(30, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 1.5
    out = lbfgs_map(_normal_mean_model, y)
    assert torch.allclose(out["mu"], y.sum() / (y.numel() + 0.25), atol=1e-8)


def test_positive_site_in_constrained_space():
    # flat prior on sigma > 0: the MAP is the MLE sqrt(mean(y^2)), in the constrained coordinates
    y = 0.7 * torch.randn(50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = lbfgs_map(_scale_model, y, init_values={"sigma": torch.tensor(3.0, dtype=torch.float64)})
    assert torch.allclose(out["sigma"], y.pow(2).mean().sqrt(), atol=1e-7)


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_bad_input():
    y = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="callable"):
        lbfgs_map("not a model", y)
    with pytest.raises(ValueError, match="does not have"):
        lbfgs_map(_normal_mean_model, y, init_values={"nu": 1.0})
    with pytest.raises(ValueError, match="max_iter"):
        lbfgs_map(_normal_mean_model, y, max_iter=0)
    with pytest.raises(ValueError, match="initial point"):
        lbfgs_map(_scale_model, y, init_values={"sigma": torch.tensor(1e-300, dtype=torch.float64)})
