# Entry points for a fresh machine: `make demo`, `make test` and `make docs`.
PYTHON ?= python3
# e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU-only wheel (PyPI's Linux torch brings CUDA)
TORCH_INDEX ?=
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test docs lint bench clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned first, from TORCH_INDEX when given (the CPU-only index avoids the CUDA libraries)
	$(PY) -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e '.[test,bench,docs]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/quickstart.py

test: $(STAMP)
	$(PY) -m pytest -q tests

# The Sphinx site (API reference, guides, benchmark tables) into docs/_build/html; warnings are errors.
docs: $(STAMP)
	$(PY) -m sphinx -W --keep-going -b html -q docs docs/_build/html

lint: $(STAMP)
	$(VENV)/bin/ruff check pyro_sde tests examples benchmarks

bench: $(STAMP)
	$(PY) benchmarks/diffusion_step.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache docs/_build
