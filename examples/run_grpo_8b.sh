#!/usr/bin/env bash
# The GRPO baseline: Qwen3-8B-Base with every sample from the learner (examples/configs/grpo_qwen3_8b.yaml),
# the same budget and launcher as run_s2l_8b.sh.
#
#   bash examples/run_grpo_8b.sh --dry-run
""":"  # bash: the no-op `:`; Python (`torchrun` typed in front): a string up to the end of bash
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CONFIG=${CONFIG:-$HERE/configs/grpo_qwen3_8b.yaml}
LEARNER=${LEARNER:-/models/Qwen3-8B-Base}
DATA=${DATA:-/data/dapo-math-17k.parquet}
TP=${TP:-4}
source "$HERE/lib/launch.sh"
launch
exit
"""
# Python from here on: `torchrun examples/run_grpo_8b.sh` runs this file as bash, once per node
import os, sys  # noqa: E401
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from torchrun_as_bash import rerun_in_bash  # noqa: E402
rerun_in_bash(__file__)
