"""FDRL (flow-guided density-ratio learning): energy distance, Bregman losses, the chasm, the Pyro wrapper,
class-conditional sampling, checkpoints and input validation."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Predictive

from pyro_sde.ratio.fdrl import (
    LOSSES,
    FlowGuidedGenerator,
    FourierMLP,
    _input_grad_fn,
    energy_distance,
    fit_gaussian,
)
from pyro_sde.ratio.fdrl_distribution import FDRLDistribution


def _gaussian(loc, var, dim=2, dtype=torch.float32):
    return dist.MultivariateNormal(torch.full((dim,), float(loc), dtype=dtype),
                                   var * torch.eye(dim, dtype=dtype))


@pytest.fixture(scope="module")
def small_gen():
    """A quickly fitted 2-D generator (shapes and plumbing only, not accuracy)."""
    torch.manual_seed(1)
    data = 1.0 + 0.5 * torch.randn(512, 2)
    gen = FlowGuidedGenerator(2, loss="lr", num_flow_steps=5, step_size=0.05, hidden_dim=32, num_layers=2)
    return gen.fit(data, num_iterations=10, batch_size=64, progress_bar=False), data


# ------------------------------------------------------------------------------------------------
class TestEnergyDistance:
    def test_point_masses_closed_form(self):
        # delta_0 vs delta_a: 2 |a| - 0 - 0
        x = torch.zeros(5, 3, dtype=torch.float64)
        y = torch.tensor([[1.0, 2.0, 2.0]], dtype=torch.float64).expand(7, 3)
        assert energy_distance(x, y).item() == pytest.approx(6.0, abs=1e-12)
        assert energy_distance(x, x).item() == pytest.approx(0.0, abs=1e-12)

    def test_two_point_closed_form(self):
        # x uniform on {0, 1}, y = {0}: 2 * 1/2 - 1/2 - 0 = 1/2
        x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
        y = torch.zeros(1, 1, dtype=torch.float64)
        assert energy_distance(x, y).item() == pytest.approx(0.5, abs=1e-12)

    def test_matches_scipy_squared_in_1d(self):
        stats = pytest.importorskip("scipy.stats")
        g = torch.Generator().manual_seed(0)
        x = torch.randn(300, 1, generator=g, dtype=torch.float64)
        y = 0.7 + 1.3 * torch.randn(200, 1, generator=g, dtype=torch.float64)
        ref = stats.energy_distance(x[:, 0].numpy(), y[:, 0].numpy()) ** 2  # scipy: sqrt(2 int (F-G)^2)
        assert energy_distance(x, y).item() == pytest.approx(ref, rel=1e-10)

    def test_shift_detected_and_symmetric(self):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(400, 2, generator=g, dtype=torch.float64)
        y = torch.randn(400, 2, generator=g, dtype=torch.float64)
        same, shifted = energy_distance(x, y), energy_distance(x, y + 1.0)
        assert same < 0.02 < shifted
        assert energy_distance(y + 1.0, x).item() == pytest.approx(shifted.item(), rel=1e-12)

    def test_unbiased_u_statistic(self):
        # x uniform on {0, 1}, y = {0, 0}: U = 2 * 1/2 - 1 - 0 = 0, V = 1 - 1/2 - 0 = 1/2
        x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
        y = torch.zeros(2, 1, dtype=torch.float64)
        assert energy_distance(x, y, unbiased=True).item() == pytest.approx(0.0, abs=1e-12)
        assert energy_distance(x, y).item() == pytest.approx(0.5, abs=1e-12)
        # V - U = mean_{i != j} |x_i - x_j| / N + mean_{i != j} |y_i - y_j| / M
        g = torch.Generator().manual_seed(3)
        x = torch.randn(30, 3, generator=g, dtype=torch.float64)
        y = torch.randn(20, 3, generator=g, dtype=torch.float64) + 0.5

        def within(a):
            n = a.shape[0]
            return sum((a[i] - a[j]).norm() for i in range(n) for j in range(n) if i != j) / (n * (n - 1))

        gap = energy_distance(x, y) - energy_distance(x, y, unbiased=True)
        assert gap.item() == pytest.approx((within(x) / 30 + within(y) / 20).item(), rel=1e-10)
        with pytest.raises(ValueError, match="at least 2"):
            energy_distance(x[:1], y, unbiased=True)

    def test_bad_input(self):
        x = torch.randn(10, 2)
        with pytest.raises(ValueError, match="dimension"):
            energy_distance(x, torch.randn(10, 3))
        with pytest.raises(ValueError, match="NaN"):
            energy_distance(x, torch.full((4, 2), math.nan))
        with pytest.raises(ValueError, match="dtype"):
            energy_distance(x, torch.randn(10, 2, dtype=torch.float64))


def test_fit_gaussian_moments():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1000, 3, generator=g, dtype=torch.float64) @ torch.tensor(
        [[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0.0, 0.0, 0.2]], dtype=torch.float64) + 2.0
    d = fit_gaussian(x, jitter=0.0)
    torch.testing.assert_close(d.loc, x.mean(0))
    torch.testing.assert_close(d.covariance_matrix, torch.cov(x.T))


# ------------------------------------------------------------------------------------------------
class TestBregmanLosses:
    @pytest.mark.parametrize("loss", LOSSES)
    def test_loss_recovers_closed_form_ratio(self, loss):
        """A vanishing flow (one step, eta ~ 0, no noise) makes q_tilde = prior: plain Bregman DRE of
        N(0.5, I) / N(0, I), whose log-ratio is 0.5 sum(x) - 0.25 (d = 2)."""
        torch.manual_seed(0)
        prior = _gaussian(0.5, 1.0)
        data = torch.randn(4000, 2)
        gen = FlowGuidedGenerator(2, loss=loss, prior=prior, num_flow_steps=1, step_size=1e-9, noise_std=0.0,
                                  hidden_dim=32, num_layers=2)
        gen.fit(data, num_iterations=300, batch_size=512, lr=3e-3, ema_decay=0.99, progress_bar=False)
        losses = torch.tensor(gen.losses)
        assert losses[-50:].mean() < losses[:20].mean() - 0.01  # the Bregman loss decreases
        x = torch.randn(2000, 2) * 0.8 + 0.25  # the bulk of both densities
        truth = 0.5 * x.sum(-1) - 0.25
        rmse = (gen.log_ratio(x) - truth).pow(2).mean().sqrt()
        print(f"{loss}: log-ratio RMSE {rmse:.3f}")
        assert rmse < 0.2, f"{loss}: log-ratio RMSE {rmse:.3f}"

    def test_bce_is_lr(self):
        torch.manual_seed(0)
        a = FlowGuidedGenerator(2, loss="bce", hidden_dim=8, num_layers=1)
        b = FlowGuidedGenerator(2, loss="lr", hidden_dim=8, num_layers=1)
        b.load_state_dict(a.state_dict())
        x, y = torch.randn(16, 2), torch.randn(16, 2) + 1
        torch.testing.assert_close(a._loss(x, y, 0.0), b._loss(x, y, 0.0))
        assert a.divergence == b.divergence == "kl"


# ------------------------------------------------------------------------------------------------
class TestChasm:
    @pytest.mark.slow
    def test_chasm_crossed(self):
        """N(0, 0.1 I) -> N((6, 6), 0.1 I): the stale estimator trained on flowed samples crosses the chasm
        (a single density-ratio flow from the prior does not). CI budget; the benchmark has the real one."""
        torch.manual_seed(0)
        s = math.sqrt(0.1)
        data = 6.0 + s * torch.randn(4000, 2)
        gen = FlowGuidedGenerator(2, loss="lsif", prior=_gaussian(0.0, 0.1), num_flow_steps=50,
                                  num_refine_steps=0, step_size=2.0, noise_std=0.03, hidden_dim=64,
                                  num_layers=3)
        gen.fit(data, num_iterations=400, batch_size=256, progress_bar=False)
        x = gen.sample(2000)
        target = 6.0 + s * torch.randn(2000, 2)
        floor = energy_distance(6.0 + s * torch.randn(2000, 2), target)
        prior_ed = energy_distance(s * torch.randn(2000, 2), target)
        ed = energy_distance(x, target)
        err, std_ratio = (x.mean(0) - 6.0).norm(), x.std(0) / s
        print(f"chasm CI: mean error {err:.3f}, std ratio {std_ratio.tolist()}, ED {ed:.4f}, "
              f"floor {floor:.4f}, "
              f"prior ED {prior_ed:.2f}")
        # issue goals 0.05 / 10 % / 0.01 (benchmark budget); the prior's mean error is 8.5, its ED ~16
        along = ((x - 6.0) @ torch.tensor([1.0, 1.0]) / math.sqrt(2)).std() / s  # the direction of travel
        assert err < 0.15
        assert bool(((std_ratio > 0.8) & (std_ratio < 1.2)).all()), std_ratio
        assert 0.8 < along < 1.2, along  # no collapse onto a line across the track
        assert ed < 0.02, (ed, floor, prior_ed)


# ------------------------------------------------------------------------------------------------
class TestPyroWrapper:
    def test_sample_site_and_predictive(self, small_gen):
        gen, _ = small_gen

        def model():
            x = pyro.sample("x", FDRLDistribution(gen))
            return pyro.sample("y", dist.Normal(x.sum(-1), 1.0))

        tr = pyro.poutine.trace(model).get_trace()
        assert tr.nodes["x"]["value"].shape == (2,)
        out = Predictive(model, num_samples=4, return_sites=["x", "y"])()
        assert out["x"].shape == (4, 2) and out["y"].shape == (4,)
        assert bool(torch.isfinite(out["x"]).all())

    def test_plate_expands(self, small_gen):
        gen, _ = small_gen

        def model():
            with pyro.plate("n", 6):
                return pyro.sample("x", FDRLDistribution(gen))

        assert model().shape == (6, 2)

    def test_log_prob_raises(self, small_gen):
        d = FDRLDistribution(small_gen[0])
        with pytest.raises(NotImplementedError, match="implicit model"):
            d.log_prob(torch.zeros(2))

        def model():
            pyro.sample("x", d, obs=torch.zeros(2))

        with pytest.raises(NotImplementedError, match="implicit model"):
            pyro.poutine.trace(model).get_trace().log_prob_sum()

    def test_label_batch_shapes(self, small_gen):
        gen, _ = small_gen

        def clf(x):
            return torch.stack([-x[:, 0], x[:, 0], 0 * x[:, 0]], -1)

        d = FDRLDistribution(gen, classifier=clf, label=torch.tensor([0, 2, 1]), num_steps=3)
        assert d.batch_shape == (3,) and d.event_shape == (2,)
        assert d.sample().shape == (3, 2)
        assert d.sample((4,)).shape == (4, 3, 2)
        e = d.expand((5, 3))
        assert e.batch_shape == (5, 3) and e.label.shape == (5, 3)
        assert e.sample((2,)).shape == (2, 5, 3, 2)
        assert FDRLDistribution(gen, classifier=clf, label=1, num_steps=2).sample((7,)).shape == (7, 2)

    def test_bad_wrapper_input(self, small_gen):
        gen, _ = small_gen
        with pytest.raises(TypeError, match="FlowGuidedGenerator"):
            FDRLDistribution("not a generator")
        with pytest.raises(ValueError, match="fitted"):
            FDRLDistribution(FlowGuidedGenerator(2))
        with pytest.raises(ValueError, match="both"):
            FDRLDistribution(gen, label=1)
        with pytest.raises(TypeError, match="integer"):
            FDRLDistribution(gen, classifier=lambda x: x, label=torch.tensor([0.5]))


# ------------------------------------------------------------------------------------------------
class TestClassConditional:
    def test_composed_classifier_picks_the_class(self):
        """Two Gaussian classes N(-+2 e_1, 0.25 I) with equal weights; the exact (Bayes) classifier is
        logistic with logit difference (mu_1 - mu_0)^T Sigma^-1 x = 16 x_1. Conditional draws must land in
        the requested class around its mean."""
        torch.manual_seed(0)
        n = 2000
        labels = torch.randint(2, (n,))
        centres = torch.tensor([[-2.0, 0.0], [2.0, 0.0]])
        data = centres[labels] + 0.5 * torch.randn(n, 2)

        def classifier(x):
            return torch.stack([-8.0 * x[:, 0], 8.0 * x[:, 0]], -1)

        gen = FlowGuidedGenerator(2, loss="lr", num_flow_steps=30, step_size=0.05, noise_std=0.05,
                                  hidden_dim=64, num_layers=2)
        gen.fit(data, num_iterations=150, batch_size=256, progress_bar=False)
        for y, sign in ((0, -1.0), (1, 1.0)):
            x = gen.sample(1000, classifier=classifier, label=y)
            frac = (sign * x[:, 0] > 0).float().mean()
            assert frac > 0.97, (y, frac)
            assert abs(x[:, 0].mean() - 2.0 * sign) < 0.5
        # a per-sample label tensor
        lab = torch.tensor([0, 1] * 200)
        x = gen.sample(400, classifier=classifier, label=lab)
        assert ((x[:, 0] > 0).long() == lab).float().mean() > 0.95
        with pytest.raises(ValueError, match="num_classes"):
            gen.sample(4, classifier=classifier, label=2)


# ------------------------------------------------------------------------------------------------
class TestCheckpoint:
    def test_save_load_roundtrip(self, small_gen, tmp_path):
        gen, data = small_gen
        gen.save(tmp_path / "g.pt")
        back = FlowGuidedGenerator.load(tmp_path / "g.pt")
        torch.testing.assert_close(back.log_ratio(data[:50]), gen.log_ratio(data[:50]))
        torch.manual_seed(3)
        a = gen.sample(20)
        torch.manual_seed(3)
        b = back.sample(20)
        torch.testing.assert_close(a, b)
        assert back.losses == gen.losses and back.iteration == gen.iteration

    def test_fourier_roundtrip(self, tmp_path):
        torch.manual_seed(0)
        gen = FlowGuidedGenerator(2, loss="lr", num_flow_steps=2, hidden_dim=8, num_layers=1,
                                  fourier_features=4, fourier_scale=2.0)
        assert isinstance(gen.network, FourierMLP) and gen.network.freqs.shape == (4, 2)
        data = torch.randn(64, 2)
        gen.fit(data, num_iterations=3, batch_size=16, progress_bar=False)
        gen.save(tmp_path / "g.pt")
        back = FlowGuidedGenerator.load(tmp_path / "g.pt")
        assert isinstance(back.network, FourierMLP)
        torch.testing.assert_close(back.network.freqs, gen.network.freqs)
        torch.testing.assert_close(back.log_ratio(data[:20]), gen.log_ratio(data[:20]))

    def test_user_prior_roundtrip(self, tmp_path):
        torch.manual_seed(0)
        gen = FlowGuidedGenerator(2, prior=_gaussian(3.0, 0.5), num_flow_steps=2, hidden_dim=8, num_layers=1)
        gen.fit(torch.randn(64, 2), num_iterations=3, batch_size=16, progress_bar=False)
        gen.save(tmp_path / "g.pt")
        with pytest.raises(ValueError, match="pass prior="):  # a user prior is not saved (no pickles)
            FlowGuidedGenerator.load(tmp_path / "g.pt")
        back = FlowGuidedGenerator.load(tmp_path / "g.pt", prior=_gaussian(3.0, 0.5))
        torch.manual_seed(1)
        a = back.sample_prior(500)
        assert (a * back.scale + back.shift).mean(0).sub(3.0).abs().max() < 0.2

    def test_resume_equals_uninterrupted(self, tmp_path):
        torch.manual_seed(0)
        data = torch.randn(256, 2, dtype=torch.float64) + 2.0

        def make():
            return FlowGuidedGenerator(2, loss="lsif", num_flow_steps=4, step_size=0.05, hidden_dim=16,
                                       num_layers=2)

        torch.manual_seed(5)
        full = make().fit(data, num_iterations=12, batch_size=32, checkpoint_every=5, progress_bar=False,
                          checkpoint_path=str(tmp_path / "c_{iteration}.pt"))
        assert all((tmp_path / f"c_{k}.pt").exists() for k in (5, 10, 12))
        mid = FlowGuidedGenerator.load(str(tmp_path / "c_5.pt"))
        assert mid.is_fitted and mid.iteration == 5 and len(mid._resume["losses"]) == 5
        mid.sample(3)  # a mid-training checkpoint can sample (EMA weights)
        with pytest.raises(ValueError, match="num_iterations"):
            FlowGuidedGenerator.load(str(tmp_path / "c_5.pt")).fit(data, num_iterations=20, resume=True,
                                                                   progress_bar=False)
        resumed = mid.fit(data, num_iterations=12, batch_size=32, resume=True, progress_bar=False)
        assert resumed.iteration == 12
        assert resumed.losses == pytest.approx(full.losses, rel=1e-12)
        for k, v in full.state_dict().items():
            torch.testing.assert_close(resumed.state_dict()[k], v, rtol=1e-12, atol=1e-12)

    def test_resume_needs_checkpoint(self):
        with pytest.raises(ValueError, match="resume"):
            FlowGuidedGenerator(2).fit(torch.randn(32, 2), num_iterations=2, resume=True, progress_bar=False)


# ------------------------------------------------------------------------------------------------
class TestBadInput:
    def test_data(self):
        gen = FlowGuidedGenerator(2, num_flow_steps=1, hidden_dim=8, num_layers=1)
        bad = torch.randn(32, 2)
        bad[3, 1] = math.nan
        with pytest.raises(ValueError, match="NaN"):
            gen.fit(bad, num_iterations=1, progress_bar=False)
        with pytest.raises(ValueError, match="dimension"):
            gen.fit(torch.randn(32, 3), num_iterations=1, progress_bar=False)
        with pytest.raises(ValueError, match="shape"):
            gen.fit(torch.randn(32, 2, 1), num_iterations=1, progress_bar=False)
        with pytest.raises(ValueError, match="at least"):
            gen.fit(torch.randn(3, 2), num_iterations=1, progress_bar=False)
        with pytest.raises(TypeError, match="floating"):
            gen.fit(torch.ones(32, 2, dtype=torch.long), num_iterations=1, progress_bar=False)
        with pytest.raises(ValueError, match="num_iterations"):
            gen.fit(torch.randn(32, 2), num_iterations=0, progress_bar=False)
        with pytest.raises(RuntimeError, match="not fitted"):
            gen.sample(3)

    def test_options(self):
        with pytest.raises(ValueError, match="loss"):
            FlowGuidedGenerator(2, loss="hinge")
        with pytest.raises(ValueError, match="divergence"):
            FlowGuidedGenerator(2, divergence="tv")
        with pytest.raises(ValueError, match="step_size"):
            FlowGuidedGenerator(2, step_size=0.0)
        with pytest.raises(ValueError, match="noise_std"):
            FlowGuidedGenerator(2, noise_std=-1.0)
        with pytest.raises(ValueError, match="num_flow_steps"):
            FlowGuidedGenerator(2, num_flow_steps=0)
        with pytest.raises(ValueError, match="dim"):
            FlowGuidedGenerator(0)
        with pytest.raises(ValueError, match="prior"):
            FlowGuidedGenerator(2, prior="uniform")
        with pytest.raises(ValueError, match="event_shape"):
            FlowGuidedGenerator(2, prior=_gaussian(0.0, 1.0, dim=3))
        with pytest.raises(TypeError, match="prior"):
            FlowGuidedGenerator(2, prior=3.0)
        with pytest.raises(ValueError, match="fourier_features"):
            FlowGuidedGenerator(2, fourier_features=-1)
        with pytest.raises(ValueError, match="fourier_scale"):
            FlowGuidedGenerator(2, fourier_features=4, fourier_scale=0.0)

    def test_sampling_options(self, small_gen):
        gen, _ = small_gen
        with pytest.raises(ValueError, match="label needs a classifier"):
            gen.sample(3, label=1)
        with pytest.raises(ValueError, match="needs a label"):
            gen.sample(3, classifier=lambda x: x)
        with pytest.raises(TypeError, match="integer"):
            gen.sample(3, classifier=lambda x: x, label=0.5)
        with pytest.raises(ValueError, match="shape"):
            gen.sample(3, classifier=lambda x: x, label=torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="logits"):
            gen.sample(3, classifier=lambda x: x[:, 0], label=0)
        with pytest.raises(ValueError, match="num_samples"):
            gen.sample(0)
        with pytest.raises(ValueError, match="step_size"):
            gen.sample(3, step_size=-0.1)
        with pytest.raises(ValueError, match="z0"):
            gen.flow(torch.randn(3, 5), 2)

    def test_bad_user_prior_sampler(self):
        gen = FlowGuidedGenerator(2, prior=lambda n: torch.randn(n + 1, 2), num_flow_steps=1, hidden_dim=8,
                                  num_layers=1)
        with pytest.raises(ValueError, match="prior sampler returned"):
            gen.fit(torch.randn(32, 2), num_iterations=1, progress_bar=False)


def test_flow_path_and_sample_shapes(small_gen):
    gen, _ = small_gen
    path = gen.sample(10, num_steps=4, return_path=True, batch_size=3)
    assert path.shape == (5, 10, 2)
    torch.testing.assert_close(path.shape, torch.Size([5, 10, 2]))
    # noise-free flow with the drift switched off (eta -> 0) returns the prior draw
    z0 = gen.sample_prior(8)
    torch.testing.assert_close(gen.flow(z0, 3, step_size=1e-12, noise_std=0.0), z0)


@pytest.mark.parametrize("loss,divergence,fourier", [("lsif", "chi2", 0), ("lr", "kl", 0), ("kl", "kl", 0),
                                                     ("lr", "js", 0), ("lsif", "chi2", 5), ("lr", "kl", 5)])
def test_flow_drift_matches_autograd(loss, divergence, fourier):
    """The flow's explicit input gradient (f' linear in the output; MLP or FourierMLP) gives autograd's
    drift; other pairings, other activations and custom networks take the autograd path."""
    torch.manual_seed(0)
    gen = FlowGuidedGenerator(3, loss=loss, divergence=divergence, hidden_dim=16, num_layers=2,
                              fourier_features=fourier).double()
    z = torch.randn(50, 3, dtype=torch.float64)
    zk = z.clone().requires_grad_(True)
    grad = torch.autograd.grad(gen.potential(zk).sum(), zk)[0]
    torch.testing.assert_close(gen.flow(z, 1, step_size=0.1, noise_std=0.0), z - 0.1 * grad)
    assert _input_grad_fn(gen.network) is not None
    mlp = gen.network.mlp if fourier else gen.network
    mlp.net = torch.nn.Sequential(torch.nn.Linear(mlp.net[0].in_features, 8), torch.nn.SiLU(),
                                  torch.nn.Linear(8, 1)).double()
    assert _input_grad_fn(gen.network) is None
    zk = z.clone().requires_grad_(True)
    grad = torch.autograd.grad(gen.potential(zk).sum(), zk)[0]
    torch.testing.assert_close(gen.flow(z, 1, step_size=0.1, noise_std=0.0), z - 0.1 * grad)


def test_digits_smoke():
    datasets = pytest.importorskip("sklearn.datasets")
    x = torch.as_tensor(datasets.load_digits().data, dtype=torch.float32) / 16.0
    torch.manual_seed(0)
    gen = FlowGuidedGenerator(64, loss="lsif", num_flow_steps=3, hidden_dim=32, num_layers=2)
    gen.fit(x, num_iterations=3, batch_size=32, progress_bar=False)
    s = gen.sample(10)
    assert s.shape == (10, 64) and bool(torch.isfinite(s).all())
