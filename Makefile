# `make demo` and `make test` set up their own environment in .venv (Python >= 3.10 on PATH as python3).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# torch first, pinned: on this project's machines it is a CPU build on disk; elsewhere PyPI's wheel
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= runs/demo
DEMO_SECONDS ?= 240

.PHONY: setup demo test bench-cpu clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(VENV)/bin/mambabyte info --preset small

test: setup
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
