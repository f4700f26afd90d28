#!/usr/bin/env bash
# One device call of tiny-model training that ends annealed: a warm start from exported weights, a cosine
# schedule sized to the time the call has left, and an export.
#
#   calibatt_cli/tiny/train_call.sh INIT_WEIGHTS SECONDS OUT_DIR [extra `calibatt train` options...]
#   (DEVICE=cpu to try it here with a small --batch)
#
# A cosine schedule needs its total step count up front, and the rate depends on the card and on
# --compile, so a short probe (PROBE_STEPS steps, the first PROBE_SKIP of them excluded: compilation
# and warm-up) measures steps/s first; its compiled graphs are cached, so the real run reuses them. With
# EAGER_PROBE=1 the probe also runs eagerly, to record the compile speed-up. Logs and the exported
# weights go to OUT_DIR: probe-*.log, train.log, tiny.safetensors (+ .json).
set -euo pipefail
init=$1 seconds=$2 out=$3
shift 3
probe_steps=${PROBE_STEPS:-300} probe_skip=${PROBE_SKIP:-100}
mkdir -p "$out"
step0=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" "${init%.safetensors}.json")
t0=$(date +%s)

# steps/s between step0+probe_skip and step0+probe_steps, read from the loss lines ("step N loss L T s")
probe() {  # name, extra options
  local name=$1
  shift
  rm -rf "/tmp/probe-$name"
  python3 -m calibatt_cli train --device "${DEVICE:-cuda}" --out "/tmp/probe-$name" --init-from "$init" \
    --steps $((step0 + probe_steps)) --log-every 50 --ckpt-every 1000000 "$@" \
    2> "$out/probe-$name.log"
  python3 - "$out/probe-$name.log" $((step0 + probe_skip)) <<'EOF'
import re, sys
rows = [(int(m[1]), float(m[2])) for m in re.finditer(r"step\s+(\d+)\s+loss\s+\S+\s+([\d.]+) s", open(sys.argv[1]).read())]
(s0, t0), (s1, t1) = next(r for r in rows if r[0] >= int(sys.argv[2])), rows[-1]
print(f"{(s1 - s0) / (t1 - t0):.3f}")
EOF
}

plain=()
for a in "$@"; do [[ $a == --compile ]] || plain+=("$a"); done
if [[ ${EAGER_PROBE:-0} == 1 ]]; then
  eager=$(probe eager "${plain[@]}")
  echo "eager probe: $eager steps/s"
fi
if ! rate=$(probe run "$@"); then
  echo "the probe failed (see $out/probe-run.log); training without --compile" >&2
  set -- "${plain[@]}"
  rate=$(probe run "$@")
fi
echo "probe ($*): $rate steps/s"
left=$(( seconds - ($(date +%s) - t0) - 40 ))  # 40 s: start-up, compile-cache reload, export
if (( left < 60 )); then
  echo "only $left s left after the probes; give more SECONDS" >&2
  exit 1
fi
steps=$(python3 -c "print(int($step0 + $rate * $left))")
echo "training $step0 -> $steps in ~$left s"
python3 -m calibatt_cli train --device "${DEVICE:-cuda}" --out "$out/ckpt" --init-from "$init" --steps "$steps" \
  --max-seconds "$left" --log-every 250 --export "$out/tiny.safetensors" "$@" 2>&1 | tee "$out/train.log"
rm -rf "$out/ckpt"  # optimizer state: too large to bring back, and a warm start does not need it
