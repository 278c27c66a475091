#!/usr/bin/env bash
# Train on several machines with DeepSpeed's launcher and a hostfile.
#
#   launch/multi_node.sh HOSTFILE CONFIG [key=value ...]
#
# HOSTFILE lists one machine per line with its GPU count, e.g.
#     node-a slots=8
#     node-b slots=8
# Every machine needs passwordless ssh from this one, the same Python environment, and the run
# dir (run_dir=...) on a filesystem all machines share: checkpoints are written by every rank
# and renamed into place by rank 0. MASTER_PORT may be set to avoid a clash (default 29500).
set -euo pipefail
hostfile=${1:?usage: launch/multi_node.sh HOSTFILE CONFIG [key=value ...]}
config=${2:?usage: launch/multi_node.sh HOSTFILE CONFIG [key=value ...]}
shift 2
exec deepspeed --hostfile "$hostfile" --master_port "${MASTER_PORT:-29500}" \
  --module lowrank_pt.train "$config" "$@"
