# The project's menu. `make demo` and `make test` work on a fresh clone: each sets up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2

.PHONY: setup demo test lint bench-kernel bench-e2e bench-compile test-gpu clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned to the CPU build on disk here; on other machines any torch>=2.6 already present is kept.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==2.13.0" || $(BIN)/python -m pip install -q "torch>=2.6"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	mkdir -p out
	$(BIN)/calibatt calibrate
	$(BIN)/calibatt compile
	$(BIN)/calibatt generate "a red circle moving left on a black background" -o out/demo.mp4
	@echo "demo video: out/demo.mp4"

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check calibatt_cli kernels tests bench

# Benchmarks run on the GPU machine, whose image has torch/triton but no network for a venv: use the
# venv's python when there is one, else python3 with kernels/ importable as calibatt_kernels via a shim.
# (bench-e2e also needs diffusers there: ../shared/tools/device-wheels.sh.)
BENCH_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
BENCH_ENV = PYTHONPATH=$(CURDIR)/.shim:$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}

.shim/calibatt_kernels:
	mkdir -p .shim && ln -sfn ../kernels .shim/calibatt_kernels

bench-kernel: .shim/calibatt_kernels
	$(BENCH_ENV) $(BENCH_PY) bench/bench_kernel.py

bench-e2e: .shim/calibatt_kernels
	$(BENCH_ENV) $(BENCH_PY) bench/bench_e2e.py

# The ahead-of-time cache at Wan 1.3B 480p: the library path, then the user's CLI path (needs diffusers).
bench-compile: .shim/calibatt_kernels
	$(BENCH_ENV) $(BENCH_PY) bench/bench_compile.py all --cache-dir /tmp/calibatt-bench/cache
	$(BENCH_ENV) $(BENCH_PY) bench/bench_cli_wan.py --workdir /tmp/calibatt-bench/cli

# The GPU-only tests (skipped by `make test` without CUDA).
test-gpu: .shim/calibatt_kernels
	$(BENCH_ENV) $(BENCH_PY) -m pytest -q tests/test_kernels_gpu.py tests/test_compile_gpu.py

clean:
	rm -rf out .pytest_cache
