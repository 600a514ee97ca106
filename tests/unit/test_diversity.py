"""Diversity metrics by hand: identical groups are not diverse, disjoint ones are."""

from __future__ import annotations

import pytest

from megatron_s2l.rollout.diversity import bleu, edit_distance, edit_diversity, group_diversity, self_bleu


def test_identical_and_disjoint_groups():
    same = ["the answer is four"] * 3
    assert self_bleu(same) == pytest.approx(1.0) and edit_diversity(same) == 0.0
    apart = ["a b c d", "e f g h", "i j k l"]
    assert self_bleu(apart) < 0.35 and edit_diversity(apart) == 1.0  # only smoothed precisions remain
    assert self_bleu(same) > self_bleu(["the answer is four", "the answer is five", "we get six"]) > self_bleu(apart)


def test_by_hand():
    assert edit_distance("a b c".split(), "a x c".split()) == 1
    assert edit_distance([], "a b".split()) == 2
    assert edit_diversity(["a b c", "a x c"]) == pytest.approx(1 / 3)
    assert bleu("a b c d".split(), ["a b c d".split()]) == pytest.approx(1.0)
    metrics = group_diversity(["x", "y", "z", "w"], ["1", "2", "2", None])
    assert metrics["unique_answer_ratio"] == 0.75
