"""Seconds per training iteration of DiffusionSampler (batch 512 x 100 Euler steps, d = 2, GMM-9).

Side by side: our Euler-Maruyama loop, the same chain simulated by torchsde's ``sdeint``, and the raw
cost of the control network alone (forward + backward) for the same number of evaluations.

    python benchmarks/diffusion_step.py [--repeats 20] [--threads 2]

Prints a table and writes the "diffusion_step" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse

import pyro
import torch
from _report import machine, markdown_table, time_it, write_section

from pyro_sde.infer import DiffusionSampler
from pyro_sde.nn import ControlNetwork
from pyro_sde.targets import GMM9

BATCH, STEPS, DIM = 512, 100, 2


def sampler_iteration(method, loss, backend, closed_form_score=False):
    target = GMM9()
    sampler = DiffusionSampler(
        log_density=target.log_prob, dim=DIM, method=method, loss=loss, num_steps=STEPS, backend=backend,
        score=target.score if closed_form_score else None,
    )
    return lambda: sampler.step(BATCH)


def raw_network(sequential: bool):
    net = ControlNetwork(DIM)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, guide = torch.randn(BATCH, DIM), torch.randn(BATCH, DIM)
    taus = torch.linspace(0, 1, STEPS + 1)[:-1]
    xs, guides = torch.randn(STEPS, BATCH, DIM), torch.randn(STEPS, BATCH, DIM)

    def run_sequential():  # one call per step: what any step-by-step solver pays for its drift
        opt.zero_grad()
        out = sum(net(taus[k], x, guide).sum() for k in range(STEPS))
        out.backward()
        opt.step()

    def run_batched():  # all K * N evaluations in one call
        opt.zero_grad()
        net(taus.view(STEPS, 1, 1), xs, guides).sum().backward()
        opt.step()

    return run_sequential if sequential else run_batched


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)

    rows = []
    raw_seq = time_it(raw_network(True), args.repeats, warmup=3)
    raw_batched = time_it(raw_network(False), args.repeats, warmup=3)
    for method in ["dis", "pis", "dds"]:
        for loss in ["log_variance", "kl"]:
            ours = time_it(sampler_iteration(method, loss, "euler"), args.repeats, warmup=3)
            theirs = time_it(sampler_iteration(method, loss, "torchsde"), max(3, args.repeats // 4), warmup=3)
            rows.append([method, loss, "autograd", ours, theirs, theirs / ours, ours / raw_seq])
            if loss == "log_variance":  # the KL loss needs second derivatives: autograd only
                ours = time_it(sampler_iteration(method, loss, "euler", True), args.repeats, warmup=3)
                theirs = time_it(
                    sampler_iteration(method, loss, "torchsde", True), max(3, args.repeats // 4), warmup=3
                )
                rows.append([method, loss, "closed form", ours, theirs, theirs / ours, ours / raw_seq])
    header = [
        "method", "loss", "target score", "ours s/iter", "torchsde s/iter", "torchsde / ours",
        "ours / raw network (sequential)",
    ]
    table = markdown_table(header, rows)
    raw = markdown_table(
        ["raw network forward + backward, 100 x 512 evaluations", "s"],
        [["100 sequential calls of batch 512", raw_seq], ["one batched call of 51 200 rows", raw_batched]],
    )
    print(table, "\n\n" + raw)
    write_section(
        "diffusion_step",
        f"""## Cost of a training iteration (`benchmarks/diffusion_step.py`)

Batch {BATCH} x {STEPS} Euler steps, d = {DIM} (GMM-9 log density), default network (3 x 64, GELU),
median over {args.repeats} iterations; machine: {machine()}.
Goal: <= 0.15 s per iteration and within 1.5x of the raw network cost.

{table}

{raw}
""",
    )


if __name__ == "__main__":
    main()
