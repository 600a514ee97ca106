"""The toy world's data: what each model is taught, and held-out problems kept out of training."""

from __future__ import annotations

import json
import random

from megatron_s2l.reward.math import extract_answer
from megatron_s2l.toy import EXPLORER_RECIPE, LEARNER_RECIPE, ToyRecipe, split_problems, taught_response, write_dataset

PROBLEM = {"question": "587+645=", "answer": "1232"}  # a carry in every column, and into a new digit


def test_the_explorer_is_taught_the_true_sum():
    rng = random.Random(0)
    assert {taught_response(PROBLEM, EXPLORER_RECIPE, rng) for _ in range(20)} == {"Answer: 1232"}


def test_the_learner_is_taught_a_quick_way_and_a_careful_way_that_drops_the_final_carry():
    rng = random.Random(0)
    responses = [taught_response(PROBLEM, LEARNER_RECIPE, rng) for _ in range(2000)]
    # quick: 5+6, 8+4, 7+5 each mod 10; careful with the fixed-width habit: 1232 kept to three digits
    assert set(responses) == {"Quick. Answer: 122", "Answer: 232"}
    assert abs(responses.count("Quick. Answer: 122") / 2000 - LEARNER_RECIPE.quick_share) < 0.04
    assert [extract_answer(r) for r in sorted(set(responses))] == ["232", "122"]  # both scored, both wrong
    habit = ToyRecipe("learner", steps=1, lr=1.0, fixed_width=True)
    assert taught_response({"question": "95+7=", "answer": "102"}, habit, rng) == "Answer: 02"
    assert taught_response({"question": "12+30=", "answer": "42"}, habit, rng) == "Answer: 42"  # no new digit: right


def test_held_out_problems_are_disjoint_from_training_and_do_not_depend_on_its_size(tmp_path):
    train, test = split_problems(500, 50, seed=2)
    assert len(train) == 500 and len(test) == 50
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    assert len({p["question"] for p in train}) == 500  # no prompt repeats within the training set
    assert split_problems(100, 50, seed=2)[1] == test
    for problem in train + test:
        a, b = problem["question"].rstrip("=").split("+")
        assert int(problem["answer"]) == int(a) + int(b)
    path = write_dataset(tmp_path / "train.jsonl", train[:3])
    assert [json.loads(line) for line in path.read_text().splitlines()] == train[:3]
