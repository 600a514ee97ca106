"""reward.kind=function: a user's "module:callable" scores in the pool and in process, under math-verify's
deadlines; bad names fail at build time and bad returns fail by name; the config refuses contradictions."""

from __future__ import annotations

import time

import pytest

from megatron_s2l.config import ConfigError, RewardConfig, load_config, to_dict
from megatron_s2l.reward import FunctionReward, MathScorer, Reward, RewardFunctionError, build_reward


def _reward(function: str, **settings) -> Reward:
    return build_reward(RewardConfig(kind="function", function=f"tests.user_reward:{function}", **settings))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_user_function_scores_each_response_in_order(num_workers):
    reward = _reward("contains_gold", num_workers=num_workers)
    try:
        results = reward.score_batch(["so 12\nAnswer: 12", "Answer: 7", "\\boxed{3}"], ["12", "8", "3"])
    finally:
        reward.close()
    assert isinstance(reward, FunctionReward) and isinstance(reward, Reward)
    assert [r.reward for r in results] == [1.0, -0.5, 1.0]
    assert [r.correct for r in results] == [True, False, True]  # correct: reward > 0
    assert [r.answer for r in results] == ["12", "7", "3"]  # the extracted final answer, for diversity metrics
    assert not any(r.timed_out for r in results)


def test_a_hung_user_function_is_killed_at_its_deadline_and_counted():
    reward = _reward("hang_on_request", timeout_s=1, num_workers=2)
    try:
        start = time.monotonic()
        results = reward.score_batch(["a", "hang", "b", "c"], ["1", "2", "3", "4"])
        assert time.monotonic() - start < 20  # killed at its deadline (3 x 1 s + 2 s), not after 600 s
        assert [r.reward for r in results] == [1.0, 0.0, 1.0, 1.0]
        assert [r.timed_out for r in results] == [False, True, False, False]
        assert reward.num_timeouts == 1 and reward.num_scored == 4
        assert reward.score_batch(["d"], ["5"])[0].reward == 1.0  # the rebuilt pool works
    finally:
        reward.close()


@pytest.mark.parametrize("function,message", [
    ("returns_nan", r"returns_nan'.* returned nan .*return a finite number"),
    ("returns_list", r"returns_list'.* returned \[1.0, 0.0\] .*called once per response: return one float"),
    ("returns_text", r"returns_text'.* returned 'correct' \(str\).*return a float"),
    ("raises", r"raises'.* raised KeyError: 'no such gold'.*must return a number for every response"),
])
def test_a_bad_return_is_an_error_that_names_the_function(function, message):
    reward = _reward(function, num_workers=0)
    with pytest.raises(RewardFunctionError, match=rf"reward.function='tests.user_reward:{message}"):
        reward.score_batch(["Answer: 1"], ["1"])


def test_a_bad_return_from_a_worker_reaches_the_trainer_by_name():
    reward = _reward("returns_nan", num_workers=1)
    try:
        with pytest.raises(RewardFunctionError, match=r"reward.function='tests.user_reward:returns_nan' returned nan"):
            reward.score_batch(["Answer: 1"], ["1"])
    finally:
        reward.close()


@pytest.mark.parametrize("function,message", [
    ("no_such_module:fn", r"no module 'no_such_module' on this Python's path; put the directory .* on PYTHONPATH"),
    ("tests.no_such_module:fn", r"no module 'tests.no_such_module'"),
    ("tests.user_reward:no_such_fn", r"module 'tests.user_reward' \(.*user_reward.py\) has no 'no_such_fn'; "
                                     "check the name after the colon"),
    ("tests.user_reward:NOT_A_FUNCTION", r"is a int, not a function"),
    ("tests.user_reward:takes_one_argument", r"takes \(completion: str\) -> float; .* two positional arguments"),
])
def test_an_unusable_function_fails_at_build_time_by_name(function, message):
    with pytest.raises(ConfigError, match=rf"reward.function='{function}'.*{message}"):
        build_reward(RewardConfig(kind="function", function=function, num_workers=2))


def test_a_broken_import_inside_the_users_module_is_told_apart(tmp_path, monkeypatch):
    (tmp_path / "needs_a_package.py").write_text("import no_such_dependency_xyz\n\ndef fn(c, g):\n    return 1.0\n")
    (tmp_path / "has_a_typo.py").write_text("def fn(c, g)\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="importing 'needs_a_package' failed: No module named "
                                          "'no_such_dependency_xyz'; install what it needs"):
        build_reward(RewardConfig(kind="function", function="needs_a_package:fn"))
    with pytest.raises(ConfigError, match=r"importing 'has_a_typo' failed \(SyntaxError"):
        build_reward(RewardConfig(kind="function", function="has_a_typo:fn"))


@pytest.mark.parametrize("overrides,message", [
    (["reward.kind=function"], r"reward.function='' is invalid: with reward.kind=function name your reward "
                               '"module:callable"'),
    (["reward.kind=function", "reward.function=tests/user_reward.py"], r"reward.function='tests/user_reward.py'"),
    (["reward.kind=function", "reward.function=tests.user_reward"], r"reward.function='tests.user_reward'"),
    (["reward.kind=function", "reward.function=tests.user_reward:quarter", "reward.scale=signed"],
     r"reward.scale='signed' is invalid: the scale applies to reward.kind=math only"),
    (["reward.function=tests.user_reward:quarter"], r"set reward.kind=function, or drop reward.function"),
    (["reward.kind=python"], r"reward.kind='python' is not one of \['math', 'function'\]"),
])
def test_the_config_refuses_contradictions_and_malformed_names(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["explorer.mode=off", *overrides])


def test_print_config_shows_the_reward_kind_and_function(tmp_path, capsys):
    from megatron_s2l.cli import main

    overrides = ["explorer.mode=off", "reward.kind=function", "reward.function=tests.user_reward:quarter"]
    assert main(["train", *overrides, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "  kind: function\n  function: tests.user_reward:quarter\n" in printed
    (tmp_path / "printed.yaml").write_text(printed)
    assert to_dict(load_config(tmp_path / "printed.yaml")) == to_dict(load_config(None, overrides))


def test_math_is_the_default_kind():
    cfg = load_config(None, ["explorer.mode=off"]).reward
    assert (cfg.kind, cfg.function) == ("math", "")
    reward = build_reward(cfg)
    assert isinstance(reward, MathScorer) and isinstance(reward, Reward)
    reward.close()
