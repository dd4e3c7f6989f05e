#!/usr/bin/env bash
# Several nodes with torchrun's c10d rendezvous: run the same command on every node.
#   NNODES=4 RDZV_ENDPOINT=node001:29500 RDZV_ID=qwen3-eaft MODEL=qwen3-8b TP=4 PP=2 \
#   CKPT=... DATA=... SAVE=... ./sft_multi_node.sh          # on each of the 4 nodes
# Paths must be on storage all nodes see (checkpoints are written by every rank).
source "$(dirname "$0")/common.sh"
NNODES=${NNODES:?number of nodes}
RDZV_ENDPOINT=${RDZV_ENDPOINT:?host:port of the rendezvous (any one node)}
RDZV_ID=${RDZV_ID:-eaft-sft}
NPROC=${NPROC:-8}
torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC" \
  --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID" \
  -m eaft_megatron.train "${TRAIN_ARGS[@]}" "$@"
