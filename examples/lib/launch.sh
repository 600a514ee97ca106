# Shared by examples/run_*.sh: start the rollout side (SGLang) on node 0, then the Megatron learner on
# every node with torchrun. Everything below is an overridable environment variable; `--dry-run` prints
# each command instead of running it. Source this file, set CONFIG/LEARNER/EXPLORER/..., call launch "$@".

: "${NNODES:=1}"                  # nodes in the job
: "${NODE_RANK:=0}"               # this node (0 .. NNODES-1); node 0 also runs SGLang
: "${MASTER_ADDR:=127.0.0.1}"     # node 0's address, reachable from every node
: "${MASTER_PORT:=29500}"         # torchrun rendezvous
: "${GPUS_PER_NODE:=8}"
: "${ROLLOUT_GPUS:=4}"            # GPUs of node 0 given to SGLang; the others (and all of other nodes) train
: "${TP:=4}"                      # learner tensor parallel
: "${PP:=1}"                      # learner pipeline parallel
: "${MICRO_BATCH_SIZE:=2}"
: "${SGLANG_TP:=1}"               # tensor parallel inside each SGLang replica
: "${SGLANG_PORT:=30000}"         # learner replica server
: "${EXPLORER_PORT:=30001}"       # explorer server (pool build, or explorer.mode=online)
: "${SGLANG_MEM_FRACTION:=0.85}"
: "${WEIGHT_SYNC:=distributed}"   # distributed (NCCL broadcast) | disk | tensor (colocated only)
: "${BUILD_POOL:=auto}"           # auto: build the explorer pool when POOL has no manifest; 0: never
: "${RUN_DIR:=runs/$(basename "${CONFIG%.yaml}")}"
: "${CKPT_DIR:=$RUN_DIR/checkpoints}"
: "${WANDB:=false}"
: "${WANDB_MODE:=offline}"
: "${PYTHON:=python}"               # the learner's Python (torchrun, s2l)
: "${SGLANG_PYTHON:=$PYTHON}"       # the SGLang servers' Python (the container: /opt/sglang/bin/python)
: "${S2L:=$PYTHON -m megatron_s2l.cli}"

DRY_RUN=0
EXTRA_OVERRIDES=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *=*) EXTRA_OVERRIDES+=("$arg") ;;
    *) echo "unknown argument: $arg (use --dry-run or key=value overrides)" >&2; exit 2 ;;
  esac
done

TRAIN_GPUS=$GPUS_PER_NODE
if [ "$NODE_RANK" = 0 ]; then TRAIN_GPUS=$((GPUS_PER_NODE - ROLLOUT_GPUS)); fi
if [ "$NNODES" -gt 1 ] && [ "$ROLLOUT_GPUS" -gt 0 ]; then
  echo "note: with NNODES>1 torchrun needs the same GPU count per node; set ROLLOUT_GPUS=0 and point" \
       "rollout.learner_url at a separate rollout node, or keep one node" >&2
fi
SGLANG_DP=$((ROLLOUT_GPUS / SGLANG_TP))
ROLLOUT_DEVICES=$(seq -s, $((GPUS_PER_NODE - ROLLOUT_GPUS)) $((GPUS_PER_NODE - 1)))
TRAIN_DEVICES=$(seq -s, 0 $((TRAIN_GPUS - 1)))
PIDS=()

run() {  # print, then run unless --dry-run
  echo "+ $*"
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

start_server() {  # start_server NAME PORT MODEL: an SGLang server on the rollout GPUs, in the background
  local name=$1 port=$2 model=$3
  echo "+ CUDA_VISIBLE_DEVICES=$ROLLOUT_DEVICES $SGLANG_PYTHON -m sglang.launch_server --model-path $model" \
       "--host 0.0.0.0 --port $port --tp $SGLANG_TP --dp-size $SGLANG_DP --mem-fraction-static $SGLANG_MEM_FRACTION" \
       "> $RUN_DIR/$name.log 2>&1 &"
  if [ "$DRY_RUN" = 1 ]; then return; fi
  mkdir -p "$RUN_DIR"
  CUDA_VISIBLE_DEVICES=$ROLLOUT_DEVICES $SGLANG_PYTHON -m sglang.launch_server --model-path "$model" \
    --host 0.0.0.0 --port "$port" --tp "$SGLANG_TP" --dp-size "$SGLANG_DP" \
    --mem-fraction-static "$SGLANG_MEM_FRACTION" > "$RUN_DIR/$name.log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 180); do
    if curl -sf "http://127.0.0.1:$port/health" > /dev/null; then return; fi
    if ! kill -0 "${PIDS[-1]}" 2>/dev/null; then echo "$name exited; see $RUN_DIR/$name.log" >&2; exit 1; fi
    sleep 5
  done
  echo "$name did not become healthy in 15 minutes; see $RUN_DIR/$name.log" >&2
  exit 1
}

stop_servers() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  PIDS=()
}
trap stop_servers EXIT

launch() {
  local overrides=(
    "model.path=$LEARNER" "data.path=$DATA" "parallel.tp=$TP" "parallel.pp=$PP"
    "parallel.micro_batch_size=$MICRO_BATCH_SIZE" "rollout.learner_url=http://$MASTER_ADDR:$SGLANG_PORT"
    "rollout.weight_sync=$WEIGHT_SYNC" "checkpoint.dir=$CKPT_DIR" "checkpoint.resume=auto"
    "logging.run_dir=$RUN_DIR" "logging.wandb=$WANDB" "logging.wandb_mode=$WANDB_MODE"
  )
  if [ -n "${EXPLORER:-}" ]; then overrides+=("explorer.model_path=$EXPLORER" "explorer.pool_path=$POOL"); fi
  overrides+=("${EXTRA_OVERRIDES[@]}")

  if [ "$NODE_RANK" = 0 ] && [ -n "${EXPLORER:-}" ] && [ "$BUILD_POOL" != 0 ] && [ ! -f "$POOL/manifest.json" ]; then
    start_server explorer "$EXPLORER_PORT" "$EXPLORER"
    run $S2L pool build --config "$CONFIG" --explorer-url "http://127.0.0.1:$EXPLORER_PORT" "${overrides[@]}"
    stop_servers
  fi
  if [ "$NODE_RANK" = 0 ] && [ "$ROLLOUT_GPUS" -gt 0 ]; then
    start_server learner_replica "$SGLANG_PORT" "$LEARNER"
  fi
  run env CUDA_VISIBLE_DEVICES="$TRAIN_DEVICES" "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" \
    --node-rank "$NODE_RANK" --nproc-per-node "$TRAIN_GPUS" --master-addr "$MASTER_ADDR" \
    --master-port "$MASTER_PORT" -m megatron_s2l.cli train --config "$CONFIG" "${overrides[@]}"
}
