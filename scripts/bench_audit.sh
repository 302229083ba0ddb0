#!/bin/bash
# The full memorisation audit on chitchat (docs/audit.md): the non-private recipe, then DP at ε = 8 with the noise
# calibrated to the real cohort (privacy.noise_cohort=0 privacy.population=0: no noise-cohort setting).
# Usage: bash scripts/bench_audit.sh DATA_DIR OUT_DIR [ROUNDS]   (DATA_DIR from
#   pflm prepare --corpus chitchat --tokenizer-input wordfreq --vocab-size 10000 --max-sentences 1000 --out DATA_DIR)
set -euo pipefail
DATA=${1:?data dir}; OUT=${2:?output dir}; ROUNDS=${3:-200}
PY=${PYTHON:-.venv/bin/python}
COMMON="data.dir=$DATA server.rounds=$ROUNDS threads=2 device_workers=0 privacy.population=0 privacy.noise_cohort=0"
CANARIES="--canaries 20 --repeats 32 --client-canaries 48 --no-progress"
date -u; uptime
nice -n 10 $PY -m pflm audit recipes/chitchat_fl.yaml $COMMON $CANARIES --out "$OUT/nondp"
date -u; uptime
nice -n 10 $PY -m pflm audit recipes/chitchat_dp.yaml $COMMON privacy.target_epsilon=8 $CANARIES \
    --out "$OUT/dp8" --compare "$OUT/nondp"
date -u; uptime
