"""Pause / continue / abort / flush on a real server, with requests in flight."""

from __future__ import annotations

import asyncio
import time

import psutil
import pytest

from megatron_s2l.rollout.sglang import SGLangEngine
from megatron_s2l.rollout.types import SamplingParams

pytestmark = pytest.mark.sglang

LONG = SamplingParams(max_new_tokens=4000, temperature=1.0)  # far longer than any test waits
SHORT = SamplingParams(max_new_tokens=4, temperature=1.0)
PROMPT, OTHER = [9707, 11, 1879], [16, 17]


async def _started(engine: SGLangEngine, prompt: list[int]) -> asyncio.Task:
    task = asyncio.create_task(engine.generate([prompt], 1, LONG))
    await asyncio.sleep(1.5)  # admitted and decoding
    assert not task.done()
    return task


def test_pause_aborts_in_flight_holds_new_requests_and_resume_serves_them(main_server):
    engine = SGLangEngine(main_server.url)  # pause_mode="abort", SGLang's default

    async def scenario():
        running = await _started(engine, PROMPT)
        await engine.pause()
        aborted = (await asyncio.wait_for(running, 30))[0][0]
        held = asyncio.create_task(engine.generate([OTHER], 1, SHORT))
        await asyncio.sleep(1.5)
        was_held = not held.done()  # a request sent while paused waits; it is not refused
        await engine.resume()
        return aborted, was_held, (await asyncio.wait_for(held, 30))[0][0]

    aborted, was_held, served = asyncio.run(scenario())
    assert aborted.finish_reason == "abort" and 0 < len(aborted.response_ids) < LONG.max_new_tokens
    assert len(aborted.logprobs) == len(aborted.response_ids)  # the partial answer is usable
    assert was_held and served.finish_reason == "length" and len(served.response_ids) == 4


def test_retract_and_in_place_pauses_keep_requests_and_abort_ends_them(main_server):
    engine = SGLangEngine(main_server.url)

    async def scenario():
        running = await _started(engine, PROMPT)
        kept = []
        for mode in ("retract", "in_place"):
            pausing = SGLangEngine(main_server.url, pause_mode=mode)  # the mode is the engine's
            await pausing.pause()
            await asyncio.sleep(1.0)
            kept.append(not running.done())  # neither mode ends the request
            await pausing.resume()
            await pausing.close()
        await asyncio.sleep(0.5)
        await engine.abort()  # every request on the server
        return kept, (await asyncio.wait_for(running, 30))[0][0]

    kept, gen = asyncio.run(scenario())
    assert kept == [True, True]
    assert gen.finish_reason == "abort" and 0 < len(gen.response_ids) < LONG.max_new_tokens


def test_flush_cache_when_idle_and_health(main_server):
    engine = SGLangEngine(main_server.url)

    async def scenario():
        await engine.flush_cache()
        return await engine.health()

    assert asyncio.run(scenario()) is True


def _cpu_seconds(leader_pid: int) -> float:
    """CPU time used so far by a server and every process it started (scheduler, detokenizer)."""
    leader = psutil.Process(leader_pid)
    total = 0.0
    for proc in (leader, *leader.children(recursive=True)):
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:  # the process just ended
            continue
        total += times.user + times.system
    return total


def test_an_idle_server_leaves_the_cpu_alone(main_server):
    """--sleep-on-idle: without it SGLang's scheduler polls in a loop and keeps a whole core busy, which
    on the trainer's node takes a core from the learner every time the replica waits for an update."""
    asyncio.run(SGLangEngine(main_server.url).generate([PROMPT], 1, SHORT))
    time.sleep(2.0)  # the request is done and the scheduler has gone idle
    before, start = _cpu_seconds(main_server.process.pid), time.monotonic()
    time.sleep(5.0)
    busy = (_cpu_seconds(main_server.process.pid) - before) / (time.monotonic() - start)
    assert busy < 0.2, f"an idle server used {busy:.0%} of a core"
