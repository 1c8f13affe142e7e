"""Evidence against cost: tempered SMC, SCLD, DIS-LV and DDS-LV side by side (issue 15).

Part ``synthetic`` (targets with exact log Z: GMM-9, Funnel, ManyWell-5, ManyWell-50): every method with
the package defaults, at a few budgets, reports ``|log Z_hat - log Z|``, the error bar, and the number of
target evaluations (rows at which the log density or its score was computed: the preconditioner's
fit, training and the evaluation draw included) and wall seconds. Budgets:

* ``smc``: ``SMCSampler(num_particles=N)`` for N in ``--particles``;
* ``scld``: ``SCLDSampler`` trained for each of ``--scld-iterations`` (0: the untrained sampler, which
  is annealed importance sampling with Langevin moves and resampling; the training batch is the
  default), then one evaluation draw of ``num_particles = N`` for each N in ``--scld-particles`` (one
  training run per seed serves all N: each row counts the training, the preconditioner's fit, the
  step-size tuning and its own draw, not the other draws);
* ``dis-lv`` / ``dds-lv``: ``DiffusionSampler(method, loss="log_variance")`` for each of
  ``--diffusion-iterations`` (the last is the goal budget of the samplers benchmark), log Z from
  ``--eval`` paths.

The goal lines of issue 15 are computed from these rows: SCLD within 10 % of DIS-LV's last budget of
iterations, with its largest draw at no more target evaluations than that DIS-LV run, against DIS-LV's
median |dlogZ| (``_dis_goal``); and SCLD against SMC interpolated at equal evaluations (``_smc_goal``).

Part ``posteriordb``: ``SMCSampler(model)`` and ``SCLDSampler(model)`` with their defaults on the
posteriordb models; do their evidences agree within the error bars?

Part ``efficiency``: SMC and SCLD (untrained, or trained for each of ``--efficiency-iterations``) with
their defaults (``--efficiency-particles``, one fresh sampler per seed, the preconditioner's fit, the
pilots and the training counted) over many seeds
(``--efficiency-seeds``): the mean squared log Z error times the mean target evaluations (the cost of
a given precision: lower is better) with bootstrap intervals, their ratio, and whether the error bars
are honest (mean ``(error / stderr)^2``, 1 when they are).

Results accumulate in ``--json`` (rows already there are not re-run); ``--write`` writes the section of
``docs/benchmarks.md`` and the plots. Usage::

    python benchmarks/smc.py --part synthetic --seeds 0 1 --json benchmarks/results/smc.json --write
    python benchmarks/smc.py --part posteriordb --json benchmarks/results/smc.json --write
    python benchmarks/smc.py --part efficiency --efficiency-seeds 128 --json benchmarks/results/smc_eff.json
    python benchmarks/smc.py --targets gmm9 --methods smc scld --seeds 0 --json /tmp/s.json   # a subset
    python benchmarks/smc.py --methods scld --scld-iterations 600 --scld-particles 4096 65536 --json ...
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _report  # noqa: E402

from pyro_sde._checks import positive_int  # noqa: E402
from pyro_sde.infer import DiffusionSampler, SMCSampler  # noqa: E402
from pyro_sde.targets import GMM9, Funnel, ManyWell  # noqa: E402

try:
    from pyro_sde.infer import SCLDSampler  # noqa: E402
except ImportError:  # pragma: no cover - before SCLD lands
    SCLDSampler = None

TARGETS = {
    "gmm9": lambda: GMM9(),
    "funnel": lambda: Funnel(dim=10, sigma=3.0),
    "manywell5": lambda: ManyWell(dim=5, num_wells=5, delta=4.0),
    "manywell50": lambda: ManyWell(dim=50, num_wells=5, delta=2.0),
}
SECTION = "smc"
SCLD_PARTICLES = 4096  # SCLDSampler's default num_particles: that of the rows without a "particles" field
# target evaluations per particle of an SCLD draw with the defaults: K = 32 steps, 3 MALA moves, the start
# (rows without "draw_evaluations", from before the stuck check; newer rows count each draw, check included)
SCLD_EVALUATIONS_PER_PARTICLE = 36
MADE_BY = (  # the runs behind the committed result files
    "`python benchmarks/smc.py --part synthetic --methods dis-lv dds-lv --seeds 0 1 --json "
    "benchmarks/results/smc.json`, `python benchmarks/smc.py --part synthetic --methods smc --seeds 0 1 "
    "--json benchmarks/results/smc_particles.json` (SMC at 256-16384 particles) and into the same file "
    "`--methods smc --particles 65536 262144 1048576` (GMM-9 and ManyWell-5; 65536 262144 on ManyWell-50 "
    "and Funnel); the SCLD rows, re-run after the adaptive grid and the stuck check (2026-12-01), "
    "by `--methods scld --seeds 0 1` (0, 10, 40 iterations, 4096 particles) and `--methods scld "
    "--scld-iterations 200 600 --scld-particles 4096 16384 65536 262144` (two processes, one per pair of "
    "targets, each into its own file, merged); `python benchmarks/smc.py --part "
    "posteriordb --seeds 0 --json benchmarks/results/smc_posteriordb.json` (its SCLD rows re-run the same "
    "day: rows already in the file are not re-run, so the SMC rows are kept); on 2026-12-02 (load 2-3), for "
    "the DIS-LV goal at equal evaluations, seeds 2 and 3 of DIS-LV (`--methods dis-lv --seeds 2 3`) and of "
    "SMC up to 16384 particles, and SCLD at 0, 10 and 40 iterations for seeds 0-3 with draws of 4096-131072 "
    "particles (`--methods scld --seeds 0 1 2 3 --scld-particles 4096 16384 65536 131072`, two processes, "
    "merged; the re-drawn 4096-particle rows of seeds 0 and 1 came out bitwise equal to the stored ones); "
    "on 2026-12-03 (load 2) the posteriordb SMC rows again (`--part posteriordb --seeds 0`, the SCLD rows "
    "kept), after SMC's pilot began widening a fitted single-mode Gaussian; the synthetic targets' "
    "references are mixtures or the identity, which the pilot leaves alone (re-drawn seed 0 at 4096 "
    "particles: the same evaluations and log Z to 1e-11 on GMM-9, Funnel-10 and ManyWell-50)"
)
EFFICIENCY_MADE_BY = (  # 2026-12-01, load 2, SCLD with metric="auto" (the identity here: preconditioned)
    "`python benchmarks/smc.py --part efficiency --targets gmm9 funnel` and `--targets manywell5 "
    "manywell50` (two processes, 128 seeds, each into its own file, merged into "
    "benchmarks/results/smc_efficiency.json); the trained rows on 2026-12-02 (load 2-4) by `--part "
    "efficiency --efficiency-seeds 16 --efficiency-particles 131072 --efficiency-iterations 40` (GMM-9, "
    "Funnel and ManyWell-5 in one process; ManyWell-50's SMC rows in a second and its SCLD rows, by the "
    "same `run_efficiency`, in a third; merged). The 4096-particle rows of GMM-9 and ManyWell-5 / -50 were "
    "re-run on 2026-12-02 (load 2-3; `--part efficiency --targets gmm9 manywell5` and `--targets "
    "manywell50 --efficiency-seeds 128 --efficiency-particles 4096`, two processes, merged) after the "
    "preconditioner's extra MAP starts for multimodal mixtures, and so were their 131072-particle rows "
    "(`--efficiency-seeds 16 --efficiency-particles 131072 --efficiency-iterations 40` for GMM-9 and "
    "ManyWell-5, `--efficiency-seeds 8` for ManyWell-50, two processes, merged); Funnel-10's rows (one "
    "mode) are from before that change, as are the synthetic rows above"
)
IMG = Path(__file__).resolve().parents[1] / "docs" / "img"


class CountingDensity:
    """``log_prob`` that counts the rows it is evaluated at (autograd scores come through it too)."""

    def __init__(self, log_prob):
        self.log_prob, self.count = log_prob, 0

    def __call__(self, x):
        self.count += math.prod(x.shape[:-1])
        return self.log_prob(x)


def _quiet(fn):
    """Run ``fn()`` recording the warnings' messages (they are part of the result)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    messages = sorted({f"{w.category.__name__}: {w.message}"[:160] for w in caught
                       if issubclass(w.category, (UserWarning, RuntimeWarning))})
    return out, messages


def run_synthetic(name, method, budget, seed, args) -> dict:
    target = TARGETS[name]()
    pyro.set_rng_seed(seed)
    density = CountingDensity(lambda x: target.log_prob(x.double()))
    start = time.perf_counter()

    def go():
        if method == "smc":
            s = SMCSampler(log_density=density, dim=target.dim, num_particles=budget, dtype=torch.float64)
            s.run()
            return s.log_evidence(), 0
        s = DiffusionSampler(log_density=density, dim=target.dim, method=method.split("-")[0],
                             loss="log_variance", dtype=torch.float64)
        s.run(num_iterations=budget, until=None, progress_bar=False)
        return s.log_evidence(args.eval), len(s.losses)

    (ev, iterations), messages = _quiet(go)
    return _row(target, name, method, budget, seed, iterations, density.count,
                time.perf_counter() - start, ev, messages, particles=budget if method == "smc" else None)


def _row(target, name, method, budget, seed, iterations, evaluations, wall_s, ev, messages, particles=None):
    row = dict(
        target=name, method=method, budget=budget, seed=seed, iterations=iterations,
        evaluations=evaluations, wall_s=wall_s, log_z=float(ev.log_z),
        stderr=float(ev.stderr), error=abs(float(ev.log_z) - target.log_Z), ess=float(ev.ess),
        pareto_k=float(ev.pareto_k), warnings=messages,
    )
    if particles is not None:
        row["particles"] = particles
    return row


def run_scld(name, iterations, particles, seed) -> list[dict]:
    """SCLD trained for ``iterations`` (0: untrained), then one evaluation draw per N in ``particles``:
    one row each, counting the set-up, training and its own draw (``evaluations``, ``wall_s``)."""
    target = TARGETS[name]()
    pyro.set_rng_seed(seed)
    density = CountingDensity(lambda x: target.log_prob(x.double()))
    start = time.perf_counter()

    def train():
        s = SCLDSampler(log_density=density, dim=target.dim, dtype=torch.float64)
        if iterations:
            s.run(num_iterations=iterations, until=None, progress_bar=False)
        else:
            s.setup()
        return s

    sampler, train_messages = _quiet(train)
    train_evaluations, train_wall = density.count, time.perf_counter() - start
    rows = []
    for n in particles:
        count, clock = density.count, time.perf_counter()
        ev, messages = _quiet(lambda n=n: sampler.sample_particles(n).log_evidence())
        rows.append(_row(
            target, name, "scld", iterations, seed, len(sampler.losses),
            train_evaluations + density.count - count, train_wall + time.perf_counter() - clock, ev,
            sorted(set(train_messages) | set(messages)), particles=n,
        ) | dict(draw_evaluations=density.count - count))
    return rows


def run_efficiency(name, method, particles, seed, iterations=0) -> dict:
    """One fresh ``SMCSampler`` (``run``) or ``SCLDSampler`` (trained for ``iterations``, then
    ``sample_particles``) with the defaults and ``particles``: its log Z error, error bar and every target
    evaluation (training included)."""
    target = TARGETS[name]()
    pyro.set_rng_seed(seed)
    density = CountingDensity(lambda x: target.log_prob(x.double()))
    start = time.perf_counter()

    def go():
        cls = SMCSampler if method == "smc" else SCLDSampler
        s = cls(log_density=density, dim=target.dim, num_particles=particles, dtype=torch.float64)
        if method == "smc":
            s.run()
        else:
            if iterations:
                s.run(num_iterations=iterations, until=None, progress_bar=False)
            s.sample_particles()
        return s.log_evidence()

    ev, messages = _quiet(go)
    extra = dict(iterations=iterations) if method == "scld" and iterations else {}
    return dict(target=name, method=method, particles=particles, seed=seed, **extra,
                evaluations=density.count,
                wall_s=time.perf_counter() - start, signed_error=float(ev.log_z) - target.log_Z,
                stderr=float(ev.stderr), warnings=messages)


def _bootstrap_mse_cost(rows, reps=2000, seed=0):
    """``mean(error^2) x mean(evaluations)`` of ``rows``, and ``reps`` bootstrap replicates of it (seeds
    resampled)."""
    gen = torch.Generator().manual_seed(seed)
    err2 = torch.tensor([r["signed_error"] ** 2 for r in rows], dtype=torch.float64)
    cost = torch.tensor([float(r["evaluations"]) for r in rows], dtype=torch.float64)
    idx = torch.randint(len(rows), (reps, len(rows)), generator=gen)
    return float(err2.mean() * cost.mean()), err2[idx].mean(1) * cost[idx].mean(1)


def _interval(replicates) -> tuple[float, float]:
    """The 2.5 % and 97.5 % quantiles of bootstrap replicates."""
    q = torch.quantile(replicates, torch.tensor([0.025, 0.975], dtype=replicates.dtype))
    return float(q[0]), float(q[1])


def efficiency_section(rows) -> str:
    rows = [r for r in rows if r["part"] == "efficiency"]
    header = ["target", "method", "iterations", "particles", "seeds", "target evals", "RMSE", "mean error",
              "median abs error", "MSE x evals (95 %)", "SCLD / SMC (95 %)", "mean (err / se)^2",
              "beyond 3 se", "worst seed: error (se)", "warned"]
    table, wins, losses, compared = [], [], [], 0
    for name in TARGETS:
        for n in sorted({r["particles"] for r in rows if r["target"] == name}):
            here = [r for r in rows if r["target"] == name and r["particles"] == n]
            runs = [("smc", 0)] + [("scld", it) for it in sorted({r.get("iterations", 0) for r in here
                                                                   if r["method"] == "scld"})]
            boot = {}
            for method, it in runs:
                sel = [r for r in here if r["method"] == method and r.get("iterations", 0) == it]
                if len(sel) < 2:
                    continue
                value, reps = _bootstrap_mse_cost(sel, seed=len(boot))  # independent resamples
                boot[method, it] = (value, reps)
                lo, hi = _interval(reps)
                z2 = [(r["signed_error"] / r["stderr"]) ** 2 for r in sel if r["stderr"] > 0]
                ratio = ""
                if method == "scld" and ("smc", 0) in boot:
                    smc_value, smc_reps = boot["smc", 0]
                    qlo, qhi = _interval(reps / smc_reps)
                    ratio = f"{value / smc_value:.2f} ({qlo:.2f}-{qhi:.2f})"
                    compared += 1
                    label = name if it == 0 else f"{name} at {it} iterations"
                    wins += [label] * (qhi < 1)
                    losses += [label] * (qlo > 1)
                warned = sum(any("Unreliable" in w for w in r["warnings"]) for r in sel)
                worst = max(sel, key=lambda r: abs(r["signed_error"]))
                worst_warned = " warned" if any("Unreliable" in w for w in worst["warnings"]) else ""
                table.append([
                    name, method, it if method == "scld" else "", n, len(sel),
                    f"{statistics.mean(r['evaluations'] for r in sel):.3g}",
                    math.sqrt(statistics.mean(r["signed_error"] ** 2 for r in sel)),
                    statistics.mean(r["signed_error"] for r in sel),
                    statistics.median(abs(r["signed_error"]) for r in sel),
                    f"{value:.3g} ({lo:.3g}-{hi:.3g})", ratio,
                    f"{statistics.mean(z2):.3g}" if z2 else "",
                    sum(abs(r["signed_error"]) > 3 * r["stderr"] for r in sel),
                    f"{worst['seed']}: {worst['signed_error']:+.3g} ({worst['stderr']:.2g}){worst_warned}",
                    f"{warned}/{len(sel)}",
                ])
    text = _report.markdown_table(header, table)
    text += (
        f"\n\nSCLD costs less than tempered SMC for the same log Z precision (the ratio's 95 % interval "
        f"below 1) in {len(wins)} of {compared} comparisons ({', '.join(wins) or 'none'}), more (above 1) in "
        f"{len(losses)} ({', '.join(losses) or 'none'}). `MSE x evals` is the mean squared error of "
        "log Z times the mean number of target evaluations (SCLD's training included), i.e. the variance "
        "(and squared bias) at one evaluation's cost; the intervals resample seeds (2000 replicates). A "
        "mean `(err / se)^2` well above 1 means the error bars are too small."
    )
    return text


def run_posteriordb(name, method, seed) -> dict:
    from posteriordb_models import POSTERIORS

    posterior = POSTERIORS[name]
    pyro.set_rng_seed(seed)
    start = time.perf_counter()

    def go():
        cls = SMCSampler if method == "smc" else SCLDSampler
        s = cls(posterior.model)
        s.run(*posterior.model_args(), progress_bar=False)
        return s.log_evidence(), s

    try:
        (ev, s), messages = _quiet(go)
    except Exception as e:  # noqa: BLE001 - a failure is a result
        return dict(target=name, method=method, seed=seed, error=f"{type(e).__name__}: {e}"[:200],
                    wall_s=time.perf_counter() - start)
    return dict(
        target=name, method=method, budget=0, seed=seed, wall_s=time.perf_counter() - start,
        log_z=float(ev.log_z), stderr=float(ev.stderr), ess=float(ev.ess), pareto_k=float(ev.pareto_k),
        evaluations=int(getattr(s, "num_target_evaluations", 0)), warnings=messages,
    )


def _particles(row) -> int | None:
    """The evaluation draw's size: SMC's budget, SCLD's ``particles`` (4096 in the first rows)."""
    if row["method"] == "smc":
        return row["budget"]
    if row["method"] == "scld":
        return row.get("particles", SCLD_PARTICLES)
    return None


def _key(row) -> str:
    if row["part"] == "efficiency":
        key = f"efficiency|{row['target']}|{row['method']}|{row['particles']}|{row['seed']}"
        return key + (f"|{row['iterations']}" if row.get("iterations") else "")
    key = f"{row['part']}|{row['target']}|{row['method']}|{row['budget']}|{row['seed']}"
    if row["part"] == "synthetic" and row["method"] == "scld" and _particles(row) != SCLD_PARTICLES:
        key += f"|{_particles(row)}"
    return key


def _median(rows, key):
    values = [r[key] for r in rows if key in r and r[key] is not None and math.isfinite(r[key])]
    return statistics.median(values) if values else math.nan


def _per_evaluation_variance(row) -> float:
    """``stderr^2 x evaluations`` of the estimate's own draw (SCLD: training excluded; SMC: its run)."""
    draw = row["evaluations"] if row["method"] != "scld" else row.get(
        "draw_evaluations", SCLD_EVALUATIONS_PER_PARTICLE * _particles(row))
    return row["stderr"] ** 2 * draw


def _select(rows, name, method, budget, particles):
    return [r for r in rows if r["target"] == name and r["method"] == method and r["budget"] == budget
            and _particles(r) == particles]


def _curve(rows, name, method, budget=None):
    """``[(budget, particles, median evaluations, median error, median wall, median stderr, runs)]``
    sorted by (budget, particles); ``budget``: only that budget's rows (SCLD's iterations)."""
    groups = sorted({(r["budget"], _particles(r) or 0) for r in rows if r["target"] == name
                     and r["method"] == method and budget in (None, r["budget"])})
    out = []
    for b, n in groups:
        sel = _select(rows, name, method, b, n or None)
        out.append((b, n, _median(sel, "evaluations"), _median(sel, "error"), _median(sel, "wall_s"),
                    _median(sel, "stderr"), len(sel)))
    return out


def _interpolate(curve, evaluations, column=3):
    """SMC's median error (``column`` 3; 5: stderr) at ``evaluations`` (log-log interpolation between its
    budgets; nan below the smallest; its value at the largest beyond it)."""
    pts = sorted((math.log(c[2]), math.log(max(c[column], 1e-12))) for c in curve if math.isfinite(c[column]))
    if not pts:
        return math.nan
    le = math.log(evaluations)
    if le <= pts[0][0]:
        return math.exp(pts[0][1]) if abs(le - pts[0][0]) < 1e-9 else math.nan
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= le <= x1:
            return math.exp(y0 + (y1 - y0) * (le - x0) / (x1 - x0))
    return math.exp(pts[-1][1])  # beyond SMC's largest run: its best error


def _versus_smc(scld, smc):
    """Each SCLD budget against SMC interpolated at its evaluations: ``[(iterations, particles,
    evaluations, error, SMC error, stderr, SMC stderr, beyond SMC's largest run)]``."""
    largest = max(c[2] for c in smc)
    return [(b, n, ev, err, _interpolate(smc, ev), se, _interpolate(smc, ev, column=5), ev > largest)
            for b, n, ev, err, _, se, _ in scld]


def _within_noise(a, b, se_a, se_b) -> bool:
    """Whether two estimates differ by at most 2 combined standard errors."""
    return abs(a - b) <= 2 * math.hypot(se_a, se_b)


def _smc_goal(name, scld, smc, rows):
    """``(line, below, clearly_below)`` for one target: where SCLD's median |dlogZ| is below SMC's at
    equal evaluations, where by more than 2 combined standard errors, and the per-evaluation variances."""
    cmp = [c for c in _versus_smc(scld, smc) if math.isfinite(c[4])]
    below = [c for c in cmp if c[3] < c[4]]
    clear = [c for c in below if not _within_noise(c[3], c[4], c[5], c[6])]
    tighter = [c for c in cmp if c[5] < c[6]]

    def budget(c):
        return f"{c[0]}x{c[1]}" + ("*" if c[7] else "")

    def detail(c):
        return f"{budget(c)} ({c[2]:.3g} evals): {c[3]:.3g} vs {c[4]:.3g}, se {c[5]:.2g} vs {c[6]:.2g}"

    text = (f"- {name}: SCLD (iterations x particles) below SMC's |dlogZ| at equal evaluations at "
            f"{len(below)} of {len(cmp)} budgets: " + ("; ".join(detail(c) for c in below) or "none")
            + f". Beyond 2 combined se: {', '.join(budget(c) for c in clear) or 'none'}"
            + (" (all at noise level)" if below and not clear
               else " (the others at noise level)" if len(clear) < len(below) else "")
            + f". SCLD's stderr below SMC's at {len(tighter)} of {len(cmp)} budgets"
            + (f" ({', '.join(budget(c) for c in tighter)})" if tighter else "") + ". ")
    sel = [r for r in rows if r["target"] == name and r["stderr"] > 0]
    smc_v = statistics.median(_per_evaluation_variance(r) for r in sel if r["method"] == "smc")
    scld_v = {b: statistics.median(_per_evaluation_variance(r) for r in sel
                                   if r["method"] == "scld" and r["budget"] == b)
              for b in sorted({r["budget"] for r in sel if r["method"] == "scld"})}
    text += ("Per-evaluation variance (median stderr^2 x evaluations of the draw, SCLD's training "
             f"excluded): SMC {smc_v:.3g}, SCLD " + ", ".join(f"{v:.3g} at {b}" for b, v in scld_v.items())
             + " iterations.")
    z = {m: statistics.median(r["error"] / r["stderr"] for r in sel if r["method"] == m)
         for m in ("smc", "scld")}
    if min(z.values()) > 3:
        text += (f" Both are biased here (median |dlogZ| / stderr: SMC {z['smc']:.2g}, SCLD "
                 f"{z['scld']:.2g}): the errors compared are biases that the error bars miss.")
    return text, bool(below), bool(clear)


def _dis_goal(name, dis, scld):
    """``(line, met, both_biased)`` for one target: does SCLD, within 10 % of DIS-LV's goal iterations
    and at no more target evaluations than DIS-LV there (training and evaluation draw included), reach
    its median |dlogZ|?
    DIS-LV's error is that of its 20000-path evaluation, so SCLD's draw is the largest that those
    evaluations allow, one per iteration count (not the luckiest draw: the medians of a few seeds are
    noisy); the 4096-particle draw (the check of earlier stops) is given too."""
    goal_iters, _, dis_evals, dis_err, _, dis_se, dis_runs = dis[-1]
    largest = {}  # iterations -> the largest eligible draw (the curve is sorted by particles)
    for c in scld:
        if c[0] <= 0.1 * goal_iters and c[2] <= dis_evals:
            largest[c[0]] = c
    best = min(largest.values(), key=lambda c: c[3]) if largest else None
    small = [c for c in scld if c[0] <= 0.1 * goal_iters and c[1] == SCLD_PARTICLES]
    best_small = min(small, key=lambda c: c[3]) if small else None
    met = best is not None and best[3] <= dis_err
    text = (f"- {name}: DIS-LV at {goal_iters} iterations |dlogZ| = {dis_err:.3g} (se {dis_se:.2g}, "
            f"{dis_evals:.3g} evals, {dis_runs} seeds); SCLD within {int(0.1 * goal_iters)} iterations and "
            "those evaluations: ")
    if best is None:
        return text + "no run", False, False
    text += (f"{best[3]:.3g} at {best[0]} iterations x {best[1]} particles (se {best[5]:.2g}, {best[2]:.3g} "
             f"evals, {best[6]} seeds): {'met' if met else 'missed'}")
    if _within_noise(best[3], dis_err, best[5], dis_se):
        text += " (within 2 combined se: noise level)"
    biased = best[5] > 0 and dis_se > 0 and min(best[3] / best[5], dis_err / dis_se) > 3
    if biased:
        text += " (both biased: |dlogZ| > 3 se)"
    if best_small is not None:
        text += f"; with {SCLD_PARTICLES} particles: {best_small[3]:.3g} at {best_small[0]} iterations"
    return text, met, biased


def synthetic_section(rows, args) -> str:
    rows = [r for r in rows if r["part"] == "synthetic" and "error" in r and isinstance(r["error"], float)]
    lines = []
    header = ["target", "method", "budget", "particles", "iterations", "target evals", "wall s", "|dlogZ|",
              "stderr", "|dlogZ| / stderr", "stderr^2 x draw evals", "ESS", "warned", "runs"]
    table = []
    goal_rows = []
    met_dis, met_biased, below_targets, clear_targets, targets_with_both = 0, [], [], [], 0
    for name in TARGETS:
        if not any(r["target"] == name for r in rows):
            continue
        for method in ("smc", "scld", "dis-lv", "dds-lv"):
            for b, n, ev, err, wall, se, runs in _curve(rows, name, method):
                sel = _select(rows, name, method, b, n or None)
                warned = sum(any("Unreliable" in w for w in r["warnings"]) for r in sel)
                z = [r["error"] / r["stderr"] for r in sel if r["stderr"] > 0]
                z = statistics.median(z) if z else math.nan
                v = [_per_evaluation_variance(r) for r in sel] if method in ("smc", "scld") else []
                table.append([name, method, b, n or "", _median(sel, "iterations"), f"{ev:.3g}", wall, err,
                              se, z, f"{statistics.median(v):.3g}" if v else "", _median(sel, "ess"),
                              f"{warned}/{runs}", runs])
        dis = _curve(rows, name, "dis-lv")
        scld = _curve(rows, name, "scld")
        smc = _curve(rows, name, "smc")
        if dis and scld:
            text, met_1, biased = _dis_goal(name, dis, scld)
            met_dis += met_1
            met_biased += [name] * (met_1 and biased)
            goal_rows.append(text)
        if smc and scld:
            targets_with_both += 1
            text, below, clear = _smc_goal(name, scld, smc, rows)
            below_targets += [name] * below
            clear_targets += [name] * clear
            goal_rows.append(text)
    lines.append(_report.markdown_table(header, table))
    lines.append("\nGoals (issue 15). SCLD budgets are iterations x evaluation particles; SMC is "
                 "interpolated in log-log between its particle counts at SCLD's evaluations (* : beyond "
                 "SMC's largest run, compared with that run, which favours SMC); `a vs b`: SCLD's median "
                 "|dlogZ| vs SMC's, then their median standard errors.\n")
    lines += goal_rows
    n_below, n_clear = len(below_targets), len(clear_targets)
    lines.append(
        "\nSummary: SCLD within 10 % of DIS-LV's iterations (and its evaluations) reaches its |dlogZ| "
        f"on {met_dis} of {len(TARGETS)} targets (goal: 3)"
        + (f", on {len(met_biased)} of them ({', '.join(met_biased)}) as a smaller bias of two biased "
           "estimates" if met_biased else "")
        + ". SCLD's median |dlogZ| is below tempered SMC's at equal "
        f"evaluations at some budget on {n_below} of {targets_with_both} targets "
        f"({', '.join(below_targets) or 'none'}), by more than 2 combined standard errors on {n_clear} "
        f"({', '.join(clear_targets) or 'none'}); goal (3 of 4): "
        + ("met" if n_clear >= 3 else "met only at noise level" if n_below >= 3 else "not met")
        + ". With 2-4 seeds per budget and many budgets per target, a win at one budget within 2 standard "
        "errors is what noise gives; the standard errors (estimator precision at equal evaluations) are "
        "the steadier comparison."
    )
    return "\n".join(lines)


def plots(rows):
    rows = [r for r in rows if r["part"] == "synthetic" and isinstance(r.get("error"), float)]
    names = [n for n in TARGETS if any(r["target"] == n for r in rows)]
    if not names:
        return None
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        for method, style in (("smc", "o-"), ("dis-lv", "^-"), ("dds-lv", "v-")):
            c = _curve(rows, name, method)
            if c:
                ax.loglog([p[2] for p in c], [max(p[3], 1e-4) for p in c], style, label=method)
        scld_budgets = {r["budget"] for r in rows if r["target"] == name and r["method"] == "scld"}
        for iterations in sorted(scld_budgets):
            c = _curve(rows, name, "scld", iterations)
            ax.loglog([p[2] for p in c], [max(p[3], 1e-4) for p in c], "s-", ms=4, label=f"scld@{iterations}")
        ax.set_title(name)
        ax.set_xlabel("target evaluations (training included)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("|log Z_hat - log Z| (median over seeds)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    IMG.mkdir(parents=True, exist_ok=True)
    path = IMG / "smc_logz_vs_evaluations.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def posteriordb_section(rows) -> str:
    rows = [r for r in rows if r["part"] == "posteriordb"]
    names = sorted({r["target"] for r in rows})
    header = ["posterior", "SMC log Z", "SMC se", "SMC s", "SCLD log Z", "SCLD se", "SCLD s", "|diff| / se",
              "agree"]
    table, agree = [], 0
    for name in names:
        smc = [r for r in rows if r["target"] == name and r["method"] == "smc"]
        scld = [r for r in rows if r["target"] == name and r["method"] == "scld"]
        if not smc or not scld:
            continue
        a, b = smc[0], scld[0]
        if "log_z" not in a or "log_z" not in b:
            table.append([name, a.get("error", ""), "", "", b.get("error", ""), "", "", "", "error"])
            continue
        se = math.sqrt(a["stderr"] ** 2 + b["stderr"] ** 2)
        ratio = abs(a["log_z"] - b["log_z"]) / se if se > 0 else math.inf
        ok = ratio <= 2
        agree += ok
        table.append([name, a["log_z"], a["stderr"], a["wall_s"], b["log_z"], b["stderr"], b["wall_s"], ratio,
                      "yes" if ok else "no"])
    return (_report.markdown_table(header, table)
            + f"\n\nAgreement (|diff| <= 2 sqrt(se_SMC^2 + se_SCLD^2)): {agree} of {len(table)}.")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["synthetic", "posteriordb", "efficiency"], default="synthetic")
    p.add_argument("--targets", nargs="+", default=list(TARGETS))
    p.add_argument("--methods", nargs="+", default=["smc", "scld", "dis-lv", "dds-lv"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--particles", nargs="+", type=int, default=[256, 1024, 4096, 16384])
    p.add_argument("--scld-iterations", nargs="+", type=int, default=[0, 10, 40])
    p.add_argument("--scld-particles", nargs="+", type=int, default=[SCLD_PARTICLES],
                   help="SCLD's evaluation draws (num_particles); the training batch is the default")
    p.add_argument("--diffusion-iterations", nargs="+", type=int, default=[40, 400])
    p.add_argument("--eval", type=int, default=20000)
    p.add_argument("--efficiency-seeds", type=int, default=128, help="part efficiency: seeds 0..n-1")
    p.add_argument("--efficiency-particles", nargs="+", type=int, default=[SCLD_PARTICLES])
    p.add_argument("--efficiency-iterations", nargs="+", type=int, default=[0],
                   help="part efficiency: SCLD's training iterations before its draw (0: untrained)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=Path("benchmarks/results/smc.json"))
    p.add_argument("--also", nargs="*", type=Path, default=[], help="more result files read for --write")
    p.add_argument("--write", action="store_true", help="write docs/benchmarks.md's section and the plot")
    p.add_argument("--no-run", action="store_true", help="run nothing: only --write from the result files")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = json.loads(args.json.read_text()) if args.json.exists() else []
    done = {_key(r) for r in rows}
    for n in args.scld_particles:
        positive_int(n, "--scld-particles", minimum=2)

    def save():
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))

    if args.no_run:
        pass
    elif args.part == "synthetic":
        budgets = {"smc": args.particles, "scld": args.scld_iterations, "dis-lv": args.diffusion_iterations,
                   "dds-lv": args.diffusion_iterations}
        for name in args.targets:
            for method in args.methods:
                if method == "scld" and SCLDSampler is None:
                    continue
                for budget in budgets[method]:
                    for seed in args.seeds:
                        if method == "scld":
                            todo = [n for n in args.scld_particles
                                    if _key(dict(part="synthetic", target=name, method=method, budget=budget,
                                                 seed=seed, particles=n)) not in done]
                            new = run_scld(name, budget, todo, seed) if todo else []
                        else:
                            key = f"synthetic|{name}|{method}|{budget}|{seed}"
                            new = [] if key in done else [run_synthetic(name, method, budget, seed, args)]
                        for row in new:
                            row = dict(part="synthetic", **row)
                            print(f"{name:10s} {method:7s} budget {budget:6d} particles "
                                  f"{row.get('particles', ''):>6} seed {seed}: "
                                  f"|dlogZ| {row['error']:.4f} +- {row['stderr']:.4f}, "
                                  f"{row['evaluations']:.3g} evals, {row['wall_s']:.1f} s", flush=True)
                            rows.append(row)
                            save()
    elif args.part == "efficiency":
        for name in args.targets:
            for n in args.efficiency_particles:
                runs = [("smc", 0)] + [("scld", it) for it in args.efficiency_iterations]
                for method, it in runs:
                    for seed in range(args.efficiency_seeds):
                        row = dict(part="efficiency", target=name, method=method, particles=n, seed=seed,
                                   iterations=it)
                        if _key(row) in done:
                            continue
                        row = dict(part="efficiency", **run_efficiency(name, method, n, seed, it))
                        rows.append(row)
                        if seed % 16 == 15 or seed == args.efficiency_seeds - 1:
                            save()
                            print(f"{name:10s} {method:5s} {it} iterations, {n} particles: seeds 0-{seed} "
                                  "done", flush=True)
    else:
        from posteriordb_models import POSTERIORS

        names = [n for n in POSTERIORS if args.targets == list(TARGETS) or n in args.targets]
        for name in names:
            for method in ("smc", "scld"):
                key = f"posteriordb|{name}|{method}|0|{args.seeds[0]}"
                if key in done or (method == "scld" and SCLDSampler is None):
                    continue
                row = dict(part="posteriordb", **run_posteriordb(name, method, args.seeds[0]))
                print(f"{name:40s} {method:5s}: log Z {row.get('log_z', math.nan):.4f} +- "
                      f"{row.get('stderr', math.nan):.4f} ({row['wall_s']:.1f} s) {row.get('error', '')}",
                      flush=True)
                rows.append(row)
                save()

    if args.write:
        for extra in args.also:
            rows = rows + json.loads(extra.read_text())
        path = plots(rows)
        cmd = "python benchmarks/smc.py " + " ".join(argv if argv is not None else sys.argv[1:])
        body = [
            "## Tempered SMC and SCLD against the diffusion samplers (`benchmarks/smc.py`)",
            "",
            f"Rows made by {MADE_BY}; this section by `{cmd}`. Machine: {_report.machine()}, "
            "shared with other processes (load 4-9 for the diffusion samplers and the SMC rows up to 16384 "
            "particles, 1-2 for the SMC rows from 65536, 2-3 for the SCLD rows): wall seconds are inflated, "
            "target evaluations are not. "
            "Every sampler with the package defaults (preconditioned); `target evals`: rows at which the "
            "log density or its score was computed, the preconditioner's fit, training and the evaluation "
            "draw included; medians over seeds.",
            "",
            synthetic_section(rows, args),
        ]
        if path is not None:
            body += ["", f"![smc_logz_vs_evaluations](img/{path.name})"]
        if any(r["part"] == "efficiency" for r in rows):
            body += ["", "### Equal-cost precision over many seeds: SMC and SCLD", "",
                     f"Rows made by {EFFICIENCY_MADE_BY}.", "", efficiency_section(rows)]
        if any(r["part"] == "posteriordb" for r in rows):
            body += ["", "### posteriordb: SMC and SCLD evidences (defaults, one seed)", "",
                     posteriordb_section(rows)]
        _report.write_section(SECTION, "\n".join(body))


if __name__ == "__main__":
    main()
