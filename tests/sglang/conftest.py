"""Real SGLang 0.5.23 servers on the CPU, shared by the tests in this folder.

Servers take 20-60 s to start on 2 cores, so they are started once: the main server for the whole
session (generate, log-prob, pause and weight-sync tests take turns on it; each test sets up the weights
it checks), the router's second worker beside it. Every launch gets a free port, a startup timeout, a
hard lifetime and is stopped at teardown, also when a test fails. Without the SGLang venv (plain
`make test`) these tests skip; `make test-sglang` builds the venv first and runs them for real.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_s2l.rollout import sglang_launch
from tests.utils import make_tiny_model

SERVER_LIFETIME_S = 1800  # a server outliving a killed pytest dies by itself after this
MODEL_SEEDS = {"A": 0, "B": 1, "C": 2, "D": 3}  # four tiny Qwen3s with the same shape, different weights
torch.set_num_threads(1)  # one torch thread per process: the servers use the other core


def pytest_collection_modifyitems(config, items):
    if sglang_launch.sglang_python() is not None:
        return
    skip = pytest.mark.skip(reason=f"no SGLang venv at {sglang_launch.sglang_venv()}: run `make test-sglang` "
                                   "(it builds one with tools/sglang_cpu/setup_venv.sh)")
    for item in items:
        if item.get_closest_marker("sglang"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny Qwen3 checkpoints with the real tokenizer. A large init makes the next-token distribution
    peaked, so greedy decoding is far from ties and SGLang and transformers agree on every token."""
    root = tmp_path_factory.mktemp("sglang_models")
    return {name: make_tiny_model(root / name, family="qwen3", seed=seed, num_hidden_layers=2,
                                  initializer_range=0.5, max_position_embeddings=4096)
            for name, seed in MODEL_SEEDS.items()}


def start_server(model_path: Path, log_dir: Path, wait: bool = True) -> sglang_launch.ServerHandle:
    # fp32 so that log-probs and greedy tokens can be compared with the trainer's fp32 math
    return sglang_launch.launch_server(model_path, dtype="float32", log_dir=log_dir, startup_timeout_s=300,
                                       max_lifetime_s=SERVER_LIFETIME_S, wait=wait)


@pytest.fixture(scope="session")
def server_pair(models, tmp_path_factory):
    """Servers for models A and B, started side by side (a startup is mostly one core's Python imports)."""
    log_dir = tmp_path_factory.mktemp("sglang_logs")
    handles = [start_server(models[name], log_dir, wait=False) for name in ("A", "B")]
    sglang_launch.wait_ready(*handles)
    yield handles
    for handle in handles:
        handle.stop()


@pytest.fixture(scope="session")
def main_server(server_pair):
    """The server most tests share."""
    return server_pair[0]


@pytest.fixture(scope="session")
def second_server(server_pair):
    """The router's second worker (the router tests' last test stops it)."""
    return server_pair[1]
