# Quick start: `make demo` (finetune + evaluate the embedded default) and `make test`. Both create .venv first.
PYTHON ?= python3
VENV ?= .venv
# The torch wheel for this machine goes in FIRST, so the range in pyproject.toml never pulls a second build.
# CPU default; on a GPU machine e.g. TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126".
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
# DeepSpeed compiles its CPU/GPU ops on first use; one shared cache means they are built once, not per test.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: demo test lint install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) launch/train.py

# Lint, format and type checks of the library first (seconds), then the suite.
lint: $(VENV)/.installed
	$(PY) -m ruff check ft_dist
	$(PY) -m ruff format --check ft_dist
	$(PY) -m mypy

# --durations: every CI log names its slowest tests, so the suite's time budget (well under 60 min) can be kept.
test: lint
	$(PY) -m pytest -q --durations=25

clean:
	rm -rf $(VENV) .cache runs multirun .mypy_cache .ruff_cache
