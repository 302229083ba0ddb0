#!/usr/bin/env bash
# The default end-to-end job: install → prepare chitchat (real users) → train the central-DP LM →
# generate real ASR N-best lists (flite + pocketsphinx, cached) → rescore them and report WER.
# Extra arguments are passed to `pflm train` as overrides, e.g. `scripts/demo.sh rounds=20`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
PFLM=.venv/bin/pflm
DATA=${PFLM_DEMO_DATA:-data/chitchat}
OUT=${PFLM_DEMO_OUT:-runs}
NBEST=${PFLM_DEMO_NBEST:-data/nbest}

if [ ! -f "$DATA/manifest.json" ]; then
  # public 10k-word vocabulary and prior (wordfreq): DP runs refuse vocabularies counted on the training users
  $PFLM prepare --corpus chitchat --tokenizer-input wordfreq --vocab-size 10000 --max-sentences 1000 --out "$DATA"
fi
$PFLM train recipes/chitchat_dp.yaml "data.dir=$DATA" "output_dir=$OUT" "$@"

mkdir -p "$NBEST"
[ -f "$NBEST/dev.jsonl" ] || $PFLM nbest --data "$DATA" --split val --num 200 --seed 1 --out "$NBEST/dev.jsonl"
[ -f "$NBEST/test.jsonl" ] || $PFLM nbest --data "$DATA" --split test --num 200 --seed 2 --out "$NBEST/test.jsonl"
$PFLM rescore --checkpoint "$OUT/chitchat_dp" --dev "$NBEST/dev.jsonl" --test "$NBEST/test.jsonl"
