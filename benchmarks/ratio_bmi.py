"""Beyond-Normal MI benchmark: our ratio estimators on the 40 closed-form BMI tasks (benchmarks/bmi_tasks.py).

Writes section "ratio_bmi" of docs/benchmarks.md and docs/img/ratio_bmi.png. Run:
``OMP_NUM_THREADS=1 python benchmarks/ratio_bmi.py [--quick] [--tasks a,b] [--methods m1,m2]``.

Protocol (BMI v1): N = 5000 pairs per task and seed; ``pyro_sde.ratio.mutual_information`` with the
product of marginals by re-pairing (``denominator="shuffle"``), 20 % of the pairs held out for the estimate.
Every method sees the same preprocessed pairs: per-coordinate normal scores
(``bmi_tasks.marginal_gaussianize``, an injective coordinate-wise map) then whitening of X and of Y
(an invertible linear map of each block), so the MI is unchanged, unless the method name ends in
``-raw`` (per-coordinate standardisation only, which the estimators do themselves). Results are
appended per run to a JSON-lines cache (``--cache``), so an interrupted run can be reported with
``--report-only``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, markdown_table, write_section  # noqa: E402
from bmi_tasks import marginal_gaussianize, tasks  # noqa: E402

from pyro_sde.ratio import (  # noqa: E402
    ClassifierRatioEstimator,
    TangentRatioEstimator,
    mutual_information,
)

IMG = Path(__file__).resolve().parents[1] / "docs" / "img"
#: name -> (estimator factory dim -> estimator, fit iterations, NFE of log_ratio)
METHODS = {
    "tangent-quadratic": (lambda d: TangentRatioEstimator(d, network="quadratic"), 2000, 32),
    "tangent-mlp": (lambda d: TangentRatioEstimator(d, network="mlp",
                                                    network_options=dict(hidden_dim=128)), 1500, 32),
    "tangent-quadratic-sn": (lambda d: TangentRatioEstimator(d, network="quadratic"), 2000, 32),
    "classifier": (lambda d: ClassifierRatioEstimator(d, hidden_dim=128), 1500, 1),
    "classifier-raw": (lambda d: ClassifierRatioEstimator(d, hidden_dim=128), 1500, 1),
    "classifier-quad-es": (lambda d: ClassifierRatioEstimator(d, hidden_dim=128, quadratic=True), 1500, 1),
    "classifier-quad-es-refit": (lambda d: ClassifierRatioEstimator(d, hidden_dim=128, quadratic=True),
                                 1500, 1),
}
#: extra ``mutual_information`` options per method (early stopping on 20 % of the training pairs; ``refit``:
#: then retrain on all training pairs for the early-stopped number of steps)
OPTIONS = {"classifier-quad-es": dict(validation=0.2),
           "classifier-quad-es-refit": dict(validation=0.2, refit=True)}
THRESHOLD = 0.10  # goal G7: |error| <= 0.10 nats on >= 32 of 40 tasks


def whiten(x: np.ndarray) -> np.ndarray:
    """``x`` ``(n, d)`` times the inverse symmetric square root of its sample covariance (an invertible
    linear map of one block: MI unchanged, and a Gaussian block becomes ``N(0, I)``)."""
    x = x - x.mean(0)
    vals, vecs = np.linalg.eigh(np.atleast_2d(np.cov(x.T)))
    return x @ (vecs / np.sqrt(vals)) @ vecs.T


def run_one(task, method: str, seed: int, n: int, scale: float) -> dict:
    """Fit ``method`` on ``n`` pairs of ``task`` (seed ``seed``); MI estimate, bootstrap stderr, wall time."""
    make, iters, nfe = METHODS[method]
    x, y = task.sample(n, seed)
    if not method.endswith("-raw"):
        x, y = whiten(marginal_gaussianize(x)), whiten(marginal_gaussianize(y))
    torch.manual_seed(seed)
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    est = make(task.dim_x + task.dim_y)
    t0 = time.perf_counter()
    den = "standard_normal" if method.endswith("-sn") else "shuffle"
    res = mutual_information(xt, yt, est, denominator=den, num_steps=nfe,
                             num_iterations=max(1, int(iters * scale)), batch_size=512, progress_bar=False,
                             **OPTIONS.get(method, {}))
    wall = time.perf_counter() - t0
    return dict(task=task.name, method=method, seed=seed, n=n, iters=max(1, int(iters * scale)), nfe=nfe,
                truth=task.mutual_information, estimate=res.estimate.item(), stderr=res.stderr.item(),
                error=res.estimate.item() - task.mutual_information, wall=wall)


def load_cache(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarise(records: list[dict], task_list, methods) -> tuple[list[list], list[list]]:
    """Per-task rows (mean over seeds of the estimate, mean |error|) and a per-method summary."""
    by = {}
    for r in records:
        by.setdefault((r["task"], r["method"]), []).append(r)
    rows, summary = [], []
    for task in task_list:
        row = [task.name, f"{task.dim_x}x{task.dim_y}", task.mutual_information]
        for m in methods:
            rs = by.get((task.name, m), [])
            row.append(f"{np.mean([abs(r['error']) for r in rs]):.3f}" if rs else "-")
        rows.append(row)
    for m in methods:
        errs = {t.name: np.mean([abs(r["error"]) for r in by[(t.name, m)]]) for t in task_list
                if (t.name, m) in by}
        if not errs:
            continue
        walls = [r["wall"] for t in task_list for r in by.get((t.name, m), [])]
        seeds = sorted({r["seed"] for t in task_list for r in by.get((t.name, m), [])})
        within = sum(e <= THRESHOLD for e in errs.values())
        summary.append([m, len(errs), len(seeds), f"{within} / {len(errs)}",
                        int(sum(e <= 0.25 for e in errs.values())), float(np.median(list(errs.values()))),
                        float(max(errs.values())), float(np.mean(walls))])
    return rows, summary


def plot(records, task_list, methods, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4.5))
    names = [t.name for t in task_list]
    pos = {n: i for i, n in enumerate(names)}
    for k, m in enumerate(methods):
        rs = [r for r in records if r["method"] == m and r["task"] in pos]
        if rs:
            ax.scatter([pos[r["task"]] + 0.15 * (k - 1) for r in rs], [r["error"] for r in rs], s=14, label=m)
    ax.axhspan(-THRESHOLD, THRESHOLD, color="0.9", zorder=0)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_ylabel("MI estimate - truth (nats)")
    ax.set_title("Beyond-Normal tasks: error per task and seed (grey band: +-0.10 nats)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="10%% of the iterations, 1 seed, n = 2000")
    ap.add_argument("--tasks", default=None, help="comma-separated task names (default: all 40)")
    ap.add_argument("--methods",
                    default="tangent-quadratic,classifier,classifier-quad-es,classifier-quad-es-refit")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--cache", default="/tmp/ratio_bmi_results.jsonl")
    ap.add_argument("--report-only", action="store_true", help="write the section from the cache")
    ap.add_argument("--no-write", action="store_true", help="do not write docs/benchmarks.md or the plot")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    task_list = tasks(None if args.tasks is None else args.tasks.split(","))
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {list(METHODS)}")
    scale, n = (0.1, 2000) if args.quick else (1.0, args.n)
    cache = Path(args.cache)
    records = load_cache(cache)
    done = {(r["task"], r["method"], r["seed"]) for r in records if r["n"] == n}
    if not args.report_only:
        from tqdm.auto import tqdm

        jobs = [(t, m, s) for t in task_list for m in methods for s in range(args.seeds)
                if (t.name, m, s) not in done]
        for task, m, s in tqdm(jobs, desc="bmi"):
            rec = run_one(task, m, s, n, scale)
            records.append(rec)
            with cache.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"{task.name:45s} {m:18s} seed {s} est {rec['estimate']:.3f} truth {rec['truth']:.3f} "
                  f"err {rec['error']:+.3f} ({rec['wall']:.1f} s)", flush=True)
    records = [r for r in records if r["n"] == n]
    rows, summary = summarise(records, task_list, methods)
    for row in summary:
        print(row)
    if args.no_write:
        return records
    plot(records, task_list, methods, IMG / "ratio_bmi.png")
    iters = ", ".join(f"{m} {int(METHODS[m][1] * scale)} iterations NFE {METHODS[m][2]}" for m in methods)
    body = f"""## Beyond-Normal MI tasks (`benchmarks/ratio_bmi.py`)

Regenerate: `OMP_NUM_THREADS=1 python benchmarks/ratio_bmi.py --seeds 2` (the refit row: `--methods
classifier-quad-es-refit --seeds 3`). Machine: {machine()}.

The 40 closed-form tasks of the BMI benchmark (Czyz et al. 2023), samplers reimplemented in
`benchmarks/bmi_tasks.py` (ground truths in closed form, checked in `tests/test_bmi_tasks.py`).
N = {n} pairs per task and seed, `mutual_information(..., denominator="shuffle")`, 20 % held out for the
estimate; inputs are per-coordinate normal scores, then X and Y are whitened separately (injective
maps of each block: MI unchanged; `-raw` = standardised raw data). The five 1x1 Gaussian-copula tasks
give identical normal scores (rank-based), hence identical rows. Budget per task: {iters}; batch 512,
1 thread. Cells: |MI estimate - truth| in nats (mean over seeds).

`classifier-quad-es` = `ClassifierRatioEstimator(d, hidden_dim=128, quadratic=True)` with
`mutual_information(..., validation=0.2)`: the logit is a closed-form Gaussian log ratio (only the
covariance eigen-directions clearly outside the Marchenko-Pastur noise bulk) plus an MLP that starts at
zero; 20 % of the training pairs (and re-pairings among them only) form a validation set, the validation
loss of the averaged weights is checked every 25 steps and the best weights are restored. One fixed
configuration for all tasks; model selection sees only training pairs, never the truth. Diagnosis that led
to it: the plain classifier *under*-estimates on the 25x25 and 50x50 Gaussian tasks because it over-fits
the 4000 training pairs (dense 50x50: held-out loss rises from step ~150 on, estimate -2.0 vs truth 1.62
at step 1500 while the training-pair mean log ratio is 2.9).

`classifier-quad-es-refit` = the same with `mutual_information(..., validation=0.2, refit=True)`: once
early stopping has picked the step count k*, a copy of the estimator with the same initial weights is
trained on all 4000 training pairs (validation pairs included) for the first k* steps of the same
1500-step schedule (`fit(..., stop_after=k*)`), so the 20 % validation split costs no training data.
The wall time counts both fits (3 seeds, on a loaded machine). Over 3 seeds it passes the three
Student-t 3x3 tasks (0.088-0.093, from 0.102-0.103 without the refit over 2 seeds) and the
spiral-normal-CDF 25x25 (0.065, from 0.101), with little margin: Student-t 2x2 dof 1 is at 0.083 and
spiral-normal-CDF 3x3 just fails at 0.118. Tried and dropped: the refit with a fresh cosine
schedule over k* steps (Student-t 3x3 0.11-0.135, worse) and a Donsker-Varadhan normalisation of the
held-out estimate (the held-out log-partition is positive, so it lowers the estimate further). Still
failing: spirals (norm-dependent rotation) and Student-t 5x5, whose held-out estimate hardly moves from
0 before the network starts to memorise the 4000 joint pairs.

Goal (issue 5, G7): <= 0.10 nats on at least 32 of 40 tasks, <= 0.25 on all.

{markdown_table(["method", "tasks run", "seeds", "within 0.10", "within 0.25", "median abs err",
                 "max abs err", "wall s / task"], summary)}

{markdown_table(["task", "dims", "true MI"] + methods, rows)}

![errors per task](img/ratio_bmi.png)
"""
    write_section("ratio_bmi", body)
    return records


if __name__ == "__main__":
    main()
