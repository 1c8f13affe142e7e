"""``torch.distributed`` helpers: the one place the package talks to other processes.

Every function is a no-op (or the single-process answer) unless a process group with more than one
process is initialised (``torch.distributed.init_process_group``, e.g. under ``torchrun``), so code
that is not distributed pays nothing and behaves as before.

The package's contract under ``torchrun`` (see ``docs/distributed.md``):

* every rank draws from **one shared random stream** (rank 0's, broadcast at set-up by
  :func:`sync_rng_state_`), draws the random numbers of the *whole* batch and keeps its slice
  (:func:`shard`), so that a distributed step equals the single-process step with the same total batch;
* a loss is split into additive per-rank shares (``sum_r loss_r = loss``) and the gradients are
  summed over ranks (:func:`all_reduce_gradients_`); the parameters stay identical on every rank;
* results (weights, samples) are gathered on every rank (:func:`all_gather_cat`); decisions that
  depend on the clock are rank 0's (:func:`agree`); only rank 0 writes files (:func:`is_main_process`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "agree",
    "all_gather_cat",
    "all_reduce_gradients_",
    "all_reduce_sum",
    "barrier",
    "broadcast_parameters_",
    "check_shardable",
    "device",
    "global_mean_count",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "rank",
    "rank_generator",
    "rank_stream",
    "shared_seed",
    "shard",
    "shard_sizes",
    "sync_rng_state_",
    "world_size",
]


def is_distributed() -> bool:
    """Whether a process group of more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Rank 0 (or not distributed): the process that writes checkpoints and progress."""
    return rank() == 0


def device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def init_from_env(backend: str | None = None) -> torch.device:
    """Initialise the process group from ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``; ``LOCAL_RANK`` picks the GPU) with ``backend`` (default
    ``"nccl"`` with CUDA, ``"gloo"`` on the CPU) and return this rank's :func:`device`."""
    dev = device()
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if dev.type == "cuda" else "gloo"))
    return dev


def shard_sizes(n: int) -> list[int]:
    """How ``n`` items split over the ranks: rank ``r`` gets ``[n r / W, n (r + 1) / W)`` (floors)."""
    w = world_size()
    return [n * (r + 1) // w - n * r // w for r in range(w)]


def shard(n: int) -> slice:
    """This rank's slice of ``n`` items (the whole range when not distributed)."""
    w, r = world_size(), rank()
    return slice(n * r // w, n * (r + 1) // w)


def check_shardable(n: int, name: str) -> int:
    """``n`` items (a batch) must give every rank at least one: ``ValueError`` naming ``name`` if not."""
    if n < world_size():
        raise ValueError(f"{name} ({n}) must be at least the number of processes ({world_size()})")
    return n


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """``sum_r x_r`` on every rank (a new tensor; ``x`` itself when not distributed)."""
    if not is_distributed():
        return x
    out = x.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def global_mean_count(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(mean, count)`` of the values ``x`` (1-d) of all ranks: one all-reduce of ``[sum, count]`` in
    float64; the mean is detached and in float64."""
    x = x.detach()
    stats = torch.stack([x.to(torch.float64).sum(), torch.tensor(float(x.numel()), dtype=torch.float64,
                                                                   device=x.device)])
    stats = all_reduce_sum(stats)
    count = int(stats[1])
    return stats[0] / max(count, 1), count


def all_reduce_gradients_(params: Iterable[torch.Tensor]) -> None:
    """Sum the gradients of ``params`` over the ranks, in place (one all-reduce per dtype / device).

    Each rank's loss must be its additive share of the global loss (``sum_r loss_r = loss``); a missing
    gradient counts as zero (and stays ``None`` where it is ``None`` on every rank)."""
    if not is_distributed():
        return
    params = [p for p in params if p.requires_grad]
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    for group in groups.values():
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in group]
        has_grad = [float(p.grad is not None) for p in group]
        flat = torch.cat(grads + [torch.tensor(has_grad, dtype=grads[0].dtype, device=grads[0].device)])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for i, p in enumerate(group):
            n = p.numel()
            if flat[-len(group) + i] > 0:
                p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate (dim 0, in rank order) the tensors of all ranks, which may differ in length
    (padded for the collective); ``x`` when not distributed."""
    if not is_distributed():
        return x
    x = x.detach().contiguous()
    sizes = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world_size())]
    dist.all_gather(all_sizes, sizes)
    lengths = [int(s) for s in all_sizes]
    longest = max(lengths)
    padded = torch.zeros((longest,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, lengths)])


def broadcast_parameters_(modules: Iterable[torch.nn.Module], src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank, in place."""
    if not is_distributed():
        return
    with torch.no_grad():
        for module in modules:
            for t in list(module.parameters()) + list(module.buffers()):
                if torch.is_floating_point(t):  # integer / bool buffers are counters and flags
                    dist.broadcast(t.data, src)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (``obj`` itself when not distributed); tensors in
    it should be on the CPU (they arrive there)."""
    if not is_distributed():
        return obj
    backend_device = device() if dist.get_backend() == "nccl" else torch.device("cpu")
    holder = [obj if rank() == src else None]
    dist.broadcast_object_list(holder, src, device=backend_device)
    return holder[0]


def sync_rng_state_(src: int = 0) -> None:
    """Give every rank rank ``src``'s torch random state (CPU, and this rank's CUDA device when CUDA
    is initialised): from then on the ranks draw the same stream and each keeps its :func:`shard`."""
    if not is_distributed():
        return
    backend_device = device() if dist.get_backend() == "nccl" else torch.device("cpu")
    states = [torch.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states.append(torch.cuda.get_rng_state())
    for i, state in enumerate(states):
        buffer = state.to(backend_device)
        dist.broadcast(buffer, src)
        if i == 0:
            torch.set_rng_state(buffer.cpu())
        else:
            torch.cuda.set_rng_state(buffer.cpu())


def shared_seed() -> int:
    """A seed every rank derives alike from the (synced) torch random state, without drawing from it."""
    return int.from_bytes(hashlib.sha256(torch.get_rng_state().numpy().tobytes()).digest()[:7], "little")


@contextlib.contextmanager
def rank_stream(seed: int) -> Iterator[None]:
    """Inside: this rank's own random stream, seeded from ``(seed, rank)`` (for draws that must differ
    between ranks, e.g. a simulator's); on exit the shared stream is as it was."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = [torch.cuda.current_device()] if cuda else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed((seed * 1_000_003 + rank()) % 2**63)
        yield


def rank_generator(device: torch.device | str) -> torch.Generator | None:
    """A ``torch.Generator`` on ``device`` of this rank's own, seeded from one draw of the shared
    stream and the rank (``None`` when not distributed: draw from the global stream)."""
    if not is_distributed():
        return None
    seed = int(torch.randint(2**62, ()))
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + rank()) % 2**63)


def agree(flag: bool, src: int = 0) -> bool:
    """Rank ``src``'s ``flag`` on every rank (for decisions that could differ, e.g. on the clock)."""
    if not is_distributed():
        return flag
    backend_device = device() if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([1.0 if flag else 0.0], device=backend_device)
    dist.broadcast(t, src)
    return bool(t.item())


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_distributed():
        dist.barrier()
