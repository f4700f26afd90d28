#!/usr/bin/env bash
# One GPU session's measurements, in order of importance, each under its own time limit, so that one call of the
# device machine (its image: torch, triton, Python 3.12, no diffusers) gives every number at once:
#   bash bench/gpu_session.sh OUTDIR [SECONDS] [A|B]
# Part A: the GPU tests that compile little (kernels, no host sync in a step, fp8 kernels); the user's path at
#   Wan 2.1 1.3B 480p x 81, density 0.2 (bench_cli_wan.py: random weights, synthetic masks; step times, compile
#   time, time to the first step, peak GPU memory against the stock pipeline); the guard's cost with compiled
#   blocks (bench_guard.py --compile); the fp8 kernel's config sweep (bench_fp8.py --sweep).
# Part B: the library path (bench_e2e.py), only the rows the user path is compared with: stock eager, stock
#   compiled, calibatt compiled at density 0.2 (its results file is written after every row); the compiled-block
#   tests (the tiny model) and the fp8 path's tests.
# Each step's limit is capped by what is left of SECONDS (570 by default); a step that cannot get 20 s is skipped
# (said in the log). Logs go to OUTDIR/log.txt, the user-path CLI logs to OUTDIR/cli-wan/, the results files
# written under bench/results/ to OUTDIR/results.tar.gz.
# Carry the wheels first (../shared/tools/device-wheels.sh puts them in .whl/).
set -u
OUT=${1:?usage: gpu_session.sh OUTDIR [SECONDS] [PART]}
BUDGET=${2:-570}
PART=${3:-A}  # A: GPU tests, the user's path, the guard's cost, the fp8 sweep; B: the library path, the
# compiled-block and fp8-path tests (one call each: together they need more than a call's 600 s); C: the fp8 path's
# tests, then the user's path and the library path on the same masks in one call, and one step of the user's
# path profiled; D: the compiled-block and sync-free tests; F: Wan 14B's bf16 and fp8 rows (bench_e2e.py
# --precision bf16 fp8) and the fp8 path's tests; R: the sync-free tests, generate's start by part
# (bench_ready.py; a carried .base/ tree side by side; RUNS=n alternating runs, 2 by default; PROFILE=0 skips the
# profiled runs; TEXT=full: the real UMT5-XXL encoder's shape in the pipeline; LT="1 8": calibatt's run with
# model.load_threads 1 and 8; LOADS: bench_load.py's variants after it; RTESTS: pytest -k for its GPU tests); P:
# one process's imports before and after the bytecode is compiled
START=$(date +%s)
LOG=$OUT/log.txt
mkdir -p "$OUT"
touch -d '-1 minute' /tmp/gpu_session.start
if [ -d .whl ]; then
	python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >>"$LOG" 2>&1
	export PYTHONPATH=/tmp/site:$PWD:$PWD/kernels
else
	export PYTHONPATH=$PWD:$PWD/kernels
fi
# The image's site-packages are read-only and ship no bytecode, so every process compiles each module it imports
# from source (seconds per process). Its processes were seen not to keep bytecode even in this writable folder (a
# generate, the last of eight processes of one call, compiled 861 modules): compileall writes it below, once.
export PYTHONPYCACHEPREFIX=/tmp/pycache
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv >>"$LOG" 2>&1
python3 -c "import sys; print('dont_write_bytecode', sys.flags.dont_write_bytecode, 'pycache_prefix', sys.pycache_prefix)" >>"$LOG" 2>&1
imports() { # one process importing what `calibatt generate` imports before its call; one importing the compile path
	local TIMEFORMAT="import calibatt_cli.generate: %R s"
	{ time python3 -c "import calibatt_cli.generate" >/dev/null 2>&1; } 2>>"$LOG"
	TIMEFORMAT="and the compile path, diffusers' Wan: %R s"
	{ time python3 -c "import calibatt_cli.generate, torch._inductor.compile_fx; from diffusers import WanPipeline" \
		>/dev/null 2>&1; } 2>>"$LOG"
}
SITE=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if [ "$PART" = P ]; then # the imports as the image has them, twice (is anything kept?)
	imports
	imports
fi
# Bytecode for every installed module, as pip writes at install (the log's first lines say whether the
# interpreter was told not to write any).
start=$(date +%s)
python3 -m compileall -q -j 0 "$SITE" /tmp/site calibatt_cli kernels >/dev/null 2>&1
echo "=== bytecode compiled in $(($(date +%s) - start)) s" >>"$LOG"

step() { # step SECONDS NAME COMMAND...: run it unless the budget is spent, at most SECONDS
	local limit=$1 name=$2
	shift 2
	local left=$((BUDGET - ($(date +%s) - START) - 15))
	if [ "$left" -lt 20 ]; then
		echo "=== $name: skipped (budget spent)" >>"$LOG"
		return
	fi
	[ "$limit" -gt "$left" ] && limit=$left
	echo "=== $name (limit ${limit}s) $(date +%T)" >>"$LOG"
	timeout -k 5 "$limit" "$@" >>"$LOG" 2>&1
	echo "=== $name: rc=$? $(date +%T)" >>"$LOG"
}

# every test runs (no -x); failures and errors summarised one line each at the end, tracebacks short; the slowest
# tests named, to plan the next session's limits
T="python3 -m pytest -q --no-header -p no:cacheprovider --tb=short -rfEs --durations=6"
if [ "$PART" = A ]; then
	step 120 "gpu tests: kernels, no sync, fp8 kernels" $T tests/test_kernels_gpu.py tests/test_sync_gpu.py tests/test_fp8_gpu.py
	step 260 "bench_cli_wan d=0.2" python3 bench/bench_cli_wan.py --workdir /tmp/wcli --steps 8 --density 0.2
	mkdir -p "$OUT/cli-wan" && cp /tmp/wcli/*.log "$OUT/cli-wan/" 2>/dev/null
	step 70 "bench_guard --compile d=0.2" python3 bench/bench_guard.py --density 0.2 --compile --reps 3 --rounds 2
	step 80 "bench_fp8 --sweep" python3 bench/bench_fp8.py --sweep --budget 60
elif [ "$PART" = C ]; then
	step 230 "gpu tests: fp8 path" $T tests/test_fp8_gpu.py tests/test_fp8_integration_gpu.py
	step 360 "bench_cli_wan d=0.2 --library" python3 bench/bench_cli_wan.py --workdir /tmp/wcli --steps 8 \
		--density 0.2 --library
	mkdir -p "$OUT/cli-wan" && cp /tmp/wcli/*.log "$OUT/cli-wan/" 2>/dev/null
	step 90 "profile_generate: one sparse step of the user's path" python3 bench/profile_generate.py \
		--config /tmp/wcli/config.yaml --step 5 --tag user-d0.2
elif [ "$PART" = F ]; then
	step 150 "bench_e2e 14B d=0.2 bf16 and fp8" python3 bench/bench_e2e.py --shapes wan14b-720p --densities 0.2 \
		--reps 3 --only stock:eager stock:compiled calibatt:compiled --precision bf16 fp8
	step 400 "gpu tests: fp8 path" $T tests/test_fp8_gpu.py tests/test_fp8_integration_gpu.py
elif [ "$PART" = P ]; then
	imports
	imports
elif [ "$PART" = R ]; then
	step 90 "gpu tests: the launch records compile stores, no sync in a step, the threaded placement" $T tests/test_sync_gpu.py tests/test_placement.py -k "${RTESTS:-records or never_waits or values_are}"
	# a carried .base/ (calibatt_cli and kernels of another commit) is timed side by side with this tree
	TREES=(.)
	[ -d .base/calibatt_cli ] && TREES=(.base .) && python3 -m compileall -q -j 0 .base >/dev/null 2>&1
	TEXT=${TEXT:-one-layer} # full: the real UMT5-XXL encoder's shape in the pipeline (its own workdir)
	step 560 "bench_ready: generate's start and the process around it, Wan 1.3B 480p x 81, $TEXT text encoder" \
		python3 bench/bench_ready.py --workdir "/tmp/wready-$TEXT" --text-encoder "$TEXT" --device cuda --head-dim 128 \
		--ffn-dim 8960 --height 480 --width 832 --frames 81 --steps 6 --runs "${RUNS:-2}" --dense \
		--profile "${PROFILE:-50}" ${LT:+--load-threads $LT} --trees "${TREES[@]}"
	# LOADS="stock threads:8 ...": then the pipeline's load by way of placing its weights (bench_load.py, on
	# bench_ready's checkpoint), in what is left of the budget
	[ -n "${LOADS:-}" ] && step 200 "bench_load: the pipeline's load onto the GPU, $TEXT text encoder" \
		python3 bench/bench_load.py --weights "/tmp/wready-$TEXT/weights" --text-encoder "$TEXT" --device cuda \
		--runs "${LOAD_RUNS:-2}" --variants $LOADS
elif [ "$PART" = D ]; then
	step 200 "gpu tests: compiled blocks" $T tests/test_compile_gpu.py
	step 100 "gpu tests: no sync" $T tests/test_sync_gpu.py
else
	step 120 "bench_e2e d=0.2 (stock eager, stock compiled, calibatt compiled)" python3 bench/bench_e2e.py \
		--shapes wan1.3b-480p --densities 0.2 --reps 3 --only stock:eager stock:compiled calibatt:compiled
	step 200 "gpu tests: compiled blocks" $T tests/test_compile_gpu.py
	step 150 "gpu tests: fp8 path" $T tests/test_fp8_integration_gpu.py
	step 40 "gpu tests: fp8 quantization" $T tests/test_fp8_gpu.py -k quantize_matches
fi

find bench/results -newer /tmp/gpu_session.start -type f -print0 | tar --null -czf "$OUT/results.tar.gz" -T - 2>>"$LOG"
echo "=== done $(date +%T), $(($(date +%s) - START)) s" >>"$LOG"
