"""FDRL benchmark (issue goals G9-G11): the 2-D density chasm, four 2-D toys, scikit-learn digits.

Writes section "fdrl" of docs/benchmarks.md and plots docs/img/fdrl_*.png. Run:
``OMP_NUM_THREADS=1 python benchmarks/fdrl.py [--quick] [--tasks chasm toys digits] [--toys moons ...]``.
Results of separate runs are merged through a JSON cache (``--results``), so parts can be run one at a time.

* chasm: prior ``N(0, 0.1 I)``, data ``N((6, 6), 0.1 I)``; mean error, per-axis std / 0.316, energy distance
  (ED) of 2000 samples to 2000 target samples, and the target-vs-target floor.
* toys: 8gaussians, swissroll, checkerboard, moons (standardised), data-dependent prior; ED of 2000 samples
  against 2000 held-out samples vs the target-vs-target floor (mean of 5 pairs).
* digits: ``load_digits`` / 16 (pixels in [0, 1]), 80/20 split (``random_state=0``), 360 samples (clipped to
  [0, 1]) vs the 360 test images: ED, Frechet distance of a logistic-regression classifier's logits
  (FD-logit), mean max class probability, classes hit; rows for the data-dependent prior alone and held-out
  training images (the floor). Times are CPU seconds of the process (``time.process_time``) and wall seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import machine, markdown_table, write_section  # noqa: E402

from pyro_sde.ratio.fdrl import FlowGuidedGenerator, energy_distance  # noqa: E402

IMG = Path(__file__).resolve().parents[1] / "docs" / "img"
TOYS = ("8gaussians", "swissroll", "checkerboard", "moons")
# generator settings per task (standardised units; eta * K must be large against the distance to cross)
CHASM = dict(loss="lsif", num_flow_steps=75, num_refine_steps=0, step_size=1.4, noise_std=0.03, hidden_dim=64,
             num_layers=3)
TOY = dict(loss="lsif", num_flow_steps=20, num_refine_steps=0, step_size=1.5, noise_std=0.03, hidden_dim=128,
           num_layers=3)
DIGITS = dict(loss="lsif", num_flow_steps=30, num_refine_steps=20, step_size=0.3, noise_std=0.01,
              hidden_dim=256, num_layers=3)


def _describe(cfg: dict) -> str:
    return (f"{cfg['loss'].upper()}-chi2, K = {cfg['num_flow_steps']} + {cfg['num_refine_steps']}, "
            f"eta = {cfg['step_size']}, nu = {cfg['noise_std']}")


# ------------------------------------------------------------------------------------------------ data
def toy_data(name: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, 2)`` samples of a 2-D toy, standardised (roughly zero mean, unit variance per axis)."""
    g = generator
    if name == "8gaussians":
        ang = torch.randint(8, (n,), generator=g) * (math.pi / 4)
        x = 2.0 * torch.stack([ang.cos(), ang.sin()], -1) + 0.2 * torch.randn(n, 2, generator=g)
        return x / 1.44
    if name == "swissroll":
        t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
        x = torch.stack([t * t.cos(), t * t.sin()], -1) / 5.0 + 0.1 * torch.randn(n, 2, generator=g)
        return (x - torch.tensor([0.1, 0.3])) / 1.55
    if name == "checkerboard":
        x1 = 4 * torch.rand(n, generator=g) - 2
        x2 = torch.rand(n, generator=g) - torch.randint(2, (n,), generator=g) * 2.0
        x2 = x2 + (x1.floor() % 2)
        return torch.stack([x1, x2], -1) * 2.0 / 2.3
    if name == "moons":
        half = torch.randint(2, (n,), generator=g)
        t = math.pi * torch.rand(n, generator=g)
        upper = torch.stack([t.cos(), t.sin()], -1)
        lower = torch.stack([1 - t.cos(), 0.5 - t.sin()], -1)
        x = torch.where(half[:, None] == 0, upper, lower) + 0.05 * torch.randn(n, 2, generator=g)
        return (x - torch.tensor([0.5, 0.25])) / torch.tensor([0.87, 0.5])
    raise ValueError(f"unknown toy {name!r}")


def floor(sampler, n: int, pairs: int = 5) -> float:
    return sum(energy_distance(sampler(n), sampler(n)).item() for _ in range(pairs)) / pairs


def timed_fit(gen, data, **kw):
    t0, c0 = time.perf_counter(), time.process_time()
    gen.fit(data, **kw)
    return time.process_time() - c0, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ tasks
def run_chasm(iters: int, seed: int) -> dict:
    torch.manual_seed(seed)
    s = math.sqrt(0.1)
    data = 6.0 + s * torch.randn(8000, 2)
    prior = torch.distributions.MultivariateNormal(torch.zeros(2), 0.1 * torch.eye(2))
    gen = FlowGuidedGenerator(2, prior=prior, **CHASM)
    cpu, wall = timed_fit(gen, data, num_iterations=iters, batch_size=256, lr=1e-3, progress_bar=True)
    x = gen.sample(2000)
    target = 6.0 + s * torch.randn(2000, 2)
    along = ((x - 6.0) @ torch.tensor([1.0, 1.0]) / math.sqrt(2)).std().item() / s  # direction of travel
    out = dict(iters=iters, cpu=cpu, wall=wall, mean_err=(x.mean(0) - 6.0).norm().item(),
               std_ratio=(x.std(0) / s).tolist(), along=along, ed=energy_distance(x, target).item(),
               floor=floor(lambda n: 6.0 + s * torch.randn(n, 2), 2000),
               prior_ed=energy_distance(prior.sample((2000,)), target).item())
    _scatter({"chasm": (x, target)}, IMG / "fdrl_chasm.png", lims=(-0.5, 7.5))
    return out


def run_toy(name: str, iters: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    data = toy_data(name, 20000, g)
    gen = FlowGuidedGenerator(2, **TOY)
    cpu, wall = timed_fit(gen, data, num_iterations=iters, batch_size=256, lr=1e-3, progress_bar=True)
    x = gen.sample(2000)
    held = toy_data(name, 2000, g)
    prior_x = gen.sample_prior(2000) * gen.scale + gen.shift
    return dict(iters=iters, cpu=cpu, wall=wall, ed=energy_distance(x, held).item(),
                floor=floor(lambda n: toy_data(name, n, g), 2000),
                prior_ed=energy_distance(prior_x, held).item(),
                samples=x.tolist())


def _digit_tools(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    d = load_digits()
    xtr, xte, ytr, yte = train_test_split(d.data / 16.0, d.target, test_size=0.2, random_state=0)
    clf = LogisticRegression(max_iter=5000).fit(xtr, ytr)
    return xtr, xte, clf


def digit_metrics(x, xte, clf) -> dict:
    """ED, FD-logit, mean max-probability, classes hit of samples ``x`` (numpy, pixels in [0, 1])."""
    import numpy as np
    from scipy import linalg

    x = np.clip(x, 0.0, 1.0)
    la, lb = clf.decision_function(x), clf.decision_function(xte)
    ma, mb = la.mean(0), lb.mean(0)
    ca, cb = np.cov(la, rowvar=False), np.cov(lb, rowvar=False)
    covmean = linalg.sqrtm(ca @ cb).real
    fd = float(((ma - mb) ** 2).sum() + np.trace(ca + cb - 2 * covmean))
    prob = clf.predict_proba(x)
    ed = energy_distance(torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(xte, dtype=torch.float64))
    return dict(ed=ed.item(), fd=fd, maxprob=float(prob.max(1).mean()), classes=int(len(set(prob.argmax(1)))))


def run_digits(iters: int, seed: int) -> dict:
    xtr, xte, clf = _digit_tools(seed)
    torch.manual_seed(seed)
    data = torch.as_tensor(xtr, dtype=torch.float32)
    gen = FlowGuidedGenerator(64, **DIGITS)
    cpu, wall = timed_fit(gen, data, num_iterations=iters, batch_size=128, lr=1e-3, progress_bar=True)
    n = xte.shape[0]
    x = gen.sample(n).clamp(0, 1)
    out = dict(iters=iters, cpu=cpu, wall=wall, fdrl=digit_metrics(x.numpy(), xte, clf))
    prior = (gen.sample_prior(n) * gen.scale + gen.shift).clamp(0, 1)
    out["prior"] = digit_metrics(prior.numpy(), xte, clf)
    rng = torch.Generator().manual_seed(seed)
    out["floor"] = digit_metrics(xtr[torch.randperm(len(xtr), generator=rng)[:n].numpy()], xte, clf)
    _digit_grid(x[:100], IMG / "fdrl_digits.png")
    _digit_grid(prior[:100], IMG / "fdrl_digits_prior.png")
    return out


# ------------------------------------------------------------------------------------------------ plots
def _scatter(panels: dict, path: Path, lims=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    for ax, (name, (x, ref)) in zip(axes[0], panels.items()):
        ref, x = torch.as_tensor(ref), torch.as_tensor(x)
        ax.scatter(ref[:, 0], ref[:, 1], s=1, c="lightgray", label="target")
        ax.scatter(x[:, 0], x[:, 1], s=1, c="C0", label="FDRL")
        ax.set_title(name)
        ax.set_aspect("equal")
        if lims:
            ax.set_xlim(*lims)
            ax.set_ylim(*lims)
    axes[0][0].legend(loc="upper left", markerscale=5, fontsize=7)
    fig.tight_layout()
    IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _digit_grid(x: torch.Tensor, path: Path, rows: int = 10):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = x.shape[0]
    cols = math.ceil(n / rows)
    grid = torch.ones(rows * 9 + 1, cols * 9 + 1)
    for k in range(n):
        r, c = divmod(k, cols)
        grid[1 + 9 * r:9 + 9 * r, 1 + 9 * c:9 + 9 * c] = 1 - x[k].reshape(8, 8)
    IMG.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, grid.numpy(), cmap="gray", vmin=0, vmax=1)


# ------------------------------------------------------------------------------------------------ report
def report(res: dict, cmd: str) -> str:
    lines = [f"Regenerate: `{cmd}` ({machine()}). Goals G9-G11 of the FDRL issue; CPU s = process time.", ""]
    if "chasm" in res:
        c = res["chasm"]
        ok = c["mean_err"] <= 0.05 and all(abs(v - 1) <= 0.1 for v in c["std_ratio"]) and c["ed"] <= 0.01
        ok = ok and c["cpu"] <= 60
        lines += [f"**2-D chasm** N(0, 0.1 I) -> N((6, 6), 0.1 I), {_describe(CHASM)} "
                  "(goal: mean error <= 0.05, std within 10 %, ED <= 0.01, train <= 60 s; "
                  f"{'met' if ok else 'missed'})", "",
                  markdown_table(["iterations", "mean error", "std / 0.316 (x, y)", "along-track std / 0.316",
                                  "ED", "floor", "prior ED", "CPU s", "wall s"],
                                 [[c["iters"], c["mean_err"], "{:.3f}, {:.3f}".format(*c["std_ratio"]),
                                   c.get("along", float("nan")), c["ed"], c["floor"], c["prior_ed"],
                                   round(c["cpu"]), round(c["wall"])]]),
                  "", "![chasm](img/fdrl_chasm.png)", ""]
    toys = [t for t in TOYS if t in res.get("toys", {})]
    if toys:
        rows = []
        for t in toys:
            r = res["toys"][t]
            rows.append([t, r["iters"], r["ed"], r["floor"], r["ed"] / r["floor"], r["prior_ed"],
                         "met" if r["ed"] <= 2 * r["floor"] and r["cpu"] <= 120 else "missed",
                         round(r["cpu"]), round(r["wall"])])
        lines += [f"**2-D toys** (n = 2000, data-dependent prior, {_describe(TOY)}; "
                  "goal: ED <= 2x floor in <= 2 min)", "",
                  markdown_table(["toy", "iterations", "ED", "floor", "ED / floor", "prior ED", "goal",
                                  "CPU s", "wall s"], rows), "", "![toys](img/fdrl_toys.png)", ""]
    if "digits" in res:
        d = res["digits"]
        rows = [[name, m["ed"], m["fd"], m["maxprob"], m["classes"]] for name, m in
                ((f"FDRL ({_describe(DIGITS)})", d["fdrl"]),
                 ("data-dependent prior alone", d["prior"]), ("held-out train images (floor)", d["floor"]))]
        f = d["fdrl"]
        ok = (f["ed"] <= 0.02 and f["fd"] <= 1.5 and f["maxprob"] >= 0.85 and f["classes"] == 10
              and d["cpu"] <= 600)
        lines += [f"**Digits** (360 samples vs 360 test images, {d['iters']} iterations, "
                  f"{round(d['cpu'])} CPU s, {round(d['wall'])} wall s; goal ED <= 0.02, FD-logit <= 1.5, "
                  f"max-prob >= 0.85, 10 classes, <= 10 min: {'met' if ok else 'missed'})", "",
                  markdown_table(["samples", "ED", "FD-logit", "mean max-prob", "classes"], rows), "",
                  "![digits](img/fdrl_digits.png)", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10%% of the iterations (a smoke run)")
    tasks = ["chasm", "toys", "digits"]
    ap.add_argument("--tasks", nargs="*", default=tasks, choices=tasks, help="none: only rewrite the report")
    ap.add_argument("--toys", nargs="+", default=list(TOYS), choices=list(TOYS))
    ap.add_argument("--chasm-iters", type=int, default=1000)
    ap.add_argument("--toy-iters", type=int, default=5000)
    ap.add_argument("--digits-iters", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", default="/tmp/fdrl_benchmark.json", help="JSON cache merged across runs")
    ap.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scale = 0.1 if args.quick else 1.0
    path = Path(args.results)
    res = json.loads(path.read_text()) if path.exists() else {}
    if "chasm" in args.tasks:
        res["chasm"] = run_chasm(max(10, int(args.chasm_iters * scale)), args.seed)
        print("chasm", {k: v for k, v in res["chasm"].items()})
    if "toys" in args.tasks:
        res.setdefault("toys", {})
        for t in args.toys:
            res["toys"][t] = run_toy(t, max(10, int(args.toy_iters * scale)), args.seed)
            print(t, {k: v for k, v in res["toys"][t].items() if k != "samples"})
            path.write_text(json.dumps(res))
    if "digits" in args.tasks:
        res["digits"] = run_digits(max(10, int(args.digits_iters * scale)), args.seed)
        print("digits", res["digits"])
    path.write_text(json.dumps(res))
    toys = {t: r for t, r in res.get("toys", {}).items() if t in TOYS}
    if toys:
        g = torch.Generator().manual_seed(123)
        _scatter({t: (r["samples"], toy_data(t, 2000, g)) for t, r in toys.items()}, IMG / "fdrl_toys.png",
                 lims=(-3, 3))
    if not args.no_write:
        write_section("fdrl", report(res, "OMP_NUM_THREADS=1 python benchmarks/fdrl.py" +
                                     (" --quick" if args.quick else "")))


if __name__ == "__main__":
    main()
