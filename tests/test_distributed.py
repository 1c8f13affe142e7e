"""torch.distributed against the single process: 2 gloo processes (started here, bounded in time)
train and evaluate; every result must equal the single-process one with the same total batch and
seed (float64, 1e-6; the paths are the same, only sums are ordered differently).

The workers seed their ranks differently: the package must give every rank rank 0's random stream.
"""

import math
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch
from _interrupt import Interrupting

from pyro_sde import _distributed
from pyro_sde.diagnostics import UnreliableEstimateWarning
from pyro_sde.infer import DiffusionSampler, SCLDSampler, SMCSampler
from pyro_sde.ratio import ClassifierRatioEstimator, FlowGuidedGenerator

D64 = torch.float64
SEED = 100
TOL = 1e-6
HERE = os.path.dirname(os.path.abspath(__file__))


def two_modes(x):
    """Unnormalised 2-d mixture of N((2, 0), 0.5^2 I) and N((-1, 1), I) (N, 2) -> (N,)."""
    a = -((x - torch.tensor([2.0, 0.0], dtype=x.dtype)) ** 2).sum(-1) / 0.5
    b = -((x - torch.tensor([-1.0, 1.0], dtype=x.dtype)) ** 2).sum(-1) / 2
    return torch.logaddexp(a + math.log(0.3), b)


def _interrupting(stop_at=None):
    """``two_modes`` that raises KeyboardInterrupt at its ``stop_at``-th call (Ctrl-C mid-run)."""
    return Interrupting(two_modes, stop_at)


def _sampler(loss, log_density=two_modes, backend="euler"):
    return DiffusionSampler(
        log_density=log_density, dim=2, dtype=D64, method="dis", loss=loss, num_steps=6, hidden_dim=8,
        num_layers=2, precondition=None, grad_clip=None, ema_decay=0.9, lr=1e-2, backend=backend,
    )


def gaussian(x):
    """``-|x - 1|^2 / 2`` in 2-d: ``log Z = log 2 pi``."""
    return -0.5 * ((x - 1) ** 2).sum(-1)


def _ratio_data():
    gen = torch.Generator().manual_seed(7)
    num = torch.randn(40, 2, generator=gen, dtype=D64) + 1.0
    den = torch.randn(40, 2, generator=gen, dtype=D64)
    val = (torch.randn(16, 2, generator=gen, dtype=D64) + 1.0, torch.randn(16, 2, generator=gen, dtype=D64))
    return num, den, val


def _flat(module_or_params):
    params = module_or_params.parameters() if hasattr(module_or_params, "parameters") else module_or_params
    return torch.cat([p.detach().reshape(-1) for p in params])


def _experiments(folder):
    """What both the workers and the single process compute: a dict of tensors."""
    out = {}
    checkpoint = None if folder is None else os.path.join(folder, "run.ckpt")
    for loss in ("log_variance", "kl", "rkl_ld", "log_variance record", "rkl_ld record",
                 "log_variance torchsde"):
        torch.manual_seed(SEED)
        sampler = _sampler(loss.split()[0], backend="torchsde" if loss.endswith("torchsde") else "euler")
        sampler.control_graph = "record" if loss.endswith("record") else "recompute"  # (auto: 7 < 1024)
        info = [sampler.step(7) for _ in range(2)]  # 7 paths: shards of 3 and 4
        out[f"{loss} params"] = _flat(sampler.control)
        out[f"{loss} grads"] = torch.cat([p.grad.reshape(-1) for p in sampler.control.parameters()])
        out[f"{loss} info"] = torch.tensor([list(i) for i in info], dtype=D64)
    if _distributed.is_distributed():
        with pytest.raises(ValueError, match="batch_size"):  # fewer paths than processes
            sampler.step(1)
    torch.manual_seed(SEED)
    sampler = _sampler("log_variance")
    sampler.run(num_iterations=3, batch_size=6, until=None, progress_bar=False, checkpoint=checkpoint)
    out["run params"] = _flat(sampler.control)
    out["run ema"] = _flat(sampler._ema_nets[0])
    with warnings.catch_warnings():  # 9 weights: the Pareto k is not defined
        warnings.simplefilter("ignore", UnreliableEstimateWarning)
        ev = sampler.log_evidence(9)
    out["log_evidence"] = torch.stack([ev.log_z, ev.stderr, ev.lower_bound, ev.ess]).to(D64)
    z, log_w = sampler.sample_unconstrained(9, chunk_size=4)  # last chunk of 1: rank 0 holds none
    out["z"], out["log_w"] = z, log_w
    counter = _interrupting()  # calls at construction and per iteration
    sampler = _sampler("log_variance", counter)
    at_start = counter.calls
    sampler.run(num_iterations=1, batch_size=6, until=None, progress_bar=False)
    per_iteration = counter.calls - at_start
    torch.manual_seed(SEED)
    path = os.path.join(folder, "interrupted.ckpt")
    sampler = _sampler("log_variance", _interrupting(stop_at=at_start + 2 * per_iteration + 1))
    with pytest.raises(KeyboardInterrupt):  # inside iteration 3: the file holds 2 iterations
        sampler.run(num_iterations=4, batch_size=6, until=None, progress_bar=False, checkpoint=path,
                    checkpoint_every=2)
    resumed = DiffusionSampler.load(path, log_density=two_modes)
    out["resumed from"] = torch.tensor(resumed._run_state["done"])
    torch.manual_seed(SEED + 1)  # resume restores the saved stream
    resumed.resume(progress_bar=False)
    out["resumed params"] = _flat(resumed.control)
    num, den, (val_num, val_den) = _ratio_data()
    for name, validation in [("even", (val_num, val_den)), ("uneven", (val_num[:15], val_den))]:
        torch.manual_seed(SEED)  # 16 + 16 validation samples are split over the ranks, 15 + 16 are not
        estimator = ClassifierRatioEstimator(2, hidden_dim=8, num_layers=2)
        estimator.fit(num, den, num_iterations=5, batch_size=7, lr=1e-2, ema_decay=0.9,
                      validation=validation, validation_interval=2, progress_bar=False)
        out[f"ratio {name} params"] = _flat(estimator)
        out[f"ratio {name} losses"] = torch.tensor(estimator.losses, dtype=D64)
        out[f"ratio {name} validation"] = torch.tensor([v for _, v in estimator.validation_losses], dtype=D64)
    torch.manual_seed(SEED)
    generator = FlowGuidedGenerator(2, num_flow_steps=3, hidden_dim=8, num_layers=2)
    generator.fit(num, num_iterations=3, batch_size=8, progress_bar=False)
    out["fdrl params"] = _flat(generator)
    out["fdrl losses"] = torch.tensor(generator.losses, dtype=D64)
    if _distributed.is_distributed():  # a sampler that does not split its batch refuses
        scld = SCLDSampler(log_density=two_modes, dim=2, dtype=D64, precondition=None, num_particles=8,
                           step_size=0.1)
        with pytest.raises(NotImplementedError, match="torch.distributed"):
            scld.run(num_iterations=1, progress_bar=False)
    torch.manual_seed(SEED)
    smc = SMCSampler(log_density=gaussian, dim=2, dtype=D64, num_particles=128, precondition=None)
    smc.run()
    out["smc particles"] = smc.final_states[0].particles
    out["smc log_evidence"] = torch.stack(list(smc.log_evidence()[:2])).to(D64)
    torch.manual_seed(SEED)
    counted = Interrupting(two_modes)  # counts the calls
    sampler = DiffusionSampler(
        log_density=counted, dim=2, dtype=D64, num_steps=6, hidden_dim=8, num_layers=2,
        precondition="laplace", precondition_options=dict(num_starts=3),
    ).setup()
    out["fit calls"] = torch.tensor(counted.calls)
    sampler.step(7)
    p = sampler.preconditioner
    out["preconditioner"] = torch.cat([p.loc, p.scale_tril.reshape(-1)])
    out["preconditioned params"] = _flat(sampler.control)
    return out


def _worker(out_dir):
    """One rank (the environment names it): seeds by rank, runs the experiments, rank 0 saves them."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(12345 + dist.get_rank())  # differently seeded ranks: the package syncs them
    rank = dist.get_rank()
    out = _experiments(out_dir)
    out["world"] = torch.tensor(_distributed.world_size())
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out_dir, meanwhile, world=2, timeout=120):
    """Run ``world`` worker processes and, while they run, ``meanwhile()``: ``(rank results, its result)``."""
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world),
               OMP_NUM_THREADS="1")
    root = os.path.dirname(HERE)
    code = (f"import sys; sys.path[:0] = [{root!r}, {HERE!r}]; import test_distributed as t; "
            f"t._worker({out_dir!r})")
    procs = [subprocess.Popen([sys.executable, "-c", code], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=root)
             for r in range(world)]
    try:
        result = meanwhile()
        logs = [p.communicate(timeout=timeout)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    failed = [f"rank {r} failed:\n{log[-3000:]}"
              for r, (p, log) in enumerate(zip(procs, logs)) if p.returncode]
    assert not failed, "\n".join(failed)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(world)], result


@pytest.fixture(scope="module")
def distributed_and_single(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("dist"))
    single_dir = str(tmp_path_factory.mktemp("single"))
    ranks, single = _launch(out_dir, lambda: _experiments(single_dir))  # the reference meanwhile
    return ranks, single, out_dir


def _close(a, b):
    return a.shape == b.shape and torch.allclose(a.to(D64), b.to(D64), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("loss", ["log_variance", "kl", "rkl_ld", "log_variance record", "rkl_ld record"])
def test_a_distributed_step_equals_the_single_process_step(distributed_and_single, loss):
    ranks, single, _ = distributed_and_single
    assert int(ranks[0]["world"]) == 2
    for key in (f"{loss} params", f"{loss} grads", f"{loss} info"):
        assert _close(ranks[0][key], single[key]), key
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # the ranks agree exactly
    assert not _close(single[f"{loss} grads"], 2 * single[f"{loss} grads"])  # the check can fail


def test_a_distributed_torchsde_step_equals_the_single_process_euler_step(distributed_and_single):
    """Under torch.distributed torchsde's Brownian motion takes the shared increments: the backends agree."""
    ranks, single, _ = distributed_and_single
    for key in ("params", "grads", "info"):
        assert _close(ranks[0][f"log_variance torchsde {key}"], single[f"log_variance {key}"]), key
        assert torch.equal(ranks[0][f"log_variance torchsde {key}"], ranks[1][f"log_variance torchsde {key}"])


def test_distributed_run_evidence_and_samples_equal_the_single_process(distributed_and_single):
    ranks, single, out_dir = distributed_and_single
    for key in ("run params", "run ema", "log_evidence", "z", "log_w"):
        assert _close(ranks[0][key], single[key]), key
        assert _close(ranks[1][key], single[key]), key
    assert os.path.isfile(os.path.join(out_dir, "run.ckpt"))  # rank 0 wrote it
    resumed = DiffusionSampler.load(os.path.join(out_dir, "run.ckpt"), log_density=two_modes)
    assert _close(_flat(resumed.control), single["run params"])


def test_a_distributed_resume_equals_the_single_process_resume(distributed_and_single):
    ranks, single, _ = distributed_and_single
    assert int(ranks[0]["resumed from"]) == int(single["resumed from"]) == 2
    assert _close(ranks[0]["resumed params"], single["resumed params"])
    assert torch.equal(ranks[0]["resumed params"], ranks[1]["resumed params"])


@pytest.mark.parametrize("split", ["even", "uneven"])
def test_a_distributed_ratio_fit_equals_the_single_process_fit(distributed_and_single, split):
    ranks, single, _ = distributed_and_single
    for key in (f"ratio {split} params", f"ratio {split} losses", f"ratio {split} validation"):
        assert _close(ranks[0][key], single[key]), key
        assert torch.equal(ranks[0][key], ranks[1][key]), key


def test_a_distributed_flow_guided_fit_keeps_the_ranks_in_step(distributed_and_single):
    """Each rank flows its own prior draws (not the single process's), so the ranks must agree."""
    ranks, single, _ = distributed_and_single
    assert torch.equal(ranks[0]["fdrl params"], ranks[1]["fdrl params"])
    assert torch.equal(ranks[0]["fdrl losses"], ranks[1]["fdrl losses"])
    assert torch.isfinite(ranks[0]["fdrl losses"]).all()
    assert not torch.equal(ranks[0]["fdrl params"], single["fdrl params"])  # trained on other draws


def test_distributed_smc_keeps_the_ranks_in_step_and_finds_the_evidence(distributed_and_single):
    """Each rank moves its slice of the particles with its own stream: the ranks must agree exactly
    and the evidence must match the closed form (as the single process's does)."""
    ranks, single, _ = distributed_and_single
    assert torch.equal(ranks[0]["smc particles"], ranks[1]["smc particles"])
    assert torch.equal(ranks[0]["smc log_evidence"], ranks[1]["smc log_evidence"])
    for out in (ranks[0], single):
        log_z, stderr = out["smc log_evidence"].tolist()
        assert abs(log_z - math.log(2 * math.pi)) < 4 * stderr + 0.02
    assert not torch.equal(ranks[0]["smc particles"], single["smc particles"])  # other move noise


def test_rank_0_fits_the_preconditioner_for_every_rank(distributed_and_single):
    ranks, single, _ = distributed_and_single
    assert int(ranks[1]["fit calls"]) < int(ranks[0]["fit calls"]) == int(single["fit calls"])
    assert torch.equal(ranks[0]["preconditioner"], ranks[1]["preconditioner"])
    for key in ("preconditioner", "preconditioned params"):
        assert _close(ranks[0][key], single[key]), key
        assert torch.equal(ranks[0][key], ranks[1][key]), key


def test_helpers_are_the_single_process_answer_when_not_distributed():
    assert not _distributed.is_distributed()
    assert (_distributed.rank(), _distributed.world_size()) == (0, 1)
    assert _distributed.shard(7) == slice(0, 7)
    x = torch.arange(3.0)
    assert _distributed.all_gather_cat(x) is x
    mean, count = _distributed.global_mean_count(x)
    assert (float(mean), count) == (1.0, 3)
    assert _distributed.agree(True) is True
