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
    result = subprocess.run(["bash", f"examples/{script}", "--dry-run", "algorithm.kl_coef=0.002"], cwd=REPO,
                            capture_output=True, text=True, timeout=60, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return [shlex.split(line[2:].split(" > ")[0].rstrip(" &")) for line in result.stdout.splitlines()
            if line.startswith("+ ")]


def _train_overrides(command: list[str]) -> tuple[str, list[str]]:
    config = command[command.index("--config") + 1]
    return config, [arg for arg in command[command.index("--config") + 2:] if "=" in arg]


@pytest.mark.parametrize("script,learner", [("run_s2l_8b.sh", "/models/Qwen3-8B-Base"),
                                            ("run_s2l_14b.sh", "/models/Qwen3-14B-Base"),
                                            ("run_grpo_8b.sh", "/models/Qwen3-8B-Base")])
def test_dry_run_commands_are_consistent(script, learner):
    commands = dry_run(script, GPUS_PER_NODE="8", ROLLOUT_GPUS="4", SGLANG_PORT="31234", TP="2", PP="2",
                       NNODES="1", POOL="/nonexistent/pool")
    torchrun = next(c for c in commands if "torch.distributed.run" in c)
    assert torchrun[torchrun.index("--nproc-per-node") + 1] == "4"  # 8 GPUs - 4 for SGLang
    config_path, overrides = _train_overrides(torchrun)
    cfg = load_config(config_path, overrides)  # the launcher's overrides make a valid config
    assert (cfg.parallel.tp, cfg.parallel.pp) == (2, 2)
    assert cfg.model.path == learner and cfg.algorithm.kl_coef == 0.002  # user overrides pass through
    assert cfg.rollout.learner_url.endswith(":31234")
    servers = [c for c in commands if "sglang.launch_server" in c]
    replica = next(c for c in servers if c[c.index("--model-path") + 1] == learner)
    assert replica[replica.index("--port") + 1] == "31234"
    assert replica[replica.index("--dp-size") + 1] == "4"
    if cfg.explorer.mode == "pool":  # no manifest at POOL: the pool is built first from an explorer server
        build = next(c for c in commands if "pool" in c and "build" in c)
        explorer = next(c for c in servers if c[c.index("--model-path") + 1] == cfg.explorer.model_path)
        assert build[build.index("--explorer-url") + 1].endswith(explorer[explorer.index("--port") + 1])
        assert commands.index(build) < commands.index(replica) < commands.index(torchrun)
    else:
        assert not any("pool" in c for c in commands)


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
