"""DDS, the two-control bridge, the rKL log-derivative loss, exploration, EMA and checkpoints."""

import math

import pytest
import torch
from _interrupt import Interrupting

from pyro_sde.infer import DiffusionSampler
from pyro_sde.targets import GMM9

D64 = torch.float64


class _ScaledControl(torch.nn.Module):
    """``v = theta * v0(tau, x)``: one parameter, so gradient estimators can be compared."""

    def __init__(self, v0, theta=1.0):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(theta, dtype=D64))
        self.v0 = v0

    def forward(self, tau, x, guide):
        return self.theta * self.v0(tau, x)


def _gaussian(mu, var, log_z):
    target = torch.distributions.MultivariateNormal(mu, var * torch.eye(mu.shape[0], dtype=D64))
    return lambda x: log_z + target.log_prob(x)


def _grads(sampler, num_batches, batch_size):
    out = []
    for _ in range(num_batches):
        loss, _ = sampler.compute_loss(batch_size)
        out.append(torch.autograd.grad(loss, sampler.control.theta)[0])
    return torch.stack(out)


@pytest.mark.parametrize("method", ["pis", "dis", "dds"])
def test_gradient_estimators_agree_in_expectation(method):
    # With a fixed reference process: E[grad LV] = 2 E[grad rKL-LD] = 2 E[grad KL] (all on-policy).
    log_rho = _gaussian(torch.tensor([1.0, -0.5], dtype=D64), 0.5, 0.3)
    means, ses = {}, {}
    for loss in ["kl", "rkl_ld", "log_variance"]:
        sampler = DiffusionSampler(
            log_density=log_rho, dim=2, method=method, loss=loss, num_steps=10, dtype=D64, precondition=None,
            control=_ScaledControl(lambda tau, x: torch.ones_like(x) - 0.3 * x, theta=0.5),
        )
        g = _grads(sampler, 10, 2000) / (2 if loss == "log_variance" else 1)
        means[loss], ses[loss] = g.mean().item(), g.std().item() / math.sqrt(g.numel())
    for loss in ["rkl_ld", "log_variance"]:
        diff = abs(means[loss] - means["kl"])
        assert diff < 4 * math.hypot(ses[loss], ses["kl"]) + 1e-3, (means, ses)
    assert abs(means["kl"]) > 10 * ses["kl"]  # a non-trivial gradient: the test has power


def test_log_variance_with_exploration_is_still_zero_variance_at_the_optimum():
    mu, log_z, sigma, T = torch.tensor([1.0, -0.5], dtype=D64), 0.4, 1.0, 1.0
    for noise in [1.0, 1.7]:
        sampler = DiffusionSampler(
            log_density=_gaussian(mu, sigma**2 * T, log_z), dim=2, method="pis", num_steps=20, sigma=sigma,
            T=T, dtype=D64, exploration_noise=noise, control=_ScaledControl(lambda tau, x: mu.expand_as(x)),
            precondition=None,
        )
        assert _grads(sampler, 3, 256).abs().max().item() < 1e-10
    with pytest.raises(ValueError, match="on-policy"):
        DiffusionSampler(log_density=lambda x: -x.pow(2).sum(-1), dim=2, loss="kl", exploration_noise=1.5)
    with pytest.raises(ValueError, match="on-policy"):
        DiffusionSampler(log_density=lambda x: -x.pow(2).sum(-1), dim=2, loss="rkl_ld", exploration_noise=2.0)


def test_exploration_helps_log_variance_cover_gmm9_modes():
    # the exploration knob changes what training sees; the run stays sound (finite, weights exact)
    target = GMM9()
    sampler = DiffusionSampler(
        log_density=target.log_prob, dim=2, method="dis", num_steps=30, exploration_noise=1.3
    )
    sampler.run(num_iterations=40, batch_size=128, progress_bar=False)
    assert all(math.isfinite(v) for v in sampler.losses)
    z, log_w = sampler.sample_unconstrained(2000)
    assert torch.isfinite(log_w).all()


@pytest.mark.parametrize("method,loss", [("dds", "log_variance"), ("bridge", "rkl_ld"), ("bridge", "kl")])
def test_new_methods_are_exact_on_a_gaussian(method, loss):
    mu, var, log_z = torch.tensor([0.8, -0.4, 0.3], dtype=D64), 0.6, -1.2
    sampler = DiffusionSampler(
        log_density=_gaussian(mu, var, log_z), dim=3, method=method, loss=loss, num_steps=20, dtype=D64
    )
    sampler.run(num_iterations=60, batch_size=256, progress_bar=False)
    ev = sampler.log_evidence(20_000)
    assert abs(ev.log_z.item() - log_z) < 3 * ev.stderr.item() + 1e-3
    assert ev.lower_bound.item() < log_z + 3 * ev.stderr.item()
    assert ev.ess.item() > 0.3
    samples, log_w = sampler.get_weighted_samples()
    w = torch.softmax(log_w, 0)[:, None]
    mean = (w * samples["x"]).sum(0)
    std = (w * (samples["x"] - mean) ** 2).sum(0).sqrt()
    assert torch.allclose(mean, mu, atol=0.05)
    assert torch.allclose(std, torch.full_like(std, math.sqrt(var)), rtol=0.05)


def test_bridge_learns_its_backward_control_and_warns_on_log_variance():
    sampler = DiffusionSampler(log_density=GMM9().log_prob, dim=2, method="bridge", num_steps=10)
    assert sampler.loss_spec.name == "rkl_ld"
    before = [q.clone() for q in sampler.backward_control.parameters()]
    sampler.run(num_iterations=3, batch_size=64, progress_bar=False)
    after = list(sampler.backward_control.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    with pytest.warns(UserWarning, match="data-processing"):
        DiffusionSampler(log_density=GMM9().log_prob, dim=2, method="bridge", loss="log_variance")
    with pytest.raises(ValueError, match="backward_control"):
        DiffusionSampler(
            log_density=GMM9().log_prob, dim=2, method="dis", backward_control=torch.nn.Linear(2, 2)
        )


def test_ema_weights_follow_the_warm_up_formula():
    sampler = DiffusionSampler(log_density=GMM9().log_prob, dim=2, num_steps=10, ema_decay=0.5)
    init = [q.detach().clone() for q in sampler.control.parameters()]
    sampler.run(num_iterations=1, batch_size=32, progress_bar=False)
    decay = min(0.5, 2 / 11)
    ema_control, _ = sampler._sampling_nets()
    for q0, q, q_ema in zip(init, sampler.control.parameters(), ema_control.parameters()):
        assert torch.allclose(q_ema, decay * q0 + (1 - decay) * q.detach(), atol=1e-6)
    no_ema = DiffusionSampler(log_density=GMM9().log_prob, dim=2, ema_decay=None)
    assert no_ema._sampling_nets()[0] is no_ema.control
    with pytest.raises(ValueError, match="ema_decay"):
        DiffusionSampler(log_density=GMM9().log_prob, dim=2, ema_decay=1.5)


def _interrupting(stop_at=None):
    """``GMM9().log_prob`` that raises KeyboardInterrupt at its ``stop_at``-th call (Ctrl-C mid-run)."""
    return Interrupting(GMM9().log_prob, stop_at)


@pytest.mark.parametrize("method", ["dis", "bridge"])
def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, method):
    options = dict(dim=2, method=method, num_steps=8, ema_decay=0.9, precondition=None)
    torch.manual_seed(1)
    full = DiffusionSampler(log_density=_interrupting(), **options)
    full.run(num_iterations=12, batch_size=32, progress_bar=False)

    path = tmp_path / "sampler.pt"
    torch.manual_seed(1)
    # 9 log-density calls per iteration (8 guides + the boundary): interrupt inside iteration 8
    broken = DiffusionSampler(log_density=_interrupting(stop_at=9 * 7 + 4), **options)
    with pytest.raises(KeyboardInterrupt):
        broken.run(num_iterations=12, batch_size=32, progress_bar=False, checkpoint=path, checkpoint_every=5)
    resumed = DiffusionSampler.load(path, log_density=_interrupting())
    assert resumed._run_state["done"] == 5 and len(resumed.losses) == 5
    torch.manual_seed(123)  # the checkpoint's random state is restored by resume
    resumed.resume(progress_bar=False)

    assert resumed.losses == full.losses
    for a, b in zip(full._parameters(), resumed._parameters()):
        assert torch.equal(a, b)
    torch.manual_seed(7)
    z_full, lw_full = full.sample_unconstrained(100)
    torch.manual_seed(7)
    z_res, lw_res = resumed.sample_unconstrained(100)
    assert torch.equal(z_full, z_res) and torch.equal(lw_full, lw_res)


def test_checkpoint_of_a_model_sampler_round_trips(tmp_path):
    import pyro
    import pyro.distributions as dist

    def model(y):
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        with pyro.plate("n", y.shape[0]):
            pyro.sample("y", dist.Normal(0.0, s), obs=y)

    y = torch.randn(10)
    sampler = DiffusionSampler(model, num_steps=10)
    sampler.run(y, num_iterations=4, batch_size=32, progress_bar=False)
    sampler.save(tmp_path / "m.pt")
    loaded = DiffusionSampler.load(tmp_path / "m.pt", model).setup(y)
    torch.manual_seed(0)
    a = sampler.get_weighted_samples(50)
    torch.manual_seed(0)
    b = loaded.get_weighted_samples(50)
    assert torch.equal(a[0]["s"], b[0]["s"]) and torch.equal(a[1], b[1])
    with pytest.warns(UserWarning, match="finished"):
        loaded.resume(y, progress_bar=False)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception):  # noqa: B017 - torch.load's own error on a corrupt file
        DiffusionSampler.load(tmp_path / "junk.pt", model)
    torch.save({"version": 99}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a DiffusionSampler checkpoint"):
        DiffusionSampler.load(tmp_path / "other.pt", model)
    with pytest.raises(RuntimeError, match="nothing to resume"):
        DiffusionSampler(model).resume(y)


def test_closed_form_score_replaces_autograd_exactly():
    target = GMM9()
    x = 3 * torch.randn(50, 2, dtype=D64)
    x.requires_grad_(True)
    (auto,) = torch.autograd.grad(target.log_prob(x).sum(), x)
    assert torch.allclose(target.score(x.detach()), auto, atol=1e-12)
    samplers = []
    for score in [None, target.score]:
        torch.manual_seed(3)
        sampler = DiffusionSampler(
            log_density=target.log_prob, score=score, dim=2, num_steps=10, precondition=None
        )
        sampler.run(num_iterations=3, batch_size=64, progress_bar=False)
        samplers.append(sampler)
    assert samplers[0].losses == pytest.approx(samplers[1].losses, rel=1e-4)
    with pytest.raises(ValueError, match="does not match"):
        DiffusionSampler(log_density=target.log_prob, score=lambda x: -x, dim=2)
    with pytest.raises(ValueError, match="goes with `log_density`"):
        DiffusionSampler(lambda: None, score=target.score)
