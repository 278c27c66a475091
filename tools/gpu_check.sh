#!/usr/bin/env bash
# The GPU check of lowrank_pt, under 8 minutes on one GPU: the GPU-marked tests, then one table
# (every method x ZeRO 0/2/3 x bf16: loss falls, resume exact, edits in the masters) and a
# benchmark (130m and 350m: tokens/s, MFU, max_memory_allocated beside the planner's peak).
#
#   tools/gpu_check.sh [OUT_DIR] [tools/gpu_check.py options ...]
#
# Writes OUT_DIR/pytest.log, OUT_DIR/gpu_check.md (the table) and OUT_DIR/gpu_check.json.
# Exit status: 0 when everything passed, 3 without a CUDA device (nothing checked), 1 otherwise.
# GPU_CHECK_PYTEST_TIMEOUT (seconds, default 300) bounds the test part.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_check_out}
[ $# -gt 0 ] && shift
export PYTHONUNBUFFERED=1
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: no CUDA device here: nothing was checked." >&2
  echo "  (python tools/gpu_check.py --device cpu --tiny runs the table's code on CPU)" >&2
  exit 3
fi
mkdir -p "$out"
start=$SECONDS
timeout "${GPU_CHECK_PYTEST_TIMEOUT:-300}" python -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$out/pytest.log"
tests_rc=${PIPESTATUS[0]}
echo "gpu_check.sh: pytest -m gpu exited $tests_rc after $((SECONDS - start)) s"
python tools/gpu_check.py --out "$out" "$@"
table_rc=$?
echo "gpu_check.sh: tests exit $tests_rc, table exit $table_rc, $((SECONDS - start)) s in all"
if [ "$tests_rc" -eq 0 ] && [ "$table_rc" -eq 0 ]; then exit 0; fi
exit 1
