"""Models a NUTS user brings, with the defaults: ``SMCSampler(model).run(*data)`` against Pyro's NUTS.

Four ordinary models written the way users write them, in float32 (torch's default dtype): a logistic
regression (9 parameters), a Poisson GLMM with 30 non-centred group effects (32), a varying-intercept
regression with 40 groups (44) and a two-component Gaussian mixture whose posterior has two mirror-image
modes (label switching, 3). Reference log Z: importance sampling with a multivariate-t fitted at the mode
(logistic, 4e6 draws, float64), quadrature (mixture, float64 grid) or the median of five 32768-particle
SMC runs (GLMM, varying intercepts; +- their median absolute deviation). NUTS: one chain, 500 warm-up
+ 500 draws, for its time (and moments, but for the mixture, where it sees one of the two modes).

    OMP_NUM_THREADS=1 python benchmarks/user_models.py --seeds 8 --write
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

from pyro_sde.diagnostics import UnreliableEstimateWarning  # noqa: E402
from pyro_sde.infer import SMCSampler  # noqa: E402

SECTION = "user-models"


def logistic(X, y):
    b0 = pyro.sample("b0", dist.Normal(0.0, 2.0))
    b = pyro.sample("b", dist.Normal(torch.zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("n", X.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=b0[..., None] + (X @ b[..., None])[..., 0]), obs=y)


def poisson_glmm(group, y):
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("groups", 30):
        effect = pyro.sample("effect", dist.Normal(0.0, 1.0))
    with pyro.plate("n", group.shape[0]):
        pyro.sample("y", dist.Poisson((mu[..., None] + sigma[..., None] * effect[..., group]).exp()), obs=y)


def varying_intercepts(group, x, y):
    mu_a = pyro.sample("mu_a", dist.Normal(0.0, 5.0))
    sigma_a = pyro.sample("sigma_a", dist.HalfNormal(2.0))
    b = pyro.sample("b", dist.Normal(0.0, 2.0))
    sigma_y = pyro.sample("sigma_y", dist.HalfNormal(2.0))
    with pyro.plate("groups", 40):
        a_raw = pyro.sample("a_raw", dist.Normal(0.0, 1.0))
    a = mu_a[..., None] + sigma_a[..., None] * a_raw
    with pyro.plate("n", x.shape[0]):
        pyro.sample("y", dist.Normal(a[..., group] + b[..., None] * x, sigma_y[..., None]), obs=y)


def mixture(y):
    loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 3.0).to_event(1))
    scale = pyro.sample("scale", dist.HalfNormal(2.0))
    components = dist.Normal(loc[..., None, :], scale[..., None, None]).log_prob(y[:, None])
    pyro.factor("y", (components.logsumexp(-1) - math.log(2)).sum(-1))


def data():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(200, 8, generator=gen)
    slopes = 0.7 * torch.randn(8, generator=gen)
    y_logistic = torch.bernoulli(torch.sigmoid(0.3 + X @ slopes), generator=gen)
    group = torch.arange(30).repeat_interleave(4)
    y_glmm = torch.poisson((0.5 + 0.5 * torch.randn(30, generator=gen))[group].exp(), generator=gen)
    g40 = torch.arange(40).repeat_interleave(5)
    x40 = torch.randn(200, generator=gen)
    y40 = (1 + 0.7 * torch.randn(40, generator=gen))[g40] - 0.6 * x40 + 0.8 * torch.randn(200, generator=gen)
    y_mix = torch.cat([torch.randn(40, generator=gen) - 2, torch.randn(40, generator=gen) + 2])
    return {
        "logistic regression": (logistic, (X, y_logistic)),
        "Poisson GLMM": (poisson_glmm, (group, y_glmm)),
        "varying intercepts": (varying_intercepts, (g40, x40, y40)),
        "two-component mixture": (mixture, (y_mix,)),
    }


def logistic_log_z(X, y, draws=400_000, repeats=10) -> tuple[float, float]:
    X, y = X.double(), y.double()

    def log_joint(t):
        lp = dist.Normal(0.0, 2.0).log_prob(t[:, 0]) + dist.Normal(0.0, 1.0).log_prob(t[:, 1:]).sum(-1)
        return lp + dist.Bernoulli(logits=t[:, :1] + t[:, 1:] @ X.T).log_prob(y).sum(-1)

    t = torch.zeros(1, X.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([t], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -log_joint(t).sum()
        loss.backward()
        return loss

    opt.step(closure)
    mode = t.detach()[0]
    cov = torch.linalg.inv(torch.autograd.functional.hessian(lambda v: -log_joint(v[None])[0], mode))
    proposal = dist.MultivariateStudentT(5.0, mode, scale_tril=torch.linalg.cholesky(1.2 * cov))
    est = []
    for _ in range(repeats):
        s = proposal.sample((draws,))
        log_w = log_joint(s) - proposal.log_prob(s)
        est.append(float(log_w.logsumexp(0)) - math.log(draws))
    return statistics.mean(est), statistics.stdev(est) / math.sqrt(repeats)


def mixture_log_z(y) -> tuple[float, float]:
    y = y.double()
    loc = torch.linspace(-5, 5, 401, dtype=torch.float64)
    scales = torch.linspace(0.3, 3.0, 271, dtype=torch.float64)
    prior = dist.Normal(0.0, 3.0).log_prob(loc)
    total = []
    for scale in scales:  # a (loc1, loc2) grid per scale
        comp = dist.Normal(loc[:, None], scale).log_prob(y)
        ll = (torch.logaddexp(comp[:, None], comp[None]) - math.log(2)).sum(-1)
        lp = ll + prior[:, None] + prior[None, :] + dist.HalfNormal(2.0).log_prob(scale)
        total.append(lp.logsumexp((0, 1)))
    step = 2 * math.log(float(loc[1] - loc[0])) + math.log(float(scales[1] - scales[0]))
    return float(torch.stack(total).logsumexp(0)) + step, 0.0


def smc_log_z(model, args, seeds=range(1000, 1005), num_particles=32768) -> tuple[float, float]:
    """The median of independent SMC runs (one run in a few has a heavy-tailed error) and the median
    absolute deviation from it."""
    values = []
    for seed in seeds:
        pyro.set_rng_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            smc = SMCSampler(model, num_particles=num_particles).run(*args)
            values.append(float(smc.log_evidence().log_z))
    centre = statistics.median(values)
    return centre, statistics.median(abs(v - centre) for v in values)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name, (model, model_args) in data().items():
        torch.manual_seed(0)  # the reference's draws
        start = time.perf_counter()
        if name == "logistic regression":
            ref, ref_se = logistic_log_z(*model_args)
        elif name == "two-component mixture":
            ref, ref_se = mixture_log_z(*model_args)
        else:
            ref, ref_se = smc_log_z(model, model_args)
        ref_seconds = time.perf_counter() - start
        pyro.set_rng_seed(0)
        start = time.perf_counter()
        mcmc = MCMC(NUTS(model), num_samples=500, warmup_steps=500, disable_progbar=True)
        mcmc.run(*model_args)
        nuts_seconds = time.perf_counter() - start
        nuts = mcmc.get_samples()
        errors, zs, seconds, warned, moment = [], [], [], 0, []
        for seed in range(args.seeds):
            pyro.set_rng_seed(seed)
            start = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                smc = SMCSampler(model).run(*model_args)
                ev = smc.log_evidence()
                draws = smc.get_samples(2000)
            seconds.append(time.perf_counter() - start)
            warned += any(issubclass(w.category, UnreliableEstimateWarning) for w in caught)
            errors.append(float(ev.log_z) - ref)
            zs.append(errors[-1] / float(ev.stderr))
            worst = 0.0
            for site, v in nuts.items():
                v = v.reshape(v.shape[0], -1)
                s = draws[site].reshape(draws[site].shape[0], -1)
                worst = max(worst, float(((s.mean(0) - v.mean(0)).abs() / v.std(0)).max()))
            moment.append(worst)
        rmse = math.sqrt(statistics.mean(e * e for e in errors))
        row = [name, smc.potential.dim, f"{ref:.4f} +- {ref_se:.4f}", args.seeds, rmse,
               statistics.mean(z * z for z in zs), sum(abs(z) > 3 for z in zs), warned,
               statistics.median(moment), statistics.median(seconds), nuts_seconds,
               nuts_seconds / statistics.median(seconds)]
        rows.append(row)
        print(row, f"(reference {ref_seconds:.0f} s)", flush=True)
    header = ["model", "dim", "reference log Z", "seeds", "RMSE", "mean (err / se)^2", "beyond 3 se",
              "warned", "median max abs dmean / NUTS sd", "SMC s (median)", "NUTS s", "NUTS s / SMC s"]
    table = _report.markdown_table(header, rows)
    print(table)
    if args.write:
        cmd = "python benchmarks/user_models.py " + " ".join(argv if argv is not None else sys.argv[1:])
        body = "\n".join([
            "## Models a NUTS user brings: `SMCSampler` with the defaults (`benchmarks/user_models.py`)",
            "",
            f"Written by `OMP_NUM_THREADS=1 {cmd}` (2026-12-03). Machine: {_report.machine()}. "
            + __doc__.split("\n\n")[1].replace("\n", " ")
            + " `max abs dmean / NUTS sd`: the largest standardised difference of a posterior mean between "
            "SMC's resampled draws and NUTS's (Monte Carlo noise of both included; for the mixture NUTS "
            "sees one mode, so it is large there by design).",
            "",
            table,
        ])
        _report.write_section(SECTION, body)


if __name__ == "__main__":
    main()
