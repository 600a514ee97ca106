"""Bad input stops `s2l train` with a message that names the problem and the fix, and loses nothing."""

from __future__ import annotations

import pytest

from tests.utils import TINY_CONFIG, run_s2l, toy_overrides
from tests.utils import free_port, make_tiny_model


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
