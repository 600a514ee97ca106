"""A quick toy world (a few hundred supervised steps) and helpers to run `s2l` as users do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.utils import REPO, free_port

TINY_CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """Toy explorer + learner + data (small and quick), and an explorer pool built with `s2l pool build`."""
    from megatron_s2l.toy import make_toy_world

    root = tmp_path_factory.mktemp("toy")
    paths = make_toy_world(root / "models", explorer_steps=300, learner_steps=60, num_train=48, num_test=16)
    world = {name: str(path) for name, path in paths.items()} | {"pool": str(root / "pool"), "root": str(root)}
    run_s2l(["pool", "build", "--config", str(TINY_CONFIG), "--score", *toy_overrides(world)], timeout=300)
    return world


def toy_overrides(world: dict, **extra) -> list[str]:
    values = {"model.path": world["learner"], "data.path": world["train"], "eval.path": world["test"],
              "explorer.model_path": world["explorer"], "explorer.pool_path": world["pool"],
              "steps": 4, "schedule.t_mix": 3, "rollout.group_size": 4, "rollout.prompts_per_step": 4,
              "parallel.micro_batch_size": 4, "optimizer.mini_batches_per_step": 1, "eval.every_steps": 2,
              "eval.max_prompts": 8, "reward.num_workers": 0, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def run_s2l(args: list[str], timeout: int = 600, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """`s2l ...` in a fresh process (under torchrun when nproc > 1), killed on timeout."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "megatron_s2l.cli", *args]
    else:
        cmd = [sys.executable, "-m", "megatron_s2l.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=REPO, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"s2l {' '.join(args[:2])} timed out after {timeout}s:\n{out[-5000:]}")
    if check and proc.returncode != 0:
        raise AssertionError(f"s2l {' '.join(args[:2])} failed (rc={proc.returncode}):\n{out[-8000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def read_rows(run_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
