"""`examples/run_*.sh --dry-run`: the printed torchrun and SGLang commands agree with each other and the
overrides they pass make a valid config."""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from megatron_s2l.config import load_config
from tests.utils import REPO


def dry_run(script: str, **env) -> list[list[str]]:
    result = launcher(script, **env)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line[2:].split(" > ")[0].rstrip(" &")) for line in result.stdout.splitlines()
            if line.startswith("+ ") and not line.startswith("+ waiting")]


def launcher(script: str, **env) -> subprocess.CompletedProcess:
    defaults = {"GPUS_PER_NODE": "8", "NNODES": "1", "POOL": "/nonexistent/pool"}
    clean = {k: v for k, v in os.environ.items() if k not in ("ROLE", "ROLLOUT_ADDR", "MASTER_ADDR")}
    return subprocess.run(["bash", f"examples/{script}", "--dry-run", "algorithm.kl_coef=0.002"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env={**clean, **defaults, **env})


def _train_config(commands: list[list[str]]):
    torchrun = next(c for c in commands if "torch.distributed.run" in c)
    config = torchrun[torchrun.index("--config") + 1]
    overrides = [arg for arg in torchrun[torchrun.index("--config") + 2:] if "=" in arg]
    return torchrun, load_config(config, overrides)  # the launcher's overrides make a valid config


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def _servers(commands: list[list[str]], model: str) -> list[list[str]]:
    return [c for c in commands if "sglang.launch_server" in c and _flag(c, "--model-path") == model]


def _gpus(command: list[str]) -> set[str]:
    return set(next(a for a in command if a.startswith("CUDA_VISIBLE_DEVICES="))[21:].split(","))


@pytest.mark.parametrize("script,learner", [("run_s2l_8b.sh", "/models/Qwen3-8B-Base"),
                                            ("run_s2l_14b.sh", "/models/Qwen3-14B-Base"),
                                            ("run_grpo_8b.sh", "/models/Qwen3-8B-Base")])
def test_dry_run_commands_are_consistent(script, learner):
    commands = dry_run(script, ROLLOUT_GPUS="4", SGLANG_TP="2", ROUTER_PORT="31234", REPLICA_PORT="31300",
                       TP="2", PP="2")
    torchrun, cfg = _train_config(commands)
    assert _flag(torchrun, "--nproc-per-node") == "4" and _gpus(torchrun) == {"0", "1", "2", "3"}
    assert (cfg.parallel.tp, cfg.parallel.pp) == (2, 2)
    assert cfg.model.path == learner and cfg.algorithm.kl_coef == 0.002  # user overrides pass through
    # the learner replica: one server per SGLANG_TP GPUs (never --dp-size: SGLang's weight-update group
    # ranks by TP rank), on the rollout GPUs, behind a router; the trainer updates every server
    replicas = _servers(commands, learner)
    assert [_flag(c, "--port") for c in replicas] == ["31300", "31301"]
    assert all(_flag(c, "--tp") == "2" and _flag(c, "--dp-size") == "1" for c in replicas)
    assert _gpus(replicas[0]) | _gpus(replicas[1]) == {"4", "5", "6", "7"}
    assert not _gpus(replicas[0]) & _gpus(replicas[1])
    assert cfg.rollout.learner_url == "http://127.0.0.1:31234"
    assert cfg.rollout.learner_worker_urls == ["http://127.0.0.1:31300", "http://127.0.0.1:31301"]
    router = next(c for c in commands if "sglang_router.launch_router" in c)
    assert _flag(router, "--port") == "31234"
    assert router[router.index("--worker-urls") + 1:] == cfg.rollout.learner_worker_urls
    if cfg.explorer.mode == "pool":  # no manifest at POOL: the pool is built first from an explorer server
        build = next(c for c in commands if "pool" in c and "build" in c)
        explorer, = _servers(commands, cfg.explorer.model_path)
        assert _flag(build, "--explorer-url").endswith(_flag(explorer, "--port"))
        assert _gpus(explorer) == {"4", "5", "6", "7"}
        assert commands.index(explorer) < commands.index(build) < commands.index(replicas[0])
    else:
        assert not any("pool" in c for c in commands)
    assert commands.index(router) < commands.index(torchrun)


def test_rollout_node_and_training_nodes_agree():
    layout = dict(ROLLOUT_GPUS="8", SGLANG_TP="2", EXPLORER_GPUS="2", ROLLOUT_ADDR="10.0.0.2")
    rollout = dry_run("run_s2l_8b.sh", ROLE="rollout", **layout)
    train = dry_run("run_s2l_8b.sh", ROLE="train", NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.3", **layout)
    assert not any("torch.distributed.run" in c for c in rollout)
    assert not any("sglang.launch_server" in c or "sglang_router.launch_router" in c for c in train)
    torchrun, cfg = _train_config(train)
    assert _flag(torchrun, "--nproc-per-node") == "8" and _flag(torchrun, "--node-rank") == "1"
    assert _flag(torchrun, "--master-addr") == "10.0.0.3"
    replicas = _servers(rollout, cfg.model.path)
    assert cfg.rollout.learner_worker_urls == [f"http://10.0.0.2:{_flag(c, '--port')}" for c in replicas]
    assert len(replicas) == 3 and cfg.rollout.learner_url == "http://10.0.0.2:30000"
    # EXPLORER_GPUS > 0: an online explorer on GPUs of its own instead of the offline pool
    explorer, = _servers(rollout, cfg.explorer.model_path)
    assert cfg.explorer.mode == "online" and cfg.explorer.url == f"http://10.0.0.2:{_flag(explorer, '--port')}"
    assert _gpus(explorer) == {"6", "7"} and not _gpus(explorer) & set().union(*map(_gpus, replicas))
    assert not any("pool" in c for c in rollout)


@pytest.mark.parametrize("env,message", [
    (dict(ROLE="train"), "ROLE=train needs ROLLOUT_ADDR"),
    (dict(ROLE="sideways"), "ROLE=sideways: use all, rollout or train"),
    (dict(ROLLOUT_GPUS="3", SGLANG_TP="2"), "cannot hold learner replicas of SGLANG_TP=2"),
    (dict(ROLLOUT_GPUS="8"), "node 0 has no GPUs left to train"),
])
def test_bad_layouts_are_refused_with_the_fix(env, message):
    result = launcher("run_s2l_8b.sh", **env)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_unknown_argument_is_refused():
    result = subprocess.run(["bash", "examples/run_s2l_8b.sh", "--frobnicate"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "unknown argument" in result.stderr


@pytest.mark.parametrize("tool", ["convert_hf_to_megatron.py", "convert_megatron_to_hf.py", "build_explorer_pool.py",
                                  "eval_passk.py", "make_toy_models.py", "plot_run.py", "compare_runs.py"])
def test_tools_show_help(tool):
    import sys

    result = subprocess.run([sys.executable, f"tools/{tool}", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr[-2000:]
