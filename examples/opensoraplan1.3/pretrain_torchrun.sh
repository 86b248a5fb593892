#!/usr/bin/env bash
# The v1.3 curriculum with torchrun (CUDA or Ascend with torch_npu). Run on every node:
#   NNODES=64 NODE_RANK=<0..63> MASTER_ADDR=<node 0 address> bash examples/opensoraplan1.3/pretrain_torchrun.sh
# Extra arguments are passed on (dotted overrides); see examples/launch/torchrun.sh for the settings.
exec bash "$(dirname "$0")/../launch/torchrun.sh" examples/opensoraplan1.3/curriculum.yaml "$@"
