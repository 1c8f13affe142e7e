"""Checkpoints of every saver (DiffusionSampler, RatioEstimator, FlowGuidedGenerator): kill -9 during
saves never leaves an unloadable file, damaged / truncated / foreign files and malicious pickles are
refused (and run no code), kill-and-resume is bit-identical and resume keeps checkpointing."""

import builtins
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from _interrupt import Interrupting

import pyro_sde
from pyro_sde import DiffusionSampler
from pyro_sde._checkpoint import atomic_save, checksum, load_checkpoint, save_checkpoint
from pyro_sde.ratio import (
    ClassifierRatioEstimator,
    FlowGuidedGenerator,
    RatioEstimator,
    TelescopingRatioEstimator,
)
from pyro_sde.ratio.paths import LinearPath

ROOT = Path(__file__).resolve().parents[1]


def _gaussian_log_density(x):
    return -0.5 * (x**2).sum(-1)


def _small_sampler(**kw):
    return DiffusionSampler(log_density=_gaussian_log_density, dim=2, num_steps=10, hidden_dim=16,
                            num_layers=1, **kw)


def _small_fdrl(**kw):
    return FlowGuidedGenerator(2, num_flow_steps=2, step_size=0.1, hidden_dim=8, num_layers=1, **kw)


# one checkpoint of each saver, and its loader ---------------------------------------------------
def _save_sampler(path):
    s = _small_sampler()
    s.run(num_iterations=2, batch_size=8, progress_bar=False)
    s.save(path)


def _save_ratio(path):
    est = ClassifierRatioEstimator(2, hidden_dim=16, num_layers=1)
    est.fit(torch.randn(64, 2) + 1, torch.randn(64, 2), num_iterations=2, batch_size=16, progress_bar=False)
    est.save(path)


def _save_fdrl(path):
    _small_fdrl().fit(torch.randn(64, 2), num_iterations=2, batch_size=16, progress_bar=False,
                      checkpoint_path=path)


SAVERS = {"sampler": _save_sampler, "ratio": _save_ratio, "fdrl": _save_fdrl}
LOADERS = {
    "sampler": lambda p: DiffusionSampler.load(p, log_density=_gaussian_log_density),
    "ratio": lambda p: RatioEstimator.load(p),
    "fdrl": lambda p: FlowGuidedGenerator.load(p),
}


# ------------------------------------------------------------------------------------------------
# kill -9 during saves
# ------------------------------------------------------------------------------------------------
# A fork server: imports once, then per line of stdin (a path) forks a child that saves to that path
# in a loop (every step) until it is killed; prints the child's pid, then "reaped" once it died.
_FORK_SERVER = r"""
import os, sys
import torch
torch.set_num_threads(1)
from pyro_sde import DiffusionSampler
from pyro_sde.ratio import ClassifierRatioEstimator, FlowGuidedGenerator

kind, warm_up = sys.argv[1], sys.argv[2]
forever = 10 ** 9
# build and warm up (first calls are slow) before forking: a child starts saving within milliseconds
if kind == "sampler":
    obj = DiffusionSampler(log_density=lambda x: -0.5 * (x ** 2).sum(-1), dim=2, num_steps=10,
                           hidden_dim=256, num_layers=3)
    obj.run(num_iterations=1, batch_size=8, progress_bar=False, checkpoint=warm_up)
    def save_forever(path):
        obj.run(num_iterations=forever, batch_size=8, until=None, progress_bar=False, checkpoint=path,
                checkpoint_every=1)  # until=None: an exact Gaussian would converge and end the loop
elif kind == "ratio":
    obj = ClassifierRatioEstimator(2, hidden_dim=256, num_layers=2)
    obj.fit(torch.randn(64, 2) + 1, torch.randn(64, 2), num_iterations=2, batch_size=16, progress_bar=False)
    obj.save(warm_up)
    def save_forever(path):
        while True:
            obj.save(path)
else:
    obj = FlowGuidedGenerator(2, num_flow_steps=2, step_size=0.1, hidden_dim=128, num_layers=2)
    data = torch.randn(64, 2)
    obj.fit(data, num_iterations=1, batch_size=16, progress_bar=False, checkpoint_path=warm_up)
    def save_forever(path):
        obj.fit(data, num_iterations=forever, batch_size=16, progress_bar=False, checkpoint_path=path,
                checkpoint_every=1)

print("ready", flush=True)
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        try:
            save_forever(line.strip())
        finally:
            os._exit(1)
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("kind", ["sampler", "ratio", "fdrl"])
def test_kill_during_saves_never_leaves_an_unloadable_file(tmp_path, kind):
    num_kills = 16  # >= 8 asked; 16 so that some kill surely lands inside a save (~40% of the time)
    rng = random.Random(1234)  # fixed kill times
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    child = None
    server = subprocess.Popen([sys.executable, "-c", _FORK_SERVER, kind, str(tmp_path / "warm_up.pt")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        assert server.stdout.readline().strip() == "ready"
        mid_save = 0
        for i in range(num_kills):
            path = tmp_path / f"{kind}_{i}.pt"
            server.stdin.write(f"{path}\n")
            server.stdin.flush()
            child = int(server.stdout.readline())
            deadline = time.monotonic() + 60
            while not path.exists():  # the child has saved at least once: it is in its save loop
                assert time.monotonic() < deadline, "the saving process never wrote its checkpoint"
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.25))
            os.kill(child, signal.SIGKILL)
            assert server.stdout.readline().strip() == "reaped"
            child = None
            LOADERS[kind](path)  # the target is always a complete checkpoint (old or new)
            left = list(tmp_path.glob(f"{path.name}.tmp-*"))  # a kill inside a save leaves its temp file
            mid_save += bool(left)
            for tmp in left:
                tmp.unlink()
        print(f"{kind}: {mid_save} of {num_kills} kills landed inside a save")
        assert mid_save >= 1, "no kill landed inside a save: the test did not exercise the atomic write"
    finally:  # no process outlives the test, even when it fails
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        server.kill()
        server.wait()


# ------------------------------------------------------------------------------------------------
# damaged, truncated and foreign files
# ------------------------------------------------------------------------------------------------
def _largest_tensor_region(path):
    """``(start, size)`` in the file of the largest tensor record of a ``torch.save`` zip."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    assert info.compress_type == zipfile.ZIP_STORED
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


@pytest.mark.parametrize("kind", ["sampler", "ratio", "fdrl"])
def test_byte_flipped_and_truncated_checkpoints_are_refused(tmp_path, kind):
    path = tmp_path / "c.pt"
    SAVERS[kind](path)
    LOADERS[kind](path)  # the intact file loads
    raw = bytearray(path.read_bytes())
    start, size = _largest_tensor_region(path)
    assert size >= 64
    flipped = bytearray(raw)
    offset = start + (size - 64) // 2
    for j in range(offset, offset + 64):
        flipped[j] ^= 0xFF
    (tmp_path / "flipped.pt").write_bytes(flipped)
    with pytest.raises(ValueError, match=r"damaged \(checksum mismatch\)"):
        LOADERS[kind](tmp_path / "flipped.pt")
    for cut in (len(raw) // 2, len(raw) - 10, 100):
        (tmp_path / "cut.pt").write_bytes(raw[:cut])
        with pytest.raises(ValueError, match="is not a .* checkpoint"):
            LOADERS[kind](tmp_path / "cut.pt")


def test_checkpoint_of_another_kind_is_refused_naming_both(tmp_path):
    for kind in SAVERS:
        SAVERS[kind](tmp_path / f"{kind}.pt")
    with pytest.raises(ValueError, match="holds a ClassifierRatioEstimator checkpoint, not a DiffusionSam"):
        LOADERS["sampler"](tmp_path / "ratio.pt")
    with pytest.raises(ValueError, match="holds a DiffusionSampler checkpoint, not a ClassifierRatioEst"):
        LOADERS["ratio"](tmp_path / "sampler.pt")
    with pytest.raises(ValueError, match="holds a FlowGuidedGenerator checkpoint, not a "):
        ClassifierRatioEstimator.load(tmp_path / "fdrl.pt")
    with pytest.raises(ValueError, match="holds a ClassifierRatioEstimator checkpoint, not a FlowGuided"):
        LOADERS["fdrl"](tmp_path / "ratio.pt")


def _model(shape, positive=False):
    def model(y):
        loc = pyro.sample("mu", dist.Normal(torch.zeros(shape), 1.0).to_event(len(shape)))
        scale = pyro.sample("s", dist.LogNormal(0.0, 1.0) if positive else dist.Normal(1.0, 0.1))
        with pyro.plate("n", y.shape[0]):
            pyro.sample("y", dist.Normal(loc.sum(-1) if shape else loc, scale.abs()), obs=y)

    return model


def test_checkpoint_of_another_model_is_refused_naming_the_difference(tmp_path):
    y = torch.randn(6)
    sampler = DiffusionSampler(_model(()), num_steps=10, hidden_dim=8, num_layers=1)
    sampler.run(y, num_iterations=2, batch_size=8, progress_bar=False)
    sampler.save(tmp_path / "m.pt")
    DiffusionSampler.load(tmp_path / "m.pt", _model(())).setup(y)  # the same model binds fine
    other = DiffusionSampler.load(tmp_path / "m.pt", _model((2,)))
    with pytest.raises(ValueError, match=r"latent sites differ: saved \{'mu': \(\(\), 'real'\), .*"
                                         r"this model \{'mu': \(\(2,\), 'real'\).*"
                                         r"dim differs: saved 2, this model 3"):
        other.setup(y)
    with pytest.raises(ValueError, match=r"latent sites differ: .*'s': \(\(\), 'real'\).*"
                                         r"'s': \(\(\), 'greater_than\(lower_bound=0.0\)'\)"):
        DiffusionSampler.load(tmp_path / "m.pt", _model((), positive=True)).resume(y, progress_bar=False)
    # a log-density sampler is checked at load (its density is bound there)
    _save_sampler(tmp_path / "s.pt")
    with pytest.raises(ValueError, match=r"latent sites differ: saved \{'x': \(\(2,\), 'real'\)\}, "
                                         r"this model \{'x': \(\(3,\), 'real'\)\}"):
        DiffusionSampler.load(tmp_path / "s.pt", log_density=_gaussian_log_density, dim=3)


def test_another_package_version_warns(tmp_path, monkeypatch):
    _save_sampler(tmp_path / "s.pt")
    monkeypatch.setattr(pyro_sde, "__version__", "99.0")
    with pytest.warns(UserWarning, match="package version differs: saved '.*', this model '99.0'"):
        LOADERS["sampler"](tmp_path / "s.pt")


# ------------------------------------------------------------------------------------------------
# malicious pickles
# ------------------------------------------------------------------------------------------------
class _CreatesMarker:
    """Unpickling this object creates the file ``marker`` (``open(marker, "w")``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


@pytest.mark.parametrize("kind", ["sampler", "ratio", "fdrl"])
def test_malicious_pickle_is_refused_and_runs_no_code(tmp_path, kind):
    marker = tmp_path / "marker"
    evil = _CreatesMarker(marker)
    torch.save(evil, tmp_path / "torch_save.pt")
    with open(tmp_path / "plain_pickle.pt", "wb") as f:
        pickle.dump(evil, f)
    # a real checkpoint's envelope with an object smuggled into the payload
    SAVERS[kind](tmp_path / "real.pt")
    blob = torch.load(tmp_path / "real.pt", weights_only=True)
    blob["payload"]["config"] = evil
    torch.save(blob, tmp_path / "smuggled.pt")
    assert not marker.exists()
    for name in ("torch_save.pt", "plain_pickle.pt", "smuggled.pt"):
        with pytest.raises(ValueError, match="Python objects, which are not loaded for safety"):
            LOADERS[kind](tmp_path / name)
        assert not marker.exists()
    torch.load(tmp_path / "torch_save.pt", weights_only=False)  # the control: unpickling runs the code
    assert marker.exists()


def test_unsafe_values_are_refused_at_save_naming_them(tmp_path):
    with pytest.raises(TypeError, match=r"payload\['config'\]\['f'\] is a function"):
        save_checkpoint(tmp_path / "x.pt", {"config": {"f": _gaussian_log_density}}, kind="X", fingerprint={})
    assert list(tmp_path.iterdir()) == []
    # a sampler with a non-plain option cannot be saved
    s = _small_sampler()
    s._config["loss"] = object()
    with pytest.raises(TypeError, match=r"payload\['config'\]\['loss'\] is a object"):
        s.save(tmp_path / "s.pt")


def test_custom_fdrl_network_and_prior_are_passed_again_to_load(tmp_path):
    def make_net():
        return torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1),
                                   torch.nn.Flatten(0))

    prior = dist.MultivariateNormal(torch.zeros(2), torch.eye(2))
    data = torch.randn(64, 2)
    gen = _small_fdrl(network=make_net(), prior=prior)
    gen.fit(data, num_iterations=3, batch_size=16, progress_bar=False)
    gen.save(tmp_path / "g.pt")
    with pytest.raises(ValueError, match=r"network=Sequential .*prior=MultivariateNormal distribution.*"
                                         r"pass network=<a Sequential like the saved one>"):
        FlowGuidedGenerator.load(tmp_path / "g.pt")
    back = FlowGuidedGenerator.load(tmp_path / "g.pt", network=make_net, prior=prior)  # a constructor
    assert torch.equal(back.log_ratio(data), gen.log_ratio(data))
    wrong = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1),
                                torch.nn.Flatten(0))
    with pytest.raises(ValueError, match="do not fit the estimator"):
        FlowGuidedGenerator.load(tmp_path / "g.pt", network=wrong, prior=prior)


def test_custom_ratio_path_and_network_are_passed_again_to_load(tmp_path):
    x_num, x_den = torch.randn(64, 2) + 1, torch.randn(64, 2)
    est = TelescopingRatioEstimator(2, num_bridges=2, path=LinearPath(), hidden_dim=8, num_layers=1)
    est.fit(x_num, x_den, num_iterations=2, batch_size=16, progress_bar=False)
    est.save(tmp_path / "t.pt")
    with pytest.raises(ValueError, match=r"path=LinearPath \(built from the saved options: DREInfinity"):
        RatioEstimator.load(tmp_path / "t.pt")
    back = RatioEstimator.load(tmp_path / "t.pt", path=LinearPath)
    assert type(back) is TelescopingRatioEstimator and isinstance(back.path, LinearPath)
    assert torch.equal(back.log_ratio(x_num), est.log_ratio(x_num))
    net = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.Flatten(0))
    clf = ClassifierRatioEstimator(2, network=net).fit(x_num, x_den, num_iterations=2, batch_size=16,
                                                        progress_bar=False)
    clf.save(tmp_path / "c.pt")
    with pytest.raises(ValueError, match="pass network=<a Sequential like the saved one> to load"):
        ClassifierRatioEstimator.load(tmp_path / "c.pt")
    fresh = torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.Flatten(0))
    back = ClassifierRatioEstimator.load(tmp_path / "c.pt", network=fresh)
    assert back.network is fresh and torch.equal(back.log_ratio(x_num), clf.log_ratio(x_num))


# ------------------------------------------------------------------------------------------------
# the atomic writer and the checksum
# ------------------------------------------------------------------------------------------------
def test_atomic_save_keeps_the_old_file_and_no_temporary_on_error(tmp_path):
    target = tmp_path / "t.pt"
    atomic_save({"a": torch.ones(3)}, target)
    before = target.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - pickling a lambda fails inside torch.save
        atomic_save({"a": lambda: 0}, target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["t.pt"]
    assert torch.equal(torch.load(target, weights_only=True)["a"], torch.ones(3))


def test_checksum_sees_values_types_and_order_of_lists_not_dict_order():
    base = checksum("K", 1, {"dim": 2}, {"a": torch.arange(3.0), "b": [1, 2.0]})
    assert base == checksum("K", 1, {"dim": 2}, {"b": [1, 2.0], "a": torch.arange(3.0)})
    a = torch.arange(3.0)
    for payload in ({"a": a, "b": [2.0, 1]}, {"a": a, "b": [1.0, 2.0]}, {"a": a, "b": (1, 2.0)},
                    {"a": torch.arange(3), "b": [1, 2.0]}, {"a": a + 1e-7, "b": [1, 2.0]},
                    {"a": a.reshape(3, 1), "b": [1, 2.0]}):
        assert checksum("K", 1, {"dim": 2}, payload) != base
    assert checksum("K", 1, {"dim": 3}, {"a": torch.arange(3.0), "b": [1, 2.0]}) != base


def test_load_checkpoint_round_trips_plain_values(tmp_path):
    from collections import namedtuple

    Pair = namedtuple("Pair", "a b")
    payload = {"t": torch.randn(2, 3, dtype=torch.float64), "dtype": torch.float32, "pair": Pair(1, 2.5),
               "nested": {3: [None, True, "s"]}, "size": torch.Size([2, 3])}
    save_checkpoint(tmp_path / "p.pt", payload, kind="X", fingerprint={"dim": 1})
    ckpt = load_checkpoint(tmp_path / "p.pt", kind=("Y", "X"), expected_fingerprint={"dim": 1})
    assert ckpt.kind == "X" and ckpt.fingerprint == {"dim": 1}
    got = ckpt.payload
    assert torch.equal(got["t"], payload["t"]) and got["dtype"] is torch.float32
    assert got["pair"] == (1, 2.5) and type(got["pair"]) is tuple and got["size"] == (2, 3)
    assert got["nested"] == {3: [None, True, "s"]}
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt", kind="X")


# ------------------------------------------------------------------------------------------------
# kill and resume
# ------------------------------------------------------------------------------------------------
def _shifted_gaussian(x):
    return _gaussian_log_density(x) - 0.3 * x[..., 0]


def _interrupting(stop_at=None):
    """``_shifted_gaussian`` that raises KeyboardInterrupt at its ``stop_at``-th call (Ctrl-C mid-run)."""
    return Interrupting(_shifted_gaussian, stop_at)


def test_second_interruption_after_resume_loses_no_work_and_stays_bit_identical(tmp_path):
    options = dict(dim=2, num_steps=8, hidden_dim=16, num_layers=1, ema_decay=0.9, precondition=None)
    torch.manual_seed(1)
    full = DiffusionSampler(log_density=_interrupting(), **options)
    full.run(num_iterations=12, batch_size=16, progress_bar=False)

    path = tmp_path / "run.pt"
    calls = 9  # log-density calls per iteration: 8 guides + the boundary (and 1 probe at construction)
    torch.manual_seed(1)
    first = DiffusionSampler(log_density=_interrupting(stop_at=1 + calls * 4 + 1), **options)
    with pytest.raises(KeyboardInterrupt):  # inside iteration 5: the file holds 3 iterations
        first.run(num_iterations=12, batch_size=16, progress_bar=False, checkpoint=path, checkpoint_every=3)
    second = DiffusionSampler.load(path, log_density=_interrupting(stop_at=calls * 5 + 2))
    assert second._run_state["done"] == 3
    with pytest.raises(KeyboardInterrupt):  # inside iteration 9 of 12; resume checkpointed to `path`
        second.resume(progress_bar=False)
    third = DiffusionSampler.load(path, log_density=_interrupting())
    assert third._run_state["done"] == 6  # not 3: the resumed run kept checkpointing to the same file
    torch.manual_seed(123)  # the checkpoint's random state is restored by resume
    third.resume(progress_bar=False)
    assert third.losses == full.losses
    for a, b in zip(full._parameters(), third._parameters()):
        assert torch.equal(a, b)


def test_resume_checkpoint_options(tmp_path):
    path, elsewhere = tmp_path / "run.pt", tmp_path / "elsewhere.pt"
    torch.manual_seed(0)
    s = DiffusionSampler(log_density=_interrupting(stop_at=1 + 11 * 3 + 1), dim=2, num_steps=10,
                         hidden_dim=16, num_layers=1, precondition=None)
    with pytest.raises(KeyboardInterrupt):  # inside iteration 4 (11 calls per iteration, 1 probe)
        s.run(num_iterations=10, batch_size=8, until=None, progress_bar=False, checkpoint=path,
              checkpoint_every=2)
    saved = path.read_bytes()
    loaded = DiffusionSampler.load(path, log_density=_gaussian_log_density)
    loaded.resume(progress_bar=False, checkpoint=None)  # None: no checkpoints
    assert path.read_bytes() == saved and not elsewhere.exists()
    DiffusionSampler.load(path, log_density=_gaussian_log_density).resume(progress_bar=False,
                                                                         checkpoint=elsewhere)
    assert path.read_bytes() == saved
    assert DiffusionSampler.load(elsewhere, log_density=_gaussian_log_density)._run_state["done"] == 10
    # in the same session, "same" is the file the interrupted run wrote
    s.resume(progress_bar=False)
    assert DiffusionSampler.load(path, log_density=_gaussian_log_density)._run_state["done"] == 10
    # ... and a later run without a checkpoint does not write to it
    saved = path.read_bytes()
    s.run(num_iterations=2, batch_size=8, progress_bar=False)
    s._run_state["done"] = 1
    s.resume(progress_bar=False)
    assert path.read_bytes() == saved
    # a checkpoint saved before any run has nothing to resume
    fresh = _small_sampler()
    fresh.save(tmp_path / "fresh.pt")
    with pytest.raises(RuntimeError, match="nothing to resume"):
        DiffusionSampler.load(tmp_path / "fresh.pt", log_density=_gaussian_log_density).resume()
