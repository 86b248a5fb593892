#!/usr/bin/env bash
# Multi-node launch of a curriculum with msrun on Ascend (torch_npu installed: pip install -e ".[npu]");
# the recipes' pretrain_msrun.sh call it. Run on every node:
#   NNODES=64 NODE_RANK=<0..63> MASTER_ADDR=<node 0 address> bash examples/launch/msrun.sh CURRICULUM.yaml [overrides]
# msrun's scheduler takes MASTER_PORT; the torch process group rendezvous uses MASTER_PORT + 1.
# Logs go to <the curriculum's folder under outputs/>/msrun_logs.
set -euo pipefail
CURRICULUM=$1
shift
cd "$(dirname "$0")/../.."
NPROC_PER_NODE=${NPROC_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-8118}
WORLD=$((NPROC_PER_NODE * NNODES))
msrun --worker_num "$WORLD" --local_worker_num "$NPROC_PER_NODE" --master_addr "$MASTER_ADDR" \
  --master_port "$MASTER_PORT" --node_rank "$NODE_RANK" \
  --log_dir "outputs/$(basename "$(dirname "$CURRICULUM")")/msrun_logs" --join True \
  pretrain_t2v.py --curriculum "$CURRICULUM" "parallel.world_size=$WORLD" runtime.device=npu "$@"
