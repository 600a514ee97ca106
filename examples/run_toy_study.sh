#!/usr/bin/env bash
# S2L-PO against GRPO over several seeds on the CPU toy world (`s2l study`): mean ± SE of held-out pass@1.
# Tens of minutes on 2 cores with the defaults (5 seeds x 2 arms of the tiny_cpu.yaml run, minutes each).
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
CONFIG=examples/configs/tiny_cpu.yaml
COMMON=(model.path=$OUT/models/learner data.path=$OUT/models/data/train.jsonl eval.path=$OUT/models/data/test.jsonl
        explorer.model_path=$OUT/models/explorer explorer.pool_path=$OUT/pool)

echo "== 1/3 toy explorer and learner"
[ -f "$OUT/models/learner/config.json" ] || $PY tools/make_toy_models.py --out "$OUT/models"
echo "== 2/3 explorer pool"
$PY -m megatron_s2l.cli pool build --config $CONFIG --score "${COMMON[@]}"
echo "== 3/3 study"
$PY -m megatron_s2l.cli study --config $CONFIG --out "$OUT/study" "$@" "${COMMON[@]}"
