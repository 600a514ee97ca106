# Shared by examples/run_*.sh: start the rollout side (SGLang servers, sglang-router) and the Megatron
# learner (torchrun). Everything below is an overridable environment variable; `--dry-run` prints each
# command instead of running it. Source this file, set CONFIG/LEARNER/EXPLORER/..., call launch "$@".
#
# ROLE says what this node does:
#   all      (default) node 0 serves rollouts on its last ROLLOUT_GPUS GPUs; every node trains on the rest
#   rollout  serve rollouts on ROLLOUT_GPUS GPUs and wait (a dedicated rollout node)
#   train    train only; first wait until the rollout side at ROLLOUT_ADDR answers
# Several rollout nodes: ROLLOUT_ADDR=a,b,... on every node and ROLLOUT_RANK=i on rollout node i. Node 0 of
# them hosts the router over all nodes' learner replicas, the online explorer and the pool build.
# The rollout side, in order:
#   1. explorer.mode=pool and no complete pool at POOL: an explorer server on all rollout GPUs, `s2l pool build`
#      (which resumes an unfinished one)
#   2. EXPLORER_GPUS > 0: a frozen explorer server kept for training (explorer.mode=online)
#   3. the learner replica: one SGLang server per SGLANG_TP GPUs, each hot-swapped by the trainer after
#      every step, behind sglang-router when there is more than one. (One server with --dp-size would not
#      do: SGLang ranks a weight-update group by TP rank only, so its DP replicas would collide.)
#   2 and 3 start side by side, and training starts when all of them answer.

LAUNCH_LIB=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ "${ROLE:-}" = train ] && [ -z "${ROLLOUT_ADDR:-}" ]; then
  echo "error: ROLE=train needs ROLLOUT_ADDR, the address of the node running ROLE=rollout" >&2; exit 2
fi
: "${ROLE:=all}"
: "${NNODES:=1}"                  # training nodes in the job
: "${NODE_RANK:=0}"               # this node among them (0 .. NNODES-1)
: "${MASTER_ADDR:=127.0.0.1}"     # training node 0's address (torchrun rendezvous, weight-sync rendezvous)
: "${MASTER_PORT:=29500}"
: "${ROLLOUT_ADDR:=$MASTER_ADDR}" # the rollout node's address (or nodes', comma-separated), reachable
                                  # from the training nodes
: "${ROLLOUT_RANK:=0}"            # ROLE=rollout: this node's place in ROLLOUT_ADDR
: "${GPUS_PER_NODE:=8}"
: "${ROLLOUT_GPUS:=4}"            # GPUs serving rollouts per rollout node (ROLE=all: the last ones of
                                  # node 0); give ROLE=train nodes the same value (it fixes the URLs)
: "${EXPLORER_GPUS:=0}"           # of rollout node 0's, GPUs for an online explorer (0: offline pool)
: "${TP:=4}"                      # learner tensor parallel
: "${PP:=1}"                      # learner pipeline parallel
: "${MICRO_BATCH_SIZE:=2}"
: "${MICRO_BATCH_TOKENS:=0}"      # > 0: micro-batches filled up to this many tokens (e.g. 9216 =
                                  # 2 x (512 + 4096)); 0: MICRO_BATCH_SIZE sequences each
: "${RECOMPUTE:=off}"             # full: rerun each layer in the backward (less activation memory)
: "${FP8:=}"                      # delayed | tensorwise: FP8 GEMMs through Transformer Engine (H100 and
                                  # later; the log-prob path stays BF16/fp32); empty: BF16
: "${SGLANG_TP:=1}"               # tensor parallel inside each learner-replica server
: "${ROUTER_PORT:=30000}"         # the learner replica's entry point (sglang-router, or the only server)
: "${REPLICA_PORT:=30100}"        # learner-replica server i listens on REPLICA_PORT + i
: "${EXPLORER_PORT:=30001}"       # explorer server (pool build, or online explorer)
: "${SGLANG_MEM_FRACTION:=0.85}"
: "${SGLANG_EXTRA_ARGS:=}"        # more sglang.launch_server arguments for every server
: "${ROUTER_EXTRA_ARGS:=}"        # more sglang_router.launch_router arguments
: "${WEIGHT_SYNC:=distributed}"   # distributed (NCCL broadcast) | disk
: "${NCCL_ALIGN:=1}"              # WEIGHT_SYNC=distributed: where the trainer's torch and the servers' load
                                  # different NCCL versions, both load the newer one (LD_PRELOAD); 0: leave them
: "${BUILD_POOL:=auto}"           # auto: build the explorer pool unless POOL holds a complete one; 0: never
: "${STARTUP_MINUTES:=15}"        # how long to wait for a server to answer
: "${REQUEST_TIMEOUT_S:=3600}"    # one generate request, queueing behind the step's others (trainer and router)
: "${SHUTDOWN_TIMEOUT_S:=600}"    # how long torchrun lets the trainer save before SIGKILL when it acts on a
                                  # SIGTERM itself: torch releases whose torchrun lacks --signals-to-handle (see
                                  # run_training); those that also lack TORCH_ELASTIC_SHUTDOWN_TIMEOUT give 30 s
: "${ROLLOUT_WAIT_MINUTES:=720}"  # ROLE=train: how long to wait for the rollout side (its first run
                                  # builds the explorer pool before serving)
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
    -h|--help) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    *=*) EXTRA_OVERRIDES+=("$arg") ;;
    *) echo "unknown argument: $arg (use --dry-run or key=value overrides)" >&2; exit 2 ;;
  esac
done

fail() { echo "error: $*" >&2; exit 2; }
case "$ROLE" in all|rollout|train) ;; *) fail "ROLE=$ROLE: use all, rollout or train" ;; esac
case "$WEIGHT_SYNC" in
  distributed|disk) ;;
  tensor) fail "WEIGHT_SYNC=tensor passes CUDA memory handles, so the SGLang server must run on the trainer's own" \
               "GPU; these launchers give them separate GPUs: use WEIGHT_SYNC=distributed (or disk)" ;;
  *) fail "WEIGHT_SYNC=$WEIGHT_SYNC: use distributed or disk" ;;
esac
[ "$ROLLOUT_GPUS" -le "$GPUS_PER_NODE" ] || fail "ROLLOUT_GPUS=$ROLLOUT_GPUS > GPUS_PER_NODE=$GPUS_PER_NODE"
IFS=, read -ra ROLLOUT_NODES <<< "$ROLLOUT_ADDR"
ROLLOUT_HEAD=${ROLLOUT_NODES[0]}  # hosts the router, the online explorer and the pool build
if [ "${#ROLLOUT_NODES[@]}" -gt 1 ] && [ "$ROLE" = all ]; then
  fail "ROLLOUT_ADDR lists ${#ROLLOUT_NODES[@]} rollout nodes: run them with ROLE=rollout" \
       "ROLLOUT_RANK=0..$((${#ROLLOUT_NODES[@]} - 1)) and the training nodes with ROLE=train"
fi
[ "$ROLLOUT_RANK" -ge 0 ] 2>/dev/null && [ "$ROLLOUT_RANK" -lt "${#ROLLOUT_NODES[@]}" ] || \
  fail "ROLLOUT_RANK=$ROLLOUT_RANK is not a place in ROLLOUT_ADDR=$ROLLOUT_ADDR (0..$((${#ROLLOUT_NODES[@]} - 1)))"
replica_gpus() {  # replica_gpus NODE: learner-replica GPUs on rollout node NODE (node 0 also holds the explorer)
  if [ "$1" = 0 ]; then echo $((ROLLOUT_GPUS - EXPLORER_GPUS)); else echo "$ROLLOUT_GPUS"; fi
}
REPLICA_URLS=()  # every learner-replica server of the job, the same list on every node
for node in "${!ROLLOUT_NODES[@]}"; do
  gpus_left=$(replica_gpus "$node")
  [ "$gpus_left" -gt 0 ] && [ $((gpus_left % SGLANG_TP)) = 0 ] || \
    fail "rollout node $node has $gpus_left GPUs (ROLLOUT_GPUS - EXPLORER_GPUS on node 0) for learner replicas of" \
         "SGLANG_TP=$SGLANG_TP; give the replicas a positive multiple of SGLANG_TP"
  for i in $(seq 0 $((gpus_left / SGLANG_TP - 1))); do
    REPLICA_URLS+=("http://${ROLLOUT_NODES[$node]}:$((REPLICA_PORT + i))")
  done
done
REPLICA_GPUS=$(replica_gpus "$ROLLOUT_RANK")  # on this node
NUM_REPLICAS=$((REPLICA_GPUS / SGLANG_TP))
SERVES_ROLLOUTS=0 IS_ROLLOUT_HEAD=0
if [ "$ROLE" = rollout ] || { [ "$ROLE" = all ] && [ "$NODE_RANK" = 0 ]; }; then SERVES_ROLLOUTS=1; fi
if [ "$SERVES_ROLLOUTS" = 1 ] && [ "$ROLLOUT_RANK" = 0 ]; then IS_ROLLOUT_HEAD=1; fi
if [ "$ROLE" = all ] && [ "$NNODES" -gt 1 ]; then
  echo "note: with NNODES>1 node 0 trains on fewer GPUs than the others; for equal nodes run a rollout" \
       "node with ROLE=rollout and the training nodes with ROLE=train ROLLOUT_ADDR=<rollout node>" >&2
fi
TRAIN_GPUS=$GPUS_PER_NODE
if [ "$SERVES_ROLLOUTS" = 1 ]; then TRAIN_GPUS=$((GPUS_PER_NODE - ROLLOUT_GPUS)); fi
if [ "$ROLE" = all ] && [ "$TRAIN_GPUS" -le 0 ]; then
  fail "node 0 has no GPUs left to train (GPUS_PER_NODE=$GPUS_PER_NODE, ROLLOUT_GPUS=$ROLLOUT_GPUS): run" \
       "ROLE=rollout on one node and ROLE=train ROLLOUT_ADDR=<that node> on the training nodes, or lower ROLLOUT_GPUS"
fi
FIRST_ROLLOUT_GPU=$((GPUS_PER_NODE - ROLLOUT_GPUS))
if [ "$ROLE" = rollout ]; then FIRST_ROLLOUT_GPU=0; fi
if [ "${#REPLICA_URLS[@]}" -gt 1 ]; then
  LEARNER_URL=http://$ROLLOUT_HEAD:$ROUTER_PORT LEARNER_READY=/readiness
else
  LEARNER_URL=${REPLICA_URLS[0]} LEARNER_READY=/health
fi
PIDS=()
STARTING=()  # "name url pid" of processes spawned but not yet seen ready

run() {  # print, then run unless --dry-run
  echo "+ $*"
  if [ "$DRY_RUN" = 0 ]; then "$@"; fi
}

gpus() {  # gpus FIRST COUNT: a CUDA_VISIBLE_DEVICES list
  seq -s, "$1" $(($1 + $2 - 1))
}

wait_ready() {  # wait_ready MINUTES "NAME URL [PID]"...: until every URL answers; fail at once if a PID
               # exits, or when MINUTES pass
  local minutes=$1; shift
  local pending=("$@") left entry name url pid tick
  for tick in $(seq 1 $((minutes * 12))); do
    left=()
    for entry in "${pending[@]}"; do
      read -r name url pid <<< "$entry"
      if curl -sf "$url" > /dev/null; then continue; fi
      if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then echo "$name exited; see $RUN_DIR/$name.log" >&2; exit 1; fi
      left+=("$entry")
    done
    pending=("${left[@]}")
    if [ "${#pending[@]}" = 0 ]; then return; fi
    if [ $((tick % 120)) = 0 ]; then echo "still waiting for ${pending[*]%% *} ($((tick / 12)) of $minutes minutes)"; fi
    sleep 5
  done
  for entry in "${pending[@]}"; do
    read -r name url pid <<< "$entry"
    echo "$name did not answer at $url in $minutes minutes${pid:+; see $RUN_DIR/$name.log}" >&2
  done
  exit 1
}

spawn() {  # spawn NAME READY_URL COMMAND...: run in the background, log to RUN_DIR/NAME.log
  local name=$1 url=$2; shift 2
  echo "+ $* > $RUN_DIR/$name.log 2>&1 &"
  if [ "$DRY_RUN" = 1 ]; then return; fi
  mkdir -p "$RUN_DIR"
  "$@" > "$RUN_DIR/$name.log" 2>&1 &
  PIDS+=($!)
  STARTING+=("$name $url $!")
}

wait_started() {  # until every spawned process answers: they start side by side, each on its own GPUs
  if [ "${#STARTING[@]}" -gt 0 ]; then wait_ready "$STARTUP_MINUTES" "${STARTING[@]}"; fi
  STARTING=()
}

spawn_server() {  # spawn_server NAME PORT MODEL FIRST_GPU NUM_GPUS TP (--sleep-on-idle: an idle scheduler
                  # would spin a CPU core; the replica idles through every training phase)
  local name=$1 port=$2 model=$3 first=$4 count=$5 tp=$6
  spawn "$name" "http://127.0.0.1:$port/health" env CUDA_VISIBLE_DEVICES="$(gpus "$first" "$count")" \
    "${SERVER_ENV[@]}" "$SGLANG_PYTHON" -m sglang.launch_server --model-path "$model" --host 0.0.0.0 \
    --port "$port" --tp "$tp" --dp-size $((count / tp)) --mem-fraction-static "$SGLANG_MEM_FRACTION" \
    --sleep-on-idle $SGLANG_EXTRA_ARGS
}

# The weight broadcast puts the trainer and the servers in one NCCL group, and NCCL refuses a peer of another
# version ("Mismatched NCCL version"). The servers' torch comes from SGLang's pins, the trainer's from the
# container, so their NCCL versions can differ: then both load the newer one. It serves a torch built against the
# older one too; the other way round fails (torch 2.14 with NCCL 2.28: "undefined symbol: ncclCommResume").
TRAINER_ENV=() SERVER_ENV=()  # env assignments for the trainer's and the servers' commands

nccl_of() {  # nccl_of PYTHON [PRELOAD]: "VERSION LIBRARY" of the NCCL that PYTHON's torch loads; nothing if none
  local line
  line=$(LD_PRELOAD="${2:-${LD_PRELOAD:-}}" timeout 120 "$1" "$LAUNCH_LIB/nccl_probe.py" 2>/dev/null | grep '^nccl ') \
    || return 0
  echo "${line#nccl }"
}

align_nccl() {  # sets TRAINER_ENV or SERVER_ENV so that both sides of the weight broadcast load one NCCL
  if [ "$WEIGHT_SYNC" != distributed ] || [ "$NCCL_ALIGN" = 0 ]; then return; fi
  local ours ours_lib theirs theirs_lib newer lib python check
  read -r ours ours_lib <<< "$(nccl_of "$PYTHON")"
  read -r theirs theirs_lib <<< "$(nccl_of "$SGLANG_PYTHON")"
  if [ -z "$ours" ] || [ -z "$theirs" ] || [ "$ours" = "$theirs" ]; then return; fi  # a side without NCCL: a CPU run
  newer=$(printf '%s\n' "$ours" "$theirs" | sort -V | tail -n 1)
  if [ "$newer" = "$theirs" ]; then lib=$theirs_lib python=$PYTHON; else lib=$ours_lib python=$SGLANG_PYTHON; fi
  if [ "$lib" != - ]; then read -r check _ <<< "$(nccl_of "$python" "$lib")"; fi
  if [ "$lib" = - ] || [ "${check:-}" != "$newer" ]; then
    fail "the trainer's torch ($PYTHON) loads NCCL $ours and the SGLang servers' ($SGLANG_PYTHON) NCCL $theirs;" \
         "NCCL refuses to connect two versions, and LD_PRELOAD could not give $python NCCL $newer. Install one" \
         "NCCL version for both, or use WEIGHT_SYNC=disk"
  fi
  echo "note: the trainer's torch loads NCCL $ours and the SGLang servers' $theirs; both load $newer ($lib) for" \
       "the weight broadcast (NCCL_ALIGN=0: leave them)" >&2
  local preload="LD_PRELOAD=$lib${LD_PRELOAD:+:$LD_PRELOAD}"
  if [ "$python" = "$PYTHON" ]; then TRAINER_ENV=("$preload"); else SERVER_ENV=("$preload"); fi
}

run_training() {  # run_training COMMAND...: like run, for torchrun. A SIGTERM or Ctrl-C to this launcher goes
                  # on to the trainer processes as one SIGTERM, and the launcher waits until they have saved and
                  # torchrun has exited.
  # A foreground torchrun would not do: bash would exit at once, leaving torchrun orphaned (docker stop, kill)
  # or killed with the rest of the Slurm step (which ends when its task, this launcher, exits). torchrun
  # itself ignores SIGTERM (Slurm signals every process): its workers stop on their own and exit 0, where
  # torchrun would pass the signal on, wait, then exit 1 with a traceback. torchrun and its workers ignore
  # SIGINT, which Ctrl-C sends to every process of the terminal's job: the workers would take it for a second
  # stop. A second SIGTERM or Ctrl-C kills the workers.
  echo "+ $*"
  if [ "$DRY_RUN" = 1 ]; then return; fi
  (trap '' INT TERM; exec "$@") &
  TRAINING_PID=$! STOPS=0 STOPPED_BY=
  trap 'stop_training TERM' TERM
  trap 'stop_training INT' INT
  while kill -0 "$TRAINING_PID" 2>/dev/null; do wait "$TRAINING_PID" || true; done
  local status=0
  wait "$TRAINING_PID" || status=$?
  trap - TERM INT
  if [ "$STOPS" -gt 0 ]; then
    local latest
    latest=$(ls -d "$CKPT_DIR"/step_* 2>/dev/null | tail -n 1) || true
    echo "launcher: stopped (torchrun exit status $status); latest checkpoint: ${latest:-none} (the same command" \
         "resumes from it)" >&2
  fi
  # after Ctrl-C end as Ctrl-C ends a program (the EXIT trap still runs): a script running this one stops too
  if [ "$STOPPED_BY" = INT ]; then kill -INT $$; fi
  return "$status"
}

stop_training() {  # stop_training SIGNAL: what the launcher got
  STOPS=$((STOPS + 1))
  STOPPED_BY=${STOPPED_BY:-$1}
  local signal=TERM
  if [ "$STOPS" = 1 ]; then
    echo "launcher: stopping; the trainer finishes or interrupts its step, saves a checkpoint and exits" \
         "(Ctrl-C or SIGTERM again: kill it without saving)" >&2
  else
    echo "launcher: killing the trainer" >&2
    signal=KILL
  fi
  # torchrun's workers (pgrep may be missing, e.g. in a minimal container: then the kernel's list)
  kill -"$signal" $(pgrep -P "$TRAINING_PID" 2>/dev/null || cat /proc/"$TRAINING_PID"/task/*/children 2>/dev/null) \
    2>/dev/null || true
}

run_tracked() {  # like run, for a foreground step the EXIT trap must stop too (the pool build: a SIGTERM to
                 # the launcher would otherwise leave it running against servers that are gone)
  echo "+ $*"
  if [ "$DRY_RUN" = 1 ]; then return; fi
  "$@" &
  PIDS+=($!)
  wait $!
}

stop_servers() {  # also the EXIT trap: SIGTERM to what this launcher started, SIGKILL to what is left after 30 s
  if [ "${#PIDS[@]}" = 0 ]; then return; fi
  kill "${PIDS[@]}" 2>/dev/null || true
  for _ in $(seq 60); do
    kill -0 "${PIDS[@]}" 2>/dev/null || break  # until none is left (so their GPUs are free when we exit)
    sleep 0.5
  done
  kill -KILL "${PIDS[@]}" 2>/dev/null || true
  PIDS=()
}
trap stop_servers EXIT

pool_complete() {  # an unfinished build (a job that ran out of time) has a manifest too: rerunning resumes it
  [ -f "$POOL/manifest.json" ] && "$PYTHON" -c \
    'import json, sys; sys.exit(json.load(open(sys.argv[1])).get("status") != "complete")' "$POOL/manifest.json"
}

start_rollout_side() {  # steps 1-3 of the header; $@: the trainer's overrides (for the pool build)
  if [ "$IS_ROLLOUT_HEAD" = 1 ] && [ -n "${EXPLORER:-}" ] && [ "$EXPLORER_GPUS" = 0 ] && [ "$BUILD_POOL" != 0 ] \
     && ! pool_complete; then
    spawn_server explorer "$EXPLORER_PORT" "$EXPLORER" "$FIRST_ROLLOUT_GPU" "$ROLLOUT_GPUS" 1
    wait_started
    run_tracked $S2L pool build --config "$CONFIG" --explorer-url "http://127.0.0.1:$EXPLORER_PORT" "$@"
    stop_servers
  fi
  # the explorer, every replica and the router start at once; the router waits for the replicas
  if [ "$IS_ROLLOUT_HEAD" = 1 ] && [ "$EXPLORER_GPUS" -gt 0 ]; then
    spawn_server explorer "$EXPLORER_PORT" "$EXPLORER" $((FIRST_ROLLOUT_GPU + REPLICA_GPUS)) "$EXPLORER_GPUS" 1
  fi
  for i in $(seq 0 $((NUM_REPLICAS - 1))); do
    spawn_server "learner_replica_$i" $((REPLICA_PORT + i)) "$LEARNER" $((FIRST_ROLLOUT_GPU + i * SGLANG_TP)) \
      "$SGLANG_TP" "$SGLANG_TP"
  done
  if [ "$IS_ROLLOUT_HEAD" = 1 ] && [ "${#REPLICA_URLS[@]}" -gt 1 ]; then  # also the other nodes' servers
    spawn router "http://127.0.0.1:$ROUTER_PORT/readiness" "$SGLANG_PYTHON" -m sglang_router.launch_router \
      --host 0.0.0.0 --port "$ROUTER_PORT" --policy round_robin --worker-urls "${REPLICA_URLS[@]}" \
      --worker-startup-timeout-secs $((STARTUP_MINUTES * 60)) --request-timeout-secs "$REQUEST_TIMEOUT_S" \
      $ROUTER_EXTRA_ARGS
  fi
  wait_started
}

launch() {
  local overrides=(
    "model.path=$LEARNER" "data.path=$DATA" "parallel.tp=$TP" "parallel.pp=$PP"
    "parallel.micro_batch_size=$MICRO_BATCH_SIZE" "parallel.micro_batch_tokens=$MICRO_BATCH_TOKENS"
    "parallel.recompute=$RECOMPUTE"
    "rollout.engine=sglang" "rollout.weight_sync=$WEIGHT_SYNC"
    "rollout.learner_url=$LEARNER_URL" "rollout.request_timeout_s=$REQUEST_TIMEOUT_S"
    "checkpoint.dir=$CKPT_DIR" "checkpoint.resume=auto"
    "logging.run_dir=$RUN_DIR" "logging.wandb=$WANDB" "logging.wandb_mode=$WANDB_MODE"
  )
  if [ "${#REPLICA_URLS[@]}" -gt 1 ]; then
    overrides+=("rollout.learner_worker_urls=[$(IFS=,; echo "${REPLICA_URLS[*]}")]")
  fi
  if [ -n "${EXPLORER:-}" ]; then overrides+=("explorer.model_path=$EXPLORER" "explorer.pool_path=$POOL"); fi
  if [ -n "${EXPLORER:-}" ] && [ "$EXPLORER_GPUS" -gt 0 ]; then
    overrides+=("explorer.mode=online" "explorer.url=http://$ROLLOUT_HEAD:$EXPLORER_PORT")
  fi
  if [ -n "$FP8" ]; then overrides+=("model.fp8.recipe=$FP8"); fi
  overrides+=("${EXTRA_OVERRIDES[@]}")

  align_nccl
  if [ "$SERVES_ROLLOUTS" = 1 ]; then start_rollout_side "${overrides[@]}"; fi
  if [ "$ROLE" = rollout ]; then
    echo "rollout node $ROLLOUT_RANK up: $NUM_REPLICAS learner-replica servers (the job's learner replica:" \
         "$LEARNER_URL); serving until stopped"
    if [ "$DRY_RUN" = 0 ]; then wait -n "${PIDS[@]}" || true; echo "a rollout server exited; see $RUN_DIR/*.log" >&2; exit 1; fi
    return
  fi
  if [ "$ROLE" = train ]; then
    echo "+ waiting for the rollout side at $LEARNER_URL$LEARNER_READY"
    if [ "$DRY_RUN" = 0 ]; then wait_ready "$ROLLOUT_WAIT_MINUTES" "rollout_side $LEARNER_URL$LEARNER_READY"; fi
  fi
  run_training env CUDA_VISIBLE_DEVICES="$(gpus 0 "$TRAIN_GPUS")" TORCH_ELASTIC_SHUTDOWN_TIMEOUT="$SHUTDOWN_TIMEOUT_S" \
    PET_SIGNALS_TO_HANDLE=SIGHUP,SIGQUIT "${TRAINER_ENV[@]}" \
    "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" \
    --node-rank "$NODE_RANK" --nproc-per-node "$TRAIN_GPUS" --master-addr "$MASTER_ADDR" \
    --master-port "$MASTER_PORT" -m megatron_s2l.cli train --config "$CONFIG" "${overrides[@]}"
}
