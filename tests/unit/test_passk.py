"""pass@k against brute-force enumeration of all k-subsets."""

from __future__ import annotations

from itertools import combinations

import pytest

from megatron_s2l.eval.passk import mean_pass_at_k, pass_at_k


def brute_force(n: int, c: int, k: int) -> float:
    samples = [True] * c + [False] * (n - c)
    subsets = list(combinations(range(n), k))
    return sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k), abs=1e-12), (n, c, k)


def test_edge_cases_and_average():
    assert pass_at_k(16, 0, 16) == 0.0 and pass_at_k(16, 1, 16) == 1.0 and pass_at_k(16, 4, 1) == 0.25
    assert mean_pass_at_k([0, 16, 8], 16, [1]) == {1: pytest.approx((0 + 1 + 0.5) / 3)}
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)
