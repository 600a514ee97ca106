"""Reward functions as a user writes them, for reward.kind=function tests: workers import them by name."""

import time


def quarter(completion: str, gold: str) -> float:
    """A reward no math scorer gives: a run's reward/mean of 0.25 proves this function scored it."""
    return 0.25


def contains_gold(completion: str, gold: str) -> float:
    return 1.0 if gold in completion else -0.5


def hang_on_request(completion: str, gold: str) -> float:
    if completion == "hang":
        time.sleep(600)  # a reward stuck for good (a deadlock, a network call that never returns)
    return 1.0


def returns_nan(completion: str, gold: str) -> float:
    return float("nan")


def returns_list(completion: str, gold: str) -> list[float]:
    return [1.0, 0.0]


def returns_text(completion: str, gold: str) -> str:
    return "correct"


def raises(completion: str, gold: str) -> float:
    raise KeyError("no such gold")


def takes_one_argument(completion: str) -> float:
    return 1.0


NOT_A_FUNCTION = 3
