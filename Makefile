# Both targets set up everything they need on a fresh machine (Python 3.10+, network to PyPI).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: demo test setup bench lint clean gpu-check

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: the CPU build on this machine; otherwise pip pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/expertray demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/expertray bench core --json

# The one-shot device check: Ray-free tests on EXPERTRAY_DEVICE (default cuda) + `bench gpu`, one
# JSON in $$OUT (default build/gpu-check). Needs no .venv and no Ray: on a bare GPU machine it installs the
# checkout with pip --no-deps into the python it finds. CPU run here: EXPERTRAY_DEVICE=cpu make gpu-check.
gpu-check:
	scripts/gpu_check.sh

lint: $(STAMP)
	$(BIN)/ruff check expertray actors policies tests examples

clean:
	rm -rf $(VENV) build *.egg-info
