"""Stochastic Lotka-Volterra: the SMC posterior of ``examples/stochastic_lotka_volterra.py`` against NUTS.

Ground truth: NUTS (Pyro) on the joint posterior of the five log parameters and the latent Euler path between
the observations (data augmentation, ``M`` substeps a gap): ``p(theta) prod_i prod_m N(x_{m+1}; x_m +
delta f(x_m), delta sigma^2 I)`` with ``x_0 = y_i``, ``x_M = y_{i+1}``. The latent states are parametrised
by the modified diffusion bridge's standard normals ``z`` (non-centred: ``x_{m+1} = x_m + (y_{i+1} - x_m) /
(M - m) + sigma sqrt(delta (M - m - 1) / (M - m)) z_m``, Jacobian in closed form), so the chain mixes over
``sigma``. Its ``theta``-marginal is the posterior under the ``M``-step Euler likelihood, which is what
:class:`~pyro_sde.sde.DiscretelyObservedSDE` with ``proposal="guided_euler"`` estimates without bias: the
two posteriors agree up to Monte Carlo error and the effect of fixing the likelihood's random numbers.
A second SMC run with ``proposal="guided"`` (continuous-time weight, ``2 M`` substeps) shows how far the
Euler posterior is from the SDE's own.

Writes the table into the "Worked example" section of ``docs/bridges.md`` and the ArviZ density plot
``docs/img/lotka_volterra_posterior.png``.

Run: ``OMP_NUM_THREADS=1 python benchmarks/lotka_volterra.py [--chains 4 --warmup 300 --samples 1500]``
(``--quick``: short chains, no files written).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyro
import torch
from pyro.infer import MCMC, NUTS
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "examples"))
from _report import machine, markdown_table  # noqa: E402
from stochastic_lotka_volterra import PARAMS, PRIORS, TRUTH, fit, simulate  # noqa: E402

from pyro_sde.diagnostics import to_inference_data  # noqa: E402
from pyro_sde.sde import StochasticLotkaVolterra  # noqa: E402

D64 = torch.float64
DOC = ROOT / "docs" / "bridges.md"
IMG = ROOT / "docs" / "img" / "lotka_volterra_posterior.png"
BEGIN, END = "<!-- lotka-volterra table: written by benchmarks/lotka_volterra.py -->", "<!-- end of table -->"


def bridge_noise_map(gaps, num_substeps):
    """``W`` ``(T-1, M-1, M-1)``: the modified diffusion bridge's deviation from the straight line is
    ``x_k - (u + k (v - u) / M) = sigma sum_{j<k} W_{k-1, j} z_j`` (``z`` standard normal), unrolling
    ``x_{m+1} = x_m + (v - x_m) / (M - m) + sigma sqrt(delta (M - m - 1) / (M - m)) z_m``:
    ``W_{k-1, j} = (M - k) / (M - j - 1) sqrt(delta (M - j - 1) / (M - j))`` for ``j < k``."""
    M = num_substeps
    k = torch.arange(1, M, dtype=D64).view(-1, 1)
    j = torch.arange(M - 1, dtype=D64).view(1, -1)
    shape = (M - k) / (M - j - 1) * ((M - j - 1) / (M - j)).sqrt() * (j < k)
    return (gaps / M).sqrt().view(-1, 1, 1) * shape


def augmented_potential(times, log_obs, num_substeps):
    """``-log p(theta, z | y)`` of the data-augmentation posterior, shape ``(...)``, at ``{"theta": (..., 5),
    "z": (..., T-1, M-1, 2)}`` (log parameters, bridge noise); vectorised over substeps."""
    M = num_substeps
    gaps = times[1:] - times[:-1]
    delta = (gaps / M).view(-1, 1, 1)  # (T-1, 1, 1) against (..., T-1, M, 2)
    u, v = log_obs[:-1].unsqueeze(-2), log_obs[1:].unsqueeze(-2)  # (T-1, 1, 2)
    line = u + (v - u) * torch.linspace(0, 1, M + 1, dtype=D64).view(-1, 1)  # (T-1, M+1, 2)
    W = bridge_noise_map(gaps, M)
    log_det_W = 2 * W.diagonal(dim1=-2, dim2=-1).log().sum()  # both coordinates
    prior = torch.distributions.Normal(torch.tensor([PRIORS[k][0] for k in PARAMS], dtype=D64),
                                       torch.tensor([PRIORS[k][1] for k in PARAMS], dtype=D64))
    num_steps = M * gaps.numel()
    const = -num_steps * (math.log(2 * math.pi) + delta.log().mean())  # of the Gaussian densities, 2 coords

    def potential(params):
        log_theta, z = params["theta"], params["z"]
        with pyro.validation_enabled(False):  # no per-call checks of the parameters
            sde = StochasticLotkaVolterra(
                **{k: t[..., None, None] for k, t in zip(PARAMS, log_theta.exp().unbind(-1))}
            )
        sigma = sde.sigma.unsqueeze(-1)  # (..., 1, 1, 1)
        deviation = sigma * (W @ z)  # (..., T-1, M-1, 2)
        pad = deviation.new_zeros(deviation.shape[:-2] + (1, 2))
        x = line + torch.cat([pad, deviation, pad], -2)  # (..., T-1, M+1, 2): u, the latents, v
        mean = x[..., :-1, :] + delta * sde.f(None, x[..., :-1, :])
        r = (x[..., 1:, :] - mean) / (sigma * delta.sqrt())
        log_sigma = sde.sigma.log().reshape(log_theta.shape[:-1])
        log_lik = -0.5 * (r * r).sum((-3, -2, -1)) - 2 * num_steps * log_sigma
        log_jacobian = 2 * (M - 1) * gaps.numel() * log_sigma + log_det_W
        return -(prior.log_prob(log_theta).sum(-1) + log_lik + log_jacobian + const)

    return potential


def run_nuts(times, log_obs, num_substeps, *, num_chains, warmup, samples, seed=0):
    """``(log theta draws (chains, samples, 5), seconds, per-chain info)`` from sequential NUTS chains."""
    potential = augmented_potential(times, log_obs, num_substeps)
    truth = torch.tensor([TRUTH[k] for k in PARAMS], dtype=D64).log()
    chains, start = [], time.perf_counter()
    z_shape = (times.numel() - 1, num_substeps - 1, 2)
    for c in range(num_chains):
        pyro.set_rng_seed(seed + c)
        init = {"theta": truth + 0.3 * torch.randn(5, dtype=D64), "z": torch.zeros(z_shape, dtype=D64)}
        kernel = NUTS(potential_fn=potential, adapt_step_size=True, adapt_mass_matrix=True, max_tree_depth=8)
        mcmc = MCMC(kernel, num_samples=samples, warmup_steps=warmup, initial_params=init,
                    disable_progbar=True)
        mcmc.run()
        chains.append(mcmc.get_samples()["theta"])
        print(f"  chain {c}: {time.perf_counter() - start:.0f} s", flush=True)
    return torch.stack(chains), time.perf_counter() - start


def comparison_rows(reference, candidates):
    """Per parameter: reference mean/sd, each candidate's mean/sd, standardised W1 and KS distance."""
    rows = []
    for j, name in enumerate(PARAMS):
        ref = reference[..., j].reshape(-1).numpy()
        row = [name, TRUTH[name], f"{ref.mean():.3f} +- {ref.std():.3f}"]
        for draws in candidates:
            x = draws[name].numpy()
            w1 = stats.wasserstein_distance(x, ref) / ref.std()
            ks = stats.ks_2samp(x, ref).statistic
            row += [f"{x.mean():.3f} +- {x.std():.3f}", f"{w1:.3f}", f"{ks:.3f}"]
        rows.append(row)
    return rows


def compute_nuts(args):
    """The NUTS chains' draws and cost, with the run's options and load."""
    times, log_obs = simulate()
    M, load, start = args.substeps, os.getloadavg()[0], time.process_time()
    nuts, wall = run_nuts(times, log_obs, M, num_chains=args.chains, warmup=args.warmup, samples=args.samples)
    return {"log_theta": nuts, "cpu": time.process_time() - start, "wall": wall, "load": load,
            "dim": 5 + (times.numel() - 1) * (M - 1) * 2, "args": vars(args)}


def compute(args, save):
    """Run the NUTS chains and the SMC fits (``save(out)`` after each): every number the report needs."""
    times, log_obs = simulate()
    M = args.substeps
    out = {"load": os.getloadavg()[0], "args": vars(args)}
    if not args.smc_only:
        out["nuts"] = compute_nuts(args)
        save(out)
    fits = [("guided_euler", M, args.smc_particles)]
    if args.continuous_particles:
        fits.append(("guided", 2 * M, args.continuous_particles))
    for proposal, substeps, particles in fits:
        start, load = time.process_time(), os.getloadavg()[0]
        smc = fit(times, log_obs, smc_particles=particles, bridge_particles=args.bridges,
                  num_substeps=substeps, proposal=proposal)
        samples, log_weights = smc.get_weighted_samples()
        out[proposal] = {
            "cpu": time.process_time() - start, "temperatures": smc.num_temperatures[0],
            "particles": particles, "load": load,
            "log_evidence": tuple(float(v) for v in smc.log_evidence()[:2]),
            "samples": {k: samples[k].detach() for k in PARAMS}, "log_weights": log_weights.detach(),
        }
        save(out)
        print(f"SMC {proposal} M={substeps}: {out[proposal]['cpu']:.0f} s CPU, temperatures "
              f"{smc.num_temperatures}", flush=True)
    return out


def resampled(result, num_samples=4000, seed=0):
    """Equal-weight draws ``name -> (num_samples,)`` from an SMC run's weighted particles."""
    from pyro_sde.diagnostics import systematic_resample

    torch.manual_seed(seed)
    idx = systematic_resample(result["log_weights"], num_samples)
    return {k: v[idx] for k, v in result["samples"].items()}


def report(out, write):
    import arviz as az

    M, n = out["args"]["substeps"], out["nuts"]
    nuts_args = n.get("args", out["args"])
    nuts_theta = out["nuts"]["log_theta"].exp()
    nuts_idata = az.from_dict(posterior={k: nuts_theta[..., j].numpy() for j, k in enumerate(PARAMS)})
    rhat, ess = az.rhat(nuts_idata), az.ess(nuts_idata)
    max_rhat = max(float(rhat[k]) for k in PARAMS)
    min_ess = min(float(ess[k]) for k in PARAMS)
    fits = [(label, substeps) for label, substeps in (("guided_euler", M), ("guided", 2 * M)) if label in out]
    draws = {label: resampled(out[label]) for label, _ in fits}
    # the noise floor of the distances: one half of the NUTS chains against the other
    half = nuts_theta.shape[0] // 2
    floor = comparison_rows(nuts_theta[:half], [{k: nuts_theta[half:, :, j].reshape(-1)
                                                for j, k in enumerate(PARAMS)}])
    header = ["param", "truth", f"NUTS (M={M})"]
    for label, substeps in fits:
        header += [f"SMC {label} (M={substeps})", "W1/sd", "KS"]
    header.append("NUTS half vs half: W1/sd")
    rows = comparison_rows(nuts_theta, [draws[label] for label, _ in fits])
    table = markdown_table(header, [r + [f[-2]] for r, f in zip(rows, floor)])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    smc_notes = "; ".join(
        f"{label} ({substeps} substeps): {out[label]['particles']} particles, {out[label]['cpu']:.0f} s CPU, "
        f"{out[label]['temperatures']} temperatures, log evidence {out[label]['log_evidence'][0]:.2f} +- "
        f"{out[label]['log_evidence'][1]:.2f}, load average {out[label].get('load', out['load']):.1f}"
        for label, substeps in fits
    )
    chains = f"{nuts_args['chains']} chains x ({nuts_args['warmup']} warm-up + {nuts_args['samples']}) draws"
    notes = (
        f"NUTS: {chains} over {n['dim']} dimensions, {n['cpu']:.0f} s CPU ({n['wall']:.0f} s wall, load "
        f"average {n.get('load', out['load']):.1f} at its start); max R-hat {max_rhat:.3f}, min bulk ESS "
        f"{min_ess:.0f}. SMC with {out['args']['bridges']} bridges per interval: {smc_notes}. W1/sd: "
        "Wasserstein-1 distance to the NUTS draws over the NUTS sd; KS: two-sample Kolmogorov-Smirnov "
        f"statistic (4000 resampled SMC draws). {machine()}; commit {commit}."
    )
    print(table)
    print(notes)
    if not write:
        return
    text = DOC.read_text()
    block = f"{BEGIN}\n{table}\n\n{notes}\n{END}"
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{DOC} has no {BEGIN!r} marker")
    DOC.write_text(pattern.sub(lambda _: block, text))
    import matplotlib

    matplotlib.use("Agg")
    labels = [f"SMC {label} (M={substeps})" for label, substeps in fits] + [f"NUTS (M={M})"]
    axes = az.plot_density([to_inference_data(draws[label]) for label, _ in fits] + [nuts_idata],
                           data_labels=labels, var_names=list(PARAMS), shade=0.1, figsize=(12, 6))
    for ax, name in zip(axes.ravel(), PARAMS):
        ax.axvline(TRUTH[name], color="k", linestyle=":", linewidth=1)  # the truth
    axes.ravel()[-1].set_visible(False)  # 5 parameters on a 2 x 3 grid
    figure = axes.ravel()[0].figure
    figure.tight_layout()
    figure.savefig(IMG, dpi=80, bbox_inches="tight")
    print(f"wrote {DOC} and {IMG}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--samples", type=int, default=1500)
    parser.add_argument("--substeps", type=int, default=10)
    parser.add_argument("--smc-particles", type=int, default=2048)
    parser.add_argument("--bridges", type=int, default=32)
    parser.add_argument("--continuous-particles", type=int, default=1024,
                        help="SMC particles of the continuous-time (guided) fit; 0 skips it")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "lotka_volterra.pt"),
                        help="where the draws are saved (and read back with --report-only)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the table from saved draws")
    parser.add_argument("--nuts-results", default=None,
                        help="with --nuts-only: where the NUTS draws go; with --report-only: NUTS draws that "
                        "replace those in --results")
    parser.add_argument("--nuts-only", action="store_true", help="only the NUTS chains, into --nuts-results")
    parser.add_argument("--smc-only", action="store_true", help="only the SMC fits, into --results")
    parser.add_argument("--smc-results", nargs="+", default=(),
                        help="with --report-only: SMC fits that replace those in --results, in order")
    parser.add_argument("--quick", action="store_true", help="short chains, nothing written")
    args = parser.parse_args(argv)
    if args.quick:
        args.chains, args.warmup, args.samples = 2, 30, 30
        args.smc_particles, args.continuous_particles = 64, 64
    torch.set_num_threads(1)
    if args.nuts_only:
        if not args.nuts_results:
            parser.error("--nuts-only needs --nuts-results")
        torch.save(compute_nuts(args), args.nuts_results)
        return
    if args.report_only:
        out = torch.load(args.results, weights_only=False)
        if args.nuts_results:
            out["nuts"] = torch.load(args.nuts_results, weights_only=False)
        for path in args.smc_results:
            extra = torch.load(path, weights_only=False)
            out.update({k: extra[k] for k in ("guided_euler", "guided") if k in extra})
    else:
        out = compute(args, (lambda out: None) if args.quick else (lambda out: torch.save(out, args.results)))
        if args.smc_only:  # no NUTS draws to compare with: report with --report-only --nuts-results
            return
    report(out, write=not args.quick)


if __name__ == "__main__":
    main()
