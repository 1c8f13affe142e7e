import math
import warnings

import numpy as np
import pytest
import torch
from torch.distributions import Normal

from pyro_sde.diagnostics import (
    LogEvidence,
    effective_sample_size,
    log_evidence,
    pareto_k_threshold,
    print_weighted_summary,
    psis,
    systematic_resample,
    to_inference_data,
    weighted_summary,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

# Known importance-sampling problem: proposal q = N(0, 2^2), target p~ = Z N(0.5, 1).
LOG_Z = 1.3
P_LOC, P_SCALE, Q_SCALE = 0.5, 1.0, 2.0


def is_problem(num_samples, seed, dtype=torch.float64):
    """Samples from q, shape (N,), and log weights log p~ - log q, shape (N,)."""
    g = torch.Generator().manual_seed(seed)
    x = Q_SCALE * torch.randn(num_samples, generator=g, dtype=dtype)
    lw = LOG_Z + Normal(P_LOC, P_SCALE).log_prob(x) - Normal(0.0, Q_SCALE).log_prob(x)
    return x, lw


def gaussian_ratio_log_weights(target_scale, num_samples, seed):
    """Log weights of N(0, target_scale^2) against samples of the proposal N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, generator=g, dtype=torch.float64)
    return Normal(0.0, target_scale).log_prob(x) - Normal(0.0, 1.0).log_prob(x)


class FakeSampler:
    """Duck-typed stand-in for DiffusionSampler: ``get_weighted_samples(num_samples)``."""

    def __init__(self, seed=0):
        self.seed = seed

    def get_weighted_samples(self, num_samples=None):
        x, lw = is_problem(num_samples or 2000, self.seed)
        y = torch.stack([x, 2.0 * x + 1.0], dim=-1)  # (N, 2)
        return {"x": x, "y": y}, lw


# --------------------------------------------------------------------------------------------------
# effective sample size
# --------------------------------------------------------------------------------------------------


def test_ess_equal_weights_is_one():
    assert effective_sample_size(torch.full((100,), 3.7)).item() == pytest.approx(1.0, abs=1e-6)


def test_ess_one_dominant_weight():
    n = 100
    lw = torch.zeros(n, dtype=torch.float64)
    lw[3] = 50.0
    assert effective_sample_size(lw).item() == pytest.approx(1.0 / n, rel=1e-6)
    lw = torch.full((n,), -math.inf, dtype=torch.float64)
    lw[7] = 0.0
    assert effective_sample_size(lw).item() == pytest.approx(1.0 / n, rel=1e-12)


def test_ess_scale_invariance_and_formula():
    lw = torch.randn(500, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    ess = effective_sample_size(lw)
    w = lw.exp()
    assert ess.item() == pytest.approx((w.sum() ** 2 / (500 * (w**2).sum())).item(), rel=1e-10)
    # huge shifts would overflow exp: the log-space computation must not care
    assert effective_sample_size(lw + 1000.0).item() == pytest.approx(ess.item(), rel=1e-10)
    assert effective_sample_size(lw - 1000.0).item() == pytest.approx(ess.item(), rel=1e-10)


def test_ess_matches_theory():
    # normalised ESS -> 1 / E_q[(p/q)^2] for the known problem
    grid = torch.linspace(-30, 30, 200001, dtype=torch.float64)
    p = Normal(P_LOC, P_SCALE).log_prob(grid).exp()
    q = Normal(0.0, Q_SCALE).log_prob(grid).exp()
    expected = 1.0 / torch.trapezoid(p**2 / q, grid).item()
    _, lw = is_problem(4000, seed=2)
    assert effective_sample_size(lw).item() == pytest.approx(expected, rel=0.05)


# --------------------------------------------------------------------------------------------------
# log evidence
# --------------------------------------------------------------------------------------------------


def test_log_evidence_single_run():
    _, lw = is_problem(2000, seed=3)
    ev = log_evidence(lw)
    assert isinstance(ev, LogEvidence)
    assert all(t.dim() == 0 and t.dtype == torch.float64 for t in ev)
    assert abs(ev.log_z.item() - LOG_Z) < 3 * ev.stderr.item()
    # E_q[log w] = log Z - KL(q || p), KL of two Gaussians in closed form
    kl = math.log(P_SCALE / Q_SCALE) + (Q_SCALE**2 + P_LOC**2) / (2 * P_SCALE**2) - 0.5
    assert ev.lower_bound.item() == pytest.approx(LOG_Z - kl, abs=0.1)
    assert ev.lower_bound.item() < ev.log_z.item()
    assert ev.ess.item() == pytest.approx(effective_sample_size(lw).item())


def test_log_evidence_stderr_matches_spread():
    estimates = [log_evidence(is_problem(500, seed=100 + r)[1]) for r in range(200)]
    log_z = torch.stack([e.log_z for e in estimates])
    stderr = torch.stack([e.stderr for e in estimates])
    assert log_z.std().item() == pytest.approx(stderr.mean().item(), rel=0.2)
    assert abs(log_z.mean().item() - LOG_Z) < 3 * log_z.std().item() / math.sqrt(200)


def test_log_evidence_stable_and_minus_inf():
    _, lw = is_problem(300, seed=4)
    ev = log_evidence(lw)
    shifted = log_evidence(lw + 2000.0)
    assert shifted.log_z.item() == pytest.approx(ev.log_z.item() + 2000.0)
    assert shifted.stderr.item() == pytest.approx(ev.stderr.item())
    lw = lw.clone()
    lw[:10] = -math.inf  # zero weights are allowed
    ev = log_evidence(lw)
    assert torch.isfinite(ev.log_z) and torch.isfinite(ev.stderr)
    assert ev.lower_bound.item() == -math.inf


def test_log_evidence_float32():
    _, lw = is_problem(1000, seed=5, dtype=torch.float32)
    ev = log_evidence(lw)
    assert all(t.dtype == torch.float32 for t in ev)
    assert ev.log_z.item() == pytest.approx(log_evidence(lw.double()).log_z.item(), abs=1e-4)


# --------------------------------------------------------------------------------------------------
# PSIS
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("target_scale,num_samples", [(3.0, 1000), (1.2, 1000), (2.0, 50)])
def test_psis_matches_arviz(target_scale, num_samples, dtype):
    lw = gaussian_ratio_log_weights(target_scale, num_samples, seed=6).to(dtype)
    smoothed, k = psis(lw)
    az_lw, az_k = az.psislw(lw.numpy().copy())
    assert smoothed.shape == lw.shape and smoothed.dtype == dtype and k.dim() == 0
    assert k.item() == pytest.approx(float(az_k), abs=0.05)
    atol = 1e-4 if dtype == torch.float32 else 1e-8
    normalised = (smoothed - smoothed.logsumexp(0)).numpy()
    np.testing.assert_allclose(normalised, az_lw, atol=atol)


def test_psis_smooths_only_the_tail():
    lw = gaussian_ratio_log_weights(3.0, 1000, seed=7)
    smoothed, _ = psis(lw)
    tail_len = min(math.ceil(0.2 * 1000), math.ceil(3 * math.sqrt(1000)))  # 95
    order = lw.argsort()
    body, tail = order[:-tail_len], order[-tail_len:]
    assert torch.equal(smoothed[body], lw[body])  # body untouched, original order kept
    assert not torch.allclose(smoothed[tail], lw[tail])
    assert smoothed.max() <= lw.max()  # truncated at the largest raw weight
    assert torch.equal(smoothed[tail].argsort(), lw[tail].argsort())  # tail ranks preserved


def test_psis_k_heavy_and_benign_gaussian():
    # proposal N(0, 1), target N(0, 3^2): infinite-variance weights, asymptotic k = 8/9
    heavy = [psis(gaussian_ratio_log_weights(3.0, 4000, seed=s))[1].item() for s in range(15)]
    assert np.median(heavy) > 0.7
    # proposal N(0, 2^2) wider than the target: bounded weights
    benign = [psis(is_problem(4000, seed=s)[1])[1].item() for s in range(15)]
    assert np.median(benign) < 0.5


@pytest.mark.parametrize("true_k", [0.3, 1.5])
def test_psis_k_recovers_exact_pareto_tail(true_k):
    # w = U^{-k} is exactly Pareto with shape k
    ks = []
    for s in range(15):
        u = torch.rand(4000, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        ks.append(psis(-true_k * u.log())[1].item())
    assert np.median(ks) == pytest.approx(true_k, abs=0.15)


def test_psis_too_few_samples_gives_inf():
    lw = torch.randn(20, generator=torch.Generator().manual_seed(0))  # tail of 4 < 5
    smoothed, k = psis(lw)
    assert k.item() == math.inf
    assert torch.equal(smoothed, lw)


def test_pareto_k_threshold():
    assert pareto_k_threshold(100) == pytest.approx(0.5)
    assert pareto_k_threshold(1000) == pytest.approx(2 / 3)
    assert pareto_k_threshold(10**6) == pytest.approx(0.7)


# --------------------------------------------------------------------------------------------------
# resampling
# --------------------------------------------------------------------------------------------------


def test_systematic_resample_counts():
    n, m = 50, 1000
    lw = torch.randn(n, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    lw[[3, 17]] = -math.inf
    w = (lw - lw.logsumexp(0)).exp()
    idx = systematic_resample(lw, m, generator=torch.Generator().manual_seed(9))
    assert idx.dtype == torch.long and idx.shape == (m,)
    counts = torch.bincount(idx, minlength=n).double()
    assert (counts - m * w).abs().max() < 1 + 1e-9  # floor or ceil of M w_i
    assert counts[3] == 0 and counts[17] == 0
    # unbiased: average over independent uniforms
    draws = [systematic_resample(lw, 37, torch.Generator().manual_seed(s)) for s in range(400)]
    mean_counts = torch.stack([torch.bincount(i, minlength=n) for i in draws]).double().mean(0)
    assert torch.allclose(mean_counts, 37 * w, atol=0.05)


def test_systematic_resample_default_size_and_generator():
    lw = torch.randn(64)
    idx1 = systematic_resample(lw, generator=torch.Generator().manual_seed(0))
    idx2 = systematic_resample(lw, generator=torch.Generator().manual_seed(0))
    assert idx1.shape == (64,) and torch.equal(idx1, idx2)
    assert idx1.min() >= 0 and idx1.max() < 64


# --------------------------------------------------------------------------------------------------
# summaries
# --------------------------------------------------------------------------------------------------


def test_weighted_summary_equal_weights_matches_torch():
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    s = weighted_summary({"x": x}, torch.zeros(200, dtype=torch.float64), prob=0.5)["x"]
    assert set(s) == {"mean", "std", "median", "25.0%", "75.0%"}
    assert all(v.shape == (3,) for v in s.values())
    torch.testing.assert_close(s["mean"], x.mean(0))
    torch.testing.assert_close(s["std"], x.std(0, correction=0))
    q = torch.quantile(x, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), dim=0)
    torch.testing.assert_close(torch.stack([s["25.0%"], s["median"], s["75.0%"]]), q)


def test_weighted_summary_importance_weights():
    x, lw = is_problem(20000, seed=11)
    s = weighted_summary({"x": x, "y": torch.stack([x, -x], -1)}, lw)
    sx = s["x"]
    assert set(sx) == {"mean", "std", "median", "5.0%", "95.0%"} and sx["mean"].shape == ()
    assert sx["mean"].item() == pytest.approx(P_LOC, abs=0.03)
    assert sx["std"].item() == pytest.approx(P_SCALE, abs=0.03)
    assert sx["median"].item() == pytest.approx(P_LOC, abs=0.05)
    assert sx["5.0%"].item() == pytest.approx(P_LOC - 1.6449 * P_SCALE, abs=0.08)
    assert sx["95.0%"].item() == pytest.approx(P_LOC + 1.6449 * P_SCALE, abs=0.08)
    assert s["y"]["mean"].shape == (2,)
    torch.testing.assert_close(s["y"]["mean"], torch.stack([sx["mean"], -sx["mean"]]))


def test_print_weighted_summary(capsys):
    x, lw = is_problem(500, seed=12)
    summary = weighted_summary({"x": x, "y": torch.stack([x, -x], -1)}, lw)
    print_weighted_summary(summary, log_evidence(lw))
    out = capsys.readouterr().out
    assert "mean" in out and "95.0%" in out
    assert "y[0]" in out and "y[1]" in out and "log Z" in out and "ESS" in out
    assert len([line for line in out.splitlines() if line.strip()]) == 1 + 3 + 1


# --------------------------------------------------------------------------------------------------
# ArviZ
# --------------------------------------------------------------------------------------------------

ATTRS = (
    "log_evidence",
    "log_evidence_stderr",
    "log_evidence_lower_bound",
    "ess",
    "pareto_k",
    "num_weighted_samples",
)


def _check_weighted_idata(idata, samples, lw, num_draws):
    n = lw.shape[0]
    post = idata.posterior
    assert dict(post["x"].sizes) == {"chain": 1, "draw": num_draws}
    assert post["y"].shape == (1, num_draws, 2)
    assert idata.sample_stats["log_weight"].shape == (1, num_draws)
    for key in ATTRS:
        assert key in idata.attrs and key in post.attrs
    assert isinstance(idata.attrs["num_weighted_samples"], int)
    assert idata.attrs["num_weighted_samples"] == n
    ev = log_evidence(lw)
    assert idata.attrs["log_evidence"] == pytest.approx(ev.log_z.item())
    assert idata.attrs["log_evidence_stderr"] == pytest.approx(ev.stderr.item())
    assert idata.attrs["ess"] == pytest.approx(ev.ess.item())
    assert idata.attrs["pareto_k"] == pytest.approx(psis(lw)[1].item())
    # the recorded log weights are those of the resampled draws
    x_draws = torch.as_tensor(post["x"].values[0])
    expected = LOG_Z + Normal(P_LOC, P_SCALE).log_prob(x_draws) - Normal(0, 2.0).log_prob(x_draws)
    np.testing.assert_allclose(idata.sample_stats["log_weight"].values[0], expected, atol=1e-10)
    # ArviZ's (unweighted) summary of the resample matches the importance-weighted means
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = az.summary(idata)
    weighted = weighted_summary(samples, lw)
    assert table.loc["x", "mean"] == pytest.approx(weighted["x"]["mean"].item(), abs=0.03)
    assert table.loc["y[1]", "mean"] == pytest.approx(weighted["y"]["mean"][1].item(), abs=0.06)
    assert table.loc["x", "mean"] == pytest.approx(P_LOC, abs=0.1)


def test_to_inference_data_sampler():
    sampler = FakeSampler(seed=13)
    torch.manual_seed(0)
    idata = to_inference_data(sampler, 1500, num_draws=1500)
    samples, lw = sampler.get_weighted_samples(1500)
    _check_weighted_idata(idata, samples, lw, 1500)


def test_to_inference_data_tuple_and_plot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, lw = FakeSampler(seed=14).get_weighted_samples(2000)
    torch.manual_seed(0)
    idata = to_inference_data((samples, lw), num_draws=2000)
    _check_weighted_idata(idata, samples, lw, 2000)
    # a resample of a different size
    assert idata.posterior.sizes["draw"] == 2000
    assert to_inference_data((samples, lw), num_draws=300).posterior.sizes["draw"] == 300
    az.plot_posterior(idata, var_names=["x"])
    plt.close("all")


def test_to_inference_data_unweighted_dict_with_dims():
    x = torch.randn(400, 2, generator=torch.Generator().manual_seed(15))
    idata = to_inference_data(
        {"x": x, "s": x[:, 0]}, coords={"axis": ["u", "v"]}, dims={"x": ["axis"]}
    )
    assert not hasattr(idata, "sample_stats")
    assert idata.posterior["x"].dims == ("chain", "draw", "axis")
    assert list(idata.posterior["axis"].values) == ["u", "v"]
    assert dict(idata.posterior["s"].sizes) == {"chain": 1, "draw": 400}
    np.testing.assert_allclose(idata.posterior["x"].values[0], x.numpy())


# --------------------------------------------------------------------------------------------------
# devices / bad inputs
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda():
    _, lw = is_problem(2000, seed=16)
    lw_cuda = lw.cuda()
    assert log_evidence(lw_cuda).log_z.device.type == "cuda"
    smoothed, k = psis(lw_cuda)
    assert smoothed.device.type == "cuda" and k.item() == pytest.approx(psis(lw)[1].item())
    assert systematic_resample(lw_cuda).device.type == "cuda"
    idata = to_inference_data(({"x": lw_cuda.clone()}, lw_cuda), num_draws=2000)
    assert idata.posterior.sizes["draw"] == 2000


def _with(values, index, value):
    values = values.clone()
    values[index] = value
    return values


GOOD = torch.zeros(30)


@pytest.mark.parametrize(
    "fn", [effective_sample_size, log_evidence, psis, systematic_resample], ids=lambda f: f.__name__
)
@pytest.mark.parametrize(
    "bad",
    [
        _with(GOOD, 3, math.nan),
        _with(GOOD, 3, math.inf),
        torch.full((30,), -math.inf),
        torch.zeros(5, 6),
        torch.tensor(0.0),
        torch.zeros(0),
    ],
    ids=["nan", "plus_inf", "all_minus_inf", "2d", "0d", "empty"],
)
def test_bad_log_weights(fn, bad):
    with pytest.raises(ValueError):
        fn(bad)


def test_bad_inputs_misc():
    with pytest.raises(ValueError):
        log_evidence(torch.zeros(1))  # needs two samples for a standard error
    with pytest.raises(ValueError):
        pareto_k_threshold(1)
    with pytest.raises(ValueError):
        systematic_resample(GOOD, 0)
    with pytest.raises(ValueError):
        weighted_summary({"x": torch.zeros(30)}, GOOD, prob=1.5)
    with pytest.raises(ValueError):
        weighted_summary({"x": torch.zeros(29)}, GOOD)
    with pytest.raises(ValueError):
        to_inference_data(({"x": torch.zeros(30), "y": torch.zeros(31)}, GOOD))
    with pytest.raises(ValueError):
        to_inference_data(({"x": torch.zeros(29, 2)}, GOOD))
    with pytest.raises(ValueError):
        to_inference_data(({"x": torch.zeros(30)}, _with(GOOD, 0, math.nan)))
    with pytest.raises(ValueError):
        to_inference_data({"x": torch.zeros(30), "y": torch.zeros(20)})
    with pytest.raises(ValueError):
        to_inference_data({"x": torch.zeros(30)}, num_samples=10)
    with pytest.raises(ValueError):
        to_inference_data(({}, GOOD))
    with pytest.raises(TypeError):
        to_inference_data(torch.zeros(30))
