#!/usr/bin/env bash
# Multi-node launch of a curriculum with torchrun (CUDA or Ascend with torch_npu); the recipes'
# pretrain_torchrun.sh call it. Run on every node:
#   NNODES=64 NODE_RANK=<0..63> MASTER_ADDR=<node 0 address> bash examples/launch/torchrun.sh CURRICULUM.yaml [overrides]
# Extra arguments are passed on (dotted overrides, e.g. training.checkpoint.save_dir=/ckpt/run).
set -euo pipefail
CURRICULUM=$1
shift
cd "$(dirname "$0")/../.."
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
export CUDA_DEVICE_MAX_CONNECTIONS=1
torchrun --nproc_per_node "$NPROC_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  pretrain_t2v.py --curriculum "$CURRICULUM" "parallel.world_size=$((NPROC_PER_NODE * NNODES))" "$@"
