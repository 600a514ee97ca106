#!/usr/bin/env bash
# S2L-PO against GRPO over several seeds on the CPU toy world (`s2l study`): mean ± SE of held-out pass@1.
# About 20 minutes on 2 cores for 3 arms x 5 seeds of the tiny_cpu.yaml run (docs/DEMO.md).
#
#   bash examples/run_toy_study.sh [OUT_DIR] [s2l study flags and key=value overrides...]
#   bash examples/run_toy_study.sh runs/study --seeds 3 --arms s2l,grpo,constant steps=12
#
# 1. the toy world (tools/make_toy_models.py), unless OUT_DIR already has one
# 2. the explorer pool (resumes or keeps a finished one)
# 3. the study: the premise (explorer vs learner pass@k), then every arm x seed; the same command again skips
#    the runs already done. Results: OUT_DIR/study/study.md, study.json, study.png.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=runs/study
if [ $# -gt 0 ] && [[ $1 != -* && $1 != *=* ]]; then OUT=$1; shift; fi
PY=${PY:-.venv/bin/python}
source examples/lib/toy_world.sh

make_toy_world_and_pool 3
echo "== 3/3 study"
$PY -m megatron_s2l.cli study --config $CONFIG --out "$OUT/study" "$@" "${COMMON[@]}"
