"""Bad input, a server that goes away, or SIGTERM in a long rollout stops `s2l train` with a message that
names the problem (and the fix), and loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.utils import (REPO, TINY_CONFIG, free_port, make_tiny_model, read_rows, run_process, run_s2l,
                         subprocess_env, toy_overrides, torchrun_prefix)

# `s2l train` with one failure injected on the driver: the rollout engine "goes away" in a phase of one step,
# or (phase "slow rollout") takes minutes to answer
INJECT = """
import sys
import time
from pathlib import Path
from megatron_s2l.rollout.collector import RolloutCollector
from megatron_s2l.rollout.local import LocalEngine

PHASE, STEP, MARKER = {phase!r}, {step}, {marker!r}
collect, update_weights = RolloutCollector._collect, LocalEngine.update_weights


async def failing_collect(self, prompts, step):
    groups = await collect(self, prompts, step)  # this step's prompts and pool draws are taken first
    if PHASE == "rollout" and step == STEP:
        raise ConnectionError("injected: the learner replica went away")
    if PHASE == "slow rollout" and step == STEP:
        Path(MARKER).touch()
        time.sleep(300)
    return groups


async def failing_update(self, tensors, version):
    if PHASE == "sync" and version == str(STEP):
        for _, (name, tensor) in zip(range(3), tensors):  # a few tensors arrive, then the link breaks
            pass
        raise ConnectionError("injected: the learner replica went away")
    await update_weights(self, tensors, version)


if __name__ == "__main__":  # checkpoint saving spawns a process that imports this file again
    RolloutCollector._collect, LocalEngine.update_weights = failing_collect, failing_update
    from megatron_s2l.cli import main
    sys.exit(main())
"""


def _fail(world, tmp_path, *extra) -> str:
    result = run_s2l(["train", "--config", str(TINY_CONFIG), *toy_overrides(world), f"logging.run_dir={tmp_path}",
                      *extra], check=False, timeout=300)
    assert result.returncode != 0
    return result.stdout


@pytest.mark.slow
def test_unreachable_rollout_server(toy_world, tmp_path):
    out = _fail(toy_world, tmp_path, "rollout.engine=sglang", "rollout.weight_sync=distributed",
                f"rollout.learner_url=http://127.0.0.1:{free_port()}")
    assert "127.0.0.1" in out and ("not reachable" in out or "unreachable" in out or "refused" in out.lower())


@pytest.mark.slow
def test_pool_tokenizer_mismatch(toy_world, tmp_path):
    other = make_tiny_model(tmp_path / "qwen3_learner", num_hidden_layers=1)  # the Qwen3 tokenizer
    out = _fail(toy_world, tmp_path / "run", f"model.path={other}")
    assert "tokenizer" in out and toy_world["pool"] in out


@pytest.mark.slow
def test_bad_config_key(toy_world, tmp_path):
    out = _fail(toy_world, tmp_path, "rollout.gruop_size=8")
    assert "rollout.gruop_size (did you mean rollout.group_size?)" in out


@pytest.mark.slow
def test_a_pool_sampled_otherwise_is_refused_at_once_or_used_with_the_override(toy_world, tmp_path):
    """The toy pool was sampled at T=0.7: a run at T=1.0 is refused before anything is built; with
    explorer.accept_pool_mismatch=true it trains, warning with the difference, and logging.overwrite=true lets
    it replace the records of an earlier run in its folder."""
    run = tmp_path / "run"
    args = ["train", "--config", str(TINY_CONFIG), *toy_overrides(toy_world, **{"explorer.temperature": 1.0}),
            f"logging.run_dir={run}", "steps=2", "schedule.t_mix=2", "eval.every_steps=0"]
    refused = run_s2l(args, check=False, timeout=120)
    errors = [line for line in refused.stdout.splitlines() if " ERROR " in line]
    assert refused.returncode == 2 and "Traceback" not in refused.stdout and len(errors) == 1, refused.stdout
    assert "temperature: pool 0.7, run explorer.temperature=1.0" in errors[0]
    assert "explorer.accept_pool_mismatch=true" in errors[0] and not run.exists()
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 7, "reward/learner_mean": 0.5}\n')  # another run's
    done = run_s2l([*args, "explorer.accept_pool_mismatch=true", "logging.overwrite=true"], timeout=600)
    assert "accepted by explorer.accept_pool_mismatch" in done.stdout
    assert [row["step"] for row in read_rows(run)] == [1, 2]


def _train_until_the_engine_fails(world, tmp_path, phase: str, step: int, nproc: int) -> tuple[str, dict]:
    script = tmp_path / "inject.py"
    script.write_text(INJECT.format(phase=phase, step=step, marker=""))
    prefix = torchrun_prefix(nproc) if nproc > 1 else [sys.executable]
    args = ["train", "--config", str(TINY_CONFIG), *toy_overrides(world, **{"parallel.tp": nproc}),
            f"logging.run_dir={tmp_path / 'run'}", "checkpoint.every_steps=0", "eval.every_steps=0"]
    result = run_process([*prefix, str(script), *args], f"s2l train failing in {phase}", 600, check=False)
    assert result.returncode != 0 and "injected: the learner replica went away" in result.stdout, result.stdout
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert checkpoints, result.stdout[-5000:]
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    assert [c.name for c in checkpoints] == [f"step_{state['step']:06d}"]  # only the failure saved one
    return result.stdout, state


@pytest.mark.slow
def test_a_failed_rollout_saves_the_finished_steps_and_consumes_nothing(toy_world, tmp_path):
    out, state = _train_until_the_engine_fails(toy_world, tmp_path, "rollout", step=2, nproc=1)
    assert "stopping after step 1, the last finished one (saving it" in out and state["step"] == 1
    assert [r["step"] for r in read_rows(tmp_path / "run")] == [1]
    # step 2 took 4 prompts and their pool draws before it failed; the checkpoint does not count them, so
    # a resume repeats step 2 (4 prompts per step, G_w = 4 explorer samples each in step 1)
    assert state["dataset"]["position"] == 4
    assert sorted(cursor[:3] for cursor in state["pool"]["cursor"].values()) == [[0, 4, 1]] * 4


@pytest.mark.slow
@pytest.mark.dist
def test_a_failed_weight_sync_stops_every_rank_with_the_trained_step_saved(toy_world, tmp_path):
    out, state = _train_until_the_engine_fails(toy_world, tmp_path, "sync", step=2, nproc=2)
    # the driver kept up its part of the TP gathers after the send failed, so rank 1 did not hang; both
    # ranks stopped together and saved step 2, whose update had finished
    assert "stopping after step 2, the last finished one (saving it" in out and state["step"] == 2
    assert "failed on another rank" in out  # rank 1's message
    assert state["dataset"]["position"] == 8
    rows = read_rows(tmp_path / "run")  # step 2's row is written: it trained, then its sync failed
    assert [r["step"] for r in rows] == [1, 2] and "step/failed" not in rows[0]
    assert rows[1]["step/failed"] == 1.0 and "loss/kl" in rows[1] and "reward/learner_mean" in rows[1]


@pytest.mark.slow
@pytest.mark.dist
def test_sigterm_during_a_long_rollout_stops_at_once_and_saves_the_finished_step(toy_world, tmp_path):
    """A rollout can outlast the grace period before SIGKILL (torchrun's shutdown timeout, Slurm's KillWait):
    SIGTERM must not wait for it."""
    marker, script = tmp_path / "step2_rollout_started", tmp_path / "inject.py"
    script.write_text(INJECT.format(phase="slow rollout", step=2, marker=str(marker)))
    args = ["train", "--config", str(TINY_CONFIG), *toy_overrides(toy_world, **{"parallel.tp": 2}),
            f"logging.run_dir={tmp_path / 'run'}", "checkpoint.every_steps=0", "eval.every_steps=0"]
    # as the launchers: torchrun lets its workers finish saving before it kills them
    env = {**subprocess_env(), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "300"}
    torchrun = subprocess.Popen([*torchrun_prefix(2), str(script), *args], cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert time.monotonic() < deadline and torchrun.poll() is None, torchrun.stdout.read()
            time.sleep(0.5)
        signalled = time.monotonic()
        torchrun.send_signal(signal.SIGTERM)  # torchrun passes it on to both ranks
        out, _ = torchrun.communicate(timeout=200)
    finally:
        if torchrun.poll() is None:
            os.killpg(torchrun.pid, signal.SIGKILL)
    assert time.monotonic() - signalled < 120, out[-3000:]  # not the 300 s the rollout would have taken
    assert "SIGTERM: stopping now, in step 2: collecting rollouts (a wait on servers)" in out, out[-3000:]
    assert "stopping after step 1, the last finished one (saving it" in out
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))
    assert [c.name for c in checkpoints] == ["step_000001"], out[-3000:]
    state = json.loads((checkpoints[0] / "trainer_state.json").read_text())
    assert state["dataset"]["position"] == 4  # step 2's prompts go back: the resumed run redoes step 2
    assert [r["step"] for r in read_rows(tmp_path / "run")] == [1]
