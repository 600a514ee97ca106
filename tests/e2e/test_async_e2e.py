"""Asynchronous rollouts (rollout.max_staleness = 1) on the toy world: later steps' rollouts are generated while
the learner trains, from weights one version old, on the same prompts in the same order as the synchronous loop;
kill -9 at any moment and resume, and the run trains on the same prompt sequence as an uninterrupted one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.utils import REPO, TINY_CONFIG, read_rows, run_s2l, subprocess_env, toy_overrides

STEPS = 4


def _trained_prompts(run_dir: Path) -> list[list[str]]:
    """Per step, the prompt ids trained on (logging.save_rollouts), in order."""
    steps = sorted((run_dir / "rollouts").glob("step_*.jsonl"))
    assert [int(p.stem.split("_")[1]) for p in steps] == list(range(1, len(steps) + 1))
    out = []
    for path in steps:
        ids = [json.loads(line)["prompt_id"] for line in path.read_text().splitlines()]
        out.append(list(dict.fromkeys(ids)))  # each group's samples are together
    return out


def _overrides(world: dict, run_dir: Path, staleness: int, **extra) -> list[str]:
    return [*toy_overrides(world, steps=STEPS, **{"rollout.max_staleness": staleness, "logging.save_rollouts": True,
                                                   "eval.every_steps": 0, **extra}), f"logging.run_dir={run_dir}"]


@pytest.mark.slow
def test_async_rollouts_train_on_the_same_prompts_from_one_version_old_weights(toy_world, tmp_path):
    run_s2l(["train", "--config", str(TINY_CONFIG), *_overrides(toy_world, tmp_path / "sync", 0)])
    run_s2l(["train", "--config", str(TINY_CONFIG), *_overrides(toy_world, tmp_path / "async", 1)])
    assert _trained_prompts(tmp_path / "async") == _trained_prompts(tmp_path / "sync")
    rows = read_rows(tmp_path / "async")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[0]["rollout/started_ahead"] == 0.0 and rows[0]["schedule/G_s"] == 0  # step 1: all explorer
    for row in rows[1:]:  # collected while the previous step trained, so from the weights before it
        assert row["rollout/started_ahead"] == 1.0, row["step"]
        assert row["rollout/age1_frac"] == 1.0 and row["rollout/stale_dropped"] == 0.0, row["step"]
        assert row["tokens/stale"] > 0 and "loss/behaviour_gap/stale" in row, row["step"]
    # the sampled versions in the rollout files agree: step t's learner samples are version t - 2 (t >= 2)
    for step in range(2, STEPS + 1):
        lines = (tmp_path / "async" / "rollouts" / f"step_{step:06d}.jsonl").read_text().splitlines()
        versions = {json.loads(x)["weight_version"] for x in lines if json.loads(x)["source"] == "learner"}
        assert versions == {str(step - 2)}, step
    sync_rows = read_rows(tmp_path / "sync")
    assert all(r["rollout/started_ahead"] == 0.0 and "rollout/age0_frac" not in r for r in sync_rows)


def _kill_when(cmd: list[str], ready, delay_s: float) -> None:
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ready():
            assert time.monotonic() < deadline and proc.poll() is None, "the run ended before the kill"
            time.sleep(0.1)
        time.sleep(delay_s)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


@pytest.mark.slow
def test_kill_9_and_resume_trains_on_the_prompts_of_an_uninterrupted_async_run(toy_world, tmp_path):
    run_s2l(["train", "--config", str(TINY_CONFIG), *_overrides(toy_world, tmp_path / "straight", 1)])
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, "-m", "megatron_s2l.cli", "train", "--config", str(TINY_CONFIG),
           *_overrides(toy_world, run_dir, 1, **{"checkpoint.every_steps": 1}), "checkpoint.resume=auto"]
    metrics = run_dir / "metrics.jsonl"
    rng = random.Random(0)  # points in the step after the one named: rollouts, update, save or sync
    for after_step in (1, 2):
        _kill_when(cmd, lambda: metrics.is_file() and f'"step": {after_step},' in metrics.read_text(),
                   delay_s=rng.uniform(0.0, 2.0))
    subprocess.run(cmd, cwd=REPO, env=subprocess_env(), check=True, timeout=600, capture_output=True)
    assert _trained_prompts(run_dir) == _trained_prompts(tmp_path / "straight")
    assert {r["step"] for r in read_rows(run_dir)} == set(range(1, STEPS + 1))
