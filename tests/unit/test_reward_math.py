"""Reward: answer extraction and math-verify equivalence, hand-written cases plus the real datasets."""

from __future__ import annotations

import json
import random

import pytest

from megatron_s2l.config import RewardConfig
from megatron_s2l.data import gsm8k_gold
from megatron_s2l.reward import MathScorer, equivalent, extract_answer
from tests.utils import shared_dir


def score(response: str, gold: str, scale: str = "binary") -> float:
    """One response's reward through the trainer's own path (MathScorer), in this process."""
    return MathScorer(RewardConfig(scale=scale, num_workers=0)).score_batch([response], [gold])[0].reward

# (response, gold, expected reward)
CASES = [
    # --- answer markers
    ("So the total is 12.\nAnswer: 12", "12", 1.0),
    ("Answer: 12", "12", 1.0),
    ("answer: 12", "12", 1.0),
    ("Answer:12", "12", 1.0),
    ("Answer: $12$", "12", 1.0),
    ("Answer: 12.", "12", 1.0),
    ("Answer: 3\nWait, let me recheck.\nAnswer: 4", "4", 1.0),  # the last marker counts
    ("Answer: 3\nWait, let me recheck.\nAnswer: 4", "3", 0.0),
    ("The answer is \\boxed{7}.", "7", 1.0),
    ("\\boxed{\\frac{1}{2}}", "1/2", 1.0),
    ("First \\boxed{3}, then \\boxed{5}", "5", 1.0),
    ("\\boxed{\\{1, 2\\}}", "\\{1,2\\}", 1.0),  # nested braces
    ("\\boxed{\\sqrt{\\frac{3}{4}}}", "\\frac{\\sqrt{3}}{2}", 1.0),
    ("\\fbox{9}", "9", 1.0),
    ("Answer: \\boxed{42}", "42", 1.0),
    ("#### 72", "72", 1.0),
    ("She sold 48 + 24 = 72 clips.\n#### 72", "72", 1.0),
    ("\\boxed{5}\nAnswer: 6", "6", 1.0),  # the marker that appears last wins
    ("Answer: 6\nso \\boxed{5}", "5", 1.0),
    # --- no final-answer marker: no answer, even if the number is there
    ("The result is 12", "12", 0.0),
    ("12", "12", 0.0),
    ("", "12", 0.0),
    ("Answer:", "12", 0.0),
    ("\\boxed{}", "12", 0.0),
    ("\\boxed{12", "12", 0.0),  # unbalanced braces
    # --- wrong answers that merely contain the gold (the released scorer accepted these)
    ("Answer: 12", "2", 0.0),
    ("Answer: 21", "2", 0.0),
    ("Answer: 2.5", "2", 0.0),
    ("Answer: 102", "10", 0.0),
    ("\\boxed{-2}", "2", 0.0),
    ("Answer: x = 12", "2", 0.0),
    ("#### 120", "12", 0.0),
    # --- fractions, decimals, \dfrac
    ("Answer: 0.5", "\\frac{1}{2}", 1.0),
    ("Answer: \\frac{1}{2}", "0.5", 1.0),
    ("Answer: \\dfrac{3}{4}", "0.75", 1.0),
    ("Answer: \\tfrac{3}{4}", "3/4", 1.0),
    ("Answer: 3/4", "\\frac{3}{4}", 1.0),
    ("Answer: 0.3333", "\\frac{1}{3}", 0.0),  # not equal to 6 digits
    ("Answer: \\frac{2}{4}", "\\frac{1}{2}", 1.0),
    ("Answer: -\\frac{1}{2}", "-0.5", 1.0),
    # --- radicals and pi
    ("Answer: 2\\sqrt{2}", "\\sqrt{8}", 1.0),
    ("Answer: \\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", 1.0),
    ("Answer: 3\\sqrt{3}", "\\sqrt{3}", 0.0),
    ("Answer: 2\\pi", "2\\pi", 1.0),
    ("Answer: 6.28", "2\\pi", 0.0),
    # --- intervals, tuples, sets
    ("Answer: (1, 2]", "(1,2]", 1.0),
    ("Answer: [1, 2]", "(1,2]", 0.0),
    ("Answer: (-\\infty, 3)", "(-\\infty,3)", 1.0),
    ("Answer: (1, 2)", "(1,2)", 1.0),
    ("Answer: (2, 1)", "(1,2)", 0.0),
    ("Answer: \\{2, 1\\}", "\\{1,2\\}", 1.0),
    ("Answer: x = 2, x = 3", "2, 3", 1.0),  # roots listed as equations
    ("Answer: 3, 2", "2, 3", 1.0),  # a set of roots in another order
    # --- polynomials and expressions
    ("Answer: x^2 + 2x + 1", "(x+1)^2", 1.0),
    ("Answer: x^2 + 1", "(x+1)^2", 0.0),
    ("Answer: 2(x+1)", "2x+2", 1.0),
    # --- units, degrees, dollars, separators, leading zeros
    ("Answer: 90^\\circ", "90", 1.0),
    ("Answer: 90°", "90", 1.0),
    ("Answer: 10 \\text{ cm}", "10", 1.0),
    ("Answer: \\$5", "5", 1.0),
    ("Answer: $5.00", "5", 1.0),
    ("Answer: 1,000", "1000", 1.0),
    ("Answer: 1{,}000", "1000", 1.0),
    ("Answer: 007", "7", 1.0),
    ("Answer: 10\\%", "10", 1.0),
    # --- equations against values, text answers
    ("Answer: x = 3", "3", 1.0),
    ("Answer: y = 3", "4", 0.0),
    ("Answer: \\text{(C)}", "\\text{(C)}", 1.0),
]


@pytest.mark.parametrize("response,gold,expected", CASES)
def test_reward_case(response, gold, expected):
    assert score(response, gold) == expected


def test_there_are_at_least_sixty_hand_written_cases():
    assert len(CASES) >= 60


def test_signed_scale_for_both_sources():
    assert score("Answer: 5", "5", scale="signed") == 1.0
    assert score("Answer: 6", "5", scale="signed") == -1.0
    assert score("no answer", "5", scale="signed") == -1.0
    with pytest.raises(ValueError, match="reward.scale='percent'"):
        score("Answer: 5", "5", scale="percent")


@pytest.mark.parametrize("response,answer", [
    ("Answer: $\\frac{1}{2}$.", "\\frac{1}{2}"),
    ("work\n\\boxed{\\frac{a}{b}}", "\\frac{a}{b}"),
    ("#### 1,234", "1,234"),
    ("nothing here", None),
])
def test_extract_answer(response, answer):
    assert extract_answer(response) == answer


def _rows(name: str) -> list[dict]:
    path = shared_dir() / "data" / name / "test.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _perturb(gold: str) -> str:
    """A nearby wrong answer: the integer plus one, else the gold with a digit changed or + 1."""
    try:
        return str(int(gold.replace(",", "")) + 1)
    except ValueError:
        return f"{gold} + 1"


@pytest.mark.parametrize("dataset,limit", [("aime24", 30), ("math500", 500)])
def test_real_gold_answers_verify_against_themselves_and_not_a_perturbation(dataset, limit):
    rows = _rows(dataset)[:limit]
    assert len(rows) >= min(limit, 30)
    for row in rows:
        gold = str(row["answer"])
        assert equivalent(gold, gold), (dataset, gold)
        assert not equivalent(_perturb(gold), gold), (dataset, gold)


def test_real_gsm8k_answers():
    rows = _rows("gsm8k")
    random.Random(0).shuffle(rows)
    for row in rows[:300]:
        gold = gsm8k_gold(row["answer"])
        assert score(f"Answer: {gold}", gold) == 1.0
        assert score(row["answer"], gold) == 1.0  # the worked solution ends with '#### N'
        assert score(f"Answer: {_perturb(gold)}", gold) == 0.0
