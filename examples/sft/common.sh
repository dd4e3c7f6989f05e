#!/usr/bin/env bash
# Shared settings for the SFT examples; sourced by the launch scripts. Override any variable
# from the environment. Paths:
#   CKPT   converted model (eaft-megatron convert hf-to-megatron --tp $TP --pp $PP)
#   DATA   prepared data prefix (eaft-megatron preprocess --output-prefix $DATA)
#   SAVE   the run: checkpoints, hf/, metrics.jsonl, tensorboard/
# MODEL picks parallel sizes and hyper-parameters: qwen3-8b | qwen3-4b | glm4-9b.
# Restarts: Megatron-LM's idiom --load $SAVE --save $SAVE --pretrained-checkpoint $CKPT. The
# first launch fine-tunes from $CKPT; any later launch of the same command (a crash, a Slurm
# requeue) resumes from the latest complete checkpoint in $SAVE and never rolls back.
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

# GPUs: NCCL + bf16. None (nvidia-smi missing or finding no GPU): CPU processes, gloo + fp32
# (the trainer adds its CPU flags itself).
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  GPUS=$(nvidia-smi -L | wc -l)
else
  GPUS=0
fi
PRECISION=()
if [ "$GPUS" -gt 0 ]; then PRECISION=(--bf16); fi

# The architecture comes from $CKPT/hf/config.json; everything else is Megatron-LM's flags.
TRAIN_ARGS=(
  --load "$SAVE" --save "$SAVE" --pretrained-checkpoint "$CKPT"
  --data-path "$DATA" --seq-length "$SEQ"
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --micro-batch-size "$MBS" --global-batch-size "$GBS" --train-iters "$ITERS"
  --lr "$LR" --min-lr 0 --lr-decay-style cosine --lr-warmup-fraction 0.03
  --weight-decay 0.0 --clip-grad 1.0 --adam-beta2 0.95
  "${PRECISION[@]}" --use-distributed-optimizer --ckpt-format torch_dist
  --save-interval 200 --eval-interval 100 --eval-iters 10 --log-interval 10
  --tensorboard-dir "$SAVE/tensorboard"
  --loss-type "$LOSS" --eaft-top-k 20 --eaft-alpha 1.0 --eaft-entropy topk
)
if [ "$TP" -gt 1 ] && [ "$GPUS" -gt 0 ]; then TRAIN_ARGS+=(--sequence-parallel); fi
