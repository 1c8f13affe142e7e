"""DiffusionSampler's two ways to differentiate the detached-path losses (the controls' graph recorded in
the simulation, or the controls recomputed on the stored path) and the mixed-precision network."""

import math
import warnings

import pytest
import torch

from pyro_sde.infer import DiffusionSampler
from pyro_sde.infer.diffusion import sampler as sampler_module

D64 = torch.float64


def _gaussian_log_density(x):  # N(1, 0.5^2 I) on R^d, unnormalised
    return -2.0 * (x - 1).pow(2).sum(-1)


def _sampler(method="dis", loss=None, dim=3, dtype=D64, seed=0, init_std=0.3, **kw):
    torch.manual_seed(seed)
    sampler = DiffusionSampler(
        log_density=_gaussian_log_density, dim=dim, method=method, loss=loss, num_steps=8, hidden_dim=16,
        num_layers=2, precondition=None, dtype=dtype, ema_decay=None, **kw,
    ).setup()
    for p in sampler._nets()[0].parameters():  # a non-zero network: every gradient is informative
        torch.nn.init.normal_(p, std=init_std)
    if sampler.method == "bridge":
        for p in sampler.backward_control.parameters():
            torch.nn.init.normal_(p, std=init_std)
    return sampler


def _loss_and_grads(sampler, batch=32, seed=1):
    torch.manual_seed(seed)
    loss, _, ref_log_w = sampler._compute_loss(batch)
    params = [p for net in sampler._nets() for p in net.parameters()]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss.detach(), ref_log_w, [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


class TestControlGraph:
    @pytest.mark.parametrize(
        "method, loss",
        [("dis", "log_variance"), ("pis", "log_variance"), ("dds", "log_variance"), ("dis", "rkl_ld"),
         ("bridge", "rkl_ld")],
    )
    def test_record_equals_recompute(self, method, loss):
        """The recorded graph gives the loss and every gradient of the recomputed pass (float64)."""
        recorded = _sampler(method, loss, control_graph="record")
        recomputed = _sampler(method, loss, control_graph="recompute")
        assert recorded._records_controls(32) and not recomputed._records_controls(32)
        loss_a, ref_a, grads_a = _loss_and_grads(recorded)
        loss_b, ref_b, grads_b = _loss_and_grads(recomputed)
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ref_a, ref_b, rtol=1e-12, atol=1e-12)
        assert max(float(g.abs().max()) for g in grads_b) > 1e-3  # the gradients are informative
        for a, b in zip(grads_a, grads_b):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)

    @pytest.mark.parametrize("method", ["dis", "pis", "dds"])
    @pytest.mark.parametrize("control_graph", ["record", "recompute"])
    @pytest.mark.parametrize("exploration_noise", [1.0, 1.5])
    def test_the_surrogate_has_the_gradient_of_the_path_log_ratio(self, method, control_graph,
                                                                  exploration_noise):
        """``log w + S - S.detach()``: the value and every gradient of the differentiated path log-ratio."""
        sampler = _sampler(method, control_graph=control_graph, exploration_noise=exploration_noise)
        params = list(sampler.control.parameters())
        results = []
        for surrogate in (True, False):
            torch.manual_seed(1)
            log_w, behaviour, _ = sampler._training_log_weights(32, surrogate=surrogate)
            loss = log_w.var()
            results.append((log_w.detach(), behaviour, torch.autograd.grad(loss, params)))
        (lw_a, b_a, g_a), (lw_b, b_b, g_b) = results
        torch.testing.assert_close(b_a, b_b, rtol=0, atol=0)  # the same paths
        torch.testing.assert_close(lw_a, lw_b, rtol=1e-12, atol=1e-10)
        assert max(float(g.abs().max()) for g in g_b) > 1e-3
        for a, b in zip(g_a, g_b):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)

    def test_record_with_exploration_noise_equals_recompute(self):
        a = _sampler(control_graph="record", exploration_noise=1.5)
        b = _sampler(control_graph="recompute", exploration_noise=1.5)
        la, ra, ga = _loss_and_grads(a)
        lb, rb, gb = _loss_and_grads(b)
        torch.testing.assert_close(la, lb, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ra, rb, rtol=1e-12, atol=1e-12)
        for x, y in zip(ga, gb):
            torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)

    def test_the_recorded_weights_are_the_simulated_ones(self):
        """With on-policy paths the differentiable ``log w`` is the behaviour weight of the chain."""
        sampler = _sampler(control_graph="record")
        log_w, behaviour, _ = sampler._training_log_weights(16)
        assert log_w.requires_grad
        torch.testing.assert_close(log_w.detach(), behaviour, rtol=1e-12, atol=1e-12)

    def test_auto_records_between_the_batch_and_memory_bounds(self, monkeypatch):
        sampler = _sampler(control_graph="auto")
        assert not sampler._records_controls(1023) and sampler._records_controls(1024)
        monkeypatch.setattr(sampler_module, "RECORD_MIN_ROWS", 32)
        assert not sampler._records_controls(31) and sampler._records_controls(32)
        # 8 steps x 32 rows x (4 * 16 * 3 + 4 * 3) numbers x 8 bytes = 417,792 bytes
        monkeypatch.setattr(sampler_module, "RECORD_MEMORY_BYTES", 417_792)
        assert sampler._records_controls(32) and not sampler._records_controls(33)
        la, ra, ga = _loss_and_grads(sampler, batch=33)  # the recompute pass, through "auto"
        lb, rb, gb = _loss_and_grads(_sampler(control_graph="recompute"), batch=33)
        torch.testing.assert_close(la, lb, rtol=0, atol=0)

    def test_auto_recomputes_with_torchsde(self):
        sampler = _sampler(control_graph="auto", backend="torchsde")
        assert not sampler._records_controls(8)
        sampler.step(8)

    def test_torchsde_backend_recomputes_the_simulated_controls(self):
        """At K = 6 torchsde ends with a sliver of a 7th step: the controls stay those of the 6 steps."""
        torch.manual_seed(0)
        sampler = DiffusionSampler(
            log_density=_gaussian_log_density, dim=3, num_steps=6, hidden_dim=16, num_layers=2,
            precondition=None, dtype=D64, backend="torchsde",
        ).setup()
        torch.nn.init.normal_(sampler.control.body[-1][-1].weight, std=0.3)
        log_w, behaviour, _ = sampler._training_log_weights(16)
        torch.testing.assert_close(log_w.detach(), behaviour, rtol=1e-10, atol=1e-10)

    def test_kl_loss_is_unaffected(self):
        """The reparametrised loss differentiates through the solver either way."""
        a = _loss_and_grads(_sampler(loss="kl", control_graph="record"))
        b = _loss_and_grads(_sampler(loss="kl", control_graph="recompute"))
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)

    def test_bad_options(self):
        with pytest.raises(ValueError, match="control_graph"):
            DiffusionSampler(log_density=_gaussian_log_density, dim=2, control_graph="both")
        with pytest.raises(ValueError, match="backend='euler'"):
            DiffusionSampler(
                log_density=_gaussian_log_density, dim=2, control_graph="record", backend="torchsde"
            )

    def test_saved_and_loaded(self, tmp_path):
        sampler = _sampler(control_graph="recompute", mixed_precision="bfloat16", dtype=torch.float32)
        sampler.step(8)
        path = tmp_path / "s.pt"
        sampler.save(path)
        loaded = DiffusionSampler.load(path, log_density=_gaussian_log_density)
        assert loaded.control_graph == "recompute" and loaded.mixed_precision is torch.bfloat16


class TestMixedPrecision:
    def test_the_network_runs_in_bfloat16(self):
        """The controls differ from the float32 network's by bfloat16 rounding (8 bits): not 0, < 3 %."""
        full = _sampler(dtype=torch.float32)
        mixed = _sampler(dtype=torch.float32, mixed_precision=torch.bfloat16)
        mixed.control.load_state_dict(full.control.state_dict())
        tau, x = torch.tensor(0.3), torch.randn(64, 3)
        guide = full._guide(tau, x, create_graph=False)
        v_full, v_mixed = full._control_value(tau, x, guide), mixed._control_value(tau, x, guide)
        assert v_mixed.dtype == torch.float32
        rel = float(((v_mixed - v_full).norm() / v_full.norm()).detach())
        assert 1e-5 < rel < 3e-2

    @pytest.mark.filterwarnings("ignore:the log density is computed in torch.float32")
    @pytest.mark.parametrize("control_graph", ["record", "recompute"])
    def test_weights_stay_exact_for_the_simulated_chain(self, control_graph):
        """Paths simulated with the rounded control: the training weights are the chain's own (float64),
        and the estimate of Z is unbiased (mean of Z-hat / Z within 3 se of 1) for a standard normal
        target (DIS's zero network is then nearly optimal; its last layer is perturbed)."""
        torch.manual_seed(0)
        sampler = DiffusionSampler(
            log_density=lambda x: -0.5 * x.pow(2).sum(-1), dim=3, num_steps=8, hidden_dim=16, num_layers=2,
            precondition=None, dtype=torch.float32, mixed_precision="bfloat16", ema_decay=None,
            control_graph=control_graph,
        ).setup()
        torch.nn.init.normal_(sampler.control.body[-1][-1].weight, std=0.2)
        log_w, behaviour, _ = sampler._training_log_weights(64)
        assert log_w.dtype == D64 and behaviour.dtype == D64
        torch.testing.assert_close(log_w.detach(), behaviour, rtol=1e-5, atol=1e-4)
        torch.manual_seed(3)
        _, log_w = sampler.sample_unconstrained(20_000)
        ratio = torch.exp(log_w - 1.5 * math.log(2 * math.pi))
        mean, se = float(ratio.mean()), float(ratio.std() / math.sqrt(ratio.numel()))
        assert se < 0.01 and abs(mean - 1) < 3 * se, (mean, se)

    def test_training_decreases_the_loss(self):
        sampler = _sampler(dtype=torch.float32, mixed_precision="bfloat16", lr=1e-2)
        first = sampler.step(128).loss
        for _ in range(30):
            last = sampler.step(128).loss
        assert last < 0.5 * first

    def test_float64_target_warns(self):
        with pytest.warns(UserWarning, match="no effect on a float64"):
            DiffusionSampler(
                log_density=_gaussian_log_density, dim=2, precondition=None, dtype=D64,
                mixed_precision="bfloat16",
            ).setup()

    def test_bad_value(self):
        with pytest.raises(ValueError, match="mixed_precision"):
            DiffusionSampler(log_density=_gaussian_log_density, dim=2, mixed_precision="int8")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            DiffusionSampler(log_density=_gaussian_log_density, dim=2, mixed_precision=torch.float16)
