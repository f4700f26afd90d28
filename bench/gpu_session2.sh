#!/usr/bin/env bash
# A short second device call after gpu_session.sh: the no-sync and fp8 GPU tests, the guard with compiled blocks
# under --strict (tiny model, cost model off so that buckets run sparse), bench_guard --compile, and the
# compiled-blocks GPU test. `bash bench/gpu_session2.sh OUTDIR` on the device (wheels carried in .whl/).
set -u
OUT=$1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD:$PWD/kernels
T="python3 -m pytest -q --no-header -p no:cacheprovider"
echo "=== sync + fp8 $(date +%T)"
timeout 60 $T tests/test_sync_gpu.py tests/test_fp8_gpu.py 2>&1 | tail -15
echo "=== guard with compiled blocks, strict $(date +%T)"
W=/tmp/g; mkdir -p $W
S="--set model.device=cuda --set compile.cost_model=false --set generate.guard=true --set calibration.output=$W/b.safetensors --set compile.bundle=$W/b.safetensors --set compile.cache_dir=$W/cache"
timeout 110 sh -c "python3 -m calibatt_cli calibrate $S >/dev/null 2>&1 && python3 -m calibatt_cli compile $S 2>&1 | tail -3 && python3 -m calibatt_cli generate 'a red circle moving left on a black background' -o $W/v.mp4 --strict --json $S 2>&1 | tail -2 | cut -c1-1500"
echo "=== bench_guard --compile $(date +%T)"
timeout 45 python3 bench/bench_guard.py --density 0.2 --compile 2>&1 | tail -4
echo "=== compile gpu tests $(date +%T)"
timeout 45 $T tests/test_compile_gpu.py -k default 2>&1 | tail -8
mkdir -p $OUT; cp bench/results/guard-*compiled*.json $OUT/ 2>/dev/null
echo "=== done $(date +%T)"
