#!/usr/bin/env bash
# GPU readiness check (issue 21): on a CUDA machine, time the plain-torch floor, a pflm round and the vectorised
# devices of the default recipe on the GPU, in under 5 minutes. UNTESTED ON A GPU (written on a CPU-only machine).
#
#   scripts/gpu_check.sh [DATA_DIR] [OUT_JSON]
#
# DATA_DIR defaults to data/chitchat (made here with `pflm prepare` if missing: ~1 minute on the CPU). Prints the
# bench JSON (scripts/bench.py --accelerator cuda) and a one-line summary; exits non-zero without a CUDA GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-data/chitchat}
OUT=${2:-gpu_check.json}
PY=${PYTHON:-python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
start=$(date +%s)
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch sees no CUDA GPU (torch ' + torch.__version__ + ')')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
if [ ! -f "$DATA/manifest.json" ]; then
  "$PY" -m pflm prepare --corpus chitchat --tokenizer-input wordfreq --vocab-size 10000 --max-sentences 1000 --out "$DATA"
fi
# floor + round (+ FLOPs and the GPU's own matmul peak), then devices one at a time vs 8 / 32 per batched computation
timeout 240 "$PY" scripts/bench.py --preset default_recipe --data "$DATA" --accelerator cuda --threads 4 \
  --device-workers 1 --sections floor,vectorize --groups 8,32 --repeats 2 --out "$OUT" > /dev/null
"$PY" - "$OUT" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
f, v = d.get("flops", {}), d.get("vectorize", {})
print(f"gpu_check: floor {d['floor']['floor_seconds']:.2f} s, round {d['round']['round_seconds']:.2f} s "
      f"(round/floor {d['round_over_floor']:.2f}), {f.get('percent_of_peak', {}).get('floor', float('nan')):.1f}% of "
      f"the {f.get('peak', {}).get('peak_gflops', float('nan')):.0f} GFLOP/s matmul peak; devices/s "
      + ", ".join(f"{k}: {x:.1f}" for k, x in v.get("devices_per_second", {}).items()))
PY
echo "gpu_check: $(( $(date +%s) - start )) s in all"
