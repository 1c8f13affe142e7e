"""The fast paths of DiffusionSampler: no host synchronisation in the simulation, the network's weight
gradient, the compiled control."""

import contextlib
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F

from pyro_sde.infer import DiffusionSampler
from pyro_sde.nn import ControlNetwork
from pyro_sde.nn.control import _RowsLinear

D64 = torch.float64


class HostSync(RuntimeError):
    """A tensor was read on the host (a device synchronisation on a GPU)."""


def _raiser(name):
    def method(self, *args, **kwargs):
        raise HostSync(f"Tensor.{name} in a region that must not synchronise")

    return method


def _getitem(original):
    def getitem(self, index):
        items = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items):
            raise HostSync("boolean-mask indexing (a data-dependent shape) must not happen here")
        return original(self, index)

    return getitem


@contextlib.contextmanager
def no_host_sync():
    """Emulate ``torch.cuda.set_sync_debug_mode("error")`` on CPU: every way of reading a tensor's
    values on the host (``item``, ``tolist``, ``bool``/``float``/``int``, ``numpy``, boolean masks,
    ``nonzero``) raises :class:`HostSync` inside the block."""
    patches = {name: _raiser(name) for name in (
        "item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero"
    )}
    patches["__getitem__"] = _getitem(torch.Tensor.__getitem__)
    saved = {name: torch.Tensor.__dict__.get(name) for name in patches}
    nonzero = torch.nonzero
    try:
        for name, fn in patches.items():
            setattr(torch.Tensor, name, fn)
        torch.nonzero = _raiser("torch.nonzero")
        yield
    finally:
        for name, fn in saved.items():
            if fn is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, fn)
        torch.nonzero = nonzero


def _gaussian_log_density(x):  # N(1, I) on R^d, unnormalised: a user function with no checks
    return -0.5 * (x - 1).pow(2).sum(-1)


def _sampler(method="dis", loss=None, dim=3, **kw):
    sampler = DiffusionSampler(
        log_density=_gaussian_log_density, dim=dim, method=method, loss=loss, num_steps=6, hidden_dim=16,
        num_layers=2, precondition=None, **kw,
    )
    return sampler.setup()


class TestNoHostSync:
    @pytest.mark.parametrize(
        "read",
        [
            lambda t: t.item(),
            lambda t: t.tolist(),
            lambda t: float(t),
            lambda t: bool(t > 0),
            lambda t: t[t > 0],
            lambda t: range(t.long()),
            lambda t: torch.nonzero(t),
        ],
    )
    def test_guard_catches_host_reads(self, read):
        t = torch.ones(())
        with no_host_sync(), pytest.raises(HostSync):
            read(t)
        read(t)  # restored afterwards

    def test_guard_catches_a_sync_in_the_control(self):
        sampler = _sampler()
        control = sampler.control

        class Syncing(torch.nn.Module):  # a control that reads a value in the step loop
            def __init__(self):
                super().__init__()
                self.net = control

            def forward(self, tau, x, guide):
                return self.net(tau, x, guide) * (1.0 if float(x.abs().max()) < 1e6 else 0.0)

        sampler.control = Syncing()
        with no_host_sync(), pytest.raises(HostSync):
            sampler._training_log_weights(8)

    @pytest.mark.parametrize(
        "method, loss",
        [("dis", "log_variance"), ("pis", "log_variance"), ("dds", "log_variance"), ("dis", "kl"),
         ("dds", "kl"), ("bridge", "rkl_ld"), ("dis", "rkl_ld")],
    )
    @pytest.mark.parametrize("control_graph", ["record", "recompute"])
    def test_training_simulation_and_loss_paths_do_not_synchronise(self, method, loss, control_graph):
        sampler = _sampler(method, loss, control_graph=control_graph)
        sampler.step(8)  # set-up outside the guard (coefficients cached, optimiser state)
        with no_host_sync():
            log_w, behaviour, log_forward = sampler._training_log_weights(8)
            log_w.sum().backward()  # the batched loss evaluation and its backward
        assert log_w.shape == (8,) and log_w.dtype == D64

    @pytest.mark.parametrize("method", ["dis", "pis", "bridge"])
    def test_sampling_simulation_does_not_synchronise(self, method, monkeypatch):
        sampler = _sampler(method)
        sampler.sample_unconstrained(2)  # the first simulation reads the reference's CPU grid once
        simulate = sampler._simulate

        def guarded(*args, **kwargs):
            with no_host_sync():
                return simulate(*args, **kwargs)

        monkeypatch.setattr(sampler, "_simulate", guarded)
        z, log_w = sampler.sample_unconstrained(10, chunk_size=4)  # three guarded simulations
        assert z.shape == (10, 3) and log_w.dtype == D64

    def test_mixed_precision_does_not_synchronise(self):
        sampler = _sampler(dtype=torch.float32, mixed_precision="bfloat16")
        sampler.step(8)
        with no_host_sync():
            sampler._training_log_weights(8)[0].sum().backward()

    def test_model_target_without_validation_does_not_synchronise(self):
        def model():
            pyro.sample("x", dist.Normal(torch.ones(2), 1.0).to_event(1))

        with pyro.validation_enabled(False):
            sampler = DiffusionSampler(model, num_steps=6, hidden_dim=16, num_layers=2, precondition=None)
            sampler.setup()
            sampler.step(8)
            with no_host_sync():
                sampler._training_log_weights(8)[0].sum().backward()

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    def test_cuda_step_loop_under_sync_debug_mode(self):
        sampler = DiffusionSampler(
            log_density=_gaussian_log_density, dim=3, num_steps=6, precondition=None, device="cuda"
        ).setup()
        sampler.step(64)
        torch.cuda.set_sync_debug_mode("error")
        try:
            sampler._training_log_weights(64)[0].sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


class TestClampFinite:
    def test_values_and_gradients_equal_nan_to_num_then_clamp(self):
        from pyro_sde._checks import clamp_finite

        x = torch.tensor([-5.0, -2.0, -0.5, 0.0, 1.5, 2.0, 7.0, math.inf, -math.inf, math.nan], dtype=D64)
        expected = torch.nan_to_num(x, nan=0.0, posinf=2.0, neginf=-2.0).clamp(-2.0, 2.0)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours = clamp_finite(a, 2.0)
        reference = torch.nan_to_num(b, nan=0.0, posinf=2.0, neginf=-2.0).clamp(-2.0, 2.0)
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
        probe = torch.arange(1.0, 11.0, dtype=D64)
        (ga,) = torch.autograd.grad((ours * probe).sum(), a)
        (gb,) = torch.autograd.grad((reference * probe).sum(), b)
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)
        assert ga.tolist() == [0, 2, 3, 4, 5, 6, 0, 0, 0, 0]

    def test_gradcheck_and_double_backward(self):
        from pyro_sde._checks import clamp_finite

        x = torch.tensor([-3.0, -0.7, 0.2, 1.1, 4.0], dtype=D64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda t: clamp_finite(t, 2.0), (x,))
        assert torch.autograd.gradgradcheck(lambda t: clamp_finite(t, 2.0) ** 2, (x,))


class TestRowsLinear:
    @pytest.mark.parametrize("d_in, d_out", [(2, 7), (7, 2), (3, 3)])
    def test_values_and_gradients_equal_f_linear(self, d_in, d_out):
        x = torch.randn(4, 5, d_in, dtype=D64, requires_grad=True)
        weight = torch.randn(d_out, d_in, dtype=D64, requires_grad=True)
        bias = torch.randn(d_out, dtype=D64, requires_grad=True)
        probe = torch.randn(4, 5, d_out, dtype=D64)
        ours = _RowsLinear.apply(x, weight, bias)
        expected = F.linear(x, weight, bias)
        torch.testing.assert_close(ours, expected, rtol=0, atol=0)
        grads = torch.autograd.grad((ours * probe).sum(), (x, weight, bias))
        expected_grads = torch.autograd.grad((expected * probe).sum(), (x, weight, bias))
        for g, e in zip(grads, expected_grads):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)

    def test_gradcheck_and_double_backward(self):
        x = torch.randn(6, 2, dtype=D64, requires_grad=True)
        weight = torch.randn(5, 2, dtype=D64, requires_grad=True)
        bias = torch.randn(5, dtype=D64, requires_grad=True)
        assert torch.autograd.gradcheck(_RowsLinear.apply, (x, weight, bias))
        assert torch.autograd.gradgradcheck(_RowsLinear.apply, (x, weight, bias))

    def test_network_gradients_equal_the_plain_layers(self):
        net = ControlNetwork(2, hidden_dim=8, num_layers=2).double()
        for p in net.parameters():  # non-zero last layer: every gradient is informative
            torch.nn.init.normal_(p)
        tau, x, guide = torch.rand(3, 4, 1, dtype=D64), torch.randn(3, 4, 2, dtype=D64), torch.randn(3, 4, 2)
        guide = guide.double()

        def plain(tau, x, guide):  # the same maths through nn.Linear modules
            hidden, scale = net.time_features(tau)
            return net.body(net.state_net(x) + hidden) + scale * guide

        grads = torch.autograd.grad(net(tau, x, guide).square().sum(), list(net.parameters()))
        expected = torch.autograd.grad(plain(tau, x, guide).square().sum(), list(net.parameters()))
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
        assert math.isfinite(sum(float(g.abs().sum()) for g in grads))


class TestChunkedNetwork:
    @pytest.mark.parametrize("tau_shape", ["grid", "scalar", "per_row"])
    def test_chunks_give_the_numbers_of_one_call(self, tau_shape):
        net = ControlNetwork(3, hidden_dim=8, num_layers=2).double()
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.5)
        x = torch.randn(7, 5, 3, dtype=D64, requires_grad=True)  # as on the reparametrised (KL) path
        guide = torch.randn(7, 5, 3, dtype=D64)
        taus = {"grid": torch.rand(7, 1, 1), "scalar": torch.tensor(0.3), "per_row": torch.rand(7, 5, 1)}
        tau = taus[tau_shape]
        outputs, grads = [], []
        for chunk_rows in (None, 10, 1):  # one call; slices of 2 steps; one step per slice
            net.chunk_rows = chunk_rows
            out = net(tau.double(), x, guide)
            outputs.append(out)
            grads.append(torch.autograd.grad(out.square().sum(), [x] + list(net.parameters())))
        for out, g in zip(outputs[1:], grads[1:]):
            torch.testing.assert_close(out, outputs[0], rtol=1e-13, atol=1e-13)
            for a, b in zip(g, grads[0]):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    def test_chunk_rows_is_checked(self):
        with pytest.raises(ValueError, match="chunk_rows"):
            ControlNetwork(2, chunk_rows=0)


class TestCompiledControl:
    @pytest.mark.slow  # torch.compile's tracing: ~10 s on 2 cores
    def test_compiled_state_branch_gives_the_eager_numbers(self):
        # the "aot_eager" backend traces the branch and its backward as torch.compile does, without
        # inductor's code generation (minutes on this machine; the benchmark checks inductor)
        net = ControlNetwork(2, hidden_dim=8, num_layers=2).double()
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.5)
        tau, x, guide = torch.rand(4, 1, 1, dtype=D64), torch.randn(4, 6, 2, dtype=D64), torch.randn(4, 6, 2)
        results = []
        for backend in (None, "aot_eager"):
            net.compiled = backend
            out = net(tau, x, guide.double())
            results.append((out, torch.autograd.grad(out.square().sum(), list(net.parameters()))))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-13, atol=1e-13)
        for a, b in zip(results[1][1], results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    def test_sampler_compile_flags_its_networks_and_checks_the_argument(self):
        sampler = _sampler(compile=True)
        sampler._control_fn(sampler.control, False)
        assert sampler.control.compiled == "inductor"
        assert _sampler().control.compiled is None
        with pytest.raises(TypeError, match="compile"):
            _sampler(compile="yes")
