"""`s2l train` with reward.kind=function: the user's reward scores every sample, through spawned workers."""

from __future__ import annotations

import pytest

from tests.utils import TINY_CONFIG, read_rows, run_s2l, toy_overrides


@pytest.mark.slow
def test_training_takes_its_reward_from_the_users_function(toy_world, tmp_path):
    run_dir = tmp_path / "run"
    # tests.user_reward:quarter gives 0.25 to every response, a value math-verify never gives ({0, 1})
    overrides = toy_overrides(toy_world, steps=2, **{"schedule.t_mix": 2, "eval.every_steps": 0,
                                                     "reward.kind": "function",
                                                     "reward.function": "tests.user_reward:quarter",
                                                     "reward.num_workers": 1})
    run_s2l(["train", "--config", str(TINY_CONFIG), *overrides, f"logging.run_dir={run_dir}"])
    rows = read_rows(run_dir)
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:  # every sample rewarded (> 0) yet a mean of 0.25: no {0, 1} or {-1, 1} scorer gives that
        assert row["reward/mean"] == 0.25 and row["success/rate"] == 1.0
        for source in ("explorer", "learner"):  # pool draws are scored by the run's reward too
            assert row.get(f"reward/{source}_mean", 0.25) == 0.25
    assert "reward/explorer_mean" in rows[0] and "reward/learner_mean" in rows[1]
