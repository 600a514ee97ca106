"""examples/run_s2l_8b.sh for real, on CPU: the launcher starts a frozen explorer server, two learner-replica
servers behind sglang-router and torchrun; training updates both replicas every step through one
distributed (gloo) group; when training ends the launcher stops every server. And the launcher's NCCL probe on
SGLang's real torch build."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megatron_s2l.platform import free_port
from megatron_s2l.rollout import sglang_launch
from tests.utils import (REPO, TINY_CONFIG, free_port_pair, port_is_free, read_rows, run_process,
                         toy_overrides, wait_for)

pytestmark = pytest.mark.sglang


def test_launcher_runs_explorer_two_routed_replicas_and_torchrun(toy_world, tmp_path):
    replica_port = free_port_pair()
    ports = {"REPLICA_PORT": replica_port, "ROUTER_PORT": free_port(), "EXPLORER_PORT": free_port(),
             "MASTER_PORT": free_port()}
    run_dir = tmp_path / "run"
    env = {
        "CONFIG": str(TINY_CONFIG), "LEARNER": toy_world["learner"], "EXPLORER": toy_world["explorer"],
        "DATA": toy_world["train"], "POOL": toy_world["pool"], "RUN_DIR": str(run_dir),
        "GPUS_PER_NODE": "4", "ROLLOUT_GPUS": "3", "EXPLORER_GPUS": "1", "SGLANG_TP": "1", "TP": "1",
        "MICRO_BATCH_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "STARTUP_MINUTES": "10",
        "PYTHON": sys.executable, "SGLANG_PYTHON": str(sglang_launch.sglang_python()),
        # what SGLang needs on a CPU (sglang_launch does the same for the tests' own servers)
        "SGLANG_EXTRA_ARGS": "--device cpu --attention-backend torch_native --disable-overlap-schedule "
                             "--max-total-tokens 16384 --dtype float32",
        "ROUTER_EXTRA_ARGS": f"--prometheus-port {free_port()}",
        "PYTHONPATH": f"{sglang_launch.SGL_KERNEL_STUB}:{REPO}", "SGLANG_USE_CPU_ENGINE": "1",
        **{k: str(v) for k, v in ports.items()},
    }
    overrides = toy_overrides(toy_world, **{"steps": 2, "schedule.t_mix": 2, "eval.every_steps": 0})
    result = run_process(["bash", "examples/run_s2l_8b.sh", *overrides], "run_s2l_8b.sh", timeout=1200, env=env)

    commands = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
    assert sum("sglang.launch_server" in c for c in commands) == 3  # explorer + 2 replicas, no pool build
    assert any("sglang_router.launch_router" in c for c in commands)
    rows = read_rows(run_dir)
    assert [(r["schedule/G_w"], r["schedule/G_s"]) for r in rows] == [(4, 0), (0, 4)]
    assert rows[1]["rollout/learner_weight_version"] == 1.0  # step 2 sampled the weights synced after step 1
    assert all(r["sync/gigabytes"] > 0 for r in rows)  # both replicas updated (the client checks each version)
    for name in ("explorer", "learner_replica_0", "learner_replica_1", "router"):
        assert (run_dir / f"{name}.log").stat().st_size > 0
    stopped = [replica_port, replica_port + 1, ports["ROUTER_PORT"], ports["EXPLORER_PORT"]]
    assert wait_for(lambda: all(map(port_is_free, stopped)), 30), "a server outlived the launcher"


def test_the_launchers_nccl_probe_reads_the_library_sglangs_torch_loads():
    """The probe examples/lib/launch.sh aligns NCCL versions with, on SGLang's real (CUDA) torch build."""
    python = str(sglang_launch.sglang_python())
    pinned = subprocess.run([python, "-c", "import importlib.metadata as m; print(*[d.version for d in "
                             "m.distributions() if d.metadata['Name'].startswith('nvidia-nccl')])"],
                            capture_output=True, text=True, timeout=120, check=True).stdout.split()
    for preload in ("", "/nonexistent/libnccl.so.2"):  # a preload that fails leaves torch's own NCCL
        probe = subprocess.run([python, "examples/lib/nccl_probe.py"], cwd=REPO, capture_output=True, text=True,
                               timeout=120, env={**os.environ, "LD_PRELOAD": preload})
        assert probe.returncode == 0, probe.stderr
        word, version, library = probe.stdout.split()
        assert (word, [version]) == ("nccl", pinned)  # the version SGLang's torch pins (no GPU needed)
        assert library.endswith("/nvidia/nccl/lib/libnccl.so.2") and os.path.exists(library)
