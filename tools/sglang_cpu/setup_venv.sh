#!/usr/bin/env bash
# Builds the separate virtual environment that runs real SGLang 0.5.23 servers (and sglang-router 0.3.2)
# on a CPU-only machine, for `make test-sglang` and local experiments. Idempotent: a second run only
# checks a stamp and returns in well under a second.
#
# Why a separate venv: SGLang pins torch==2.14.1 and transformers==5.19.0, the project venv has the CPU
# torch 2.13 and transformers 5.2x; the trainer only talks to SGLang over HTTP (and gloo), so the two
# never share a process. Why not `pip install sglang`: the wheel requires ~40 CUDA-only packages
# (flashinfer, sglang-kernel, deep-gemm, ...) that cannot be installed or imported without a GPU. So:
#   1. torch 2.14.1 + torchvision 0.29.1, the builds SGLang pins (PyPI's Linux torch is a CUDA build;
#      it imports and runs on the CPU; a CPU torch would need a CPU torchvision, which PyPI lacks);
#   2. `sglang==0.5.23 --no-deps` plus the runtime packages its CPU code path actually imports;
#   3. our placeholder `sgl_kernel` (tools/sglang_cpu/sgl_kernel_stub) goes first on PYTHONPATH of the
#      server process at launch time (megatron_s2l/rollout/sglang_launch.py); it is not installed here.
#
# Location: ${S2L_SGLANG_VENV:-$HOME/.cache/megatron-s2l/sglang-0.5.23} (outside the clone, ~6.5 GB).
# Tests and the launcher find the venv's python through the same variable and default.
set -euo pipefail

VENV="${S2L_SGLANG_VENV:-$HOME/.cache/megatron-s2l/sglang-0.5.23}"
PYTHON="${PYTHON:-python3}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STUB_DIR="$HERE/sgl_kernel_stub"

# Everything installed, pinned where SGLang pins it. Changing this list changes the stamp (a rebuild).
TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
RUNTIME_DEPS=(
  sglang-router==0.3.2
  transformers==5.19.0 tokenizers==0.23.2 sentencepiece==0.2.1 safetensors tiktoken
  compressed-tensors==0.18.0 xgrammar==0.2.7 apache-tvm-ffi==0.1.11 soundfile==0.13.1
  openai==2.8.0 openai-harmony==0.0.4 blobfile==3.0.0 gguf
  aiohttp fastapi "uvicorn>=0.51" uvloop orjson msgspec "pyzmq>=25.1.2" psutil setproctitle requests
  python-multipart pybase64 "prometheus-client>=0.20.0" watchfiles
  numpy scipy pillow pydantic einops interegular packaging partial_json_parser regex tqdm xxhash
  zstandard dill jsonschema IPython
)
SGLANG_PIN=sglang==0.5.23

stamp_of() {
  printf '%s\n' "${TORCH_PINS[@]}" "${RUNTIME_DEPS[@]}" "$SGLANG_PIN" | cksum | cut -d' ' -f1
}
STAMP="$VENV/.s2l-sglang-ready-$(stamp_of)"

if [[ -f "$STAMP" && -x "$VENV/bin/python" ]]; then
  echo "[sglang venv] ready at $VENV (stamp $(basename "$STAMP")); nothing to do"
  exit 0
fi

mkdir -p "$(dirname "$VENV")"
exec 9>"$VENV.lock"
if ! flock -w 1800 9; then  # two `make test-sglang` at once: the second waits for the first
  echo "[sglang venv] could not lock $VENV.lock within 30 min; is another setup stuck?" >&2
  exit 1
fi
if [[ -f "$STAMP" ]]; then
  echo "[sglang venv] ready at $VENV (built by a concurrent run)"
  exit 0
fi

start=$(date +%s)
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), "SGLang 0.5.23 wheels here need Python 3.11, found " + sys.version' \
  || { echo "[sglang venv] set PYTHON=/path/to/python3.11" >&2; exit 1; }

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[sglang venv] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
# Quiet pip, keeping its exit status. Dropped: notes about this machine's local package index, and pip's
# complaint that sglang's CUDA-only requirements are missing (skipped on purpose, see step 2).
pip_install() {
  "$VPY" -m pip install --disable-pip-version-check -q "$@" 2>&1 \
    | { grep -v -E "is ignored|^\s*$|^sglang 0\.5\.23 (requires|has requirement)|dependency resolver does not" || true; }
  return "${PIPESTATUS[0]}"
}

echo "[sglang venv] step 1/3: ${TORCH_PINS[*]} + runtime deps (${#RUNTIME_DEPS[@]} packages)"
pip_install "${TORCH_PINS[@]}" "${RUNTIME_DEPS[@]}"
echo "[sglang venv] step 2/3: $SGLANG_PIN --no-deps (its CUDA-only requirements are skipped on purpose)"
pip_install --no-deps "$SGLANG_PIN"

echo "[sglang venv] step 3/3: smoke import of the server with the sgl_kernel placeholder"
PYTHONPATH="$STUB_DIR" SGLANG_USE_CPU_ENGINE=1 OMP_NUM_THREADS=1 "$VPY" -W ignore -c '
import sgl_kernel, torch, sglang, sglang_router
assert getattr(sgl_kernel, "IS_PLACEHOLDER", False), "the real sgl_kernel shadows the placeholder"
import sglang.srt.entrypoints.http_server, sglang.srt.models.qwen3  # the modules a CPU server imports
assert torch.__version__.startswith("2.14.1"), torch.__version__
print("[sglang venv] imports ok: sglang", sglang.__version__, "torch", torch.__version__)
' 2>&1 | grep -v -E "UserWarning|warnings.warn" \
  || { echo "[sglang venv] smoke import failed; see the error above" >&2; exit 1; }
"$VPY" -c 'import sglang, torch; assert sglang.__version__ == "0.5.23" and torch.__version__.startswith("2.14.1")'

rm -f "$VENV"/.s2l-sglang-ready-*
touch "$STAMP"
echo "[sglang venv] ready at $VENV in $(( $(date +%s) - start )) s"
