"""Bridge importance sampling benchmark: ESS, log-likelihood RMSE vs exact, timings, MAP recovery.

Writes the section "bridges" of docs/benchmarks.md. Run: ``OMP_NUM_THREADS=1 python benchmarks/bridges.py``
(``--quick`` for fewer repeats / training iterations; ``--parts timing,recovery`` re-runs only those parts
and keeps the other tables of the current section).
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

from pyro_sde.infer.bridge import LearnedBridge, ScoreNetwork, bridge_log_weights  # noqa: E402
from pyro_sde.sde.distributions import DiscretelyObservedSDE  # noqa: E402
from pyro_sde.sde.models import CIR, GeometricBrownianMotion, LandmarkBrownian, OrnsteinUhlenbeck  # noqa: E402

D64 = torch.float64


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


def accuracy(R, N, M, quick):
    rows = []
    for name, sde, u, v, exact, iters in problems():
        proposals = ["euler", "forward", "mdb", "guided", "learned"]
        for prop in proposals:
            uu, vv = u.expand(R, -1), v.expand(R, -1)
            if prop == "learned":
                t = time.perf_counter()
                bridge = LearnedBridge(u.shape[-1]).fit(
                    sde, u[None], 1.0, num_iterations=iters // (4 if quick else 1), progress_bar=False
                )
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
        for prop in ("exact", "euler", "forward", "mdb", "guided", "learned"):
            theta, sigma = t64(2.0).requires_grad_(), t64(1.0).requires_grad_()
            times = torch.arange(n_int + 1, dtype=D64)
            x = torch.randn(n_int + 1, 1, dtype=D64)
            proposal = prop
            if prop == "learned":
                sde0 = OrnsteinUhlenbeck(theta=t64(2.0), mean=0.0, sigma=t64(1.0))
                proposal = LearnedBridge(1).fit(sde0, x[:-1], 1.0, num_iterations=20, progress_bar=False)

            def run(backward, theta=theta, sigma=sigma, times=times, proposal=proposal, x=x):
                sde = OrnsteinUhlenbeck(theta=theta, mean=0.0, sigma=sigma)
                lp = DiscretelyObservedSDE(
                    sde, times, proposal=proposal, num_particles=64, num_substeps=20, validate_args=False
                ).log_prob(x)
                if backward:
                    lp.backward()

            res = []
            reps = max(3, repeats // 10) if prop == "learned" and n_int > 1 else repeats
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


def _map_model(times, x, proposal, N, M):
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


def lbfgs_map(times, x, proposal, N, M, init):
    """MAP by L-BFGS (deterministic with common random numbers): estimate and the point as a dict."""
    from pyro_sde.infer import lbfgs_map as fit

    point = fit(_map_model(times, x, proposal, N, M), init_values=init)
    return torch.stack([point["theta"], point["sigma"]]), point


def learned_map(times, x, rounds=((16, 500), (64, 500), (64, 500))):
    """Learned bridge: fit at the current estimate, L-BFGS MAP, refit at the new estimate, until the
    estimate moves < 2 % (at most ``len(rounds)`` rounds of ``(num_particles, fit iterations)``)."""
    import pyro

    pyro.set_rng_seed(0)
    bridge = LearnedBridge(1, ScoreNetwork(1, hidden_dim=32), auto_refit=False)
    point = {"theta": t64(1.0), "sigma": t64(1.0)}
    est = torch.stack([point["theta"], point["sigma"]])
    for k, (N, iters) in enumerate(rounds):
        sde = OrnsteinUhlenbeck(theta=point["theta"], mean=0.0, sigma=point["sigma"])
        bridge.fit(sde, x[:-1], 1.0, num_iterations=iters, progress_bar=False)
        new, point = lbfgs_map(times, x, bridge, N, 50, point)
        moved = ((new - est).abs() / est).max()
        est = new
        if k > 0 and moved < 0.02:
            break
    return est, k + 1


def recovery(steps):
    """MAP of (theta, sigma) on 200 OU intervals (theta=0.5, sigma=1, Delta=1) vs the exact MLE, in SE."""
    gen = torch.Generator().manual_seed(1)
    n = 200
    a, s = math.exp(-0.5), math.sqrt(1 - math.exp(-1.0))
    x = torch.zeros(n + 1, 1, dtype=D64)
    for i in range(n):
        x[i + 1] = a * x[i] + s * torch.randn(1, generator=gen, dtype=D64)
    times = torch.arange(n + 1, dtype=D64)

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

    for prop, N, M in (("euler", 1, 1), ("mdb", 64, 20), ("guided", 64, 20), ("guided", 16, 50)):
        t = time.perf_counter()
        est = svi_map(times, x, prop, N, M, steps)
        row(prop, f"{N}x{M}", f"SVI Adam, {steps} steps", est, time.perf_counter() - t)
    t = time.perf_counter()
    est, _ = lbfgs_map(times, x, "guided", 16, 50, {"theta": t64(1.0), "sigma": t64(1.0)})
    row("guided", "16x50", "L-BFGS", est, time.perf_counter() - t)
    t = time.perf_counter()
    est, k = learned_map(times, x)
    row("learned", "16x50, then 64x50", f"L-BFGS, {k} fit rounds", est, time.perf_counter() - t)
    return rows, se


PARTS = ("accuracy", "timing", "recovery")


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
    if "accuracy" in parts:
        acc = accuracy(R, N, M, args.quick)
        head = f"### Accuracy: N={N} particles, M={M} substeps, R={R} repeats, u -> v over T=1"
        sections["Accuracy"] = f"""{head}

OU: theta=2, sigma=1, u=v=1; GBM mu=0.1, sigma=0.4, 1 -> 1.1; CIR kappa=theta=1, sigma=0.5, 1 -> 1.2;
landmarks: 20 landmarks x 2 (d=40), fixed Gaussian kernel (alpha=1, gamma=0.02), sigma=0.2, exact Gaussian.
RMSE and bias of log p-hat against the exact (continuous-time) log-density; they include the O(1/M) Euler
bias that every Euler-ratio estimator shares (the estimators are unbiased for the M-step Euler density).
`fit s`: training time of the learned bridge.

{markdown_table(["problem", "proposal", "ESS %", "RMSE", "bias", "fit s"], acc)}"""
    if "timing" in parts:
        tim = timing()
        sections["Time"] = f"""### Time per evaluation (1-D OU, 64 particles x 20 substeps)

`intervals = 200`: one `log_prob` of the whole series of 200 intervals (all intervals in one batched
call), and one forward+backward of it in (theta, sigma); `exact` is the closed-form OU density.

{markdown_table(["intervals", "proposal", "log_prob ms", "forward+backward ms"], tim)}

Goals: <= 20 ms per log_prob and <= 15 ms forward+backward for one interval."""
    if "recovery" in parts:
        rec, se = recovery(100 if args.quick else 300)
        head = "### MAP recovery (AutoDelta, flat priors, common random numbers), OU theta=0.5, sigma=1"
        cols = ["estimator", "N x M", "optimiser", "theta", "sigma", "dtheta / SE", "dsigma / SE", "s"]
        sections["MAP"] = f"""{head}, 200 intervals

Distance to the exact-likelihood MLE in its standard errors (SE = {se[0].item():.3f},
{se[1].item():.3f}); goal: within 0.2 SE.
SVI: `pyro.infer.SVI` with ClippedAdam (lr 0.05, decay 0.99) from theta = sigma = 1.
L-BFGS: the same AutoDelta guide and `Trace_ELBO().differentiable_loss`, minimised by `torch.optim.LBFGS`
(the common-random-number objective is deterministic). Learned bridge (hidden width 32): fit at the current
estimate (500 iterations), L-BFGS MAP, refit at the new estimate, until it moves < 2 %.

{markdown_table(cols, rec)}"""
    blocks = []
    for key in ("Accuracy", "Time", "MAP"):
        block = sections.get(key, previous.get(key))
        if block:
            blocks.append(block)
    body = f"""## bridges

Bridge importance sampling of transition densities (`pyro_sde.infer.bridge`, `DiscretelyObservedSDE`).
Regenerate: `OMP_NUM_THREADS=1 python benchmarks/bridges.py` (`--parts timing,recovery` re-runs only
those). Machine of the last run ({", ".join(parts)}): {machine()}, float64.

""" + "\n\n".join(blocks)
    write_section("bridges", body)
    print(body)


if __name__ == "__main__":
    main()
