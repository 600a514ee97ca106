#!/usr/bin/env bash
# S2L-PO at 14B: Qwen3-4B-Base explorer -> Qwen3-14B-Base learner, G=8, T_mix=4
# (examples/configs/s2l_qwen3_14b.yaml). One 4B pool also serves the 8B learner.
#
#   bash examples/run_s2l_14b.sh --dry-run
#   LEARNER=... EXPLORER=... DATA=... POOL=... bash examples/run_s2l_14b.sh [key=value overrides]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CONFIG=${CONFIG:-$HERE/configs/s2l_qwen3_14b.yaml}
LEARNER=${LEARNER:-/models/Qwen3-14B-Base}
EXPLORER=${EXPLORER:-/models/Qwen3-4B-Base}
DATA=${DATA:-/data/dapo-math-17k.parquet}
POOL=${POOL:-/pools/qwen3-4b-base-dapo}
TP=${TP:-8}
ROLLOUT_GPUS=${ROLLOUT_GPUS:-0}   # 8 GPUs for TP=8: serve the replica from another node (rollout.learner_url)
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
source "$HERE/lib/launch.sh"
launch
