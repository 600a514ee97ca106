#!/usr/bin/env bash
# The GRPO baseline: Qwen3-8B-Base with every sample from the learner (examples/configs/grpo_qwen3_8b.yaml),
# the same budget and launcher as run_s2l_8b.sh.
#
#   bash examples/run_grpo_8b.sh --dry-run
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CONFIG=${CONFIG:-$HERE/configs/grpo_qwen3_8b.yaml}
LEARNER=${LEARNER:-/models/Qwen3-8B-Base}
DATA=${DATA:-/data/dapo-math-17k.parquet}
TP=${TP:-4}
source "$HERE/lib/launch.sh"
launch
