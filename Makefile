# layerwise developer commands. Each target creates what it needs (a local virtual environment) first.
#   make demo   set up, then run every experiment at quick scale and write results/report.html
#   make test   set up, then lint and run the whole test suite (what CI runs)
#
# torch is installed first and pinned (constraints.txt) so that no dependency can pull a CUDA build.
# The vision extras (timm, open_clip) need torchvision, whose PyPI build does not import beside the CPU
# torch 2.13.0 wheel and then breaks transformers' imports; they get their own environment (.venv-vision),
# used only by the tests that exercise timm/open_clip (see tests/vision/conftest.py).

PYTHON ?= python3
VENV ?= .venv
VENV_VISION ?= .venv-vision
PY := $(VENV)/bin/python
PYV := $(VENV_VISION)/bin/python
OUT ?= results
PIP_FLAGS ?= -q --disable-pip-version-check

.PHONY: install demo test test-main test-vision lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) torch==2.13.0
	$(PY) -m pip install $(PIP_FLAGS) -c constraints.txt -e ".[dev,hf,diffusion,dpo,data,dask,slurm]"
	touch $@

$(VENV_VISION)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV_VISION)
	$(PYV) -m pip install $(PIP_FLAGS) torch==2.13.0 torchvision==0.28.0
	$(PYV) -m pip install $(PIP_FLAGS) -c constraints.txt -e ".[dev,vision]"
	touch $@

demo: install
	$(VENV)/bin/layerwise reproduce all --scale quick --out $(OUT)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

test-main: install
	$(PY) -m pytest -q tests --ignore=tests/vision

test-vision: $(VENV_VISION)/.installed
	$(PYV) -m pytest -q tests/vision

test: lint test-vision test-main

bench: install
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(VENV_VISION) $(OUT) .pytest_cache .ruff_cache
