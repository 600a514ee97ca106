"""The CPU adapter: every symbol it patches still exists, and megatron-core runs through it."""

from __future__ import annotations

import importlib

import torch

from megatron_s2l import platform


def test_every_patched_symbol_exists_in_installed_versions():
    for module_name, attribute in platform.PATCHED_SYMBOLS:
        module = importlib.import_module(module_name)
        assert hasattr(module, attribute), f"{module_name}.{attribute} moved; update platform.py"


def test_megatron_core_still_calls_what_we_patch():
    """If megatron-core stops using these, the adapter entry is dead and should go."""
    import inspect

    from megatron.core.models.common.embeddings import rotary_pos_embedding
    from megatron.core.tensor_parallel import random

    assert "torch.cuda.current_device()" in inspect.getsource(rotary_pos_embedding)
    assert "_get_cuda_rng_state" in inspect.getsource(random.CudaRNGStatesTracker.fork)


def test_cuda_placement_is_redirected_to_cpu(mcore_world1):
    assert torch.empty(3, device="cuda").device.type == "cpu"
    assert torch.zeros(2).cuda().device.type == "cpu"
    assert torch.ones(2).to("cuda").device.type == "cpu"
    assert torch.ones(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.ones(2).to(torch.float64).dtype == torch.float64  # dtype moves are untouched
    assert platform.device().type == "cpu"


def test_rng_tracker_forks_reproducibly(mcore_world1):
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(7)
    with get_cuda_rng_tracker().fork():
        first = torch.rand(4)
    model_parallel_cuda_manual_seed(7)
    with get_cuda_rng_tracker().fork():
        second = torch.rand(4)
    assert torch.equal(first, second)
