#!/usr/bin/env bash
# One node, all its GPUs (or CPU processes: gloo, fp32 -- drop --bf16 there).
#   MODEL=qwen3-8b CKPT=/work/qwen3-8b/mcore DATA=/work/qwen3-8b/data/train \
#   SAVE=/work/runs/qwen3-8b-eaft ./sft_single_node.sh
#   MODEL=glm4-9b  CKPT=/work/glm4-9b/mcore  DATA=/work/glm4-9b/data/train \
#   SAVE=/work/runs/glm4-9b-eaft  ./sft_single_node.sh
source "$(dirname "$0")/common.sh"
NPROC=${NPROC:-$(nvidia-smi -L 2>/dev/null | wc -l)}
torchrun --standalone --nproc-per-node "${NPROC:-1}" -m eaft_megatron.train "${TRAIN_ARGS[@]}" "$@"
