"""Quickstart: sample a Pyro model's posterior with a learned diffusion and estimate its evidence.

The model is a Normal with unknown mean and precision under a Normal-Gamma prior, so the posterior
and the marginal likelihood log p(y) are known in closed form and printed next to the estimates.
Run: ``python examples/quickstart.py [--smoke]`` (about 15 s on an idle 2-core machine: the training stops
when the importance ESS has converged; ``--smoke``: fewer draws, about 10 s). Prints ``check ...: OK``
lines and exits with status 1 if a check fails.
"""

import argparse
import math
import sys
import time

import pyro
import pyro.distributions as dist
import torch

import pyro_sde
from pyro_sde.infer import DiffusionSampler

A0, B0, M0, K0 = 2.0, 2.0, 0.0, 0.5  # Normal-Gamma prior


def model(y):
    tau = pyro.sample("tau", dist.Gamma(A0, B0))  # precision, constrained to (0, inf)
    mu = pyro.sample("mu", dist.Normal(M0, 1.0 / torch.sqrt(K0 * tau)))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0 / torch.sqrt(tau)), obs=y)


def exact(y):
    """Posterior means and log evidence of the Normal-Gamma model."""
    n, ybar = y.shape[0], y.mean().item()
    kn, an = K0 + n, A0 + n / 2
    bn = B0 + 0.5 * ((y - ybar) ** 2).sum().item() + K0 * n * (ybar - M0) ** 2 / (2 * kn)
    log_z = (
        math.lgamma(an) - math.lgamma(A0) + A0 * math.log(B0) - an * math.log(bn)
        + 0.5 * math.log(K0 / kn) - 0.5 * n * math.log(2 * math.pi)
    )
    return {"mu": (K0 * M0 + n * ybar) / kn, "tau": an / bn}, log_z


def check(name: str, ok: bool, failures: list) -> None:
    print(f"check {name}: {'OK' if ok else 'FAILED'}")
    if not ok:
        failures.append(name)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small budgets (CI)")
    args = parser.parse_args(argv)
    pyro.set_rng_seed(0)
    y = 1.5 + 0.8 * torch.randn(20)
    num_samples = 4000 if args.smoke else 20_000

    sampler = DiffusionSampler(model, method="dis", loss="log_variance", num_steps=50)
    start = time.time()
    sampler.run(y, num_iterations=100 if args.smoke else 300, batch_size=256)
    print(f"trained in {time.time() - start:.0f} s\n")

    sampler.summary(num_samples=num_samples)
    log_z, stderr, lower_bound, ess = sampler.log_evidence()
    means, true_log_z = exact(y)
    print(f"\nlog evidence: {log_z:.4f} +- {stderr:.4f} (exact {true_log_z:.4f}); "
          f"ELBO-type bound {lower_bound:.4f}; normalised ESS {ess:.2f}")
    summary = sampler.get_summary()
    for name, value in means.items():
        print(f"posterior mean of {name}: {summary[name]['mean'].item():.4f} (exact {value:.4f})")
    pareto_k = sampler.diagnostics()["pareto_k"]
    print(f"Pareto k of the importance weights: {pareto_k:.2f}")
    failures = []
    check("log evidence within 4 standard errors + 0.02 of the exact value",
          abs(float(log_z) - true_log_z) < 4 * float(stderr) + 0.02, failures)
    check("posterior means within 2 % of the exact values",
          all(abs(summary[n]["mean"].item() - v) < 0.02 * abs(v) for n, v in means.items()), failures)
    check("Pareto k below 0.7 (the weights are reliable)", pareto_k < 0.7, failures)

    # Posterior samples work with the rest of Pyro and with ArviZ.
    samples = sampler.get_samples(1000)
    predictive = pyro.infer.Predictive(model, posterior_samples=samples)(y)
    print(f"posterior predictive mean of y: {predictive['y'].mean().item():.3f} (data {y.mean().item():.3f})")
    idata = pyro_sde.to_inference_data(sampler)  # about ESS resampled draws, log_likelihood, observed_data
    print(f"ArviZ posterior: {dict(idata.posterior.sizes)}; groups {list(idata.groups())}")
    if failures:
        sys.exit(f"failed checks: {failures}")


if __name__ == "__main__":
    main()
