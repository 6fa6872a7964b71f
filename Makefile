# The two commands the README starts with: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SK := $(VENV)/bin/sparsekit
DEMO ?= runs/demo

.PHONY: demo test test-isa test-asan lint bench install clean

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
	@$(MAKE) --no-print-directory test-asan

# The fast runtime's tests, one file per seam: kernels, thread pool, chains and plans, tuning, artifact/loader/CLI.
RUNTIME_TESTS := tests/test_runtime_kernels.py tests/test_runtime_window.py tests/test_runtime_block.py tests/test_runtime_conv.py tests/test_runtime_conv_direct.py tests/test_runtime_threads.py tests/test_runtime_chains.py \
	tests/test_runtime_tune.py tests/test_runtime_artifact.py tests/test_runtime_rnn.py

# The runtime tests again on every other code path of the C kernels this CPU has (the run above used the
# best one; see "Supported CPUs" in the README): SPARSEKIT_ISA sets the path a process starts on.
ISA_TESTS ?= $(RUNTIME_TESTS) tests/test_isa.py::test_this_process_runs_the_path_sparsekit_isa_names
ISA_LIST := from sparsekit.runtime import _kernels as k; print(k.isa(), *k.available_isas()[:-1])

test-isa: $(VENV)/.installed
	@set -e; paths="$$(env -u SPARSEKIT_ISA $(PY) -c '$(ISA_LIST)')"; set -- $$paths; \
	echo "runtime tests: $$1 (the CPU's best) ran in the main pytest run"; shift; \
	for isa in "$$@"; do \
		echo "runtime tests on the $$isa code path: SPARSEKIT_ISA=$$isa pytest $(ISA_TESTS)"; \
		SPARSEKIT_ISA=$$isa $(PY) -m pytest -q -p no:cacheprovider $(ISA_TESTS); \
	done; \
	echo "runtime tests ran on: $$paths"

# The runtime's C kernels under AddressSanitizer + UndefinedBehaviorSanitizer, over the runtime tests and the
# artifact fuzz corpus. The instrumented extension is built into $(ASAN_DIR), a copy of the package laid out as
# installed that the tests import first (they run from there), so the normal in-place build is never replaced.
# Any report aborts the run; --capture=sys lets it reach the terminal (fd 2) instead of the aborted test's capture.
ASAN_DIR ?= build/asan
RUNTIME_SRCS := $(sort $(wildcard csrc/runtime/*.c))
ASAN_CFLAGS := -O1 -g -std=c99 -fno-strict-aliasing -fvisibility=hidden -fPIC -shared -fsanitize=address,undefined \
	-fno-omit-frame-pointer -fno-sanitize-recover=undefined
ASAN_TESTS ?= $(RUNTIME_TESTS) tests/test_runtime_hostile.py tests/test_fuzz_artifact.py tests/test_chain_boundary.py \
	tests/test_fast_rnn.py
CC ?= cc
# detect_leaks=0: CPython keeps objects alive until exit by design
ASAN_ENV := ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1

# libstdc++ preloaded too: ASan's C++ exception interceptor needs it present from the start (onnx throws)
ASAN_PRELOAD = $$($(CC) -print-file-name=libasan.so) $$($(CC) -print-file-name=libstdc++.so)

test-asan: $(VENV)/.installed
	rm -rf $(ASAN_DIR) && mkdir -p $(ASAN_DIR)
	cp -r sparsekit $(ASAN_DIR)/sparsekit && cp -r cli $(ASAN_DIR)/sparsekit/cli
	cp -r exporters $(ASAN_DIR)/sparsekit/exporters
	$(CC) $(ASAN_CFLAGS) -I"$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
		$(RUNTIME_SRCS) -o "$(ASAN_DIR)/sparsekit/runtime/_kernels$$($(PY) -c \
		'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')" -lpthread
	cd $(ASAN_DIR) && LD_PRELOAD="$(ASAN_PRELOAD)" $(ASAN_ENV) $(abspath $(PY)) -c \
		'import sparsekit.runtime._kernels as k, sys; sys.exit(0 if "$(abspath $(ASAN_DIR))/" in k.__file__ else \
		"not the sanitizer build: " + k.__file__)'
	cd $(ASAN_DIR) && LD_PRELOAD="$(ASAN_PRELOAD)" $(ASAN_ENV) $(abspath $(PY)) -m pytest -q --capture=sys \
		-p no:cacheprovider --rootdir=$(CURDIR) -c $(CURDIR)/pyproject.toml $(addprefix $(CURDIR)/,$(ASAN_TESTS)) $(ASAN_PYTEST_ARGS)

lint: $(VENV)/.installed
	$(PY) -m ruff check .

bench: $(VENV)/.installed
	$(PY) bench/bench_masking.py

clean:
	rm -rf $(VENV) runs build dist *.egg-info
