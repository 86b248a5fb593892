#!/usr/bin/env bash
# The v1.2 curriculum with msrun on Ascend (torch_npu installed). Run on every node:
#   NNODES=64 NODE_RANK=<0..63> MASTER_ADDR=<node 0 address> bash examples/opensoraplan1.2/pretrain_msrun.sh
# Extra arguments are passed on (dotted overrides); see examples/launch/msrun.sh for the settings.
exec bash "$(dirname "$0")/../launch/msrun.sh" examples/opensoraplan1.2/curriculum.yaml "$@"
