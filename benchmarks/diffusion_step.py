"""Seconds per training iteration of DiffusionSampler at the paper's scale (batch 2048 x 200 steps).

Side by side, in the same run (the load of a shared machine drifts; read the ratios):

* ours: ``DiffusionSampler.step`` (method "dis", log-variance loss, defaults): the simulation runs the
  control with autograd on the detached states and keeps its graph, one backward at the end;
* ours, recompute: ``control_graph="recompute"``: K no-grad control evaluations for the simulation, then
  one batched forward/backward of the control on the stored path (in slices of 16384 rows);
* ours, bfloat16: the defaults with ``mixed_precision="bfloat16"`` (the network under autocast);
* ours, levers off: recompute with the network evaluated in one call (``chunk_rows=None``);
* the authors' loop (sde_sampler, Berner, Richter et al.), re-stated here: the control evaluated with
  autograd at every step, the time branch run on every row (their FourierMLP expands ``t`` to the
  batch), the graph kept through the K steps, one backward of the log-variance of the path weights;
* ours through ``torchsde.sdeint`` (``backend="torchsde"``);
* the raw network cost: K no-grad forwards of batch N + one forward/backward of K * N rows.

The target is an 8-mode isotropic Gaussian mixture with a closed-form score (the sampler's cost,
not the target's).

    python benchmarks/diffusion_step.py [--dims 2 10 50] [--batch 2048] [--steps 200] [--repeats 3]
        [--threads 2] [--smoke] [--write] [--grid-study] [--precision-study]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
from _report import machine, markdown_table, write_section

from pyro_sde.diagnostics import log_evidence
from pyro_sde.infer import DiffusionSampler
from pyro_sde.nn import ControlNetwork
from pyro_sde.sde import OUReference, VPReference, euler_maruyama, log_ratio_increment

BATCH, STEPS = 2048, 200


def mixture(dim: int, device=None, num_modes: int = 8, scale: float = 1.0):
    """``(log_density, score)`` of an equal-weight isotropic Gaussian mixture (no input checks)."""
    g = torch.Generator().manual_seed(dim)
    locs = (3.0 * torch.randn(num_modes, dim, generator=g)).to(device)
    var = scale**2

    def logits(x):
        return -0.5 * (x.unsqueeze(-2) - locs.to(x)).pow(2).sum(-1) / var

    def log_density(x):
        return torch.logsumexp(logits(x), -1)

    def score(x):
        resp = torch.softmax(logits(x), -1)
        return (resp @ locs.to(x) - x) / var

    return log_density, score


def make_sampler(dim, steps=STEPS, backend="euler", device=None, **kw):
    log_density, score = mixture(dim, device)
    sampler = DiffusionSampler(
        log_density=log_density, score=score, dim=dim, method="dis", num_steps=steps, backend=backend,
        precondition=None, device=device, **kw,
    )
    return sampler.setup()


def sampler_iteration(sampler, batch=BATCH):
    return lambda: sampler.step(batch)


def authors_iteration(sampler, batch=BATCH):
    """The authors' training step re-stated on our chain (same network, guide and increments)."""
    ref, net, p = sampler.reference, sampler.control, sampler._target
    coef = ref.coefficients(p.dtype, p.device)
    a, c, s, b = (t.tolist() if t is not None else [None] * ref.num_steps for t in coef[1:])
    taus = (coef.times[:-1] / ref.T).tolist()

    def iteration():
        x = ref.sample_initial(batch, p.dim, dtype=p.dtype, device=p.device)
        log_w = -ref.initial_log_prob(x).double()
        for k in range(ref.num_steps):
            tau = torch.full((batch, 1), taus[k], dtype=p.dtype, device=p.device)  # t on every row
            guide = sampler._guide(tau, x, create_graph=False)
            v = torch.clamp(net(tau, x, guide), -sampler.control_clip, sampler.control_clip)
            noise = torch.randn_like(x)
            x_next = a[k] * x + c[k] * v.detach() + s[k] * noise
            inc = log_ratio_increment(ref.kind, a[k], c[k], s[k], b[k], x, x_next, v)  # v: with grad
            log_w = log_w + inc.double()
            x = x_next
        log_w = log_w + p.log_density(x).double()
        loss = log_w.var() / p.dim
        sampler.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        sampler.optimizer.step()

    return iteration


def raw_network(dim, steps=STEPS, batch=BATCH, device=None, chunk_rows=None):
    """K no-grad forwards of batch N, then one forward/backward of the K * N rows, and Adam."""
    net = ControlNetwork(dim, chunk_rows=chunk_rows).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    taus = torch.linspace(0, 1, steps + 1, device=device)[:-1]
    x, guide = torch.randn(batch, dim, device=device), torch.randn(batch, dim, device=device)
    xs, guides = torch.randn(steps, batch, dim, device=device), torch.randn(steps, batch, dim, device=device)

    def run():
        with torch.no_grad():
            hidden, scale = net.time_features(taus)
            for k in range(steps):
                net.forward_with_time_features((hidden[k], scale[k]), x, guide)
        opt.zero_grad()
        net(taus.view(steps, 1, 1), xs, guides).square().sum().backward()
        opt.step()

    return run


def grid_study(steps_list=(10, 20, 50, 100, 200), dim=10, num_paths=4096, mean=2.0, std=0.5):
    """``log Z`` error against K with the ideal (time-reversal) control of a Gaussian target
    ``N(mean 1, std^2 I)`` (``log Z = 0``): DIS (Euler steps of the VP reference) against DDS
    (exponential-integrator steps of the OU reference), same noise schedule (beta 0.1 -> 10).

    The weights are exact for the discrete chain at any K, so ``log Z`` is unbiased in ``Z`` either way;
    what K buys is their spread: the ELBO gap ``log Z - mean log w`` (a KL) and the ESS."""

    def log_rho(x):
        log_norm = dim * (math.log(std) + 0.5 * math.log(2 * math.pi))
        return -0.5 * ((x - mean) / std).pow(2).sum(-1) - log_norm

    rows = []
    for steps in steps_list:
        row = [steps]
        for ref, offset in [(VPReference(steps), 0.0), (OUReference(steps), 1.0)]:

            def control(k, t, x, ref=ref, offset=offset):  # grad log p_s(x) (+ x / sigma^2 for DDS)
                s = ref.T - t  # diffusion time of the noising process
                B = ref.beta_min * s + 0.5 * (ref.beta_max - ref.beta_min) * s**2 / ref.T
                decay = torch.exp(-0.5 * B)
                var = std**2 * decay**2 + (1 - decay**2)  # sigma = 1
                return -(x - mean * decay) / var + offset * x

            torch.manual_seed(steps)
            x0 = ref.sample_initial(num_paths, dim, dtype=torch.float64, device=None)
            path = euler_maruyama(ref, control, x0, store_path=False)
            boundary = ref.boundary_log_weight(path.initial, path.terminal)
            log_w = log_rho(path.terminal) + boundary + path.log_ratio
            ev = log_evidence(log_w)
            row += [float(ev.log_z), float(-ev.lower_bound), float(ev.ess)]
        rows.append(row)
    header = ["K", "DIS log Z err", "DIS ELBO gap", "DIS ESS", "DDS log Z err", "DDS ELBO gap", "DDS ESS"]
    return markdown_table(header, rows)


def precision_study(iterations=400, batch=512, steps=100, dim=2, seeds=(0, 1), num_paths=8192):
    """Training in float32 against ``mixed_precision="bfloat16"``: log Z error, its standard error and the
    ESS of ``num_paths`` fresh paths after ``iterations`` steps, on the 8-mode mixture (exact log Z:
    ``log 8 + d/2 log 2 pi``, each mode unnormalised ``exp(-|x - mu|^2 / 2)``)."""
    log_density, score = mixture(dim)
    log_z = math.log(8) + 0.5 * dim * math.log(2 * math.pi)
    rows = []
    for precision in (None, "bfloat16"):
        for seed in seeds:
            torch.manual_seed(seed)
            sampler = DiffusionSampler(
                log_density=log_density, score=score, dim=dim, num_steps=steps, precondition=None,
                mixed_precision=precision,
            )
            sampler.run(num_iterations=iterations, batch_size=batch, until=None, progress_bar=False)
            ev = sampler.log_evidence(num_paths)
            error = float(ev.log_z) - log_z
            rows.append([precision or "float32", seed, error, float(ev.stderr), float(ev.ess)])
    header = ["network", "seed", "log Z error", "stderr", "ESS"]
    return markdown_table(header, rows)


def time_interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each ``fn()``, the calls taken in turn (one warm-up each): on a shared machine
    the load drifts between rounds, not within one, so the ratios stay fair."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 10, 50])
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="batch 64 x 20 steps, 1 repeat")
    parser.add_argument("--write", action="store_true", help="write the diffusion_step section")
    parser.add_argument("--grid-study", action="store_true", help="only the log Z error against K")
    parser.add_argument("--precision-study", action="store_true",
                        help="only training in float32 against bfloat16 (log Z error after 400 iterations)")
    args = parser.parse_args()
    if args.precision_study:
        torch.set_num_threads(args.threads)
        table = precision_study(iterations=20 if args.smoke else 400, seeds=(0,) if args.smoke else (0, 1))
        print(table)
        if args.write and not args.smoke:
            title = "## Mixed precision against float32 (`benchmarks/diffusion_step.py --precision-study`)"
            write_section("diffusion_precision", f"""{title}

`DiffusionSampler(method="dis", num_steps=100, precondition=None)` trained for 400 iterations at batch
512 on the 8-mode Gaussian mixture in 2-d (closed-form score), with the control network in float32 or
under `mixed_precision="bfloat16"` (`torch.autocast`; states and weights in float32 / float64); then
`log_evidence(8192)`. Machine: {machine()}. The speed is in the iteration-cost
table above.

{table}
""")
        return
    if args.grid_study:
        table = grid_study(steps_list=(10, 20) if args.smoke else (10, 20, 50, 100, 200))
        print(table)
        if args.write and not args.smoke:
            title = "## Steps against accuracy (`benchmarks/diffusion_step.py --grid-study`)"
            write_section("diffusion_grid", f"""{title}

``log Z`` error, ELBO gap (``log Z - mean log w``, a KL) and normalised ESS of 4096 paths driven by the
*ideal* control (the score of the noised target, in closed form) for a Gaussian target ``N(2, 0.25 I_10)``,
``log Z = 0``: DIS (Euler steps of the VP reference) against DDS (exponential-integrator steps of the OU
reference, `method="dds"`), beta 0.1 -> 10. The weights are exact for the discrete chain, so the
estimates are unbiased in ``Z`` at any K; the step count only sets the weights' spread.

{table}
""")
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch, steps, repeats = (64, 20, 1) if args.smoke else (args.batch, args.steps, args.repeats)
    rows = []
    for dim in args.dims:
        one_call = ControlNetwork(dim, chunk_rows=None)
        t = time_interleaved(
            {
                "ours": sampler_iteration(make_sampler(dim, steps), batch),
                "recompute": sampler_iteration(make_sampler(dim, steps, control_graph="recompute"), batch),
                "bf16": sampler_iteration(make_sampler(dim, steps, mixed_precision="bfloat16"), batch),
                "levers off": sampler_iteration(
                    make_sampler(dim, steps, control=one_call, control_graph="recompute"), batch
                ),
                "authors": authors_iteration(make_sampler(dim, steps), batch),
                "torchsde": sampler_iteration(make_sampler(dim, steps, backend="torchsde"), batch),
                "raw": raw_network(dim, steps, batch),
                "raw chunked": raw_network(dim, steps, batch, chunk_rows=16384),
            },
            repeats,
        )
        print(f"d={dim}", {k: round(v, 3) for k, v in t.items()}, flush=True)
        rows.append([dim, t["ours"], t["recompute"], t["bf16"], t["levers off"], t["authors"], t["torchsde"],
                     t["raw"], t["raw chunked"], t["ours"] / t["authors"], t["bf16"] / t["authors"],
                     t["ours"] / min(t["raw"], t["raw chunked"])])
    header = [
        "d", "ours s/it", "ours, recompute", "ours, bfloat16", "ours, levers off",
        "authors' loop (re-stated)", "torchsde", "raw network", "raw network, chunked", "ours / authors",
        "ours bfloat16 / authors", "ours / raw network (the faster)",
    ]
    table = markdown_table(header, rows)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    print(table)
    if args.write and not args.smoke:
        write_section(
            "diffusion_step",
            f"""## Cost of a training iteration (`benchmarks/diffusion_step.py`)

Batch {batch} x {steps} Euler steps, method "dis", log-variance loss, default network (3 x 64, GELU),
an 8-mode Gaussian mixture with a closed-form score; median of {repeats} rounds (the columns timed in
turn) after one warm-up; machine: {machine()}, load average {load:.1f} at the end (a shared machine:
read the ratios). Goals: <= 0.5x the authors' per-iteration time, within 1.5x of the raw network cost
(K no-grad forwards of batch N + one forward/backward of K * N rows in one call).

*ours*: the defaults, where the simulation keeps the graph of the controls (`control_graph="record"`,
chosen by `"auto"` for batches of 1024+ paths whose activations fit in 2 GiB: one forward pass per
iteration); both ours and recompute take the gradient of `log w` from `pyro_sde.sde.log_ratio_surrogate`
(one product per state, not a differentiated path log-ratio); *recompute*: a
no-grad simulation, then one batched forward/backward of the control on the stored path in slices of
16384 rows (`control_graph="recompute"`, the default before); *bfloat16*: the defaults with
`mixed_precision="bfloat16"` (the network under `torch.autocast`, states and weights in float32 /
float64); *levers off*: recompute with the network in one call (`ControlNetwork(chunk_rows=None)`);
*authors' loop*: the sde_sampler training step re-stated on our chain (the control with autograd at
every step, its time branch on every row, one backward through the K steps); *raw network, chunked*:
the same network cost with the K * N rows in slices of 16384.
`DiffusionSampler(compile=True)` is no column: on this CPU it ran at the eager speed (0.78 vs 0.76 s/it at
2048 x 200, d = 2, 1 thread, graph recorded, load 1.1; 6.0 vs 5.9 s/it under recompute at load 12) after
15 s of compilation, so it stays off by default (see `benchmarks/gpu.py` for the GPU, where fusing the
step's small kernels is what can pay).

{table}
""",
        )


if __name__ == "__main__":
    main()
