#!/usr/bin/env bash
# Train on one machine with N ranks (GPUs, or CPU processes when no GPU is present).
#
#   launch/single_node.sh CONFIG NUM_RANKS [key=value ...]
#
#   launch/single_node.sh configs/demo.yaml 2 engine.zero_stage=2
#
# Uses torchrun (set LAUNCHER=deepspeed to use DeepSpeed's launcher instead). On a CPU machine
# each rank gets OMP_NUM_THREADS=$(nproc)/N threads so ranks do not fight for cores.
# Resume: run the same command again; resume=auto continues from the newest complete checkpoint.
set -euo pipefail
config=${1:?usage: launch/single_node.sh CONFIG NUM_RANKS [key=value ...]}
nranks=${2:?usage: launch/single_node.sh CONFIG NUM_RANKS [key=value ...]}
shift 2
if ! python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / nranks > 0 ? $(nproc) / nranks : 1 ))}
fi
if [ "${LAUNCHER:-torchrun}" = deepspeed ]; then
  exec deepspeed --num_gpus "$nranks" --module lowrank_pt.train "$config" "$@"
fi
exec torchrun --standalone --nproc_per_node "$nranks" -m lowrank_pt.train "$config" "$@"
