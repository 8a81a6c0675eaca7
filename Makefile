# `make demo` and `make test` set up their own environment in .venv (Python >= 3.10 on PATH as python3).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# torch first, pinned: on this project's machines it is a CPU build on disk; elsewhere PyPI's wheel
TORCH_SPEC ?= torch==2.13.0
DEMO_OUT ?= runs/demo
DEMO_SECONDS ?= 240

.PHONY: setup demo test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

CORPUS := src/mambabyte/corpus
MB := $(VENV)/bin/mambabyte

# The main job: train `small` on the shipped corpus for DEMO_SECONDS on this machine, score the held-out
# documents beside gzip/bz2/xz/zstd, and print a sample.
demo: setup
	rm -rf $(DEMO_OUT)
	$(MB) info --preset small
	$(MB) train --data $(CORPUS)/train --valid-data $(CORPUS)/valid --preset small --out $(DEMO_OUT) \
		--max-time $(DEMO_SECONDS) --eval-bytes 0
	$(MB) eval $(DEMO_OUT)/checkpoint --data $(CORPUS)/valid --extrapolation --plot $(DEMO_OUT)/by_position.png
	$(MB) generate $(DEMO_OUT)/checkpoint --prompt "And it came to pass" --max-bytes 400 --temperature 0.7 --seed 1

test: setup
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
