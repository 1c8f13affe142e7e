"""benchmarks/smc.py's equal-cost comparison: a tiny run of its rows, and its statistics on known rows."""

import json

import pytest
from _benchmark_script import load_benchmark


@pytest.fixture(scope="module")
def smc_benchmark():
    return load_benchmark("smc")


def _rows(method, errors, stderr, evaluations, **extra):
    return [dict(part="efficiency", target="gmm9", method=method, particles=64, seed=i, signed_error=e,
                 stderr=stderr, evaluations=evaluations, warnings=[], **extra) for i, e in enumerate(errors)]


def test_efficiency_rows_count_every_evaluation(tmp_path, smc_benchmark):
    out = tmp_path / "eff.json"
    smc_benchmark.main(["--part", "efficiency", "--targets", "gmm9", "--efficiency-seeds", "2",
                        "--efficiency-particles", "64", "--efficiency-iterations", "0", "2",
                        "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["method"], r.get("iterations", 0), r["seed"]) for r in rows] == [
        ("smc", 0, 0), ("smc", 0, 1), ("scld", 0, 0), ("scld", 0, 1), ("scld", 2, 0), ("scld", 2, 1)]
    for r in rows:
        assert r["stderr"] > 0 and abs(r["signed_error"]) < 2
        assert r["evaluations"] > 64 * 30  # the preconditioner's fit, the pilots and the particles
    # training is counted: two iterations of a 256-path batch cost more than the whole untrained run
    assert rows[4]["evaluations"] > rows[2]["evaluations"] + 2 * 256 * 32


def test_efficiency_section_ratio_and_calibration(smc_benchmark):
    # SCLD's errors are half of SMC's at the same cost: MSE x evals ratio exactly 0.25, a clear win; SMC's
    # error bars are half the size of its errors: mean (err / se)^2 = 4
    errors = [0.2, -0.2, 0.1, -0.1] * 8
    rows = _rows("smc", errors, 0.075, 1000) + _rows("scld", [e / 2 for e in errors], 0.075, 1000)
    text = smc_benchmark.efficiency_section(rows)
    smc_line, scld_line = (line for line in text.splitlines() if line.startswith("| gmm9"))
    assert "| 0.25 (" in scld_line
    mse = sum(e * e for e in errors) / len(errors)
    assert f"| {mse * 1000:.3g} (" in smc_line
    assert f"| {mse / 0.075**2:.3g} |" in smc_line
    assert "in 1 of 1 comparisons (gmm9)" in text
    # equal errors: the interval straddles 1, neither a win nor a loss
    same = _rows("smc", errors, 0.1, 1000) + _rows("scld", errors[::-1], 0.1, 1000)
    text = smc_benchmark.efficiency_section(same)
    assert "in 0 of 1 comparisons (none), more (above 1) in 0 (none)" in text
    # a trained SCLD is its own row, against the same SMC rows: here at 4x the cost, the same errors
    trained = same + _rows("scld", errors, 0.1, 4000, iterations=40)
    text = smc_benchmark.efficiency_section(trained)
    assert "| gmm9 | scld | 40 | 64 |" in text and "| 4.00 (" in text
    assert "in 0 of 2 comparisons (none), more (above 1) in 1 (gmm9 at 40 iterations)" in text


def _synthetic(method, budget, error, evaluations, particles=None, seeds=2):
    return [dict(part="synthetic", target="gmm9", method=method, budget=budget, seed=s, error=error,
                 stderr=0.01, evaluations=evaluations, wall_s=1.0, **({} if particles is None else
                                                                     dict(particles=particles)))
            for s in range(seeds)]


def test_dis_goal_takes_the_largest_draw_within_the_evaluations(smc_benchmark):
    dis = _synthetic("dis-lv", 400, 0.005, 6e6)
    scld = (_synthetic("scld", 40, 0.002, 5e5, 4096)  # a lucky small draw: not the one compared
            + _synthetic("scld", 40, 0.004, 3e6, 65536)
            + _synthetic("scld", 40, 0.001, 1.2e7, 262144)  # more evaluations than DIS-LV: not eligible
            + _synthetic("scld", 200, 0.0001, 4e6, 65536))  # more than 10 % of its iterations: neither
    curve = smc_benchmark._curve

    def goal(rows):
        return smc_benchmark._dis_goal("gmm9", curve(dis, "gmm9", "dis-lv"), curve(rows, "gmm9", "scld"))

    text, met, _ = goal(scld)
    assert met and "0.004 at 40 iterations x 65536 particles" in text and "with 4096 particles: 0.002" in text
    assert "noise level" in text  # 0.001 apart, se 0.01 each
    text, met, _ = goal([r | dict(error=0.006) if r.get("particles") == 65536 else r for r in scld])
    assert not met and "missed" in text
    text, met, _ = goal([r | dict(error=0.3) if r.get("particles") == 65536 else r for r in scld])
    assert not met and "noise level" not in text
    biased_dis = [r | dict(error=0.5, stderr=0.05) for r in dis]
    text, met, biased = smc_benchmark._dis_goal(
        "gmm9", curve(biased_dis, "gmm9", "dis-lv"),
        curve([r | dict(error=0.45, stderr=0.05) for r in scld], "gmm9", "scld"))
    assert met and biased and "both biased" in text


def test_tails_benchmark_rows_and_table(tmp_path):
    """benchmarks/smc_tails.py: one seed of one model under two rules, and its exact evidence (1 / 21)."""
    import math

    tails = load_benchmark("smc_tails")
    assert tails.beta_binomial()[2] == pytest.approx(-math.log(21), abs=1e-12)
    out = tmp_path / "tails.json"
    tails.main(["--models", "beta_binomial", "--seeds", "1", "--rules", "CESS", "CESS + k <= 0.7",
                "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [(r["rule"], r["seed"]) for r in rows] == [("CESS", 0), ("CESS + k <= 0.7", 0)]
    assert all(abs(r["error"]) < 0.05 and r["stderr"] > 0 and r["evaluations"] > 2048 for r in rows)
    table = tails.section(rows)
    assert table.count("| beta_binomial |") == 2
