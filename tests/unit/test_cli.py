"""The `s2l` command line itself: overrides anywhere on `s2l train`'s line, a `--help` that imports nothing
heavy, and no megatron-core warnings about Transformer Engine and Apex on CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megatron_s2l.cli import build_parser
from tests.utils import REPO


@pytest.mark.parametrize("argv", [
    ["train", "--config", "c.yaml", "steps=3", "--resume", "auto", "rollout.group_size=4"],
    ["train", "steps=3", "--resume", "auto", "--config", "c.yaml", "rollout.group_size=4"],
    ["train", "--resume", "auto", "steps=3", "--print-config", "rollout.group_size=4", "--config", "c.yaml"],
])
def test_train_overrides_may_come_anywhere(argv):
    args = build_parser().parse_args(argv)
    assert args.overrides == ["steps=3", "rollout.group_size=4"]  # in the order given: the last one wins
    assert (args.config, args.resume) == ("c.yaml", "auto")


def test_an_unknown_option_is_still_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["train", "--config", "c.yaml", "steps=3", "--bogus", "auto"])
    assert exit_info.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})


def test_the_cli_imports_nothing_heavy_until_a_command_runs():
    """`s2l --help` stays well under a second: torch, transformers, megatron-core and math-verify (sympy)
    load only inside the commands that use them."""
    heavy = ("torch", "transformers", "megatron", "math_verify", "sympy", "httpx", "pyarrow")
    done = _run_python(f"import sys, megatron_s2l.cli; print([m for m in {heavy!r} if m in sys.modules])")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, missing TE/Apex is worth a warning")
def test_no_transformer_engine_or_apex_warnings_on_cpu():
    """megatron-core warns four times on import that TE and Apex are missing; on CPU that is expected, so the
    CLI says it once at debug level instead (the conversion below fails at once: no such checkpoint)."""
    command = ("from megatron_s2l.cli import main; "
               "main(['{}convert', 'megatron-to-hf', '--ckpt', '/nonexistent', '--out', '/nonexistent/out'])")
    quiet, verbose = _run_python(command.format("")), _run_python(command.format("-v', '"))
    assert "/nonexistent is not a megatron-s2l checkpoint" in quiet.stderr  # it got as far as megatron-core
    assert "not installed" not in quiet.stderr and "not installed" not in verbose.stderr
    assert verbose.stderr.count("without Transformer Engine and Apex") == 1
