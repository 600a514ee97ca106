"""The RolloutEngine contract on a real server: every member of the Protocol called on an SGLangEngine
(tests/unit/test_local_engine.py does the same for LocalEngine)."""

from __future__ import annotations

import asyncio

import pytest
from safetensors.torch import load_file

from megatron_s2l.platform import free_port
from megatron_s2l.rollout.sglang import SGLangEngine
from megatron_s2l.rollout.types import RolloutEngine, SamplingParams
from tests.engine_contract import PROTOCOL_MEMBERS, assert_checks_cover_the_protocol, assert_same_parameters
from tests.sglang.helpers import hf_greedy

pytestmark = pytest.mark.sglang

PROMPTS = [[9707, 11, 1879], [785, 6722, 315, 9625, 374]]  # Qwen3 token ids
GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0)


async def _greedy(engine: SGLangEngine) -> list[list[int]]:
    return [group[0].response_ids for group in await engine.generate(PROMPTS, 1, GREEDY)]


def _hf_greedy(model_path) -> list[list[int]]:
    return [hf_greedy(model_path, tuple(prompt), GREEDY.max_new_tokens) for prompt in PROMPTS]


async def _name_is_set(engine: SGLangEngine, models) -> None:
    assert engine.name == "contract"


async def _generate_answers_prompt_major(engine: SGLangEngine, models) -> None:
    groups = await engine.generate(PROMPTS, 2, GREEDY)
    assert [[g.response_ids for g in group] for group in groups] == [[e, e] for e in _hf_greedy(models["A"])]
    for gen in (g for group in groups for g in group):
        assert len(gen.logprobs) == len(gen.response_ids) and gen.weight_version == "contract-A"


async def _update_weights_serves_the_sent_tensors(engine: SGLangEngine, models) -> None:
    tensors = list(load_file(str(models["B"] / "model.safetensors")).items())
    await engine.update_weights(iter(tensors), "contract-B")
    assert await _greedy(engine) == _hf_greedy(models["B"]) != _hf_greedy(models["A"])
    assert await engine.weight_version() == "contract-B"


async def _update_from_path_serves_the_checkpoint(engine: SGLangEngine, models) -> None:
    await engine.update_weights_from_path(str(models["C"]), "contract-C")
    assert await _greedy(engine) == _hf_greedy(models["C"]) != _hf_greedy(models["A"])
    assert await engine.weight_version() == "contract-C"


async def _weight_version_is_the_one_samples_carry(engine: SGLangEngine, models) -> None:
    gen = (await engine.generate(PROMPTS[:1], 1, GREEDY))[0][0]
    assert await engine.weight_version() == gen.weight_version == "contract-A"


async def _weights_digest_cannot_be_reported(engine: SGLangEngine, models) -> None:
    assert await engine.weights_digest(["model.norm.weight"]) is None  # the Protocol's "cannot report"


async def _healthy_and_a_missing_server_is_not(engine: SGLangEngine, models) -> None:
    assert await engine.health() is True
    nowhere = SGLangEngine(f"http://127.0.0.1:{free_port()}", max_retries=0)
    assert await nowhere.health() is False


async def _pause_holds_new_work_until_resume(engine: SGLangEngine, models) -> None:
    await engine.pause()
    task = asyncio.create_task(engine.generate(PROMPTS[:1], 1, GREEDY))
    await asyncio.sleep(1.5)
    held = not task.done()  # a request sent while paused waits; it is not refused
    await engine.resume()
    served = (await asyncio.wait_for(task, 30))[0][0]
    assert held and served.response_ids == _hf_greedy(models["A"])[0]


async def _close_releases_the_connections(engine: SGLangEngine, models) -> None:
    await engine.generate(PROMPTS[:1], 1, GREEDY)  # opens the connection pool
    client = engine._http._state.client
    await engine.close()
    assert client.is_closed
    assert await SGLangEngine(engine.url).health() is True  # the server itself is not the engine's to stop


CONTRACT_CHECKS = {
    "name": _name_is_set,
    "generate": _generate_answers_prompt_major,
    "update_weights": _update_weights_serves_the_sent_tensors,
    "update_weights_from_path": _update_from_path_serves_the_checkpoint,
    "weight_version": _weight_version_is_the_one_samples_carry,
    "weights_digest": _weights_digest_cannot_be_reported,
    "health": _healthy_and_a_missing_server_is_not,
    "pause": _pause_holds_new_work_until_resume,
    "resume": _pause_holds_new_work_until_resume,
    "close": _close_releases_the_connections,
}


def test_the_contract_checks_cover_the_protocol():
    assert_checks_cover_the_protocol(CONTRACT_CHECKS)


@pytest.fixture
def contract_engine(main_server, models):
    """An engine on the shared server serving model A; resumed at the end even if a check failed paused."""
    engine = SGLangEngine(main_server.url, name="contract")
    asyncio.run(engine.update_weights_from_path(str(models["A"]), "contract-A"))
    yield engine
    asyncio.run(engine.resume())
    asyncio.run(engine.close())


@pytest.mark.parametrize("member", PROTOCOL_MEMBERS)
def test_the_sglang_engine_keeps_the_contract(member, contract_engine, models):
    assert isinstance(contract_engine, RolloutEngine)
    assert_same_parameters(SGLangEngine, member)
    asyncio.run(CONTRACT_CHECKS[member](contract_engine, models))
