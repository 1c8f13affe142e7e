"""What the documentation shows runs: every ```python block of README.md and the guides, and every example
with ``--smoke``, its printed ``check ...`` lines all OK.

A block that cannot run on its own (a fragment that continues the text, or one that trains for minutes) has
the line ``<!-- not run: <why> -->`` right before its fence; the reason is required. Blocks run in a fresh
interpreter in a temporary folder (nothing is written to the repository), this checkout first on the path;
examples run in this process (their ``main(argv)``), in a temporary folder too.
"""

import importlib
import inspect
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# docs/benchmarks.md has tables only
DOCUMENTS = ["README.md", "docs/samplers.md", "docs/ratio.md", "docs/scores.md", "docs/fdrl.md",
             "docs/bridges.md"]
SLOW_BLOCKS = {("README.md", 1), ("docs/samplers.md", 4)}  # train or run SMC twice (10-25 s)
EXAMPLES = {  # script -> whether it is slow (each takes 10-25 s with --smoke on 2 busy cores)
    "quickstart.py": True,
    "sde_parameter_inference.py": True,
    "simplex_diffusion.py": True,
    "fdrl_digits.py": True,
    "stochastic_lotka_volterra.py": True,
    "distributed_sampler.py": True,
}
# the modules whose __all__ is the public API, each with an automodule directive in docs/api/
API_MODULES = [
    "pyro_sde.infer", "pyro_sde.infer.annealing", "pyro_sde.infer.kernels", "pyro_sde.infer.bridge",
    "pyro_sde.infer.diffusion", "pyro_sde.diagnostics", "pyro_sde.sde", "pyro_sde.ratio", "pyro_sde.scores",
    "pyro_sde.nn", "pyro_sde.targets",
]
_FENCE = re.compile(r"^```python\s*$")
_MARKER = re.compile(r"^<!--\s*not run:\s*(?P<why>.*?)\s*-->\s*$")


def python_blocks(path: Path):
    """``(index, first line number, code, reason it is not run or None)`` of each ```python block."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if _FENCE.match(lines[i]):
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].startswith("```"))
            marker = _MARKER.match(lines[i - 1]) if i > 0 else None
            why = marker.group("why") if marker else None
            blocks.append((len(blocks) + 1, start + 1, "\n".join(lines[start:end]) + "\n", why))
            i = end
        i += 1
    return blocks


def _environment():
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _cases():
    for doc in DOCUMENTS:
        for index, line, code, why in python_blocks(ROOT / doc):
            if why is None:
                marks = [pytest.mark.slow] if (doc, index) in SLOW_BLOCKS else []
                yield pytest.param(doc, line, code, id=f"{doc}:{line}", marks=marks)


def test_every_block_runs_or_says_why_not():
    counts = {}
    for doc in DOCUMENTS:
        blocks = python_blocks(ROOT / doc)
        assert blocks, f"{doc} has no python block: is the fence written ```python?"
        for _, line, _, why in blocks:
            assert why is None or len(why) >= 10, f"{doc}:{line}: the not-run marker must say why"
        counts[doc] = sum(why is None for *_, why in blocks)
    assert counts["README.md"] >= 1  # the README's usage snippet runs verbatim


def test_marker_parser():
    text = "x\n<!-- not run: needs `model` from above -->\n```python\na = 1\n```\n```python\nb = 2\n```\n"
    path = Path(os.environ.get("TMPDIR", "/tmp")) / "pyro_sde_test_docs_parser.md"
    path.write_text(text)
    try:
        assert python_blocks(path) == [
            (1, 4, "a = 1\n", "needs `model` from above"),
            (2, 7, "b = 2\n", None),
        ]
    finally:
        path.unlink()


def test_api_reference_covers_every_public_name():
    pages = "".join(p.read_text() for p in (ROOT / "docs" / "api").glob("*.rst"))
    documented = set()
    for name in API_MODULES:
        assert f".. automodule:: {name}\n" in pages, f"docs/api has no automodule page for {name}"
        module = importlib.import_module(name)
        for member in module.__all__:
            obj = getattr(module, member)
            if inspect.ismodule(obj):
                assert obj.__name__ in API_MODULES, f"{name}.{member}: module without an API page"
                continue
            documented.add(member)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                assert (obj.__doc__ or "").strip(), f"{name}.{member} has no docstring"
    top = importlib.import_module("pyro_sde")
    missing = [n for n in top.__all__ if not inspect.ismodule(getattr(top, n)) and n not in documented]
    assert not missing, f"top-level names documented nowhere: {missing}"


@pytest.mark.parametrize("doc, line, code", list(_cases()))
def test_block_runs(doc, line, code, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=_environment(), capture_output=True, text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{doc}:{line} failed:\n{result.stderr[-3000:]}"


@pytest.mark.parametrize(
    "script", [pytest.param(s, marks=[pytest.mark.slow] if slow else []) for s, slow in EXAMPLES.items()]
)
def test_example_smoke(script, tmp_path, monkeypatch, capsys):
    if script == "fdrl_digits.py":
        pytest.importorskip("sklearn", reason="the digits example needs scikit-learn (the bench extra)")
    argv = ["--smoke"] + (["--out", str(tmp_path / "digits.png")] if script == "fdrl_digits.py" else [])
    monkeypatch.chdir(tmp_path)
    main = runpy.run_path(str(ROOT / "examples" / script), run_name="example")["main"]
    threads = torch.get_num_threads()
    try:
        main(argv)  # a failed check exits: SystemExit fails the test
    finally:
        torch.set_num_threads(threads)  # an example may pin it
    checks = [line for line in capsys.readouterr().out.splitlines() if line.startswith("check ")]
    assert checks and all(line.endswith(": OK") for line in checks), "\n".join(checks)
