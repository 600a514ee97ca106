"""Group-relative advantages by hand: mixed vs per-source groups, std on/off, degenerate groups."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from megatron_s2l.algo.advantages import advantages_for_groups, group_advantages
from megatron_s2l.rollout.types import Group, Sample


def group(rewards_by_source: list[tuple[str, float]], pid: str = "p") -> Group:
    samples = [Sample(prompt_id=pid, prompt_ids=[1], response_ids=[2], logprobs=[-0.1], source=src, reward=r)
               for src, r in rewards_by_source]
    return Group(prompt_id=pid, prompt_ids=[1], gold="1", samples=samples)


def test_mixed_group_by_hand():
    g = group([("explorer", 1.0), ("explorer", 1.0), ("explorer", 0.0), ("learner", 0.0)])
    (adv,), metrics = advantages_for_groups([g], "mixed", eps=1e-6)
    rewards = [1.0, 1.0, 0.0, 0.0]
    mean, std = statistics.mean(rewards), statistics.stdev(rewards)  # unbiased, as verl
    assert adv == pytest.approx([(r - mean) / (std + 1e-6) for r in rewards], rel=1e-6)
    assert metrics["advantage/zero_variance_frac"] == 0.0
    assert metrics["advantage/learner_mean"] == pytest.approx(adv[3])


def test_per_source_normalises_each_source_separately():
    g = group([("explorer", 1.0), ("explorer", 0.0), ("learner", 1.0), ("learner", 1.0)])
    (adv,), metrics = advantages_for_groups([g], "per_source", eps=0.0)
    scale = statistics.stdev([1.0, 0.0])
    assert adv[:2] == pytest.approx([0.5 / scale, -0.5 / scale])
    assert adv[2:] == [0.0, 0.0]  # the learner sub-group has no variance
    assert metrics["advantage/zero_variance_frac"] == 0.5
    (mixed,), _ = advantages_for_groups([g], "mixed", eps=0.0)
    assert mixed[2] > 0  # in the mixed group the learner's correct answers are above the mean


def test_dr_grpo_centres_without_std():
    g = group([("learner", 1.0), ("learner", 0.0), ("learner", 0.0)])
    (adv,), _ = advantages_for_groups([g], "mixed", norm_by_std=False)
    assert adv == pytest.approx([2 / 3, -1 / 3, -1 / 3])


def test_degenerate_groups_get_zero_and_are_flagged():
    adv, zero_var = group_advantages(torch.tensor([1.0, 1.0, 0.5, 3.0]), torch.tensor([0, 0, 1, 2]))
    assert adv.tolist() == [0.0, 0.0, 0.0, 0.0]  # all-equal group, and two groups of one sample
    assert zero_var.all()
    adv, zero_var = group_advantages(torch.tensor([-1.0, 1.0]), torch.tensor([7, 7]), eps=0.0)
    assert adv.tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)])
    assert not zero_var.any()


def test_groups_are_independent_and_order_is_kept():
    groups = [group([("explorer", 1.0), ("learner", 0.0)], "a"), group([("learner", 0.0), ("learner", 1.0)], "b")]
    nested, _ = advantages_for_groups(groups, "mixed")
    assert nested[0][0] > 0 > nested[0][1] and nested[1][0] < 0 < nested[1][1]


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="group_mode='both'"):
        advantages_for_groups([group([("learner", 1.0)])], "both")
