"""Posterior over the parameters of a stochastic Lotka-Volterra model (no closed-form likelihood) with SMC.

Simulates predators and prey ``dX1 = X1 (alpha - beta X2) dt + sigma X1 dW1``,
``dX2 = X2 (delta X1 - gamma) dt + sigma X2 dW2`` observed without noise at 21 unit-spaced times (a gap of
one time unit is a sixth of a cycle: the populations move by factors of 2-4 between observations), then
samples the posterior of ``(alpha, beta, gamma, delta, sigma)`` with :class:`~pyro_sde.infer.SMCSampler` on a
Pyro model whose likelihood is :class:`~pyro_sde.sde.DiscretelyObservedSDE` in log space (guided bridges
with Euler-ratio weights, so ``E[likelihood]`` is the ``num_substeps``-step Euler likelihood; fixed common
random numbers, a deterministic density for the sampler's gradient moves). Prints the posterior table,
the bridge diagnostics at the posterior mean and ArviZ's summary.

``benchmarks/lotka_volterra.py`` checks this posterior against a long NUTS run over the parameters and the
latent Euler paths (data augmentation); see the "Worked example" section of ``docs/bridges.md``.

Run: ``python examples/stochastic_lotka_volterra.py [--particles 512] [--plot posterior.png] [--smoke]``
(``--smoke``: 10 intervals and fewer particles, for CI). Prints ``check ...: OK`` lines and exits with
status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import sys

import arviz as az
import pyro
import pyro.distributions as dist
import torch

from pyro_sde.diagnostics import to_inference_data
from pyro_sde.infer import SMCSampler
from pyro_sde.sde import DiscretelyObservedSDE, StochasticLotkaVolterra

D64 = torch.float64
TRUTH = {"alpha": 1.0, "beta": 0.5, "gamma": 1.0, "delta": 0.5, "sigma": 0.25}
PARAMS = tuple(TRUTH)
#: log-normal priors ``(loc, scale)`` of ``log theta``: rates around 1 within a factor e, sigma around 0.22
PRIORS = {"alpha": (0.0, 1.0), "beta": (0.0, 1.0), "gamma": (0.0, 1.0), "delta": (0.0, 1.0),
          "sigma": (-1.5, 0.5)}
INITIAL = (3.0, 1.0)  # prey, predators at t = 0


def simulate(num_intervals: int = 20, gap: float = 1.0, seed: int = 1):
    """``(times (T,), log populations (T, 2))`` of one path of the true model (200 Euler substeps a gap)."""
    sde = StochasticLotkaVolterra(**{k: torch.tensor(v, dtype=D64) for k, v in TRUTH.items()})
    times = torch.arange(num_intervals + 1, dtype=D64) * gap
    x0 = torch.tensor(INITIAL, dtype=D64).log()
    pyro.set_rng_seed(seed)
    return times, DiscretelyObservedSDE(sde, times, initial=x0, num_substeps=200).sample()


def model(times, log_obs, *, proposal="guided_euler", num_particles=32, num_substeps=10, seed=0):
    """Log-normal priors on the five parameters; the observed log populations' bridge likelihood."""
    params = {
        k: pyro.sample(k, dist.LogNormal(torch.tensor(loc, dtype=D64), scale))
        for k, (loc, scale) in PRIORS.items()
    }
    likelihood = DiscretelyObservedSDE(
        StochasticLotkaVolterra(**params), times, proposal=proposal, num_particles=num_particles,
        num_substeps=num_substeps, seed=seed,
    )
    pyro.sample("obs", likelihood, obs=log_obs)


def fit(times, log_obs, *, smc_particles=512, bridge_particles=32, num_substeps=10, proposal="guided_euler",
        seed=0):
    """The :class:`SMCSampler` after its run on ``model``."""
    pyro.set_rng_seed(seed)
    # two MAP starts and a small importance check suffice for the preconditioner of a unimodal posterior
    smc = SMCSampler(model, num_particles=smc_particles,
                     precondition_options={"num_starts": 2, "num_draws": 256, "svi_steps": 50})
    return smc.run(times, log_obs, proposal=proposal, num_particles=bridge_particles,
                   num_substeps=num_substeps)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--intervals", type=int, default=20)
    parser.add_argument("--particles", type=int, default=512, help="SMC particles")
    parser.add_argument("--bridges", type=int, default=32, help="bridge particles per interval")
    parser.add_argument("--substeps", type=int, default=10, help="Euler substeps per interval")
    parser.add_argument("--plot", default=None, help="save an ArviZ posterior plot to this file")
    parser.add_argument("--smoke", action="store_true", help="small budget (CI): 10 intervals, 128 particles")
    args = parser.parse_args(argv)
    if args.smoke:
        args.intervals, args.particles, args.bridges = 10, 128, 16
    times, log_obs = simulate(args.intervals)
    smc = fit(times, log_obs, smc_particles=args.particles, bridge_particles=args.bridges,
              num_substeps=args.substeps)
    samples = smc.get_samples(4000)
    log_z = smc.log_evidence()
    print(f"SMC: {smc.num_temperatures[0]} temperatures, {smc.num_target_evaluations} target evaluations, "
          f"{smc.run_seconds:.1f} s; log evidence {log_z[0]:.2f} +- {log_z[1]:.2f}")
    print(f"{'':8s} {'truth':>7s} {'posterior mean':>15s} {'sd':>7s}")
    for name in PARAMS:
        s = samples[name]
        print(f"{name:8s} {TRUTH[name]:7.3f} {s.mean():15.3f} {s.std():7.3f}")
    with torch.no_grad():  # per-interval diagnostics of the bridge weights at the posterior mean
        sde = StochasticLotkaVolterra(**{k: samples[k].mean() for k in PARAMS})
        likelihood = DiscretelyObservedSDE(sde, times, proposal="guided_euler", num_particles=args.bridges,
                                           num_substeps=args.substeps, seed=0)
        likelihood.log_prob(log_obs)
        diag = likelihood.diagnostics()
    print(f"bridge weights over {diag['ess'].numel()} intervals: ESS min {diag['ess'].min():.2f}, "
          f"mean {diag['ess'].mean():.2f}")
    idata = to_inference_data(smc, log_likelihood=False)
    print(az.summary(idata, kind="stats"))
    failures = []
    for name in PARAMS:  # a posterior with the truth more than 3 sd away is a failed fit
        s = samples[name]
        z = (s.mean() - TRUTH[name]) / s.std()
        ok = bool(abs(z) < 3)
        print(f"check {name}: truth within 3 posterior sd ({float(z):+.2f}): {'OK' if ok else 'FAILED'}")
        if not ok:
            failures.append(name)
    ok = bool(diag["ess"].min() > 0.1)
    print(f"check bridges: every interval's bridge ESS above 0.1: {'OK' if ok else 'FAILED'}")
    if not ok:
        failures.append("bridges")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        axes = az.plot_posterior(idata, ref_val={k: [{"ref_val": v}] for k, v in TRUTH.items()})
        axes.ravel()[0].figure.savefig(args.plot)
    if failures:
        sys.exit(f"failed checks: {failures}")
    return smc, samples


if __name__ == "__main__":
    main()
