#!/usr/bin/env bash
# Start one SGLang 0.5.23 server or an sglang-router 0.3.2 in the foreground (for clusters, tmux, slurm).
# The trainer only needs the URLs: rollout.learner_url (a server or the router) and explorer.url.
#
#   tools/launch_sglang.sh server MODEL_PATH [PORT] [extra sglang.launch_server args...]
#   tools/launch_sglang.sh router PORT WORKER_URL [WORKER_URL...]
#
# Examples (one 8-GPU node: learner replica on GPUs 0-3, frozen explorer on 4-7):
#   CUDA_VISIBLE_DEVICES=0,1,2,3 tools/launch_sglang.sh server /ckpt/Qwen3-8B 30000 --tp 4
#   CUDA_VISIBLE_DEVICES=4,5,6,7 tools/launch_sglang.sh server /ckpt/Qwen3-1.7B 30001 --tp 4
#   tools/launch_sglang.sh router 30010 http://node1:30000 http://node2:30000
#
# Environment:
#   S2L_SGLANG_PYTHON  python with sglang installed (default: the venv of tools/sglang_cpu/setup_venv.sh
#                      if it exists, else python3 on PATH, e.g. the NGC/SGLang container's)
#   SGLANG_HOST        address to listen on (default 0.0.0.0 on GPU so trainers on other nodes can reach
#                      it, 127.0.0.1 on CPU)
#   SGLANG_API_KEY     passed as --api-key (give the trainer the same key: rollout.api_key)
# Without CUDA (development machines) it adds what SGLang needs on a CPU: our sgl_kernel placeholder
# first on PYTHONPATH, SGLANG_USE_CPU_ENGINE=1, torch_native attention, no overlap scheduler, a small KV
# pool, fp32. Weight updates by "distributed" need the trainer to reach the server's node on a free port
# (the trainer hosts the rendezvous: set master_address to an address of the trainer's node).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${S2L_SGLANG_VENV:-$HOME/.cache/megatron-s2l/sglang-0.5.23}"
if [[ -n "${S2L_SGLANG_PYTHON:-}" ]]; then PY="$S2L_SGLANG_PYTHON"
elif [[ -x "$VENV/bin/python" ]]; then PY="$VENV/bin/python"
else PY=python3; fi

usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[[ $# -ge 2 ]] || usage
what="$1"; shift

has_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

case "$what" in
  server)
    model="$1"; port="${2:-30000}"; shift; [[ $# -gt 0 ]] && shift
    args=(--model-path "$model" --port "$port" --sleep-on-idle)  # idle: no core spinning in the scheduler
    [[ -n "${SGLANG_API_KEY:-}" ]] && args+=(--api-key "$SGLANG_API_KEY")
    if has_cuda; then
      args+=(--host "${SGLANG_HOST:-0.0.0.0}")
    else
      export PYTHONPATH="$HERE/sglang_cpu/sgl_kernel_stub${PYTHONPATH:+:$PYTHONPATH}"
      export SGLANG_USE_CPU_ENGINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
      args+=(--host "${SGLANG_HOST:-127.0.0.1}" --device cpu --attention-backend torch_native
             --disable-overlap-schedule --max-total-tokens 16384 --dtype float32)
    fi
    echo "[launch_sglang] $PY -m sglang.launch_server ${args[*]} $*" >&2
    exec "$PY" -m sglang.launch_server "${args[@]}" "$@"
    ;;
  router)
    port="$1"; shift
    [[ $# -ge 1 ]] || usage
    echo "[launch_sglang] $PY -m sglang_router.launch_router --port $port --worker-urls $*" >&2
    # a generate request may queue behind a whole rollout step (the router's default cuts it at 1800 s)
    exec "$PY" -m sglang_router.launch_router --host "${SGLANG_HOST:-0.0.0.0}" --port "$port" \
      --request-timeout-secs "${REQUEST_TIMEOUT_S:-3600}" --worker-urls "$@"
    ;;
  *) usage ;;
esac
