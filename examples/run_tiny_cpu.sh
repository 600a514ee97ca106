#!/usr/bin/env bash
# The CPU demo, stage by stage (what `make demo` runs). About 7 minutes on 2 cores, no GPU, nothing downloaded.
#
#   bash examples/run_tiny_cpu.sh [OUT_DIR]        (default runs/demo)
#   (a rerun replaces the earlier demo runs in OUT_DIR: logging.overwrite=true)
#
# 1. toy world: a small explorer and an 8x larger learner (Qwen3 architecture, character tokenizer) taught
#    1-3 digit addition differently (megatron_s2l/toy.py): the learner is ahead at pass@1, the explorer at
#    pass@64, because it writes final carries the learner never does.
# 2. the explorer pool: the explorer's samples for every training prompt, generated once (S2L-PO's
#    offline rollouts).
# 3. S2L-PO: the Megatron-Core learner (gloo, CPU) trains on groups mixing pool samples and its own fresh
#    samples (LocalEngine), the explorer share annealed from 1 to 0 over T_mix steps.
# 4. GRPO: the same run with the explorer off.
# 5. the comparison table (accuracy per step, rollout compute) and PNG plots.
# The multi-seed comparison with error bars is examples/run_toy_study.sh (docs/DEMO.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/demo}
PY=${PY:-.venv/bin/python}
source examples/lib/toy_world.sh

make_toy_world_and_pool 5
echo "== 3/5 S2L-PO"
$PY -m megatron_s2l.cli train --config $CONFIG "${COMMON[@]}" logging.run_dir=$OUT/s2l logging.overwrite=true
echo "== 4/5 GRPO baseline (same budget, explorer off)"
$PY -m megatron_s2l.cli train --config $CONFIG "${COMMON[@]}" explorer.mode=off logging.run_dir=$OUT/grpo \
  logging.overwrite=true
echo "== 5/5 comparison and plots"
$PY tools/compare_runs.py "$OUT/s2l" "$OUT/grpo"
$PY tools/plot_run.py "$OUT/s2l" "$OUT/grpo" --out "$OUT/plots"
echo "done: $OUT/comparison.md, $OUT/plots/*.png"
