"""Iterations per second of DiffusionSampler training at batch 2048 x 200 steps on the present device.

For d = 2, 10, 50 (8-mode Gaussian mixture, closed-form score, method "dis", log-variance loss):
ours (``backend="euler"``, the controls' graph recorded in the simulation), ours with the controls
recomputed on the stored path (``control_graph="recompute"``), ours with the network in bfloat16
(``mixed_precision="bfloat16"``), the same through ``torchsde.sdeint`` (``backend="torchsde"``) and the raw
network cost (K no-grad forwards of batch N + one forward/backward of K * N rows). Runs on CUDA when
available, else on the CPU (the section then says so). Goal on one H100-class GPU: >= 17 it/s, d <= 50.

``--check-sync`` first runs one training simulation + loss backward under
``torch.cuda.set_sync_debug_mode("error")`` (CUDA only): it fails if the step loop reads a device
tensor on the host.

    python benchmarks/gpu.py [--dims 2 10 50] [--repeats 5] [--check-sync] [--compile] [--smoke] [--write]
"""

from __future__ import annotations

import argparse
import os

import torch
from _report import machine, markdown_table, write_section
from diffusion_step import BATCH, STEPS, make_sampler, raw_network, sampler_iteration, time_interleaved


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronised(fn, device):
    """``fn`` followed by a device synchronisation (so that a call's wall time is its cost)."""

    def run():
        fn()
        _sync(device)

    return run


def check_no_sync(device, steps, batch):
    """One training simulation + loss backward with CUDA's sync debug mode set to raise."""
    sampler = make_sampler(2, steps, device=device)
    sampler.step(batch)
    torch.cuda.set_sync_debug_mode("error")
    try:
        sampler._training_log_weights(batch)[0].sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print("check no host synchronisation in the training simulation and loss: OK")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 10, 50])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--no-torchsde", action="store_true", help="skip the torchsde column")
    parser.add_argument("--compile", action="store_true", help="add a column with compile=True")
    parser.add_argument("--check-sync", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="batch 64 x 20 steps, d = 2, 1 repeat")
    parser.add_argument("--write", action="store_true", help="write the gpu section of docs/benchmarks.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    batch, steps, repeats, dims = (64, 20, 1, [2]) if args.smoke else (BATCH, STEPS, args.repeats, args.dims)
    if args.check_sync and device.type == "cuda":
        check_no_sync(device, steps, batch)
    rows = []
    for dim in dims:
        fns = {
            "ours": sampler_iteration(make_sampler(dim, steps, device=device), batch),
            "recompute": sampler_iteration(
                make_sampler(dim, steps, device=device, control_graph="recompute"), batch
            ),
            "bf16": sampler_iteration(
                make_sampler(dim, steps, device=device, mixed_precision="bfloat16"), batch
            ),
        }
        if not args.no_torchsde:
            torchsde = make_sampler(dim, steps, backend="torchsde", device=device)
            fns["torchsde"] = sampler_iteration(torchsde, batch)
        fns["raw"] = raw_network(dim, steps, batch, device=device)
        if args.compile:
            compiled = sampler_iteration(make_sampler(dim, steps, device=device, compile=True), batch)
            for _ in range(args.warmup + 2):  # the first iterations compile (minutes)
                compiled()
            fns["compiled"] = compiled
        for _ in range(args.warmup - 1):
            for fn in fns.values():
                fn()
        seconds = time_interleaved({k: synchronised(fn, device) for k, fn in fns.items()}, repeats)
        rate = {k: 1.0 / v for k, v in seconds.items()}
        theirs = rate.get("torchsde", float("nan"))
        row = [dim, rate["ours"], rate["recompute"], rate["bf16"], theirs, rate["raw"], rate["ours"] / theirs,
               rate["raw"] / rate["ours"]]
        if args.compile:
            row.append(rate["compiled"])
        rows.append(row)
        print(rows[-1], flush=True)
    header = ["d", "ours it/s", "ours, recompute, it/s", "ours, bfloat16, it/s", "torchsde it/s",
              "raw network it/s", "ours / torchsde", "ours s/it / raw s/it"]
    table = markdown_table(header + (["ours, compile=True, it/s"] if args.compile else []), rows)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({machine()})"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cpu_note = "" if device.type == "cuda" else (
        "\n**No GPU was present: these are CPU numbers**; the GPU goal is not measured here.\n"
    )
    print(f"device: {name}\n{table}")
    if args.write and not args.smoke:
        write_section(
            "gpu",
            f"""## Training iterations per second on one device (`benchmarks/gpu.py`)

Batch {batch} x {steps} steps, method "dis", log-variance loss, default network (3 x 64), an 8-mode
Gaussian mixture with a closed-form score, float32; median of {repeats} rounds (the columns timed in
turn, the device synchronised after each call) after {args.warmup} warm-up(s).
Device: **{name}**; load average {load:.1f}. Goal on one H100-class GPU: >= 17 it/s for d <= 50.
*ours*: the defaults (the controls' graph recorded during the simulation); *recompute*:
`control_graph="recompute"`; *bfloat16*: `mixed_precision="bfloat16"` (the network under autocast, the
weights in float64). *raw network*: K no-grad forwards of batch N + one forward/backward of the K * N
rows (in one call).
Regenerate on a GPU machine with `python benchmarks/gpu.py --check-sync --compile --write`.
{cpu_note}
{table}
""",
        )


if __name__ == "__main__":
    main()
