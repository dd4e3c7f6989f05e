#!/usr/bin/env bash
# Convert a Hugging Face model and prepare chat data, once, before training.
#   HF_MODEL=/models/Qwen3-8B CHAT=/data/math.jsonl OUT=/work/qwen3-8b TP=2 PP=1 ./prepare.sh
set -euo pipefail
HF_MODEL=${HF_MODEL:?local HF model directory}
CHAT=${CHAT:?chat JSONL file(s), space separated}
OUT=${OUT:?output directory}
TP=${TP:-2}; PP=${PP:-1}; SEQ=${SEQ:-4096}; WORKERS=${WORKERS:-8}

eaft-megatron convert hf-to-megatron --hf "$HF_MODEL" --out "$OUT/mcore" --tp "$TP" --pp "$PP" \
  --dtype bf16
# shellcheck disable=SC2086
eaft-megatron preprocess --input $CHAT --tokenizer "$HF_MODEL" --output-prefix "$OUT/data/train" \
  --seq-length "$SEQ" --pack --workers "$WORKERS"
echo "CKPT=$OUT/mcore DATA=$OUT/data/train"
