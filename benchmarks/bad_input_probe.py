"""Bad-input probe: a fixed list of bad or extreme inputs across the public entry points.

Each case is classified as

* ``clear``: an exception whose message names the argument or the problem;
* ``obscure``: any other exception (from inside torch / Pyro, or a message that names nothing);
* ``silent``: no exception, but a NaN/inf or wrong result, or no warning where one is due;
* ``ok``: a correct result (with the warning that is due, if any), or a refusal by a warning that
  names the problem.

Run from the repository root (so that the working tree's ``pyro_sde`` is imported)::

    OMP_NUM_THREADS=1 python benchmarks/bad_input_probe.py [--verbose]

It prints the counts per class (and with ``--verbose`` every case). It runs in about a minute.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path.cwd()))

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402

import pyro_sde  # noqa: E402
from pyro_sde import diagnostics as diag  # noqa: E402
from pyro_sde import ratio, scores, sde, targets  # noqa: E402
from pyro_sde.infer import DiffusionSampler, LearnedBridge, LogDensityPotential, bridge_log_weights, lbfgs_map  # noqa: E402,E501

NAN, INF = math.nan, math.inf
F64 = torch.float64


class Case(NamedTuple):
    name: str
    fn: Callable  #: the call
    keywords: tuple  #: words a clear message contains (any of them, case-insensitive)
    expect: str = "error"  #: "error" (must be refused) or "value" (must return a sound result)
    check: Callable | None = None  #: "value": result -> bool (sound?)
    warn: tuple = ()  #: "value": words of a warning that is due (any of them)


def finite(x) -> bool:
    if isinstance(x, dict):
        return all(finite(v) for v in x.values())
    if isinstance(x, (tuple, list)):
        return all(finite(v) for v in x)
    if isinstance(x, torch.Tensor):
        return bool(torch.isfinite(x).all()) if x.is_floating_point() else True
    if isinstance(x, float):
        return math.isfinite(x)
    return True


def classify(case: Case) -> tuple[str, str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = case.fn()
        except Exception as e:  # noqa: BLE001 - classifying every outcome is the point
            message = f"{type(e).__name__}: {e}"
            named = any(k.lower() in str(e).lower() for k in case.keywords)
            clear = named and not isinstance(e, (AssertionError, IndexError, KeyError, AttributeError))
            return ("clear" if clear else "obscure"), message[:160]
    messages = " | ".join(str(w.message) for w in caught)
    warned = lambda words: any(k.lower() in messages.lower() for k in words)  # noqa: E731
    if case.expect == "error":
        return (
            ("ok", f"warned: {messages[:150]}") if warned(case.keywords) else ("silent", repr(result)[:150])
        )
    sound = case.check(result) if case.check is not None else finite(result)
    if not sound:
        return "silent", f"unsound result {repr(result)[:140]}"
    if case.warn and not warned(case.warn):
        return "silent", f"no warning about {case.warn}"
    return "ok", ""


# --------------------------------------------------------------------------------------------------
# fixtures (small and fast)
# --------------------------------------------------------------------------------------------------


def gaussian_ld(x):
    return -0.5 * (x**2).sum(-1)


def small(**kw):
    options = dict(log_density=gaussian_ld, dim=2, num_steps=8, hidden_dim=8, num_layers=1, precondition=None)
    options.update(kw)
    return DiffusionSampler(**options)


def trained(**kw):
    s = small(**kw)
    s.run(num_iterations=3, batch_size=16, progress_bar=False)
    return s


def normal_model(y):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0), 1.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def nan_model():
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    pyro.factor("f", torch.where(mu.abs() < 10, torch.tensor(NAN), mu))


def flaky_ld():
    calls = [0]

    def ld(x):
        calls[0] += 1
        out = gaussian_ld(x)
        return out * NAN if calls[0] % 2 == 0 and x.shape[0] > 2 else out

    return ld


def degenerate_evidence():
    # exact log Z = 0: a normalised N(30, 0.1^2) target, untrained sampler
    def ld(x):
        return dist.Normal(30.0, 0.1).log_prob(x).sum(-1)

    s = small(log_density=ld, dim=1)
    return s.log_evidence(2000)


def wide_summary():
    # a true posterior std of 1e4
    def ld(x):
        return dist.Normal(0.0, 1e4).log_prob(x).sum(-1)

    return small(log_density=ld, dim=1).get_summary(num_samples=2000)


def quantised_evidence():
    s = small(log_density=lambda x: -1e6 - 0.5 * (x**2).sum(-1), dim=1, num_steps=10)
    ev = s.log_evidence(4000)
    exact = -1e6 + 0.5 * math.log(2 * math.pi)
    return ev, exact


def quantised_ok(result):
    ev, exact = result
    return abs(float(ev.log_z) - exact) < 4 * float(ev.stderr) + 1e-3


def partly_nan_sampler():
    def ld(x):
        out = gaussian_ld(x)
        return torch.where(x[:, 0] > 1.5, torch.full_like(out, NAN), out)

    return small(log_density=ld)


def ou(**kw):
    return sde.OrnsteinUhlenbeck(**({"theta": 1.0, "sigma": 0.5} | kw))


TIMES = torch.linspace(0.0, 1.0, 5)
OBS = torch.tensor([[0.0], [0.3], [0.1], [-0.2], [0.4]])
CIR_OBS = torch.tensor([[1.0], [1.3], [0.9], [0.7], [1.1]])
INT_OBS = torch.tensor([[0], [1], [1], [0], [2]])
LW = torch.randn(100, generator=torch.Generator().manual_seed(0))
X2 = torch.randn(200, 2, generator=torch.Generator().manual_seed(1))
X2b = torch.randn(200, 2, generator=torch.Generator().manual_seed(2)) + 0.5


def with_column(x, j, value):
    x = x.clone()
    x[:, j] = value
    return x


def nan_at(x, value=NAN):
    x = x.clone()
    x.view(-1)[3] = value
    return x


def fitted_classifier():
    est = ratio.ClassifierRatioEstimator(2, hidden_dim=8, num_layers=1)
    return est.fit(X2, X2b, num_iterations=3, batch_size=32, progress_bar=False)


def quick_fit(est, num=X2, den=X2b, **kw):
    return est.fit(num, den, **({"num_iterations": 2, "batch_size": 16, "progress_bar": False} | kw))


def ratio_classes():
    return {
        "classifier": lambda: ratio.ClassifierRatioEstimator(2, hidden_dim=8, num_layers=1),
        "telescoping": lambda: ratio.TelescopingRatioEstimator(2, num_bridges=2, hidden_dim=8, num_layers=1),
        "tangent": lambda: ratio.TangentRatioEstimator(2, network_options={"hidden_dim": 8, "num_layers": 1}),
        "secant": lambda: ratio.SecantRatioEstimator(2),
    }


def run_map_nan_region():
    def model():
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 10.0))
        pyro.factor("f", torch.where(mu < 2, -50 * (mu - 3) ** 2, torch.tensor(NAN, dtype=F64)))

    with pyro.validation_enabled(False):
        return lbfgs_map(model)


def run_map_nan_region_validated():
    def model():
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 10.0))
        pyro.factor("f", torch.where(mu < 2, -50 * (mu - 3) ** 2, torch.tensor(NAN, dtype=F64)))

    return lbfgs_map(model)


def map_model(y):
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 2.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)


def ou_model_extreme():
    # a sampler-proposed point with theta < 0, evaluated with validation off (the hot path)
    with pyro.validation_enabled(False):
        s = sde.OrnsteinUhlenbeck(theta=torch.tensor([1.0, -1.0]), sigma=torch.tensor([0.5, 0.5]))
        return sde.DiscretelyObservedSDE(s, TIMES, proposal="mdb", num_particles=4, num_substeps=3).log_prob(
            OBS
        )


def nan_or_neg_inf_last(result):
    return bool(torch.isfinite(result[0])) and not bool(torch.isfinite(result[1]))


def transform_cases():
    t = torch.distributions.transforms.ExpTransform()
    x = torch.randn(5, 2)
    s = -x
    return t, x, s


def cases() -> list[Case]:
    c: list[Case] = []
    add = c.append

    # ---- DiffusionSampler constructor --------------------------------------------------------
    for name, value in [
        ("num_steps", 0),
        ("num_steps", 2.5),
        ("num_steps", -3),
        ("lr", 0.0),
        ("lr", -1.0),
        ("lr", INF),
        ("lr", NAN),
        ("lr", "big"),
        ("grad_clip", 0.0),
        ("grad_clip", INF),
        ("score_clip", -1.0),
        ("score_clip", INF),
        ("control_clip", 0.0),
        ("control_clip", NAN),
        ("final_lr_fraction", 2.0),
        ("final_lr_fraction", 0.0),
        ("final_lr_fraction", INF),
        ("exploration_noise", 0.0),
        ("exploration_noise", INF),
        ("ema_decay", 1.0),
        ("ema_decay", -0.1),
        ("ema_decay", 2),
        ("hidden_dim", 0),
        ("num_layers", 0),
        ("method", "xyz"),
        ("backend", "cuda"),
        ("loss", "nope"),
        ("T", 0.0),
        ("T", INF),
        ("T", -1.0),
        ("sigma", 0.0),
        ("sigma", -1.0),
        ("beta_min", -1.0),
        ("beta_max", NAN),
    ]:
        add(
            Case(
                f"DiffusionSampler({name}={value!r})", lambda n=name, v=value: small(**{n: v}), (name, "beta")
            )
        )
    add(Case("DiffusionSampler(dim=0)", lambda: small(dim=0), ("dim",)))
    add(Case("DiffusionSampler(dim=None)", lambda: small(dim=None), ("dim",)))
    add(Case("DiffusionSampler(log_density=3)", lambda: small(log_density=3), ("log_density",)))
    add(
        Case(
            "DiffusionSampler(log_density wrong shape)",
            lambda: small(log_density=lambda x: x),
            ("log_density",),
        )
    )
    add(
        Case(
            "DiffusionSampler(model and log_density)",
            lambda: DiffusionSampler(normal_model, log_density=gaussian_ld, dim=1),
            ("model", "log_density"),
        )
    )
    add(Case("DiffusionSampler(model=42)", lambda: DiffusionSampler(42), ("model",)))
    add(Case("DiffusionSampler(control='net')", lambda: small(control="net"), ("control",)))
    add(Case("DiffusionSampler(dtype=torch.int64)", lambda: small(dtype=torch.int64), ("dtype",)))
    add(Case("DiffusionSampler(dtype='float64')", lambda: small(dtype="float64"), ("dtype",)))
    if not torch.cuda.is_available():
        add(
            Case(
                "DiffusionSampler(device='cuda') without CUDA",
                lambda: small(device="cuda"),
                ("device", "cuda"),
            )
        )
    add(Case("DiffusionSampler(device='gpu0')", lambda: small(device="gpu0"), ("device",)))
    add(
        Case(
            "DiffusionSampler(model, dtype=float64) float32 model",
            lambda: (
                DiffusionSampler(normal_model, dtype=F64, num_steps=8, hidden_dim=8, num_layers=1)
                .setup(torch.zeros(3))
                .get_samples(20, resample=False)["mu"]
                .dtype
                == F64
            ),
            ("dtype",),
            "error",
        )
    )
    add(
        Case(
            "DiffusionSampler(log_density f32, dtype=float64)",
            lambda: small(log_density=lambda x: gaussian_ld(x).float(), dtype=F64).sample_unconstrained(50),
            (),
            "value",
            check=lambda r: r[0].dtype == F64 and r[1].dtype == F64,
        )
    )

    # ---- run / step --------------------------------------------------------------------------
    for name, value in [
        ("num_iterations", 0),
        ("num_iterations", 1.5),
        ("batch_size", 1),
        ("batch_size", 0),
        ("max_failed_steps", 0),
        ("checkpoint_every", 0),
    ]:
        kw = {name: value}
        if name == "checkpoint_every":
            kw["checkpoint"] = "/tmp/_probe_ckpt.pt"
        add(
            Case(
                f"run({name}={value!r})",
                lambda kw=kw: small().run(**({"num_iterations": 2, "progress_bar": False} | kw)),
                (name,),
            )
        )
    add(
        Case(
            "run(model args to log_density sampler)",
            lambda: small().run(torch.zeros(3), num_iterations=1, progress_bar=False),
            ("argument", "log_density"),
        )
    )
    add(
        Case(
            "run() NaN-everywhere density",
            lambda: small(log_density=lambda x: gaussian_ld(x) * NAN).run(
                num_iterations=10, batch_size=8, progress_bar=False
            ),
            ("failed", "finite"),
        )
    )
    add(
        Case(
            "run() flaky density (every other batch NaN)",
            lambda: small(log_density=flaky_ld()).run(num_iterations=10, batch_size=8, progress_bar=False),
            ("failed", "finite"),
        )
    )
    add(
        Case(
            "run() model with NaN factor",
            lambda: DiffusionSampler(nan_model, num_steps=8, hidden_dim=8, num_layers=1).run(
                num_iterations=4, batch_size=8, progress_bar=False
            ),
            ("nan", "finite", "failed"),
        )
    )
    add(
        Case(
            "run() before model data (sample)",
            lambda: DiffusionSampler(normal_model).get_samples(5),
            ("run",),
        )
    )
    add(Case("step(batch_size=1)", lambda: small().step(1), ("batch", "finite", "2 paths")))

    # ---- sampler estimates -------------------------------------------------------------------
    for meth in ("log_evidence", "ess", "diagnostics"):
        for value in (0, -5, 1.5, "10"):
            add(
                Case(f"{meth}({value!r})", lambda m=meth, v=value: getattr(trained(), m)(v), ("num_samples",))
            )
    add(Case("log_evidence(1)", lambda: trained().log_evidence(1), ("num_samples", "two", "2")))
    for value in (0, -1, 2.5):
        add(Case(f"get_samples({value!r})", lambda v=value: trained().get_samples(v), ("num_samples",)))
        add(
            Case(
                f"sample_unconstrained({value!r})",
                lambda v=value: trained().sample_unconstrained(v),
                ("num_samples",),
            )
        )
    add(
        Case(
            "sample_unconstrained(chunk_size=0)",
            lambda: trained().sample_unconstrained(10, chunk_size=0),
            ("chunk_size",),
        )
    )
    for value in (0.0, 1.0, -0.5, 1.5, NAN):
        add(
            Case(
                f"get_summary(prob={value!r})",
                lambda v=value: trained().get_summary(prob=v, num_samples=50),
                ("prob",),
            )
        )
    add(
        Case(
            "log_evidence degenerate weights (exact 0) warns",
            degenerate_evidence,
            (),
            "value",
            warn=("pareto", "unreliable"),
        )
    )
    add(
        Case("get_summary std for a true 1e4 warns", wide_summary, (), "value", warn=("pareto", "unreliable"))
    )
    add(
        Case(
            "log Z of a float32 density at -1e6",
            quantised_evidence,
            (),
            "value",
            check=quantised_ok,
            warn=("float32", "resolution", "quantis"),
        )
    )
    s_nan = partly_nan_sampler
    add(
        Case(
            "diagnostics() with some NaN paths",
            lambda: s_nan().diagnostics(2000),
            (),
            "value",
            warn=("dropped", "nan"),
        )
    )
    add(
        Case(
            "log_evidence() with some NaN paths",
            lambda: s_nan().log_evidence(2000),
            (),
            "value",
            warn=("dropped", "nan"),
        )
    )
    add(
        Case(
            "get_summary() with some NaN paths",
            lambda: s_nan().get_summary(num_samples=2000),
            (),
            "value",
            warn=("dropped", "nan"),
        )
    )
    add(
        Case(
            "get_samples() with some NaN paths",
            lambda: s_nan().get_samples(500),
            (),
            "value",
            warn=("dropped", "nan"),
        )
    )
    add(
        Case(
            "to_inference_data(sampler) with some NaN paths",
            lambda: diag.to_inference_data(s_nan(), 200).posterior["x"].values,
            (),
            "value",
            check=lambda v: bool(torch.isfinite(torch.as_tensor(v)).all()),
            warn=("dropped", "nan"),
        )
    )

    # ---- diagnostics functions ---------------------------------------------------------------
    fns = {
        "effective_sample_size": diag.effective_sample_size,
        "log_evidence": diag.log_evidence,
        "psis": diag.psis,
        "systematic_resample": diag.systematic_resample,
    }
    bad_weights = {
        "NaN": nan_at(LW),
        "+inf": nan_at(LW, INF),
        "all -inf": torch.full((10,), -INF),
        "2-D": LW.reshape(10, 10),
        "empty": torch.zeros(0),
        "scalar": torch.tensor(1.0),
    }
    for fname, fn in fns.items():
        for wname, w in bad_weights.items():
            add(
                Case(
                    f"{fname}({wname} weights)",
                    lambda fn=fn, w=w: fn(w),
                    ("log_weights", "log weights", "weights"),
                )
            )
    add(Case("systematic_resample(num_samples=0)", lambda: diag.systematic_resample(LW, 0), ("num_samples",)))
    add(
        Case(
            "weighted_summary(prob=2)",
            lambda: diag.weighted_summary({"a": torch.randn(100)}, LW, prob=2.0),
            ("prob",),
        )
    )
    add(
        Case(
            "weighted_summary(wrong N)",
            lambda: diag.weighted_summary({"a": torch.randn(50)}, LW),
            ("samples", "site"),
        )
    )
    add(Case("weighted_summary({})", lambda: diag.weighted_summary({}, LW), ("samples",)))
    add(Case("to_inference_data(3)", lambda: diag.to_inference_data(3), ("result",)))
    add(
        Case(
            "to_inference_data(dict, num_samples)",
            lambda: diag.to_inference_data({"a": torch.randn(10)}, 5),
            ("num_samples",),
        )
    )
    add(Case("pareto_k_threshold(1)", lambda: diag.pareto_k_threshold(1), ("num_samples",)))
    add(
        Case(
            "log_evidence degenerate raw weights warns",
            lambda: diag.log_evidence(
                torch.cat([torch.zeros(1), torch.full((999,), -50.0)]) + 10 * torch.randn(1000).abs()
            ),
            (),
            "value",
            warn=("pareto", "unreliable"),
        )
    )
    add(
        Case(
            "weighted_summary degenerate weights warns",
            lambda: diag.weighted_summary({"a": torch.randn(1000)}, 30 * torch.randn(1000)),
            (),
            "value",
            warn=("pareto", "unreliable"),
        )
    )
    add(
        Case(
            "to_inference_data degenerate weights warns",
            lambda: diag.to_inference_data(({"a": torch.randn(1000)}, 30 * torch.randn(1000))),
            (),
            "value",
            warn=("pareto", "unreliable"),
        )
    )

    # ---- SDE models --------------------------------------------------------------------------
    for cls, kw in [
        (sde.OrnsteinUhlenbeck, {"theta": -1.0, "sigma": 1.0}),
        (sde.OrnsteinUhlenbeck, {"theta": 1.0, "sigma": 0.0}),
        (sde.OrnsteinUhlenbeck, {"theta": NAN, "sigma": 1.0}),
        (sde.OrnsteinUhlenbeck, {"theta": INF, "sigma": 1.0}),
        (sde.OrnsteinUhlenbeck, {"theta": torch.tensor([1.0, -1.0]), "sigma": 1.0}),
        (sde.OrnsteinUhlenbeck, {"theta": 1.0, "sigma": torch.tensor(INF)}),
        (sde.OrnsteinUhlenbeck, {"theta": 1.0, "sigma": 1.0, "mean": torch.tensor([NAN])}),
        (sde.OrnsteinUhlenbeck, {"theta": 1.0, "sigma": 1.0, "dim": 0}),
        (sde.OrnsteinUhlenbeck, {"sigma": 1.0}),
        (sde.OrnsteinUhlenbeck, {"theta": 1.0}),
        (sde.GeometricBrownianMotion, {"sigma": -1.0}),
        (sde.GeometricBrownianMotion, {"sigma": INF}),
        (sde.GeometricBrownianMotion, {"mu": torch.tensor(INF)}),
        (sde.CIR, {"kappa": 0.0}),
        (sde.CIR, {"theta": -1.0}),
        (sde.CIR, {"sigma": NAN}),
        (sde.CIR, {"kappa": torch.tensor([1.0, 0.0])}),
        (sde.KunitaFlow, {"num_landmarks": 0}),
        (sde.KunitaFlow, {"num_landmarks": 3, "sigma": -1.0}),
        (sde.KunitaFlow, {"num_landmarks": 3, "gamma": 0.0}),
        (sde.LandmarkBrownian, {"reference": torch.zeros(3)}),
        (sde.LandmarkBrownian, {"reference": torch.zeros(3, 2), "alpha": -1.0}),
    ]:
        words = (
            tuple(k for k in kw if k != "dim")
            + (("dim",) if "dim" in kw else ())
            + ("theta", "sigma", "reference", "num_landmarks")
        )
        add(
            Case(
                f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in kw.items())})",
                lambda cls=cls, kw=kw: cls(**kw),
                words,
            )
        )
    add(
        Case(
            "OU(theta<0 particle) with validation off gives NaN for that particle",
            ou_model_extreme,
            (),
            "value",
            check=nan_or_neg_inf_last,
        )
    )

    # ---- SDE distributions -------------------------------------------------------------------
    path = lambda **kw: sde.SDEPath(ou(), TIMES, torch.zeros(1), **kw)  # noqa: E731

    def obs_sde(**kw):
        return sde.DiscretelyObservedSDE(ou(), TIMES, **({"num_particles": 4, "num_substeps": 3} | kw))

    add(
        Case(
            "SDEPath.log_prob(integer observations)",
            lambda: path().log_prob(INT_OBS),
            (),
            "value",
            check=lambda r: finite(r) and abs(float(r) - float(path().log_prob(INT_OBS.float()))) < 1e-5,
        )
    )
    for prop in ("exact", "euler", "forward", "mdb", "guided"):
        add(
            Case(
                f"DiscretelyObservedSDE({prop}).log_prob(integer observations)",
                lambda p=prop: obs_sde(proposal=p).log_prob(INT_OBS),
                (),
                "value",
            )
        )
        add(
            Case(
                f"DiscretelyObservedSDE({prop}).log_prob(NaN observation)",
                lambda p=prop: obs_sde(proposal=p, validate_args=True).log_prob(nan_at(OBS)),
                ("nan", "value", "observations"),
            )
        )
        add(
            Case(
                f"DiscretelyObservedSDE({prop}).log_prob(inf observation)",
                lambda p=prop: obs_sde(proposal=p, validate_args=True).log_prob(nan_at(OBS, INF)),
                ("inf", "value", "observations"),
            )
        )
    add(
        Case(
            "SDEPath.log_prob(inf observation)",
            lambda: path(validate_args=True).log_prob(nan_at(OBS, INF)),
            ("inf", "value", "observations"),
        )
    )
    add(Case("SDEPath.log_prob(wrong shape)", lambda: path().log_prob(torch.zeros(4, 1)), ("value", "shape")))
    add(
        Case(
            "SDEPath(times decreasing)", lambda: sde.SDEPath(ou(), TIMES.flip(0), torch.zeros(1)), ("times",)
        )
    )
    add(Case("SDEPath(times with NaN)", lambda: sde.SDEPath(ou(), nan_at(TIMES), torch.zeros(1)), ("times",)))
    add(
        Case(
            "SDEPath(times scalar)", lambda: sde.SDEPath(ou(), torch.tensor(1.0), torch.zeros(1)), ("times",)
        )
    )
    add(Case("SDEPath(initial=None)", lambda: sde.SDEPath(ou(), TIMES, None), ("initial",)))
    add(Case("SDEPath(initial wrong dim)", lambda: sde.SDEPath(ou(), TIMES, torch.zeros(3)), ("initial",)))
    add(Case("SDEPath(sde='ou')", lambda: sde.SDEPath("ou", TIMES, torch.zeros(1)), ("sde",)))
    add(Case("SDEPath(backend='rk4')", lambda: path(backend="rk4"), ("backend",)))
    add(Case("DiscretelyObservedSDE(proposal='magic')", lambda: obs_sde(proposal="magic"), ("proposal",)))
    add(Case("DiscretelyObservedSDE(num_particles=0)", lambda: obs_sde(num_particles=0), ("num_particles",)))
    add(Case("DiscretelyObservedSDE(num_substeps=0)", lambda: obs_sde(num_substeps=0), ("num_substeps",)))
    add(  # CIR has an exact transition (noncentral chi-square): the path log_prob is its sum
        Case(
            "DiscretelyObservedSDE(CIR, proposal='exact')",
            lambda: (
                sde.DiscretelyObservedSDE(sde.CIR(), TIMES, proposal="exact").log_prob(CIR_OBS),
                sum(sde.CIR().transition_log_prob(TIMES[i], CIR_OBS[i], TIMES[i + 1], CIR_OBS[i + 1])
                    for i in range(len(TIMES) - 1)),
            ),
            (),
            "value",
            check=lambda r: finite(r[0]) and abs(float(r[0]) - float(r[1])) < 1e-4,
        )
    )
    add(
        Case(
            "DiscretelyObservedSDE.diagnostics() before log_prob",
            lambda: obs_sde().diagnostics(),
            ("log_prob",),
        )
    )

    # ---- references and the integrator -------------------------------------------------------
    for cls, kw in [
        (sde.BrownianReference, {"num_steps": 0}),
        (sde.BrownianReference, {"sigma": 0.0}),
        (sde.BrownianReference, {"T": INF}),
        (sde.VPReference, {"T": -1.0}),
        (sde.VPReference, {"num_steps": 1.5}),
        (sde.OUReference, {"sigma": -1.0}),
    ]:
        add(Case(f"{cls.__name__}({kw})", lambda cls=cls, kw=kw: cls(**kw), tuple(kw)))
    ref = sde.VPReference(8)
    add(
        Case(
            "euler_maruyama(x0 1-D)",
            lambda: sde.euler_maruyama(ref, lambda k, t, x: x, torch.zeros(3)),
            ("x0",),
        )
    )
    add(
        Case(
            "euler_maruyama(x0 int)",
            lambda: sde.euler_maruyama(ref, lambda k, t, x: x, torch.zeros(3, 2, dtype=torch.long)),
            ("x0", "floating"),
        )
    )
    add(
        Case(
            "euler_maruyama(noise wrong shape)",
            lambda: sde.euler_maruyama(ref, lambda k, t, x: x, torch.zeros(3, 2), noise=torch.zeros(2, 3, 2)),
            ("noise",),
        )
    )
    add(
        Case(
            "path_log_ratio(wrong K)",
            lambda: sde.path_log_ratio(ref, torch.zeros(3, 4, 2), torch.zeros(2, 4, 2)),
            ("states", "controls"),
        )
    )

    # ---- bridges -----------------------------------------------------------------------------
    u = torch.zeros(2, 1)

    def bw(**kw):
        return bridge_log_weights(
            ou(),
            torch.zeros(2, 1),
            torch.full((2, 1), 0.25),
            u,
            u + 0.1,
            **({"num_particles": 4, "num_substeps": 3} | kw),
        )

    add(Case("bridge_log_weights(proposal='x')", lambda: bw(proposal="x"), ("proposal",)))
    add(Case("bridge_log_weights(num_particles=0)", lambda: bw(num_particles=0), ("num_particles",)))
    add(Case("bridge_log_weights(num_substeps=0)", lambda: bw(num_substeps=0), ("num_substeps",)))
    add(Case("LearnedBridge(dim=0)", lambda: LearnedBridge(0), ("dim",)))
    add(
        Case(
            "LearnedBridge.fit(horizon=-1)",
            lambda: LearnedBridge(1).fit(ou(), torch.zeros(4, 1), -1.0, num_iterations=1, progress_bar=False),
            ("horizon",),
        )
    )
    add(
        Case(
            "LearnedBridge.fit(lr=inf)",
            lambda: LearnedBridge(1).fit(
                ou(), torch.zeros(4, 1), 1.0, num_iterations=1, lr=INF, progress_bar=False
            ),
            ("lr",),
        )
    )

    # ---- lbfgs_map ---------------------------------------------------------------------------
    y = torch.zeros(3, dtype=F64)
    add(Case("lbfgs_map(model=1)", lambda: lbfgs_map(1), ("model",)))
    add(Case("lbfgs_map(max_iter=0)", lambda: lbfgs_map(map_model, y, max_iter=0), ("max_iter",)))
    add(
        Case(
            "lbfgs_map(tolerance_grad=-1)",
            lambda: lbfgs_map(map_model, y, tolerance_grad=-1.0),
            ("tolerance_grad",),
        )
    )
    add(
        Case(
            "lbfgs_map(tolerance_grad=nan)",
            lambda: lbfgs_map(map_model, y, tolerance_grad=NAN),
            ("tolerance_grad",),
        )
    )
    add(
        Case(
            "lbfgs_map(init_values unknown site)",
            lambda: lbfgs_map(map_model, y, init_values={"nu": 1.0}),
            ("init_values", "nu"),
        )
    )
    add(
        Case(
            "lbfgs_map(init_values=[1])", lambda: lbfgs_map(map_model, y, init_values=[1.0]), ("init_values",)
        )
    )
    add(
        Case(
            "lbfgs_map(NaN data)",
            lambda: lbfgs_map(map_model, nan_at(torch.zeros(5, dtype=F64))),
            ("nan", "initial"),
        )
    )
    add(
        Case(
            "lbfgs_map NaN region (validation off)",
            run_map_nan_region,
            (),
            "value",
            check=lambda r: finite(r) and float(r["mu"]) < 2.01,
        )
    )
    add(
        Case(
            "lbfgs_map NaN region (validation on)",
            run_map_nan_region_validated,
            (),
            "value",
            check=lambda r: finite(r) and float(r["mu"]) < 2.01,
        )
    )

    # ---- ratio estimators --------------------------------------------------------------------
    for rname, make in ratio_classes().items():
        add(Case(f"{rname}.fit(lr=inf)", lambda m=make: quick_fit(m(), lr=INF), ("lr",)))
        add(Case(f"{rname}.fit(lr=0)", lambda m=make: quick_fit(m(), lr=0.0), ("lr",)))
        add(
            Case(
                f"{rname}.fit(constant denominator column)",
                lambda m=make: quick_fit(m(), den=with_column(X2b, 1, 3.0)),
                ("constant", "denominator"),
            )
        )
        add(
            Case(
                f"{rname}.fit(NaN numerator)",
                lambda m=make: quick_fit(m(), num=nan_at(X2)),
                ("numerator", "nan"),
            )
        )
        add(
            Case(
                f"{rname}.fit(inf denominator)",
                lambda m=make: quick_fit(m(), den=nan_at(X2b, INF)),
                ("denominator", "inf"),
            )
        )
        add(
            Case(
                f"{rname}.fit(wrong dim)",
                lambda m=make: quick_fit(m(), num=torch.randn(50, 3)),
                ("numerator", "dimension"),
            )
        )
        add(
            Case(
                f"{rname}.fit(int data)",
                lambda m=make: quick_fit(m(), num=X2.long()),
                ("numerator", "floating"),
            )
        )
        add(Case(f"{rname}.fit(batch_size=1)", lambda m=make: quick_fit(m(), batch_size=1), ("batch_size",)))
        add(Case(f"{rname}.log_ratio before fit", lambda m=make: m().log_ratio(X2), ("fit",)))
    add(Case("classifier.log_ratio(NaN x)", lambda: fitted_classifier().log_ratio(nan_at(X2)), ("x", "nan")))
    add(
        Case(
            "classifier.log_ratio(inf x)",
            lambda: fitted_classifier().log_ratio(nan_at(X2, INF)),
            ("x", "inf"),
        )
    )
    add(
        Case(
            "classifier.log_ratio(wrong dim)",
            lambda: fitted_classifier().log_ratio(torch.zeros(4, 3)),
            ("x", "shape"),
        )
    )
    add(
        Case(
            "classifier.fit(weight_decay=-1)",
            lambda: quick_fit(ratio.ClassifierRatioEstimator(2, hidden_dim=8), weight_decay=-1.0),
            ("weight_decay",),
        )
    )
    add(
        Case(
            "classifier.fit(ema_decay=1)",
            lambda: quick_fit(ratio.ClassifierRatioEstimator(2, hidden_dim=8), ema_decay=1.0),
            ("ema_decay",),
        )
    )
    add(Case("ClassifierRatioEstimator(dim=0)", lambda: ratio.ClassifierRatioEstimator(0), ("dim",)))
    add(
        Case(
            "TelescopingRatioEstimator(num_bridges=0)",
            lambda: ratio.TelescopingRatioEstimator(2, num_bridges=0),
            ("num_bridges",),
        )
    )
    add(
        Case(
            "TangentRatioEstimator(objective='x')",
            lambda: ratio.TangentRatioEstimator(2, objective="x"),
            ("objective",),
        )
    )
    add(Case("get_path('nope')", lambda: ratio.get_path("nope"), ("path",)))
    add(
        Case(
            "mutual_information(x, y different N)",
            lambda: ratio.mutual_information(X2, X2[:100]),
            ("samples", "x and y"),
        )
    )
    add(
        Case(
            "mutual_information(holdout=1)",
            lambda: ratio.mutual_information(X2, X2b, holdout=1.0),
            ("holdout",),
        )
    )
    add(Case("mutual_information(NaN x)", lambda: ratio.mutual_information(nan_at(X2), X2b), ("x", "nan")))
    add(Case("energy_distance(inf x)", lambda: ratio.energy_distance(nan_at(X2, INF), X2b), ("x", "inf")))
    add(Case("fit_gaussian(1 sample)", lambda: ratio.fit_gaussian(X2[:1]), ("x", "samples")))
    add(Case("FlowGuidedGenerator(dim=0)", lambda: ratio.FlowGuidedGenerator(0), ("dim",)))
    add(
        Case(
            "FlowGuidedGenerator.fit(lr=inf)",
            lambda: ratio.FlowGuidedGenerator(2, hidden_dim=8, num_flow_steps=2).fit(
                X2, num_iterations=1, lr=INF, progress_bar=False
            ),
            ("lr",),
        )
    )
    add(
        Case(
            "FlowGuidedGenerator.fit(NaN data)",
            lambda: ratio.FlowGuidedGenerator(2, hidden_dim=8, num_flow_steps=2).fit(
                nan_at(X2), num_iterations=1, progress_bar=False
            ),
            ("data", "nan"),
        )
    )

    # ---- scores ------------------------------------------------------------------------------
    t, x, s = transform_cases()
    add(Case("pushforward_score(NaN x)", lambda: scores.pushforward_score(t, nan_at(x), s), ("x", "nan")))
    add(
        Case("pushforward_score(inf x)", lambda: scores.pushforward_score(t, nan_at(x, INF), s), ("x", "inf"))
    )
    add(
        Case(
            "pushforward_score(inf score)",
            lambda: scores.pushforward_score(t, x, nan_at(s, INF)),
            ("score_x", "inf"),
        )
    )
    add(
        Case(
            "pushforward_score(shape mismatch)",
            lambda: scores.pushforward_score(t, x, s[:, :1].expand(5, 3)),
            ("score_x", "shape"),
        )
    )
    add(
        Case(
            "sliced_score_matching(inf x)",
            lambda: scores.sliced_score_matching(lambda z: -z, nan_at(x, INF)),
            ("x", "inf"),
        )
    )
    add(
        Case(
            "sliced_score_matching(NaN x)",
            lambda: scores.sliced_score_matching(lambda z: -z, nan_at(x)),
            ("x", "nan"),
        )
    )
    add(
        Case(
            "sliced_score_matching(1-D x)",
            lambda: scores.sliced_score_matching(lambda z: -z, torch.zeros(5)),
            ("x",),
        )
    )
    add(
        Case(
            "sliced_score_matching(num_slices=0)",
            lambda: scores.sliced_score_matching(lambda z: -z, x, num_slices=0),
            ("num_slices",),
        )
    )
    add(
        Case(
            "sliced_score_matching(reduction='max')",
            lambda: scores.sliced_score_matching(lambda z: -z, x, reduction="max"),
            ("reduction",),
        )
    )
    add(
        Case(
            "transform_score(method='x')",
            lambda: scores.transform_score(lambda z: -z, t, method="x"),
            ("method",),
        )
    )
    add(
        Case(
            "TransformedReverseSDE.sample(inf y0)",
            lambda: scores.TransformedReverseSDE(scores.VPSDE(), lambda z, tt: -z, t).sample(
                nan_at(torch.ones(4, 2), INF), 3
            ),
            ("y0", "inf", "codomain"),
        )
    )
    add(
        Case(
            "TransformedReverseSDE.sample(num_steps=0)",
            lambda: scores.TransformedReverseSDE(scores.VPSDE(), lambda z, tt: -z, t).sample(
                torch.ones(4, 2), 0
            ),
            ("num_steps",),
        )
    )
    add(Case("VPSDE(beta_min=-1)", lambda: scores.VPSDE(beta_min=-1.0), ("beta",)))
    add(Case("LangevinSDE(T=0)", lambda: scores.LangevinSDE(lambda z: -z, T=0.0), ("T",)))

    # ---- targets and potentials --------------------------------------------------------------
    add(Case("Gaussian(loc with NaN)", lambda: targets.Gaussian(torch.tensor([NAN, 0.0])), ("loc",)))
    add(Case("Gaussian(scale=0)", lambda: targets.Gaussian(torch.zeros(2), scale=0.0), ("scale",)))
    add(
        Case(
            "GaussianMixture(weights negative)",
            lambda: targets.GaussianMixture(torch.zeros(2, 1), weights=torch.tensor([1.0, -1.0])),
            ("weights",),
        )
    )
    add(Case("Funnel(dim=1)", lambda: targets.Funnel(dim=1), ("dim",)))
    add(Case("ManyWell(dim=0)", lambda: targets.ManyWell(dim=0), ("dim",)))
    add(Case("get_target('nope')", lambda: targets.get_target("nope"), ("nope", "target")))
    add(
        Case(
            "Target.sample(0) is an empty draw",
            lambda: targets.Gaussian(torch.zeros(2)).sample(0),
            (),
            "value",
            check=lambda r: r.shape == (0, 2),
        )
    )
    add(Case("LogDensityPotential(dim=-1)", lambda: LogDensityPotential(gaussian_ld, -1), ("dim",)))
    add(
        Case(
            "LogDensityPotential(score wrong)",
            lambda: LogDensityPotential(gaussian_ld, 2, score=lambda z: z),
            ("score",),
        )
    )
    return c


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--verbose", action="store_true", help="print every case")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    counts = Counter()
    rows = []
    for case in cases():
        pyro.clear_param_store()
        with pyro.validation_enabled(True):
            outcome, detail = classify(case)
        counts[outcome] += 1
        rows.append((outcome, case.name, detail))
    for outcome, name, detail in rows:
        if args.verbose or outcome in ("obscure", "silent"):
            print(f"{outcome:8s} {name}: {detail}")
    total = sum(counts.values())
    print(f"\npyro_sde {pyro_sde.__file__}")
    print(
        f"cases {total}: clear {counts['clear']}, ok {counts['ok']}, obscure {counts['obscure']}, "
        f"silent {counts['silent']}"
    )


if __name__ == "__main__":
    main()
