# The two commands the README starts with: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SK := $(VENV)/bin/sparsekit
DEMO ?= runs/demo

.PHONY: demo test lint bench install clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(SK) train --method rigl --out $(DEMO) --overwrite
	$(SK) export $(DEMO) --format all
	$(SK) report $(DEMO)

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(PY) -m ruff check .

bench: $(VENV)/.installed
	$(PY) bench/bench_masking.py

clean:
	rm -rf $(VENV) runs build dist *.egg-info
