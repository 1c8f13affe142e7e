"""Continuous-time guided proposals, time-changed grids and Richardson extrapolation
(:mod:`pyro_sde.sde.bridges`) against exact transition densities: multivariate OU with a non-symmetric
drift matrix (closed form), GBM (log-normal), CIR (scipy.stats.ncx2), at long (rate x gap >= 2) and short
gaps."""

import math

import pytest
import torch
from scipy import stats

from pyro_sde.infer.bridge import bridge_log_prob as reexported
from pyro_sde.sde import bridges
from pyro_sde.sde.bridges import bridge_log_prob, bridge_log_weights, coarsen_noise, substep_fractions
from pyro_sde.sde.distributions import DiscretelyObservedSDE
from pyro_sde.sde.models import CIR, SDE, GeometricBrownianMotion, OrnsteinUhlenbeck

D64 = torch.float64


def t64(x):
    return torch.tensor(x, dtype=D64)


def cir_log_prob(kappa, theta, sigma, u, v, T):
    c = 2 * kappa / (sigma**2 * (1 - math.exp(-kappa * T)))
    return stats.ncx2.logpdf(
        2 * c * v, 4 * kappa * theta / sigma**2, 2 * c * u * math.exp(-kappa * T)
    ) + math.log(2 * c)


def ou_2d(dtype=D64):
    """``dX = -B (X - mean) dt + G dW``, ``B`` non-symmetric (eigenvalues 1.2 +- 0.67i), ``G`` 2 x 3."""
    B = torch.tensor([[1.5, 0.8], [-0.6, 0.9]], dtype=dtype)
    G = torch.tensor([[0.7, 0.0, 0.2], [0.3, 0.5, 0.1]], dtype=dtype)
    mean = torch.tensor([0.3, -0.2], dtype=dtype)
    return OrnsteinUhlenbeck(drift_matrix=B, mean=mean, diffusion_matrix=G, dim=2)


class TestGuidedExactOnLinearSDEs:
    """The auxiliary of a linear SDE is the model, so ``G = 0``: ``log w = log p(v | u)`` for every path."""

    @pytest.mark.parametrize("grid", ["uniform", "time_change"])
    @pytest.mark.parametrize("gap", [0.1, 2.0])  # real part of the eigenvalues 1.2: 1.2 * 2 >= 2
    def test_multivariate_ou_non_symmetric_drift(self, grid, gap):
        sde = ou_2d()
        u, v = t64([[1.0, -0.5], [0.2, 0.1]]), t64([[-0.2, 0.4], [0.9, -1.3]])
        lw = bridge_log_weights(
            sde, 0.0, gap, u, v, proposal="guided", num_particles=64, num_substeps=5, substep_grid=grid
        )
        exact = sde.transition_log_prob(0.0, u, gap, v)
        assert lw.shape == (64, 2)
        assert (lw - exact).abs().max() < 1e-6
        assert lw.std(0).max() < 1e-10  # zero variance across particles

    @pytest.mark.parametrize("d", [1, 3])
    def test_diagonal_ou_and_its_gradient(self, d):
        theta, sigma = t64(2.0).requires_grad_(), t64(0.8).requires_grad_()
        sde = OrnsteinUhlenbeck(theta=theta, mean=0.3, sigma=sigma, dim=d)
        u, v = torch.ones(d, dtype=D64), -torch.ones(d, dtype=D64)
        est, lw = bridge_log_prob(sde, 0.0, 1.5, u, v, proposal="guided", num_particles=16, num_substeps=5)
        exact = sde.transition_log_prob(0.0, u, 1.5, v)
        assert abs(est.item() - exact.item()) < 1e-6 and lw.std() < 1e-10
        g_est, g_exact = torch.autograd.grad(est, (theta, sigma)), torch.autograd.grad(exact, (theta, sigma))
        for a, b in zip(g_est, g_exact):
            assert abs(a.item() - b.item()) < 1e-6

    def test_distribution_is_exact_and_follows_float32(self):
        times = torch.tensor([0.0, 0.7, 2.0, 2.5])
        sde = OrnsteinUhlenbeck(theta=torch.tensor(1.5), mean=0.0, sigma=torch.tensor(0.8))
        x = torch.tensor([[0.5], [-0.4], [1.1], [0.9]])
        lp = DiscretelyObservedSDE(sde, times, proposal="guided", num_particles=8, num_substeps=5).log_prob(x)
        exact = DiscretelyObservedSDE(sde, times, proposal="exact").log_prob(x)
        assert lp.dtype == torch.float32 and abs(lp.item() - exact.item()) < 1e-4

    def test_full_matrix_path_equals_the_diagonal_one(self):
        # GBM's own diagonal auxiliary vs the generic autograd linearisation (full matrices): same weights
        class FullAux(GeometricBrownianMotion):
            linear_auxiliary = SDE.linear_auxiliary

        args = (t64(0.1), t64(0.4))
        u, v = t64([1.0, 0.8]), t64([1.1, 0.9])
        noise = torch.randn(9, 16, 2, dtype=D64)
        for grid in ("uniform", "time_change"):
            kw = dict(proposal="guided", num_particles=16, num_substeps=10, noise=noise, substep_grid=grid)
            diag = bridge_log_weights(GeometricBrownianMotion(*args, dim=2), 0.0, 1.0, u, v, **kw)
            full = bridge_log_weights(FullAux(*args, dim=2), 0.0, 1.0, u, v, **kw)
            assert torch.allclose(diag, full, rtol=0, atol=1e-12)


class TestGridsAndRichardson:
    def test_time_change_grid(self):
        frac = substep_fractions(4, "time_change", dtype=D64)
        assert torch.allclose(frac, t64([0.0, 7 / 16, 12 / 16, 15 / 16, 1.0]))  # s (2 - s)
        assert torch.allclose(substep_fractions(4, dtype=D64), t64([0.0, 0.25, 0.5, 0.75, 1.0]))
        with pytest.raises(ValueError, match="substep_grid"):
            substep_fractions(4, "log")

    @pytest.mark.parametrize("grid", ["uniform", "time_change"])
    def test_coarse_noise_is_the_same_brownian_path(self, grid):
        # W at the coarse points = W at every other fine point: sum sqrt(D) xi = sum sqrt(d) n
        M = 5
        fine = substep_fractions(2 * M, grid, dtype=D64)
        noise = torch.randn(2 * M - 1, 3, dtype=D64)
        coarse = coarsen_noise(noise, fine)
        assert coarse.shape == (M - 1, 3)
        w_fine = ((fine[1:] - fine[:-1]).sqrt()[: 2 * M - 1, None] * noise).cumsum(0)[1::2]
        steps = fine[2::2] - fine[:-2:2]
        w_coarse = (steps.sqrt()[: M - 1, None] * coarse).cumsum(0)
        assert torch.allclose(w_fine[: M - 1], w_coarse, atol=1e-12)

    def test_richardson_combination_and_distribution(self):
        sde = CIR(t64(1.0), t64(1.0), t64(0.5))
        u, v = t64([[1.0], [0.8]]), t64([[1.2], [0.9]])
        M, N = 6, 32
        noise = torch.randn(2 * M - 1, N, 2, 1, dtype=D64)
        est, lw = bridge_log_prob(
            sde, 0.0, 1.0, u, v, proposal="mdb", num_particles=N, num_substeps=M, richardson=True, noise=noise
        )
        kw = dict(proposal="mdb", num_particles=N)
        fine = bridge_log_weights(sde, 0.0, 1.0, u, v, num_substeps=2 * M, noise=noise, **kw)
        coarse = bridge_log_weights(
            sde, 0.0, 1.0, u, v, num_substeps=M, noise=coarsen_noise(noise, substep_fractions(2 * M)), **kw
        )
        lme = lambda w: w.logsumexp(0) - math.log(N)  # noqa: E731
        assert torch.allclose(est, 2 * lme(fine) - lme(coarse), atol=1e-12) and torch.equal(lw, fine)
        times = t64([0.0, 1.0, 2.0])
        x = t64([[1.0], [1.2], [0.9]])
        d = DiscretelyObservedSDE(sde, times, num_particles=N, num_substeps=M, richardson=True, seed=0)
        assert d.log_prob(x).item() == d.log_prob(x).item()  # common random numbers
        assert d.diagnostics()["ess"].shape == (2,)
        assert reexported is bridge_log_prob
        with pytest.raises(ValueError, match="richardson"):
            DiscretelyObservedSDE(sde, times, proposal="euler", richardson=True)
        with pytest.raises(ValueError, match="richardson"):
            bridge_log_prob(sde, 0.0, 1.0, u, v, proposal="euler", richardson=True)
        with pytest.raises(ValueError, match="substep_grid"):
            DiscretelyObservedSDE(sde, times, substep_grid="log")


def _bias(sde, u, v, T, exact, *, proposal, M, N, R, richardson=False, grid="uniform"):
    """Mean error and its standard error of ``R`` independent estimates of ``log p(v | u)`` (batches of
    at most 80, to bound the memory of the noise)."""
    errs = []
    for r in range(0, R, 80):
        uu, vv = t64([u]).expand(min(80, R - r), 1), t64([v]).expand(min(80, R - r), 1)
        est, _ = bridge_log_prob(
            sde,
            0.0,
            T,
            uu,
            vv,
            proposal=proposal,
            num_particles=N,
            num_substeps=M,
            richardson=richardson,
            substep_grid=grid,
        )
        errs.append(est - exact)
    err = torch.cat(errs)
    return err.mean().item(), err.std().item() / math.sqrt(R)


NONLINEAR = {  # name: (sde, u, v, gap)
    "GBM short": (GeometricBrownianMotion(t64(0.1), t64(0.4)), 1.0, 1.1, 1.0),
    "GBM long": (GeometricBrownianMotion(t64(0.1), t64(0.4)), 1.0, 1.6, 3.0),
    "CIR short": (CIR(t64(1.0), t64(1.0), t64(0.5)), 1.0, 1.2, 0.5),
    "CIR long": (CIR(t64(2.0), t64(1.0), t64(0.5)), 1.0, 1.2, 1.0),  # kappa * gap = 2
    # Feller ratio 2 kappa theta / sigma^2 = 1.07, kappa * gap = 2.25
    "CIR Feller 1.07": (CIR(t64(1.5), t64(0.6), t64(1.3)), 0.6, 0.4, 1.5),
}


def _exact(name):
    sde, u, v, T = NONLINEAR[name]
    if isinstance(sde, CIR):
        return cir_log_prob(sde.kappa.item(), sde.theta.item(), sde.sigma.item(), u, v, T)
    return sde.transition_log_prob(0.0, t64([u]), T, t64([v])).item()


class TestNonlinearModels:
    """|bias| <= 0.005 nats per interval at M = 20 (within 3 standard errors) on GBM and CIR."""

    @pytest.mark.parametrize(
        "name, proposal",
        [
            ("GBM short", "mdb"),
            ("GBM long", "mdb"),
            ("CIR short", "mdb"),
            ("CIR long", "mdb"),
            ("CIR Feller 1.07", "guided"),
        ],  # near the Feller boundary mdb's weights are heavy-tailed
    )
    def test_richardson_at_m20(self, name, proposal):
        sde, u, v, T = NONLINEAR[name]
        torch.manual_seed(0)
        bias, se = _bias(sde, u, v, T, _exact(name), proposal=proposal, M=20, N=2048, R=240, richardson=True)
        assert se < 0.003, se  # the test has power
        assert abs(bias) < 0.005 + 3 * se, (bias, se)

    def test_guided_continuous_time_on_gbm_at_m20(self):
        sde, u, v, T = NONLINEAR["GBM short"]
        torch.manual_seed(0)
        bias, se = _bias(sde, u, v, T, _exact("GBM short"), proposal="guided", M=20, N=512, R=40)
        assert se < 0.005 and abs(bias) < 0.005 + 3 * se, (bias, se)

    @pytest.mark.parametrize("name", ["CIR short", "CIR long", "GBM long"])
    def test_guided_converges_on_a_finer_grid(self, name):
        # the continuous-time weight converges to log p: the error shrinks from M = 10 to M = 80
        sde, u, v, T = NONLINEAR[name]
        torch.manual_seed(1)
        exact = _exact(name)
        coarse, se_c = _bias(sde, u, v, T, exact, proposal="guided", M=10, N=256, R=20)
        fine, se_f = _bias(sde, u, v, T, exact, proposal="guided", M=80, N=256, R=20)
        assert abs(fine) < abs(coarse) / 2 + 3 * se_f, (coarse, fine, se_f)


class TestOrderOfTheEulerBias:
    """OU (theta = 2, sigma = 1, u = v = 0, gap 1): the Euler-ratio estimators' bias is O(1/M) (log-log
    slope ~ -1) and the Richardson combination's is O(1/M^2) (slope <= -1.5)."""

    sde = OrnsteinUhlenbeck(theta=t64(2.0), mean=0.0, sigma=t64(1.0))

    def biases(self, proposal, Ms, N, R, richardson=False):
        exact = self.sde.transition_log_prob(0.0, t64([0.0]), 1.0, t64([0.0])).item()
        return [
            _bias(self.sde, 0.0, 0.0, 1.0, exact, proposal=proposal, M=M, N=N, R=R, richardson=richardson)
            for M in Ms
        ]

    @staticmethod
    def slope(Ms, biases):
        x, y = torch.tensor(Ms, dtype=D64).log(), torch.tensor([abs(b) for b, _ in biases], dtype=D64).log()
        x = x - x.mean()
        return ((x * (y - y.mean())).sum() / (x * x).sum()).item()

    @pytest.mark.parametrize("proposal", ["forward", "mdb"])
    def test_first_order(self, proposal):
        torch.manual_seed(0)
        Ms = [4, 8, 16]
        b = self.biases(proposal, Ms, N=4096, R=32)
        assert all(se < 0.1 * abs(bias) for bias, se in b), b
        assert -1.25 < self.slope(Ms, b) < -0.75, b

    def test_richardson_removes_the_first_order(self):
        torch.manual_seed(0)
        Ms = [2, 4]
        plain = self.biases("mdb", Ms, N=4096, R=32)
        rich = self.biases("mdb", Ms, N=4096, R=256, richardson=True)
        assert all(se < 0.25 * abs(bias) for bias, se in rich), rich
        assert self.slope(Ms, rich) < -1.5, rich
        assert abs(rich[-1][0]) < abs(plain[-1][0]) / 5, (plain, rich)


def test_module_layout_imports_one_way():
    # sde/ never imports infer/ (the distribution and its proposals live under sde/)
    import ast
    import inspect

    for module in (bridges, __import__("pyro_sde.sde.distributions", fromlist=["x"])):
        tree = ast.parse(inspect.getsource(module))
        names = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        assert not any("infer" in name for name in names), names


@pytest.mark.parametrize("grid", ["uniform", "time_change"])
def test_guided_parameter_batch_shares_the_noise_and_is_differentiable(grid):
    # member i of a batched log_prob equals the unbatched one at parameter i (common random numbers)
    times = t64([0.0, 0.5, 1.5, 2.0])
    x = t64([[1.0], [1.3], [0.8], [0.9]])
    kappas = t64([0.5, 1.0, 2.0]).requires_grad_()

    def lp(kappa):
        sde = CIR(kappa, t64(1.0), t64(0.5))
        d = DiscretelyObservedSDE(
            sde, times, proposal="guided", num_particles=8, num_substeps=6, substep_grid=grid, seed=0
        )
        return d.log_prob(x)

    batched = lp(kappas)
    single = torch.stack([lp(k) for k in kappas])
    assert batched.shape == (3,) and torch.allclose(batched, single, rtol=0, atol=1e-10)
    (grad,) = torch.autograd.grad(batched.sum(), kappas)
    eps = 1e-5
    numeric = (lp(kappas.detach() + eps) - lp(kappas.detach() - eps)) / (2 * eps)
    assert torch.allclose(grad, numeric, rtol=1e-5, atol=1e-6)


class TestLongGapRecovery:
    """200 OU intervals, theta = 1.5, sigma = 0.8, irregular gaps in [0.3, 1.3] (theta x gap up to 2): the
    L-BFGS MAP under the M = 20 likelihood is within 0.2 SE of the exact MLE (flat priors)."""

    @pytest.fixture(scope="class")
    @classmethod
    def problem(cls):
        gen = torch.Generator().manual_seed(1)
        gaps = 0.3 + torch.rand(200, generator=gen, dtype=D64)
        times = torch.cat([torch.zeros(1, dtype=D64), gaps.cumsum(0)])
        x = torch.zeros(201, 1, dtype=D64)
        for i in range(200):
            a = math.exp(-1.5 * gaps[i].item())
            x[i + 1] = a * x[i] + 0.8 * math.sqrt((1 - a * a) / 3.0) * torch.randn(
                1, generator=gen, dtype=D64
            )

        def nll(p):
            sde = OrnsteinUhlenbeck(theta=p[0], mean=0.0, sigma=p[1])
            return -DiscretelyObservedSDE(sde, times, proposal="exact").log_prob(x)

        log_p = torch.zeros(2, dtype=D64, requires_grad=True)
        opt = torch.optim.LBFGS([log_p], max_iter=100, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = nll(log_p.exp())
            loss.backward()
            return loss

        opt.step(closure)
        mle = log_p.detach().exp()
        se = torch.linalg.cholesky(torch.autograd.functional.hessian(nll, mle)).cholesky_inverse()
        return times, x, mle, se.diagonal().sqrt()

    @pytest.mark.parametrize("proposal, N, richardson", [("guided", 16, False), ("mdb", 64, True)])
    def test_map_within_0p2_se(self, problem, proposal, N, richardson):
        import pyro
        import pyro.distributions as dist
        from torch.distributions import constraints

        from pyro_sde.infer import lbfgs_map

        times, x, mle, se = problem
        flat = dist.ImproperUniform(constraints.positive, (), ())

        def model():
            sde = OrnsteinUhlenbeck(
                theta=pyro.sample("theta", flat), mean=0.0, sigma=pyro.sample("sigma", flat)
            )
            obs = DiscretelyObservedSDE(
                sde, times, proposal=proposal, num_particles=N, num_substeps=20, richardson=richardson, seed=0
            )
            pyro.sample("obs", obs, obs=x)

        point = lbfgs_map(model, init_values={"theta": t64(1.0), "sigma": t64(1.0)})
        z = (torch.stack([point["theta"], point["sigma"]]) - mle) / se
        assert (z.abs() < 0.2).all(), z


@pytest.mark.parametrize("proposal", ["guided", "mdb"])
def test_state_dependent_general_noise_is_differentiable(proposal):
    # Kunita flow: L from a QR of g^T at every substep; the gradient flows through it (finite differences)
    from pyro_sde.sde.models import KunitaFlow

    gen = torch.Generator().manual_seed(0)
    u = torch.randn(6, generator=gen, dtype=D64)
    v = u + 0.1 * torch.randn(6, generator=gen, dtype=D64)
    noise = torch.randn(9, 16, 6, generator=gen, dtype=D64)

    def est(sigma):
        sde = KunitaFlow(3, sigma, gamma=1.0)
        kw = dict(proposal=proposal, num_particles=16, num_substeps=10, noise=noise)
        return bridge_log_prob(sde, 0.0, 1.0, u, v, **kw)[0]

    sigma = t64(0.3).requires_grad_()
    (grad,) = torch.autograd.grad(est(sigma), sigma)
    numeric = (est(t64(0.3 + 1e-6)) - est(t64(0.3 - 1e-6))) / 2e-6
    assert torch.isfinite(grad) and abs(grad.item() - numeric.item()) < 1e-5 * (1 + abs(numeric.item()))


class TestCIRTransitionDensity:
    """``CIR.transition_log_prob`` (Bessel series in log space) against ``scipy.stats.ncx2``."""

    @pytest.mark.parametrize(
        "kappa, theta, sigma, u, v, gap",
        [
            (1.0, 1.0, 0.5, 1.0, 1.2, 1.0),
            (1.0, 1.0, 0.5, 1.0, 2.0, 1.0),
            (2.0, 1.0, 0.5, 1.0, 1.2, 1.0),  # kappa x gap = 2
            (1.5, 0.6, 1.3, 0.6, 0.4, 1.5),  # Feller ratio 1.07
            (0.5, 0.1, 1.0, 0.05, 0.01, 2.0),  # Feller ratio 0.1
            (5.0, 2.0, 0.3, 2.0, 2.1, 0.05),  # short gap: Bessel argument ~ 4000
        ],
    )
    def test_matches_scipy(self, kappa, theta, sigma, u, v, gap):
        sde = CIR(t64(kappa), t64(theta), t64(sigma))
        got = sde.transition_log_prob(0.0, t64([u]), gap, t64([v])).item()
        assert got == pytest.approx(cir_log_prob(kappa, theta, sigma, u, v, gap), abs=1e-9)

    def test_short_gap_uses_the_large_argument_expansion(self):
        # sigma 0.1, gap 1e-3: c ~ 2e5, Bessel argument ~ 4e5 (Hankel branch); reference from scipy's ive
        from scipy import special

        kappa, theta, sigma, u, v, gap = 1.0, 1.0, 0.1, 1.0, 1.003, 1e-3
        c = 2 * kappa / (sigma**2 * -math.expm1(-kappa * gap))
        uu, ww, q = c * u * math.exp(-kappa * gap), c * v, 2 * kappa * theta / sigma**2 - 1
        z = 2 * math.sqrt(uu * ww)
        ref = math.log(c) - uu - ww + 0.5 * q * math.log(ww / uu) + math.log(special.ive(q, z)) + z
        sde = CIR(t64(kappa), t64(theta), t64(sigma))
        got = sde.transition_log_prob(0.0, t64([u]), gap, t64([v])).item()
        assert got == pytest.approx(ref, abs=1e-8)

    def test_batch_gradient_support_and_distribution(self):
        kappa = t64([0.5, 2.0]).requires_grad_()
        sde = CIR(kappa, t64(1.0), t64(0.5))
        x0, x1 = t64([[1.0], [0.8]]), t64([[1.2], [0.9]])
        lp = sde.transition_log_prob(0.0, x0, 1.5, x1)
        assert lp.shape == (2,)
        (grad,) = torch.autograd.grad(lp.sum(), kappa)
        eps = 1e-6
        for i, k in enumerate((0.5, 2.0)):
            fd = (
                cir_log_prob(k + eps, 1, 0.5, x0[i, 0].item(), x1[i, 0].item(), 1.5)
                - cir_log_prob(k - eps, 1, 0.5, x0[i, 0].item(), x1[i, 0].item(), 1.5)
            ) / (2 * eps)
            assert grad[i].item() == pytest.approx(fd, abs=1e-6)
        assert sde.transition_log_prob(0.0, x0, 1.0, -x1).eq(-math.inf).all()
        times, x = t64([0.0, 0.5, 2.0]), t64([[1.0], [1.2], [0.7]])
        one = CIR(t64(2.0), t64(1.0), t64(0.5))
        lp = DiscretelyObservedSDE(one, times, proposal="exact").log_prob(x)
        ref = cir_log_prob(2, 1, 0.5, 1.0, 1.2, 0.5) + cir_log_prob(2, 1, 0.5, 1.2, 0.7, 1.5)
        assert lp.item() == pytest.approx(ref, abs=1e-9)
