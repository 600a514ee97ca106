# Sourced by the CPU toy examples (run_tiny_cpu.sh, run_toy_study.sh), with OUT and PY set: makes the toy world
# under $OUT/models (once) and its explorer pool under $OUT/pool (resumes or keeps a finished one), and sets
# CONFIG and COMMON, the overrides that point tiny_cpu.yaml at them.
CONFIG=examples/configs/tiny_cpu.yaml
COMMON=(model.path=$OUT/models/learner data.path=$OUT/models/data/train.jsonl eval.path=$OUT/models/data/test.jsonl
        explorer.model_path=$OUT/models/explorer explorer.pool_path=$OUT/pool)

make_toy_world_and_pool() {  # $1: how many stages the calling script has
    echo "== 1/$1 toy explorer and learner"
    [ -f "$OUT/models/learner/config.json" ] || $PY tools/make_toy_models.py --out "$OUT/models"
    echo "== 2/$1 explorer pool"
    $PY -m megatron_s2l.cli pool build --config $CONFIG --score "${COMMON[@]}"
}
