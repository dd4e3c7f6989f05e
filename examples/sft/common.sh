#!/usr/bin/env bash
# Shared settings for the SFT examples; sourced by the launch scripts. Override any variable
# from the environment. Paths:
#   CKPT   converted model (eaft-megatron convert hf-to-megatron --tp $TP --pp $PP)
#   DATA   prepared data prefix (eaft-megatron preprocess --output-prefix $DATA)
#   SAVE   where checkpoints, hf/ and metrics.jsonl go
# MODEL picks parallel sizes and hyper-parameters: qwen3-8b | qwen3-4b | glm4-9b.
set -euo pipefail

MODEL=${MODEL:-qwen3-8b}
CKPT=${CKPT:?set CKPT to the converted checkpoint directory}
DATA=${DATA:?set DATA to the prepared data prefix}
SAVE=${SAVE:?set SAVE to the output directory}

case "$MODEL" in
  qwen3-4b) TP=${TP:-1}; PP=${PP:-1}; LR=${LR:-1e-5} ;;
  qwen3-8b) TP=${TP:-2}; PP=${PP:-1}; LR=${LR:-1e-5} ;;
  glm4-9b)  TP=${TP:-2}; PP=${PP:-1}; LR=${LR:-5e-6} ;;
  *) echo "unknown MODEL=$MODEL (qwen3-4b | qwen3-8b | glm4-9b)" >&2; exit 2 ;;
esac
SEQ=${SEQ:-4096}
MBS=${MBS:-1}
GBS=${GBS:-128}
ITERS=${ITERS:-1000}
LOSS=${LOSS:-eaft}          # sft | dft | eaft

# The architecture comes from $CKPT/hf/config.json; everything else is Megatron-LM's flags.
TRAIN_ARGS=(
  --load "$CKPT" --finetune --save "$SAVE" --data-path "$DATA" --seq-length "$SEQ"
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --micro-batch-size "$MBS" --global-batch-size "$GBS" --train-iters "$ITERS"
  --lr "$LR" --min-lr 0 --lr-decay-style cosine --lr-warmup-fraction 0.03
  --weight-decay 0.0 --clip-grad 1.0 --adam-beta2 0.95
  --bf16 --use-distributed-optimizer --ckpt-format torch_dist
  --save-interval 200 --eval-interval 100 --eval-iters 10 --log-interval 10
  --tensorboard-dir "$SAVE/tensorboard"
  --loss-type "$LOSS" --eaft-top-k 20 --eaft-alpha 1.0 --eaft-entropy topk
)
if [ "$TP" -gt 1 ]; then TRAIN_ARGS+=(--sequence-parallel); fi
