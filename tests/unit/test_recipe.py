"""examples/run_smollm2_gsm8k.sh --dry-run: the commands of the one-machine recipe fit together (the
converted model is what both runs train, what they save is what `s2l eval` scores) and make valid configs,
for the CPU and the one-GPU config; the GSM8K slice it trains on ships with the repository."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_s2l.config import load_config
from megatron_s2l.data import read_rows
from tests.utils import REPO, smollm2_gguf


def _dry_run(*args: str, **env: str) -> list[list[str]]:
    done = subprocess.run(["bash", "examples/run_smollm2_gsm8k.sh", "--dry-run", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=120, env={**os.environ, "PY": sys.executable, **env})
    assert done.returncode == 0, done.stderr
    return [shlex.split(line[2:]) for line in done.stdout.splitlines() if line.startswith("+ ")]


def _s2l(commands: list[list[str]], *words: str) -> list[list[str]]:
    """The `s2l WORDS...` commands, each from its subcommand on."""
    found = [c[c.index("megatron_s2l.cli") + 1:] for c in commands if "megatron_s2l.cli" in c]
    return [c for c in found if c[:len(words)] == list(words)]


def _config(train: list[str]):
    at = train.index("--config")
    return load_config(REPO / train[at + 1], [arg for arg in train[at + 2:] if "=" in arg])


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


@pytest.mark.parametrize("config", ["examples/configs/smollm2_gsm8k_cpu.yaml",
                                    "examples/configs/smollm2_gsm8k_1gpu.yaml"])
def test_the_recipes_commands_fit_together(config, tmp_path):
    commands = _dry_run(str(tmp_path / "out"), "rollout.group_size=2", CONFIG=config)
    (convert,) = _s2l(commands, "convert", "gguf-to-hf")
    assert Path(_flag(convert, "--gguf")) == smollm2_gguf()  # the file `make setup` installs, found by itself
    grpo, s2l = (_config(train) for train in _s2l(commands, "train"))
    for cfg in (grpo, s2l):
        assert cfg.model.path == _flag(convert, "--out")
        assert cfg.rollout.group_size == 2  # the user's override reaches both runs
        assert cfg.data.template == "dapo" and (REPO / cfg.data.path).is_file()
        assert not cfg.eval.every_steps or (REPO / cfg.eval.path).is_file()
    assert grpo.explorer.mode == "off" and s2l.explorer.mode == "online"
    assert s2l.explorer.model_path == s2l.model.path  # by default the learner itself, sampled hotter
    assert s2l.explorer.temperature > s2l.rollout.temperature
    assert grpo.logging.run_dir != s2l.logging.run_dir
    exports = _s2l(commands, "convert", "megatron-to-hf")
    evals = _s2l(commands, "eval")
    for cfg, export, evaluation in zip((grpo, s2l), exports, evals):
        assert _flag(export, "--ckpt").startswith(f"{cfg.logging.run_dir}/checkpoints/step_")
        assert _flag(evaluation, "--model") == _flag(export, "--out")
        assert (REPO / _flag(evaluation, "--data")).is_file() and "--save-responses" in evaluation


def test_the_explorer_can_be_another_model(tmp_path):
    trains = _s2l(_dry_run(str(tmp_path), EXPLORER="/models/SmolLM2-360M-Instruct"), "train")
    assert _config(trains[1]).explorer.model_path == "/models/SmolLM2-360M-Instruct"


def test_the_gsm8k_slice_ships_with_the_repository():
    train, _ = read_rows(REPO / "examples/data/gsm8k/train.jsonl")
    test, _ = read_rows(REPO / "examples/data/gsm8k/test.jsonl")
    assert (len(train), len(test)) == (256, 100)
    assert all(row.gold.lstrip("-").replace(".", "").isdigit() for row in train + test)
    assert not {row.question for row in train} & {row.question for row in test}
    assert "MIT License" in (REPO / "examples/data/gsm8k/LICENSE").read_text()
