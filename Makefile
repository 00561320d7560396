# layerwise developer commands. Each target creates what it needs (a local virtual environment) first.
#   make demo   set up, then run every experiment at quick scale and write results/report.html
#   make report-check   render results/report.html with headless Chromium to results/report.png (look at it)
#   make test   set up, then lint, run the whole test suite, the doctests and the docs' code blocks, build the
#               docs (what CI runs)
#   make docs   build the documentation site into site/ (mkdocs build --strict: broken links fail)
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

.PHONY: install demo test test-main test-vision test-doctest test-docs docs lint bench clean report-check

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) torch==2.13.0
	$(PY) -m pip install $(PIP_FLAGS) -c constraints.txt -e ".[dev,docs,hf,diffusion,dpo,data,dask,slurm,lora]"
	touch $@

$(VENV_VISION)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV_VISION)
	$(PYV) -m pip install $(PIP_FLAGS) torch==2.13.0 torchvision==0.28.0
	$(PYV) -m pip install $(PIP_FLAGS) -c constraints.txt -e ".[dev,vision]"
	touch $@

demo: install
	$(VENV)/bin/layerwise reproduce all --scale quick --out $(OUT)

# Needs Chromium (Debian: apt-get install chromium); not needed by `make test`. Rebuilds the page from
# $(OUT) first, then screenshots it as a reader would see it (1400 px wide, the first 3000 px).
CHROMIUM ?= chromium
report-check:  # after `make demo` (or any `layerwise reproduce --out $(OUT)`)
	$(VENV)/bin/layerwise report $(OUT)
	@command -v $(CHROMIUM) >/dev/null || { echo "report-check needs $(CHROMIUM) (apt-get install chromium)"; exit 1; }
	profile=$$(mktemp -d) && $(CHROMIUM) --headless --no-sandbox --disable-gpu --disable-background-networking \
		--disable-component-update --disable-sync --no-first-run --user-data-dir=$$profile \
		--window-size=1400,3000 --screenshot=$(abspath $(OUT))/report.png "file://$(abspath $(OUT))/report.html"; \
		status=$$?; rm -rf $$profile; exit $$status
	@echo "look at $(OUT)/report.png"

lint: install
	$(VENV)/bin/ruff check src tests benchmarks examples docs/_hooks conftest.py

test-main: install
	$(PY) -m pytest -q tests --ignore=tests/vision --ignore=tests/doc_blocks

# Every fenced Python block (pytest-markdown-docs) and shell block (tests/doc_blocks) of README.md and
# docs/, each in a scratch folder (root conftest.py); a fence marked `notest` is skipped.
test-docs: install
	$(PY) -m pytest -q -p no:cacheprovider --markdown-docs README.md docs tests/doc_blocks --ignore=docs/_hooks

test-vision: $(VENV_VISION)/.installed
	$(PYV) -m pytest -q tests/vision

# The `>>>` examples of every module (outputs are machine-independent; hub-dependent ones are +SKIP).
test-doctest: install
	$(PY) -m pytest -q -p no:cacheprovider --doctest-modules src/layerwise

# The documentation site (MkDocs + Material + mkdocstrings): strict, so broken links, unresolved
# references and docstring warnings fail. About 5 s.
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict  # not --quiet: it hides the warnings strict counts

test: lint docs test-doctest test-docs test-vision test-main

bench: install
	for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) $(VENV_VISION) $(OUT) site .pytest_cache .ruff_cache
