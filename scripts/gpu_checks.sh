#!/usr/bin/env bash
# One prepared GPU run (device tool): every issue's GPU check in sequence, each hard-limited in time, results
# under $OUT. Budgets (seconds) are passed as arguments so the whole run fits one lease:
#   bash scripts/gpu_checks.sh [latency_s] [prune_s] [quantize_s] [recover_s] [layout_s]
# CHECKS picks which run (default: all), e.g. the layout issue's checks alone, in about 6 minutes:
#   CHECKS=layout bash scripts/gpu_checks.sh
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/zipkd-gpu}
mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } \
  > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
run() {  # name budget script args...
  local name=$1 budget=$2; shift 2
  echo "=== $name (limit ${budget}s)"
  local t0=$SECONDS
  timeout --kill-after=10 "$budget" python3 "$@" --out "$OUT" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "=== $name rc=$rc in $((SECONDS - t0))s"
}
L=${1:-170}; P=${2:-200}; Q=${3:-75}; R=${4:-50}; Y=${5:-400}
CHECKS=${CHECKS:-latency prune quantize recover layout}
want() { case " $CHECKS " in *" $1 "*) return 0;; *) return 1;; esac; }
want latency && run latency $((L + 20)) scripts/gpu_latency.py --budget "$L"
want prune && run prune $((P + 20)) scripts/gpu_prune.py --budget-s "$P"
want quantize && run quantize $((Q + 15)) scripts/gpu_quantize.py --budget-s "$Q"
want recover && run recover $((R + 15)) scripts/gpu_recover.py --budget-s "$R"
want layout && run layout $((Y + 20)) scripts/gpu_layout.py --budget-s "$Y"
ls -la "$OUT"
