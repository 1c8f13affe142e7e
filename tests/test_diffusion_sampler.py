"""DiffusionSampler against closed forms: Gaussian posteriors with known evidence, the optimal control
of a Gaussian target (zero-variance log-variance gradients), GMM-9 mode coverage, a hierarchical model
with constrained sites, and bad input."""

import math
import warnings

import arviz as az
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive

import pyro_sde
from pyro_sde.infer import DiffusionSampler
from pyro_sde.targets import GMM9

D64 = torch.float64


def conjugate_model(y):
    """x ~ N(0, 2^2 I_3), y_i ~ N(x, I_3): posterior N(sum y / (n + 1/4), 1 / (n + 1/4))."""
    x = pyro.sample("x", dist.Normal(torch.zeros(3), 2.0).to_event(1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(x, 1.0).to_event(1), obs=y)


def conjugate_truth(y):
    n = y.shape[0]
    post_var = 1 / (n + 0.25)
    cov = torch.eye(n) + 4 * torch.ones(n, n)
    log_z = sum(dist.MultivariateNormal(torch.zeros(n), cov).log_prob(y[:, j]) for j in range(3))
    return post_var * y.sum(0), math.sqrt(post_var), float(log_z)


@pytest.fixture(scope="module")
def conjugate_data():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(5, 3, generator=gen) + torch.tensor([1.0, -2.0, 3.0])


def weighted_moments(x, log_w):
    w = torch.softmax(log_w, 0)[:, None].to(x.dtype)
    mean = (w * x).sum(0)
    return mean, (w * (x - mean) ** 2).sum(0).sqrt()


@pytest.mark.parametrize("method", ["dis", "pis"])
@pytest.mark.parametrize("precondition", [None, "laplace"])
def test_gaussian_posterior_and_evidence_are_exact(conjugate_data, method, precondition):
    y = conjugate_data
    post_mean, post_std, log_z = conjugate_truth(y)
    sampler = DiffusionSampler(
        conjugate_model, method=method, loss="log_variance", num_steps=50, precondition=precondition
    )
    sampler.run(y, num_iterations=150, batch_size=256, until=None, progress_bar=False)
    ev = sampler.log_evidence(20_000)
    float32_slack = 1e-4  # preconditioned, the weights are nearly constant: se ~ 1e-5
    assert abs(ev.log_z.item() - log_z) < 3 * ev.stderr.item() + float32_slack
    assert ev.stderr.item() < 0.02  # and the error bar is small
    assert ev.lower_bound.item() < log_z + float32_slack  # an ELBO-type bound
    samples, log_w = sampler.get_weighted_samples()
    mean, std = weighted_moments(samples["x"], log_w)
    assert torch.allclose(mean, post_mean, rtol=0.05)
    assert torch.allclose(std, torch.full((3,), post_std), rtol=0.05)
    # resampled draws (what get_samples returns) have the same moments
    draws = sampler.get_samples(4000)["x"]
    assert draws.shape == (4000, 3)
    assert torch.allclose(draws.mean(0), post_mean, rtol=0.05, atol=0.02)
    assert sampler.ess() > 0.3


class _ScaledControl(torch.nn.Module):
    """``v = theta * v_star(t, x)`` with ``theta = 1`` at the optimum."""

    def __init__(self, v_star):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.ones((), dtype=D64))
        self.v_star = v_star

    def forward(self, tau, x, guide):
        return self.theta * self.v_star(tau, x)


def _gradient_spread(sampler, num_batches=12, batch_size=128):
    grads = []
    for _ in range(num_batches):
        loss, _ = sampler.compute_loss(batch_size)
        (g,) = torch.autograd.grad(loss, sampler.control.theta)
        grads.append(g)
    return torch.stack(grads)


def test_log_variance_gradient_vanishes_at_optimal_control():
    # rho = Z N(mu, sigma^2 T I): the constant control mu / (sigma^2 T) is optimal for the PIS chain.
    mu, log_z, sigma, T = torch.tensor([1.0, -0.5], dtype=D64), 0.4, 1.0, 1.0
    var = sigma**2 * T
    target = torch.distributions.MultivariateNormal(mu, var * torch.eye(2, dtype=D64))
    grads = {}
    for loss in ["log_variance", "kl"]:
        control = _ScaledControl(lambda tau, x: (mu / var).expand_as(x))
        sampler = DiffusionSampler(
            log_density=lambda x: log_z + target.log_prob(x), dim=2, method="pis", loss=loss,
            num_steps=20, sigma=sigma, T=T, control=control, dtype=D64, precondition=None,
        )
        grads[loss] = _gradient_spread(sampler)
        if loss == "log_variance":
            assert sampler.log_evidence(2000).log_z.item() == pytest.approx(log_z, abs=1e-10)
    assert grads["log_variance"].abs().max().item() < 1e-10
    assert grads["kl"].std().item() > 1e-2  # KL's estimator does not "stick the landing"


def test_log_variance_gradient_variance_is_small_near_continuous_optimum():
    # rho = N(mu, diag(s^2)) with the continuous-time optimal PIS control (closed form, linear in x):
    # v*(t, x) = grad log h_t(x), h_t(x) = int N(y; x, sigma^2 (T - t)) rho(y) / N(y; 0, sigma^2 T) dy.
    mu, s2 = torch.tensor([1.5, -1.0], dtype=D64), torch.tensor([0.3, 0.6], dtype=D64)
    sigma, T = 1.0, 1.0
    a, b = 1 / s2 - 1 / (sigma**2 * T), mu / s2

    def v_star(tau, x):
        rem = sigma**2 * T * (1 - tau)
        return (b + x / rem) / (a * rem + 1) - x / rem

    target = torch.distributions.Normal(mu, s2.sqrt())
    spreads = {}
    for loss, num_steps in [("log_variance", 50), ("log_variance", 800), ("kl", 800)]:
        sampler = DiffusionSampler(
            log_density=lambda x: target.log_prob(x).sum(-1), dim=2, method="pis", loss=loss,
            num_steps=num_steps, sigma=sigma, T=T, control=_ScaledControl(v_star), dtype=D64,
            precondition=None,
        )
        spreads[loss, num_steps] = _gradient_spread(sampler, num_batches=16).std().item()
    # the log-variance spread is a discretisation effect (~ sqrt(h)): it shrinks with the step size ...
    assert spreads["log_variance", 800] < 0.5 * spreads["log_variance", 50]
    # ... and is far below the KL one, which does not vanish at the optimum
    assert spreads["log_variance", 800] < 0.15 * spreads["kl", 800]


def test_gmm9_log_variance_covers_the_modes():
    target = GMM9()
    sampler = DiffusionSampler(
        log_density=target.log_prob, dim=2, method="dis", loss="log_variance", num_steps=50
    )
    sampler.run(num_iterations=150, batch_size=256, progress_bar=False)
    z, log_w = sampler.sample_unconstrained(10_000)
    counts = torch.bincount(target.mode_index(z), minlength=9).float() / z.shape[0]
    assert int((counts >= 0.01).sum()) >= 8  # the proposal itself visits the modes
    ev = sampler.log_evidence(10_000)
    assert abs(ev.log_z.item() - target.log_Z) < max(3 * ev.stderr.item(), 0.05)


def eight_schools(sigma, y=None):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", sigma.shape[-1]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        return pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def test_eight_schools_constrained_sites_predictive_and_arviz():
    sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
    y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
    sampler = DiffusionSampler(eight_schools, method="dis", num_steps=30)
    sampler.run(sigma, y, num_iterations=30, batch_size=128, progress_bar=False)
    assert len(sampler.losses) == 30 and all(math.isfinite(v) for v in sampler.losses)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a 30-iteration run may have a low ESS
        samples = sampler.get_samples(500)
        by_chain = sampler.get_samples(100, group_by_chain=True)
    assert set(samples) == {"mu", "tau", "theta"}
    assert samples["tau"].shape == (500,) and (samples["tau"] > 0).all()
    assert samples["theta"].shape == (500, 8)
    assert by_chain["theta"].shape == (1, 100, 8)
    predictive = Predictive(eight_schools, posterior_samples=samples)(sigma)
    assert predictive["obs"].shape == (500, 8)
    idata = pyro_sde.to_inference_data(sampler)
    num_draws = math.floor(idata.attrs["ess"] * idata.attrs["num_weighted_samples"])  # about ESS draws
    assert idata.posterior["theta"].shape[:2] == (1, num_draws)
    assert "pareto_k" in idata.attrs and "log_evidence" in idata.attrs
    summary = az.summary(idata, var_names=["mu", "tau"])
    assert summary.shape[0] == 2
    table = sampler.get_summary()
    assert set(table) == {"mu", "tau", "theta"} and table["theta"]["mean"].shape == (8,)
    diag = sampler.diagnostics()
    assert set(diag) >= {"log_evidence", "log_evidence_stderr", "ess", "pareto_k"}


def test_resampling_from_a_poor_proposal_warns():
    # an untrained PIS proposal (N(0, 1) at the end) for a narrow target far from the origin
    target = torch.distributions.Normal(torch.tensor([6.0, -6.0]), 0.1)
    sampler = DiffusionSampler(
        log_density=lambda x: target.log_prob(x).sum(-1), dim=2, method="pis", precondition=None
    ).setup()
    with pytest.warns(RuntimeWarning, match="effective sample size"):
        sampler.get_samples(200)


def test_torchsde_backend_trains_and_weights_agree():
    target = GMM9()
    sampler = DiffusionSampler(
        log_density=target.log_prob, dim=2, method="dis", num_steps=20, backend="torchsde"
    )
    sampler.run(num_iterations=3, batch_size=64, progress_bar=False)
    z, log_w = sampler.sample_unconstrained(256)
    assert z.shape == (256, 2) and torch.isfinite(log_w).all()


class TestBadInput:
    def test_discrete_latent_site(self):
        def model():
            pyro.sample("k", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(0.0, 1.0))

        with pytest.raises(ValueError, match="discrete latent"):
            DiffusionSampler(model).run(num_iterations=1, progress_bar=False)

    def test_nan_producing_model(self):
        def model():
            x = pyro.sample("x", dist.Normal(0.0, 1.0))
            pyro.factor("nan", torch.log(-x.abs() - 1))  # log of a negative number

        with pytest.raises(ValueError, match="not finite"):
            DiffusionSampler(model).run(num_iterations=1, progress_bar=False)

    def test_wrong_argument_types(self):
        with pytest.raises(TypeError, match="callable"):
            DiffusionSampler("model")
        with pytest.raises(ValueError, match="exactly one"):
            DiffusionSampler()
        with pytest.raises(ValueError, match="method"):
            DiffusionSampler(conjugate_model, method="mcmc")
        with pytest.raises(ValueError, match="loss"):
            DiffusionSampler(conjugate_model, loss="elbo")
        with pytest.raises(ValueError, match="num_steps"):
            DiffusionSampler(conjugate_model, num_steps="100")
        with pytest.raises(ValueError, match="lr"):
            DiffusionSampler(conjugate_model, lr=-1.0)
        with pytest.raises(ValueError, match="`dim` is required"):
            DiffusionSampler(log_density=lambda x: x.sum(-1))
        sampler = DiffusionSampler(conjugate_model)
        with pytest.raises(RuntimeError, match="run"):
            sampler.get_samples(10)
        with pytest.raises(ValueError, match="batch_size"):
            sampler.run(torch.zeros(4, 3), batch_size=1)
        with pytest.raises(TypeError, match="running the model"):  # a str where a tensor is expected
            sampler.run("not data", num_iterations=1, progress_bar=False)
