"""How ModelPotential evaluates a batch: plate, torch.func.vmap or a sequential loop (vectorize="auto")."""

import logging
import math
import time
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F

from pyro_sde.infer import DiffusionSampler, ModelPotential

MODES = ("plate", "vmap", "sequential")


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _data(seed=1, T=12, K=3):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(T, K, generator=gen, dtype=torch.float64)
    beta = torch.tensor([1.0, -0.5, 0.3], dtype=torch.float64)
    y = torch.randn(T, generator=gen, dtype=torch.float64).cumsum(0) * 0.5 + X @ beta
    return X, y


# -- models ------------------------------------------------------------------------------------
def ar1(y):
    """AR(1) with a Python loop over time: plate-vectorisable as written."""
    mean = pyro.sample("mean", dist.Normal(0.0, 5.0))
    rho = pyro.sample("rho", dist.Uniform(-1.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    for t in range(1, len(y)):
        pyro.sample(f"y_{t}", dist.Normal(mean + rho * (y[t - 1] - mean), sigma), obs=y[t])


def ar_regression(X, y):
    """Regression with AR(1) errors: a matrix product ``X @ beta`` (not plate-vectorisable) and a loop."""
    beta = pyro.sample("beta", dist.Normal(0.0, 2.0).expand([X.shape[1]]).to_event(1))
    rho = pyro.sample("rho", dist.Uniform(-1.0, 1.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    mu = X @ beta
    pyro.sample("y_0", dist.Normal(mu[0], sigma), obs=y[0])
    for t in range(1, len(y)):
        pyro.sample(f"y_{t}", dist.Normal(mu[t] + rho * (y[t - 1] - mu[t - 1]), sigma), obs=y[t])


def ar_lags(y, K=2):
    """Stan's AR(K): ``mu = alpha + lags @ beta`` with ``beta`` a vector site."""
    lags = torch.stack([y[K - k - 1 : len(y) - k - 1] for k in range(K)], -1)  # (T - K, K)
    alpha = pyro.sample("alpha", dist.Normal(0.0, 5.0))
    beta = pyro.sample("beta", dist.Normal(0.0, 1.0).expand([K]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0))
    with pyro.plate("time", len(y) - K):
        pyro.sample("y", dist.Normal(alpha + lags @ beta, sigma), obs=y[K:])


def mixture(y):
    """Stan's ``log_sum_exp(log(w) + normal_lpdf(y[n] | loc, scale))``: weights without ``[..., None]``."""
    w = pyro.sample("w", dist.Dirichlet(torch.ones(2)))
    loc = pyro.sample("loc", dist.Normal(0.0, 5.0).expand([2]).to_event(1))
    scale = pyro.sample("scale", dist.HalfNormal(2.0))
    log_lik = torch.logsumexp(w.log() + dist.Normal(loc, scale).log_prob(y[:, None]), -1)
    pyro.factor("y", log_lik.sum())


GROUP = torch.tensor([0, 1, 2, 0, 1, 2, 2, 1])


def stacked(y):
    """``torch.stack`` of a constant with scalar sites; a lower-bounded site (Pareto)."""
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    nu = pyro.sample("nu", dist.Pareto(1.0, 3.0))
    mu = torch.stack([torch.zeros(()), a, a + b])  # first level pinned to 0
    with pyro.plate("data", len(y)):
        pyro.sample("y", dist.StudentT(nu, mu[GROUP], 1.0), obs=y)


def correlated_normal(y):
    """Correlation-Cholesky and positive-vector sites, a deterministic site and a scaled plate;
    ``mu * ones(3)`` breaks the particle plate."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    L = pyro.sample("L", dist.LKJCholesky(3, 2.0))
    s = pyro.sample("s", dist.Gamma(2.0, 1.0).expand([3]).to_event(1))
    pyro.deterministic("scale_tril", s[..., None] * L)
    with pyro.plate("data", y.shape[0]), pyro.poutine.scale(scale=0.5):
        pyro.sample("y", dist.MultivariateNormal(mu * torch.ones(3), scale_tril=s[..., None] * L), obs=y)


def eight_schools(sigma, y):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", sigma.shape[-1]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=torch.float64)
Y8 = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=torch.float64)


def _ar_closed_form(z, X, y, regression):
    """log rho(z) of ar1 / ar_regression in closed form, with the Jacobians of the transforms."""
    if regression:
        beta, u, v = z[:, : X.shape[1]], z[:, -2], z[:, -1]
        mu = beta @ X.T  # (N, T)
        log_prior = dist.Normal(0.0, 2.0).log_prob(beta).sum(-1)
    else:
        mean, u, v = z[:, 0], z[:, 1], z[:, 2]
        mu = mean[:, None].expand(-1, len(y))
        log_prior = dist.Normal(0.0, 5.0).log_prob(mean)
    rho, sigma = -1 + 2 * torch.sigmoid(u), v.exp()
    log_prior = log_prior + math.log(0.5) + math.log(2.0) + F.logsigmoid(u) + F.logsigmoid(-u)
    log_prior = log_prior + dist.HalfNormal(1.0).log_prob(sigma) + v
    resid = y - mu
    innovations = resid[:, 1:] - rho[:, None] * resid[:, :-1]
    log_lik = dist.Normal(0.0, sigma[:, None]).log_prob(innovations).sum(-1)
    if regression:
        log_lik = log_lik + dist.Normal(0.0, sigma).log_prob(resid[:, 0])
    return log_prior + log_lik


def _points(pot, n=16, spread=0.7, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return pot.initial_params + spread * torch.randn(n, pot.dim, generator=gen, dtype=torch.float64)


def _per_sample(pot, z):
    return torch.stack([pot._log_density_single(zi) for zi in z]).detach()


# -- (a) the same log density in all paths, against closed forms --------------------------------
@pytest.mark.parametrize("regression", [False, True], ids=["ar1_loop", "ar_loop_matmul"])
def test_ar_models_same_log_density_in_every_path(regression):
    X, y = _data()
    model, args = (ar_regression, (X, y)) if regression else (ar1, (y,))
    auto = ModelPotential(model, args)
    assert auto.vectorize_mode == ("vmap" if regression else "plate")
    z = _points(auto)
    expected = _ar_closed_form(z, X, y, regression)
    modes = ("vmap", "sequential") if regression else MODES
    scores, hvps = {}, {}
    direction = torch.randn(z.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for mode in modes:
        pot = ModelPotential(model, args, vectorize=mode)
        assert pot.vectorize_mode == mode and pot.dtype == torch.float64
        assert torch.allclose(pot.log_density(z), expected, rtol=0, atol=1e-6)
        # the score and its derivative (the KL loss differentiates the score: create_graph=True)
        zg = z.clone().requires_grad_()
        _, score = pot.log_density_and_score(zg, create_graph=True)
        (hvp,) = torch.autograd.grad((score * direction).sum(), zg)
        scores[mode], hvps[mode] = score.detach(), hvp
    zg = z.clone().requires_grad_()
    (exact_score,) = torch.autograd.grad(_ar_closed_form(zg, X, y, regression).sum(), zg)
    for mode in modes:
        assert torch.allclose(scores[mode], exact_score, rtol=0, atol=1e-6)
        assert torch.allclose(hvps[mode], hvps["sequential"], rtol=0, atol=1e-6)
    if regression:
        with pytest.raises(ValueError, match="vectorize='plate': the model could not be evaluated"):
            ModelPotential(model, args, vectorize="plate")


@pytest.mark.parametrize("model,args", [(eight_schools, (SIGMA, Y8)), (ar1, (_data()[1],))],
                         ids=["eight_schools", "ar1"])
def test_plate_models_agree_in_every_path(model, args):
    pots = {mode: ModelPotential(model, args, vectorize=mode) for mode in MODES}
    z = _points(pots["plate"])
    expected = _per_sample(pots["plate"], z)
    for pot in pots.values():
        assert torch.allclose(pot.log_density(z), expected, rtol=0, atol=1e-6)


# -- (b) the Stan translations that broke the particle plate go to vmap ------------------------
Y_3D = torch.randn(7, 3, generator=torch.Generator().manual_seed(2))
STAN_PATTERNS = {
    "lags_matmul": (ar_lags, (_data()[1],)),
    "mixture_weights": (mixture, (torch.tensor([-2.1, -1.7, 0.3, 2.2, 2.9, 3.4, -2.5]).double(),)),
    "stack_scalar": (stacked, (torch.tensor([0.1, 1.2, 2.5, -0.3, 0.8, 2.1, 1.7, 1.1]).double(),)),
    "correlated_normal": (correlated_normal, (Y_3D,)),
}


@pytest.mark.parametrize("name", list(STAN_PATTERNS))
def test_stan_patterns_go_to_vmap_and_agree_with_pyro(name, caplog):
    model, args = STAN_PATTERNS[name]
    args = tuple(a.double() for a in args)
    with pytest.raises(ValueError, match="vectorize='plate'"):
        ModelPotential(model, args, vectorize="plate")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no sequential warning
        with caplog.at_level(logging.INFO, logger="pyro_sde.infer.potential"):
            pot = ModelPotential(model, args)
    assert pot.vectorize_mode == "vmap"
    assert "ModelPotential: vmap evaluation" in caplog.text
    z = _points(pot)
    expected = _per_sample(pot, z)
    assert torch.isfinite(expected).all()
    assert torch.allclose(pot.log_density(z), expected, rtol=0, atol=1e-6)
    sequential = ModelPotential(model, args, vectorize="sequential")
    assert torch.allclose(pot.score(z), sequential.score(z), rtol=0, atol=1e-6)
    if name == "mixture_weights":  # a simplex of 2 weights is 1 unconstrained coordinate
        assert pot.site_shapes["w"] == (2,) and pot.dim == 4


def test_unbatchable_model_goes_sequential_with_one_warning_stating_the_slowdown():
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        # Python control flow on a sampled value: neither a plate nor vmap can batch it
        pyro.factor("f", -(x**2) if x.item() > 0 else -2 * x**2)

    with pytest.warns(UserWarning) as record:
        pot = ModelPotential(model)
    messages = [str(w.message) for w in record if "sequential evaluation" in str(w.message)]
    assert len(messages) == 1
    assert pot.vectorize_mode == "sequential"
    assert "ms per particle" in messages[0]
    assert "slower than a vectorised model for a batch of 256" in messages[0]
    assert "plate:" in messages[0] and "vmap:" in messages[0]  # why each batched path failed
    z = torch.linspace(-2, 2, 9)[:, None]
    x = z[:, 0]
    expected = dist.Normal(0.0, 1.0).log_prob(x) - torch.where(x > 0, x**2, 2 * x**2)
    assert torch.allclose(pot.log_density(z), expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="vectorize='vmap'"):
        ModelPotential(model, vectorize="vmap")


# -- (c) training runs at vmapped speed ---------------------------------------------------------
def test_sampler_trains_at_vmapped_speed():
    X, y = _data(T=6)
    seconds = {}
    for mode in ("vmap", "sequential"):
        pyro.set_rng_seed(0)
        sampler = DiffusionSampler(ar_regression, num_steps=6, hidden_dim=16, vectorize=mode)
        sampler.run(X, y, num_iterations=1, batch_size=32, progress_bar=False)  # set-up, warm-up
        timed = 4 if mode == "vmap" else 2  # fewer slow ones: the suite stays fast
        start = time.perf_counter()
        sampler.run(X, y, num_iterations=timed, batch_size=32, progress_bar=False)
        seconds[mode] = (time.perf_counter() - start) / timed
        assert sampler.potential.vectorize_mode == mode
        assert len(sampler.losses) == 1 + timed and all(math.isfinite(loss) for loss in sampler.losses)
    assert seconds["sequential"] > 5 * seconds["vmap"], seconds


# -- (d) a model that raises at an extreme point: -inf there only -------------------------------
class _Counted:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


def bounded_scale():
    """Plate-vectorisable; raises (as a user's SDE class) when a scale is out of range."""
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    if (scale > 20).any():
        raise ValueError("scale must be below 20")
    pyro.sample("y", dist.Normal(loc, scale), obs=torch.tensor(0.5))


def correlated():
    """vmap-able (not plate); the Cholesky factorisation raises when |r| >= 1 / 0.3."""
    r = pyro.sample("r", dist.Normal(0.0, 1.0))
    cov = torch.eye(2) + 0.3 * r * torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    pyro.sample("y", dist.MultivariateNormal(torch.zeros(2), scale_tril=torch.linalg.cholesky(cov)),
                obs=torch.tensor([0.3, -0.2]))


@pytest.mark.parametrize("model,mode", [(bounded_scale, "plate"), (correlated, "vmap"),
                                        (bounded_scale, "sequential"), (correlated, "sequential")])
def test_raising_particle_gets_minus_inf_only_there(model, mode):
    counted = _Counted(model)
    pot = ModelPotential(counted, vectorize=mode)
    assert pot.vectorize_mode == mode
    z = _points(pot, n=8, spread=0.3)
    bad = 5
    z[bad, -1] = 4.0  # scale = e^4 > 20, or r = 4
    ok = torch.arange(8) != bad
    reference = _per_sample(pot, z[ok])
    counted.calls = 0
    with pytest.warns(RuntimeWarning, match="the model raised at a point of a batch"):
        log_rho, score = pot.log_density_and_score(z)
    assert log_rho[bad] == -math.inf and torch.all(score[bad] == 0)
    assert torch.allclose(log_rho[ok], reference, rtol=0, atol=1e-6)
    assert torch.isfinite(score[ok]).all()
    assert pot.num_model_errors == 1
    if mode != "sequential":  # one call for the batch, then a bisection down to the bad particle
        assert counted.calls <= 1 + 2 * 3
        counted.calls = 0
        pot.log_density(z[ok])
        assert counted.calls == 1  # nothing raises: one call, no per-particle work


def test_training_survives_a_model_that_raises_at_extreme_points():
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        if (x.abs() > 2).any():  # 5 % of the target's mass (MCMC-style initial points are in (-2, 2))
            raise ValueError("x out of range")

    sampler = DiffusionSampler(model, num_steps=8, hidden_dim=16, vectorize="plate")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sampler.run(num_iterations=3, batch_size=32, progress_bar=False)
    assert len(sampler.losses) == 3 and sampler.potential.num_model_errors > 0


# -- (e) a model's own exception type is chained, not rebuilt -----------------------------------
def test_model_error_with_custom_constructor_is_chained():
    class CodedError(Exception):
        def __init__(self, code, detail):
            super().__init__(f"[{code}] {detail}")

    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0))
        raise CodedError(7, "solver diverged")

    match = r"running the model .* failed: CodedError: \[7\] solver diverged"
    with pytest.raises(RuntimeError, match=match) as info:
        ModelPotential(model)
    assert isinstance(info.value.__cause__, CodedError)


# -- (d) float32 rounding is not a batching mistake ---------------------------------------------
def _gp_classifier(x, y):
    """A float32 GP classifier: the Cholesky of a near-singular kernel (jitter 3e-4) amplifies rounding."""
    n, zero = x.shape[0], x.new_zeros(())
    length = pyro.sample("length", dist.LogNormal(zero, 0.5))
    amplitude = pyro.sample("amplitude", dist.LogNormal(zero, 0.5))
    with pyro.plate("points_", n):
        f_raw = pyro.sample("f_raw", dist.Normal(zero, 1.0))
    sq_dist = (x[:, None] - x[None]).square()
    kernel = amplitude**2 * torch.exp(-0.5 * sq_dist / length**2) + 3e-4 * torch.eye(n, dtype=x.dtype)
    f = torch.linalg.cholesky(kernel) @ f_raw
    with pyro.plate("points", n):
        pyro.sample("y", dist.Bernoulli(logits=f), obs=y)


def test_float32_rounding_in_the_score_keeps_vmap():
    from pyro_sde.infer.potential import _close, _score_rtol

    x = torch.linspace(-3, 3, 40, dtype=torch.float32)
    y = (torch.sin(2 * x) > 0).float()
    modes = []
    for seed in range(8):  # before: 4 of these 8 fell back to the sequential loop (score ~1 % apart)
        pyro.set_rng_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            modes.append(ModelPotential(_gp_classifier, (x, y), {}).vectorize_mode)
    assert modes == ["vmap"] * 8, modes
    # the rule: 3 % below float64, 1e-4 in float64; a batching mistake (O(1)) fails either way
    score = torch.tensor([[21.0, -109.0, 3.0]])
    assert _close(score * 1.01, score, _score_rtol(torch.float32))
    assert not _close(score * 1.5, score, _score_rtol(torch.float32))
    assert not _close(score * 1.01, score, _score_rtol(torch.float64))
    assert _close(score.double() * (1 + 1e-6), score.double(), _score_rtol(torch.float64))
