"""Bridge importance sampling benchmark: bias against exact densities as M grows (plot), ESS and
log-likelihood RMSE vs exact, timings, MAP recovery on long-gap OU data.

Writes the section "bridges" of docs/benchmarks.md and docs/img/bridges_bias_vs_M.png. Run:
``OMP_NUM_THREADS=1 python benchmarks/bridges.py`` (``--quick`` for fewer repeats / training iterations;
``--parts bias,recovery`` re-runs only those parts and keeps the other tables of the current section).
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import time
from pathlib import Path

import torch
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import DOC, machine, markdown_table, write_section  # noqa: E402

from pyro_sde.infer.bridge import (  # noqa: E402
    AmortisedBridge,
    LearnedBridge,
    ScoreNetwork,
    bridge_log_prob,
    bridge_log_weights,
)
from pyro_sde.sde.distributions import DiscretelyObservedSDE  # noqa: E402
from pyro_sde.sde.models import CIR, GeometricBrownianMotion, LandmarkBrownian, OrnsteinUhlenbeck  # noqa: E402

D64 = torch.float64
IMG = Path(__file__).resolve().parents[1] / "docs" / "img" / "bridges_bias_vs_M.png"


def t64(x):
    return torch.tensor(x, dtype=D64)


def cir_log_prob(kappa, theta, sigma, u, v, T):
    c = 2 * kappa / (sigma**2 * (1 - math.exp(-kappa * T)))
    return stats.ncx2.logpdf(
        2 * c * v, 4 * kappa * theta / sigma**2, 2 * c * u * math.exp(-kappa * T)
    ) + math.log(2 * c)


def problems():
    out = []
    for d in (1, 4, 16):
        sde = OrnsteinUhlenbeck(theta=t64(2.0), mean=0.0, sigma=t64(1.0), dim=d)
        u = torch.ones(d, dtype=D64)
        out.append(
            (
                f"OU d={d}",
                sde,
                u,
                u,
                sde.transition_log_prob(0.0, u, 1.0, u).item(),
                {1: 500, 4: 1000, 16: 1500}[d],
            )
        )
    gbm = GeometricBrownianMotion(t64(0.1), t64(0.4))
    out.append(
        (
            "GBM v=1.1",
            gbm,
            t64([1.0]),
            t64([1.1]),
            gbm.transition_log_prob(0.0, t64([1.0]), 1.0, t64([1.1])).item(),
            500,
        )
    )
    cir = CIR(t64(1.0), t64(1.0), t64(0.5))
    out.append(("CIR v=1.2", cir, t64([1.0]), t64([1.2]), cir_log_prob(1, 1, 0.5, 1, 1.2, 1), 500))
    k = 20
    ang = torch.linspace(0, 2 * math.pi, k + 1, dtype=D64)[:-1]
    q = torch.stack([ang.cos(), 0.6 * ang.sin()], -1)
    lm = LandmarkBrownian(q, t64(0.2), alpha=1.0, gamma=0.02)
    u = q.reshape(-1)
    v = u + lm.diffusion_factor(None, None).matvec(
        torch.randn(2 * k, generator=torch.Generator().manual_seed(0), dtype=D64)
    )
    out.append(("landmarks 20x2", lm, u, v, lm.transition_log_prob(0.0, u, 1.0, v).item(), 200))
    return out


def bias_problems():
    """``(name, sde, u, v, gap, exact log p)``: long gaps (rate x gap >= 2) and a Feller ratio near 1."""
    ou1 = OrnsteinUhlenbeck(theta=t64(2.0), mean=0.0, sigma=t64(1.0))
    B = t64([[1.5, 0.8], [-0.6, 0.9]])  # non-symmetric, eigenvalues 1.2 +- 0.67i
    G = t64([[0.7, 0.0, 0.2], [0.3, 0.5, 0.1]])
    ou2 = OrnsteinUhlenbeck(drift_matrix=B, mean=t64([0.3, -0.2]), diffusion_matrix=G, dim=2)
    gbm = GeometricBrownianMotion(t64(0.1), t64(0.4))
    cir = CIR(t64(2.0), t64(1.0), t64(0.5))
    feller = CIR(t64(1.5), t64(0.6), t64(1.3))
    u2, v2 = t64([1.0, -0.5]), t64([-0.2, 0.4])
    return [
        (
            "OU 1-D, theta gap 2",
            ou1,
            t64([1.0]),
            t64([1.0]),
            1.0,
            ou1.transition_log_prob(0.0, t64([1.0]), 1.0, t64([1.0])).item(),
        ),
        ("OU 2-D non-symm., gap 2", ou2, u2, v2, 2.0, ou2.transition_log_prob(0.0, u2, 2.0, v2).item()),
        (
            "GBM 1 -> 1.6, gap 3",
            gbm,
            t64([1.0]),
            t64([1.6]),
            3.0,
            gbm.transition_log_prob(0.0, t64([1.0]), 3.0, t64([1.6])).item(),
        ),
        ("CIR kappa gap 2", cir, t64([1.0]), t64([1.2]), 1.0, cir_log_prob(2.0, 1.0, 0.5, 1.0, 1.2, 1.0)),
        (
            "CIR Feller 1.07, kappa gap 2.25",
            feller,
            t64([0.6]),
            t64([0.4]),
            1.5,
            cir_log_prob(1.5, 0.6, 1.3, 0.6, 0.4, 1.5),
        ),
    ]


BIAS_ESTIMATORS = (  # (label, proposal, richardson, substep grid)
    ("forward", "forward", False, "uniform"),
    ("mdb", "mdb", False, "uniform"),
    ("guided_euler", "guided_euler", False, "uniform"),
    ("guided", "guided", False, "uniform"),
    ("mdb + Richardson", "mdb", True, "uniform"),
    ("guided + Richardson", "guided", True, "uniform"),
    ("guided + Richardson, time change", "guided", True, "time_change"),
)


def bias_curves(Ms, N, R):
    """Mean error and standard error of ``R`` estimates of ``log p(v | u)`` per problem, estimator, M."""
    out = {}
    for name, sde, u, v, gap, exact in bias_problems():
        for label, proposal, rich, grid in BIAS_ESTIMATORS:
            for M in Ms:
                errs = []
                for r in range(0, R, 50):  # bounded memory for the noise
                    k = min(50, R - r)
                    with torch.no_grad():
                        est, _ = bridge_log_prob(
                            sde,
                            0.0,
                            gap,
                            u.expand(k, -1),
                            v.expand(k, -1),
                            proposal=proposal,
                            num_particles=N,
                            num_substeps=M,
                            richardson=rich,
                            substep_grid=grid,
                        )
                    errs.append(est - exact)
                err = torch.cat(errs)
                out[name, label, M] = (err.mean().item(), err.std().item() / math.sqrt(R))
            print(name, label, [f"{out[name, label, M][0]:+.4f}" for M in Ms], flush=True)
    return out


def plot_bias(curves, Ms, path):
    """|bias| vs M on log-log axes, one panel per problem; hollow markers: |bias| < 2 SE (noise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [p[0] for p in bias_problems()]
    cols = 3
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), sharey=True)
    axes = axes.ravel()
    floor = 1e-6
    for ax, name in zip(axes, names):
        for i, (label, *_) in enumerate(BIAS_ESTIMATORS):
            b = [abs(curves[name, label, M][0]) for M in Ms]
            se = [curves[name, label, M][1] for M in Ms]
            color = f"C{i}"
            ax.plot(Ms, [max(x, floor) for x in b], color=color, lw=1.2, label=label)
            for M, x, e in zip(Ms, b, se):
                significant = x > 2 * e
                ax.plot(M, max(x, floor), "o", ms=4, color=color, mfc=color if significant else "white")
        ax.plot(Ms, [0.5 / M for M in Ms], "k:", lw=1, label="1/M")
        ax.plot(Ms, [2.0 / M**2 for M in Ms], "k--", lw=1, label="1/M^2")
        ax.axhline(0.005, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(Ms, [str(M) for M in Ms])
        ax.minorticks_off()
        ax.set_ylim(floor / 2, 3)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("substeps M")
    for ax in axes[::cols]:
        ax.set_ylabel("|bias| of log p-hat (nats)")
    for ax in axes[len(names) :]:
        ax.axis("off")
    handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].legend(handles, labels, fontsize=8, loc="center")
    fig.suptitle(
        "bias vs exact density (hollow: within 2 SE of 0; grey line 0.005; exact guided drawn at 1e-6)",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _box(sde, factor=2.0):
    """``{name: (value / factor, value * factor)}`` for the SDE's positive scalar parameters."""
    return {k: (v.item() / factor, v.item() * factor) for k, v in sde.params().items()
            if v.dim() == 0 and v.item() > 0}


def accuracy(R, N, M, quick):
    rows = []
    for name, sde, u, v, exact, iters in problems():
        proposals = ["euler", "forward", "mdb", "guided_euler", "guided", "learned", "amortised"]
        for prop in proposals:
            uu, vv = u.expand(R, -1), v.expand(R, -1)
            if prop in ("learned", "amortised"):
                t = time.perf_counter()
                n_it = iters // (4 if quick else 1)
                if prop == "learned":
                    bridge = LearnedBridge(u.shape[-1]).fit(sde, u[None], 1.0, num_iterations=n_it,
                                                            progress_bar=False)
                else:  # one fit over [value / 2, 2 value] for every positive parameter, evaluated inside
                    bridge = AmortisedBridge(u.shape[-1]).fit(sde, u[None], 1.0, parameter_box=_box(sde),
                                                              num_iterations=n_it, progress_bar=False)
                fit_s = time.perf_counter() - t
                with torch.no_grad():
                    lw = bridge.log_weights(sde, 0.0, 1.0, uu, vv, num_particles=N, num_substeps=M)
            else:
                fit_s = 0.0
                with torch.no_grad():
                    lw = bridge_log_weights(
                        sde, 0.0, 1.0, uu, vv, proposal=prop, num_particles=N, num_substeps=M
                    )
            n = lw.shape[0]
            est = lw.logsumexp(0) - math.log(n)
            ess = ((2 * lw.logsumexp(0) - (2 * lw).logsumexp(0)).exp() / n).mean().item()
            err = est - exact
            rows.append([name, prop, 100 * ess, err.pow(2).mean().sqrt().item(), err.mean().item(), fit_s])
            print(rows[-1], flush=True)
    return rows


def timing(repeats=30):
    """ms per log_prob and per forward+backward of the whole series: one 1-D interval (64 x 20) and a
    series of 200 intervals (all intervals in one batched call)."""
    rows = []
    for n_int in (1, 200):
        for prop in ("exact", "euler", "forward", "mdb", "mdb+R", "guided_euler", "guided", "learned",
                     "amortised"):
            theta, sigma = t64(2.0).requires_grad_(), t64(1.0).requires_grad_()
            times = torch.arange(n_int + 1, dtype=D64)
            x = torch.randn(n_int + 1, 1, dtype=D64)
            proposal, rich = prop.removesuffix("+R"), prop.endswith("+R")
            if prop == "learned":
                sde0 = OrnsteinUhlenbeck(theta=t64(2.0), mean=0.0, sigma=t64(1.0))
                proposal = LearnedBridge(1).fit(sde0, x[:-1], 1.0, num_iterations=20, progress_bar=False)
            if prop == "amortised":
                sde0 = OrnsteinUhlenbeck(theta=t64(2.0), mean=0.0, sigma=t64(1.0))
                proposal = AmortisedBridge(1).fit(sde0, x[:-1], 1.0, parameter_box=_box(sde0),
                                                  num_iterations=20, progress_bar=False)

            def run(backward, theta=theta, sigma=sigma, times=times, proposal=proposal, x=x, rich=rich):
                sde = OrnsteinUhlenbeck(theta=theta, mean=0.0, sigma=sigma)
                lp = DiscretelyObservedSDE(
                    sde,
                    times,
                    proposal=proposal,
                    num_particles=64,
                    num_substeps=20,
                    richardson=rich,
                    validate_args=False,
                ).log_prob(x)
                if backward:
                    lp.backward()

            res = []
            reps = max(3, repeats // 10) if prop in ("learned", "amortised") and n_int > 1 else repeats
            for backward in (False, True):
                ctx = torch.enable_grad() if backward else torch.no_grad()
                with ctx:
                    run(backward)
                    t = time.perf_counter()
                    for _ in range(reps):
                        run(backward)
                res.append(1e3 * (time.perf_counter() - t) / reps)
            rows.append([n_int, prop, res[0], res[1]])
            print(rows[-1], flush=True)
    return rows


def _map_model(times, x, proposal, N, M, richardson=False):
    import pyro
    import pyro.distributions as dist
    from torch.distributions import constraints

    flat = dist.ImproperUniform(constraints.positive, (), ())

    def model():
        th, sg = pyro.sample("theta", flat), pyro.sample("sigma", flat)
        obs = DiscretelyObservedSDE(
            OrnsteinUhlenbeck(theta=th, mean=0.0, sigma=sg),
            times,
            proposal=proposal,
            num_particles=N,
            num_substeps=M,
            richardson=richardson,
            seed=0,
        )
        pyro.sample("obs", obs, obs=x)

    return model


def svi_map(times, x, proposal, N, M, steps):
    """SVI (AutoDelta, ClippedAdam) from theta = sigma = 1."""
    import pyro
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoDelta
    from pyro.optim import ClippedAdam

    model = _map_model(times, x, proposal, N, M)
    pyro.clear_param_store()
    guide = AutoDelta(model, init_loc_fn=lambda site: t64(1.0))
    svi = SVI(model, guide, ClippedAdam({"lr": 0.05, "lrd": 0.99}), Trace_ELBO())
    for _ in range(steps):
        svi.step()
    med = guide.median()
    return torch.stack([med["theta"], med["sigma"]]).detach()


def lbfgs_map(times, x, proposal, N, M, init, richardson=False):
    """MAP by L-BFGS (deterministic with common random numbers): estimate and the point as a dict."""
    from pyro_sde.infer import lbfgs_map as fit

    point = fit(_map_model(times, x, proposal, N, M, richardson), init_values=init)
    return torch.stack([point["theta"], point["sigma"]]), point


def learned_map(times, x, horizon, M, rounds=((16, 500), (64, 500), (64, 500))):
    """Learned bridge: fit at the current estimate, L-BFGS MAP, refit at the new estimate, until the
    estimate moves < 2 % (at most ``len(rounds)`` rounds of ``(num_particles, fit iterations)``)."""
    import pyro

    pyro.set_rng_seed(0)
    bridge = LearnedBridge(1, ScoreNetwork(1, hidden_dim=32), auto_refit=False)
    point = {"theta": t64(1.0), "sigma": t64(1.0)}
    est = torch.stack([point["theta"], point["sigma"]])
    for k, (N, iters) in enumerate(rounds):
        sde = OrnsteinUhlenbeck(theta=point["theta"], mean=0.0, sigma=point["sigma"])
        bridge.fit(sde, x[:-1], horizon, num_iterations=iters, progress_bar=False)
        new, point = lbfgs_map(times, x, bridge, N, M, point)
        moved = ((new - est).abs() / est).max()
        est = new
        if k > 0 and moved < 0.02:
            break
    return est, k + 1


def amortised_bridge(x, horizon, iterations=1000):
    """Amortised bridge: one fit over theta in [0.5, 3], sigma in [0.4, 1.6], for every MAP below."""
    import pyro

    pyro.set_rng_seed(0)
    sde = OrnsteinUhlenbeck(theta=t64(1.0), mean=0.0, sigma=t64(1.0))
    return AmortisedBridge(1, hidden_dim=32).fit(
        sde, x[:-1], horizon, parameter_box={"theta": (0.5, 3.0), "sigma": (0.4, 1.6)},
        num_iterations=iterations, progress_bar=False,
    )


RECOVERY = dict(n=200, theta=1.5, sigma=0.8, min_gap=0.3, max_gap=1.3, M=20)  # theta x gap up to 2


def recovery(steps, with_learned=True):
    """MAP of (theta, sigma) on 200 OU intervals with irregular gaps up to theta x gap ~ 2 (the issue's
    setting) vs the exact MLE, in SE, every estimator with M = 20 substeps."""
    n, theta, sigma, lo, hi, M = (RECOVERY[k] for k in ("n", "theta", "sigma", "min_gap", "max_gap", "M"))
    gen = torch.Generator().manual_seed(1)
    gaps = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=D64)
    times = torch.cat([torch.zeros(1, dtype=D64), gaps.cumsum(0)])
    x = torch.zeros(n + 1, 1, dtype=D64)
    for i in range(n):
        a = math.exp(-theta * gaps[i].item())
        s = sigma * math.sqrt((1 - a * a) / (2 * theta))
        x[i + 1] = a * x[i] + s * torch.randn(1, generator=gen, dtype=D64)

    def nll(p):
        return -DiscretelyObservedSDE(
            OrnsteinUhlenbeck(theta=p[0], mean=0.0, sigma=p[1]), times, proposal="exact"
        ).log_prob(x)

    lp = torch.zeros(2, dtype=D64, requires_grad=True)
    opt = torch.optim.LBFGS([lp], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nll(lp.exp())
        loss.backward()
        return loss

    opt.step(closure)
    mle = lp.detach().exp()
    se = (
        torch.linalg.cholesky(torch.autograd.functional.hessian(nll, mle))
        .cholesky_inverse()
        .diagonal()
        .sqrt()
    )
    rows = [["exact MLE", "-", "-", mle[0].item(), mle[1].item(), 0.0, 0.0, "-"]]

    def row(name, NM, how, est, sec):
        z = ((est - mle) / se).tolist()
        rows.append([name, NM, how, est[0].item(), est[1].item(), z[0], z[1], f"{sec:.1f}"])
        print(rows[-1], flush=True)

    init = {"theta": t64(1.0), "sigma": t64(1.0)}
    for prop, N, MM, rich in (
        ("euler", 1, 1, False),
        ("forward", 64, M, False),
        ("mdb", 64, M, False),
        ("mdb", 64, M, True),
        ("guided_euler", 64, M, False),
        ("guided", 16, M, False),
    ):
        t = time.perf_counter()
        est, _ = lbfgs_map(times, x, prop, N, MM, init, richardson=rich)
        name = prop + (" + Richardson" if rich else "")
        row(name, f"{N}x{MM}", "L-BFGS", est, time.perf_counter() - t)
    t = time.perf_counter()
    est = svi_map(times, x, "guided", 16, M, steps)
    row("guided", f"16x{M}", f"SVI Adam, {steps} steps", est, time.perf_counter() - t)
    if with_learned:
        t = time.perf_counter()
        est, k = learned_map(times, x, hi, M)
        row("learned", f"16x{M}, then 64x{M}", f"L-BFGS, {k} fit rounds", est, time.perf_counter() - t)
        t = time.perf_counter()
        bridge = amortised_bridge(x, hi)
        fit_s = time.perf_counter() - t
        init = {"theta": t64(1.0), "sigma": t64(1.0)}
        for rich in (False, True):
            t = time.perf_counter()
            est, _ = lbfgs_map(times, x, bridge, 64, M, init, richardson=rich)
            name = "amortised" + (" + Richardson" if rich else "")
            row(name, f"64x{M}", f"L-BFGS, one fit ({fit_s:.0f} s)", est, time.perf_counter() - t)
    return rows, se


PARTS = ("bias", "accuracy", "timing", "recovery")


def _previous_tables() -> dict:
    """The current section's subsections (heading line -> text), to keep the parts not re-run."""
    text = DOC.read_text() if DOC.exists() else ""
    m = re.search(r"<!-- bridges:start -->(.*?)<!-- bridges:end -->", text, re.S)
    out = {}
    if m:
        for block in re.split(r"\n(?=### )", m.group(1)):
            if block.startswith("### "):
                out[block.split(None, 2)[1].rstrip(":")] = block.strip()
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    if not set(parts) <= set(PARTS):
        parser.error(f"--parts must be a subset of {PARTS}, got {parts}")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    R, N, M = (5, 256, 50) if args.quick else (20, 1024, 50)
    previous = _previous_tables()
    sections = {}
    if "bias" in parts:
        Ms = (5, 10, 20, 40, 80)
        Nb, Rb = (256, 20) if args.quick else (1024, 100)
        curves = bias_curves(Ms, Nb, Rb)
        plot_bias(curves, Ms, IMG)
        rows = []
        for name, *_ in bias_problems():
            for label, *_ in BIAS_ESTIMATORS:
                rows.append(
                    [name, label]
                    + [f"{curves[name, label, m][0]:+.4f} ({curves[name, label, m][1]:.4f})" for m in Ms]
                )
        sections[
            "Bias"
        ] = f"""### Bias of log p-hat against the exact density as M grows: N={Nb}, R={Rb} repeats

Mean error (standard error) of `log p-hat` against the exact transition density (OU closed form, GBM
log-normal, CIR scipy `ncx2`), long gaps (rate x gap >= 2). `guided` is the continuous-time weight (exact
for the linear OU models: 0 variance), `+ Richardson` is `2 log p_2M - log p_M` (cost 3M substeps).
Euler-ratio proposals (forward, mdb, guided_euler) converge as 1/M. Near the Feller boundary mdb's
weights are heavy-tailed: its log-mean-exp is far low although E[w] is the Euler density (forward, same
E[w], is not). Plot: `docs/img/bridges_bias_vs_M.png`.

![bias vs M](img/bridges_bias_vs_M.png)

{markdown_table(["problem", "estimator"] + [f"M={m}" for m in Ms], rows)}"""
    if sections:
        _write(sections, previous, parts)
    if "accuracy" in parts:
        acc = accuracy(R, N, M, args.quick)
        head = f"### Accuracy: N={N} particles, M={M} substeps, R={R} repeats, u -> v over T=1"
        sections["Accuracy"] = f"""{head}

OU: theta=2, sigma=1, u=v=1; GBM mu=0.1, sigma=0.4, 1 -> 1.1; CIR kappa=theta=1, sigma=0.5, 1 -> 1.2;
landmarks: 20 landmarks x 2 (d=40), fixed Gaussian kernel (alpha=1, gamma=0.02), sigma=0.2, exact Gaussian.
RMSE and bias of log p-hat against the exact (continuous-time) log-density; they include the O(1/M) Euler
bias that every Euler-ratio estimator shares (forward, mdb, guided_euler: unbiased for the M-step Euler
density); `guided` (continuous-time weight) is exact on the linear models (OU, landmarks).
`fit s`: training time of the learned bridges; `learned` is fitted at the problem's parameters,
`amortised` (`AmortisedBridge`) once over [value / 2, 2 value] for every positive parameter (box), the
same iterations, and evaluated at the problem's parameters.

{markdown_table(["problem", "proposal", "ESS %", "RMSE", "bias", "fit s"], acc)}"""
    if sections:
        _write(sections, previous, parts)
    if "timing" in parts:
        tim = timing()
        sections["Time"] = f"""### Time per evaluation (1-D OU, 64 particles x 20 substeps)

`intervals = 200`: one `log_prob` of the whole series of 200 intervals (all intervals in one batched
call), and one forward+backward of it in (theta, sigma); `exact` is the closed-form OU density.

{markdown_table(["intervals", "proposal", "log_prob ms", "forward+backward ms"], tim)}

Goals: <= 20 ms per log_prob and <= 15 ms forward+backward for one interval."""
    if sections:
        _write(sections, previous, parts)
    if "recovery" in parts:
        rec, se = recovery(100 if args.quick else 300, with_learned=not args.quick)
        head = "### MAP recovery on long gaps (flat priors, common random numbers), OU theta=1.5, sigma=0.8"
        cols = ["estimator", "N x M", "optimiser", "theta", "sigma", "dtheta / SE", "dsigma / SE", "s"]
        sections["MAP"] = f"""{head}, 200 intervals

Irregular gaps uniform in [0.3, 1.3] (theta x gap up to 2, the setting of issue 16). Distance to the
exact-likelihood MLE in its standard errors (SE = {se[0].item():.3f}, {se[1].item():.3f});
goal: within 0.2 SE with M = 20 substeps.
L-BFGS: `pyro_sde.infer.lbfgs_map` (AutoDelta guide, `torch.optim.LBFGS`; the common-random-number
objective is deterministic) from theta = sigma = 1. SVI: `pyro.infer.SVI` with ClippedAdam (lr 0.05,
decay 0.99). Learned bridge (hidden width 32, horizon 1.3): fit at the current estimate (500 iterations),
L-BFGS MAP, refit at the new estimate, until it moves < 2 %. Amortised bridge (`AmortisedBridge`, hidden
width 32): one fit over theta in [0.5, 3], sigma in [0.4, 1.6] (1000 iterations, time in the optimiser
column), then L-BFGS MAPs with and without Richardson, no refits.

{markdown_table(cols, rec)}"""
    _write(sections, previous, parts)


def _write(sections, previous, parts):
    """Write the section with the parts run so far (the others kept from the current document)."""
    blocks = [sections.get(k, previous.get(k)) for k in ("Bias", "Accuracy", "Time", "MAP")]
    body = f"""## bridges

Bridge importance sampling of transition densities (`pyro_sde.infer.bridge`, `DiscretelyObservedSDE`).
Regenerate: `OMP_NUM_THREADS=1 python benchmarks/bridges.py` (`--parts bias,timing,recovery` re-runs
only those). Machine of the last run ({", ".join(parts)}): {machine()}, float64.

""" + "\n\n".join(b for b in blocks if b)
    write_section("bridges", body)
    print(body, flush=True)


if __name__ == "__main__":
    main()
