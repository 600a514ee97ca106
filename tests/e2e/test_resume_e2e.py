"""Resume: stopping after step k and resuming gives the same steps k+1.. as one uninterrupted run, also past a
damaged checkpoint; SIGTERM or Ctrl-C finishes the step and saves a checkpoint."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.utils import (REPO, TINY_CONFIG, read_rows, run_s2l, sigint_as_from_a_terminal, subprocess_env,
                         torchrun_prefix, toy_overrides)

NOT_COMPARED = ("timing/", "throughput/", "perf/", "memory/", "sync/seconds", "sync/gb_per_s", "time")


def _comparable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(NOT_COMPARED)}


@pytest.mark.slow
def test_resume_skips_a_damaged_checkpoint_and_matches_an_uninterrupted_run_bitwise(toy_world, tmp_path):
    """Stopped after step 3 with 4 KiB zeroed in that checkpoint's optimizer shard (damage that used to load
    silently): an explicit resume of it is refused in one line; `auto` takes step 2's and redoes step 3, whose
    first row is moved aside; steps 3 and 4 repeat the uninterrupted run's bit for bit."""
    straight = tmp_path / "straight"
    run_s2l(["train", "--config", str(TINY_CONFIG), *toy_overrides(toy_world), f"logging.run_dir={straight}"])
    run_dir = tmp_path / "resumed"
    common = ["train", "--config", str(TINY_CONFIG), *toy_overrides(toy_world, **{"checkpoint.every_steps": 1}),
              f"logging.run_dir={run_dir}"]
    run_s2l([*common, "checkpoint.exit_interval=3"])
    damaged = run_dir / "checkpoints" / "step_000003"
    shard = damaged / "optimizer" / "__0_0.distcp"
    with shard.open("r+b") as file:
        file.seek(shard.stat().st_size // 2)
        file.write(bytes(4096))

    refused = run_s2l([*common, "--resume", str(damaged)], check=False)
    last_line = refused.stdout.strip().splitlines()[-1]
    assert refused.returncode == 2 and "Traceback" not in refused.stdout, refused.stdout[-3000:]
    assert f"checkpoint.resume={damaged}: damaged checkpoint: optimizer/__0_0.distcp has changed" in last_line

    resumed = run_s2l([*common, "--resume", "auto"]).stdout
    assert f"skipping {damaged}: optimizer/__0_0.distcp has changed since the save" in resumed, resumed[-3000:]
    assert f"resuming from {damaged.parent / 'step_000002'}, the newest checkpoint that verifies" in resumed
    assert [json.loads(row)["step"] for row in (run_dir / "metrics.dropped-after-step-2.jsonl").open()] == [3]
    rows = read_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # one row per step
    for expected, actual in zip(read_rows(straight), rows):
        # CPU runs are deterministic: rollouts, rewards, losses and updates repeat bit for bit
        assert _comparable(actual) == _comparable(expected), expected["step"]


def _stop_when(cmd: list[str], ready, stop: str) -> subprocess.CompletedProcess:
    """Run `cmd` until `ready()`, then stop it: "sigterm" to it alone; "ctrl-c", SIGINT to its whole process
    group as a terminal sends it (Ctrl-C commands run in a bash script, which must stop too); or, `cmd` being a
    torchrun, "sigterm to rank 1"."""
    if stop == "ctrl-c":
        cmd = ["bash", "-c", shlex.join(cmd) + "; echo the script went on"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, preexec_fn=sigint_as_from_a_terminal)
    try:
        deadline = time.monotonic() + 300
        while not ready():
            assert time.monotonic() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() else ""
            time.sleep(0.2)
        if stop == "sigterm":
            proc.send_signal(signal.SIGTERM)
        elif stop == "sigterm to rank 1":
            os.kill(_worker_of_rank(proc.pid, 1), signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def _worker_of_rank(torchrun_pid: int, rank: int) -> int:
    for worker in Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split():
        if f"RANK={rank}".encode() in Path(f"/proc/{worker}/environ").read_bytes().split(b"\0"):
            return int(worker)
    raise AssertionError(f"torchrun {torchrun_pid} has no worker of rank {rank}")


def _assert_ended_by_ctrl_c(done: subprocess.CompletedProcess) -> None:
    """It ended by the SIGINT, so the script running it stopped too, and without a traceback."""
    out = done.stdout
    assert done.returncode == -signal.SIGINT and "the script went on" not in out, out[-3000:]
    assert "Traceback" not in out, out[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("stop, max_staleness", [("sigterm", 0), ("ctrl-c", 0), ("sigterm", 1)])
def test_a_stop_signal_saves_the_finished_step(toy_world, tmp_path, stop, max_staleness):
    """Also with asynchronous rollouts: the next step's rollouts are in flight when the signal comes."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_s2l.cli", "train", "--config", str(TINY_CONFIG),
           *toy_overrides(toy_world, steps=50, **{"rollout.max_staleness": max_staleness}),
           f"logging.run_dir={run_dir}"]
    metrics = run_dir / "metrics.jsonl"
    done = _stop_when(cmd, lambda: metrics.is_file() and '"step": 1,' in metrics.read_text(), stop)  # step 1 trained
    out = done.stdout
    last = read_rows(run_dir)[-1]["step"]
    assert last < 50 and (run_dir / "checkpoints" / f"step_{last:06d}" / "trainer_state.json").is_file(), out[-3000:]
    if stop == "sigterm":
        assert done.returncode == 0 and "SIGTERM: stopping" in out, out[-3000:]
    else:  # saved, then ended by the SIGINT
        assert "SIGINT: stopping" in out and "Ctrl-C again: stop now" in out, out[-3000:]
        _assert_ended_by_ctrl_c(done)


def _stop_while_saving_step_2(toy_world: dict, run_dir, stop: str) -> subprocess.CompletedProcess:
    """Train with two ranks under a bare torchrun, saving every step; stop while step 2 is being saved."""
    cmd = [*torchrun_prefix(2), "-m", "megatron_s2l.cli", "train", "--config", str(TINY_CONFIG),
           *toy_overrides(toy_world, steps=50, **{"checkpoint.every_steps": 1}), f"logging.run_dir={run_dir}"]
    return _stop_when(cmd, (run_dir / "checkpoints" / ".tmp-step_000002").is_dir, stop)


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("stop", ["sigterm", "ctrl-c"])
def test_a_stop_signal_to_a_bare_torchrun_during_a_save_keeps_that_checkpoint(toy_world, tmp_path, stop):
    """torchrun passes SIGTERM and SIGINT on to each worker's whole process group, so the helper processes of
    megatron-core's checkpoint writer get it too (as under Slurm). Here it comes while step 2 is being saved."""
    run_dir = tmp_path / "run"
    done = _stop_while_saving_step_2(toy_world, run_dir, stop)
    out = done.stdout
    assert (run_dir / "checkpoints" / "step_000002" / "trainer_state.json").is_file(), out[-3000:]
    assert read_rows(run_dir)[-1]["step"] < 50
    assert not re.search(r"\[rank\d\]: Traceback", out), out[-3000:]  # only torchrun's own (SignalException)
    assert f"if torchrun passed this {'SIGTERM' if stop == 'sigterm' else 'SIGINT'} on" in out, out[-3000:]


@pytest.mark.slow
@pytest.mark.dist
def test_a_stop_signal_that_reaches_one_rank_during_a_save_stops_every_rank_after_the_next_step(toy_world, tmp_path):
    """The ranks decide together whether to go on: a rank that alone left the loop would leave the others
    waiting in the next step's collectives. Here only rank 1 gets it, while step 2 is being saved."""
    run_dir = tmp_path / "run"
    done = _stop_while_saving_step_2(toy_world, run_dir, "sigterm to rank 1")
    out = done.stdout
    assert done.returncode == 0 and [r["step"] for r in read_rows(run_dir)][-2:] == [2, 3], out[-3000:]
    assert read_rows(run_dir)[-1].get("step/interrupted") == 1.0, out[-3000:]  # no sync after the signal
    assert (run_dir / "checkpoints" / "step_000003" / "trainer_state.json").is_file(), out[-3000:]


@pytest.mark.slow
def test_ctrl_c_stops_a_pool_build_that_the_same_command_resumes(toy_world, tmp_path):
    pool = tmp_path / "pool"
    build = [sys.executable, "-m", "megatron_s2l.cli", "pool", "build", "--config", str(TINY_CONFIG), "--chunk-size",
             "2", *toy_overrides(toy_world, **{"explorer.pool_path": pool})]
    done = _stop_when(build, lambda: list(pool.glob("chunks/chunk-*.parquet")), "ctrl-c")
    _assert_ended_by_ctrl_c(done)
    assert "the same command resumes the build" in done.stdout, done.stdout[-3000:]
    kept = len(list(pool.glob("chunks/chunk-*.parquet")))
    assert json.loads((pool / "manifest.json").read_text())["status"] != "complete" and kept >= 1
    run_s2l(build[3:], timeout=300)
    manifest = json.loads((pool / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert len(list(pool.glob("chunks/chunk-*.parquet"))) == manifest["num_chunks"] > kept


@pytest.mark.slow
@pytest.mark.dist
def test_resume_at_a_different_tp_and_export_the_learner(toy_world, tmp_path):
    """Two steps at TP=1, the rest at TP=2 (the model reshards, Adam restarts); the final checkpoint
    exports to an HF directory that transformers loads and that differs from the starting learner."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    common = ["train", "--config", str(TINY_CONFIG), *toy_overrides(toy_world), f"logging.run_dir={tmp_path}"]
    run_s2l([*common, "checkpoint.exit_interval=2"])
    result = run_s2l([*common, "parallel.tp=2", "--resume", "auto"], nproc=2)
    assert "the model is resharded" in result.stdout
    assert [r["step"] for r in read_rows(tmp_path)] == [1, 2, 3, 4]
    run_s2l(["convert", "megatron-to-hf", "--ckpt", str(tmp_path / "checkpoints" / "step_000004"),
             "--out", str(tmp_path / "hf")])
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    initial = load_file(f"{toy_world['learner']}/model.safetensors")
    assert set(exported) == set(initial)
    assert any(not torch.equal(exported[k], initial[k]) for k in initial)  # trained
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))  # a complete HF checkpoint (config, tokenizer)


@pytest.mark.slow
def test_a_run_from_model_megatron_checkpoint_samples_step_1_from_those_weights(toy_world, tmp_path):
    """model.path gives the architecture and tokenizer; the weights come from model.megatron_checkpoint (here a
    run's trained checkpoint). The learner replica must get them before step 1: its samples' log-probs then
    match the learner's to float noise (synced from model.path's weights instead, the gap measured 6e-4)."""
    trained = tmp_path / "trained"
    run_s2l(["train", "--config", str(TINY_CONFIG), *toy_overrides(toy_world, steps=2, **{"explorer.mode": "off",
             "optimizer.lr": 1e-3, "eval.every_steps": 0}), f"logging.run_dir={trained}"])
    run_s2l(["train", "--config", str(TINY_CONFIG), *toy_overrides(toy_world, steps=1, **{
        "explorer.mode": "off", "eval.every_steps": 0,
        "model.megatron_checkpoint": trained / "checkpoints" / "step_000002"}), f"logging.run_dir={tmp_path / 'run'}"])
    gap = read_rows(tmp_path / "run")[0]["loss/behaviour_gap/learner"]
    assert abs(gap) < 1e-4, gap
