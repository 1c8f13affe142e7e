"""posteriordb: our samplers with their defaults vs Pyro NUTS on eleven real posteriors.

The posteriors of ``../shared/posteriordb`` (translations in ``posteriordb_models.py``), scored as
posteriordb users do against the reference draws (10 x 1000 Stan NUTS draws): over scalar parameters,
the max of ``|mean - ref mean| / ref sd`` and of ``|sd / ref sd - 1|``. Ours is exactly
``Sampler(model).run(*data)`` with the package defaults (``--sampler``: ``DiffusionSampler`` by default,
``SMCSampler`` or ``SCLDSampler``, each with its own section; ``--sampler-kwargs`` / ``--run-kwargs`` for
experiments), its moments importance-weighted, with the ESS, Pareto k and log Z +- se of its weights
and whether it warned. NUTS is Pyro's, one chain, 500 warm-up + 1000 draws; its results are cached in
``benchmarks/results/posteriordb_nuts.json`` (``--nuts`` re-runs, ``--no-nuts`` never runs). Usage::

    python benchmarks/posteriordb.py --write                      # all eleven; NUTS from the cache
    python benchmarks/posteriordb.py --posteriors kidiq-kidscore_momhsiq --seeds 0 1 2
    python benchmarks/posteriordb.py --sampler smc --no-nuts --seeds 0 1 2 --write   # SMCSampler's section
    python benchmarks/posteriordb.py --posteriors arma-arma11 --nuts --no-ours   # the NUTS check only
    python benchmarks/posteriordb.py --sampler-kwargs '{"num_steps": 50}' --doc /tmp/b.md --write
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import pyro
import torch
from pyro.infer import MCMC, NUTS

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402
from posteriordb_models import POSTERIORS  # noqa: E402

from pyro_sde.infer import DiffusionSampler, SCLDSampler, SMCSampler  # noqa: E402

SAMPLERS = {"diffusion": DiffusionSampler, "smc": SMCSampler, "scld": SCLDSampler}
NUTS_CACHE = Path(__file__).resolve().parent / "results" / "posteriordb_nuts.json"
SECTION = "posteriordb"
GOAL = 0.1  # both errors <= GOAL counts as right


def accuracy(posterior, samples: dict, log_weights: torch.Tensor | None = None) -> dict:
    """Max over the reference's scalar parameters of ``|mean - ref mean| / ref sd`` and ``|sd / ref sd - 1|``
    for site samples ``{site: (S, *shape)}``, weighted by ``softmax(log_weights)`` (S,) when given."""
    draws = posterior.to_reference(samples)
    num = next(iter(draws.values())).shape[0]
    if log_weights is None:
        weights = torch.full((num,), 1.0 / num, dtype=torch.float64)
    else:
        weights = torch.softmax(log_weights.detach().double(), 0)
    params, mean_err, sd_err = {}, {}, {}
    for name, ref in posterior.reference_draws().items():
        x = draws[name].detach().double()
        mean = (weights * x).sum()
        sd = (weights * (x - mean) ** 2).sum().sqrt()
        ref_mean, ref_sd = ref.mean(), ref.std()
        params[name] = [mean.item(), sd.item(), ref_mean.item(), ref_sd.item()]
        mean_err[name] = ((mean - ref_mean).abs() / ref_sd).item()
        sd_err[name] = (sd / ref_sd - 1).abs().item()
    worst_mean, worst_sd = max(mean_err, key=mean_err.get), max(sd_err, key=sd_err.get)
    return dict(
        mean_err=mean_err[worst_mean], worst_mean=worst_mean, sd_err=sd_err[worst_sd], worst_sd=worst_sd,
        params=params,  # name -> [mean, sd, ref mean, ref sd]
    )


def run_nuts(posterior, *, seed: int, warmup: int, draws: int, jit: bool) -> dict:
    pyro.set_rng_seed(seed)
    args = posterior.model_args()
    kernel = NUTS(posterior.model, jit_compile=jit, ignore_jit_warnings=True)
    mcmc = MCMC(kernel, num_samples=draws, warmup_steps=warmup, num_chains=1, disable_progbar=True)
    start = time.perf_counter()
    mcmc.run(*args)
    wall = time.perf_counter() - start
    diagnostics = mcmc.diagnostics()
    min_n_eff = min(d["n_eff"].min().item() for d in diagnostics.values() if "n_eff" in d)
    return dict(
        seed=seed, warmup=warmup, draws=draws, jit=jit, wall_s=wall, threads=torch.get_num_threads(),
        divergences=sum(len(v) for v in diagnostics["divergences"].values()),
        min_n_eff=min_n_eff, **accuracy(posterior, mcmc.get_samples()),
    )


def run_ours(
    posterior, *, seed: int, sampler_kwargs: dict, run_kwargs: dict, sampler: str = "diffusion"
) -> dict:
    """``SAMPLERS[sampler](model, **sampler_kwargs).run(*data, **run_kwargs)`` (package defaults when both
    are empty), timed end to end including the evaluation draw; exceptions become an ``error`` row."""
    pyro.set_rng_seed(seed)
    args = posterior.model_args()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        try:
            sampler = SAMPLERS[sampler](posterior.model, **sampler_kwargs)
            sampler.run(*args, **{"progress_bar": False, **run_kwargs})
            samples, log_w = sampler.get_weighted_samples()
            diag = sampler.diagnostics()
        except Exception as e:  # noqa: BLE001 - a failure is a result of the benchmark
            return dict(seed=seed, wall_s=time.perf_counter() - start, error=f"{type(e).__name__}: {e}"[:300])
        wall = time.perf_counter() - start
    messages = sorted({  # the sampler's warnings, not deprecations
        f"{w.category.__name__}: {w.message}"[:200] for w in caught
        if issubclass(w.category, (UserWarning, RuntimeWarning))
    })
    pre = sampler.preconditioner
    info = {} if pre is None else pre.info
    return dict(
        preconditioner=None if pre is None else pre.method, gaussian_ess=info.get("gaussian_ess"),
        gaussian_log_z=info.get("gaussian_log_z"),
        seed=seed, wall_s=wall, iterations=len(sampler.losses) if hasattr(sampler, "losses") else None,
        ess=diag["ess"], pareto_k=diag["pareto_k"], log_z=diag["log_evidence"],
        log_z_se=diag["log_evidence_stderr"], num_samples=len(log_w),
        warned=bool(messages), warnings=messages, **accuracy(posterior, samples, log_w),
    )


def load_cache(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _fmt(x, digits=3):
    return "-" if x is None else f"{x:.{digits}g}"


def _gaussian_alone(r: dict) -> str:
    """The preconditioner's Gaussian as an importance proposal on its own (before any training)."""
    if r.get("gaussian_ess") is None:
        return "-"
    return f"{r['preconditioner']}, {r['gaussian_ess']:.3g}, {r['gaussian_log_z']:.2f}"


def _verdict(r: dict) -> str:
    """right (both errors <= GOAL), flagged (wrong, but warned or Pareto k > 0.7) or WRONG, unflagged."""
    if r["mean_err"] <= GOAL and r["sd_err"] <= GOAL:
        return "right"
    return "flagged" if r.get("warned") or r.get("pareto_k", 0) > 0.7 else "WRONG, unflagged"


def table(results: dict, nuts: dict) -> tuple[str, str]:
    header = ["posterior", "D", "sampler", "mean err / sd", "sd err", "wall s", "ESS / draw", "Pareto k",
              "log Z +- se", "Gaussian alone: fit, ESS, log Z", "iterations", "warned", "verdict"]
    rows, right_ours, right_nuts, unflagged, ratios = [], 0, 0, 0, []
    runs_right = runs_total = 0
    for name, runs in results.items():
        dim = POSTERIORS[name].dimension
        n = nuts.get(name)
        if n:
            rows.append([
                name, dim, f"NUTS {n['warmup']}+{n['draws']}", _fmt(n["mean_err"]), _fmt(n["sd_err"]),
                f"{n['wall_s']:.0f}", _fmt(n["min_n_eff"] / n["draws"]), "-", "-",
                "-", "-", f"{n['divergences']} divergences", _verdict(n),
            ])
            right_nuts += n["mean_err"] <= GOAL and n["sd_err"] <= GOAL
        ok = [r for r in runs if "error" not in r]
        for r in runs:
            if "error" in r:
                rows.append([
                    name, dim, f"ours (seed {r['seed']})", "-", "-", f"{r['wall_s']:.0f}", *["-"] * 5,
                    "failed: " + r["error"][:80].replace("|", "/"), "failed",
                ])
                continue
            rows.append([
                name, dim, f"ours (seed {r['seed']})", _fmt(r["mean_err"]), _fmt(r["sd_err"]),
                f"{r['wall_s']:.0f}", _fmt(r["ess"]), f"{r['pareto_k']:.2f}",
                f"{r['log_z']:.2f} +- {r['log_z_se']:.2f}", _gaussian_alone(r),
                _fmt(r.get("iterations"), 6),
                "yes" if r["warned"] else "no", _verdict(r),
            ])
            runs_total += 1
            runs_right += _verdict(r) == "right"
            unflagged += _verdict(r) == "WRONG, unflagged"
        if len(ok) == len(runs) and ok:  # a failed seed counts as a miss
            mean_err = statistics.median(r["mean_err"] for r in ok)
            sd_err = statistics.median(r["sd_err"] for r in ok)
            right_ours += mean_err <= GOAL and sd_err <= GOAL
        if ok and n:
            ratios.append(statistics.median(r["wall_s"] for r in ok) / n["wall_s"])
    ratio = f"{statistics.median(ratios):.2f}" if ratios else "-"
    summary = (
        f"Both errors <= {GOAL} (median over seeds): ours {right_ours}/{len(results)}, NUTS "
        f"{right_nuts}/{sum(name in nuts for name in results)}; median wall-time ratio ours / NUTS: {ratio}; "
        f"confident wrong answers of ours (an error > {GOAL}, k <= 0.7, no warning): {unflagged} runs; "
        f"single runs of ours right: {runs_right}/{runs_total}."
    )
    return _report.markdown_table(header, rows), summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posteriors", nargs="+", default=list(POSTERIORS), choices=list(POSTERIORS))
    parser.add_argument("--nuts", action=argparse.BooleanOptionalAction, default=None,
                        help="re-run NUTS (--nuts), never (--no-nuts); default: the cache, NUTS if missing")
    parser.add_argument("--ours", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--sampler", choices=list(SAMPLERS), default="diffusion",
                        help="ours: DiffusionSampler (section 'posteriordb'), SMCSampler or SCLDSampler "
                             "(sections 'posteriordb-smc', 'posteriordb-scld')")
    parser.add_argument("--sampler-kwargs", type=json.loads, default={}, help="JSON, for experiments only")
    parser.add_argument("--run-kwargs", type=json.loads, default={}, help="JSON, for experiments only")
    parser.add_argument("--nuts-warmup", type=int, default=500)
    parser.add_argument("--nuts-draws", type=int, default=1000)
    parser.add_argument("--jit", action=argparse.BooleanOptionalAction, default=True, help="NUTS jit_compile")
    parser.add_argument("--nuts-cache", type=Path, default=NUTS_CACHE)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    parser.add_argument("--doc", type=Path, default=_report.DOC)
    parser.add_argument("--json", type=Path, default=None, help="also dump the raw results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    _report.DOC = args.doc

    nuts = load_cache(args.nuts_cache)
    results = {}
    for name in args.posteriors:
        posterior = POSTERIORS[name]
        if args.nuts or (args.nuts is None and name not in nuts):
            nuts[name] = run_nuts(
                posterior, seed=0, warmup=args.nuts_warmup, draws=args.nuts_draws, jit=args.jit
            )
            nuts[name]["date"] = time.strftime("%Y-%m-%d %H:%M")
            args.nuts_cache.parent.mkdir(exist_ok=True)
            args.nuts_cache.write_text(json.dumps(load_cache(args.nuts_cache) | {name: nuts[name]}, indent=1))
        if name in nuts:
            n = nuts[name]
            print(f"{name} NUTS: mean err {n['mean_err']:.3f} ({n['worst_mean']}), sd err {n['sd_err']:.3f} "
                  f"({n['worst_sd']}), {n['wall_s']:.0f} s, {n['divergences']} divergences", flush=True)
        results[name] = []
        if args.ours:
            for seed in args.seeds:
                r = run_ours(
                    posterior, seed=seed, sampler_kwargs=args.sampler_kwargs, run_kwargs=args.run_kwargs,
                    sampler=args.sampler,
                )
                results[name].append(r)
                print(name, "ours", {k: v for k, v in r.items() if k != "params"}, flush=True)
    body, summary = table(results, nuts) if args.ours else ("", "")
    print(summary)
    if args.json:
        args.json.write_text(json.dumps(dict(ours=results, nuts=nuts), indent=1))
    if args.write and args.ours:
        command = "python benchmarks/posteriordb.py " + shlex.join(argv if argv is not None else sys.argv[1:])
        options = ", ".join(f"`{json.dumps(o)}`" for o in (args.sampler_kwargs, args.run_kwargs) if o)
        how = "with the package defaults" if not options else f"with the options {options} (an experiment)"
        name = SAMPLERS[args.sampler].__name__
        section = SECTION if args.sampler == "diffusion" else f"{SECTION}-{args.sampler}"
        draw = "evaluation draw" if args.sampler == "diffusion" else "final weighted particles"
        _report.write_section(section, f"""
### posteriordb: {name} with defaults vs Pyro NUTS

Written by `{command}`. Machine: {_report.machine()}. Ours: `{name}(model).run(*data)`,
{how}; moments importance-weighted over its {draw}. NUTS: Pyro, one chain, default
settings (jit-compiled), warm-up + draws in its row (diamonds: 400 + 400, a 500 + 1000 run takes ~25 min
on 2 loaded cores), cached in `benchmarks/results/posteriordb_nuts.json`. Errors are maxima over
the scalar parameters against posteriordb's reference draws (10 x 1000 Stan draws): `|mean - ref mean| /
ref sd` and `|sd / ref sd - 1|`; goal: both <= {GOAL}. ESS / draw: importance ESS (ours), min n_eff / draws
(NUTS). "warned": the run raised a warning; verdict: right
(both errors <= {GOAL}), flagged (wrong, but warned or Pareto k > 0.7), WRONG, unflagged (a confident
wrong answer).

{body}

{summary}
""")
    return dict(ours=results, nuts=nuts)


if __name__ == "__main__":
    main()
