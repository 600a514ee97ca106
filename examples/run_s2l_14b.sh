#!/usr/bin/env bash
# S2L-PO at 14B: Qwen3-4B-Base explorer -> Qwen3-14B-Base learner, G=8, T_mix=4
# (examples/configs/s2l_qwen3_14b.yaml). One 4B pool also serves the 8B learner.
#
# The learner trains at TP=8, so the rollout side gets a node of its own (two-node layout):
#   ROLE=rollout bash examples/run_s2l_14b.sh                                # rollout node (node A)
#   ROLE=train ROLLOUT_ADDR=<node A> MASTER_ADDR=<this node> bash examples/run_s2l_14b.sh   # training node
# Add --dry-run to print the commands; LEARNER, EXPLORER, DATA, POOL and key=value overrides as in run_s2l_8b.sh.
""":"  # bash: the no-op `:`; Python (`torchrun` typed in front): a string up to the end of bash
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CONFIG=${CONFIG:-$HERE/configs/s2l_qwen3_14b.yaml}
LEARNER=${LEARNER:-/models/Qwen3-14B-Base}
EXPLORER=${EXPLORER:-/models/Qwen3-4B-Base}
DATA=${DATA:-/data/dapo-math-17k.parquet}
POOL=${POOL:-/pools/qwen3-4b-base-dapo}
TP=${TP:-8}
ROLLOUT_GPUS=${ROLLOUT_GPUS:-8}   # the whole rollout node: 4 learner replicas of SGLANG_TP=2
SGLANG_TP=${SGLANG_TP:-2}
source "$HERE/lib/launch.sh"
launch
exit
"""
# Python from here on: `torchrun examples/run_s2l_14b.sh` runs this file as bash, once per node
import os, sys  # noqa: E401
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from torchrun_as_bash import rerun_in_bash  # noqa: E402
rerun_in_bash(__file__)
