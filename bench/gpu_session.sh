#!/usr/bin/env bash
# One GPU session's measurements, in order of importance, each under its own time limit, so that one call of the
# device machine (its image: torch, triton, Python 3.12, no diffusers) gives every number at once:
#   bash bench/gpu_session.sh OUTDIR [SECONDS]
# 1. the GPU tests (kernels, compiled blocks, no host sync in a step, fp8 kernel and path);
# 2. the user's path at Wan 2.1 1.3B 480p x 81 (bench_cli_wan.py: random weights, synthetic masks) and the
#    library path (bench_e2e.py) in the same run;
# 3. the guard's cost (bench_guard.py).
# Logs go to OUTDIR/log.txt, the results files written under bench/results/ to OUTDIR/results.tar.gz.
# Carry the wheels first (../shared/tools/device-wheels.sh puts them in .whl/).
set -u
OUT=${1:?usage: gpu_session.sh OUTDIR [SECONDS]}
BUDGET=${2:-570}
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
nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv >>"$LOG" 2>&1

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

T="python3 -m pytest -q -x --no-header -p no:cacheprovider"
step 80 "gpu tests: kernels" $T tests/test_kernels_gpu.py
step 60 "gpu tests: no sync, fp8" $T $(ls tests/test_sync_gpu.py tests/*fp8*gpu*.py 2>/dev/null)
step 300 "bench_cli_wan" python3 bench/bench_cli_wan.py --workdir /tmp/wcli --steps 8
step 50 "bench_guard" python3 bench/bench_guard.py --density 0.2
step 60 "bench_e2e" python3 bench/bench_e2e.py --shapes wan1.3b-480p --densities 0.2 --reps 3
step 120 "gpu tests: compiled blocks" $T tests/test_compile_gpu.py

find bench/results -newer /tmp/gpu_session.start -type f -print0 | tar --null -czf "$OUT/results.tar.gz" -T - 2>>"$LOG"
echo "=== done $(date +%T)" >>"$LOG"
