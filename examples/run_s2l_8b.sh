#!/usr/bin/env bash
# S2L-PO, the paper's main setting: Qwen3-1.7B-Base explorer -> Qwen3-8B-Base learner, DAPO-Math-17k,
# G=16, T_mix=8, 16 steps of 1024 prompts (examples/configs/s2l_qwen3_8b.yaml).
#
#   bash examples/run_s2l_8b.sh --dry-run                     # print every command
#   LEARNER=/ckpt/Qwen3-8B-Base EXPLORER=/ckpt/Qwen3-1.7B-Base DATA=/data/dapo.parquet \
#     bash examples/run_s2l_8b.sh [key=value overrides]
#   ROLE=rollout ... / ROLE=train ROLLOUT_ADDR=<rollout node> NNODES=.. NODE_RANK=.. MASTER_ADDR=.. (multi-node)
#
# Node 0 builds the explorer pool once (an SGLang explorer server, unless POOL holds a complete one), then serves
# the learner replica (one SGLang server per SGLANG_TP GPUs behind sglang-router) on its last ROLLOUT_GPUS
# GPUs; torchrun starts the Megatron learner on the rest. See examples/lib/launch.sh for every variable.
""":"  # bash: the no-op `:`; Python (`torchrun` typed in front): a string up to the end of bash
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CONFIG=${CONFIG:-$HERE/configs/s2l_qwen3_8b.yaml}
LEARNER=${LEARNER:-/models/Qwen3-8B-Base}
EXPLORER=${EXPLORER:-/models/Qwen3-1.7B-Base}
DATA=${DATA:-/data/dapo-math-17k.parquet}
POOL=${POOL:-/pools/qwen3-1.7b-base-dapo}
TP=${TP:-4}
source "$HERE/lib/launch.sh"
launch
exit
"""
# Python from here on: `torchrun examples/run_s2l_8b.sh` runs this file as bash, once per node
import os, sys  # noqa: E401
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "lib"))
from torchrun_as_bash import rerun_in_bash  # noqa: E402
rerun_in_bash(__file__)
