"""Fixtures shared by all test tiers."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def mcore_world1():
    """A one-process world (gloo on CPU) with megatron-core parallel state at TP=PP=1."""
    from megatron_s2l import platform

    dims = platform.init_distributed(1, 1, seed=1234)
    yield dims
    platform.destroy_distributed()


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    """A small random Qwen3 HF checkpoint with the real Qwen3 tokenizer, made locally."""
    from tests.utils import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen3"), family="qwen3", seed=0)


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """Toy explorer + learner + data (small and quick), and an explorer pool built with `s2l pool build`.
    Made in a process with one torch thread, so the same machine makes the same world bit for bit (the
    golden-metrics test relies on it)."""
    from tests.utils import make_toy_world_in_one_thread

    return make_toy_world_in_one_thread(tmp_path_factory.mktemp("toy"), explorer_steps=300, learner_steps=60,
                                  num_train=48, num_test=16)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (GPU tests run on a GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
