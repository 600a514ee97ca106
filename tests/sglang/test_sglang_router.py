"""sglang-router in front of two real servers, and what a client sees when a server dies."""

from __future__ import annotations

import asyncio
import time

import pytest
from safetensors.torch import load_file

from megatron_s2l.rollout import sglang_launch
from megatron_s2l.rollout.sglang import SGLangEngine
from megatron_s2l.rollout.sglang_client import SGLangUnavailableError
from megatron_s2l.rollout.types import SamplingParams
from tests.sglang.conftest import SERVER_LIFETIME_S
from tests.sglang.helpers import hf_greedy

pytestmark = pytest.mark.sglang

PROMPT = [9707, 11, 1879]
GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def router(main_server, second_server, tmp_path_factory):
    handle = sglang_launch.launch_router([main_server.url, second_server.url], policy="round_robin",
                                         log_dir=tmp_path_factory.mktemp("router_logs"),
                                         max_lifetime_s=SERVER_LIFETIME_S)
    yield handle
    handle.stop()


def _greedy(url: str, copies: int = 1) -> list[tuple[int, ...]]:
    result = asyncio.run(SGLangEngine(url).generate([PROMPT] * copies, 1, GREEDY))
    return [tuple(row[0].response_ids) for row in result]


def test_router_spreads_requests_over_both_workers(main_server, second_server, router):
    per_worker = {_greedy(main_server.url)[0], _greedy(second_server.url)[0]}
    assert len(per_worker) == 2  # the workers serve different weights, so answers tell them apart
    assert set(_greedy(router.url, copies=4)) == per_worker  # round robin: both answered


def test_updates_fan_out_to_every_worker_behind_the_router(main_server, second_server, router, models):
    engine = SGLangEngine(router.url, worker_urls=[main_server.url, second_server.url], update_mode="disk")
    asyncio.run(engine.update_weights_from_path(str(models["C"]), "fan-1"))
    assert asyncio.run(engine.weight_version()) == "fan-1"  # asked of each worker
    expected = tuple(hf_greedy(models["C"], tuple(PROMPT), GREEDY.max_new_tokens))
    assert set(_greedy(router.url, copies=4)) == {expected}


def test_distributed_update_reaches_every_worker_in_one_group(main_server, second_server, router, models):
    """The launcher's layout: several single-TP servers behind a router, one broadcast group spanning all
    (rank 0 the trainer, then each server's TP ranks at its own offset)."""
    tensors = list(load_file(str(models["D"] / "model.safetensors")).items())
    before = set(_greedy(main_server.url)) | set(_greedy(second_server.url))
    engine = SGLangEngine(router.url, worker_urls=[main_server.url, second_server.url], update_mode="distributed",
                          bucket_mb=1)
    try:
        asyncio.run(engine.update_weights(iter(tensors), "fan-2"))
        assert asyncio.run(engine.weight_version()) == "fan-2"
    finally:
        asyncio.run(engine.close())
    expected = tuple(hf_greedy(models["D"], tuple(PROMPT), GREEDY.max_new_tokens))
    assert expected not in before  # the update is visible, not a no-op
    assert set(_greedy(main_server.url)) == set(_greedy(second_server.url)) == {expected}


def test_a_killed_server_gives_a_clear_error_after_retries(second_server):
    second_server.stop()
    assert not second_server.alive()
    engine = SGLangEngine(second_server.url, max_retries=2, backoff_s=0.2)
    start = time.monotonic()
    with pytest.raises(SGLangUnavailableError) as info:
        asyncio.run(engine.generate([PROMPT], 1, GREEDY))
    assert time.monotonic() - start >= 0.2 + 0.4  # it retried with backoff before giving up
    message = str(info.value)
    assert second_server.url in message and "3 times" in message
    assert "Check that the server is running" in message
    assert asyncio.run(engine.health()) is False
