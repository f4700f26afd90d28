# The project's menu. `make demo` and `make test` work on a fresh clone: each sets up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2

.PHONY: setup demo test lint bench-kernel bench-e2e clean

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

bench-kernel: $(STAMP)
	$(BIN)/python bench/bench_kernel.py

bench-e2e: $(STAMP)
	$(BIN)/python bench/bench_e2e.py

clean:
	rm -rf out .pytest_cache
