# megatron-s2l on NVIDIA's PyTorch container (CUDA, cuDNN, NCCL, Transformer Engine, apex, flash-attn).
#
#   docker build -t megatron-s2l:latest .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#     -v /models:/models -v /data:/data -v $PWD/runs:/opt/megatron-s2l/runs megatron-s2l:latest \
#     bash examples/run_s2l_8b.sh --dry-run
#
# Versions are pinned here and in setup.py; tests/unit/test_packaging.py checks that they agree.
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.10-py3
FROM ${BASE_IMAGE}

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 \
    S2L_SGLANG_VENV=/opt/sglang SGLANG_PYTHON=/opt/sglang/bin/python

# The rollout side lives in its own virtualenv: SGLang 0.5.23 pins torch 2.14.1 and its own kernels,
# while the learner uses the container's torch/TE/apex build. The servers are separate processes
# anyway; they talk to the learner over HTTP and NCCL (the launchers make both sides load one NCCL version:
# examples/lib/launch.sh, NCCL_ALIGN). PIP_CONSTRAINT is cleared for this venv only: the
# image's constraint file pins its own torch build, which SGLang's torch would conflict with. The stamp
# file marks the venv complete (megatron_s2l.rollout.sglang_launch looks for it).
RUN python -m venv /opt/sglang && \
    PIP_CONSTRAINT= /opt/sglang/bin/pip install --no-cache-dir "sglang==0.5.23" "sglang-router==0.3.2" && \
    touch /opt/sglang/.s2l-sglang-ready-docker

# The learner side: megatron-core on the container's torch (TE and apex come with the image).
RUN pip install --no-cache-dir "megatron-core==0.16.1"

WORKDIR /opt/megatron-s2l
COPY setup.py pyproject.toml README.md ./
COPY megatron_s2l ./megatron_s2l
RUN pip install --no-cache-dir -e ".[logging]"
COPY examples ./examples
COPY tools ./tools
COPY benchmarks ./benchmarks
COPY tests ./tests

CMD ["s2l", "--help"]
