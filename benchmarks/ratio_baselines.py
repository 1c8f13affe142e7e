"""Classical baselines (`densratio` uLSIF / KLIEP) and large d on the correlated-Gaussian MI task.

Writes section "ratio_baselines" of docs/benchmarks.md. Run:
``OMP_NUM_THREADS=1 python benchmarks/ratio_baselines.py [--quick] [--skip-large]``.

Task (DRE-infinity's, as in benchmarks/ratio.py): ``d/2`` pairs of correlation
``rho = sqrt(1 - exp(-4 MI / d))``; numerator = joint, denominator = product of marginals = ``N(0, I)``;
MI estimate = mean ``log r`` over 5000 held-out joint points. `densratio` (PyPI, numpy-only; the
``bench`` extra) fits a Gaussian-kernel model with 100 centres on ``n`` samples per side, bandwidth and
ridge chosen by cross-validation; its ratio is clipped at ``1e-300`` before the log. Our rows use the
per-axis quadratic time-score network (objective "stein") with the same ground truth; goal G8: ours at
least 10x closer to the truth at ``d >= 10``; G3: ``d = 320`` within 2 nats in 10 minutes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, markdown_table, write_section  # noqa: E402
from ratio import mi_task  # noqa: E402

from pyro_sde.ratio import SecantRatioEstimator, TangentRatioEstimator  # noqa: E402


def densratio_row(d: int, mi: float, method: str, n: int, seed: int, n_eval: int = 5000):
    """Fit ``densratio(x_joint, x_product, method)`` on ``n`` samples per side; MI estimate and wall."""
    from densratio import densratio

    torch.manual_seed(seed)
    np.random.seed(seed)  # densratio draws its kernel centres and CV folds from numpy's global RNG
    gp = mi_task(d, mi)
    x_num = gp.sample(n).double().numpy()
    x_den = torch.randn(n, d, dtype=torch.float64).numpy()
    xq = gp.sample(n_eval)
    truth = gp.log_ratio(xq).double()
    xq = xq.double()
    t0 = time.perf_counter()
    fitted = densratio(x_num, x_den, method=method, verbose=False)
    wall = time.perf_counter() - t0
    r = np.asarray(fitted.compute_density_ratio(xq.numpy()), dtype=np.float64)
    lr = torch.as_tensor(np.log(np.clip(r, 1e-300, None)))
    return dict(mi=lr.mean().item(), rmse=((lr - truth) ** 2).mean().sqrt().item(), wall=wall)


def ours_row(d: int, mi: float, kind: str, iters: int, seed: int, nfe: int, n_eval: int = 5000):
    """Quadratic tangent (NFE ``nfe``) or secant, one-sided (``p_den = N(0, I)`` exactly)."""
    torch.manual_seed(seed)
    gp = mi_task(d, mi)
    xq = gp.sample(n_eval)
    truth = gp.log_ratio(xq)
    cls = TangentRatioEstimator if kind == "tangent" else SecantRatioEstimator
    t0 = time.perf_counter()
    est = cls(d, network="quadratic").fit(gp.sample, None, num_iterations=iters, batch_size=512,
                                          progress_bar=False)
    wall = time.perf_counter() - t0
    with torch.no_grad():
        lr = est.log_ratio(xq, nfe)
    return dict(mi=lr.mean().item(), rmse=((lr - truth) ** 2).mean().sqrt().item(), wall=wall)


def table(jobs, header_extra=None):
    rows = []
    for label, d, mi, fn, seeds, extra in jobs:
        runs = [fn(s) for s in seeds]
        err = [abs(r["mi"] - mi) for r in runs]
        rows.append([label, d, mi, len(runs), extra, float(np.mean([r["mi"] for r in runs])),
                     float(np.mean(err)), float(max(err)), float(np.mean([r["rmse"] for r in runs])),
                     float(np.mean([r["wall"] for r in runs]))])
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="n = 500, 10%% of the iterations, 1 seed")
    ap.add_argument("--skip-large", action="store_true", help="skip d = 80 / 320")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n", type=int, default=2000, help="samples per side for densratio")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    n = 500 if args.quick else args.n
    scale = 0.1 if args.quick else 1.0
    seeds = [0] if args.quick else list(range(args.seeds))
    iters = max(1, int(3000 * scale))
    jobs = []
    try:
        import densratio  # noqa: F401

        have_densratio = True
    except ImportError:
        have_densratio = False
        print("densratio is not installed: skipping its rows (pip install densratio==0.4.0)")
    for d, mi in ((2, 0.5), (10, 2.5), (40, 10.0)):
        if have_densratio:
            for method in ("uLSIF", "KLIEP"):
                jobs.append((f"densratio {method} (n = {n})", d, mi,
                             lambda s, d=d, mi=mi, m=method: densratio_row(d, mi, m, n, s), seeds, "-"))
        jobs.append(("tangent-quadratic", d, mi,
                     lambda s, d=d, mi=mi: ours_row(d, mi, "tangent", iters, s, 64), seeds, "64"))
    large = []
    if not args.skip_large:
        for d, mi, sd in ((80, 20.0, seeds), (320, 80.0, seeds[:1])):
            large.append(("tangent-quadratic", d, mi,
                          lambda s, d=d, mi=mi: ours_row(d, mi, "tangent", iters, s, 64), sd, "64"))
            large.append(("secant-quadratic", d, mi,
                          lambda s, d=d, mi=mi: ours_row(d, mi, "secant", iters, s, 2), sd, "2"))
    header = ["method", "d", "true MI", "seeds", "NFE", "MI est", "mean abs err", "max abs err",
              "log r RMSE", "fit s"]
    rows = table(jobs)
    rows_large = table(large) if large else []
    large_text = ("" if not rows_large else f"""
Larger d (issue 5: d = 80 / 320 with MI 20 / 80; goal G3 at d = 320: <= 2.0 nats in <= 10 minutes),
quadratic network, {iters} iterations of batch 512 (d = 320: one seed):

{markdown_table(header, rows_large)}
""")
    body = f"""## Density-ratio baselines and large d (`benchmarks/ratio_baselines.py`)

Regenerate: `OMP_NUM_THREADS=1 python benchmarks/ratio_baselines.py` (needs `densratio==0.4.0`).
Machine: {machine()}.

Correlated-Gaussian MI (DRE-infinity task, as in the "ratio" section), 5000 held-out evaluation points.
`densratio` 0.4.0 (uLSIF / KLIEP, Gaussian kernels, 100 centres, cross-validated bandwidth and ridge) is
fitted on n samples of the joint and n of the product of marginals; our quadratic tangent (objective
"stein", {iters} iterations, batch 512, fresh samples) knows the denominator is N(0, I). Goal G8: ours at
least 10x closer to the true MI than `densratio` at d >= 10.

{markdown_table(header, rows)}
{large_text}"""
    write_section("ratio_baselines", body)
    return rows, rows_large


if __name__ == "__main__":
    main()
