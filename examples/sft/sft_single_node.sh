#!/usr/bin/env bash
# One node, all its GPUs; without GPUs, TP x PP CPU processes (gloo, fp32).
#   MODEL=qwen3-8b CKPT=/work/qwen3-8b/mcore DATA=/work/qwen3-8b/data/train \
#   SAVE=/work/runs/qwen3-8b-eaft ./sft_single_node.sh
#   MODEL=glm4-9b  CKPT=/work/glm4-9b/mcore  DATA=/work/glm4-9b/data/train \
#   SAVE=/work/runs/glm4-9b-eaft  ./sft_single_node.sh
# Running it again resumes $SAVE's latest complete checkpoint.
source "$(dirname "$0")/common.sh"
if [ "$GPUS" -gt 0 ]; then DEFAULT_NPROC=$GPUS; else DEFAULT_NPROC=$((TP * PP)); fi
NPROC=${NPROC:-$DEFAULT_NPROC}
exec torchrun --standalone --nproc-per-node "$NPROC" -m eaft_megatron.train "${TRAIN_ARGS[@]}" "$@"
