"""The Euler-Maruyama chain and its path log-ratio: exact identities of the discrete chain."""

import math

import pytest
import torch

from pyro_sde.sde import (
    BrownianReference,
    OUReference,
    VPReference,
    euler_maruyama,
    log_ratio_increment,
    path_log_prob,
    path_log_ratio,
    torchsde_euler,
)

D64 = torch.float64


def gaussian_log_rho(mu, var, log_z):
    d = mu.shape[-1]
    return lambda x: log_z - 0.5 * ((x - mu) ** 2).sum(-1) / var - 0.5 * d * math.log(2 * math.pi * var)


def log_weights(ref, path, log_rho):
    return log_rho(path.terminal) + ref.boundary_log_weight(path.initial, path.terminal) + path.log_ratio


class TestReference:
    def test_brownian_chain_has_exact_terminal_law(self):
        ref = BrownianReference(25, sigma=0.6, T=3.0)
        x0 = ref.sample_initial(200_000, 1, dtype=D64, device=None)
        path = euler_maruyama(ref, lambda k, t, x: torch.zeros_like(x), x0, store_path=False)
        assert path.terminal.var().item() == pytest.approx(0.36 * 3.0, rel=0.01)
        # the uncontrolled chain is the reference: its weight is rho / p_K exactly
        assert path.log_ratio.abs().max().item() < 1e-12

    def test_vp_coefficients(self):
        ref = VPReference(10, beta_min=0.1, beta_max=10.0)
        c = ref.coefficients()
        h = 0.1
        # step 0 is at generative time 0, i.e. diffusion time near T: beta averaged over s in [0.9, 1]
        beta0 = 0.1 + 9.9 * 0.95
        assert c.control_scale[0].item() == pytest.approx(beta0 * h)
        assert c.drift_scale[0].item() == pytest.approx(1 + 0.5 * beta0 * h)
        assert c.backward_scale[0].item() == pytest.approx(1 - 0.5 * beta0 * h)
        assert c.noise_std[0].item() == pytest.approx(math.sqrt(beta0 * h))
        assert c.times.shape == (11,)

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="num_steps"):
            BrownianReference(0)
        with pytest.raises(ValueError, match="num_steps"):
            VPReference(2.5)
        with pytest.raises(ValueError, match="T must be positive"):
            BrownianReference(10, T=-1.0)
        with pytest.raises(ValueError, match="too small"):
            VPReference(4, beta_max=10.0)
        with pytest.raises(ValueError, match="sigma"):
            BrownianReference(10, sigma=0.0)


class TestPathLogRatio:
    def test_pis_optimal_constant_control_gives_constant_weight(self):
        # rho = Z N(mu, sigma^2 T I): the constant control mu / (sigma^2 T) is the exact optimum.
        ref = BrownianReference(40, sigma=0.7, T=2.0)
        mu, log_z = torch.tensor([1.0, -2.0, 0.5], dtype=D64), 1.3
        var = ref.sigma**2 * ref.T
        x0 = ref.sample_initial(500, 3, dtype=D64, device=None)
        path = euler_maruyama(ref, lambda k, t, x: (mu / var).expand_as(x), x0)
        lw = log_weights(ref, path, gaussian_log_rho(mu, var, log_z))
        assert (lw - log_z).abs().max().item() < 1e-10
        assert path.terminal.mean(0).sub(mu).abs().max().item() < 0.15

    @pytest.mark.parametrize(
        "reference",
        [BrownianReference(20, sigma=1.0, T=1.5), VPReference(30), OUReference(12, sigma=1.3)],
        ids=str,
    )
    def test_weights_are_unbiased_for_any_control(self, reference):
        # E_P[w] = Z for an arbitrary (bad) control: the weights are exact for the discrete chain.
        mu, log_z = torch.tensor([0.5, -0.3], dtype=D64), 0.7
        log_rho = gaussian_log_rho(mu, 0.5, log_z)
        x0 = reference.sample_initial(400_000, 2, dtype=D64, device=None)
        # a poor control: half of the prior's score (VP) or a drift towards a wrong point (PIS)
        control = lambda k, t, x: -0.5 * x + 0.3 * torch.tanh(x) + 0.2  # noqa: E731
        path = euler_maruyama(reference, control, x0, store_path=False)
        w = (log_weights(reference, path, log_rho) - log_z).exp()
        stderr = w.std().item() / math.sqrt(w.numel())
        assert abs(w.mean().item() - 1) < 4 * stderr
        assert stderr < 0.05  # the test has power

    @pytest.mark.parametrize("reference", [BrownianReference(15), VPReference(15), OUReference(15)], ids=str)
    def test_batched_over_time_equals_loop(self, reference):
        control = lambda k, t, x: torch.sin(3 * x) * (1 + t)  # noqa: E731
        x0 = reference.sample_initial(64, 4, dtype=D64, device=None)
        path = euler_maruyama(reference, control, x0)
        again = path_log_ratio(reference, path.states, path.controls)
        assert torch.allclose(again, path.log_ratio, atol=1e-10)
        assert path.states.shape == (16, 64, 4) and path.controls.shape == (15, 64, 4)

    def test_increment_matches_gaussian_log_densities(self):
        # log N(x; b x', s^2) - log N(x'; a x + c v, s^2), computed from torch.distributions
        gen = torch.Generator().manual_seed(1)
        x, xn, v = (torch.randn(5, 3, generator=gen, dtype=D64) for _ in range(3))
        a, c, s, b = 1.1, 0.2, 0.3, 0.9
        N = torch.distributions.Normal
        fwd = N(a * x + c * v, s).log_prob(xn).sum(-1)
        back = N(b * xn, s).log_prob(x).sum(-1)
        ref = N(a * x, s).log_prob(xn).sum(-1)
        assert torch.allclose(log_ratio_increment("backward", a, c, s, b, x, xn, v), back - fwd)
        assert torch.allclose(log_ratio_increment("forward", a, c, s, None, x, xn, v), ref - fwd)

    def test_differentiable_path_carries_gradients(self):
        ref = BrownianReference(10)
        theta = torch.tensor(0.3, dtype=D64, requires_grad=True)
        x0 = ref.sample_initial(8, 2, dtype=D64, device=None)
        path = euler_maruyama(ref, lambda k, t, x: theta * x + theta, x0, differentiable=True)
        (path.terminal.sum() + path.log_ratio.sum()).backward()
        assert theta.grad is not None and theta.grad.abs() > 0

    def test_bad_inputs(self):
        ref = BrownianReference(5)
        with pytest.raises(ValueError, match="shape"):
            euler_maruyama(ref, lambda k, t, x: x, torch.zeros(3))
        with pytest.raises(TypeError, match="floating"):
            euler_maruyama(ref, lambda k, t, x: x, torch.zeros(3, 2, dtype=torch.long))
        with pytest.raises(ValueError, match="noise"):
            euler_maruyama(ref, lambda k, t, x: x, torch.zeros(3, 2), noise=torch.zeros(4, 3, 2))


class TestTorchsdeBackend:
    @pytest.mark.parametrize("num_steps", [6, 12])  # at 6 torchsde ends with a sliver of a 7th step
    def test_same_noise_same_path(self, num_steps):
        # torchsde's Euler on our grid reproduces our chain step for step (same Brownian increments).
        import torchsde
        K = num_steps
        ref = VPReference(K)
        x0 = torch.randn(16, 2, dtype=D64)
        bm = torchsde.BrownianInterval(0.0, ref.T, size=(16, 2), dtype=D64, dt=ref.T / K)
        times = ref.coefficients(D64).times
        noise = torch.stack([(bm(times[k], times[k + 1])) / math.sqrt(ref.T / K) for k in range(K)])
        control = lambda k, t, x: torch.cos(x) - t  # noqa: E731
        ours = euler_maruyama(ref, control, x0, noise=noise)
        theirs = torchsde_euler(ref, control, x0, bm=bm)
        assert torch.allclose(ours.states, theirs.states, atol=1e-10)
        assert torch.allclose(ours.log_ratio, theirs.log_ratio, atol=1e-8)

    @pytest.mark.parametrize("noise_scale, num_steps", [(1.0, 12), (1.7, 12), (1.0, 6)])
    def test_given_noise_gives_the_euler_paths(self, noise_scale, num_steps):
        ref = VPReference(num_steps)
        x0, noise = torch.randn(16, 2, dtype=D64), torch.randn(num_steps, 16, 2, dtype=D64)
        control = lambda k, t, x: torch.cos(x) - t  # noqa: E731
        ours = euler_maruyama(ref, control, x0, noise=noise, noise_scale=noise_scale)
        theirs = torchsde_euler(ref, control, x0, noise=noise, noise_scale=noise_scale)
        assert torch.allclose(ours.states, theirs.states, atol=1e-10)
        assert torch.allclose(ours.log_ratio, theirs.log_ratio, atol=1e-8)
        other = torchsde_euler(ref, control, x0, noise=torch.randn(num_steps, 16, 2, dtype=D64))
        assert not torch.allclose(ours.states[-1], other.states[-1], atol=1e-3)  # the noise is used

    def test_given_noise_in_float32_at_200_steps(self):  # the grid's times carry float32 rounding
        ref = VPReference(200)
        x0, noise = torch.randn(8, 2), torch.randn(200, 8, 2)
        control = lambda k, t, x: torch.cos(x) - t  # noqa: E731
        ours = euler_maruyama(ref, control, x0, noise=noise)
        theirs = torchsde_euler(ref, control, x0, noise=noise)
        assert torch.allclose(ours.states, theirs.states, atol=1e-4)
        assert torch.allclose(ours.log_ratio, theirs.log_ratio, atol=1e-3)

    def test_given_noise_bad_input(self):
        ref, x0 = VPReference(6), torch.zeros(3, 2, dtype=D64)
        with pytest.raises(ValueError, match="noise must have shape"):
            torchsde_euler(ref, lambda k, t, x: x, x0, noise=torch.zeros(7, 3, 2, dtype=D64))
        import torchsde
        bm = torchsde.BrownianInterval(0.0, ref.T, size=(3, 2), dtype=D64)
        with pytest.raises(ValueError, match="noise or bm"):
            torchsde_euler(ref, lambda k, t, x: x, x0, noise=torch.zeros(6, 3, 2, dtype=D64), bm=bm)


class TestOUReference:
    def test_exponential_integrator_preserves_the_stationary_law(self):
        ref = OUReference(7, sigma=1.7, beta_min=0.5, beta_max=30.0)  # big steps: still exact
        c = ref.coefficients()
        assert torch.allclose(c.drift_scale**2 * 1.7**2 + c.noise_std**2, torch.full((7,), 1.7**2, dtype=D64))
        x0 = ref.sample_initial(200_000, 1, dtype=D64, device=None)
        path = euler_maruyama(ref, lambda k, t, x: torch.zeros_like(x), x0, store_path=False)
        assert path.terminal.std().item() == pytest.approx(1.7, rel=0.01)
        assert path.log_ratio.abs().max().item() < 1e-12

    def test_optimal_control_leaves_only_the_initial_mismatch(self):
        # rho = Z N(mu, sigma^2 I): rho / p_ref = Z exp(mu.x / sigma^2 - |mu|^2 / 2 sigma^2) is log-linear,
        # so h_k(x) = E[rho/p_ref(X_K) / Z | X_k = x] = exp(A_k mu.x / sigma^2 - A_k^2 |mu|^2 / 2 sigma^2)
        # with A_k = prod_{j >= k} a_j, and the optimal kernel is N(a x + s^2 A_{k+1} mu / sigma^2, s^2).
        # Under it log w = log Z + log h_0(x_0) exactly: the start N(0, sigma^2) is not the optimal
        # initial law, a mismatch that vanishes as A_0 = exp(-int beta / 2) -> 0.
        ref = OUReference(20, sigma=1.5)
        mu, log_z, var = torch.tensor([1.0, -2.0], dtype=D64), -0.4, 1.5**2
        c = ref.coefficients()
        A = torch.flip(torch.cumprod(torch.flip(c.drift_scale, [0]), 0), [0])  # A_k, k = 0..K-1
        tail = torch.cat([A[1:], torch.ones(1, dtype=D64)])  # A_{k+1}
        v = (c.noise_std**2 * tail / (var * c.control_scale))[:, None] * mu  # (K, d)
        x0 = ref.sample_initial(1000, 2, dtype=D64, device=None)
        path = euler_maruyama(ref, lambda k, t, x: v[k].expand_as(x), x0)
        lw = log_weights(ref, path, gaussian_log_rho(mu, var, log_z))
        A0 = c.drift_scale.prod()
        log_h0 = A0 * (x0 @ mu) / var - 0.5 * A0**2 * mu.dot(mu) / var
        assert (lw - log_z - log_h0).abs().max().item() < 1e-10
        assert 0.05 < A0 < 0.1  # the default schedule: int beta = 5.05


class TestBridge:
    def test_zero_backward_control_is_dis(self):
        ref = VPReference(15)
        x0 = ref.sample_initial(64, 3, dtype=D64, device=None)
        path = euler_maruyama(ref, lambda k, t, x: torch.sin(x) - x, x0)
        zero = torch.zeros_like(path.controls)
        bridge = path_log_ratio(ref, path.states, path.controls, zero)
        assert torch.allclose(bridge, path.log_ratio, atol=1e-12)

    def test_weights_are_unbiased_for_any_pair_of_controls(self):
        ref = VPReference(12)
        mu, log_z = torch.tensor([0.5, -0.3], dtype=D64), 0.7
        log_rho = gaussian_log_rho(mu, 0.5, log_z)
        x0 = ref.sample_initial(400_000, 2, dtype=D64, device=None)
        path = euler_maruyama(ref, lambda k, t, x: -0.5 * x + 0.3 * torch.tanh(x), x0)
        u = 0.4 * torch.cos(path.states[1:]) - 0.2  # an arbitrary backward control
        lw = log_rho(path.terminal) + ref.boundary_log_weight(path.initial, path.terminal)
        w = (lw + path_log_ratio(ref, path.states, path.controls, u) - log_z).exp()
        stderr = w.std().item() / math.sqrt(w.numel())
        assert abs(w.mean().item() - 1) < 4 * stderr and stderr < 0.05

    def test_backward_control_needs_a_backward_reference(self):
        ref = BrownianReference(5)
        x0 = ref.sample_initial(4, 2, dtype=D64, device=None)
        path = euler_maruyama(ref, lambda k, t, x: x, x0)
        with pytest.raises(ValueError, match="backward"):
            path_log_ratio(ref, path.states, path.controls, torch.zeros_like(path.controls))


def test_path_log_prob_is_the_gaussian_transition_density():
    ref = OUReference(6, sigma=0.8)
    x0 = ref.sample_initial(10, 2, dtype=D64, device=None)
    path = euler_maruyama(ref, lambda k, t, x: torch.tanh(x), x0)
    c = ref.coefficients()
    expected = sum(
        torch.distributions.Normal(c.drift_scale[k] * path.states[k] + c.control_scale[k] * path.controls[k],
                                   c.noise_std[k]).log_prob(path.states[k + 1]).sum(-1)
        for k in range(6)
    )
    assert torch.allclose(path_log_prob(ref, path.states, path.controls), expected, atol=1e-10)
