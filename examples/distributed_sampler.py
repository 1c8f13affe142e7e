"""Train a DiffusionSampler on several processes (torch.distributed) and estimate log Z of GMM-9.

The same script runs alone or under ``torchrun``; every rank simulates its slice of each batch, the
gradients are summed, and the evaluation gathers the weights of every rank (see docs/distributed.md)::

    python examples/distributed_sampler.py [--smoke]                        # one process
    torchrun --nproc_per_node 2 examples/distributed_sampler.py             # 2 CPU processes (gloo)
    torchrun --nproc_per_node 4 examples/distributed_sampler.py --backend nccl   # 4 GPUs

``--timing``: seconds per iteration at ``--batch-size`` x ``--num-steps`` (no stopping rule), to compare
1 and N processes at the same total batch. ``--smoke``: a small budget (about 10 s on 2 busy cores).
Rank 0 prints ``check ...: OK`` lines; the script exits with status 1 if a check fails.
"""

import argparse
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from pyro_sde.infer import DiffusionSampler
from pyro_sde.targets import GMM9


def check(name: str, ok: bool, failures: list) -> None:
    print(f"check {name}: {'OK' if ok else 'FAILED'}")
    if not ok:
        failures.append(name)


def start_process_group(backend):
    """Under torchrun: join the group (gloo on CPU, nccl on GPU); the device from LOCAL_RANK."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
    return device


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="small budgets (CI)")
    parser.add_argument("--backend", default=None, help="gloo (CPU, default without CUDA) or nccl (GPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="total over all processes")
    parser.add_argument("--num-steps", type=int, default=None)
    parser.add_argument("--num-iterations", type=int, default=None)
    parser.add_argument("--timing", action="store_true", help="print seconds per iteration only")
    args = parser.parse_args(argv)
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    device = start_process_group(args.backend) if under_torchrun else torch.device("cpu")
    world = dist.get_world_size() if under_torchrun else 1
    main_process = not under_torchrun or dist.get_rank() == 0
    torch.manual_seed(0)  # the package gives every rank rank 0's stream, so any seed works
    if args.timing:
        torch.set_num_threads(1)  # one core per process: the comparison is processes, not threads

    target = GMM9()
    num_steps = args.num_steps or (30 if args.smoke else 100)
    batch_size = args.batch_size or (256 if args.smoke else 1024)
    num_iterations = args.num_iterations or (60 if args.smoke else 1000)
    sampler = DiffusionSampler(
        log_density=lambda x: target.log_prob(x.to(torch.float64)), dim=2, dtype=torch.float64,
        device=device, method="dis", num_steps=num_steps, precondition=None, lr=1e-2,
    )
    sampler.setup()
    if args.timing:
        sampler.run(num_iterations=2, batch_size=batch_size, until=None, progress_bar=False)  # warm-up
        if under_torchrun:
            dist.barrier()
        start = time.perf_counter()
        sampler.run(num_iterations=num_iterations, batch_size=batch_size, until=None, progress_bar=False)
        if under_torchrun:
            dist.barrier()
        seconds = (time.perf_counter() - start) / num_iterations
        if main_process:
            print(f"processes {world}, batch {batch_size} x {num_steps} steps: "
                  f"{seconds:.4f} s per iteration")
        if under_torchrun:
            dist.destroy_process_group()
        return
    start = time.perf_counter()
    sampler.run(num_iterations=num_iterations, batch_size=batch_size, until=None)
    ev = sampler.log_evidence(2048 if args.smoke else 16384)  # the weights of every rank
    samples = sampler.get_samples(1000)["x"]
    failures = []
    if main_process:
        print(f"{world} process(es), trained in {time.perf_counter() - start:.1f} s")
        print(f"log Z = {float(ev.log_z):.3f} +- {float(ev.stderr):.3f} (exact 0), ESS {float(ev.ess):.2f}")
        check("every rank's samples were gathered", samples.shape == (1000, 2), failures)
        check("log Z within 4 standard errors + 0.25 of the exact 0",
              math.isfinite(float(ev.log_z)) and abs(float(ev.log_z)) < 4 * float(ev.stderr) + 0.25, failures)
    if under_torchrun:
        dist.destroy_process_group()
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
