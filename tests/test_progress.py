"""Progress output: a bar on a terminal, a few plain lines in a log, nothing when disabled."""

import io

import torch

from pyro_sde._progress import progress_bar
from pyro_sde.infer import DiffusionSampler


def _run(enabled, total=333):
    out = io.StringIO()
    bar = progress_bar(total, enabled=enabled, desc="train", file=out)
    for i in range(1, total + 1):
        bar.update(i, {"loss": f"{1 / i:.3g}"})
    bar.close("converged")
    return out.getvalue()


def test_a_log_gets_a_few_plain_lines():
    text = _run(None)  # a StringIO is not a terminal
    lines = text.strip().splitlines()
    assert "\r" not in text and len(lines) == 4  # 25 %, 50 %, 75 %, the end
    assert lines[0].startswith("train: 84/333") and lines[-1].endswith("stopped: converged")


def test_a_forced_bar_and_silence():
    assert "\r" in _run(True)
    assert _run(False) == ""


def test_the_sampler_writes_plain_lines_by_default(capsys):
    sampler = DiffusionSampler(log_density=lambda x: -0.5 * (x**2).sum(-1), dim=2, num_steps=10,
                               precondition=None, dtype=torch.float64)
    sampler.run(num_iterations=8, batch_size=16, until=None)
    err = capsys.readouterr().err
    assert "\r" not in err and 1 <= len(err.strip().splitlines()) <= 4 and "dis-log_variance: 8/8" in err
