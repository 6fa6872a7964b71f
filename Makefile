# The two commands the README starts with: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SK := $(VENV)/bin/sparsekit
DEMO ?= runs/demo

.PHONY: demo test test-isa lint bench install clean

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
	@$(MAKE) --no-print-directory test-isa

# The runtime tests again on every other code path of the C kernels this CPU has (the run above used the
# best one; see "Supported CPUs" in the README): SPARSEKIT_ISA sets the path a process starts on.
ISA_TESTS ?= tests/test_runtime.py tests/test_isa.py::test_this_process_runs_the_path_sparsekit_isa_names
ISA_LIST := from sparsekit.runtime import _kernels as k; print(k.isa(), *k.available_isas()[:-1])

test-isa: $(VENV)/.installed
	@set -e; paths="$$(env -u SPARSEKIT_ISA $(PY) -c '$(ISA_LIST)')"; set -- $$paths; \
	echo "runtime tests: $$1 (the CPU's best) ran in the main pytest run"; shift; \
	for isa in "$$@"; do \
		echo "runtime tests on the $$isa code path: SPARSEKIT_ISA=$$isa pytest $(ISA_TESTS)"; \
		SPARSEKIT_ISA=$$isa $(PY) -m pytest -q -p no:cacheprovider $(ISA_TESTS); \
	done; \
	echo "runtime tests ran on: $$paths"

lint: $(VENV)/.installed
	$(PY) -m ruff check .

bench: $(VENV)/.installed
	$(PY) bench/bench_masking.py

clean:
	rm -rf $(VENV) runs build dist *.egg-info
