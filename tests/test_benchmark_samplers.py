"""The CI-sized run of benchmarks/samplers.py, so that the benchmark cannot rot."""

import pytest
from _benchmark_script import load_benchmark


@pytest.fixture(scope="module")
def samplers_benchmark():
    return load_benchmark("samplers")


def test_quick_benchmark_writes_its_table_and_plots(tmp_path, samplers_benchmark):
    doc = tmp_path / "benchmarks.md"
    results = samplers_benchmark.main(["--quick", "--doc", str(doc), "--plots", str(tmp_path / "img")])
    text = doc.read_text()
    assert "<!-- samplers_gmm9:start -->" in text and "| NUTS |" in text and "| dis-lv |" in text
    assert {p.name for p in (tmp_path / "img").iterdir()} == {
        "samplers_gmm9_samples.png", "samplers_gmm9_loss.png", "samplers_gmm9_modes.png"
    }
    rows = dict(results["gmm9"])
    for run in rows["dis-lv"] + rows["dis-kl"]:
        assert 0 < run["ess"] <= 1 and run["dlogz_is"] >= 0 and run["w2"] > 0
        assert abs(sum(run["masses"]) - 1) < 1e-9
    assert rows["NUTS"][0]["iterations"] >= 10


def test_w2_distance_matches_a_closed_form(samplers_benchmark):
    import torch

    # two point clouds that differ by a translation: W2 = |shift|
    x = torch.randn(300, 3, dtype=torch.float64)
    shift = torch.tensor([0.3, -0.4, 1.2], dtype=torch.float64)
    assert samplers_benchmark.w2_distance(x, x + shift) == pytest.approx(shift.norm().item(), rel=1e-6)
