"""The posteriordb translations (benchmarks/posteriordb_models.py): each runs, vectorises, has the record's
dimension and Stan's parameter names, and (exact) equals an independent scipy/numpy log joint."""

import math
import sys
from pathlib import Path

import numpy as np
import pyro.poutine as poutine
import pytest
import scipy.stats as st
import torch
from scipy.special import logsumexp

from pyro_sde.infer.potential import ModelPotential

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import posteriordb_models as pdb  # noqa: E402

NAMES = list(pdb.POSTERIORS)


def test_the_shared_posteriordb_subset_is_there():
    assert pdb.POSTERIORDB_DIR.is_dir(), (
        f"{pdb.POSTERIORDB_DIR} is missing: these tests need ../shared/posteriordb beside the repository "
        "(or POSTERIORDB_DIR)"
    )
    assert sorted(NAMES) == sorted(p.stem for p in (pdb.POSTERIORDB_DIR / "posteriors").glob("*.json"))


def _site_values(post, point: dict) -> dict:
    """Reference scalars ``{"beta[2]": x}`` -> site values ``{"beta": (3,)}`` of ``post.model``."""
    if post.name.startswith("eight_schools"):
        theta = torch.stack([point[f"theta[{i + 1}]"] for i in range(8)])
        return {"mu": point["mu"], "tau": point["tau"], "theta_trans": (theta - point["mu"]) / point["tau"]}
    values = {}
    for name in point:
        site = name.split("[")[0]
        values.setdefault(site, []).append(point[name])
    return {site: torch.stack(v) if f"{site}[1]" in point else v[0] for site, v in values.items()}


def _points(post):
    """The reference posterior mean and one reference draw."""
    ref = post.reference_draws()
    return [{k: v.mean() for k, v in ref.items()}, {k: v[1234] for k, v in ref.items()}]


def _log_joint(post, values):
    trace = poutine.trace(poutine.condition(post.model, values)).get_trace(*post.model_args())
    return trace.log_prob_sum()


@pytest.mark.parametrize("name", NAMES)
def test_translation_runs_vectorised_with_the_record_dimension_and_names(name):
    post = pdb.POSTERIORS[name]
    potential = ModelPotential(post.model, post.model_args())  # checks batched == per-sample log density
    assert potential.dtype == torch.float64
    assert sum(math.prod(shape) for shape in potential.site_shapes.values()) == post.dimension
    for point in _points(post):
        values = _site_values(post, point)
        assert set(values) == set(potential.site_shapes)
        assert torch.isfinite(_log_joint(post, values))
        # the site -> reference-name map inverts the reference -> site map
        mapped = post.to_reference({k: v[None] for k, v in values.items()})
        assert list(mapped) == list(point)
        torch.testing.assert_close(torch.stack([mapped[k][0] for k in point]), torch.stack([*point.values()]))


def _kidiq(d, p):
    mean = p["beta[1]"] + p["beta[2]"] * np.array(d["mom_hs"]) + p["beta[3]"] * np.array(d["mom_iq"])
    return st.norm.logpdf(d["kid_score"], mean, p["sigma"]).sum() + st.halfcauchy.logpdf(p["sigma"], 0, 2.5)


def _blr(d, p):
    beta = np.array([p[f"beta[{i + 1}]"] for i in range(d["D"])])
    return (st.norm.logpdf(beta, 0, 10).sum() + st.halfnorm.logpdf(p["sigma"], 0, 10)
            + st.norm.logpdf(d["y"], np.array(d["X"]) @ beta, p["sigma"]).sum())


def _diamonds(d, p):
    X = np.array(d["X"])[:, 1:]
    b = np.array([p[f"b[{i + 1}]"] for i in range(X.shape[1])])
    mean = p["Intercept"] + (X - X.mean(0)) @ b
    half_t = st.t.logpdf(p["sigma"], 3, 0, 10) + math.log(2)
    return (st.norm.logpdf(b).sum() + st.t.logpdf(p["Intercept"], 3, 8, 10) + half_t
            + st.norm.logpdf(d["Y"], mean, p["sigma"]).sum())


def _gp(d, p):
    x = np.array(d["x"])
    cov = p["alpha"] ** 2 * np.exp(-0.5 * (x[:, None] - x[None]) ** 2 / p["rho"] ** 2)
    cov += p["sigma"] * np.eye(len(x))  # Stan adds sigma, not sigma^2
    return (st.gamma.logpdf(p["rho"], 25, scale=1 / 4) + st.halfnorm.logpdf(p["alpha"], 0, 2)
            + st.halfnorm.logpdf(p["sigma"], 0, 1) + st.multivariate_normal.logpdf(d["y"], 0 * x, cov))


def _arma(d, p):
    y, err = d["y"], []
    for t in range(len(y)):
        nu = p["mu"] + p["phi"] * (p["mu"] if t == 0 else y[t - 1]) + (0 if t == 0 else p["theta"] * err[-1])
        err.append(y[t] - nu)
    return (st.norm.logpdf(p["mu"], 0, 10) + st.norm.logpdf([p["phi"], p["theta"]], 0, 2).sum()
            + st.halfcauchy.logpdf(p["sigma"], 0, 2.5) + st.norm.logpdf(err, 0, p["sigma"]).sum())


def _hmm(d, p):
    mu = np.array([p["mu[1]"], p["mu[2]"]])
    log_theta = np.log([[p["theta1[1]"], p["theta1[2]"]], [p["theta2[1]"], p["theta2[2]"]]])
    gamma = st.norm.logpdf(d["y"][0], mu, 1)
    for y in d["y"][1:]:
        gamma = np.array([logsumexp(gamma + log_theta[:, k]) for k in range(2)]) + st.norm.logpdf(y, mu, 1)
    # Dirichlet(1, 1) densities are 1: the simplex prior adds 0
    return st.norm.logpdf(mu, [3, 10], 1).sum() + logsumexp(gamma)


CLOSED_FORMS = {
    "kidiq-kidscore_momhsiq": _kidiq,
    "sblrc-blr": _blr,
    "diamonds-diamonds": _diamonds,
    "gp_pois_regr-gp_regr": _gp,
    "arma-arma11": _arma,
    "hmm_example-hmm_example": _hmm,
}


@pytest.mark.parametrize("name", list(CLOSED_FORMS))
def test_log_joint_equals_an_independent_scipy_implementation(name):
    """Exact: the Pyro log joint (flat priors 0, proper priors normalised) at two parameter points equals
    the Stan program written again with scipy.stats, so their difference does too."""
    post = pdb.POSTERIORS[name]
    data = post.stan_data()
    logs = []
    for point in _points(post):
        expected = CLOSED_FORMS[name](data, {k: v.item() for k, v in point.items()})
        actual = _log_joint(post, _site_values(post, point)).item()
        assert actual == pytest.approx(expected, rel=1e-10, abs=1e-8)
        logs.append((actual, expected))
    assert logs[0][0] - logs[1][0] == pytest.approx(logs[0][1] - logs[1][1], abs=1e-7)


def test_flat_prior_has_zero_log_density_on_its_support_and_expands():
    like = torch.zeros((), dtype=torch.float64)
    for support, shape in [(pdb.constraints.real, (3,)), (pdb.constraints.positive, ()),
                           (pdb.constraints.positive_ordered_vector, (2,))]:
        prior = pdb.FlatPrior(like, shape, support).expand((4,))
        x = prior.sample((5,))
        assert x.shape == (5, 4, *shape) and x.dtype == torch.float64
        assert prior.support.check(x).all()
        assert (prior.log_prob(x) == 0).all() and prior.log_prob(x).shape == (5, 4)


def test_benchmark_accuracy_of_the_reference_draws_is_zero():
    """The benchmark's metric on the reference draws themselves: mean error 0 and sd error
    ``|sqrt((n-1)/n) - 1|`` (population vs sample sd)."""
    import posteriordb as bench

    post = pdb.POSTERIORS["eight_schools-eight_schools_noncentered"]
    ref = post.reference_draws()
    theta = torch.stack([ref[f"theta[{i + 1}]"] for i in range(8)], -1)
    theta_trans = (theta - ref["mu"][:, None]) / ref["tau"][:, None]
    samples = {"mu": ref["mu"], "tau": ref["tau"], "theta_trans": theta_trans}
    out = bench.accuracy(post, samples)
    n = len(ref["mu"])
    assert out["mean_err"] < 1e-10
    assert out["sd_err"] == pytest.approx(1 - math.sqrt((n - 1) / n), rel=1e-6)
    # weights that drop half the draws move the means
    log_w = torch.zeros(n, dtype=torch.float64)
    log_w[ref["mu"] < ref["mu"].median()] = -math.inf
    assert bench.accuracy(post, samples, log_w)["mean_err"] > 0.5


def test_benchmark_harness_writes_its_section(tmp_path):
    """A seconds-long run of benchmarks/posteriordb.py (2 iterations), so that the harness cannot rot."""
    import posteriordb as bench

    doc = tmp_path / "benchmarks.md"
    out = bench.main([
        "--posteriors", "eight_schools-eight_schools_noncentered",
        "--no-nuts", "--nuts-cache", str(tmp_path / "none.json"),
        "--sampler-kwargs", '{"num_steps": 10}', "--run-kwargs", '{"num_iterations": 2, "batch_size": 16}',
        "--threads", "1", "--write", "--doc", str(doc),
    ])
    (run,) = out["ours"]["eight_schools-eight_schools_noncentered"]
    assert "error" not in run, run.get("error")
    assert 0 < run["ess"] <= 1 and run["mean_err"] >= 0 and run["wall_s"] > 0
    text = doc.read_text()
    assert "<!-- posteriordb:start -->" in text
    assert "| eight_schools-eight_schools_noncentered | 10 | ours (seed 0) |" in text


def test_benchmark_harness_runs_the_particle_samplers(tmp_path):
    """``--sampler smc`` / ``scld`` run SMCSampler / SCLDSampler (small, seconds) and write their own
    sections, leaving DiffusionSampler's alone; the moments are scored against the reference draws."""
    import posteriordb as bench

    doc = tmp_path / "benchmarks.md"
    name = "eight_schools-eight_schools_noncentered"
    common = ["--posteriors", name, "--no-nuts", "--nuts-cache", str(tmp_path / "none.json"),
              "--threads", "1", "--write", "--doc", str(doc)]
    smc = bench.main(["--sampler", "smc", "--sampler-kwargs", '{"num_particles": 256}', *common])
    scld = bench.main(["--sampler", "scld", "--sampler-kwargs", '{"num_particles": 256, "num_steps": 8}',
                       "--run-kwargs", '{"num_iterations": 2, "batch_size": 16}', *common])
    (smc_run,), (scld_run,) = smc["ours"][name], scld["ours"][name]
    for run in (smc_run, scld_run):
        assert "error" not in run, run.get("error")
        assert run["num_samples"] == 256 and 0 < run["ess"] <= 1
        assert math.isfinite(run["log_z"]) and run["mean_err"] >= 0
    assert smc_run["iterations"] is None and scld_run["iterations"] == 2
    text = doc.read_text()
    assert "### posteriordb: SMCSampler with defaults vs Pyro NUTS" in text
    assert "### posteriordb: SCLDSampler with" in text
    assert "<!-- posteriordb:start -->" not in text
    assert f"| {name} | 10 | ours (seed 0) |" in text
