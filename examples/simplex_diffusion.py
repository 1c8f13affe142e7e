"""Diffusion on the probability simplex: train in x = additive-logistic^{-1}(y), sample in y.

Target: Dirichlet(alpha) on the 2-simplex. Two scores in x-space, one sampler in y-space
(:class:`~pyro_sde.scores.TransformedReverseSDE`, the reverse-time Ito lemma):

1. exact: the stationary Langevin diffusion of the pulled-back target, whose marginal score is
   ``grad_x sum_i alpha_i log y_i = alpha_{1:d} - sum(alpha) y_{1:d}`` at all times;
2. learned: a VP diffusion model trained by denoising score matching on pulled-back Dirichlet samples.

Prints the relative errors of the coordinate means / variances against the Dirichlet's, and KS p-values
against its Beta marginals. The KS test checks exact equality of laws: with 5000 samples it detects the
small bias of the Euler discretisation (800 steps) and of the learned score, so p-values of 1e-3 to 1e-2
are expected for the learned sampler; the moment errors are the accuracy figures, and they are checked.
Run: ``python examples/simplex_diffusion.py [--steps 3000] [--smoke]`` (about a minute on an idle 2-core
machine; ``--smoke``: 400 training steps and 2000 samples, for CI). Prints ``check ...: OK`` lines and
exits with status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
from scipy import stats
from torch import nn
from tqdm.auto import trange

from pyro_sde.nn import FourierTimeEmbedding
from pyro_sde.scores import (
    VPSDE,
    AdditiveLogisticTransform,
    LangevinSDE,
    TransformedReverseSDE,
    denoising_score_matching,
)

ALPHA = (2.0, 3.0, 4.0)


def dirichlet_x_score(alpha: torch.Tensor):
    """Exact score of the additive-logistic pull-back of Dirichlet(alpha): ``alpha_{1:d} - A y_{1:d}``."""
    al = AdditiveLogisticTransform()
    return lambda x: alpha[:-1] - alpha.sum() * al(x)[..., :-1]


def sample_exact(alpha: torch.Tensor, num_samples: int, *, T: float = 4.0, num_steps: int = 800):
    """Dirichlet samples from the reverse (= Langevin) dynamics run on the simplex, started at the mean."""
    score = dirichlet_x_score(alpha)
    sde = TransformedReverseSDE(LangevinSDE(score, T=T), lambda t, x: score(x), AdditiveLogisticTransform())
    y0 = (alpha / alpha.sum()).expand(num_samples, -1).clone()
    return sde.sample(y0, num_steps)


class ScoreNet(nn.Module):
    """``s(t, x) = -eps_hat(t, x) / sigma_t`` with an MLP ``eps_hat`` on ``[x, Fourier(t)]``."""

    def __init__(self, dim: int, vp: VPSDE, hidden: int = 128, num_frequencies: int = 16):
        super().__init__()
        self.vp = vp
        self.embed = FourierTimeEmbedding(num_frequencies, max_frequency=20.0)
        self.net = nn.Sequential(
            nn.Linear(dim + 2 * num_frequencies, hidden), nn.SiLU(),
            nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, dim),
        )

    def forward(self, t, x):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[:-1]).unsqueeze(-1)
        _, sigma = self.vp.marginal(t)
        return -self.net(torch.cat([x, self.embed(t / self.vp.T)], -1)) / sigma


def train_score(alpha, *, steps=3000, batch=512, lr=2e-3, t_min=1e-3, progress_bar=True):
    """Denoising score matching in x-space on pulled-back Dirichlet samples (VP forward process)."""
    vp = VPSDE(0.1, 10.0, T=1.0)
    net = ScoreNet(len(alpha) - 1, vp).to(alpha.dtype)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    al, target = AdditiveLogisticTransform(), torch.distributions.Dirichlet(alpha)
    losses = []
    for _ in trange(steps, disable=not progress_bar, desc="DSM"):
        x0 = al.inv(target.sample((batch,)))
        t = t_min + (vp.T - t_min) * torch.rand(batch, dtype=alpha.dtype)
        a, sigma = vp.marginal(t)
        loss = denoising_score_matching(net, x0, t, a, sigma)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.detach())
    return net, torch.stack(losses)


def sample_learned(net, num_samples, *, num_steps=500, t_end=1e-3):
    """Reverse the VP diffusion in y-space from ``y_T = phi(x_T)``, ``x_T ~ N(0, I)``."""
    vp = net.vp
    x_T = torch.randn(num_samples, 2, dtype=next(net.parameters()).dtype)
    al = AdditiveLogisticTransform()
    with torch.no_grad():
        return TransformedReverseSDE(vp, net, al).sample(al(x_T), num_steps, t_end=t_end)


def report(y, alpha):
    """Relative errors of each coordinate's mean and variance, and KS p-values against Beta marginals."""
    A = alpha.sum()
    mean, var = alpha / A, alpha * (A - alpha) / (A**2 * (A + 1))
    ok = torch.isfinite(y).all(-1)
    y = y[ok]
    ks = [
        stats.kstest(y[:, i].numpy(), stats.beta(a.item(), (A - a).item()).cdf).pvalue
        for i, a in enumerate(alpha)
    ]
    return {
        "mean_rel_err": ((y.mean(0) - mean) / mean).tolist(),
        "var_rel_err": ((y.var(0) - var) / var).tolist(),
        "ks_pvalue": ks,
        "num_invalid": int((~ok).sum()),
    }


def _within(result: dict, mean_tol: float, var_tol: float) -> bool:
    return max(map(abs, result["mean_rel_err"])) < mean_tol and max(map(abs, result["var_rel_err"])) < var_tol


def check(name: str, ok: bool, failures: list) -> None:
    print(f"check {name}: {'OK' if ok else 'FAILED'}")
    if not ok:
        failures.append(name)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="DSM training steps")
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--smoke", action="store_true", help="small budgets (CI): 400 steps, 2000 samples")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.samples = 400, 2000
    torch.manual_seed(0)
    alpha = torch.tensor(ALPHA, dtype=torch.float64)
    failures = []
    start = time.perf_counter()
    y = sample_exact(alpha, args.samples)
    exact = report(y, alpha)
    print(f"exact x-score, {time.perf_counter() - start:.1f} s:", exact)
    check("exact score: means within 3 %, variances within 15 %", _within(exact, 0.03, 0.15), failures)
    start = time.perf_counter()
    net, losses = train_score(alpha, steps=args.steps, progress_bar=not args.smoke)
    print(f"trained in {time.perf_counter() - start:.1f} s, final loss {losses[-100:].mean():.4f}")
    y = sample_learned(net, args.samples)
    learned = report(y, alpha)
    print("learned x-score:", learned)
    print("mean simplex point:", y.nanmean(0).tolist(), "target", (alpha / alpha.sum()).tolist())
    print("(KS p-values test exact equality of laws: small ones reflect the discretisation and score-fit "
          "bias that the moment errors quantify)")
    check("learned score: means within 5 %, variances within 30 %", _within(learned, 0.05, 0.3), failures)
    on_simplex = math.isclose(float(y[torch.isfinite(y).all(-1)].sum(-1).mean()), 1.0, rel_tol=1e-9)
    on_simplex = on_simplex and learned["num_invalid"] == 0
    check("samples on the simplex (coordinates sum to 1)", on_simplex, failures)
    if failures:
        sys.exit(f"failed checks: {failures}")


if __name__ == "__main__":
    main()
