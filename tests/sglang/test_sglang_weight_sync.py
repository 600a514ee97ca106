"""Weight updates on a real server by disk, by tensor and by distributed broadcast (gloo): each must
switch greedy decoding to the new weights' (as transformers decodes them) and bump /model_info's
weight_version. The distributed update runs in a process that already has a default process group
(as under torchrun), which it must leave alone."""

from __future__ import annotations

import asyncio

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from megatron_s2l.rollout.sglang import SGLangEngine
from megatron_s2l.rollout.types import SamplingParams
from megatron_s2l.rollout.weight_broadcast import iter_buckets
from tests.sglang.helpers import hf_greedy, megatron_model

pytestmark = pytest.mark.sglang

PROMPT = (785, 6722, 315, 9625, 374)
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)


async def _greedy_and_version(engine: SGLangEngine) -> tuple[list[int], str]:
    gen = (await engine.generate([list(PROMPT)], 1, GREEDY))[0][0]
    return gen.response_ids, await engine.weight_version()


def _check_switched(engine: SGLangEngine, model_path, version: str, before: list[int]) -> None:
    greedy, served = asyncio.run(_greedy_and_version(engine))
    expected = hf_greedy(model_path, PROMPT, GREEDY.max_new_tokens)
    assert expected != before  # the update is visible, not a no-op
    assert greedy == expected and served == version


def _current_greedy(engine: SGLangEngine) -> list[int]:
    return asyncio.run(_greedy_and_version(engine))[0]


def test_update_from_disk(main_server, models):
    engine = SGLangEngine(main_server.url, update_mode="disk")
    before = _current_greedy(engine)
    asyncio.run(engine.update_weights_from_path(str(models["B"]), "disk-1"))
    _check_switched(engine, models["B"], "disk-1", before)


def test_update_from_tensor_in_buckets(main_server, models):
    tensors = list(load_file(str(models["C"] / "model.safetensors")).items())
    engine = SGLangEngine(main_server.url, update_mode="tensor", bucket_mb=1)
    assert len(list(iter_buckets(tensors, engine.bucket_bytes))) >= 3  # several buckets, one session
    before = _current_greedy(engine)
    asyncio.run(engine.update_weights(iter(tensors), "tensor-2"))
    _check_switched(engine, models["C"], "tensor-2", before)


def test_update_by_distributed_broadcast_leaves_the_default_group_alone(main_server, models, mcore_world1):
    """Tensors stream from a Megatron-Core model (the trainer's path) over a gloo group with the server."""
    from megatron_s2l.model import convert

    default_group = dist.group.WORLD
    groups_before = dict(dist.distributed_c10d._world.pg_map)
    engine = SGLangEngine(main_server.url, update_mode="distributed", bucket_mb=1)
    try:
        for name, version in (("D", "dist-3"), ("A", "dist-4")):  # the second update reuses the group
            model, args = megatron_model(models[name])
            before = _current_greedy(engine)
            asyncio.run(engine.update_weights(convert.iter_hf_tensors(model, args), version))
            _check_switched(engine, models[name], version, before)
    finally:
        asyncio.run(engine.close())
    assert dist.group.WORLD is default_group and dict(dist.distributed_c10d._world.pg_map) == groups_before
    total = torch.ones(1)
    dist.all_reduce(total)  # the default group still works
    assert total.item() == dist.get_world_size()
