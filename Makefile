# Two entry points: `make demo` and `make test`. Each creates .venv when missing and installs
# everything, pinned torch first (a plain `torch` requirement would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.qadapt-installed
PLUGIN_DIST := tests/plugins/qadapt_tinyplugin

.PHONY: demo test bench docs lint install clean

$(STAMP): pyproject.toml $(PLUGIN_DIST)/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,demo]"
	$(BIN)/python -m pip install --quiet ./$(PLUGIN_DIST)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/qadapt demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) build dist *.egg-info site
